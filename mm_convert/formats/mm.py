"""MindSpeed-MM / Megatron checkpoint directories (torch files per TP x PP rank).

    <mm_dir>/latest_checkpointed_iteration.txt   "release" or an iteration number
    <mm_dir>/release/ or iter_0005000/
        mp_rank_{tp:02d}/model_optim_rng.pt           (pp == 1)
        mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt  (pp > 1)
each a dict {"model": state_dict, "checkpoint_version": 3.0}; with virtual pipeline "model0", "model1", ...
Files are opened with ``weights_only=True`` and ``mmap=True``: nothing runs from the pickle, and tensors are
views of the mapped file, read from disk only when sliced and copied.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..errors import CheckpointError
from ..layout import ParallelLayout
from . import dist, safe_pickle
from .torch_stream import TensorSpec, _archive_name, _first_line, _write_archive, _ZipWriter

if TYPE_CHECKING:
    from ..plan import Ref

TRACKER = "latest_checkpointed_iteration.txt"
SHARD_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_SLOT = re.compile(r"^model(\d*)$")
EXPERTS = ".mlp.experts.local_experts."  # Megatron's MoE layer: experts numbered locally per EP rank


# ---- naming ----------------------------------------------------------------------------------------------
def shard_dir(tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0, ep_size: int = 1) -> str:
    """Megatron's names: ``mp_rank_TT``, ``_PPP`` when pp > 1, then ``_EEE`` when ep > 1."""
    name = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name if ep_size == 1 else f"{name}_{ep_rank:03d}"


def shard_path(tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0, ep_size: int = 1) -> str:
    return f"{shard_dir(tp_rank, pp_rank, pp_size, ep_rank, ep_size)}/{SHARD_FILE}"


def slot_name(vpp_rank: int, vpp_size: int) -> str:
    """The state dict of a virtual pipeline chunk inside a shard."""
    return "model" if vpp_size == 1 else f"model{vpp_rank}"


def iteration_dir_name(iteration: str | int) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def resolve_iteration_dir(mm_dir: str | os.PathLike, option: str = "--cfg.mm_dir") -> Path:
    """The directory holding mp_rank_* of an MM checkpoint, following latest_checkpointed_iteration.txt."""
    root = Path(mm_dir)
    if not root.is_dir():
        raise CheckpointError(f"{option} {root}: not a directory; expected an MM checkpoint directory")
    if any(_RANK_DIR.match(p.name) for p in root.iterdir()) or dist.is_dist_dir(root):
        return root  # given the iteration directory itself
    tracker = root / TRACKER
    if not tracker.is_file():
        raise CheckpointError(f"{tracker}: missing; expected 'release' or an iteration number, and the shards under it")
    text = tracker.read_text().strip()
    if text != "release" and not text.isdigit():
        raise CheckpointError(f"{tracker}: holds {text!r}; expected 'release' or an iteration number")
    it = root / iteration_dir_name(text)
    if not it.is_dir():
        raise CheckpointError(f"{tracker}: names iteration {text!r} but {it} does not exist")
    return it


def open_reader(mm_dir: str | os.PathLike, option: str = "--cfg.mm_dir"):
    """The reader of an MM checkpoint: its mp_rank_* shards (MMReader), or a torch_dist directory (DistReader)."""
    it = resolve_iteration_dir(mm_dir, option)
    return dist.DistReader(it) if dist.is_dist_dir(it) else MMReader(mm_dir, option)


class MMReader:
    """Lazy access to the shards of an MM checkpoint."""

    layout_free = False

    def __init__(self, mm_dir: str | os.PathLike, option: str = "--cfg.mm_dir"):
        self.iter_dir = resolve_iteration_dir(mm_dir, option)
        names = [m.groups() for p in self.iter_dir.iterdir() if (m := _RANK_DIR.match(p.name))]
        if not names:
            raise CheckpointError(f"{self.iter_dir}: no mp_rank_* directories")
        if len({sum(g is not None for g in n) for n in names}) > 1:
            raise CheckpointError(f"{self.iter_dir}: mp_rank_* directories of different forms "
                                  f"({', '.join(sorted('mp_rank_' + '_'.join(g for g in n if g) for n in names)[:4])})")
        self._loaded: dict[str, dict] = {}
        self._saved: dict[str, dict] = {}  # per shard: the training save's iteration and args, where present
        self.tp_size = max(int(n[0]) for n in names) + 1
        second = max((int(n[1]) for n in names if n[1] is not None), default=0) + 1
        third = max((int(n[2]) for n in names if n[2] is not None), default=0) + 1
        self.pp_size, self.ep_size = second, third
        if names[0][2] is None and second > 1 and self._expert_ranks():
            self.pp_size, self.ep_size = 1, second  # mp_rank_TT_EEE: expert parallel without a pipeline
        for t in range(self.tp_size):
            for p in range(self.pp_size):
                for e in range(self.ep_size):
                    rel = shard_path(t, p, self.pp_size, e, self.ep_size)
                    if not (self.iter_dir / rel).is_file():
                        raise CheckpointError(f"{self.iter_dir / rel}: missing; the checkpoint has tp={self.tp_size} "
                                              f"pp={self.pp_size}" + (f" ep={self.ep_size}" if self.ep_size > 1 else "")
                                              + " and needs a shard for every rank")

    def _expert_ranks(self) -> bool:
        """Whether ``mp_rank_00_000`` and ``mp_rank_00_001`` are two EP ranks (the same tensor names, experts
        numbered locally) rather than two pipeline stages (which never hold the same names)."""
        a, b = (self.slots(f"mp_rank_00_{k:03d}/{SHARD_FILE}") for k in (0, 1))
        keys = lambda slots: {(s, k) for s, sd in slots.items() for k in sd}  # noqa: E731
        return keys(a) == keys(b) and any(EXPERTS in k for _, k in keys(a))

    def shard_paths(self) -> list[str]:
        return [shard_path(t, p, self.pp_size, e, self.ep_size)
                for t in range(self.tp_size) for p in range(self.pp_size) for e in range(self.ep_size)]

    files = shard_paths  # the files read, relative to iter_dir

    def slots(self, rel: str) -> dict[str, dict[str, torch.Tensor]]:
        """{slot: state dict} of one shard, without ``_extra_state`` entries."""
        if rel not in self._loaded:
            path = self.iter_dir / rel
            obj = load_torch_file(path)
            if not isinstance(obj, dict):
                raise CheckpointError(f"{path}: expected a dict with a 'model' entry, got {type(obj).__name__}")
            slots = {}
            for k, v in obj.items():
                if isinstance(k, str) and _SLOT.match(k) and isinstance(v, dict):
                    slots[k] = {n: t for n, t in v.items() if not n.endswith("_extra_state")}
            if not slots:
                raise CheckpointError(f"{path}: no 'model' (or 'model0', ...) state dict inside")
            self._saved[rel] = {k: obj[k] for k in ("iteration", "args") if k in obj}
            for slot, sd in slots.items():
                for n, t in sd.items():
                    if not isinstance(t, torch.Tensor):
                        raise CheckpointError(f"{path}: {slot}.{n} is a {type(t).__name__}, expected a tensor")
            self._loaded[rel] = slots
        return self._loaded[rel]

    def training_state(self) -> dict:
        """What a training save carries besides the weights, as an output shard keeps it: ``iteration`` (int;
        from the first shard, else the directory name) and ``args`` (an argparse.Namespace of plain values);
        {} for a release checkpoint without them."""
        first = shard_path(0, 0, self.pp_size, 0, self.ep_size)
        self.slots(first)
        saved, out = self._saved[first], {}
        it = saved.get("iteration")
        if type(it) is not int and self.iter_dir.name.startswith("iter_") and self.iter_dir.name[5:].isdigit():
            it = int(self.iter_dir.name[5:])
        if type(it) is int:
            out["iteration"] = it
        args = saved.get("args")
        if isinstance(args, safe_pickle.SavedNamespace):
            out["args"] = args.to_namespace()
        return out

    def meta(self, ref: Ref) -> tuple[torch.dtype, tuple[int, ...]]:
        t = self._tensor(ref)
        return t.dtype, tuple(t.shape)

    def _tensor(self, ref: Ref) -> torch.Tensor:
        try:
            return self.slots(ref.file)[ref.slot][ref.key]
        except KeyError:
            raise CheckpointError(f"{self.iter_dir / ref.file}: no tensor {ref.slot}.{ref.key}")

    def read(self, ref: Ref, start=None, shape=None) -> torch.Tensor:
        t = self._tensor(ref)
        if start is None:
            return t
        return t[tuple(slice(s, s + n) for s, n in zip(start, shape))]

    def locate(self, ref: Ref) -> tuple[str, int, torch.dtype, tuple[int, ...]] | None:
        """(file path, offset of the first byte, dtype, shape) of a tensor's contiguous bytes in its shard,
        found from where the mmapped tensor lies in the file's mapping; None where that cannot be told
        (not mmapped, not contiguous), in which case callers read through ``read``."""
        t = self._tensor(ref)
        if not t.is_contiguous():
            return None
        path = os.path.realpath(self.iter_dir / ref.file)
        if t.numel() == 0:
            return path, 0, t.dtype, tuple(t.shape)
        addr = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
        offset = _file_offset(path, addr)
        if offset is None or offset + t.numel() * t.element_size() > os.path.getsize(path):
            return None
        return path, offset, t.dtype, tuple(t.shape)

    def infer_layout(self, layer_prefixes: dict[str, str], vit_probe: tuple[str, int] | None = None) -> ParallelLayout:
        """The layout the shards were written with, read off the layer indices present in tp (and ep) rank 0.
        ``layer_prefixes``: module -> name prefix of its layers (the spec's); ``vit_probe``: (name, rows at
        TP 1) of a vision tensor whose rows in a shard give the vision TP size."""
        layer = {m: re.compile("^" + re.escape(p) + r"(\d+)\.") for m, p in layer_prefixes.items()}
        path = lambda p: shard_path(0, p, self.pp_size, 0, self.ep_size)  # noqa: E731
        first = self.slots(path(0))
        vpp = len(first)
        counts = {m: [[0] * self.pp_size for _ in range(vpp)] for m in layer}
        vit_tp = 0
        for p in range(self.pp_size):
            rel = path(p)
            slots = self.slots(rel)
            if len(slots) != vpp:
                raise CheckpointError(f"{self.iter_dir / rel}: has {len(slots)} model chunks, {path(0)} has {vpp}")
            for v in range(vpp):
                sd = slots["model" if vpp == 1 else f"model{v}"] if ("model" in slots or vpp > 1) else None
                if sd is None:
                    raise CheckpointError(f"{self.iter_dir / rel}: expected slot 'model'")
                for m, rx in layer.items():
                    idx = {int(mt.group(1)) for k in sd if (mt := rx.match(k))}
                    if idx and idx != set(range(len(idx))):
                        raise CheckpointError(f"{self.iter_dir / rel}: {m} layer indices {sorted(idx)} are not 0..{len(idx) - 1}")
                    counts[m][v][p] = len(idx)
                probe = sd.get(vit_probe[0]) if vit_probe else None
                if probe is not None and probe.dim() and probe.shape[0]:
                    vit_tp = vit_probe[1] // probe.shape[0]
        if vit_tp == self.tp_size:
            vit_tp = 0
        return ParallelLayout(self.tp_size, tuple(map(tuple, counts["llm"])), tuple(map(tuple, counts["vit"])), vit_tp,
                              self.ep_size)


def _file_offset(path: str, addr: int) -> int | None:
    """Offset in ``path`` of the byte mapped at address ``addr`` of this process (from /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split(None, 5)
                if len(parts) < 6 or parts[5].rstrip("\n") != path:
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= addr < hi:
                    return int(parts[2], 16) + addr - lo
    except OSError:
        pass
    return None


def load_torch_file(path: Path):
    """A torch checkpoint file, tensors memory-mapped, through the safe unpickler (safe_pickle.py): training
    saves (Megatron args, numpy RNG state, BytesIO extra state) load; nothing named in the file is run.
    Errors name the file and what was wrong."""
    try:
        return safe_pickle.load(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing")
    except safe_pickle.UnsafeGlobal as e:
        raise CheckpointError(f"{path}: refused, its pickle names {e.dotted}, which is neither tensor data nor a "
                              f"data-only object known from training saves (nothing was run)")
    except Exception as e:
        msg = _first_line(str(e)) if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint, truncated or corrupt ({msg[:200]})")


# ---- writer ----------------------------------------------------------------------------------------------
def write_shard(fh, slots: dict[str, list[tuple[str, torch.dtype, tuple[int, ...]]]],
                produce: Callable[[str, int], torch.Tensor], extra: dict | None = None) -> None:
    """Write one model_optim_rng.pt into the open file ``fh`` (``fh.path``: its name) record by record;
    ``produce(slot, i)`` supplies tensor i of a slot just before its bytes are written, so one tensor is in
    memory at a time whatever the shard's size."""
    obj: dict = {}
    index: dict[tuple[str, str], int] = {}
    for slot, entries in slots.items():
        obj[slot] = {}
        for i, (name, dtype, shape) in enumerate(entries):
            obj[slot][name] = TensorSpec(dtype, tuple(shape), key=name)
            index[(slot, name)] = i
    obj["checkpoint_version"] = CHECKPOINT_VERSION
    if extra:
        obj.update(extra)
    try:
        _write_archive(_ZipWriter(fh, _archive_name(fh.path)), obj, lambda p, spec: produce(p[0], index[(p[0], p[1])]))
    except ValueError as e:
        raise CheckpointError(f"{fh.path}: {e}")


class ShardWriter:
    """Writes one planned MM shard; ``extra`` holds the entries a shard carries besides its model chunks
    (``iteration`` and ``args`` of a training save being resplit), the same in every shard."""

    zip_records = True  # torch's zip format stores a CRC-32 per record, computed while streaming

    def __init__(self, extra: dict | None = None):
        self.extra = extra or {}

    def write(self, fh, slots, produce) -> None:
        write_shard(fh, slots, produce, self.extra)

    def finish(self, it_dir: Path, planned) -> None:
        """Nothing beside the shards (the tracker is the checkpoint directory's)."""


def write_tracker(root: Path, iteration: str | int = "release") -> None:
    (root / TRACKER).write_text(f"{iteration}\n" if iteration != "release" else "release")
