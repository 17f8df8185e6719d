"""Micro-batches from encoded samples: right-padded to the longest sample of the micro-batch only (causal
attention means real tokens never see the padding, whose labels are -100), mrope positions per sample."""
from __future__ import annotations

import torch

from .config import ModelConfig
from .data import IGNORE
from .positions import mrope_positions


def collate(samples: list[dict], cfg: ModelConfig, pad_id: int = 0) -> dict:
    """samples: ``train.data.encode`` outputs. Returns input_ids / labels (B, S), position_ids (3, B, S) and,
    when any sample has images, pixel_values (all patches in sample order) and image_grid_thw."""
    n = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), n), IGNORE, dtype=torch.long)
    pos = torch.zeros((3, len(samples), n), dtype=torch.long)
    pixels, grids = [], []
    for b, s in enumerate(samples):
        k = len(s["input_ids"])
        ids[b, :k], labels[b, :k] = s["input_ids"], s["labels"]
        p, _ = mrope_positions(s["input_ids"][None], s.get("image_grid_thw"), cfg.image_token_id,
                               cfg.vision.spatial_merge_size)
        pos[:, b, :k] = p[:, 0]
        pos[:, b, k:] = p[:, 0, -1:] + torch.arange(1, n - k + 1)  # padding continues the positions
        if s.get("pixel_values") is not None:
            pixels.append(s["pixel_values"])
            grids.append(s["image_grid_thw"])
    out = {"input_ids": ids, "labels": labels, "position_ids": pos}
    if pixels:
        out.update(pixel_values=torch.cat(pixels), image_grid_thw=torch.cat(grids))
    return out


def to_device(batch: dict, device) -> dict:
    return {k: (v if k == "image_grid_thw" else v.to(device)) for k, v in batch.items()}


def label_tokens(batch: dict) -> int:
    """Tokens the loss counts (labels shifted by one, as the loss sees them)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def pad_to(batch: dict, length: int | None, pad_id: int = 0) -> dict:
    """Right-pad a micro-batch to ``length`` tokens (Megatron's fixed pipeline shapes without
    --variable-seq-lengths): padding ids, -100 labels, positions continuing; None or shorter: unchanged."""
    n = batch["input_ids"].shape[1]
    if length is None or length <= n:
        return batch
    extra = length - n
    out = dict(batch)
    out["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, extra), value=pad_id)
    out["labels"] = torch.nn.functional.pad(batch["labels"], (0, extra), value=IGNORE)
    pos = batch["position_ids"]
    out["position_ids"] = torch.cat([pos, pos[..., -1:] + torch.arange(1, extra + 1)], dim=-1)
    return out

