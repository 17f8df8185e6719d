"""The one write path of every command: plan -> execute -> finalize.

A command plans an :class:`Output`: its files, the format's writer object, the source it is made from. ``write``
opens the atomic output directory (journaled for ``--resume``; under torchrun rank 0 owns it and every rank
writes its share), writes the files not yet written among worker processes, lets the writer and the command
add their small files (index, metadata, tracker, reference files), writes the manifest and renames the
directory into place.
"""
from __future__ import annotations

import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import __version__, integrity
from .checkpoint import Checkpoint
from .errors import CheckpointError, MMConvertError
from .execute import Ranks, Sources, run_files
from .layout import ParallelLayout
from .manifest import MANIFEST, OutputDir, check_manifest, files_description, finalize, plan_id, read_journal, read_manifest
from .output import atomic_output_dir
from .plan import OutputFile
from .progress import Progress


@dataclass
class Result:
    """What a command did (or, for ``plan``, would do)."""
    command: str
    output: str | None
    layout: str
    files: list[OutputFile]
    bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def tensors(self) -> int:
        return sum(1 for f in self.files for _ in f.tensors)


@dataclass
class Output:
    """What a command writes, planned."""
    command: str
    path: str | os.PathLike          # the output directory, as given
    option: str                      # its option, for messages
    source: Checkpoint               # what it is made from (recorded in the manifest; not to be overlapped)
    sources: Sources                 # how the source's bytes are read
    files: list[OutputFile]
    writer: object                   # the format's writer object: zip_records, write(fh, slots, produce), finish
    layout: ParallelLayout | None    # recorded in the manifest; None: no parallel layout (DCP, HF from DCP)
    description: str                 # the layout line of the summary
    form: dict                       # the manifest's fields on the output's form (iteration, save_format, reference)
    subdir: str = ""                 # where the files go inside the output (an MM checkpoint's iteration)
    extras: Callable[[Path], list[str]] = lambda root: []  # the command's small files; returns notes
    notes: list[str] = field(default_factory=list)

    def result(self) -> Result:
        return Result(self.command, str(self.path), self.description, self.files, notes=list(self.notes))

    def manifest_doc(self) -> dict:
        """What the manifest records besides the files; ``plan`` hashes it together with every planned tensor."""
        doc = {"tool": "mm_convert", "version": __version__, "command": self.command,
               "layout": self.layout.to_dict() if self.layout is not None else None,
               **self.source.provenance(), **self.form}
        doc["plan"] = plan_id({**doc, "files": files_description(self.files)})
        return doc

    def rel(self, f: OutputFile) -> str:
        """``f``'s path inside the output directory."""
        return f"{self.subdir}/{f.path}" if self.subdir else f.path


def write(output: Output, *, progress: bool, workers: int, overwrite: bool, resume: bool) -> Result:
    """Write ``output``; the command's wall time counts from the output directory's creation."""
    result = output.result()
    doc = output.manifest_doc()
    if resume and _complete(output.path, doc):
        result.notes.append(f"{result.output}: already complete for this plan (every file matches {MANIFEST}); "
                            f"nothing written")
        return result
    t0 = time.monotonic()
    ranks = Ranks()
    try:
        with _output_dir(output, ranks, overwrite, resume, doc["plan"]) as (out, done):
            todo, kept = _still_to_write(done, output, result)
            result.bytes = kept + _execute(todo, out / output.subdir, output, ranks, progress, workers)
            if ranks.rank == 0:  # the other ranks only write their share of the files
                output.writer.finish(out.path / output.subdir, output.files)
                result.notes += output.extras(out.path)
                finalize(out.path, doc, expect=[output.rel(f) for f in output.files])
    finally:
        ranks.close()
    result.seconds = time.monotonic() - t0
    return result


def _complete(target, doc: dict) -> bool:
    """``target`` already holds the output of this very plan, every file matching its manifest."""
    try:
        m = read_manifest(target) if Path(target).is_dir() else None
        return bool(m) and m.get("plan") == doc["plan"] and check_manifest(target)[1] is None
    except CheckpointError:
        return False


@contextmanager
def _output_dir(output: Output, ranks: Ranks, overwrite: bool, resume: bool, plan: str):
    """The atomic output directory and the files its journal holds (kept from an interrupted run). Under
    torchrun rank 0 owns it (checks, rename) and hands both, or its error, to the other ranks, which write their
    share of the files into it: read by one rank before any writes, the journal gives every rank the same files
    still to write."""
    def atomic():
        return atomic_output_dir(output.path, output.option, output.source.dirs, overwrite, resume=resume, plan_id=plan)

    if not ranks.active:
        with atomic() as out:
            yield out, read_journal(out.path)[1]
    elif ranks.rank == 0:
        with ExitStack() as stack:
            try:
                out = stack.enter_context(atomic())
            except BaseException as e:
                ranks.broadcast(("error", e))
                raise
            yield ranks.broadcast(("ok", (out, read_journal(out.path)[1])))[1]
    else:
        status, value = ranks.broadcast(None)
        if status == "error":
            raise value
        yield value


def _still_to_write(done: dict[str, dict], output: Output, result: Result) -> tuple[list[OutputFile], int]:
    """The files not in the journal's ``done`` (finished by an interrupted run, kept), and the bytes kept."""
    todo = [f for f in output.files if output.rel(f) not in done]
    if len(todo) < len(output.files):
        result.notes.append(f"resumed: kept {len(output.files) - len(todo)} finished files of the interrupted run, "
                            f"wrote {len(todo)}")
    return todo, sum(done[output.rel(f)]["size"] for f in output.files if output.rel(f) in done)


def _execute(files: list[OutputFile], out: OutputDir, output: Output, ranks: Ranks, progress: bool, workers: int) -> int:
    """Write ``files`` into ``out``: split among ``workers`` processes, and among torchrun ranks when there are
    several (each rank's outcome is gathered: one failed rank fails every rank). Returns the bytes written."""
    sources = output.sources
    sources.plan_reads(files)  # over every rank's files: which source bytes are read once
    mine = ranks.share(files)
    total, error = 0, None
    with Progress(sum(f.nbytes for f in mine), output.command, progress) as bar:
        try:
            total = run_files(mine, out, output.writer, sources, bar.advance, workers)
            if sources.log is not None:  # before anything is renamed into place
                integrity.check(sources.log)
        except BaseException as e:
            if not ranks.active:
                raise
            error = e
    if not ranks.active:
        return total
    ok, total = ranks.gather_outcome(error is None, total)
    if error is not None:
        raise error
    if ok < ranks.world:
        raise MMConvertError(f"{ranks.world - ok} of {ranks.world} torchrun ranks failed to write their files "
                             f"(see their messages); nothing was written to the output")
    return total
