"""Plans: which target tensor each output file holds and from which boxes of which source tensors.

A plan is plain data, built with no I/O beyond reading tensor shapes: it can be printed (``plan`` command),
checked (every target element covered exactly once) and split among workers before a byte moves.

Every transform of this tool (rename, TP split along dim 0 or 1, GLU split, QKV interleave, concat) is a
list of ``Piece``s: copy the box ``src_start + shape`` of a source tensor to ``dst_start`` of the target. A
piece whose source is ``ZEROS`` fills its box with zeros (the padded rows of a vocabulary, Megatron's
``make_vocab_size_divisible_by``): it reads nothing, and inverting a plan drops it.
HF -> MM plans come from a model's ``Rule``s; MM -> HF is the inverse of the HF -> MM plan of the source
layout; MM -> MM (resplit) composes the target's HF -> MM plan with the source's inverse.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Callable, Iterable

import torch

from .errors import CheckpointError, LayoutError
from .formats.mm import shard_path, slot_name  # the format names the shards and chunks
from .layout import ParallelLayout

HF = ""  # Ref.file of a tensor of the HF checkpoint (its reader knows which .safetensors holds it)
ZEROS = "<zeros>"  # Ref.file of a zero fill (vocabulary padding); its key names the tensor it pads


@dataclass(frozen=True)
class Rule:
    """One MM tensor of a model family, declared.

    mm:     MM name; ``{i}`` is the layer index local to the pipeline position.
    hf:     HF tensor name(s) (legacy scheme); ``{i}`` is the global layer index.
    module: "vit" or "llm" (which layer list and TP size apply).
    place:  "layer" (one per layer), "first" / "last" (at the position of the module's first / last layer).
    tp:     "replicate", "split_dim0" (each fused part cut in tp contiguous chunks, so gate/up gives the GLU
            split [gate_r; up_r]) or "split_dim1".
    fuse:   how the HF tensors stack along dim 0: ("concat",) one part per HF tensor;
            ("qkv_groups", kv_heads, heads_per_group) GQA interleave of q, k, v per query group;
            ("qkv_heads", heads) per-head [q_h; k_h; v_h] from one fused [q; k; v] tensor.
    copy:   the HF tensor is also placed elsewhere (tied output layer); the inverse ignores this copy.
    layers: the global layer indices the rule applies to (None: every layer), e.g. a MoE model's sparse layers.
    experts: for one tensor per expert: the number of experts; ``{e}`` in ``mm`` is the expert index local to
            the EP rank, in ``hf`` the global one (expert parallelism splits experts evenly over EP ranks).
    vocab:  the rows are the vocabulary (embedding, output layer): with a padded layout the MM tensor has
            ``padded_vocab_size`` rows, those after the HF tensor's zero (TP splits the padded rows evenly).
    """
    mm: str
    hf: tuple[str, ...]
    module: str
    place: str
    tp: str = "replicate"
    fuse: tuple = ("concat",)
    copy: bool = False
    layers: frozenset | None = None
    experts: int = 0
    vocab: bool = False


@dataclass(frozen=True)
class View:
    """A 2-D HF tensor that rules can name but the checkpoint stores inside a larger one (fused 3-D expert
    tensors): ``view[r, c]`` is ``real[lead..., start[0] + c, start[1] + r]`` when transposed, else
    ``real[lead..., start[0] + r, start[1] + c]``."""
    real: str
    lead: tuple[int, ...]
    shape: tuple[int, int]
    transpose: bool = False
    start: tuple[int, int] = (0, 0)

    def lower(self, piece: "Piece") -> "Piece":
        """A piece reading this view, as a piece reading the real tensor."""
        r, c = piece.src_start
        real = (c + self.start[0], r + self.start[1]) if self.transpose else (r + self.start[0], c + self.start[1])
        return Piece(Ref(piece.src.file, piece.src.slot, self.real), self.lead + real, piece.dst_start, piece.shape,
                     self.transpose ^ piece.transpose)


@dataclass(frozen=True)
class Ref:
    file: str  # HF for the HF checkpoint, else an MM shard path relative to the iteration directory
    slot: str  # "" for HF; "model" or "model0", "model1", ... (virtual pipeline chunks) for MM
    key: str


@dataclass(frozen=True)
class Piece:
    """Copy a box of ``src`` to ``dst_start`` of the target; ``shape`` is the box in target coordinates.
    ``transpose``: the box's last two axes are swapped between source and target, and the two may differ in
    rank by leading axes of size 1 (an expert's 2-D weight inside a fused 3-D HF tensor)."""
    src: Ref
    src_start: tuple[int, ...]
    dst_start: tuple[int, ...]
    shape: tuple[int, ...]
    transpose: bool = False

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def zero(self) -> bool:
        """A zero fill (reads nothing)."""
        return self.src.file == ZEROS

    @property
    def reshaped(self) -> bool:
        """Source and target boxes differ in layout (transposed, or ranks apart): not a plain box copy."""
        return self.transpose or len(self.src_start) != len(self.dst_start)

    @property
    def src_shape(self) -> tuple[int, ...]:
        return to_src(self.shape, len(self.src_start), self.transpose, 1)


def to_src(vec, src_rank: int, transpose: bool, fill: int) -> tuple[int, ...]:
    """An offset (fill 0) or size (fill 1) in a piece's target coordinates, in its source coordinates."""
    v = list(vec)
    v = [fill] * (src_rank - len(v)) + v if src_rank >= len(v) else v[len(v) - src_rank:]
    if transpose:
        v[-2], v[-1] = v[-1], v[-2]
    return tuple(v)


def to_dst(vec, dst_rank: int, transpose: bool, fill: int) -> tuple[int, ...]:
    """Inverse of ``to_src``."""
    v = list(vec)
    if transpose:
        v[-2], v[-1] = v[-1], v[-2]
    return tuple([fill] * (dst_rank - len(v)) + v if dst_rank >= len(v) else v[len(v) - dst_rank:])


@dataclass
class TargetTensor:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    pieces: list[Piece]
    copy: bool = False  # a duplicate of a tensor stored elsewhere (tied output layer)

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * (self.dtype.itemsize if self.dtype is not None else 0)


@dataclass
class OutputFile:
    path: str  # relative to the output root
    slots: dict[str, list[TargetTensor]]
    info: dict = field(default_factory=dict)

    @property
    def tensors(self) -> Iterable[TargetTensor]:
        for ts in self.slots.values():
            yield from ts

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


# ---- HF -> MM -------------------------------------------------------------------------------------------
def _parts(rule: Rule, names: list[str], shapes: dict) -> list[list[tuple[str, int, int]]]:
    """Row blocks (name, first row, rows) of each fused part, in MM order."""
    kind = rule.fuse[0]
    if kind == "concat":
        return [[(n, 0, shapes[n][0])] for n in names]
    if kind == "qkv_groups":
        groups, per = rule.fuse[1], rule.fuse[2]
        q, k, v = names
        d = shapes[k][0] // groups
        return [[b for g in range(groups) for b in ((q, g * per * d, per * d), (k, g * d, d), (v, g * d, d))]]
    if kind == "qkv_heads":
        heads = rule.fuse[1]
        (qkv,) = names
        d = shapes[qkv][0] // (3 * heads)
        return [[(qkv, j * heads * d + h * d, d) for h in range(heads) for j in range(3)]]
    raise ValueError(f"unknown fuse {rule.fuse!r} in rule {rule.mm}")


def rule_pieces(rule: Rule, names: list[str], shapes: dict, tp: int, rank: int,
                padded_rows: int = 0) -> tuple[tuple[int, ...], list[Piece]]:
    """Shape and pieces of TP rank ``rank``'s part of one MM tensor. ``padded_rows``: a vocabulary rule's rows
    (more than the HF tensor's: the rest are zero pieces); 0: the HF tensor's."""
    trailing = tuple(shapes[names[0]][1:])
    for n in names[1:]:
        if tuple(shapes[n][1:]) != trailing:
            raise CheckpointError(f"{n}: shape {tuple(shapes[n])} does not stack with {names[0]} {tuple(shapes[names[0]])}")
    zeros = (0,) * len(trailing)
    if rule.tp == "split_dim1":
        (name,) = names
        rows, cols = shapes[name][0], trailing[0]
        if cols % tp:
            raise LayoutError(f"tp size {tp} does not divide dim 1 ({cols}) of {name}")
        c = cols // tp
        shape = (rows, c) + trailing[1:]
        return shape, [Piece(Ref(HF, "", name), (0, rank * c) + zeros[1:], (0,) * len(shape), shape)]
    pieces: list[Piece] = []
    out = 0
    parts = _parts(rule, names, shapes)
    real = sum(n for _, _, n in parts[0]) if parts else 0
    pad = padded_rows - real if rule.vocab and len(parts) == 1 and padded_rows > real else 0
    for part in parts:
        total = sum(n for _, _, n in part) + pad
        if rule.tp == "replicate":
            lo, hi = 0, total
        else:
            if total % tp:
                raise LayoutError(f"tp size {tp} does not divide dim 0 ({total}) of {part[0][0]}")
            lo, hi = rank * total // tp, (rank + 1) * total // tp
        at = 0
        for name, start, rows in part:
            a, b = max(lo, at), min(hi, at + rows)
            if a < b:
                prev = pieces[-1] if pieces else None
                src_row = start + a - at
                if prev and prev.src == Ref(HF, "", name) and prev.src_start[0] + prev.shape[0] == src_row:
                    pieces[-1] = Piece(prev.src, prev.src_start, prev.dst_start, (prev.shape[0] + b - a,) + trailing)
                else:
                    pieces.append(Piece(Ref(HF, "", name), (src_row,) + zeros, (out,) + zeros, (b - a,) + trailing))
                out += b - a
            at += rows
        if pad and max(lo, at) < hi:  # the padded rows of this rank: zeros
            n = hi - max(lo, at)
            pieces.append(Piece(Ref(ZEROS, "", part[0][0]), (0,) + zeros, (out,) + zeros, (n,) + trailing))
            out += n
    return (out,) + trailing, pieces


def hf_to_mm_plan(rules: list[Rule], layout: ParallelLayout, shapes: dict, dtypes: dict,
                  views: dict[str, View] | None = None) -> list[OutputFile]:
    """The MM shard files of ``layout``, each tensor made of pieces of HF tensors. ``shapes`` / ``dtypes``:
    the checkpoint's tensors; ``views``: the 2-D tensors rules name inside them (pieces are lowered to the
    real tensors)."""
    views = views or {}
    shapes = {**shapes, **{n: v.shape for n, v in views.items()}}
    dtypes = {**dtypes, **{n: dtypes.get(v.real) for n, v in views.items()}}
    files = []
    for tp_rank in range(layout.tp_size):
        for pp_rank in range(layout.pp_size):
            for ep_rank in range(layout.ep_size):
                slots = {}
                for vpp_rank in range(layout.vpp_size):
                    pos = layout.position(vpp_rank, pp_rank)
                    slots[slot_name(vpp_rank, layout.vpp_size)] = _position_tensors(
                        rules, layout, pos, tp_rank, ep_rank, shapes, dtypes, views)
                files.append(OutputFile(shard_path(tp_rank, pp_rank, layout.pp_size, ep_rank, layout.ep_size), slots,
                                        {"tp_rank": tp_rank, "pp_rank": pp_rank, "ep_rank": ep_rank}))
    return files


def _position_tensors(rules, layout, pos, tp_rank, ep_rank, shapes, dtypes, views) -> list[TargetTensor]:
    out = []

    def add(rule, local, global_, expert=0, global_expert=0):
        names = [h.format(i=global_, e=global_expert) for h in rule.hf]
        mm = rule.mm.format(i=local, e=expert)
        module_tp = layout.module_tp(rule.module)
        shape, pieces = rule_pieces(rule, names, shapes, module_tp, layout.module_tp_rank(rule.module, tp_rank),
                                    layout.padded_vocab_size if rule.vocab else 0)
        kinds = {dtypes[n] for n in names}
        if len(kinds) > 1:
            raise CheckpointError(f"{', '.join(names)}: mixed dtypes {sorted(map(str, kinds))} cannot be fused into "
                                  f"{mm}; expected one dtype")
        pieces = [views[p.src.key].lower(p) if p.src.key in views else p for p in pieces]
        out.append(TargetTensor(mm, shape, kinds.pop(), pieces, rule.copy))

    def add_layer(rule, local, g):
        if rule.layers is not None and g not in rule.layers:
            return
        if not rule.experts:
            return add(rule, local, g)
        per = rule.experts // layout.ep_size
        for e in range(per):
            add(rule, local, g, e, ep_rank * per + e)

    for module in ("vit", "llm"):
        mod_rules = [r for r in rules if r.module == module]
        if pos == layout.first_position(module):
            for r in mod_rules:
                if r.place == "first":
                    add(r, 0, 0)
        for local, g in enumerate(layout.layer_range(module, pos)):
            for r in mod_rules:
                if r.place == "layer":
                    add_layer(r, local, g)
        if pos == layout.last_position(module):
            for r in mod_rules:
                if r.place == "last":
                    add(r, 0, 0)
    return out


# ---- inverse and composition -----------------------------------------------------------------------------
def invert(mm_files: list[OutputFile], shapes: dict) -> dict[str, list[Piece]]:
    """For each HF tensor, pieces of MM tensors that cover it exactly once (the first copy of a replicated
    tensor wins; tied output-layer copies are skipped). Raises if some element is not covered."""
    inv: dict[str, list[Piece]] = {n: [] for n in shapes}
    seen: dict[str, set] = {n: set() for n in shapes}
    for f in mm_files:
        for slot, tensors in f.slots.items():
            for t in tensors:
                if t.copy:
                    continue
                for p in t.pieces:
                    if p.zero:  # padding: no HF element comes from it
                        continue
                    box = (p.src_start, p.src_shape)
                    if box in seen[p.src.key]:
                        continue
                    seen[p.src.key].add(box)
                    inv[p.src.key].append(Piece(Ref(f.path, slot, t.key), p.dst_start, p.src_start, p.src_shape,
                                                p.transpose))
    for name, pieces in inv.items():
        covered = sum(p.numel for p in pieces)
        if covered != prod(shapes[name]):
            raise LayoutError(f"the layout does not cover {name} exactly once ({covered} of {prod(shapes[name])} elements)")
    return inv


def compose(target: list[OutputFile], inverse: dict[str, list[Piece]]) -> list[OutputFile]:
    """Rewrite pieces that read HF tensors into pieces that read the MM tensors covering them."""
    out = []
    for f in target:
        slots = {}
        for slot, tensors in f.slots.items():
            new = []
            for t in tensors:
                pieces = []
                for p in t.pieces:
                    if p.zero:  # padding stays padding
                        pieces.append(p)
                        continue
                    pss = p.src_shape
                    for q in inverse[p.src.key]:  # both boxes in the HF tensor's coordinates
                        lo = tuple(max(a, b) for a, b in zip(p.src_start, q.dst_start))
                        hi = tuple(min(a + n, b + m) for a, n, b, m in zip(p.src_start, pss, q.dst_start, q.shape))
                        if any(l >= h for l, h in zip(lo, hi)):
                            continue
                        size = tuple(h - l for l, h in zip(lo, hi))
                        at_q = to_src(tuple(l - d for l, d in zip(lo, q.dst_start)), len(q.src_start), q.transpose, 0)
                        at_p = to_dst(tuple(l - s for l, s in zip(lo, p.src_start)), len(p.dst_start), p.transpose, 0)
                        pieces.append(Piece(q.src, tuple(a + b for a, b in zip(q.src_start, at_q)),
                                            tuple(a + b for a, b in zip(p.dst_start, at_p)),
                                            to_dst(size, len(p.dst_start), p.transpose, 1), p.transpose ^ q.transpose))
                new.append(TargetTensor(t.key, t.shape, t.dtype, pieces, t.copy))
            slots[slot] = new
        out.append(OutputFile(f.path, slots, dict(f.info)))
    return out


# ---- MM -> HF files --------------------------------------------------------------------------------------
def hf_files_plan(inverse: dict[str, list[Piece]], shapes: dict, dtype_of: Callable[[Ref], torch.dtype],
                  rename: Callable[[str], str], max_shard_bytes: int) -> list[OutputFile]:
    """HF tensors in ``shapes`` order, cut into safetensors files of at most ``max_shard_bytes`` (a tensor
    larger than the limit gets a file of its own). As few files as a greedy cut gives, but balanced: the cut
    uses the smallest per-file limit that needs no more files, so parallel workers get even shares (a greedy
    cut of 7.5 GB at 5 GB leaves one worker 5 GB and the other 2.5)."""
    tensors = []
    for name, shape in shapes.items():
        pieces = inverse[name]
        kinds = {dtype_of(p.src) for p in pieces}
        if len(kinds) > 1:
            raise CheckpointError(f"{name}: its MM pieces have mixed dtypes {sorted(map(str, kinds))}; expected one dtype")
        tensors.append(TargetTensor(rename(name), tuple(shape), kinds.pop(), pieces))

    def cut(limit: int) -> list[list[TargetTensor]]:
        return greedy_cut(tensors, limit)

    n = len(cut(max_shard_bytes))
    lo, hi = max([t.nbytes for t in tensors] + [-(-sum(t.nbytes for t in tensors) // n)]), max_shard_bytes
    while lo < hi:  # the smallest limit that still gives n files (greedy file count falls as the limit grows)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(cut(mid)) <= n else (mid + 1, hi)
    groups = cut(min(lo, max_shard_bytes))  # lo > max_shard_bytes only when one tensor alone exceeds it
    n = len(groups)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return [OutputFile(fname, {"": g}) for fname, g in zip(names, groups)]


def greedy_cut(tensors: list[TargetTensor], limit: int) -> list[list[TargetTensor]]:
    """Tensors in order, cut into groups of at most ``limit`` bytes (a larger tensor gets a group of its own)."""
    groups: list[list[TargetTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    return groups


def cut_files(tensors: list[TargetTensor], slot: str, limit: int, name: Callable[[int], str],
              first_info: dict | None = None) -> list[OutputFile]:
    """Tensors in order as files ``name(k)`` of at most ``limit`` bytes each (torch_dist / DCP record files); the
    cut depends on the tensors only, so the output does not depend on the number of writers. ``first_info``:
    the first file's ``info``."""
    return [OutputFile(name(k), {slot: ts}, dict(first_info or {}) if k == 0 else {})
            for k, ts in enumerate(greedy_cut(tensors, limit))]


def check_coverage(files: list[OutputFile]) -> None:
    """Every target element is written by exactly one piece (the pieces tile each target)."""
    for f in files:
        for t in f.tensors:
            if sum(p.numel for p in t.pieces) != prod(t.shape):
                raise LayoutError(f"{f.path}: {t.key} is not tiled by its pieces")
            for p in t.pieces:
                if any(d < 0 or d + n > s for d, n, s in zip(p.dst_start, p.shape, t.shape)):
                    raise LayoutError(f"{f.path}: a piece of {t.key} falls outside the tensor")
