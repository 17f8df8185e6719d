"""Strictly loading this rank's own shard of an MM checkpoint (paths and file reading are the converter's)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from mm_convert.errors import CheckpointError
from mm_convert.formats.mm import load_torch_file, resolve_iteration_dir
from mm_convert.plan import shard_path as relative_shard_path
from mm_convert.plan import slot_name


def shard_path(mm_dir: str | os.PathLike, tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0,
               ep_size: int = 1) -> Path:
    """``<mm_dir>/<release|iter_NNNNNNN>/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`` (PP suffix when pp > 1,
    EP suffix when ep > 1)."""
    path = resolve_iteration_dir(mm_dir) / relative_shard_path(tp_rank, pp_rank, pp_size, ep_rank, ep_size)
    if not path.exists():
        raise CheckpointError(f"{path}: missing shard for tp rank {tp_rank}, pp rank {pp_rank}"
                              + (f", ep rank {ep_rank}" if ep_size > 1 else ""))
    return path


def read_shard(path: Path, vpp_size: int) -> list[dict[str, torch.Tensor]]:
    """The state dict of each virtual chunk (``model``, or ``model0``, ``model1``... with VPP), without
    Megatron's ``_extra_state`` entries. Tensors stay memory-mapped."""
    obj = load_torch_file(path)
    out = []
    for v in range(vpp_size):
        key = slot_name(v, vpp_size)
        if not isinstance(obj, dict) or not isinstance(obj.get(key), dict):
            have = sorted(k for k in obj if k.startswith("model")) if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"{path}: no {key!r} state dict (found {have}) for a layout with vpp={vpp_size}")
        out.append({k: t for k, t in obj[key].items() if not k.endswith("_extra_state")})
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


def with_vocab_rows(layout, cfg, mm_dir: str | os.PathLike):
    """``layout`` with the padded vocabulary rows (Megatron's ``make_vocab_size_divisible_by``) its shards hold,
    read off the embedding of TP rank 0 at the first LLM position, when the layout does not say them."""
    from dataclasses import replace

    from mm_convert.plan import slot_name as chunk

    from .config import spec_of

    pos = layout.first_position("llm")
    if layout.padded_vocab_size or pos is None:
        return layout
    vpp_rank, pp_rank = layout.split_position(pos)
    path = shard_path(mm_dir, 0, pp_rank, layout.pp_size, 0, layout.ep_size)
    obj = load_torch_file(path)
    table = obj.get(chunk(vpp_rank, layout.vpp_size), {}).get(spec_of(cfg).TIED_PAIR[0]) if isinstance(obj, dict) else None
    rows = table.shape[0] * layout.tp_size if isinstance(table, torch.Tensor) and table.dim() else 0
    return replace(layout, padded_vocab_size=rows) if rows > cfg.text.vocab_size else layout
