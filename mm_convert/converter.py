"""Converters: the Python API. The CLI (cli.py) parses options and calls these methods, nothing more.

A converter class binds a model spec (mm_convert/models/<family>.py) to the generic engine. Commands:
``hf_to_mm``, ``mm_to_hf``, ``resplit``, ``verify`` and ``plan`` (a dry run of any of the first three).
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from . import __version__
from .errors import CheckpointError, ConfigError, LayoutError, MMConvertError, VerifyError
from .execute import Loc, Ranks, Sources, default_workers, matches, run_files, write_file
from .formats import dist
from .formats import hf as hf_format
from .formats import mm as mm_format
from .layout import ParallelLayout
from .models import qwen2_5_vl
from .manifest import (MANIFEST, check_manifest, check_sizes, files_description, finalize, plan_id, read_journal,
                       read_manifest, source_identity)
from .output import atomic_output_dir
from .plan import OutputFile, Ref, check_coverage, compose, hf_files_plan, hf_to_mm_plan, invert
from .progress import Progress

DEFAULT_MAX_SHARD_SIZE = "5GB"


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
class VerifyReport:
    checked: int = 0
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)      # expected in MM shards, not there
    unexpected: list[str] = field(default_factory=list)   # in MM shards, not expected
    unused_hf: list[str] = field(default_factory=list)    # HF tensors no MM tensor comes from
    manifest_checked: int | None = None                   # files checked against mm_convert_manifest.json
    manifest_error: str | None = None                     # the first file that does not match it

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.missing or self.unexpected or self.unused_hf or self.manifest_error)

    def summary(self) -> str:
        files = (f"{self.manifest_checked} files match {MANIFEST} (size and sha256)"
                 if self.manifest_checked is not None else "")
        if self.ok:
            if self.checked == 0 and files:
                return f"OK: {files}"
            return (f"OK: {self.checked} MM tensors equal their HF source, bit for bit; every HF tensor is covered"
                    + (f"; {files}" if files else ""))
        parts = [f"manifest mismatch: {self.manifest_error}"] if self.manifest_error else []
        for what, items in (("mismatched", self.mismatched), ("missing", self.missing),
                            ("unexpected", self.unexpected), ("HF tensors not covered", self.unused_hf)):
            if items:
                parts.append(f"{len(items)} {what} (first: {items[0]})")
        return f"FAILED after checking {self.checked} tensors: " + "; ".join(parts)


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    s = text.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            try:
                return int(float(s[: -len(u)]) * mult)
            except ValueError:
                break
    if s.isdigit():
        return int(s)
    raise ConfigError(f"--cfg.max_shard_size {text!r}: expected a size such as 5GB, 500MB or 2GiB")


class Converter:
    """Generic over a model spec module (see models/qwen2_5_vl.py for what a spec provides)."""
    spec: ModuleType

    def __init__(self, progress: bool = True, workers: int | None = None):
        """``workers``: processes that write output files in parallel (default: this machine's cores; under
        torchrun, per rank: the cores divided by the ranks on the node)."""
        self.progress = progress
        self.workers = workers

    # ---- inputs ------------------------------------------------------------------------------------------
    def _dims(self, cfg: dict, source: str):
        dims = self.spec.dims_from_config(cfg, source)
        self.spec.check_config(dims, source)
        return dims

    def _open_hf(self, hf_dir, option="--cfg.hf_config.hf_dir"):
        cfg = hf_format.load_config(hf_dir, option)
        dims = self._dims(cfg, str(Path(hf_dir) / "config.json"))
        reader = hf_format.HFReader(hf_dir)
        expected = self.spec.hf_shapes(dims)
        names = set(reader.names())
        root = Path(hf_dir)
        missing = [n for n in expected if n not in names]
        if missing:
            raise CheckpointError(f"{root}: tensor {hf_format.from_legacy(missing[0], reader.scheme)} is missing"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                  + f"; expected by config.json ({dims.layers} layers, vision depth {dims.vit_layers}"
                                  + (", tied embeddings" if dims.tied else "") + ")")
        extra = sorted(names - set(expected))
        if extra:
            n0 = extra[0]
            raise CheckpointError(f"{root / reader.file_of(n0)}: unexpected tensor {hf_format.from_legacy(n0, reader.scheme)}"
                                  + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                                  + "; it is not part of a Qwen2.5-VL model with this config.json")
        dtypes = {}
        for n, shape in expected.items():
            dt, got = reader.meta(n)
            if tuple(got) != tuple(shape):
                raise CheckpointError(f"{root / reader.file_of(n)}: {hf_format.from_legacy(n, reader.scheme)} has shape "
                                      f"{list(got)}, config.json expects {list(shape)}")
            dtypes[n] = dt
        check_one_dtype(((root / reader.file_of(n), hf_format.from_legacy(n, reader.scheme), dt) for n, dt in dtypes.items()))
        return cfg, dims, reader, expected, dtypes

    def _layout(self, dims, tp_size, llm_pp_layers, vit_pp_layers, vit_tp_size, prefix) -> ParallelLayout:
        layout = ParallelLayout.create(tp_size, llm_pp_layers, vit_pp_layers, vit_tp_size,
                                       llm_layers=dims.layers, vit_layers=dims.vit_layers, prefix=prefix)
        layout.check_layer_counts(dims.vit_layers, dims.layers, prefix)
        layout.check_divisible(self.spec.tp_divisible(dims), prefix)
        return layout

    def _mm_plan(self, dims, layout, shapes, dtypes) -> list[OutputFile]:
        files = hf_to_mm_plan(self.spec.rules(dims, layout.pp_size), layout, shapes, dtypes)
        check_coverage(files)
        return files

    def _global_layout(self, dims, option) -> ParallelLayout:
        """tp 1, pp 1: how a checkpoint of global tensors (torch_dist) is read and written."""
        return self._layout(dims, 1, [[dims.layers]], [[dims.vit_layers]], 0, option)

    def _shard_layout(self, reader, dims, tp_size, llm_pp_layers, vit_pp_layers, vit_tp_size, option, prefix):
        """The layout read off the shards, checked against the config; values the user gave must match it.
        A torch_dist source has no layout of its own: it reads as tp 1, pp 1."""
        if reader.layout_free:
            return self._global_layout(dims, option)
        found = reader.infer_layout(dims.vit_hidden)

        def lists(given, have):
            return given if given is not None else [list(c) for c in have]

        if tp_size is not None or llm_pp_layers is not None or vit_pp_layers is not None:
            given = self._layout(dims, tp_size if tp_size is not None else found.tp_size,
                                 lists(llm_pp_layers, found.llm_pp_layers), lists(vit_pp_layers, found.vit_pp_layers),
                                 vit_tp_size if vit_tp_size is not None else found.vit_tp_size, prefix)
            if (given.tp_size, given.llm_pp_layers, given.vit_pp_layers, given.effective_vit_tp) != \
                    (found.tp_size, found.llm_pp_layers, found.vit_pp_layers, found.effective_vit_tp):
                raise LayoutError(f"{prefix}: {given.describe()} does not match the shards in {reader.iter_dir}, "
                                  f"which hold {found.describe()}")
        return self._layout(dims, found.tp_size, lists(None, found.llm_pp_layers), lists(None, found.vit_pp_layers),
                            found.vit_tp_size, option)

    def _open_mm(self, mm_dir, hf_dir, option, tp_size, llm_pp_layers, vit_pp_layers, vit_tp_size, prefix):
        """Reader, config, dims, layout and checked source plan of an MM checkpoint."""
        reader = mm_format.open_reader(mm_dir, option)
        manifest = read_manifest(mm_dir)
        check_sizes(mm_dir, manifest, [os.path.relpath(reader.iter_dir / r, mm_dir) for r in reader.files()])
        if hf_dir is not None:
            cfg = hf_format.load_config(hf_dir)
            source = str(Path(hf_dir) / "config.json")
        elif manifest and isinstance(manifest.get("hf_config"), dict):
            cfg, source = manifest["hf_config"], str(Path(mm_dir) / MANIFEST)
        else:
            raise ConfigError(f"{option} {mm_dir}: no {MANIFEST} with the model config; pass --cfg.hf_config.hf_dir "
                              f"(the original HF directory, for its config.json)")
        dims = self._dims(cfg, source)
        layout = self._shard_layout(reader, dims, tp_size, llm_pp_layers, vit_pp_layers, vit_tp_size,
                                    f"{option} {mm_dir}", prefix)
        shapes = self.spec.hf_shapes(dims)
        plan = self._mm_plan(dims, layout, shapes, {n: None for n in shapes})
        check_shards_match(reader, plan)
        check_one_dtype((reader.iter_dir / f.path, f"{slot}.{k}", t.dtype)
                        for f in plan for slot, sd in reader.slots(f.path).items() for k, t in sd.items())
        scheme = (manifest or {}).get("hf_key_scheme", "legacy")
        return reader, cfg, dims, layout, shapes, plan, scheme

    # ---- commands ----------------------------------------------------------------------------------------
    def hf_to_mm(self, hf_dir, mm_dir, tp_size: int = 1, llm_pp_layers=None, vit_pp_layers=None, vit_tp_size: int = 0,
                 *, save_format: str = "torch", overwrite: bool = False, dry_run: bool = False,
                 resume: bool = False) -> Result:
        """Convert an HF checkpoint directory into an MM checkpoint (``release``) with the given layout.
        ``save_format``: "torch" (mp_rank_* shards) or "torch_dist" (Megatron's distributed format: global
        tensors, any TP / PP at load time; the layout given is checked, not used).
        ``resume``: keep the finished files of an interrupted run of the same plan (see manifest.py)."""
        cfg, dims, reader, shapes, dtypes = self._open_hf(hf_dir)
        layout = self._layout(dims, tp_size, llm_pp_layers, vit_pp_layers, vit_tp_size, "--cfg.parallel_config")
        if _save_format(save_format) == "torch_dist":
            layout = self._global_layout(dims, "--cfg.parallel_config")
            files = dist_files(self._mm_plan(dims, layout, shapes, dtypes))
            result = Result("hf_to_mm", str(mm_dir), "torch_dist (global tensors)", files)
        else:
            files = self._mm_plan(dims, layout, shapes, dtypes)
            result = Result("hf_to_mm", str(mm_dir), layout.describe(), files)
        if dry_run:
            return result
        manifest = {"hf_config": cfg, "hf_key_scheme": reader.scheme, "source": str(Path(hf_dir).absolute()),
                    "source_identity": source_identity(hf_dir, ["config.json", hf_format.INDEX] + reader.weight_files())}
        return self._write_mm(result, mm_dir, layout, Sources(hf=reader), [hf_dir], overwrite, manifest, resume,
                              save_format=save_format)

    def mm_to_hf(self, mm_dir, save_hf_dir, hf_dir=None, tp_size=None, llm_pp_layers=None, vit_pp_layers=None,
                 vit_tp_size=None, *, max_shard_size=DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
                 dry_run: bool = False, resume: bool = False) -> Result:
        """Convert an MM checkpoint back to HF safetensors. The layout is read off the shards (given values
        are checked against them). ``hf_dir``: the original HF directory, for config, tokenizer and processor files."""
        reader, cfg, dims, layout, shapes, plan, scheme = self._open_mm(
            mm_dir, hf_dir, "--cfg.mm_dir", tp_size, llm_pp_layers, vit_pp_layers, vit_tp_size, "--cfg.parallel_config")
        if hf_dir is not None:
            try:
                scheme = hf_format.HFReader(hf_dir).scheme
            except CheckpointError:
                pass  # a reference dir without weights: keep the scheme recorded at conversion
        inv = invert(plan, shapes)
        files = hf_files_plan(inv, shapes, lambda ref: reader.meta(ref)[0],
                              lambda n: hf_format.from_legacy(n, scheme), parse_size(max_shard_size))
        check_coverage(files)
        result = Result("mm_to_hf", str(save_hf_dir), layout.describe(), files)
        if dry_run:
            return result
        sources = Sources(mm=reader)
        doc = self._manifest_doc(result, layout, {
            "hf_config": cfg, "hf_key_scheme": scheme, "source": str(Path(mm_dir).absolute()),
            "source_identity": _mm_identity(mm_dir, reader),
            "reference": source_identity(hf_dir, hf_format.NON_WEIGHT_FILES) if hf_dir is not None else None})
        if resume and _complete(save_hf_dir, doc):
            return self._already(result)
        with self._output(save_hf_dir, "--cfg.save_hf_dir", [mm_dir] + ([hf_dir] if hf_dir else []), overwrite,
                          resume=resume, plan_id=doc["plan"]) as out:
            todo, kept = self._todo(out, "", files, result)
            result.bytes = self._execute(todo, out, hf_format.SafetensorsWriter(), sources, "mm_to_hf") + kept
            if len(files) > 1:
                hf_format.write_index(out / hf_format.INDEX, {t.key: f.path for f in files for t in f.tensors},
                                      sum(f.nbytes for f in files))
            copied = copy_non_weight_files(hf_dir, out) if hf_dir is not None else []
            if "config.json" not in copied:
                (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            result.notes.append("copied from reference: " + (", ".join(copied) if copied else "none (config.json from manifest)"))
            finalize(out, doc, expect=[f.path for f in files])
        result.seconds = time.monotonic() - self._t0
        return result

    def resplit(self, source_dir, target_dir, tp_size: int = 1, llm_pp_layers=None, vit_pp_layers=None,
                vit_tp_size: int = 0, *, source_tp_size=None, source_llm_pp_layers=None, source_vit_pp_layers=None,
                source_vit_tp_size=None, hf_dir=None, overwrite: bool = False, dry_run: bool = False,
                resume: bool = False) -> Result:
        """Reshard an MM checkpoint to another TP / PP / VPP layout directly (no HF files in between)."""
        reader, cfg, dims, src_layout, shapes, src_plan, scheme = self._open_mm(
            source_dir, hf_dir, "--cfg.source_dir", source_tp_size, source_llm_pp_layers, source_vit_pp_layers,
            source_vit_tp_size, "--cfg.source_parallel_config")
        layout = self._layout(dims, tp_size, llm_pp_layers, vit_pp_layers, vit_tp_size, "--cfg.target_parallel_config")
        inv = invert(src_plan, shapes)
        dtypes = {n: reader.meta(inv[n][0].src)[0] for n in shapes}
        files = compose(self._mm_plan(dims, layout, shapes, dtypes), inv)
        check_coverage(files)
        result = Result("resplit", str(target_dir), f"{src_layout.describe()} -> {layout.describe()}", files)
        if dry_run:
            return result
        manifest = {"hf_config": cfg, "hf_key_scheme": scheme, "source": str(Path(source_dir).absolute()),
                    "source_identity": _mm_identity(source_dir, reader)}
        saved = _with_layout(reader.training_state(), layout)
        if saved:
            result.notes.append("kept from the training save: " + ", ".join(
                f"iteration {saved['iteration']}" if k == "iteration" else k for k in saved))
        return self._write_mm(result, target_dir, layout, Sources(mm=reader), [source_dir] + ([hf_dir] if hf_dir else []),
                              overwrite, manifest, resume, saved)

    def verify(self, hf_dir, mm_dir, tp_size=None, llm_pp_layers=None, vit_pp_layers=None, vit_tp_size=None) -> VerifyReport:
        """Compare every tensor of an MM checkpoint with what its HF checkpoint says it must be, bit for bit.
        Any directory written by mm_convert is first checked against its manifest (every file's size and sha256);
        with ``hf_dir`` None that is the whole check (any output: MM or HF)."""
        report = VerifyReport()
        if hf_dir is None or read_manifest(mm_dir) is not None:
            report.manifest_checked, report.manifest_error = check_manifest(mm_dir)
            if hf_dir is None:
                return report
        try:
            return self._verify_tensors(report, hf_dir, mm_dir, tp_size, llm_pp_layers, vit_pp_layers, vit_tp_size)
        except CheckpointError:
            if report.manifest_error:
                return report  # the file the manifest check named is unreadable as well
            raise

    def _verify_tensors(self, report, hf_dir, mm_dir, tp_size, llm_pp_layers, vit_pp_layers, vit_tp_size) -> VerifyReport:
        cfg, dims, hf_reader, shapes, dtypes = self._open_hf(hf_dir)
        reader = mm_format.open_reader(mm_dir)
        layout = self._shard_layout(reader, dims, tp_size, llm_pp_layers, vit_pp_layers, vit_tp_size,
                                    "--cfg.mm_dir", "--cfg.parallel_config")
        plan = self._mm_plan(dims, layout, shapes, dtypes)
        used = set()
        hf_sources = Sources(hf=hf_reader)
        bar = Progress(sum(f.nbytes for f in plan), "verify", self.progress)
        with bar:
            for f in plan:
                slots = reader.slots(f.path)
                for slot, tensors in f.slots.items():
                    have = slots.get(slot, {})
                    want_keys = {t.key for t in tensors}
                    report.unexpected += [f"{f.path}:{slot}.{k}" for k in have if k not in want_keys]
                    for t in tensors:
                        used.update(p.src.key for p in t.pieces)
                        if t.key not in have:
                            report.missing.append(f"{f.path}:{slot}.{t.key}")
                            continue
                        report.checked += 1
                        ref = Ref(f.path, slot, t.key)
                        where = reader.locate(ref)  # streamed, block by block
                        actual = reader.read(ref) if where is None and have[t.key].is_meta else have[t.key]
                        if not matches(t, hf_sources, actual, Loc(*where) if where else None):
                            report.mismatched.append(f"{f.path}:{slot}.{t.key}")
                        bar.advance(t.nbytes)
                for slot in slots:
                    if slot not in f.slots:
                        report.unexpected.append(f"{f.path}:{slot}")
        report.unused_hf = [n for n in shapes if n not in used]
        return report

    # ---- execution ---------------------------------------------------------------------------------------
    def _write_mm(self, result: Result, mm_dir, layout: ParallelLayout, sources: Sources, src_dirs, overwrite, manifest,
                  resume: bool = False, saved: dict | None = None, save_format: str = "torch"):
        """``saved``: a training save's ``iteration`` (the output goes to iter_NNNNNNN) and ``args``, kept in
        every shard; without them the output is a ``release`` checkpoint."""
        option = "--cfg.target_dir" if result.command == "resplit" else "--cfg.mm_dir"
        saved = saved or {}
        iteration = saved.get("iteration", "release")
        doc = self._manifest_doc(result, layout, {**manifest, "iteration": iteration, "save_format": save_format})
        if resume and _complete(mm_dir, doc):
            return self._already(result)
        with self._output(mm_dir, option, src_dirs, overwrite, resume=resume, plan_id=doc["plan"]) as out:
            sub = mm_format.iteration_dir_name(iteration)
            todo, kept = self._todo(out, sub + "/", result.files, result)
            writer = dist.DistWriter() if save_format == "torch_dist" else mm_format.ShardWriter(saved)
            result.bytes = self._execute(todo, out / sub, writer, sources, result.command) + kept
            if save_format == "torch_dist":
                dist.write_side_files(out / sub, [(f.path, [(t.key, t.dtype, t.shape) for t in f.slots["model"]])
                                                  for f in result.files], {"checkpoint_version": 3.0, **saved})
            mm_format.write_tracker(out, iteration)
            finalize(out, doc, expect=[sub + "/" + f.path for f in result.files])
        result.seconds = time.monotonic() - self._t0
        return result

    @staticmethod
    def _manifest_doc(result: Result, layout: ParallelLayout, extra: dict) -> dict:
        """What the manifest records besides the files; ``plan`` hashes it together with every planned tensor."""
        doc = {"tool": "mm_convert", "version": __version__, "command": result.command, "layout": layout.to_dict(), **extra}
        doc["plan"] = plan_id({**doc, "files": files_description(result.files)})
        return doc

    def _todo(self, out: Path, prefix: str, files: list[OutputFile], result: Result) -> tuple[list[OutputFile], int]:
        """Files still to write after a resumed start (kept ones are journaled), and the bytes kept."""
        done = read_journal(out)[1]
        todo = [f for f in files if prefix + f.path not in done]
        if len(todo) < len(files):
            result.notes.append(f"resumed: kept {len(files) - len(todo)} finished files of the interrupted run, "
                                f"wrote {len(todo)}")
        return todo, sum(done[prefix + f.path]["size"] for f in files if prefix + f.path in done)

    def _already(self, result: Result) -> Result:
        result.bytes = 0
        result.notes.append(f"{result.output}: already complete for this plan (every file matches {MANIFEST}); nothing written")
        return result

    @contextmanager
    def _output(self, target, option, sources, overwrite, *, resume: bool = False, plan_id: str | None = None):
        """Atomic output directory; the command's wall time counts from here."""
        self._t0 = time.monotonic()
        ranks = self._ranks = Ranks()
        if not ranks.active:
            with atomic_output_dir(target, option, sources, overwrite, resume=resume, plan_id=plan_id) as out:
                yield out
            return
        # torchrun: rank 0 owns the atomic directory (checks, rename); the others write their share into it
        # and leave once every rank has reported (see _execute), skipping the rest of the command's body.
        try:
            if ranks.rank == 0:
                with ExitStack() as stack:
                    try:
                        out = stack.enter_context(atomic_output_dir(target, option, sources, overwrite, resume=resume,
                                                                    plan_id=plan_id))
                    except BaseException as e:
                        ranks.broadcast(("error", e))
                        raise
                    ranks.broadcast(("ok", str(out)))
                    yield out
            else:
                status, value = ranks.broadcast(None)
                if status == "error":
                    raise value
                try:
                    yield Path(value)
                except _RankDone:
                    pass
        finally:
            ranks.close()

    def _execute(self, files: list[OutputFile], root: Path, writer, sources: Sources, what: str) -> int:
        """Write ``files``: split among ``workers`` processes, and among torchrun ranks when there are several."""
        ranks = getattr(self, "_ranks", None) or Ranks()
        sources.plan_reads(files)  # over every rank's files: which source bytes are read once
        mine = ranks.share(files)
        total, error = 0, None
        with Progress(sum(f.nbytes for f in mine), what, self.progress) as bar:
            try:
                total = run_files(mine, root, writer, sources, bar.advance, self.workers or default_workers())
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
        if ranks.rank != 0:
            raise _RankDone()
        return total


class _RankDone(Exception):
    """A torchrun rank other than 0 has written its files; rank 0 finishes the output."""


def check_shards_match(reader, plan: list[OutputFile]) -> None:
    """Each shard holds exactly the tensors (names and shapes) that the layout puts there."""
    for f in plan:
        slots = reader.slots(f.path)
        path = reader.iter_dir if reader.layout_free else reader.iter_dir / f.path
        for slot, tensors in f.slots.items():
            if slot not in slots:
                raise CheckpointError(f"{path}: no '{slot}' state dict; the layout expects one")
            have = slots[slot]
            for t in tensors:
                if t.key not in have:
                    raise CheckpointError(f"{path}: tensor {slot}.{t.key} is missing; the layout puts it in this shard")
                if tuple(have[t.key].shape) != tuple(t.shape):
                    raise CheckpointError(f"{path}: {slot}.{t.key} has shape {list(have[t.key].shape)}, expected "
                                          f"{list(t.shape)} for this layout and config")
            extra = [k for k in have if k not in {t.key for t in tensors}]
            if extra:
                raise CheckpointError(f"{path}: unexpected tensor {slot}.{extra[0]}"
                                      + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                                      + "; not part of this layout")
        for slot in slots:
            if slot not in f.slots:
                raise CheckpointError(f"{path}: unexpected model chunk '{slot}' for this layout")


def check_one_dtype(items) -> None:
    """All tensors of a checkpoint share one dtype: (file, key, dtype) items; names the first odd one."""
    items = list(items)
    counts = Counter(dt for _, _, dt in items)
    if len(counts) > 1:
        main = counts.most_common(1)[0][0]
        path, key, dt = next(i for i in items if i[2] != main)
        raise CheckpointError(f"{path}: {key} is {str(dt).replace('torch.', '')}, the other tensors are "
                              f"{str(main).replace('torch.', '')}; expected one dtype throughout (mixed dtypes are not supported)")


def copy_non_weight_files(hf_dir, out: Path) -> list[str]:
    copied = []
    for name in hf_format.NON_WEIGHT_FILES:
        src = Path(hf_dir) / name
        if src.is_file():
            shutil.copyfile(src, out / name)
            copied.append(name)
    return copied


def _mm_identity(mm_dir, reader) -> dict:
    rels = [os.path.relpath(reader.iter_dir / r, mm_dir) for r in reader.files()]
    return source_identity(mm_dir, rels + [mm_format.TRACKER, MANIFEST])


SAVE_FORMATS = ("torch", "torch_dist")
DIST_FILE_BYTES = 5 * 10**9  # records per .distcp file, at most (one file per writer process)


def _save_format(value: str) -> str:
    if value not in SAVE_FORMATS:
        raise ConfigError(f"--cfg.save_format {value!r}: expected one of {', '.join(SAVE_FORMATS)}")
    return value


def dist_files(plan: list[OutputFile]) -> list[OutputFile]:
    """A tp 1, pp 1 plan (one shard) as torch_dist record files ``__K_0.distcp`` of at most DIST_FILE_BYTES
    each (a file per writer; the cut depends on the model only, so the output does not depend on the workers)."""
    (shard,) = plan
    files, current, size = [], [], 0
    for t in shard.slots["model"]:
        if current and size + t.nbytes > DIST_FILE_BYTES:
            files.append(current)
            current, size = [], 0
        current.append(t)
        size += t.nbytes
    files.append(current)
    return [OutputFile(f"__{k}_0.distcp", {"model": ts}) for k, ts in enumerate(files)]


def _with_layout(saved: dict, layout: ParallelLayout) -> dict:
    """A training save's state for an output in ``layout``: the parallel sizes in its args changed to match."""
    args = saved.get("args")
    if args is not None:
        sizes = {"tensor_model_parallel_size": layout.tp_size, "pipeline_model_parallel_size": layout.pp_size,
                 "virtual_pipeline_model_parallel_size": layout.vpp_size if layout.vpp_size > 1 else None}
        for name, value in sizes.items():
            if hasattr(args, name):
                setattr(args, name, value)
    return saved


def _complete(target, doc: dict) -> bool:
    """``target`` already holds the output of this very plan, every file matching its manifest."""
    try:
        m = read_manifest(target) if Path(target).is_dir() else None
        return bool(m) and m.get("plan") == doc["plan"] and check_manifest(target)[1] is None
    except CheckpointError:
        return False


class Qwen2_5_VLConverter(Converter):
    """Qwen2.5-VL (3B / 7B / 32B / 72B and any size with the same architecture)."""
    spec = qwen2_5_vl


CONVERTERS = {"Qwen2_5_VLConverter": Qwen2_5_VLConverter}
