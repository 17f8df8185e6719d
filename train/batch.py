"""Micro-batches from encoded samples, mrope positions per sample. Padded (``collate``): right-padded to the
longest sample of the micro-batch only (causal attention means real tokens never see the padding, whose labels
are -100). Packed (``collate_packed``, ``--packed-sequences``): the samples back to back in one row without
padding, their bounds in ``cu_seqlens`` (attention stays inside each sample) and positions restarting with each
sample, as MindSpeed-MM's ``use_remove_padding``; loss and gradients equal the padded batch's."""
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


def collate_packed(samples: list[dict], cfg: ModelConfig, pad_id: int = 0) -> dict:
    """The samples concatenated: input_ids / labels (1, T), position_ids (3, 1, T) (each sample's own mrope
    positions), cu_seqlens (int32, [0, end_1, ..., T]) and, with images, pixel_values / image_grid_thw as
    ``collate``. The first token of every sample has label -100: the token before it (the previous sample's last)
    must not learn to predict it, exactly as no row of a padded batch predicts its first token."""
    ids, labels, pos, pixels, grids, cu = [], [], [], [], [], [0]
    for s in samples:
        k = len(s["input_ids"])
        ids.append(torch.as_tensor(s["input_ids"], dtype=torch.long))
        lab = torch.as_tensor(s["labels"], dtype=torch.long).clone()
        lab[0] = IGNORE
        labels.append(lab)
        p, _ = mrope_positions(ids[-1][None], s.get("image_grid_thw"), cfg.image_token_id,
                               cfg.vision.spatial_merge_size)
        pos.append(p)
        cu.append(cu[-1] + k)
        if s.get("pixel_values") is not None:
            pixels.append(s["pixel_values"])
            grids.append(s["image_grid_thw"])
    out = {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None], "position_ids": torch.cat(pos, dim=-1),
           "cu_seqlens": torch.tensor(cu, dtype=torch.int32)}
    if pixels:
        out.update(pixel_values=torch.cat(pixels), image_grid_thw=torch.cat(grids))
    return out


HOST = ("image_grid_thw", "cu_seqlens")  # index data the model reads on the host


def to_device(batch: dict, device) -> dict:
    return {k: (v if k in HOST else v.to(device)) for k, v in batch.items()}


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
    if "cu_seqlens" in batch:  # packed: the padding is a segment of its own
        out["cu_seqlens"] = torch.cat([batch["cu_seqlens"], torch.tensor([length], dtype=torch.int32)])
    return out

