"""Qwen2.5-VL in MindSpeed-MM parameter names, cut into pipeline positions and tensor-parallel slices.

``StageModel(cfg, layout, pos, ps)`` is what one flat pipeline position holds; its ``state_dict()`` names and
shapes are exactly those of that position's chunk in this TP rank's shard (layer numbers restart at 0).
The math follows transformers' Qwen2.5-VL (RMSNorm in fp32, rotary in fp32 for vision) so that fp32 logits
agree to ~1e-6.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mm_convert.errors import LayoutError
from mm_convert.layout import ParallelLayout

from .config import ModelConfig, TextConfig, VisionConfig
from .parallel import ColumnLinear, Group, ParallelState, RowLinear, VocabEmbedding, vocab_logits
from torch.utils.checkpoint import checkpoint

from .positions import full_seqlens, rotate_half, text_rotary, vision_rotary, window_order


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class GatedMLP(nn.Module):
    """linear_fc1 holds this rank's [gate slice; up slice] (the GLU split), linear_fc2 is row parallel."""

    def __init__(self, hidden: int, inter_local: int, bias: bool, group: Group):
        super().__init__()
        self.linear_fc1 = ColumnLinear(hidden, 2 * inter_local, bias, group)
        self.linear_fc2 = RowLinear(inter_local, hidden, bias, group)

    def forward(self, x):
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


# ---- vision encoder ------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(vc.hidden_size, vc.in_channels, vc.temporal_patch_size,
                                                     vc.patch_size, vc.patch_size), requires_grad=False)

    def forward(self, pixel_values):
        w = self.proj.weight
        x = pixel_values.to(w.dtype).view(-1, *w.shape[1:])
        return F.conv3d(x, w, stride=w.shape[2:]).view(-1, w.shape[0])  # one conv step per patch


class VisionAttention(nn.Module):
    """qkv rows are per head [q_h; k_h; v_h] in the MM layout, so a TP slice is whole heads."""

    def __init__(self, vc: VisionConfig, group: Group):
        super().__init__()
        self.heads = vc.num_heads // group.size
        self.head_dim = vc.head_dim
        self.linear_qkv = ColumnLinear(vc.hidden_size, 3 * self.heads * self.head_dim, bias=True, group=group)
        self.linear_proj = RowLinear(self.heads * self.head_dim, vc.hidden_size, bias=True, group=group)

    def forward(self, x, cos, sin, cu_seqlens):
        n = x.shape[0]
        q, k, v = self.linear_qkv(x).view(n, self.heads, 3, self.head_dim).unbind(2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        bounds = cu_seqlens.tolist()
        out = []  # attention stays inside each window (or each frame, for full-attention blocks)
        for a, b in zip(bounds[:-1], bounds[1:]):
            qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            out.append(F.scaled_dot_product_attention(qs, ks, vs).squeeze(0).transpose(0, 1))
        return self.linear_proj(torch.cat(out).reshape(n, -1))


class VisionLayer(nn.Module):
    def __init__(self, vc: VisionConfig, group: Group):
        super().__init__()
        self.input_layernorm = RMSNorm(vc.hidden_size, vc.eps)
        self.self_attention = VisionAttention(vc, group)
        self.pre_mlp_layernorm = RMSNorm(vc.hidden_size, vc.eps)
        self.mlp = GatedMLP(vc.hidden_size, vc.intermediate_size // group.size, True, group)

    def forward(self, x, cos, sin, cu_seqlens):
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class Projector(nn.Module):
    """Patch merger: RMSNorm per patch, then an MLP over each merge x merge block of patches."""

    def __init__(self, vc: VisionConfig, group: Group):
        super().__init__()
        merged = vc.hidden_size * vc.spatial_merge_size ** 2
        self.merged = merged
        self.layernorm = RMSNorm(vc.hidden_size, 1e-6)
        self.encoder = nn.Module()
        self.encoder.linear_fc1 = ColumnLinear(merged, merged // group.size, bias=True, group=group)
        self.encoder.linear_fc2 = RowLinear(merged // group.size, vc.out_hidden_size, bias=True, group=group)

    def forward(self, x):
        x = self.layernorm(x).view(-1, self.merged)
        return self.encoder.linear_fc2(F.gelu(self.encoder.linear_fc1(x)))


class ImageEncoder(nn.Module):
    """``image_encoder.*`` of one position: patch embedding (first vision position), some blocks, projector
    (last vision position). Between positions the hidden states travel in window order."""

    def __init__(self, vc: VisionConfig, layers: range, first: bool, last: bool, group: Group):
        super().__init__()
        self.vc, self.layer_ids = vc, layers
        self.encoder = nn.Module()
        if first:
            self.encoder.patch_embed = PatchEmbed(vc)
        self.encoder.blocks = nn.Module()
        self.encoder.blocks.layers = nn.ModuleList(VisionLayer(vc, group) for _ in layers)
        if last:
            self.projector = Projector(vc, group)

    def forward(self, x, pixel_values, grid_thw):
        vc, unit = self.vc, self.vc.spatial_merge_size ** 2
        order, cu_window = window_order(grid_thw, vc.spatial_merge_size, vc.window_size, vc.patch_size)
        order = order.to(pixel_values.device)
        cu_full = full_seqlens(grid_thw)

        def to_windows(t):  # permute merge units (groups of `unit` consecutive patches) into window order
            return t.reshape(-1, unit, t.shape[-1])[order].reshape(-1, t.shape[-1])

        if hasattr(self.encoder, "patch_embed"):
            x = to_windows(self.encoder.patch_embed(pixel_values))
        rot = vision_rotary(grid_thw, vc.spatial_merge_size, vc.head_dim, vc.rope_theta)
        cos, sin = (to_windows(t.to(x.device)) for t in rot)
        for n, (i, layer) in enumerate(zip(self.layer_ids, self.encoder.blocks.layers)):
            x = self.block(n, layer, x, cos, sin, cu_full if i in vc.fullatt_block_indexes else cu_window)
        if hasattr(self, "projector"):
            return {"image_embeds": self.projector(x)[torch.argsort(order)]}
        return {"vision_hidden": x}

    recompute: str | None = None     # training: "full" or "selective" (set by train.engine)
    recompute_layers: int | None = None  # "full": only the first N blocks of this position (None: all)

    def block(self, n, layer, x, cos, sin, cu):
        """One block with activation recomputation: ``full`` keeps only the block's input, ``selective`` drops
        only the attention's activations; the backward recomputes what was dropped."""
        mode = self.recompute if torch.is_grad_enabled() else None
        if mode == "full" and (self.recompute_layers is None or n < self.recompute_layers):
            return checkpoint(layer, x, cos, sin, cu, use_reentrant=False)
        if mode == "selective":
            attn = lambda h: layer.self_attention(layer.input_layernorm(h), cos, sin, cu)  # noqa: E731
            x = x + checkpoint(attn, x, use_reentrant=False)
            return x + layer.mlp(layer.pre_mlp_layernorm(x))
        return layer(x, cos, sin, cu)


# ---- text decoder --------------------------------------------------------------------------------------------

class TextAttention(nn.Module):
    """GQA with qkv bias. A TP slice holds whole query groups: per group [r query heads; 1 key; 1 value]."""

    def __init__(self, tc: TextConfig, group: Group):
        super().__init__()
        self.groups = tc.num_kv_heads // group.size
        self.rep = tc.num_heads // tc.num_kv_heads
        self.head_dim = tc.head_dim
        self.linear_qkv = ColumnLinear(tc.hidden_size, self.groups * (self.rep + 2) * self.head_dim, bias=True, group=group)
        self.linear_proj = RowLinear(self.groups * self.rep * self.head_dim, tc.hidden_size, bias=False, group=group)

    def forward(self, x, cos, sin, cache: dict | None, key):
        b, s, _ = x.shape
        qkv = self.linear_qkv(x).view(b, s, self.groups, self.rep + 2, self.head_dim)
        q = qkv[:, :, :, :self.rep].reshape(b, s, -1, self.head_dim).transpose(1, 2)
        k = qkv[:, :, :, self.rep].transpose(1, 2)
        v = qkv[:, :, :, self.rep + 1].transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        past = 0
        if cache is not None:
            if key in cache:
                pk, pv = cache[key]
                past = pk.shape[2]
                k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
            cache[key] = (k, v)
        k, v = k.repeat_interleave(self.rep, dim=1), v.repeat_interleave(self.rep, dim=1)
        if s == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        elif past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # several new tokens after a cached prefix
            mask = torch.arange(past + s, device=x.device)[None, :] <= (past + torch.arange(s, device=x.device))[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, -1))


class TextLayer(nn.Module):
    def __init__(self, tc: TextConfig, group: Group):
        super().__init__()
        self.input_layernorm = RMSNorm(tc.hidden_size, tc.eps)
        self.self_attention = TextAttention(tc, group)
        self.pre_mlp_layernorm = RMSNorm(tc.hidden_size, tc.eps)
        self.mlp = GatedMLP(tc.hidden_size, tc.intermediate_size // group.size, False, group)

    def forward(self, x, cos, sin, cache, key):
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, cache, key)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class OutputLayer(nn.Module):
    def __init__(self, vocab_local: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_local, hidden), requires_grad=False)


class TextDecoder(nn.Module):
    """``text_decoder.*`` of one position: embedding (first LLM position), layers, final norm and output layer
    (last LLM position; a tied model without a stored ``output_layer`` reuses the embedding)."""

    def __init__(self, cfg: ModelConfig, layers: range, first: bool, last: bool, output_layer: bool, group: Group):
        super().__init__()
        tc = cfg.text
        self.cfg, self.group, self.last = cfg, group, last
        if first:
            self.embedding = nn.Module()
            self.embedding.word_embeddings = VocabEmbedding(tc.vocab_size // group.size, tc.hidden_size, group)
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(TextLayer(tc, group) for _ in layers)
        if last:
            self.decoder.final_layernorm = RMSNorm(tc.hidden_size, tc.eps)
        if output_layer:
            self.output_layer = OutputLayer(tc.vocab_size // group.size, tc.hidden_size)

    def forward(self, x, input_ids, image_embeds, position_ids, cache, pos):
        tc = self.cfg.text
        if hasattr(self, "embedding"):
            x = self.embedding.word_embeddings(input_ids)
            if image_embeds is not None:  # image features replace the expanded <|image_pad|> tokens, in order
                mask = (input_ids == self.cfg.image_token_id).unsqueeze(-1).expand_as(x)
                x = x.masked_scatter(mask, image_embeds.to(x.dtype))
        cos, sin = text_rotary(position_ids, tc.head_dim, tc.rope_theta, tc.mrope_section, x.dtype)
        for i, layer in enumerate(self.decoder.layers):
            x = layer(x, cos, sin, cache, (pos, i))
        if not self.last:
            return {"hidden": x}
        x = self.decoder.final_layernorm(x)
        weight = self.output_layer.weight if hasattr(self, "output_layer") else self.embedding.word_embeddings.weight
        return {"logits": vocab_logits(x, weight, self.group)}


# ---- one pipeline position -----------------------------------------------------------------------------------

class StageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, layout: ParallelLayout, pos: int, ps: ParallelState):
        super().__init__()
        self.pos = pos
        vit, llm = layout.layer_range("vit", pos), layout.layer_range("llm", pos)
        first_vit, last_vit = pos == layout.first_position("vit"), pos == layout.last_position("vit")
        first_llm, last_llm = pos == layout.first_position("llm"), pos == layout.last_position("llm")
        if len(vit):
            self.image_encoder = ImageEncoder(cfg.vision, vit, first_vit, last_vit, ps.vit)
        if len(llm):
            has_output = last_llm and (not cfg.text.tie_word_embeddings or layout.pp_size > 1)
            self.text_decoder = TextDecoder(cfg, llm, first_llm, last_llm, has_output, ps.tp)

    def forward(self, payload: dict, batch: dict, cache: dict | None) -> dict:
        """payload: what the previous position produced; batch: this step's inputs (every rank has them)."""
        if hasattr(self, "image_encoder") and batch.get("pixel_values") is not None:
            x = payload.pop("vision_hidden", None)
            payload.update(self.image_encoder(x, batch["pixel_values"], batch["image_grid_thw"]))
        if hasattr(self, "text_decoder"):
            payload = self.text_decoder(payload.get("hidden"), batch["input_ids"], payload.get("image_embeds"),
                                        batch["position_ids"], cache, self.pos)
        return payload


def check_divisible(cfg: ModelConfig, layout: ParallelLayout) -> None:
    """Every TP-split dimension must divide evenly (whole heads / query groups per rank)."""
    v, t = cfg.vision, cfg.text
    layout.check_layer_counts(v.depth, t.num_layers)
    layout.check_divisible([
        ("vit", "vision attention heads", v.num_heads), ("vit", "vision MLP size", v.intermediate_size),
        ("vit", "projector hidden size", v.hidden_size * v.spatial_merge_size ** 2),
        ("llm", "query groups (num_key_value_heads)", t.num_kv_heads), ("llm", "MLP size", t.intermediate_size),
        ("llm", "vocab size", t.vocab_size)])
    if t.num_heads % t.num_kv_heads:
        raise LayoutError(f"num_attention_heads {t.num_heads} is not a multiple of num_key_value_heads {t.num_kv_heads}")
