"""Steady disk writes for large output files.

Left alone, the kernel lets gigabytes of a file's pages sit dirty in memory and then writes them in bursts: at
its background threshold (10% of RAM), and at the ``fsync`` that closes each output file. A burst stalls
everything else for a second or more (reads queue behind it, the writer waits in fsync), and on a 2-core
machine those stalls were about a sixth of a conversion's wall time. :class:`Writeback` starts the writes of
each ``STEP`` bytes as soon as they are written (``sync_file_range``), waits for the step before the last
one, and then drops those clean pages from the page cache (the output is not read back). So at most about
two steps of a file are dirty at any time, the disk writes while the converter reads and computes, and the
final fsync has almost nothing left to do. Linux only; elsewhere (or with ``MM_CONVERT_WRITEBACK_BYTES=0``)
it does nothing and the kernel's own policy applies.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

STEP = int(os.environ.get("MM_CONVERT_WRITEBACK_BYTES", 32 << 20))
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4


def _sync_file_range():
    if not hasattr(os, "posix_fadvise"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SFR = _sync_file_range() if STEP > 0 else None


class Writeback:
    """Call :meth:`advance` with the number of bytes the file descriptor holds so far."""

    def __init__(self, fd: int, drop: bool = True):
        self.fd, self.drop = fd, drop
        self.started = 0  # bytes whose writes were started
        self.done = 0  # bytes known written (and dropped)
        self.on = _SFR is not None

    def advance(self, size: int) -> None:
        if not self.on:
            return
        while size - self.started >= STEP:
            self._call(self.started, STEP, _WRITE)
            self.started += STEP
            if self.started - self.done > STEP:  # the step before the last one: wait for it, then free it
                n = self.started - STEP - self.done
                self._call(self.done, n, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
                if self.drop:
                    os.posix_fadvise(self.fd, self.done, n, os.POSIX_FADV_DONTNEED)
                self.done += n

    def _call(self, offset: int, nbytes: int, flags: int) -> None:
        if _SFR(self.fd, offset, nbytes, flags) != 0:  # e.g. a file system that does not support it: stop trying
            self.on = False
