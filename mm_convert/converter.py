"""Converters: the Python API. The CLI (cli.py) parses options and calls these methods, nothing more.

A converter class binds a model spec (mm_convert/models/<family>.py) to the generic engine. Commands:
``hf_to_mm``, ``mm_to_hf``, ``resplit``, ``verify`` and ``plan`` (a dry run of any of the first three); for a
family whose spec declares MindSpeed-MM's FSDP2 checkpoint (``DCP_KEY_SCHEME``), ``hf_to_dcp`` and ``dcp_to_hf``.
Each writing command opens its source (checkpoint.py), plans the output's files and hands them to the one write
path (write.py).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType

from .checkpoint import BoundModel  # noqa: F401  (part of this module's API, as before)
from .checkpoint import (Checkpoint, bind, checked_layout, dcp_tensors, global_layout, open_dcp, open_hf,
                         open_mm, open_reader, shard_layout, source_config, with_reference)
from .errors import CheckpointError, ConfigError
from .execute import Loc, Sources, default_workers, matches
from .formats import dcp as dcp_format
from .formats import dist
from .formats import hf as hf_format
from .formats import mm as mm_format
from .integrity import ReadLog
from .layout import LayoutOptions, ParallelLayout
from .manifest import MANIFEST, check_manifest, read_manifest, source_identity
from .models import FAMILIES
from .plan import OutputFile, Ref, check_coverage, compose, cut_files, hf_files_plan
from .progress import Progress
from .write import Output, Result, write

DEFAULT_MAX_SHARD_SIZE = "5GB"
SAVE_FORMATS = ("torch", "torch_dist")
PARALLEL = "--cfg.parallel_config"


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
    """Generic over a model spec module (see models/qwen2_5_vl.py for what a spec provides).

    A layout is one value, ``layout=ParallelLayout.create(tp_size=2, llm_pp_layers=[[12, 16]], ...)`` (or
    ``LayoutOptions`` where some values are left to the checkpoint or the defaults); its values may also be given
    one by one as keywords, ``tp_size=``, ``vit_tp_size=``, ``llm_pp_layers=``, ``vit_pp_layers=``, ``ep_size=``
    (``source_`` + these for ``resplit``'s source)."""
    spec: ModuleType

    def __init__(self, progress: bool = True, workers: int | None = None):
        """``workers``: processes that write output files in parallel (default: this machine's cores; under
        torchrun, per rank: the cores divided by the ranks on the node)."""
        self.progress = progress
        self.workers = workers

    def layout_of(self, mm_dir, hf_dir=None, option: str = "--cfg.mm_dir") -> ParallelLayout:
        """The layout of an MM checkpoint, read off its shards and checked against the config (from ``hf_dir``
        or the checkpoint's manifest): what the runtime loads by. The shards' contents are the loader's to check."""
        reader = open_reader(mm_dir, option)
        cfg, source = source_config(hf_dir, mm_dir, read_manifest(mm_dir) if hf_dir is None else None,
                                    f"{option} {mm_dir}: no {MANIFEST} with the model config; give the HF directory")
        return shard_layout(reader, bind(self.spec, cfg, source), LayoutOptions(), f"{option} {mm_dir}", PARALLEL)

    # ---- commands ----------------------------------------------------------------------------------------
    def hf_to_mm(self, hf_dir, mm_dir, layout: ParallelLayout | LayoutOptions | None = None, *,
                 save_format: str = "torch", overwrite: bool = False, dry_run: bool = False, resume: bool = False,
                 **layout_values) -> Result:
        """Convert an HF checkpoint directory into an MM checkpoint (``release``) with the given layout (tp 1,
        every layer on one stage where not given).
        ``save_format``: "torch" (mp_rank_* shards) or "torch_dist" (Megatron's distributed format: global
        tensors, any TP / PP at load time; the layout given is checked, not used).
        ``ep_size``: expert parallelism (MoE models): shards ``mp_rank_TT[_PPP]_EEE``, experts split evenly.
        ``make_vocab_size_divisible_by`` N: Megatron's vocabulary padding: the embedding and output layer get zero
        rows up to a multiple of N x tp_size (read off the shards by the other commands, cut off by mm_to_hf).
        ``resume``: keep the finished files of an interrupted run of the same plan (see manifest.py)."""
        want = _layout_options(layout, layout_values, "hf_to_mm")
        src = open_hf(self.spec, hf_dir)
        target = checked_layout(src.model, want, PARALLEL)
        if _save_format(save_format) == "torch_dist":
            target = global_layout(src.model, PARALLEL, target.padded_vocab_size)  # padded for the TP given
            out = mm_output("hf_to_mm", mm_dir, "--cfg.mm_dir", src, Sources(hf=src.reader),
                            dist_files(src.model.plan(target, src.dtypes)), target, "torch_dist (global tensors)",
                            dist.DistWriter({"checkpoint_version": mm_format.CHECKPOINT_VERSION}), save_format)
        else:
            out = mm_output("hf_to_mm", mm_dir, "--cfg.mm_dir", src, Sources(hf=src.reader),
                            src.model.plan(target, src.dtypes), target, target.describe(), mm_format.ShardWriter())
        return self._write(out, dry_run, overwrite, resume)

    def mm_to_hf(self, mm_dir, save_hf_dir, hf_dir=None, layout: ParallelLayout | LayoutOptions | None = None, *,
                 max_shard_size=DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False, dry_run: bool = False,
                 resume: bool = False, verify_source: bool = True, **layout_values) -> Result:
        """Convert an MM checkpoint back to HF safetensors. The layout is read off the shards (given values
        are checked against them). ``hf_dir``: the original HF directory, for config, tokenizer and processor
        files; its weights, where present, decide the key scheme and expert layout written."""
        want = _layout_options(layout, layout_values, "mm_to_hf")
        src = with_reference(open_mm(self.spec, mm_dir, hf_dir, want, "--cfg.mm_dir", PARALLEL), hf_dir)
        out = hf_output("mm_to_hf", save_hf_dir, src, mm_sources(src.reader, verify_source),
                        self._hf_files(src, max_shard_size), src.layout, src.layout.describe())
        return self._write(out, dry_run, overwrite, resume)

    def resplit(self, source_dir, target_dir, layout: ParallelLayout | LayoutOptions | None = None, *,
                source_layout: ParallelLayout | LayoutOptions | None = None, hf_dir=None, overwrite: bool = False,
                dry_run: bool = False, resume: bool = False, verify_source: bool = True, **layout_values) -> Result:
        """Reshard an MM checkpoint to another TP / PP / VPP / EP layout directly (no HF files in between).
        ``source_layout``: values the source's shards must match (its layout is read off them)."""
        given = LayoutOptions.of(source_layout, layout_values, "source_")
        want = _layout_options(layout, layout_values, "resplit")
        src = open_mm(self.spec, source_dir, hf_dir, given, "--cfg.source_dir", "--cfg.source_parallel_config")
        target = checked_layout(src.model, want, "--cfg.target_parallel_config")
        inv = src.inverse()
        dtypes = {n: src.reader.meta(inv[n][0].src)[0] for n in src.model.shapes}
        files = compose(src.model.plan(target, dtypes), inv)
        check_coverage(files)
        saved = _with_layout(src.reader.training_state(), target)
        notes = ["kept from the training save: " + ", ".join(
            f"iteration {saved['iteration']}" if k == "iteration" else k for k in saved)] if saved else []
        out = mm_output("resplit", target_dir, "--cfg.target_dir", src, mm_sources(src.reader, verify_source), files,
                        target, f"{src.layout.describe()} -> {target.describe()}", mm_format.ShardWriter(saved),
                        iteration=saved.get("iteration", "release"), notes=notes)
        return self._write(out, dry_run, overwrite, resume)

    # ---- MindSpeed-MM's FSDP2 path: torch.distributed.checkpoint directories ---------------------------------
    def hf_to_dcp(self, hf_dir, dcp_dir, *, overwrite: bool = False, resume: bool = False,
                  dry_run: bool = False) -> Result:
        """Convert an HF checkpoint into MindSpeed-MM's FSDP2 checkpoint: a torch.distributed.checkpoint directory
        ``dcp_dir/release`` (``.metadata``, ``__K_0.distcp``) of ``{"model": {DCP_PREFIX + hub key: tensor},
        "checkpoint_version": 3.0}``, fused expert tensors viewed 2-D (the spec's ``dcp_experts``), and
        ``dcp_dir/latest_checkpointed_iteration.txt``."""
        self._dcp_spec("hf_to_dcp")
        src = open_hf(self.spec, hf_dir)
        files = cut_files(dcp_tensors(src.model, src.dtypes), dcp_format.STATE_KEY, dcp_format.FILE_BYTES,
                          dist.record_file_name, dcp_format.first_file_info())
        check_coverage(files)
        out = mm_output("hf_to_dcp", dcp_dir, "--cfg.dcp_dir", src, Sources(hf=src.reader), files, None,
                        "DCP (FSDP2: global tensors)", dcp_format.DCPWriter(files), "dcp")
        return self._write(out, dry_run, overwrite, resume)

    def dcp_to_hf(self, dcp_dir, save_hf_dir, hf_dir=None, *, max_shard_size=DEFAULT_MAX_SHARD_SIZE,
                  overwrite: bool = False, resume: bool = False, dry_run: bool = False) -> Result:
        """Convert MindSpeed-MM's FSDP2 checkpoint (``dcp_dir``: the directory with the tracker, or the iteration
        directory holding ``.metadata``) back to HF safetensors: experts back to 3-D, the prefix stripped, sharded
        with an index. ``hf_dir``: the original HF directory, for config, tokenizer and processor files; its
        weights, where present, decide the key scheme and expert layout written (else the hub's)."""
        self._dcp_spec("dcp_to_hf")
        src = open_dcp(self.spec, dcp_dir, hf_dir)
        out = hf_output("dcp_to_hf", save_hf_dir, src, Sources(mm=src.reader), self._hf_files(src, max_shard_size),
                        None, "DCP (FSDP2: global tensors) -> HF")
        return self._write(out, dry_run, overwrite, resume)

    def _dcp_spec(self, command: str):
        """The spec, if it declares a DCP checkpoint layout (``DCP_KEY_SCHEME``, ``DCP_PREFIX``); else a one-line refusal."""
        if not getattr(self.spec, "DCP_KEY_SCHEME", None):
            have = [getattr(f, "DCP_CONVERTER", None) or f.CONVERTER for f in FAMILIES if getattr(f, "DCP_KEY_SCHEME", None)]
            raise ConfigError(f"{type(self).__name__} {command}: {self.spec.NAME} has no FSDP2 / DCP checkpoint layout "
                              f"(hf_to_dcp and dcp_to_hf are for {', '.join(have) or 'no family'})")
        return self.spec

    def _hf_files(self, src: Checkpoint, max_shard_size) -> list[OutputFile]:
        """The safetensors files an HF output of ``src`` holds, in the source's key scheme."""
        files = hf_files_plan(src.inverse(), src.model.shapes, lambda ref: src.reader.meta(ref)[0],
                              lambda n: hf_format.from_legacy(n, src.key_scheme, self.spec.KEY_SCHEMES),
                              parse_size(max_shard_size))
        check_coverage(files)
        return files

    def _write(self, out: Output, dry_run: bool, overwrite: bool, resume: bool) -> Result:
        if dry_run:
            return out.result()
        return write(out, progress=self.progress, workers=self.workers or default_workers(), overwrite=overwrite,
                     resume=resume)

    # ---- verify ------------------------------------------------------------------------------------------
    def verify(self, hf_dir, mm_dir, layout: ParallelLayout | LayoutOptions | None = None,
               **layout_values) -> VerifyReport:
        """Compare every tensor of an MM checkpoint with what its HF checkpoint says it must be, bit for bit.
        Any directory written by mm_convert is first checked against its manifest (every file's size and sha256);
        with ``hf_dir`` None that is the whole check (any output: MM or HF)."""
        want = _layout_options(layout, layout_values, "verify")
        report = VerifyReport()
        if hf_dir is None or read_manifest(mm_dir) is not None:
            report.manifest_checked, report.manifest_error = check_manifest(mm_dir)
            if hf_dir is None:
                return report
        try:
            return self._verify_tensors(report, hf_dir, mm_dir, want)
        except CheckpointError:
            if report.manifest_error:
                return report  # the file the manifest check named is unreadable as well
            raise

    def _verify_tensors(self, report: VerifyReport, hf_dir, mm_dir, want: LayoutOptions) -> VerifyReport:
        src = open_hf(self.spec, hf_dir)
        reader = open_reader(mm_dir)
        plan = src.model.plan(shard_layout(reader, src.model, want, "--cfg.mm_dir", PARALLEL), src.dtypes)
        used = set()
        hf_sources = Sources(hf=src.reader)
        with Progress(sum(f.nbytes for f in plan), "verify", self.progress) as bar:
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
                report.unexpected += [f"{f.path}:{slot}" for slot in slots if slot not in f.slots]
        report.unused_hf = [n for n in src.model.shapes if n not in used]
        return report


def _layout_options(layout, values: dict, method: str) -> LayoutOptions:
    """The layout a method was given: ``layout``, or its values as keywords (and no other keyword)."""
    want = LayoutOptions.of(layout, values)
    if values:
        raise TypeError(f"{method}() got an unexpected keyword argument {next(iter(values))!r}")
    return want


def _save_format(value: str) -> str:
    if value not in SAVE_FORMATS:
        raise ConfigError(f"--cfg.save_format {value!r}: expected one of {', '.join(SAVE_FORMATS)}")
    return value


def mm_sources(reader, verify: bool) -> Sources:
    """Sources over an MM checkpoint; with ``verify``, the CRC-32 of every byte read from its shards (torch zip
    records) is checked against the one stored with the record before the output is renamed into place."""
    zipped = not reader.layout_free
    return Sources(mm=reader, log=ReadLog() if verify and zipped else None)


# ---- outputs ---------------------------------------------------------------------------------------------
def mm_output(command: str, path, option: str, source: Checkpoint, sources: Sources, files: list[OutputFile],
              layout: ParallelLayout | None, description: str, writer, save_format: str = "torch", *,
              iteration: str | int = "release", notes: tuple[str, ...] | list[str] = ()) -> Output:
    """An MM checkpoint directory (mp_rank_* shards, torch_dist or DCP record files): the files in the iteration
    directory (``release``, or a training save's ``iter_NNNNNNN``), the tracker naming it beside them."""
    return Output(command, path, option, source, sources, files, writer, layout, description,
                  {"iteration": iteration, "save_format": save_format}, mm_format.iteration_dir_name(iteration),
                  partial(_tracker, iteration), list(notes))


def _tracker(iteration, root: Path) -> list[str]:
    mm_format.write_tracker(root, iteration)
    return []


def hf_output(command: str, path, source: Checkpoint, sources: Sources, files: list[OutputFile],
              layout: ParallelLayout | None, description: str) -> Output:
    """An HF directory: the safetensors files, their index, and the reference's config / tokenizer / processor
    files (config.json from the source's config without a reference)."""
    ref = source.reference
    return Output(command, path, "--cfg.save_hf_dir", source, sources, files, hf_format.SafetensorsWriter(), layout,
                  description, {"reference": source_identity(ref, hf_format.NON_WEIGHT_FILES) if ref is not None else None},
                  extras=partial(_reference_files, source), notes=list(source.notes))


def _reference_files(source: Checkpoint, root: Path) -> list[str]:
    copied = copy_non_weight_files(source.reference, root) if source.reference is not None else []
    if "config.json" not in copied:
        (root / "config.json").write_text(json.dumps(source.config, indent=2) + "\n")
    return ["copied from reference: " + (", ".join(copied) if copied else "none (config.json from manifest)")]


def copy_non_weight_files(hf_dir, out: Path) -> list[str]:
    copied = []
    for name in hf_format.NON_WEIGHT_FILES:
        src = Path(hf_dir) / name
        if src.is_file():
            shutil.copyfile(src, out / name)
            copied.append(name)
    return copied


def dist_files(plan: list[OutputFile]) -> list[OutputFile]:
    """A tp 1, pp 1 plan (one shard) as torch_dist record files ``__K_0.distcp`` of at most dist.FILE_BYTES
    each (a file per writer; the cut depends on the model only, so the output does not depend on the workers)."""
    (shard,) = plan
    return cut_files(shard.slots["model"], "model", dist.FILE_BYTES, dist.record_file_name)


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


def _converter_class(spec: ModuleType, name: str) -> type:
    return type(name, (Converter,), {"spec": spec, "__doc__": f"{spec.NAME} (published sizes: "
                                     f"{', '.join(spec.PUBLISHED)}; any size with the same architecture).",
                                     "__module__": __name__})


# One class per family (and MindSpeed-MM's second name for a family's FSDP2 path), from the registry.
CONVERTERS: dict[str, type] = {}
for _spec in FAMILIES:
    for _name in (_spec.CONVERTER, getattr(_spec, "DCP_CONVERTER", None)):
        if _name:
            CONVERTERS[_name] = _converter_class(_spec, _name)
globals().update(CONVERTERS)


def converter_for(cfg: dict, **kwargs) -> Converter:
    """A converter for the family of an HF config dict (its ``model_type``)."""
    for spec in FAMILIES:
        if cfg.get("model_type") in spec.MODEL_TYPES:
            return CONVERTERS[spec.CONVERTER](**kwargs)
    known = sorted(t for f in FAMILIES for t in f.MODEL_TYPES)
    raise ConfigError(f"model_type {cfg.get('model_type')!r} is not a supported family ({', '.join(known)})")
