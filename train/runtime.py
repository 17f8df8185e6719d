"""Runtime: this rank's pipeline positions loaded from its shard, and a pipelined forward step with KV cache.

Flat position ``pos`` runs on pp rank ``pos % pp_size`` (virtual chunk ``pos // pp_size``); activations go from
TP rank t of one position to TP rank t of the next. The step ends at the last LLM position, whose TP ranks
all hold the full logits.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from mm_convert.layout import ParallelLayout
from mm_convert.plan import slot_name

from .checkpoint import load_strict, read_shard, shard_path
from .config import ModelConfig
from .model import StageModel, check_divisible
from .parallel import ParallelState, init_parallel, recv_tensors, send_tensors


class Runtime:
    def __init__(self, cfg: ModelConfig, layout: ParallelLayout, mm_dir: str | os.PathLike,
                 ps: ParallelState | None = None):
        check_divisible(cfg, layout)
        self.cfg, self.layout = cfg, layout
        # expert parallel: ep replicas of the pipeline run the same tokens, each with its own experts
        self.ps = ps or init_parallel(layout.tp_size, layout.pp_size, layout.vit_tp_size, layout.ep_size, layout.ep_size)
        self.last = layout.last_position("llm")
        self.cache: dict | None = None
        path = shard_path(mm_dir, self.ps.tp_rank, self.ps.pp_rank, layout.pp_size, self.ps.ep_rank, layout.ep_size)
        states = read_shard(path, layout.vpp_size)  # only this rank's own file is opened
        self.stages = {}
        for v, state in enumerate(states):
            pos = layout.position(v, self.ps.pp_rank)
            with torch.device("meta"):
                stage = StageModel(cfg, layout, pos, self.ps)
            load_strict(stage, state, f"{path} [{slot_name(v, layout.vpp_size)}]")
            self.stages[pos] = stage.to(self.ps.device).eval()
        dist.barrier()  # a rank that failed to load stops here everyone else, not a later recv

    def owner(self, pos: int) -> int:
        return pos % self.layout.pp_size

    @property
    def sampler_rank(self) -> int:
        """The global rank that picks tokens: TP rank 0 of the last LLM position (of EP replica 0)."""
        return self.owner(self.last) * self.layout.tp_size

    def reset_cache(self, use_cache: bool = True) -> None:
        self.cache = {} if use_cache else None

    @torch.inference_mode()
    def step(self, batch: dict) -> torch.Tensor | None:
        """One forward over all positions. batch: input_ids (1, S), position_ids (3, 1, S), and for a prefill
        with an image pixel_values and image_grid_thw. Returns logits (1, S, vocab) on the last LLM stage's
        ranks, None elsewhere."""
        me, ps = self.ps.pp_rank, self.ps
        payload: dict = {}
        for pos in range(self.last + 1):
            if self.owner(pos) != me:
                continue
            if pos > 0 and self.owner(pos - 1) != me:
                payload = recv_tensors(ps.global_rank(ps.tp_rank, self.owner(pos - 1)), ps.device)
            payload = self.stages[pos](payload, batch, self.cache)
            if pos < self.last and self.owner(pos + 1) != me:
                send_tensors(payload, ps.global_rank(ps.tp_rank, self.owner(pos + 1)), ps.device)
        return payload.get("logits") if self.owner(self.last) == me else None

    def broadcast_token(self, token: int | None) -> int:
        t = torch.tensor([-1 if token is None else token], dtype=torch.long, device=self.ps.device)
        dist.broadcast(t, self.sampler_rank)
        return int(t.item())

    def to_device(self, inputs: dict) -> dict:
        """The batch of a prefill step from ``train.inputs.build_inputs`` output."""
        dev = self.ps.device
        batch = {"input_ids": inputs["input_ids"].to(dev), "position_ids": inputs["position_ids"].to(dev)}
        if inputs.get("pixel_values") is not None:
            batch["pixel_values"] = inputs["pixel_values"].to(dev)
            batch["image_grid_thw"] = inputs["image_grid_thw"].cpu()
        return batch
