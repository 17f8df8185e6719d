"""Output directories are written beside their final name and renamed into place only when complete.

``target`` is written as ``.{name}.mm_convert-tmp`` in the same parent directory (same file system, so the
final rename is atomic). An existing non-empty ``target`` is refused unless ``overwrite``; it is then replaced
as a whole (swapped atomically where the kernel allows, never merged with the new files). An output that
overlaps a source is refused. With ``resume`` and a ``plan_id``, the temporary directory of an interrupted run
of the same plan is kept: its journaled, checksum-matching files stay, the rest is removed (manifest.py).
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import MMConvertError
from .manifest import JOURNAL, MANIFEST, OutputDir, read_journal, resume_entries, start_journal


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def tmp_dir_of(target: str | os.PathLike) -> Path:
    target = Path(target).absolute()
    return target.parent / f".{target.name}.mm_convert-tmp"


def check_target(target: str | os.PathLike, option: str, sources: list[str | os.PathLike], overwrite: bool = False) -> Path:
    """The checks made before anything is written; returns the absolute target."""
    target = Path(target).absolute()
    for s in sources:
        s = Path(s).absolute()
        if _inside(target.resolve(), s.resolve()) or _inside(s.resolve(), target.resolve()):
            raise MMConvertError(f"{option} {target}: overlaps the source {s}; expected an output outside the source")
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise MMConvertError(f"{option} {target}: exists and is not a directory; expected a new or empty directory")
        if any(target.iterdir()) and not overwrite:
            raise MMConvertError(f"{option} {target}: exists and is not empty; pass --overwrite to replace it")
    return target


@contextmanager
def atomic_output_dir(target: str | os.PathLike, option: str, sources: list[str | os.PathLike], overwrite: bool = False,
                      *, resume: bool = False, plan_id: str | None = None):
    """Yield a temporary sibling directory (an OutputDir, with its journal when there is a ``plan_id``); on success
    it replaces ``target`` as a whole."""
    target = check_target(target, option, sources, overwrite)
    for a in target.parents:
        if a.exists():
            if not a.is_dir():
                raise MMConvertError(f"{option} {target}: {a} is not a directory; expected a directory path to write under")
            break
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MMConvertError(f"{option} {target}: cannot create its parent directory ({e.strerror or e})")
    tmp = tmp_dir_of(target)
    kept, lock = None, None
    if tmp.is_dir() and not tmp.is_symlink():
        lock = _lock(tmp, option, target)  # refuse to take over the directory of a run still going
        if resume and plan_id:
            kept = resume_entries(tmp, plan_id)
    if kept is None and (tmp.exists() or tmp.is_symlink()):
        _remove(tmp)
        _unlock(lock)
        lock = None
    try:
        tmp.mkdir(exist_ok=kept is not None)
        if lock is None:
            lock = _lock(tmp, option, target)
        if plan_id and kept is None:
            start_journal(tmp, plan_id)
    except OSError as e:
        _unlock(lock)
        _remove(tmp)
        raise MMConvertError(f"{option} {target}: cannot write in {target.parent} ({e.strerror or e}); "
                             f"expected a writable location")
    try:
        yield from _finish(OutputDir(tmp, tmp / JOURNAL if plan_id else None), target, lock)
    finally:
        _unlock(lock)


def _finish(out: OutputDir, target: Path, lock):
    tmp = out.path
    try:
        yield out
        _fsync_dir(tmp)
        for d in tmp.rglob("*"):
            if d.is_dir():
                _fsync_dir(d)
    except KeyboardInterrupt:
        # an interrupted run keeps its finished, journaled files for --resume; nothing sits at the final name
        if not read_journal(tmp)[1] and not (tmp / MANIFEST).is_file():
            _remove(tmp)
        raise
    except BaseException:
        _remove(tmp)
        raise
    if target.exists():
        if not _exchange(tmp, target):
            old = target.parent / f".{target.name}.mm_convert-old"
            _remove(old)
            os.rename(target, old)
            os.rename(tmp, target)
            tmp = old
        _remove(tmp)  # now the previous output
    else:
        os.rename(tmp, target)
    _fsync_dir(target.parent)


def _lock(tmp: Path, option: str, target: Path) -> int:
    """An exclusive lock on the temporary directory for the life of the run (released by the kernel when the
    process ends, however it ends)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MMConvertError(f"{option} {target}: another mm-convert process is writing it ({tmp} is locked); "
                             f"expected one run per output") from None
    return fd


def _unlock(fd) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except OSError:
            pass


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
