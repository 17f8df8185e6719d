"""The checksummed manifest of every output directory, and the journal that makes ``--resume`` possible.

While a command runs, its output lives in a temporary sibling directory (see output.py) holding a journal,
``.mm_convert-journal``: a header line with the id of the plan (tool version, command, layout, source identity,
every planned file and tensor) and then one JSON line per finished weight file (path, size, sha256), appended
only after the file was written and fsynced. The sha256 is computed from the bytes as they are written
(:func:`open_output` wraps the file object), so no file is read back.

When all files are written, :func:`finalize` turns the journal into ``mm_convert_manifest.json``: tool version,
command, layout, source identity, plan id, and each file's size and sha256 (small files not written through
:func:`open_output`, e.g. the tracker or the index, are hashed then). ``--resume`` keeps the files of an
interrupted run whose size and sha256 still match its journal, when the plan id is the same; the rest is redone.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError, MMConvertError, load_json_object
from .writeback import STEP as _WRITEBACK_STEP, Writeback

MANIFEST = "mm_convert_manifest.json"
JOURNAL = ".mm_convert-journal"
_HASH_CHUNK = 16 << 20


class OutputWriteError(MMConvertError):
    """Writing an output file failed (disk full, I/O error, read-only location)."""


_OVERLAP_MIN = 1 << 20
_HASHER: tuple[int, ThreadPoolExecutor] | None = None


def _hasher() -> ThreadPoolExecutor:
    """One hashing thread per process (a forked worker gets its own)."""
    global _HASHER
    if _HASHER is None or _HASHER[0] != os.getpid():
        _HASHER = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="mm_convert-sha256"))
    return _HASHER[1]


class HashingWriter:
    """A binary file object that hashes and counts the bytes written through it."""

    def __init__(self, fh, path: Path):
        self.fh, self.path = fh, path
        self.sha = hashlib.sha256()
        self.size = 0
        self.writeback = Writeback(fh.fileno(), drop=os.environ.get("MM_CONVERT_KEEP_CACHE", "0") != "1")
        self._flushed = 0

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        # a large block is hashed on a helper thread while this one writes it (both release the GIL); the
        # call returns only when both are done, since the caller may reuse the buffer afterwards
        fut = _hasher().submit(self.sha.update, mv) if len(mv) >= _OVERLAP_MIN else None
        try:
            n = self.fh.write(mv)
        except OSError as e:
            raise OutputWriteError(f"{self.path}: cannot write ({e.strerror or e}); {self.size} bytes were written")
        finally:
            if fut is not None:
                fut.result()
        if fut is None:
            self.sha.update(mv)
        self.size += len(mv)
        if self.writeback.on and self.size - self._flushed >= _WRITEBACK_STEP:  # hand the buffered tail to the kernel, then pace its writes
            self.fh.flush()
            self._flushed = self.size
            self.writeback.advance(self.size)
        return n

    def tell(self) -> int:
        return self.fh.tell()

    def flush(self) -> None:
        self.fh.flush()

    def fileno(self) -> int:
        return self.fh.fileno()


@dataclass(frozen=True)
class OutputDir:
    """A directory being written inside the temporary output directory, and the ``journal`` that records each file
    finished in it (None: nothing is journaled). Whatever writes the output's files is handed one."""
    path: Path
    journal: Path | None = None

    def __truediv__(self, name: str) -> "OutputDir":
        return OutputDir(self.path / name, self.journal)

    def open(self, rel: str):
        """:func:`open_output` of ``rel`` (below ``path``), journaled."""
        return open_output(self.path / rel, self.journal)


@contextmanager
def open_output(path: str | os.PathLike, journal: Path | None = None):
    """Open ``path`` for writing through a :class:`HashingWriter`. On success the file is flushed, fsynced and
    recorded (size, sha256) in ``journal``, if given; on failure it is removed."""
    path = Path(path)
    try:
        fh = open(path, "wb")
    except OSError as e:
        raise OutputWriteError(f"{path}: cannot create ({e.strerror or e})")
    w = HashingWriter(fh, path)
    try:
        with fh:
            yield w
            try:
                fh.flush()
                os.fsync(fh.fileno())
            except OSError as e:
                raise OutputWriteError(f"{path}: cannot write ({e.strerror or e})")
    except BaseException:
        try:
            path.unlink()
        except OSError:
            pass
        raise
    if journal is not None:
        record_written(journal, path, w.size, w.sha.hexdigest())


# ---- journal ---------------------------------------------------------------------------------------------
def _append(journal: Path, doc: dict) -> None:
    line = (json.dumps(doc, separators=(",", ":")) + "\n").encode()
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line)  # one write of a short line: whole or not at all under O_APPEND
        os.fsync(fd)
    finally:
        os.close(fd)


def record_written(journal: Path, path: Path, size: int, sha256: str) -> None:
    """Append a finished file to ``journal``, by its path relative to the journal's directory."""
    root = Path(journal).absolute().parent
    _append(Path(journal), {"path": Path(path).absolute().relative_to(root).as_posix(), "size": size, "sha256": sha256})


def start_journal(tmp: Path, plan_id: str, entries: dict[str, dict] | None = None) -> None:
    """(Re)write the journal: the header, then the entries kept from an earlier run."""
    lines = [json.dumps({"journal": 1, "plan": plan_id}, separators=(",", ":"))]
    lines += [json.dumps({"path": p, **e}, separators=(",", ":")) for p, e in sorted((entries or {}).items())]
    part = tmp / (JOURNAL + ".part")
    with open(part, "w") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, tmp / JOURNAL)


def read_journal(tmp: Path) -> tuple[str | None, dict[str, dict]]:
    """(plan id, {path: {size, sha256}}) of a journal; a torn last line is ignored."""
    try:
        text = (Path(tmp) / JOURNAL).read_text()
    except (OSError, UnicodeDecodeError):
        return None, {}
    plan, entries = None, {}
    for i, line in enumerate(text.splitlines()):
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue
        if i == 0:
            plan = doc.get("plan") if isinstance(doc, dict) else None
        elif isinstance(doc, dict) and {"path", "size", "sha256"} <= set(doc):
            entries[doc["path"]] = {"size": doc["size"], "sha256": doc["sha256"]}
    return plan, entries


def resume_entries(tmp: Path, plan_id: str) -> dict[str, dict] | None:
    """Prepare an interrupted temporary directory for ``--resume``: when its journal has the same plan id,
    keep the journaled files whose size and sha256 still match, delete every other file, rewrite the journal
    and return the kept entries; None when the directory cannot be resumed (other plan, no journal)."""
    plan, entries = read_journal(tmp)
    if plan is None:  # killed after the manifest replaced the journal, before the rename: the manifest lists all
        try:
            m = read_manifest(tmp)
        except CheckpointError:
            m = None
        if m and isinstance(m.get("files"), dict):
            plan, entries = m.get("plan"), {k: v for k, v in m["files"].items() if isinstance(v, dict)}
    if plan != plan_id:
        return None
    kept = {}
    for rel, e in entries.items():
        p = tmp / rel
        if p.is_file() and p.stat().st_size == e.get("size") and sha256_file(p) == e.get("sha256"):
            kept[rel] = e
    for p in sorted(tmp.rglob("*"), reverse=True):
        rel = p.relative_to(tmp).as_posix()
        if p.is_file() and rel not in kept and rel != JOURNAL:
            p.unlink()
    start_journal(tmp, plan_id, kept)
    return kept


# ---- manifest --------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def plan_id(doc) -> str:
    """A stable hash of what a run will write (JSON-able description of command, layout, source and files)."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def files_description(files) -> list:
    """The planned files and tensors (path, slot, key, dtype, shape) for a plan id."""
    return [[f.path, [[s, t.key, str(t.dtype), list(t.shape)] for s, ts in f.slots.items() for t in ts]] for f in files]


def source_identity(src_dir, rel_files) -> dict:
    """Where the input is and the size and mtime of each of its files that the output is made from."""
    root = Path(src_dir).absolute()
    files = {}
    for rel in sorted(set(rel_files)):
        p = root / rel
        if p.is_file():
            st = p.stat()
            files[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"path": str(root), "files": files}


def finalize(tmp: Path, doc: dict, expect: list[str] | None = None) -> dict:
    """Write ``mm_convert_manifest.json`` into a finished temporary directory: ``doc`` plus every file's
    size and sha256 (from the journal for files written through :func:`open_output`, whose sizes are checked
    on disk; hashed now for the others), then remove the journal. ``expect``: the planned weight files, each
    of which must have been written completely (journaled)."""
    _, journaled = read_journal(tmp)
    for rel in expect or ():
        if rel not in journaled:
            raise CheckpointError(f"{tmp / rel}: was not written completely; the output is not complete")
    files = {}
    for p in sorted(tmp.rglob("*")):
        rel = p.relative_to(tmp).as_posix()
        if not p.is_file() or rel in (JOURNAL, MANIFEST, JOURNAL + ".part"):
            continue
        size = p.stat().st_size
        e = journaled.get(rel)
        if e is not None:
            if e["size"] != size:
                raise CheckpointError(f"{p}: {size} bytes on disk, {e['size']} were written; the output is not complete")
            files[rel] = {"size": size, "sha256": e["sha256"]}
        else:
            files[rel] = {"size": size, "sha256": sha256_file(p)}
    manifest = {**doc, "files": files}
    with open(tmp / MANIFEST, "w") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    (tmp / JOURNAL).unlink(missing_ok=True)
    return manifest


def read_manifest(root) -> dict | None:
    p = Path(root) / MANIFEST
    if not p.is_file():
        return None
    return load_json_object(p, CheckpointError)


def check_sizes(root, manifest: dict | None, rels) -> None:
    """Cheap check a reader makes: each of ``rels`` has the size the manifest records (truncated, grown)."""
    if not manifest or not isinstance(manifest.get("files"), dict):
        return
    for rel in rels:
        e = manifest["files"].get(rel)
        p = Path(root) / rel
        if e is not None and p.is_file() and p.stat().st_size != e.get("size"):
            raise CheckpointError(f"{p}: {p.stat().st_size} bytes, {MANIFEST} records {e.get('size')}; "
                                  f"the file is truncated or was changed after conversion")


def check_manifest(root) -> tuple[int, str | None]:
    """Check every file of ``root`` against its manifest: (files checked, first mismatch or None)."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    manifest = read_manifest(root)
    if manifest is None:
        raise CheckpointError(f"{root / MANIFEST}: missing; expected the manifest mm_convert writes into every output")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{root / MANIFEST}: no 'files' object")
    checked = 0
    for rel, e in sorted(files.items()):
        p = root / rel
        if not p.is_file():
            return checked, f"{p}: missing; {MANIFEST} lists it"
        size = p.stat().st_size
        if size != e.get("size"):
            return checked, f"{p}: {size} bytes, {MANIFEST} records {e.get('size')} (truncated or changed)"
        if sha256_file(p) != e.get("sha256"):
            return checked, f"{p}: sha256 differs from {MANIFEST} (corrupt or changed)"
        checked += 1
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST and rel not in files:
            return checked, f"{p}: not listed in {MANIFEST} (a stray file)"
    return checked, None
