"""Converters: the Python API. The CLI (cli.py) parses options and calls these methods, nothing more.

A converter class binds a model spec (mm_convert/models/<family>.py) to the generic engine. Commands:
``hf_to_mm``, ``mm_to_hf``, ``resplit``, ``verify`` and ``plan`` (a dry run of any of the first three); for a
family whose spec declares MindSpeed-MM's FSDP2 checkpoint (``DCP_KEY_SCHEME``), ``hf_to_dcp`` and ``dcp_to_hf``.
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


from . import __version__
from .errors import CheckpointError, ConfigError, LayoutError, MMConvertError
from . import integrity
from .execute import Loc, Ranks, Sources, default_workers, matches, run_files
from .integrity import ReadLog
from .formats import dcp as dcp_format
from .formats import dist
from .formats import hf as hf_format
from .formats import mm as mm_format
from .layout import ParallelLayout
from .models import FAMILIES
from .models.base import EXPERT_LAYOUTS
from .manifest import (MANIFEST, check_manifest, check_sizes, files_description, finalize, plan_id, read_journal,
                       read_manifest, source_identity)
from .output import atomic_output_dir
from .plan import (HF, OutputFile, Piece, Ref, TargetTensor, check_coverage, compose, hf_files_plan, hf_to_mm_plan,
                   invert, rule_pieces)
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
    def _model(self, cfg: dict, source: str, expert_layout: str = "hub") -> "BoundModel":
        return BoundModel(self.spec, self.spec.config_from_hf(cfg, source), expert_layout)

    def _open_hf(self, hf_dir, option="--cfg.hf_config.hf_dir"):
        """Config, bound model, reader and dtypes of an HF checkpoint, checked against its config.json."""
        cfg = hf_format.load_config(hf_dir, option)
        source = str(Path(hf_dir) / "config.json")
        model = self._model(cfg, source)
        reader = hf_format.HFReader(hf_dir, self.spec.KEY_SCHEMES)
        names = set(reader.names())
        root = Path(hf_dir)
        model = self._match_expert_layout(model, reader)
        expected = model.shapes
        missing = [n for n in expected if n not in names]
        t, v = model.cfg.text, model.cfg.vision
        if missing:
            raise CheckpointError(f"{root}: tensor {reader.external(missing[0])} is missing"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                  + f"; expected by config.json ({t.num_layers} layers, vision depth {v.depth}"
                                  + (", tied embeddings" if t.tie_word_embeddings else "") + ")")
        extra = sorted(names - set(expected))
        if extra:
            n0 = extra[0]
            raise CheckpointError(f"{root / reader.file_of(n0)}: unexpected tensor {reader.external(n0)}"
                                  + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                                  + f"; it is not part of a {self.spec.NAME} model with this config.json")
        dtypes = {}
        for n, shape in expected.items():
            dt, got = reader.meta(n)
            if tuple(got) != tuple(shape):
                raise CheckpointError(f"{root / reader.file_of(n)}: {reader.external(n)} has shape "
                                      f"{list(got)}, config.json expects {list(shape)}")
            dtypes[n] = dt
        check_one_dtype(((root / reader.file_of(n), reader.external(n), dt) for n, dt in dtypes.items()))
        return cfg, model, reader, dtypes

    def _match_expert_layout(self, model: "BoundModel", reader) -> "BoundModel":
        """The layout of fused expert tensors the files use (the first whose shapes all match)."""
        for layout in EXPERT_LAYOUTS:
            candidate = BoundModel(model.spec, model.cfg, layout)
            shapes = candidate.shapes
            if all(n not in shapes or tuple(reader.meta(n)[1]) == tuple(shapes[n]) for n in reader.names()):
                return candidate
        return model

    def _layout(self, model, tp_size, llm_pp_layers, vit_pp_layers, vit_tp_size, prefix, ep_size=1) -> ParallelLayout:
        t, v = model.cfg.text, model.cfg.vision
        layout = ParallelLayout.create(tp_size, llm_pp_layers, vit_pp_layers, vit_tp_size, ep_size=ep_size,
                                       llm_layers=t.num_layers, vit_layers=v.depth, prefix=prefix)
        layout.check_layer_counts(v.depth, t.num_layers, prefix)
        if ep_size > 1 and not t.num_experts:
            raise LayoutError(f"{prefix}.ep_size {ep_size}: this {self.spec.NAME} model has no experts (dense); "
                              f"expert parallelism needs a MoE model")
        layout.check_divisible(self.spec.tp_divisible(model.cfg), prefix)
        return layout

    def _global_layout(self, model, option) -> ParallelLayout:
        """tp 1, pp 1: how a checkpoint of global tensors (torch_dist) is read and written."""
        return self._layout(model, 1, [[model.cfg.text.num_layers]], [[model.cfg.vision.depth]], 0, option)

    def _shard_layout(self, reader, model, given: dict, option, prefix):
        """The layout read off the shards, checked against the config; values the user gave must match it.
        A torch_dist source has no layout of its own: it reads as tp 1, pp 1."""
        if reader.layout_free:
            return self._global_layout(model, option)
        found = reader.infer_layout(self.spec.LAYER_PREFIXES, model.vit_tp_probe())

        def lists(value, have):
            return value if value is not None else [list(c) for c in have]

        if any(given.get(k) is not None for k in ("tp_size", "llm_pp_layers", "vit_pp_layers", "ep_size")):
            pick = lambda k, have: given[k] if given.get(k) is not None else have  # noqa: E731
            want = self._layout(model, pick("tp_size", found.tp_size), lists(given.get("llm_pp_layers"), found.llm_pp_layers),
                                lists(given.get("vit_pp_layers"), found.vit_pp_layers),
                                pick("vit_tp_size", found.vit_tp_size), prefix, pick("ep_size", found.ep_size))
            if (want.tp_size, want.llm_pp_layers, want.vit_pp_layers, want.effective_vit_tp, want.ep_size) != \
                    (found.tp_size, found.llm_pp_layers, found.vit_pp_layers, found.effective_vit_tp, found.ep_size):
                raise LayoutError(f"{prefix}: {want.describe()} does not match the shards in {reader.iter_dir}, "
                                  f"which hold {found.describe()}")
        return self._layout(model, found.tp_size, lists(None, found.llm_pp_layers), lists(None, found.vit_pp_layers),
                            found.vit_tp_size, option, found.ep_size)

    def _open_mm(self, mm_dir, hf_dir, option, given: dict, prefix):
        """Reader, config, bound model, layout, checked source plan and HF key scheme of an MM checkpoint."""
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
        model = self._model(cfg, source, (manifest or {}).get("hf_expert_layout", "hub"))
        layout = self._shard_layout(reader, model, given, f"{option} {mm_dir}", prefix)
        plan = model.plan(layout, {n: None for n in model.shapes})
        check_shards_match(reader, plan)
        check_one_dtype((reader.iter_dir / f.path, f"{slot}.{k}", t.dtype)
                        for f in plan for slot, sd in reader.slots(f.path).items() for k, t in sd.items())
        scheme = (manifest or {}).get("hf_key_scheme", "legacy")
        return reader, cfg, model, layout, plan, scheme

    def layout_of(self, mm_dir, hf_dir=None, option: str = "--cfg.mm_dir") -> ParallelLayout:
        """The layout of an MM checkpoint, read off its shards and checked against the config (from ``hf_dir``
        or the checkpoint's manifest): what the runtime loads by. The shards' contents are the loader's to check."""
        reader = mm_format.open_reader(mm_dir, option)
        if hf_dir is not None:
            cfg, source = hf_format.load_config(hf_dir), str(Path(hf_dir) / "config.json")
        else:
            cfg, source = (read_manifest(mm_dir) or {}).get("hf_config"), str(Path(mm_dir) / MANIFEST)
            if not isinstance(cfg, dict):
                raise ConfigError(f"{option} {mm_dir}: no {MANIFEST} with the model config; give the HF directory")
        return self._shard_layout(reader, self._model(cfg, source), {}, f"{option} {mm_dir}", "--cfg.parallel_config")

    # ---- commands ----------------------------------------------------------------------------------------
    def hf_to_mm(self, hf_dir, mm_dir, tp_size: int = 1, llm_pp_layers=None, vit_pp_layers=None, vit_tp_size: int = 0,
                 *, ep_size: int = 1, save_format: str = "torch", overwrite: bool = False, dry_run: bool = False,
                 resume: bool = False) -> Result:
        """Convert an HF checkpoint directory into an MM checkpoint (``release``) with the given layout.
        ``save_format``: "torch" (mp_rank_* shards) or "torch_dist" (Megatron's distributed format: global
        tensors, any TP / PP at load time; the layout given is checked, not used).
        ``ep_size``: expert parallelism (MoE models): shards ``mp_rank_TT[_PPP]_EEE``, experts split evenly.
        ``resume``: keep the finished files of an interrupted run of the same plan (see manifest.py)."""
        cfg, model, reader, dtypes = self._open_hf(hf_dir)
        layout = self._layout(model, tp_size, llm_pp_layers, vit_pp_layers, vit_tp_size, "--cfg.parallel_config", ep_size)
        if _save_format(save_format) == "torch_dist":
            layout = self._global_layout(model, "--cfg.parallel_config")
            files = dist_files(model.plan(layout, dtypes))
            result = Result("hf_to_mm", str(mm_dir), "torch_dist (global tensors)", files)
        else:
            files = model.plan(layout, dtypes)
            result = Result("hf_to_mm", str(mm_dir), layout.describe(), files)
        if dry_run:
            return result
        manifest = {"hf_config": cfg, "hf_key_scheme": reader.scheme, "hf_expert_layout": model.expert_layout,
                    "source": str(Path(hf_dir).absolute()),
                    "source_identity": source_identity(hf_dir, ["config.json", hf_format.INDEX] + reader.weight_files())}
        return self._write_mm(result, mm_dir, layout, Sources(hf=reader), [hf_dir], overwrite, manifest, resume,
                              save_format=save_format)

    def mm_to_hf(self, mm_dir, save_hf_dir, hf_dir=None, tp_size=None, llm_pp_layers=None, vit_pp_layers=None,
                 vit_tp_size=None, *, ep_size=None, max_shard_size=DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
                 dry_run: bool = False, resume: bool = False, verify_source: bool = True) -> Result:
        """Convert an MM checkpoint back to HF safetensors. The layout is read off the shards (given values
        are checked against them). ``hf_dir``: the original HF directory, for config, tokenizer and processor
        files; its weights, where present, decide the key scheme and expert layout written."""
        given = dict(tp_size=tp_size, llm_pp_layers=llm_pp_layers, vit_pp_layers=vit_pp_layers, vit_tp_size=vit_tp_size,
                     ep_size=ep_size)
        reader, cfg, model, layout, plan, scheme = self._open_mm(mm_dir, hf_dir, "--cfg.mm_dir", given,
                                                                 "--cfg.parallel_config")
        if hf_dir is not None:
            try:
                ref = hf_format.HFReader(hf_dir, self.spec.KEY_SCHEMES)
                scheme = ref.scheme
                matched = self._match_expert_layout(model, ref)
                if matched != model:  # the reference stores experts in the other layout: plan for that one
                    model, plan = matched, matched.plan(layout, {n: None for n in matched.shapes})
            except CheckpointError:
                pass  # a reference dir without weights: keep what was recorded at conversion
        shapes = model.shapes
        inv = invert(plan, shapes)
        files = hf_files_plan(inv, shapes, lambda ref: reader.meta(ref)[0],
                              lambda n: hf_format.from_legacy(n, scheme, self.spec.KEY_SCHEMES), parse_size(max_shard_size))
        check_coverage(files)
        result = Result("mm_to_hf", str(save_hf_dir), layout.describe(), files)
        if dry_run:
            return result
        return self._write_hf(result, save_hf_dir, layout, mm_sources(reader, verify_source), mm_dir, hf_dir, cfg, {
            "hf_config": cfg, "hf_key_scheme": scheme, "hf_expert_layout": model.expert_layout,
            "source": str(Path(mm_dir).absolute()), "source_identity": _mm_identity(mm_dir, reader)}, overwrite, resume)

    def _write_hf(self, result: Result, save_hf_dir, layout: ParallelLayout | None, sources: Sources, src_dir, hf_dir,
                  cfg: dict, manifest: dict, overwrite: bool, resume: bool) -> Result:
        """Write the planned safetensors files, the index, and the reference's config / tokenizer / processor
        files (config.json from ``cfg`` without a reference)."""
        files = result.files
        doc = self._manifest_doc(result, layout, {
            **manifest, "reference": source_identity(hf_dir, hf_format.NON_WEIGHT_FILES) if hf_dir is not None else None})
        if resume and _complete(save_hf_dir, doc):
            return self._already(result)
        with self._output(save_hf_dir, "--cfg.save_hf_dir", [src_dir] + ([hf_dir] if hf_dir else []), overwrite,
                          resume=resume, plan_id=doc["plan"]) as out:
            todo, kept = self._todo(out, "", files, result)
            result.bytes = self._execute(todo, out, hf_format.SafetensorsWriter(), sources, result.command) + kept
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
                vit_tp_size: int = 0, *, ep_size: int = 1, source_tp_size=None, source_llm_pp_layers=None,
                source_vit_pp_layers=None, source_vit_tp_size=None, source_ep_size=None, hf_dir=None,
                overwrite: bool = False, dry_run: bool = False, resume: bool = False,
                verify_source: bool = True) -> Result:
        """Reshard an MM checkpoint to another TP / PP / VPP / EP layout directly (no HF files in between)."""
        given = dict(tp_size=source_tp_size, llm_pp_layers=source_llm_pp_layers, vit_pp_layers=source_vit_pp_layers,
                     vit_tp_size=source_vit_tp_size, ep_size=source_ep_size)
        reader, cfg, model, src_layout, src_plan, scheme = self._open_mm(
            source_dir, hf_dir, "--cfg.source_dir", given, "--cfg.source_parallel_config")
        layout = self._layout(model, tp_size, llm_pp_layers, vit_pp_layers, vit_tp_size, "--cfg.target_parallel_config",
                              ep_size)
        shapes = model.shapes
        inv = invert(src_plan, shapes)
        dtypes = {n: reader.meta(inv[n][0].src)[0] for n in shapes}
        files = compose(model.plan(layout, dtypes), inv)
        check_coverage(files)
        result = Result("resplit", str(target_dir), f"{src_layout.describe()} -> {layout.describe()}", files)
        if dry_run:
            return result
        manifest = {"hf_config": cfg, "hf_key_scheme": scheme, "hf_expert_layout": model.expert_layout,
                    "source": str(Path(source_dir).absolute()), "source_identity": _mm_identity(source_dir, reader)}
        saved = _with_layout(reader.training_state(), layout)
        if saved:
            result.notes.append("kept from the training save: " + ", ".join(
                f"iteration {saved['iteration']}" if k == "iteration" else k for k in saved))
        return self._write_mm(result, target_dir, layout, mm_sources(reader, verify_source),
                              [source_dir] + ([hf_dir] if hf_dir else []),
                              overwrite, manifest, resume, saved)

    # ---- MindSpeed-MM's FSDP2 path: torch.distributed.checkpoint directories ---------------------------------
    def _dcp_spec(self, command: str):
        """The spec, if it declares a DCP checkpoint layout (``DCP_KEY_SCHEME``, ``DCP_PREFIX``); else a one-line refusal."""
        if not getattr(self.spec, "DCP_KEY_SCHEME", None):
            have = [getattr(f, "DCP_CONVERTER", None) or f.CONVERTER for f in FAMILIES if getattr(f, "DCP_KEY_SCHEME", None)]
            raise ConfigError(f"{type(self).__name__} {command}: {self.spec.NAME} has no FSDP2 / DCP checkpoint layout "
                              f"(hf_to_dcp and dcp_to_hf are for {', '.join(have) or 'no family'})")
        return self.spec

    def hf_to_dcp(self, hf_dir, dcp_dir, *, overwrite: bool = False, resume: bool = False,
                  dry_run: bool = False) -> Result:
        """Convert an HF checkpoint into MindSpeed-MM's FSDP2 checkpoint: a torch.distributed.checkpoint directory
        ``dcp_dir/release`` (``.metadata``, ``__K_0.distcp``) of ``{"model": {DCP_PREFIX + hub key: tensor},
        "checkpoint_version": 3.0}``, fused expert tensors viewed 2-D (the spec's ``dcp_experts``), and
        ``dcp_dir/latest_checkpointed_iteration.txt``."""
        self._dcp_spec("hf_to_dcp")
        cfg, model, reader, dtypes = self._open_hf(hf_dir)
        files = dcp_format.output_files(dcp_tensors(model, dtypes))
        check_coverage(files)
        result = Result("hf_to_dcp", str(dcp_dir), "DCP (FSDP2: global tensors)", files)
        if dry_run:
            return result
        manifest = {"hf_config": cfg, "hf_key_scheme": reader.scheme, "hf_expert_layout": model.expert_layout,
                    "source": str(Path(hf_dir).absolute()),
                    "source_identity": source_identity(hf_dir, ["config.json", hf_format.INDEX] + reader.weight_files())}
        return self._write_mm(result, dcp_dir, None, Sources(hf=reader), [hf_dir], overwrite, manifest, resume,
                              save_format="dcp")

    def dcp_to_hf(self, dcp_dir, save_hf_dir, hf_dir=None, *, max_shard_size=DEFAULT_MAX_SHARD_SIZE,
                  overwrite: bool = False, resume: bool = False, dry_run: bool = False) -> Result:
        """Convert MindSpeed-MM's FSDP2 checkpoint (``dcp_dir``: the directory with the tracker, or the iteration
        directory holding ``.metadata``) back to HF safetensors: experts back to 3-D, the prefix stripped, sharded
        with an index. ``hf_dir``: the original HF directory, for config, tokenizer and processor files; its
        weights, where present, decide the key scheme and expert layout written (else the hub's)."""
        spec = self._dcp_spec("dcp_to_hf")
        it_dir, root = dcp_format.resolve_dir(dcp_dir, "--cfg.dcp_dir")
        manifest = read_manifest(root)
        check_sizes(root, manifest, [os.path.relpath(p, root) for p in it_dir.iterdir() if p.is_file()])
        reader = dcp_format.DCPReader(it_dir)
        if hf_dir is not None:
            cfg, source = hf_format.load_config(hf_dir), str(Path(hf_dir) / "config.json")
        elif manifest and isinstance(manifest.get("hf_config"), dict):
            cfg, source = manifest["hf_config"], str(Path(root) / MANIFEST)
        else:
            raise ConfigError(f"--cfg.dcp_dir {dcp_dir}: no {MANIFEST} with the model config; pass "
                              f"--cfg.hf_config.hf_dir (the original HF directory, for its config.json)")
        model, scheme = self._model(cfg, source), spec.DCP_KEY_SCHEME
        if hf_dir is not None:
            try:
                ref = hf_format.HFReader(hf_dir, spec.KEY_SCHEMES)
                scheme, model = ref.scheme, self._match_expert_layout(model, ref)
            except CheckpointError:
                pass  # a reference dir without weights: the hub's scheme and expert layout
        tensors = dcp_tensors(model, {n: None for n in model.shapes})
        notes = check_dcp_keys(reader, tensors, model)
        shapes = model.shapes
        inv = invert([OutputFile(it_dir.name, {dcp_format.STATE_KEY: tensors})], shapes)
        files = hf_files_plan(inv, shapes, lambda r: reader.meta(r)[0],
                              lambda n: hf_format.from_legacy(n, scheme, spec.KEY_SCHEMES), parse_size(max_shard_size))
        check_coverage(files)
        result = Result("dcp_to_hf", str(save_hf_dir), "DCP (FSDP2: global tensors) -> HF", files, notes=notes)
        if dry_run:
            return result
        return self._write_hf(result, save_hf_dir, None, Sources(mm=reader), dcp_dir, hf_dir, cfg, {
            "hf_config": cfg, "hf_key_scheme": scheme, "hf_expert_layout": model.expert_layout,
            "source": str(Path(dcp_dir).absolute()),
            "source_identity": source_identity(root, [os.path.relpath(it_dir / r, root) for r in reader.files()]
                                               + [mm_format.TRACKER, MANIFEST])}, overwrite, resume)

    def verify(self, hf_dir, mm_dir, tp_size=None, llm_pp_layers=None, vit_pp_layers=None, vit_tp_size=None,
               *, ep_size=None) -> VerifyReport:
        """Compare every tensor of an MM checkpoint with what its HF checkpoint says it must be, bit for bit.
        Any directory written by mm_convert is first checked against its manifest (every file's size and sha256);
        with ``hf_dir`` None that is the whole check (any output: MM or HF)."""
        report = VerifyReport()
        if hf_dir is None or read_manifest(mm_dir) is not None:
            report.manifest_checked, report.manifest_error = check_manifest(mm_dir)
            if hf_dir is None:
                return report
        try:
            given = dict(tp_size=tp_size, llm_pp_layers=llm_pp_layers, vit_pp_layers=vit_pp_layers,
                         vit_tp_size=vit_tp_size, ep_size=ep_size)
            return self._verify_tensors(report, hf_dir, mm_dir, given)
        except CheckpointError:
            if report.manifest_error:
                return report  # the file the manifest check named is unreadable as well
            raise

    def _verify_tensors(self, report, hf_dir, mm_dir, given: dict) -> VerifyReport:
        cfg, model, hf_reader, dtypes = self._open_hf(hf_dir)
        shapes = model.shapes
        reader = mm_format.open_reader(mm_dir)
        layout = self._shard_layout(reader, model, given, "--cfg.mm_dir", "--cfg.parallel_config")
        plan = model.plan(layout, dtypes)
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
        option = {"resplit": "--cfg.target_dir", "hf_to_dcp": "--cfg.dcp_dir"}.get(result.command, "--cfg.mm_dir")
        saved = saved or {}
        iteration = saved.get("iteration", "release")
        doc = self._manifest_doc(result, layout, {**manifest, "iteration": iteration, "save_format": save_format})
        if resume and _complete(mm_dir, doc):
            return self._already(result)
        with self._output(mm_dir, option, src_dirs, overwrite, resume=resume, plan_id=doc["plan"]) as out:
            sub = mm_format.iteration_dir_name(iteration)
            todo, kept = self._todo(out, sub + "/", result.files, result)
            writer = {"torch_dist": dist.DistWriter, "dcp": lambda: dcp_format.DCPWriter(result.files)}.get(
                save_format, lambda: mm_format.ShardWriter(saved))()
            result.bytes = self._execute(todo, out / sub, writer, sources, result.command) + kept
            if save_format == "torch_dist":
                dist.write_side_files(out / sub, [(f.path, [(t.key, t.dtype, t.shape) for t in f.slots["model"]])
                                                  for f in result.files], {"checkpoint_version": 3.0, **saved})
            elif save_format == "dcp":
                dcp_format.write_metadata(out / sub, result.files)
            mm_format.write_tracker(out, iteration)
            finalize(out, doc, expect=[sub + "/" + f.path for f in result.files])
        result.seconds = time.monotonic() - self._t0
        return result

    @staticmethod
    def _manifest_doc(result: Result, layout: ParallelLayout | None, extra: dict) -> dict:
        """What the manifest records besides the files; ``plan`` hashes it together with every planned tensor.
        ``layout`` None: an output without a parallel layout (DCP, HF from DCP)."""
        doc = {"tool": "mm_convert", "version": __version__, "command": result.command,
               "layout": layout.to_dict() if layout is not None else None, **extra}
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
        if ranks.rank != 0:
            raise _RankDone()
        return total


def mm_sources(reader, verify: bool) -> Sources:
    """Sources over an MM checkpoint; with ``verify``, the CRC-32 of every byte read from its shards (torch zip
    records) is checked against the one stored with the record before the output is renamed into place."""
    zipped = not reader.layout_free
    return Sources(mm=reader, log=ReadLog() if verify and zipped else None)


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
    return dist.record_files(shard.slots["model"], "model", DIST_FILE_BYTES)


def dcp_key(spec: ModuleType, name: str) -> str:
    """The key of an HF tensor (legacy name) inside the model entry of a DCP checkpoint."""
    return spec.DCP_PREFIX + hf_format.from_legacy(name, spec.DCP_KEY_SCHEME, spec.KEY_SCHEMES)


def dcp_tensors(model: "BoundModel", dtypes: dict) -> list[TargetTensor]:
    """The tensors of a DCP checkpoint, each made of pieces of the HF tensors (``model``'s shapes, in its expert
    layout): a plain copy, or for a fused 3-D expert tensor [E, A, B] (hub layout) the 2-D [E * A, B] it is stored
    as, one piece per expert (transposed when the files hold experts in the other layout)."""
    spec = model.spec
    fused = spec.dcp_experts(model.cfg, model.expert_layout) if hasattr(spec, "dcp_experts") else {}
    out = []
    for name, shape in model.shapes.items():
        src = Ref(HF, "", name)
        if name in fused:
            experts, (a, b), transposed = fused[name]
            pieces = [Piece(src, (e, 0, 0), (e * a, 0), (a, b), transposed) for e in range(experts)]
            out.append(TargetTensor(dcp_key(spec, name), (experts * a, b), dtypes[name], pieces))
        else:
            zeros = (0,) * len(shape)
            out.append(TargetTensor(dcp_key(spec, name), tuple(shape), dtypes[name], [Piece(src, zeros, zeros, tuple(shape))]))
    return out


def check_dcp_keys(reader: "dcp_format.DCPReader", tensors: list[TargetTensor], model: "BoundModel") -> list[str]:
    """The DCP checkpoint's model entry holds exactly ``tensors`` (keys and shapes), in one dtype; a tied
    model's copy of the embeddings as the output layer is allowed and skipped (returned as a note)."""
    where = reader.iter_dir / dist.DCP_METADATA
    have = reader.keys()
    slot = reader.slot
    want = {t.key: t for t in tensors}
    missing = [k for k in want if k not in have]
    t, v = model.cfg.text, model.cfg.vision
    if missing:
        raise CheckpointError(f"{where}: tensor {slot}.{missing[0]} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + f"; expected by config.json ({t.num_layers} layers, vision depth {v.depth}"
                              + (", tied embeddings" if t.tie_word_embeddings else "") + ")")
    notes = []
    copy = getattr(model.spec, "DCP_TIED_COPY", None)
    skip = dcp_key(model.spec, copy) if copy and t.tie_word_embeddings else None
    extra = sorted(k for k in have if k not in want and k != skip)
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor {slot}.{extra[0]}"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                              + f"; it is not part of a {model.spec.NAME} model with this config.json")
    if skip in have:
        notes.append(f"skipped {slot}.{skip}: the output layer of a tied model, a copy of the embeddings")
    for k, tt in want.items():
        if tuple(have[k].shape) != tuple(tt.shape):
            raise CheckpointError(f"{where}: {slot}.{k} has shape {list(have[k].shape)}, config.json expects "
                                  f"{list(tt.shape)}")
    check_one_dtype((where, f"{slot}.{k}", have[k].dtype) for k in want)
    return notes


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


@dataclass(frozen=True)
class BoundModel:
    """A family's spec bound to one config (and the layout of its fused HF expert tensors): what the planner needs."""
    spec: ModuleType
    cfg: object
    expert_layout: str = "hub"

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.spec.hf_shapes(self.cfg, self.expert_layout)

    def plan(self, layout: ParallelLayout, dtypes: dict) -> list[OutputFile]:
        files = hf_to_mm_plan(self.spec.rules(self.cfg, layout.pp_size), layout, self.shapes, dtypes,
                              self.spec.views(self.cfg, self.expert_layout))
        check_coverage(files)
        return files

    def vit_tp_probe(self) -> tuple[str, int] | None:
        """(MM name at vision layer 0, its rows at TP 1) of the first TP-split vision layer tensor: a shard's
        rows of it tell the vision TP size."""
        shapes = {**self.shapes, **{n: v.shape for n, v in self.spec.views(self.cfg, self.expert_layout).items()}}
        for rule in self.spec.rules(self.cfg, 1):
            if rule.module == "vit" and rule.place == "layer" and rule.tp == "split_dim0" and rule.layers is None:
                names = [h.format(i=0, e=0) for h in rule.hf]
                shape, _ = rule_pieces(rule, names, shapes, 1, 0)
                return rule.mm.format(i=0, e=0), shape[0]
        return None


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
