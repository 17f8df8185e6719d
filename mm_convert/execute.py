"""Runs a plan: reads the pieces of each target tensor and streams them into its file, in bounded memory.

A target tensor is never whole in memory. It goes to the writer as a :class:`StreamedTensor`: a sequence of
row blocks of about ``CHUNK_BYTES`` (1 MiB; ``MM_CONVERT_CHUNK_BYTES`` overrides it). Each block is filled
with plain ``preadv`` calls straight from the source files at the pieces' byte offsets (safetensors header
offsets; for MM shards, where torch's mmap placed the tensor in the file), so a dim-0 piece costs one copy
(kernel -> block) and a dim-1 piece (TP split of columns) one more (a strided gather of the rows read).
A transposed piece (an expert's 2-D weight inside a fused 3-D HF tensor, either direction) reads the whole source
rows its box spans into a slab kept for the blocks that read the same rows, and transposes the box's columns
out of it with torch's blocked transpose (``_Blocks._fill_reshaped``).
Blocks come from a small pool and are filled by a reader thread while the writer checksums and writes the
previous one (both release the GIL), so reading and writing overlap. Memory is the pool (POOL_BLOCKS blocks, 8 by default), one
scratch block and the interpreter, whatever the model or shard size; source pages are not mapped, so the
page cache the reads fill is not part of the process's RSS.

Parallelism: :func:`run_files` splits the output files among ``workers`` forked processes (balanced by bytes);
:class:`Ranks` does the same across ``torchrun`` ranks (RANK / WORLD_SIZE), with gloo barriers. Each file is
written by exactly one process, so the output does not depend on the number of workers or ranks.
"""
from __future__ import annotations

import os
import queue
import signal
import threading
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import CheckpointError, MMConvertError, Terminated
from .formats import hf as hf_format
from .formats import mm as mm_format
from .formats.torch_stream import StreamedTensor, crc32
from .integrity import ReadLog
from .manifest import OutputDir
from .plan import HF, ZEROS, OutputFile, Piece, Ref, TargetTensor, to_src

CHUNK_BYTES = int(os.environ.get("MM_CONVERT_CHUNK_BYTES", 1 << 20))
POOL_BLOCKS = int(os.environ.get("MM_CONVERT_POOL_BLOCKS", 8))  # being written, queued, being filled
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # held while workers are forked
READ_AHEAD = int(os.environ.get("MM_CONVERT_READ_AHEAD", 32 << 20))  # bytes asked of the kernel ahead of the
# reads (page cache, not this process's memory); 0: leave read-ahead to the kernel
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}  # the same bits, as dtypes torch.from_numpy takes
SLAB_BYTES = int(os.environ.get("MM_CONVERT_SLAB_BYTES", 64 << 20))  # most source bytes the slabs of transposed /
# reshaped pieces hold (whole source rows; one expert's [hidden, 2 x moe_intermediate] is 6 MiB for 30B-A3B)


@dataclass(frozen=True)
class Loc:
    """Where a source tensor's contiguous row-major bytes lie."""
    path: str
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class Sources:
    """Resolves a Ref to a reader: the HF checkpoint or the shards of an MM checkpoint."""

    def __init__(self, hf: hf_format.HFReader | None = None, mm: mm_format.MMReader | None = None,
                 log: ReadLog | None = None):
        """``log``: where the CRC-32 of every byte range read from a shard goes (integrity.py checks them)."""
        self.hf, self.mm, self.log = hf, mm, log

    def meta(self, ref: Ref) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.hf.meta(ref.key) if ref.file == HF else self.mm.meta(ref)

    def read(self, ref: Ref, start, shape) -> torch.Tensor:
        return self.hf.read(ref.key, start, shape) if ref.file == HF else self.mm.read(ref, start, shape)

    def locate(self, ref: Ref) -> Loc | None:
        """Byte location of a source tensor, or None (then it is read through ``read``, row block by row block)."""
        cache = self.__dict__.setdefault("_locs", {})
        if ref.file == ZEROS:  # a zero fill reads nothing
            return None
        if ref not in cache:
            where = self.hf.locate(ref.key) if ref.file == HF else self.mm.locate(ref)
            cache[ref] = Loc(*where) if where is not None and where[2].itemsize in _RAW else None
        return cache[ref]

    def plan_reads(self, files: list[OutputFile]) -> None:
        """Find the pieces that are the only reader of their source rows in ``files`` (the whole plan, every
        worker and rank): their bytes are dropped from the page cache once read (use-once streaming keeps the
        cache, and the memory reclaim that a full cache costs every new page, out of the way). Rows read by
        several pieces (replicated tensors, tied copies, dim-1 TP splits) stay cached for the other readers."""
        if os.environ.get("MM_CONVERT_KEEP_CACHE", "0") == "1" or not hasattr(os, "posix_fadvise"):
            self.sole = set()
            return
        rows: dict[Ref, list[tuple[int, int, object]]] = {}
        for f in files:
            for t in f.tensors:
                for p in t.pieces:
                    if p.zero:
                        continue
                    lo = p.src_start[0] if p.src_start else 0
                    rows.setdefault(p.src, []).append((lo, lo + (p.src_shape[0] if p.shape else 1), p))
        sole = set()
        for spans in rows.values():
            spans.sort(key=lambda x: (x[0], x[1]))
            reach = -1
            for k, (lo, hi, p) in enumerate(spans):
                nxt = spans[k + 1][0] if k + 1 < len(spans) else None
                if lo >= reach and (nxt is None or nxt >= hi):
                    sole.add(p)
                reach = max(reach, hi)
        counts: dict = {}
        for spans in rows.values():
            for _, _, p in spans:
                counts[p] = counts.get(p, 0) + 1
        self.sole = {p for p in sole if counts[p] == 1}  # the same box twice (replicated) is not sole

    def locate_all(self, files: list[OutputFile]) -> None:
        for f in files:
            for t in f.tensors:
                for p in t.pieces:
                    self.locate(p.src)


def materialize(t: TargetTensor, sources: Sources) -> torch.Tensor:
    """The target tensor; a single piece covering it whole is returned as read (no extra copy)."""
    if len(t.pieces) == 1 and tuple(t.pieces[0].shape) == tuple(t.shape) and not t.pieces[0].reshaped \
            and not t.pieces[0].zero:
        p = t.pieces[0]
        return sources.read(p.src, p.src_start, p.shape)
    out = torch.empty(t.shape, dtype=t.dtype)
    for p in t.pieces:
        box = tuple(slice(d, d + n) for d, n in zip(p.dst_start, p.shape))
        if p.zero:
            out[box] = 0
        else:
            out[box] = read_piece(sources, p, p.src_start, p.shape)
    return out


def read_piece(sources: "Sources", p: Piece, src_start, shape) -> torch.Tensor:
    """The box of ``p``'s source at ``src_start`` whose target-side shape is ``shape``, in target layout."""
    x = sources.read(p.src, src_start, to_src(shape, len(p.src_start), p.transpose, 1))
    return (x.transpose(-1, -2) if p.transpose else x).reshape(shape)


def write_file(f: OutputFile, out: OutputDir, writer, sources: Sources, on_bytes: Callable[[int], None]) -> int:
    """Write one planned output file into ``out`` (journaled there) with ``writer``, a format's writer object
    (formats.hf.SafetensorsWriter, formats.mm.ShardWriter, ...); returns its size."""
    path = out.path / f.path
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = list(f.tensors)
    index = {(s, j): i for i, (s, j) in enumerate((s, j) for s, ts in f.slots.items() for j in range(len(ts)))}
    with _Prefetch(tensors, sources, on_bytes, crc=writer.zip_records) as pre, out.open(f.path) as fh:
        writer.write(fh, {s: [(t.key, t.dtype, t.shape) for t in ts] for s, ts in f.slots.items()},
                     lambda s, j: pre.stream(index[(s, j)]))
    if getattr(sources, "sole", None):  # written and fsynced: its pages are clean, free them (use-once)
        _drop_cache(path)
    return fh.size


def _drop_cache(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---- streaming --------------------------------------------------------------------------------------------
def _dims(shape) -> tuple[int, ...]:
    return tuple(shape) if len(shape) else (1,)  # a 0-d tensor is one row of one element


class _Blocks:
    """Fills the row blocks of target tensors from their pieces (runs in the reader thread)."""

    def __init__(self, sources: Sources):
        self.sources = sources
        self.fds: dict[str, int] = {}
        self.ahead: dict[int, list[tuple[int, int]]] = {}  # fd -> byte ranges already asked of the kernel
        self.scratch = np.empty(0, np.uint8)
        self.sole = set(getattr(sources, "sole", ()))
        self.slabs: list[list] = []  # whole source rows read for transposed / reshaped pieces, kept for the next
        # blocks: [path, first byte, end, bytes, the last block that used them]
        self.block = 0  # fill calls so far
        self.tmp = [np.empty(0, np.uint8), np.empty(0, np.uint8)]  # transpose staging

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def _fd(self, path: str) -> int:
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = os.open(path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return fd

    def prefetch(self, t: TargetTensor) -> None:
        """Start the disk reads of the first bytes of each piece of ``t``, the tensor after the one being
        filled: the switch to a new tensor (new offsets, often another file) then finds its first rows read.
        Without it one process writing one file waited on the disk at every tensor (~20-45% iowait)."""
        if not READ_AHEAD or not hasattr(os, "posix_fadvise"):
            return
        for p in t.pieces:
            loc = self.sources.locate(p.src)  # cached by Sources
            if loc is None:
                continue
            srow = prod(_dims(loc.shape)[1:]) * t.dtype.itemsize
            s0 = p.src_start[0] if p.src_start else 0
            n = min((p.src_shape[0] if p.shape else 1) * srow, READ_AHEAD)
            fd = self._fd(loc.path)
            os.posix_fadvise(fd, loc.offset + s0 * srow, n, os.POSIX_FADV_WILLNEED)

    def _pread(self, path: str, offset: int, out: np.ndarray, drop: bool = False, tensor: str | None = None) -> None:
        """Read ``out`` from ``path`` at ``offset``; with ``tensor`` (the source tensor's name) and a read log, the
        range's CRC-32 goes into the log for the source-integrity check."""
        self._read_into(path, offset, out, drop)
        log = getattr(self.sources, "log", None)
        if tensor is not None and log is not None:
            log.add(path, offset, memoryview(out).cast("B"), tensor)

    def _read_into(self, path: str, offset: int, out: np.ndarray, drop: bool = False) -> None:
        fd = self._fd(path)
        mv = memoryview(out).cast("B")
        ranges = self.ahead.setdefault(fd, [])  # a few interleaved streams per file (q, k, v rows...)
        if READ_AHEAD and hasattr(os, "posix_fadvise") and not any(lo <= offset and offset + len(mv) + READ_AHEAD // 2 <= hi
                                                    for lo, hi in ranges):
            # start the disk reads of what comes next now, so they overlap the checksums and writes
            os.posix_fadvise(fd, offset, len(mv) + READ_AHEAD, os.POSIX_FADV_WILLNEED)
            ranges[:] = [r for r in ranges if not (r[0] <= offset <= r[1])][-7:] + [(offset, offset + len(mv) + READ_AHEAD)]
        done = 0
        while done < len(mv):
            n = os.preadv(fd, [mv[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{path}: ends at byte {offset + done}, a tensor needs {len(mv) - done} more "
                                      f"(truncated file?)")
            done += n
        if drop:  # no other piece reads these bytes: free their page cache now
            os.posix_fadvise(fd, offset, len(mv), os.POSIX_FADV_DONTNEED)

    def flat(self, t: TargetTensor, chunk: int) -> TargetTensor:
        """``t`` as blocks see it: a tensor of 3 or more dims whose rows (dim 0) are larger than a block and
        whose pieces each fill part of one row from a matrix (experts of a fused 3-D HF tensor, from MM's 2-D
        weights: a row is a whole expert, 6 MiB for 30B-A3B) as the same bytes with dims 0 and 1 merged, so its
        blocks stay ~``chunk`` bytes (the pool holds 8) instead of a row each. Otherwise ``t`` itself."""
        shape = tuple(t.shape)
        if len(shape) < 3 or prod(shape[1:]) * t.dtype.itemsize <= chunk:
            return t
        pieces = []
        for p in t.pieces:
            if not p.reshaped or len(p.src_start) != len(shape) - 1 or p.shape[0] != 1:
                return t
            q = Piece(p.src, p.src_start, (p.dst_start[0] * shape[1] + p.dst_start[1],) + tuple(p.dst_start[2:]),
                      tuple(p.shape[1:]), p.transpose)
            if p in self.sole:
                self.sole.add(q)
            pieces.append(q)
        return TargetTensor(t.key, (shape[0] * shape[1],) + shape[2:], t.dtype, pieces, t.copy)

    @staticmethod
    def rows_per_block(t: TargetTensor, chunk: int) -> int:
        """Rows of ``t`` per block: at least ``chunk`` bytes (rounded up to whole rows; the manifest's hasher
        overlaps writes of 1 MiB and more). A dim-1 piece reads whole source rows into the scratch block, at
        most (source row / target row) times the block: the TP size."""
        row = prod(_dims(t.shape)[1:]) * t.dtype.itemsize
        return max(1, -(-chunk // max(row, 1)))

    def fill(self, t: TargetTensor, locs: list[Loc | None], r0: int, r1: int, out: np.ndarray) -> None:
        """Rows [r0, r1) of ``t`` into ``out`` (uint8, exactly their size)."""
        shape = _dims(t.shape)
        isz = t.dtype.itemsize
        trow = prod(shape[1:]) * isz
        dst = None
        self.block += 1
        for p, loc in zip(t.pieces, locs):
            pd, ps, pss = _dims(p.dst_start) if p.dst_start else (0,), _dims(p.shape), p.src_start or (0,)
            a, b = max(r0, pd[0]), min(r1, pd[0] + ps[0])
            if a >= b:
                continue
            s0, n = pss[0] + a - pd[0], b - a
            if p.zero:  # vocabulary padding
                if dst is None:
                    dst = out.view(_RAW[isz]).reshape((r1 - r0,) + shape[1:])
                dst[(slice(a - r0, b - r0),) + tuple(slice(d, d + k) for d, k in zip(pd[1:], ps[1:]))] = 0
                continue
            if p.reshaped and loc is not None and self._fill_reshaped(p, loc, t, a, b, r0, r1, out):
                continue
            if p.reshaped:  # no byte location (or an odd box): the rows' box through the reader (and transposed)
                sub = (b - a,) + tuple(ps[1:])
                at = to_src((a - pd[0],) + (0,) * (len(ps) - 1), len(p.src_start), p.transpose, 0)
                x = read_piece(self.sources, p, tuple(u + v for u, v in zip(p.src_start, at)), sub)
                src = x.contiguous().reshape(-1).view(torch.uint8).numpy().view(_RAW[isz]).reshape(sub)
                if dst is None:
                    dst = out.view(_RAW[isz]).reshape((r1 - r0,) + shape[1:])
                dst[(slice(a - r0, b - r0),) + tuple(slice(d, d + k) for d, k in zip(pd[1:], ps[1:]))] = src
                continue
            if _row_contiguous(p, loc, t):
                srow = prod(_dims(loc.shape)[1:]) * isz
                self._pread(loc.path, loc.offset + s0 * srow, out[(a - r0) * trow:(b - r0) * trow], p in self.sole,
                            p.src.key)
                continue
            if loc is not None:  # read whole source rows, then gather the piece's columns
                src_shape = _dims(loc.shape)
                need = n * prod(src_shape[1:]) * isz
                if self.scratch.nbytes < need:
                    self.scratch = np.empty(need, np.uint8)
                buf = self.scratch[:need]
                self._pread(loc.path, loc.offset + s0 * prod(src_shape[1:]) * isz, buf, tensor=p.src.key)
                src = buf.view(_RAW[isz]).reshape((n,) + src_shape[1:])
                src = src[(slice(None),) + tuple(slice(s, s + k) for s, k in zip(pss[1:], ps[1:]))]
            else:  # no byte location: read the box through the reader (still one row block at a time)
                x = self.sources.read(p.src, (s0,) + tuple(pss[1:]), (n,) + tuple(ps[1:])) if p.shape else \
                    self.sources.read(p.src, p.src_start, p.shape)
                src = x.contiguous().reshape(-1).view(torch.uint8).numpy().view(_RAW[isz]).reshape((n,) + ps[1:])
            if dst is None:
                dst = out.view(_RAW[isz]).reshape((r1 - r0,) + shape[1:])
            dst[(slice(a - r0, b - r0),) + tuple(slice(d, d + k) for d, k in zip(pd[1:], ps[1:]))] = src


    def _fill_reshaped(self, p: Piece, loc: Loc, t: TargetTensor, a: int, b: int, r0: int, r1: int,
                       out: np.ndarray) -> bool:
        """Target rows [a, b) of a transposed / reshaped piece (an expert's 2-D weight inside a fused 3-D tensor,
        either side) into ``out``: the whole source rows its box spans are read with one ``preadv`` into a slab
        that later blocks of the same rows reuse (the blocks of one expert, gate and up alike), and the box's
        columns are copied (transposed) from it. False when the box is not one 2-D matrix of both sides."""
        isz = t.dtype.itemsize
        ps, pd = _dims(p.shape), _dims(p.dst_start)
        sub = (b - a,) + tuple(ps[1:])
        rank = len(p.src_start)
        at = to_src((a - pd[0],) + (0,) * (len(ps) - 1), rank, p.transpose, 0)
        start = tuple(u + v for u, v in zip(p.src_start, at))
        box = to_src(sub, rank, p.transpose, 1)
        full = tuple(loc.shape)
        if rank < 2 or len(sub) < 2 or len(full) != rank or prod(box[:-2]) != 1 or prod(sub[:-2]) != 1:
            return False
        row = full[-1] * isz
        first = 0  # the box's first source row, counting rows of the last axis over all leading axes
        for i, n in zip(start[:-1], full[:-1]):
            first = first * n + i
        rows, c0, cols = box[-2], start[-1], box[-1]
        tgt = out.view(_RAW[isz]).reshape((r1 - r0,) + _dims(t.shape)[1:])
        tgt = tgt[(slice(a - r0, b - r0),) + tuple(slice(d, d + k) for d, k in zip(pd[1:], ps[1:]))]
        tgt = tgt[(0,) * (tgt.ndim - 2)]  # the block's box: [cols, rows] when transposed, else [rows, cols]
        step = max(1, SLAB_BYTES // 2 // max(row, 1))
        drop = p in self.sole and rows <= step  # read once: later blocks find the rows in the slab
        for k0 in range(0, rows, step):
            k1 = min(rows, k0 + step)
            src = self._slab(loc.path, loc.offset + (first + k0) * row, (k1 - k0) * row, drop, p.src.key)
            src = src.view(_RAW[isz]).reshape(k1 - k0, full[-1])[:, c0:c0 + cols]
            if p.transpose:
                self._transpose_into(tgt[:, k0:k1], src, isz)
            else:
                np.copyto(tgt[k0:k1], src)
        return True

    def _slab(self, path: str, offset: int, n: int, drop: bool, tensor: str | None = None) -> np.ndarray:
        """Source bytes [offset, offset + n) of ``path``: from a slab that holds them (HF -> MM, the blocks of an
        expert's fc1, gate and up alike, read the same rows; MM -> HF, each block reads the pieces of every TP
        rank in turn), else read into a new one. Slabs not used by this block or the one before go (their
        buffer reused), and all of them hold at most ``SLAB_BYTES``: memory is what two blocks read."""
        for s in self.slabs:
            if s[0] == path and s[1] <= offset and offset + n <= s[2]:
                s[4] = self.block
                return s[3][offset - s[1]:offset - s[1] + n]
        stale = [s for s in self.slabs if s[4] < self.block - 1]
        self.slabs = [s for s in self.slabs if s[4] >= self.block - 1]
        buf = next((s[3] for s in stale if s[3].nbytes >= n), None)
        if buf is None:
            held = sum(s[3].nbytes for s in self.slabs)
            while self.slabs and held + n > SLAB_BYTES:  # the least recently used go
                self.slabs.sort(key=lambda s: s[4])
                held -= self.slabs.pop(0)[3].nbytes
            buf = np.empty(n, np.uint8)
        self._pread(path, offset, buf[:n], drop, tensor)
        self.slabs.append([path, offset, offset + n, buf, self.block])
        return buf[:n]

    def _stage(self, k: int, n: int) -> np.ndarray:
        if self.tmp[k].nbytes < n:
            self.tmp[k] = np.empty(n, np.uint8)
        return self.tmp[k][:n]

    def _transpose_into(self, dst: np.ndarray, src: np.ndarray, isz: int) -> None:
        """``dst[...] = src.T`` for 2-D arrays: torch's blocked transpose of a contiguous matrix into a contiguous
        one (~3.5 GB/s here, against ~1 GB/s for numpy's strided copy and ~0.5 GB/s into a column range), with
        row-range copies to and from staging buffers where ``src`` / ``dst`` are column ranges."""
        r, c = src.shape
        if r * c < 4096:
            np.copyto(dst, src.T)
            return
        if not src.flags.c_contiguous:
            a = self._stage(0, r * c * isz).view(src.dtype).reshape(r, c)
            np.copyto(a, src)
            src = a
        b = dst if dst.flags.c_contiguous else self._stage(1, r * c * isz).view(dst.dtype).reshape(c, r)
        torch.from_numpy(b.view(_SIGNED[isz])).copy_(torch.from_numpy(src.view(_SIGNED[isz])).t())
        if b is not dst:
            np.copyto(dst, b)


def _row_contiguous(p, loc: Loc | None, t: TargetTensor) -> bool:
    """A piece whose rows are whole rows of both its source and its target: a contiguous byte range on both sides."""
    if loc is None or p.reshaped:
        return False
    src, ps, tgt = _dims(loc.shape), _dims(p.shape), _dims(t.shape)
    return ps[1:] == src[1:] == tgt[1:] and not any(p.src_start[1:]) and not any(p.dst_start[1:])


_END = object()


class _Prefetch:
    """Reader thread filling pooled row blocks of a file's tensors, in order; ``stream(i)`` hands tensor i to
    the writer as a StreamedTensor whose chunks are those blocks."""

    def __init__(self, tensors: list[TargetTensor], sources: Sources, on_bytes: Callable[[int], None],
                 chunk: int | None = None, crc: bool = False):
        self.tensors, self.sources, self.on_bytes = tensors, sources, on_bytes
        self.crc = crc  # the reader thread also computes each tensor's CRC-32 (zip records), off the writer's path
        self.crcs: dict[int, int] = {}
        self.chunk = chunk or CHUNK_BYTES
        self.ready: queue.Queue = queue.Queue(maxsize=POOL_BLOCKS - 1)
        self.free: queue.Queue = queue.Queue()
        for _ in range(POOL_BLOCKS):
            self.free.put(None)  # allocated on first use
        self.stop = threading.Event()
        self.next = 0
        self.thread = threading.Thread(target=self._run, name="mm_convert-reader", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.free.put_nowait(None)
                self.ready.get(timeout=0.05)
            except queue.Empty:
                pass
        return False

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self) -> None:
        blocks = _Blocks(self.sources)
        try:
            for i, t in enumerate(self.tensors):
                if i + 1 < len(self.tensors):
                    blocks.prefetch(self.tensors[i + 1])
                t = blocks.flat(t, self.chunk)
                locs = [self.sources.locate(p.src) for p in t.pieces]
                rows = _dims(t.shape)[0]
                step = _Blocks.rows_per_block(t, self.chunk)
                trow = prod(_dims(t.shape)[1:]) * t.dtype.itemsize
                crc = 0
                for r0 in range(0, rows, step):
                    r1 = min(rows, r0 + step)
                    buf = None
                    while buf is None and not self.stop.is_set():
                        try:
                            buf = self.free.get(timeout=0.1)
                        except queue.Empty:
                            continue
                        need = (r1 - r0) * trow
                        if buf is None or buf.nbytes < need:
                            buf = np.empty(max(need, min(self.chunk + (self.chunk >> 2), t.nbytes)), np.uint8)
                    if self.stop.is_set():
                        return
                    out = buf[:(r1 - r0) * trow]
                    if out.nbytes:
                        blocks.fill(t, locs, r0, r1, out)
                        if self.crc:
                            crc = crc32(out, crc)
                    if not self._put((i, buf, out)):
                        return
                if not self._put((i, _END, crc)):
                    return
        except BaseException as e:  # handed to the writer, which raises it
            self._put((-1, e, None))
        finally:
            blocks.close()

    def _chunks(self, i: int):
        while True:
            j, buf, out = self.ready.get()
            if j == -1:
                raise buf
            if j != i:
                raise RuntimeError(f"reader and writer out of step: tensor {j} came for tensor {i}")
            if buf is _END:
                self.crcs[i] = out
                return
            try:
                yield memoryview(out)
            finally:
                self.free.put(buf)
            self.on_bytes(out.nbytes)

    def stream(self, i: int) -> StreamedTensor:
        t = self.tensors[i]
        return StreamedTensor(t.dtype, tuple(t.shape), lambda: self._chunks(i),
                              (lambda: self.crcs.pop(i)) if self.crc else None)


# ---- workers and ranks ------------------------------------------------------------------------------------
def assign(files: list[OutputFile], n: int) -> list[list[int]]:
    """Indices of ``files`` for each of ``n`` workers, balanced by bytes (largest first to the least loaded;
    ties broken by index, so every process computes the same split)."""
    bins: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    for i in sorted(range(len(files)), key=lambda i: (-files[i].nbytes, i)):
        w = min(range(n), key=lambda k: (load[k], k))
        bins[w].append(i)
        load[w] += files[i].nbytes
    return [sorted(b) for b in bins]


def default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def run_files(files: list[OutputFile], out: OutputDir, writer, sources: Sources, on_bytes: Callable[[int], None],
              workers: int = 1) -> int:
    """Write ``files`` into ``out``: in this process, or split among ``workers`` forked processes."""
    workers = max(1, min(workers, len(files)))
    if workers == 1:
        return sum(write_file(f, out, writer, sources, on_bytes) for f in files)
    import multiprocessing as mp
    sources.locate_all(files)  # once, before forking: the workers inherit the locations
    ctx = mp.get_context("fork")
    done = ctx.Array("q", workers, lock=False)  # bytes written, one slot per worker
    procs = []
    # Ctrl-C or SIGTERM while forking would leave a just-forked worker unknown to the cleanup below (and, forked
    # after the signal, not signalled itself): hold both until every worker is listed (workers unblock them)
    held = _block_stop_signals()
    p = None
    try:
        for k, idx in enumerate(assign(files, workers)):
            rx, tx = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker, args=([files[i] for i in idx], out, writer, sources, done, k, tx, os.getpid()),
                            name=f"mm_convert-worker-{k}", daemon=True)
            p.start()
            tx.close()
            procs.append((p, rx))
            p = None
    except BaseException:  # the signal reached another thread of this process (it cannot be held there)
        for q in [q for q, _ in procs] + ([p] if p is not None and getattr(p, "_popen", None) else []):
            q.kill()
            q.join()
        _unblock(held)  # do not leave this thread deaf to Ctrl-C and SIGTERM
        raise
    total, seen, error = 0, 0, None
    try:
        _unblock(held)  # a signal that came meanwhile is raised here, inside the cleanup's try
        pending = list(procs)
        while pending:
            for p, rx in list(pending):
                if rx.poll(0.05):
                    try:
                        status, value = rx.recv()
                    except EOFError:
                        p.join(1)
                        status, value = "error", _died(p)
                    p.join()
                    pending.remove((p, rx))
                    if status == "ok":
                        total += value[0]
                        if sources.log is not None and value[1] is not None:
                            sources.log.merge(value[1])
                    elif error is None:
                        error = value
                elif not p.is_alive() and not rx.poll(0):
                    pending.remove((p, rx))
                    if error is None:
                        error = _died(p)
            if error is not None:
                break
            now = sum(done)
            if now > seen:
                on_bytes(now - seen)
                seen = now
    finally:
        for p, rx in procs:
            if p.is_alive():
                p.terminate()  # only when another worker failed or we were interrupted
        for p, rx in procs:
            p.join(10)
            if p.is_alive():  # it did not clean up in time (stuck in I/O?): stop it for good
                p.kill()
                p.join()
            rx.close()
    if error is not None:
        raise error
    if sum(done) > seen:
        on_bytes(sum(done) - seen)
    return total


def _block_stop_signals():
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)


def _unblock(held) -> None:
    if held is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _died(p) -> BaseException:
    if p.exitcode == -signal.SIGTERM:  # the whole job is being ended (a scheduler signals every process)
        return Terminated()
    return MMConvertError(f"{p.name} died (exit code {p.exitcode}); out of memory?")


def _die_with_parent() -> None:
    """A worker must not outlive its parent (killed or crashed), or it would keep writing into the output."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(files, out, writer, sources, done, k, tx, parent: int) -> None:
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent cleans up; a worker told to stop just stops
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # held while forking
    def advance(n: int) -> None:
        done[k] += n
    try:
        total = sum(write_file(f, out, writer, sources, advance) for f in files)
        tx.send(("ok", (total, sources.log)))  # the ranges this worker read, for the parent's integrity check
    except BaseException as e:
        try:
            tx.send(("error", e))
        except Exception:
            tx.send(("error", MMConvertError(f"{type(e).__name__}: {e}")))
    finally:
        tx.close()


class Ranks:
    """torchrun ranks (RANK / WORLD_SIZE in the environment) sharing one conversion: each writes its share of
    the files; gloo collectives carry the output directory from rank 0 and the outcome back to it."""

    def __init__(self):
        off = os.environ.get("MM_CONVERT_DISTRIBUTED", "1") == "0"  # a rank converting alone inside a bigger job
        self.world = 1 if off else int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0 if off else int(os.environ.get("RANK", "0"))
        self._inited = False

    @property
    def active(self) -> bool:
        return self.world > 1

    def _group(self):
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("gloo")
            self._inited = True
        return dist

    def share(self, files: list[OutputFile]) -> list[OutputFile]:
        if not self.active:
            return files
        return [files[i] for i in assign(files, self.world)[self.rank]]

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        dist = self._group()
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_outcome(self, ok: bool, nbytes: int) -> tuple[int, int]:
        """(ranks that succeeded, bytes written by all ranks)."""
        dist = self._group()
        t = torch.tensor([int(ok), nbytes], dtype=torch.int64)
        dist.all_reduce(t)
        return int(t[0]), int(t[1])

    def close(self) -> None:
        if self._inited:
            import torch.distributed as dist
            dist.destroy_process_group()
            self._inited = False


def matches(t: TargetTensor, sources: Sources, actual: torch.Tensor, where: Loc | None) -> bool:
    """Whether ``actual`` (a tensor of a checkpoint, lying at ``where`` in its file) holds exactly target ``t``
    as built from its pieces. Both sides are read one row block at a time (``where`` with ``preadv``), so
    memory stays bounded whatever the tensor's size; without a byte location the two are built whole."""
    if actual.dtype != t.dtype or tuple(actual.shape) != tuple(t.shape):
        return False
    if where is None:
        return same_bits(materialize(t, sources), actual)
    blocks = _Blocks(sources)
    try:
        t = blocks.flat(t, CHUNK_BYTES)
        locs = [sources.locate(p.src) for p in t.pieces]
        rows = _dims(t.shape)[0]
        trow = prod(_dims(t.shape)[1:]) * t.dtype.itemsize
        step = _Blocks.rows_per_block(t, CHUNK_BYTES)
        want = np.empty(step * trow, np.uint8)
        have = np.empty(step * trow, np.uint8)
        for r0 in range(0, rows if trow else 0, step):
            r1 = min(rows, r0 + step)
            n = (r1 - r0) * trow
            blocks.fill(t, locs, r0, r1, want[:n])
            blocks._pread(where.path, where.offset + r0 * trow, have[:n])
            if not np.array_equal(want[:n], have[:n]):
                return False
        return True
    finally:
        blocks.close()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
