"""Source checkpoints, opened: one open function per format, each returning a :class:`Checkpoint` whose tensors
were checked against its config (names, shapes, one dtype) and, for MM shards, against their layout.

    open_hf(spec, hf_dir)                    config.json + safetensors
    open_mm(spec, mm_dir, hf_dir, want, ...) mp_rank_* shards or a torch_dist directory (layout read off them)
    open_dcp(spec, dcp_dir, hf_dir)          MindSpeed-MM's FSDP2 checkpoint (torch.distributed.checkpoint)
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType

from .errors import CheckpointError, ConfigError, LayoutError
from .formats import dcp as dcp_format
from .formats import dist
from .formats import hf as hf_format
from .formats import mm as mm_format
from .layout import LayoutOptions, ParallelLayout
from .manifest import MANIFEST, check_sizes, read_manifest, source_identity
from .models.base import EXPERT_LAYOUTS
from .plan import HF, OutputFile, Piece, Ref, TargetTensor, check_coverage, hf_to_mm_plan, invert, rule_pieces


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


@dataclass(frozen=True)
class Checkpoint:
    """An opened source checkpoint: everything a command plans from and records about its source."""
    directory: Path                 # as given
    format: str                     # "hf", "mm" (mp_rank_* shards), "torch_dist" or "dcp"
    config: dict                    # the HF config (config.json, or the one its manifest records)
    model: BoundModel
    reader: object                  # HFReader, MMReader, DistReader or DCPReader
    key_scheme: str                 # the HF key scheme its tensors had (written back by HF outputs)
    identity: dict                  # the files an output is made from (manifest.source_identity)
    reference: Path | None = None   # the original HF directory given with a converted checkpoint
    layout: ParallelLayout | None = None  # MM: read off the shards (torch_dist: tp 1, pp 1); None: HF, DCP
    files: list[OutputFile] = field(default_factory=list)  # MM, DCP: its files as planned from HF (checked)
    dtypes: dict = field(default_factory=dict)  # HF: each tensor's dtype
    notes: tuple[str, ...] = ()

    @property
    def dirs(self) -> list[Path]:
        """The directories read: an output must not overlap them."""
        return [self.directory] + ([self.reference] if self.reference else [])

    def provenance(self) -> dict:
        """What every output's manifest records about its source."""
        return {"hf_config": self.config, "hf_key_scheme": self.key_scheme, "hf_expert_layout": self.model.expert_layout,
                "source": str(Path(self.directory).absolute()), "source_identity": self.identity}

    def inverse(self) -> dict[str, list[Piece]]:
        """Each HF tensor as pieces of this checkpoint's tensors."""
        return invert(self.files, self.model.shapes)


# ---- open ------------------------------------------------------------------------------------------------
def open_hf(spec: ModuleType, hf_dir, option: str = "--cfg.hf_config.hf_dir") -> Checkpoint:
    """An HF checkpoint, every tensor checked against its config.json (names, shapes, one dtype)."""
    cfg = hf_format.load_config(hf_dir, option)
    model = bind(spec, cfg, str(Path(hf_dir) / "config.json"))
    reader = hf_format.HFReader(hf_dir, spec.KEY_SCHEMES)
    model = match_expert_layout(model, reader)
    root = Path(hf_dir)
    names = set(reader.names())
    missing = [n for n in model.shapes if n not in names]
    if missing:
        raise CheckpointError(f"{root}: tensor {reader.external(missing[0])} is missing" + _missing_tail(missing, model))
    extra = sorted(names - set(model.shapes))
    if extra:
        raise CheckpointError(f"{root / reader.file_of(extra[0])}: unexpected tensor {reader.external(extra[0])}"
                              + _extra_tail(extra, spec))
    dtypes = {}
    for n, shape in model.shapes.items():
        dt, got = reader.meta(n)
        if tuple(got) != tuple(shape):
            raise CheckpointError(f"{root / reader.file_of(n)}: {reader.external(n)} has shape "
                                  f"{list(got)}, config.json expects {list(shape)}")
        dtypes[n] = dt
    check_one_dtype(((root / reader.file_of(n), reader.external(n), dt) for n, dt in dtypes.items()))
    identity = source_identity(hf_dir, ["config.json", hf_format.INDEX] + reader.weight_files())
    return Checkpoint(Path(hf_dir), "hf", cfg, model, reader, reader.scheme, identity, dtypes=dtypes)


def open_mm(spec: ModuleType, mm_dir, hf_dir, want: LayoutOptions, option: str, prefix: str) -> Checkpoint:
    """An MM checkpoint (mp_rank_* shards, or torch_dist), its layout read off the shards (``want``'s values, where
    given, must match it), every shard holding exactly what that layout puts there. The config comes from
    ``hf_dir`` or the checkpoint's manifest."""
    reader = open_reader(mm_dir, option)
    manifest = read_manifest(mm_dir)
    check_sizes(mm_dir, manifest, _relative(reader, mm_dir))
    cfg, source = source_config(hf_dir, mm_dir, manifest, f"{option} {mm_dir}: no {MANIFEST} with the model config; pass "
                          f"--cfg.hf_config.hf_dir (the original HF directory, for its config.json)")
    model = bind(spec, cfg, source, (manifest or {}).get("hf_expert_layout", "hub"))
    layout = shard_layout(reader, model, want, f"{option} {mm_dir}", prefix)
    files = model.plan(layout, {n: None for n in model.shapes})
    check_shards_match(reader, files)
    check_one_dtype((reader.iter_dir / f.path, f"{slot}.{k}", t.dtype)
                    for f in files for slot, sd in reader.slots(f.path).items() for k, t in sd.items())
    identity = source_identity(mm_dir, _relative(reader, mm_dir) + [mm_format.TRACKER, MANIFEST])
    return Checkpoint(Path(mm_dir), "torch_dist" if reader.layout_free else "mm", cfg, model, reader,
                      (manifest or {}).get("hf_key_scheme", "legacy"), identity, hf_dir, layout, files)


def open_dcp(spec: ModuleType, dcp_dir, hf_dir, option: str = "--cfg.dcp_dir") -> Checkpoint:
    """MindSpeed-MM's FSDP2 checkpoint (``dcp_dir``: the directory with the tracker, or the iteration directory
    holding ``.metadata``), its keys checked against the config (from ``hf_dir`` or the manifest). The weights
    in ``hf_dir``, where present, decide the key scheme and expert layout (else the hub's)."""
    it_dir, root = dcp_format.resolve_dir(dcp_dir, option)
    manifest = read_manifest(root)
    check_sizes(root, manifest, [os.path.relpath(p, root) for p in it_dir.iterdir() if p.is_file()])
    reader = dcp_format.DCPReader(it_dir)
    cfg, source = source_config(hf_dir, root, manifest, f"{option} {dcp_dir}: no {MANIFEST} with the model config; pass "
                          f"--cfg.hf_config.hf_dir (the original HF directory, for its config.json)")
    model = bind(spec, cfg, source)
    scheme, model = _as_reference(model, hf_dir) or (spec.DCP_KEY_SCHEME, model)  # else the hub's
    tensors = dcp_tensors(model, {n: None for n in model.shapes})
    notes = check_dcp_keys(reader, tensors, model)
    identity = source_identity(root, [os.path.relpath(it_dir / r, root) for r in reader.files()]
                               + [mm_format.TRACKER, MANIFEST])
    return Checkpoint(Path(dcp_dir), "dcp", cfg, model, reader, scheme, identity, hf_dir,
                      files=[OutputFile(it_dir.name, {dcp_format.STATE_KEY: tensors})], notes=tuple(notes))


def open_reader(mm_dir, option: str = "--cfg.mm_dir"):
    """The reader of an MM checkpoint: its mp_rank_* shards (MMReader), or a torch_dist directory (DistReader)."""
    it = mm_format.resolve_iteration_dir(mm_dir, option)
    return dist.DistReader(it) if dist.is_dist_dir(it) else mm_format.MMReader(mm_dir, option)


def with_reference(ckpt: Checkpoint, hf_dir) -> Checkpoint:
    """``ckpt`` as the original weights in ``hf_dir`` have it: their key scheme, and where they store experts in
    the other layout, its files planned for that one (so an HF output is written back as it was)."""
    found = _as_reference(ckpt.model, hf_dir)
    if found is None:
        return ckpt  # no reference weights: keep what was recorded at conversion
    scheme, model = found
    files = model.plan(ckpt.layout, {n: None for n in model.shapes}) if model != ckpt.model else ckpt.files
    return replace(ckpt, key_scheme=scheme, model=model, files=files)


def _as_reference(model: BoundModel, hf_dir) -> tuple[str, BoundModel] | None:
    """(key scheme, ``model`` in their expert layout) of the original weights in ``hf_dir``; None without any."""
    if hf_dir is None:
        return None
    try:
        ref = hf_format.HFReader(hf_dir, model.spec.KEY_SCHEMES)
        return ref.scheme, match_expert_layout(model, ref)
    except CheckpointError:
        return None  # a reference directory without weights


def source_config(hf_dir, root, manifest: dict | None, missing: str) -> tuple[dict, str]:
    """(HF config, where it was read): ``hf_dir``'s config.json, else the one the manifest records."""
    if hf_dir is not None:
        return hf_format.load_config(hf_dir), str(Path(hf_dir) / "config.json")
    if manifest and isinstance(manifest.get("hf_config"), dict):
        return manifest["hf_config"], str(Path(root) / MANIFEST)
    raise ConfigError(missing)


def _relative(reader, root) -> list[str]:
    return [os.path.relpath(reader.iter_dir / r, root) for r in reader.files()]


# ---- model and layout ------------------------------------------------------------------------------------
def bind(spec: ModuleType, cfg: dict, source: str, expert_layout: str = "hub") -> BoundModel:
    return BoundModel(spec, spec.config_from_hf(cfg, source), expert_layout)


def match_expert_layout(model: BoundModel, reader) -> BoundModel:
    """The layout of fused expert tensors the files use (the first whose shapes all match)."""
    for layout in EXPERT_LAYOUTS:
        candidate = BoundModel(model.spec, model.cfg, layout)
        shapes = candidate.shapes
        if all(n not in shapes or tuple(reader.meta(n)[1]) == tuple(shapes[n]) for n in reader.names()):
            return candidate
    return model


def checked_layout(model: BoundModel, want: LayoutOptions, prefix: str) -> ParallelLayout:
    """``want`` as a ParallelLayout for ``model``: layer sums, expert parallelism and TP divisibility checked."""
    t, v = model.cfg.text, model.cfg.vision
    layout = want.resolve(t.num_layers, v.depth, prefix, t.vocab_size)
    layout.check_layer_counts(v.depth, t.num_layers, prefix)
    if layout.ep_size > 1 and not t.num_experts:
        raise LayoutError(f"{prefix}.ep_size {layout.ep_size}: this {model.spec.NAME} model has no experts (dense); "
                          f"expert parallelism needs a MoE model")
    layout.check_divisible(model.spec.tp_divisible(model.cfg), prefix)
    return layout


def global_layout(model: BoundModel, prefix: str, padded_vocab_size: int = 0) -> ParallelLayout:
    """tp 1, pp 1: how a checkpoint of global tensors (torch_dist) is read and written (its vocabulary padded to
    ``padded_vocab_size`` rows, as Megatron saves it for the TP size it trained with)."""
    one_stage = LayoutOptions(1, [[model.cfg.text.num_layers]], [[model.cfg.vision.depth]], 0, 1, padded_vocab_size)
    return checked_layout(model, one_stage, prefix)


def vocab_rows(reader, model: BoundModel, layout: ParallelLayout) -> int:
    """The vocabulary rows the shards of ``layout`` hold (those of the spec's first vocabulary tensor in TP rank
    0 times the TP size; a torch_dist source's global rows), as ``padded_vocab_size``: 0 when they are the
    config's (or the tensor is not where the layout puts it: the shard check names that)."""
    from .formats.mm import shard_path, slot_name

    vocab = model.cfg.text.vocab_size
    for rule in model.spec.rules(model.cfg, layout.pp_size):
        pos = layout.first_position(rule.module) if rule.place == "first" else layout.last_position(rule.module)
        if not rule.vocab or rule.place == "layer" or pos is None:
            continue
        tp = 1 if reader.layout_free else layout.module_tp(rule.module)
        vpp_rank, pp_rank = layout.split_position(pos)
        path = shard_path(0, pp_rank, layout.pp_size, 0, layout.ep_size) if not reader.layout_free else \
            next(iter(reader.files()), "")
        have = reader.slots(path).get(slot_name(vpp_rank, layout.vpp_size), {}).get(rule.mm.format(i=0, e=0))
        if have is None or not have.dim():
            continue
        rows = have.shape[0] * tp
        return rows if rows > vocab else 0
    return 0


def shard_layout(reader, model: BoundModel, want: LayoutOptions, option: str, prefix: str) -> ParallelLayout:
    """The layout read off the shards, checked against the config; values given in ``want`` must match it.
    A torch_dist source has no layout of its own: it reads as tp 1, pp 1. Padded vocabulary rows (Megatron's
    ``make_vocab_size_divisible_by``) are read off the shards too."""
    if reader.layout_free:
        found = global_layout(model, option)
        return replace(found, padded_vocab_size=vocab_rows(reader, model, found))
    found = reader.infer_layout(model.spec.LAYER_PREFIXES, model.vit_tp_probe())
    found = replace(found, padded_vocab_size=vocab_rows(reader, model, found))
    if want.constrains:
        given = checked_layout(model, want.over(found), prefix)
        if (given.tp_size, given.llm_pp_layers, given.vit_pp_layers, given.effective_vit_tp, given.ep_size,
                given.padded_vocab_size) != (found.tp_size, found.llm_pp_layers, found.vit_pp_layers,
                                             found.effective_vit_tp, found.ep_size, found.padded_vocab_size):
            raise LayoutError(f"{prefix}: {given.describe()} does not match the shards in {reader.iter_dir}, "
                              f"which hold {found.describe()}")
    return checked_layout(model, LayoutOptions().over(found), option)


# ---- checks ----------------------------------------------------------------------------------------------
def _missing_tail(missing: list, model: BoundModel) -> str:
    t, v = model.cfg.text, model.cfg.vision
    return ((f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f"; expected by config.json ({t.num_layers} layers, vision depth {v.depth}"
            + (", tied embeddings" if t.tie_word_embeddings else "") + ")")


def _extra_tail(extra: list, spec: ModuleType) -> str:
    return ((f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + f"; it is not part of a {spec.NAME} model with this config.json")


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


# ---- DCP (MindSpeed-MM's FSDP2 checkpoint) ---------------------------------------------------------------
def dcp_key(spec: ModuleType, name: str) -> str:
    """The key of an HF tensor (legacy name) inside the model entry of a DCP checkpoint."""
    return spec.DCP_PREFIX + hf_format.from_legacy(name, spec.DCP_KEY_SCHEME, spec.KEY_SCHEMES)


def dcp_tensors(model: BoundModel, dtypes: dict) -> list[TargetTensor]:
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


def check_dcp_keys(reader: dcp_format.DCPReader, tensors: list[TargetTensor], model: BoundModel) -> list[str]:
    """The DCP checkpoint's model entry holds exactly ``tensors`` (keys and shapes), in one dtype; a tied
    model's copy of the embeddings as the output layer is allowed and skipped (returned as a note)."""
    where = reader.iter_dir / dist.DCP_METADATA
    have = reader.keys()
    slot = reader.slot
    want = {t.key: t for t in tensors}
    missing = [k for k in want if k not in have]
    if missing:
        raise CheckpointError(f"{where}: tensor {slot}.{missing[0]} is missing" + _missing_tail(missing, model))
    notes = []
    copy = getattr(model.spec, "DCP_TIED_COPY", None)
    skip = dcp_key(model.spec, copy) if copy and model.cfg.text.tie_word_embeddings else None
    extra = sorted(k for k in have if k not in want and k != skip)
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor {slot}.{extra[0]}" + _extra_tail(extra, model.spec))
    if skip in have:
        notes.append(f"skipped {slot}.{skip}: the output layer of a tied model, a copy of the embeddings")
    for k, tt in want.items():
        if tuple(have[k].shape) != tuple(tt.shape):
            raise CheckpointError(f"{where}: {slot}.{k} has shape {list(have[k].shape)}, config.json expects "
                                  f"{list(tt.shape)}")
    check_one_dtype((where, f"{slot}.{k}", have[k].dtype) for k in want)
    return notes
