"""What inference and training share: this rank's pipeline positions built from its shard, and one forward
through the positions it owns.

Flat position ``pos`` runs on pp rank ``pos % pp_size`` (virtual chunk ``pos // pp_size``); activations go from
TP rank t of one position to TP rank t of the next.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from mm_convert.layout import ParallelLayout
from mm_convert.plan import slot_name

from .checkpoint import load_strict, read_shard, shard_path
from .config import ModelConfig
from .model import StageModel
from .parallel import ParallelState, recv_tensors, send_tensors


def load_stages(cfg: ModelConfig, layout: ParallelLayout, mm_dir: str | os.PathLike, ps: ParallelState,
                prepare: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> tuple[dict[int, StageModel], torch.dtype]:
    """This rank's positions, each built on the meta device and loaded strictly from its own shard file (the only
    file it opens), on ``ps.device``; ``prepare`` maps each loaded tensor first (training: an fp32 copy). Returns
    the stages and the checkpoint's floating-point dtype."""
    path = shard_path(mm_dir, ps.tp_rank, ps.pp_rank, layout.pp_size, ps.ep_rank, layout.ep_size)
    states = read_shard(path, layout.vpp_size)
    dtype = next((t.dtype for st in states for t in st.values() if t.is_floating_point()), torch.float32)
    stages = {}
    for v, state in enumerate(states):
        pos = layout.position(v, ps.pp_rank)
        with torch.device("meta"):
            stage = StageModel(cfg, layout, pos, ps)
        if prepare is not None:
            state = {k: prepare(t) for k, t in state.items()}
        load_strict(stage, state, f"{path} [{slot_name(v, layout.vpp_size)}]")
        stages[pos] = stage.to(ps.device)
    return stages, dtype


def forward_positions(ps: ParallelState, layout: ParallelLayout, last: int,
                      run: Callable[[int, dict], dict]) -> dict:
    """One forward through positions 0..``last``: for each position this rank owns, receive the previous stage's
    payload (when another rank ran it), ``run(pos, payload)``, and send the result on (when another rank runs the
    next). Every rank walks the positions in the same order, so the blocking sends and receives pair up. Returns
    the payload of this rank's last position ({} when it owns none)."""
    pp, me = layout.pp_size, ps.pp_rank
    payload: dict = {}
    for pos in range(last + 1):
        if pos % pp != me:
            continue
        if pos > 0 and (pos - 1) % pp != me:
            payload = recv_tensors(ps.global_rank(ps.tp_rank, (pos - 1) % pp), ps.device)
        payload = run(pos, payload)
        if pos < last and (pos + 1) % pp != me:
            send_tensors(payload, ps.global_rank(ps.tp_rank, (pos + 1) % pp), ps.device)
    return payload
