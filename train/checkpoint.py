"""Finding and strictly loading this rank's own shard of an MM checkpoint."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from mm_convert.errors import CheckpointError


def shard_path(mm_dir: str | os.PathLike, tp_rank: int, pp_rank: int, pp_size: int) -> Path:
    """``<mm_dir>/<release|iter_NNNNNNN>/mp_rank_TT[_PPP]/model_optim_rng.pt`` (the PP suffix only when pp > 1)."""
    mm_dir = Path(mm_dir)
    tracker = mm_dir / "latest_checkpointed_iteration.txt"
    if not tracker.exists():
        raise CheckpointError(f"{tracker}: missing (not an MM checkpoint directory?)")
    it = tracker.read_text().strip()
    if it == "release":
        sub = "release"
    elif it.isdigit():
        sub = f"iter_{int(it):07d}"
    else:
        raise CheckpointError(f"{tracker}: expected 'release' or an iteration number, got {it!r}")
    name = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    path = mm_dir / sub / name / "model_optim_rng.pt"
    if not path.exists():
        raise CheckpointError(f"{path}: missing shard for tp rank {tp_rank}, pp rank {pp_rank}")
    return path


def read_shard(path: Path, vpp_size: int) -> list[dict[str, torch.Tensor]]:
    """The state dict of each virtual chunk (``model``, or ``model0``, ``model1``... with VPP), without
    Megatron's ``_extra_state`` entries."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a corrupt zip, a pickle with non-tensor objects...
        raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {e})") from None
    keys = ["model"] if vpp_size == 1 else [f"model{v}" for v in range(vpp_size)]
    out = []
    for key in keys:
        if not isinstance(obj, dict) or key not in obj:
            have = sorted(k for k in obj if k.startswith("model")) if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"{path}: no {key!r} state dict (found {have}) for a layout with vpp={vpp_size}")
        out.append({k: v for k, v in obj[key].items() if not k.endswith("_extra_state")})
    return out


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into a module built on the meta device; every name and shape must match exactly."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    problems = [f"missing parameter {k} (expected shape {list(expected[k])})" for k in missing]
    problems += [f"unexpected parameter {k}" for k in unexpected]
    for k in sorted(expected.keys() & state.keys()):
        v = state[k]
        if not isinstance(v, torch.Tensor):
            problems.append(f"parameter {k} is a {type(v).__name__}, not a tensor")
        elif tuple(v.shape) != expected[k]:
            problems.append(f"parameter {k} has shape {list(v.shape)}, expected {list(expected[k])}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{where}: " + "; ".join(problems[:5]) + more)
    module.load_state_dict(state, strict=True, assign=True)
