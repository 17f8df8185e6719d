"""Index math of the Qwen-VL line: window order of the vision encoder, 2D vision rotary, the learned position
embedding's bilinear resampling, 3D multimodal RoPE (mrope, banded or interleaved).

Pure functions of the image grids and token ids, so every pipeline stage recomputes them locally instead of
receiving them from the previous stage.
"""
from __future__ import annotations

import torch


def window_order(grid_thw: torch.Tensor, merge: int, window_size: int, patch_size: int):
    """Order of the merged (merge x merge patch) units so that each attention window is contiguous, and the
    cumulative patch counts of the windows. Windows are ``window_size`` pixels square, walked row-major per
    frame; edge windows are smaller."""
    win = window_size // merge // patch_size  # merged units per window side
    order, cu = [], [0]
    base = 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).view(t, gh, gw)
        for f in range(t):
            for y in range(0, gh, win):
                for x in range(0, gw, win):
                    block = idx[f, y:y + win, x:x + win].reshape(-1)
                    order.append(block + base)
                    cu.append(cu[-1] + block.numel() * merge * merge)
        base += t * gh * gw
    return torch.cat(order), torch.tensor(cu, dtype=torch.int32)


def full_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Cumulative patch counts of whole frames: the full-attention blocks attend within one frame."""
    per_frame = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return torch.cat([torch.zeros(1, dtype=torch.int32), per_frame.cumsum(0).to(torch.int32)])


def vision_rotary(grid_thw: torch.Tensor, merge: int, head_dim: int, theta: float):
    """cos, sin of shape (patches, head_dim) for the 2D rotary: half the rotated dims follow the patch row, half
    the column. Patches are listed merge-block by merge-block (the order the patch embedding produces)."""
    pos = []
    for t, h, w in grid_thw.tolist():
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hh = hh.reshape(shape).transpose(1, 2).flatten()
        ww = ww.reshape(shape).transpose(1, 2).flatten()
        pos.append(torch.stack([hh, ww], dim=-1).repeat(t, 1))
    pos = torch.cat(pos)                                                        # (N, 2)
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
    freqs = (pos[..., None].float() * inv_freq).flatten(1)                      # (N, head_dim/2): [h | w]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def interpolated_positions(grid_thw: torch.Tensor, merge: int, table: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (N, 4) into a square table of ``table`` learned embeddings and their bilinear weights (N, 4)
    (corners aligned), for each patch of each image in merge-block order (the patch embedding's order)."""
    side = int(round(table ** 0.5))
    idx, wts = [], []
    for t, h, w in grid_thw.tolist():
        def axis(n):
            src = torch.arange(n, dtype=torch.float32) * (side - 1) / max(n - 1, 1)
            lo = src.floor()
            frac = src - lo
            lo = lo.long()
            return lo, (lo + 1).clamp(max=side - 1), frac
        r0, r1, dr = axis(h)
        c0, c1, dc = axis(w)
        ri, ci = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        ri, ci = (g.reshape(shape).transpose(1, 2).flatten() for g in (ri, ci))  # merge-block order
        taps = torch.stack([r0[ri] * side + c0[ci], r0[ri] * side + c1[ci], r1[ri] * side + c0[ci],
                            r1[ri] * side + c1[ci]], dim=-1)
        a, b = dr[ri], dc[ci]
        weights = torch.stack([(1 - a) * (1 - b), (1 - a) * b, a * (1 - b), a * b], dim=-1)
        idx.append(taps.repeat(t, 1))
        wts.append(weights.repeat(t, 1))
    return torch.cat(idx), torch.cat(wts)


def mrope_positions(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, image_token_id: int,
                    merge: int) -> tuple[torch.Tensor, int]:
    """3D positions (3, 1, S) of one sequence and the offset ``delta`` that later (decoded) tokens add to their
    index. Text advances all three axes together; an image's tokens take (start, start + row, start + col),
    and the text after it starts at start + max(rows, cols)."""
    ids = input_ids.reshape(-1).tolist()
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    cols, cur, i = [], 0, 0
    while i < len(ids):
        j = ids.index(image_token_id, i) if image_token_id in ids[i:] else len(ids)
        if j > i:  # a run of text
            cols.append(torch.arange(cur, cur + j - i).expand(3, -1))
            cur, i = cur + j - i, j
            continue
        t, h, w = next(grids)
        gh, gw = h // merge, w // merge
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        cols.append(torch.stack([tt, hh, ww]).reshape(3, -1) + cur)
        cur += max(gh, gw)
        i += t * gh * gw
    pos = torch.cat(cols, dim=1)
    if pos.shape[1] != len(ids):
        raise ValueError(f"image tokens do not match the image grids ({pos.shape[1]} positions for {len(ids)} tokens)")
    return pos.unsqueeze(1), int(pos.max()) + 1 - len(ids)


def text_rotary(position_ids: torch.Tensor, head_dim: int, theta: float, mrope_section, dtype,
                interleaved: bool = False):
    """cos, sin (B, S, head_dim) for mrope. Banded (Qwen2/2.5-VL): rotary frequency band i takes its angle
    from axis (temporal, height, width)[i % 3] along the bands of ``mrope_section``. Interleaved (Qwen3-VL):
    frequency j takes height when j % 3 == 1 and j < 3 * sections[1], width when j % 3 == 2 and
    j < 3 * sections[2], else time."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # (3, B, S, head_dim/2)
    if interleaved:
        out = freqs[0].clone()
        for axis in (1, 2):
            sl = slice(axis, 3 * mrope_section[axis], 3)
            out[..., sl] = freqs[axis, ..., sl]
        freqs = out
    else:
        bands = freqs.split(list(mrope_section), dim=-1)
        freqs = torch.cat([band[i % 3] for i, band in enumerate(bands)], dim=-1)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)
