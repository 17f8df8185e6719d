"""Runtime: this rank's pipeline positions loaded from its shard (pipeline.py), and a pipelined forward step
with KV cache. The step ends at the last LLM position, whose TP ranks all hold the full logits.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from mm_convert.layout import ParallelLayout

from .checkpoint import with_vocab_rows
from .config import ModelConfig
from .model import check_divisible
from .parallel import ParallelState, init_parallel
from .pipeline import forward_positions, load_stages


class Runtime:
    def __init__(self, cfg: ModelConfig, layout: ParallelLayout, mm_dir: str | os.PathLike,
                 ps: ParallelState | None = None):
        layout = with_vocab_rows(layout, cfg, mm_dir)  # a padded vocabulary, read off the shards
        check_divisible(cfg, layout)
        self.cfg, self.layout = cfg, layout
        # expert parallel: ep replicas of the pipeline run the same tokens, each with its own experts
        self.ps = ps or init_parallel(layout.tp_size, layout.pp_size, layout.vit_tp_size, layout.ep_size, layout.ep_size)
        self.last = layout.last_position("llm")
        self.cache: dict | None = None
        self.stages, _ = load_stages(cfg, layout, mm_dir, self.ps)
        for stage in self.stages.values():
            stage.eval()
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
        payload = forward_positions(self.ps, self.layout, self.last,
                                    lambda pos, payload: self.stages[pos](payload, batch, self.cache))
        return payload.get("logits") if self.owner(self.last) == self.ps.pp_rank else None

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
            if inputs.get("image_grid_thw") is not None:  # (image tiles of one size have no grid)
                batch["image_grid_thw"] = inputs["image_grid_thw"].cpu()
        return batch
