"""The InternViT vision tower and InternVL's pixel-shuffle projector (vision block kind "intern" of
models/base.VisionConfig), in MindSpeed-MM's parameter names, cut into pipeline positions and TP slices.

``image_encoder.encoder.embeddings`` (first vision position): a patch convolution with bias, a class token and
learned absolute positions (resampled bicubically when the tiles are not the tower's image size);
``image_encoder.encoder.encoder.layers.N``: ``x + ls1 * attention(input_layernorm(x))`` then
``x + ls2 * mlp(pre_mlp_layernorm(x))``; attention over each tile, q / k / v from one column-parallel
``linear_qkv`` ([q_r; k_r; v_r]: this rank's heads of each), with InternViT-6B's RMS norms over the whole hidden
size on q and k (the sum of squares is summed over the vision TP group); an optional final LayerNorm and, at
the last vision position, the projector: the class token dropped, merge x merge patches shuffled into one token
(transformers' ``pixel_shuffle``), LayerNorm, linear_fc1, gelu, linear_fc2 (replicated, as the checkpoint has it).
The math follows transformers' InternVL so that fp32 logits agree to ~1e-6.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mm_convert.errors import ConfigError

from .config import VisionConfig
from .model import LayerNorm, PlainMLP, activation, make_norm
from .parallel import ColumnLinear, Group, RowLinear
from .recompute import Recompute, run_layers


class _SumOverGroup(torch.autograd.Function):
    """Sum over the group; the backward sums too (every rank's output depends on every rank's input)."""

    @staticmethod
    def forward(ctx, x, g):
        ctx.g = g
        x = x.clone()
        dist.all_reduce(x, group=g.group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.g.group)
        return grad, None


def group_sum(x: torch.Tensor, g: Group) -> torch.Tensor:
    if g.size == 1:
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return _SumOverGroup.apply(x, g)
    x = x.clone()
    dist.all_reduce(x, group=g.group)
    return x


class WholeHiddenRMSNorm(nn.Module):
    """RMSNorm over the whole hidden size of a tensor whose last dim is this rank's heads (InternViT-6B's q / k
    norms): the weight is replicated, each rank applies its heads' slice (the gradients, disjoint, are summed
    over the group)."""

    def __init__(self, hidden: int, group: Group, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden), requires_grad=False)
        self.hidden, self.group, self.eps = hidden, group, eps

    def forward(self, x):
        dtype, n = x.dtype, x.shape[-1]
        xf = x.float()
        ss = group_sum(xf.pow(2).sum(-1, keepdim=True), self.group)
        xf = xf * torch.rsqrt(ss / self.hidden + self.eps)
        r = self.group.rank
        return self.group.copy_in(self.weight)[r * n:(r + 1) * n] * xf.to(dtype)


class InternAttention(nn.Module):
    def __init__(self, vc: VisionConfig, group: Group):
        super().__init__()
        self.heads = vc.num_heads // group.size
        self.head_dim = vc.head_dim
        local = self.heads * self.head_dim
        self.linear_proj = RowLinear(local, vc.hidden_size, bias=True, group=group)
        self.linear_qkv = ColumnLinear(vc.hidden_size, 3 * local, bias=vc.qkv_bias, group=group)
        self.q_layernorm = WholeHiddenRMSNorm(vc.hidden_size, group) if vc.qk_norm else None
        self.k_layernorm = WholeHiddenRMSNorm(vc.hidden_size, group) if vc.qk_norm else None

    def forward(self, x):
        n, length, _ = x.shape  # (tiles, 1 + patches, hidden)
        q, k, v = self.linear_qkv(x).chunk(3, dim=-1)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k, v = (t.reshape(n, length, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # every token of a tile attends to the whole tile
        return self.linear_proj(out.transpose(1, 2).reshape(n, length, -1))


class InternLayer(nn.Module):
    def __init__(self, vc: VisionConfig, group: Group):
        super().__init__()
        self.ls1 = nn.Parameter(torch.empty(vc.hidden_size), requires_grad=False)
        self.ls2 = nn.Parameter(torch.empty(vc.hidden_size), requires_grad=False)
        self.input_layernorm = make_norm(vc.norm, vc.hidden_size, vc.eps)
        self.self_attention = InternAttention(vc, group)
        self.pre_mlp_layernorm = make_norm(vc.norm, vc.hidden_size, vc.eps)
        self.mlp = PlainMLP(vc.hidden_size, vc.intermediate_size // group.size, True, group, vc.act)

    def forward(self, x):
        x = x + self.ls1 * self.self_attention(self.input_layernorm(x))
        return x + self.ls2 * self.mlp(self.pre_mlp_layernorm(x))


class InternEmbeddings(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        h = vc.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, h), requires_grad=False)
        self.patch_embedding = nn.Module()
        self.patch_embedding.weight = nn.Parameter(torch.empty(h, vc.in_channels, vc.patch_size, vc.patch_size),
                                                   requires_grad=False)
        self.patch_embedding.bias = nn.Parameter(torch.empty(h), requires_grad=False)
        self.position_embedding = nn.Parameter(torch.empty(1, vc.num_position_embeddings, h), requires_grad=False) \
            if vc.num_position_embeddings else None

    def forward(self, pixel_values):
        w = self.patch_embedding.weight
        x = F.conv2d(pixel_values.to(w.dtype), w, self.patch_embedding.bias, stride=w.shape[-1])
        n, _, rows, cols = x.shape
        x = torch.cat([self.class_embedding.expand(n, -1, -1).to(x.dtype), x.flatten(2).transpose(1, 2)], dim=1)
        if self.position_embedding is not None:
            x = x + self.positions(rows, cols)
        return x

    def positions(self, rows: int, cols: int) -> torch.Tensor:
        """The learned positions for a rows x cols patch grid (bicubic resampling of the square grid, the class
        token's unchanged), as transformers' ``interpolate_pos_encoding``."""
        pos = self.position_embedding
        if rows * cols == pos.shape[1] - 1 and rows == cols:
            return pos
        side = int((pos.shape[1] - 1) ** 0.5)
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)


class PixelShuffleProjector(nn.Module):
    """The class token dropped, each merge x merge block of patches shuffled into one token (transformers'
    ``pixel_shuffle``, height and width swapped back), then LayerNorm (eps 1e-5), linear_fc1, act, linear_fc2."""

    def __init__(self, vc: VisionConfig):
        super().__init__()
        merged, out = vc.merged_size, vc.out_hidden_size
        self.merge = vc.spatial_merge_size
        self.norm = LayerNorm(merged, 1e-5)
        self.linear_fc1 = nn.Linear(merged, out)
        self.linear_fc2 = nn.Linear(out, out)
        for p in self.parameters():
            p.requires_grad_(False)
        self.act = activation(vc.merger_act)

    def forward(self, x):
        x = x[:, 1:]
        n, length, c = x.shape
        side, m = int(length ** 0.5), self.merge
        x = x.reshape(n, side, side // m, c * m).permute(0, 2, 1, 3).reshape(n, side // m, side // m, c * m * m)
        x = x.permute(0, 2, 1, 3).reshape(n, -1, c * m * m)
        x = self.linear_fc2(self.act(self.linear_fc1(self.norm(x))))
        return x.reshape(-1, x.shape[-1])  # every tile's tokens, tile after tile


class InternImageEncoder(nn.Module):
    """``image_encoder.*`` of one position: embeddings at the first vision position, some blocks, the final norm
    (towers without mean pooling) and the projector at the last. Hidden states travel as (tiles, 1 + patches,
    hidden)."""

    def __init__(self, vc: VisionConfig, layers: range, first: bool, last: bool, group: Group):
        super().__init__()
        if vc.feature_layer != -1:
            raise ConfigError(f"vision_feature_layer {vc.feature_layer}: the runtime feeds the projector the last "
                              f"block's output only (-1)")
        self.first, self.last, self.final_norm = first, last, vc.final_norm
        self.encoder = nn.Module()
        if first:
            self.encoder.embeddings = InternEmbeddings(vc)
        self.encoder.encoder = nn.Module()
        self.encoder.encoder.layers = nn.ModuleList(InternLayer(vc, group) for _ in layers)
        if last:
            if vc.final_norm:
                self.encoder.encoder.final_layernorm = LayerNorm(vc.hidden_size, vc.eps)
            self.projector = PixelShuffleProjector(vc)

    def forward(self, x, pixel_values, grid_thw=None):
        if self.first:
            x = self.encoder.embeddings(pixel_values)
        layers = self.encoder.encoder.layers
        x, _ = run_layers(lambda n, h, selective: (layers[n](h), {}), x, len(layers), self.recompute)
        if not self.last:
            return {"vision_hidden": x}
        if self.final_norm:
            x = self.encoder.encoder.final_layernorm(x)
        return {"image_embeds": self.projector(x)}

    recompute = Recompute()
