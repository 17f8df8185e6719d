"""Output directories are written beside their final name and renamed into place only when complete."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import MMConvertError


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


@contextmanager
def atomic_output_dir(target: str | os.PathLike, option: str, sources: list[str | os.PathLike], overwrite: bool = False):
    """Yield a temporary sibling directory; on success it replaces ``target`` as a whole."""
    target = Path(target).absolute()
    for s in sources:
        s = Path(s).absolute()
        if _inside(target.resolve(), s.resolve()) or _inside(s.resolve(), target.resolve()):
            raise MMConvertError(f"{option} {target}: overlaps the source {s}; expected an output outside the source")
    if target.exists():
        if not target.is_dir():
            raise MMConvertError(f"{option} {target}: exists and is not a directory")
        if any(target.iterdir()) and not overwrite:
            raise MMConvertError(f"{option} {target}: exists and is not empty; pass --overwrite to replace it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MMConvertError(f"{option} {target}: cannot create its parent directory ({e.strerror})")
    tmp = target.parent / f".{target.name}.mm_convert-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
    except OSError as e:
        raise MMConvertError(f"{option} {target}: cannot write in {target.parent} ({e.strerror})")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(tmp)
    if target.exists():
        old = target.parent / f".{target.name}.mm_convert-old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    _fsync_dir(target.parent)


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
