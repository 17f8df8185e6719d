"""The Qwen-VL line in MindSpeed-MM parameter names, cut into pipeline positions and TP / EP slices.

``StageModel(cfg, layout, pos, ps)`` is what one flat pipeline position holds; its ``state_dict()`` names and
shapes are exactly those of that position's chunk in this rank's shard (layer numbers restart at 0). Which
blocks are built follows the architecture in ``cfg`` (models/base.ModelConfig, read by the family's spec):
RMSNorm or LayerNorm, gated or plain MLPs, window attention, learned position embedding, deepstack mergers,
q/k norms, interleaved mrope, mixture-of-experts layers. The math follows transformers' models (RMSNorm in
fp32, rotary in fp32 for vision) so that fp32 logits agree to ~1e-6.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mm_convert.errors import ConfigError, LayoutError
from mm_convert.layout import ParallelLayout

from . import kernels
from .config import ModelConfig, TextConfig, VisionConfig, spec_of
from .parallel import (ColumnLinear, GatherRows, Group, ParallelState, RowLinear, ScatterSum, VocabEmbedding,
                       row_counts, vocab_logits)
from .positions import full_seqlens, interpolated_positions, text_rotary, vision_rotary, window_order
from .recompute import Recompute, attention_then_mlp, run_layers


ACTIVATIONS = {
    "silu": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ConfigError(f"activation {name!r} is not supported by the runtime (known: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    """``grad_group``: a TP group over whose ranks the (replicated) weight sees different inputs, so its
    gradient is summed over them (the q/k norms: each TP rank normalises only its own heads)."""

    def __init__(self, dim: int, eps: float, grad_group: Group | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps
        self.grad_group = grad_group

    def forward(self, x):
        weight = self.grad_group.copy_in(self.weight) if self.grad_group is not None else self.weight
        return kernels.active().rms_norm(x, weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return LayerNorm(dim, eps) if kind == "layer" else RMSNorm(dim, eps)


class GatedMLP(nn.Module):
    """linear_fc1 holds this rank's [gate slice; up slice] (the GLU split), linear_fc2 is row parallel."""

    def __init__(self, hidden: int, inter_local: int, bias: bool, group: Group, act: str = "silu"):
        super().__init__()
        self.linear_fc1 = ColumnLinear(hidden, 2 * inter_local, bias, group)
        self.linear_fc2 = RowLinear(inter_local, hidden, bias, group)
        self.act = activation(act)
        self.swiglu = act == "silu"

    def forward(self, x):
        h = self.linear_fc1(x)
        if self.swiglu:
            return self.linear_fc2(kernels.active().swiglu(h))
        gate, up = h.chunk(2, dim=-1)
        return self.linear_fc2(self.act(gate) * up)


class PlainMLP(nn.Module):
    """fc1 -> activation -> fc2 (not gated): fc1 column parallel, fc2 row parallel."""

    def __init__(self, hidden: int, inter_local: int, bias: bool, group: Group, act: str):
        super().__init__()
        self.linear_fc1 = ColumnLinear(hidden, inter_local, bias, group)
        self.linear_fc2 = RowLinear(inter_local, hidden, bias, group)
        self.act = activation(act)

    def forward(self, x):
        return self.linear_fc2(self.act(self.linear_fc1(x)))


# ---- vision encoder ------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(vc.hidden_size, vc.in_channels, vc.temporal_patch_size,
                                                     vc.patch_size, vc.patch_size), requires_grad=False)
        self.proj.bias = nn.Parameter(torch.empty(vc.hidden_size), requires_grad=False) if vc.patch_bias else None

    def forward(self, pixel_values):
        w = self.proj.weight
        x = pixel_values.to(w.dtype).view(-1, *w.shape[1:])
        return F.conv3d(x, w, self.proj.bias, stride=w.shape[2:]).view(-1, w.shape[0])  # one conv step per patch


class PositionEmbedding(nn.Module):
    """A learned square grid of position embeddings, bilinearly resampled to each image's patch grid."""

    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vc.num_position_embeddings, vc.hidden_size), requires_grad=False)
        self.merge = vc.spatial_merge_size

    def forward(self, grid_thw):
        idx, w = interpolated_positions(grid_thw, self.merge, self.weight.shape[0])
        return (self.weight[idx.to(self.weight.device)] * w.to(self.weight.device)[..., None]).sum(1)


class VisionAttention(nn.Module):
    """qkv rows are per head [q_h; k_h; v_h] in the MM layout, so a TP slice is whole heads."""

    def __init__(self, vc: VisionConfig, group: Group):
        super().__init__()
        self.heads = vc.num_heads // group.size
        self.head_dim = vc.head_dim
        self.linear_qkv = ColumnLinear(vc.hidden_size, 3 * self.heads * self.head_dim, bias=True, group=group)
        self.linear_proj = RowLinear(self.heads * self.head_dim, vc.hidden_size, bias=True, group=group)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen=None):
        n = x.shape[0]
        kern = kernels.active()
        q, k, v = self.linear_qkv(x).view(n, self.heads, 3, self.head_dim).unbind(2)
        cos, sin = cos[None, :, None], sin[None, :, None]  # (1, N, 1, D) against (1, N, heads, D): BSND
        q = kern.rotary(q.float()[None], cos, sin)[0].to(x.dtype)  # in fp32, as transformers
        k = kern.rotary(k.float()[None], cos, sin)[0].to(x.dtype)
        # attention stays inside each window (or each frame, for full-attention blocks)
        out = kern.varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=False)
        return self.linear_proj(out.reshape(n, -1))


class VisionLayer(nn.Module):
    def __init__(self, vc: VisionConfig, group: Group, deepstack: bool = False):
        super().__init__()
        self.input_layernorm = make_norm(vc.norm, vc.hidden_size, vc.eps)
        self.self_attention = VisionAttention(vc, group)
        self.pre_mlp_layernorm = make_norm(vc.norm, vc.hidden_size, vc.eps)
        inter = vc.intermediate_size // group.size
        self.mlp = GatedMLP(vc.hidden_size, inter, True, group, vc.act) if vc.mlp == "glu" else \
            PlainMLP(vc.hidden_size, inter, True, group, vc.act)
        # a deepstack merger fed by this block's output (MindSpeed-MM keeps it inside the block)
        self.deepstack_layer = Projector(vc, group, postshuffle=True) if deepstack else None

    def forward(self, x, cos, sin, cu_seqlens, recompute_attention: bool = False):
        return attention_then_mlp(self, x, lambda h: self.self_attention(h, cos, sin, cu_seqlens), recompute_attention)


class Projector(nn.Module):
    """Patch merger: a norm per patch (or, post-shuffle, per merged block), then an MLP over each
    merge x merge block of patches."""

    def __init__(self, vc: VisionConfig, group: Group, postshuffle: bool = False):
        super().__init__()
        merged = vc.merged_size
        self.merged, self.postshuffle = merged, postshuffle
        self.layernorm = make_norm(vc.merger_norm, merged if postshuffle else vc.hidden_size, 1e-6)
        self.encoder = nn.Module()
        self.encoder.linear_fc1 = ColumnLinear(merged, merged // group.size, bias=True, group=group)
        self.encoder.linear_fc2 = RowLinear(merged // group.size, vc.out_hidden_size, bias=True, group=group)
        self.act = activation(vc.merger_act)

    def forward(self, x):
        x = self.layernorm(x.reshape(-1, self.merged)) if self.postshuffle else self.layernorm(x).view(-1, self.merged)
        return self.encoder.linear_fc2(self.act(self.encoder.linear_fc1(x)))


class ImageEncoder(nn.Module):
    """``image_encoder.*`` of one position: patch (and position) embedding at the first vision position, some
    blocks (a deepstack block also yields merged features for the LLM), the projector at the last vision
    position. With window attention the hidden states travel between positions in window order."""

    def __init__(self, vc: VisionConfig, layers: range, first: bool, last: bool, group: Group):
        super().__init__()
        self.vc, self.layer_ids = vc, layers
        self.encoder = nn.Module()
        self.first, self.last = first, last
        if first:
            self.encoder.patch_embed = PatchEmbed(vc)
            if vc.num_position_embeddings:
                self.encoder.pos_embed = PositionEmbedding(vc)
        self.encoder.blocks = nn.Module()
        self.encoder.blocks.layers = nn.ModuleList(VisionLayer(vc, group, i in vc.deepstack_indexes) for i in layers)
        if last:
            self.projector = Projector(vc, group)

    def forward(self, x, pixel_values, grid_thw):
        vc, unit = self.vc, self.vc.spatial_merge_size ** 2
        cu_full = full_seqlens(grid_thw)
        if vc.window_size:
            order, cu_window = window_order(grid_thw, vc.spatial_merge_size, vc.window_size, vc.patch_size)
            order = order.to(pixel_values.device)
        else:  # attention over each whole frame: patches stay in the order the processor gives
            order, cu_window = None, cu_full

        def to_windows(t):  # permute merge units (groups of `unit` consecutive patches) into window order
            return t if order is None else t.reshape(-1, unit, t.shape[-1])[order].reshape(-1, t.shape[-1])

        def from_windows(t):  # merged tokens (one per unit) back to the processor's order
            return t if order is None else t[torch.argsort(order)]

        out = {}
        if self.first:
            x = self.encoder.patch_embed(pixel_values)
            if vc.num_position_embeddings:
                x = x + self.encoder.pos_embed(grid_thw).to(x.dtype)
            x = to_windows(x)
        rot = vision_rotary(grid_thw, vc.spatial_merge_size, vc.head_dim, vc.rope_theta)
        cos, sin = (to_windows(t.to(x.device)) for t in rot)
        layers = self.encoder.blocks.layers

        def step(n, h, selective):
            i, layer = self.layer_ids[n], layers[n]
            h = layer(h, cos, sin, cu_full if i in vc.fullatt_block_indexes else cu_window, selective)
            if layer.deepstack_layer is None:
                return h, {}
            return h, {f"deepstack_{vc.deepstack_indexes.index(i)}": from_windows(layer.deepstack_layer(h))}

        x, deepstack = run_layers(step, x, len(layers), self.recompute)
        out.update(deepstack)
        if self.last:
            out["image_embeds"] = from_windows(self.projector(x))
        else:
            out["vision_hidden"] = x
        return out

    recompute = Recompute()  # training sets the vision encoder's policy (train.engine)


# ---- text decoder --------------------------------------------------------------------------------------------

class TextAttention(nn.Module):
    """GQA (qkv bias optional). A TP slice holds whole query groups: per group [r query heads; 1 key; 1 value].
    With q/k norms (Qwen3), each head's q and k are RMS-normalised over head_dim before the rotary."""

    def __init__(self, tc: TextConfig, group: Group):
        super().__init__()
        self.groups = tc.num_kv_heads // group.size
        self.rep = tc.num_heads // tc.num_kv_heads
        self.head_dim = tc.head_dim
        self.linear_qkv = ColumnLinear(tc.hidden_size, self.groups * (self.rep + 2) * self.head_dim, bias=tc.qkv_bias,
                                       group=group)
        self.linear_proj = RowLinear(self.groups * self.rep * self.head_dim, tc.hidden_size, bias=False, group=group)
        self.q_layernorm = RMSNorm(self.head_dim, tc.eps, group) if tc.qk_norm else None
        self.k_layernorm = RMSNorm(self.head_dim, tc.eps, group) if tc.qk_norm else None

    def forward(self, x, cos, sin, cache: dict | None, key, packed: tuple | None = None):
        """``packed``: (cu_seqlens, max_seqlen) when x (1, T, hidden) holds several samples back to back
        (causal attention stays inside each); None: a (padded) batch, with the KV ``cache`` when given."""
        b, s, _ = x.shape
        kern = kernels.active()
        qkv = self.linear_qkv(x).view(b, s, self.groups, self.rep + 2, self.head_dim)
        q = qkv[:, :, :, :self.rep].reshape(b, s, -1, self.head_dim)
        k, v = qkv[:, :, :, self.rep], qkv[:, :, :, self.rep + 1]
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if packed is not None:  # token-major (T, heads, D) throughout: no transposes
            cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (1, T, 1, D) against (1, T, heads, D): BSND
            q, k = kern.rotary(q, cos, sin)[0], kern.rotary(k, cos, sin)[0]
            out = kern.varlen_attention(q, k, v[0], packed[0], packed[1], causal=True)
            return self.linear_proj(out.reshape(b, s, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, S, D) against (B, heads, S, D): BNSD
        q, k = kern.rotary(q, cos, sin), kern.rotary(k, cos, sin)
        if cache is not None:
            if key in cache:
                pk, pv = cache[key]
                k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
            cache[key] = (k, v)
        out = kern.attention(q, k, v, causal=True)  # grouped-query: k / v keep their own heads
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, -1))


class Router(nn.Module):
    def __init__(self, experts: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden), requires_grad=False)


class Expert(nn.Module):
    """One expert's SwiGLU weights: this TP rank's [gate slice; up slice] (column parallel) and its slice of
    the down columns (row parallel). ``forward`` gives this rank's partial sum; the MoE layer reduces it."""

    def __init__(self, hidden: int, inter_local: int, group: Group):
        super().__init__()
        self.linear_fc1 = ColumnLinear(hidden, 2 * inter_local, False, group)
        self.linear_fc2 = RowLinear(inter_local, hidden, False, group)

    def forward(self, x):
        return F.linear(kernels.active().swiglu(F.linear(x, self.linear_fc1.weight)), self.linear_fc2.weight)


class MoE(nn.Module):
    """Top-k routed experts (softmax over all experts in fp32, top-k, renormalised when ``norm_topk_prob``).
    This EP rank holds experts [ep_rank * E/ep, (ep_rank + 1) * E/ep); every rank routes all tokens, runs its
    own experts on the tokens sent to them, and the partial sums are added over TP (row-parallel fc2) and EP.
    ``shared_tokens``: the EP ranks hold the same tokens (inference replicas: one all-reduce); else (training,
    each rank its own batch) the group's tokens are gathered first and each rank keeps its own rows' sums."""

    shared_tokens: bool = True

    def __init__(self, tc: TextConfig, group: Group, ep: Group | None):
        super().__init__()
        self.tc, self.group, self.ep = tc, group, ep
        ep_size, ep_rank = (ep.size, ep.rank) if ep else (1, 0)
        per = tc.num_experts // ep_size
        self.first = ep_rank * per
        self.router = Router(tc.num_experts, tc.hidden_size)
        self.experts = nn.Module()
        self.experts.local_experts = nn.ModuleList(
            Expert(tc.hidden_size, tc.moe_intermediate_size // group.size, group) for _ in range(per))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        ep = self.ep if self.ep is not None and self.ep.size > 1 else None
        sizes = None
        if ep is not None and not self.shared_tokens:
            sizes = row_counts(x.shape[0], ep, x.device)
            x = GatherRows.apply(x, ep, sizes)
        logits = F.linear(x, self.router.weight)  # replicated over TP: its input gradient is whole on each rank
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.tc.experts_per_token, dim=-1)
        if self.tc.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(logits.dtype)
        h = self.group.copy_in(x)  # the experts' input gradients are partial per TP rank: summed over TP
        parts, tokens, slots = [], [], []
        for j, expert in enumerate(self.experts.local_experts):
            token, slot = torch.where(chosen == self.first + j)
            if token.numel():
                parts.append(expert(h[token]))
                tokens.append(token)
                slots.append(slot)
        out = torch.zeros_like(x)
        if parts:  # TP partial sums reduced once for all experts, before the routing weights (same routing on every TP rank)
            token, slot = torch.cat(tokens), torch.cat(slots)
            y = self.group.all_reduce(torch.cat(parts))
            out = out.index_add(0, token, y * weights[token, slot, None])
        if ep is not None and sizes is not None:
            return ScatterSum.apply(out, ep, sizes).view(shape)
        if ep is not None:
            out = ep.all_reduce(out)
        return out.view(shape)


class TextLayer(nn.Module):
    def __init__(self, tc: TextConfig, layer: int, group: Group, ep: Group | None):
        super().__init__()
        self.input_layernorm = RMSNorm(tc.hidden_size, tc.eps)
        self.self_attention = TextAttention(tc, group)
        self.pre_mlp_layernorm = RMSNorm(tc.hidden_size, tc.eps)
        self.mlp = MoE(tc, group, ep) if tc.is_moe(layer) else \
            GatedMLP(tc.hidden_size, tc.intermediate_size // group.size, False, group)

    def forward(self, x, cos, sin, cache, key, recompute_attention: bool = False, packed: tuple | None = None):
        return attention_then_mlp(self, x, lambda h: self.self_attention(h, cos, sin, cache, key, packed),
                                  recompute_attention)


class OutputLayer(nn.Module):
    def __init__(self, vocab_local: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_local, hidden), requires_grad=False)


class TextDecoder(nn.Module):
    """``text_decoder.*`` of one position: embedding (first LLM position), layers, final norm and output layer
    (last LLM position; a tied model without a stored ``output_layer`` reuses the embedding). Deepstack
    features (from the vision encoder) are added to the image tokens' hidden states after LLM layer k."""

    def __init__(self, cfg: ModelConfig, layers: range, first: bool, last: bool, output_layer: bool, group: Group,
                 ep: Group | None = None):
        super().__init__()
        tc = cfg.text
        self.cfg, self.group, self.first, self.last, self.layer_ids = cfg, group, first, last, layers
        if first:
            self.embedding = nn.Module()
            self.embedding.word_embeddings = VocabEmbedding(tc.vocab_size // group.size, tc.hidden_size, group)
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(TextLayer(tc, i, group, ep) for i in layers)
        if last:
            self.decoder.final_layernorm = RMSNorm(tc.hidden_size, tc.eps)
        self.tied = not output_layer
        self.real_vocab = tc.vocab_size  # the vocabulary without padded rows (StageModel sets it)
        if output_layer:
            self.output_layer = OutputLayer(tc.vocab_size // group.size, tc.hidden_size)

    def forward(self, x, input_ids, image_embeds, position_ids, cache, pos, deepstack: dict | None = None,
                cu_seqlens: torch.Tensor | None = None, labels: torch.Tensor | None = None, last_only: bool = False):
        """``cu_seqlens``: a packed micro-batch (input_ids (1, T): samples back to back, each attending only to
        itself; position_ids restart with each sample). ``labels`` (training): the last position returns the
        summed token loss ({"loss"}, see ``token_loss``) instead of the logits. ``last_only`` (generation): the
        logits of the last position only (the output layer is the largest matrix: a prefill of S tokens would
        multiply S rows by it to use one)."""
        tc = self.cfg.text
        packed = None
        if cu_seqlens is not None:
            packed = (cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))
        image = input_ids == self.cfg.image_token_id
        if self.first:
            x = self.embedding.word_embeddings(input_ids)
            if image_embeds is not None:  # image features replace the expanded <|image_pad|> tokens, in order
                x = x.masked_scatter(image.unsqueeze(-1).expand_as(x), image_embeds.to(x.dtype))
        cos, sin = text_rotary(position_ids, tc.head_dim, tc.rope_theta, tc.mrope_section, x.dtype,
                               tc.mrope_interleaved)
        deepstack = deepstack or {}

        def step(n, h, selective):
            h = self.decoder.layers[n](h, cos, sin, cache, (pos, n), selective, packed)
            feat = deepstack.get(f"deepstack_{self.layer_ids[n]}")
            if feat is not None:
                h = h.masked_scatter(image.unsqueeze(-1).expand_as(h), h[image] + feat.to(h.dtype))
            return h, {}

        x, _ = run_layers(step, x, len(self.decoder.layers), self.recompute if cache is None else Recompute())
        if not self.last:
            return {"hidden": x, **deepstack}
        if last_only:
            x = x[:, -1:]
        x = self.decoder.final_layernorm(x)
        weight = self.embedding.word_embeddings.weight if self.tied else self.output_layer.weight
        if labels is not None:
            return {"loss": token_loss(x, weight, self.group, labels, self.real_vocab)}
        return {"logits": vocab_logits(x, weight, self.group)}

    recompute = Recompute()  # training sets the LLM's policy (train.engine)


IGNORE = -100  # train.data.IGNORE: a position without a label


def token_loss(h: torch.Tensor, weight: torch.Tensor, group: Group, labels: torch.Tensor, vocab: int) -> torch.Tensor:
    """The summed next-token cross-entropy (fp32) of the final hidden states ``h`` (B, S, hidden): position s
    predicts labels[s + 1]. Only the positions that have a label go through the output layer (prompt, image and
    padding tokens are most of a fine-tuning sample and their logits would add nothing to the loss or the
    gradients); the logits of the padded vocabulary rows (beyond ``vocab``) are left out of the softmax."""
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1).to(h.device)
    rows = (target != IGNORE).nonzero().squeeze(1)
    logits = vocab_logits(h.reshape(-1, h.shape[-1]).index_select(0, rows), weight, group)
    if logits.shape[-1] > vocab:
        logits = logits[:, :vocab]
    return F.cross_entropy(logits.float(), target.index_select(0, rows), reduction="sum")


# ---- one pipeline position -----------------------------------------------------------------------------------

class StageModel(nn.Module):
    returns_loss = False  # training (train.engine) sets it: the last LLM position returns {"loss"} of batch["labels"]

    def __init__(self, cfg: ModelConfig, layout: ParallelLayout, pos: int, ps: ParallelState):
        super().__init__()
        self.pos = pos
        kernels.use(ps.device)  # attention / norm / rotary / SwiGLU kernels for this device, picked once and said
        vit, llm = layout.layer_range("vit", pos), layout.layer_range("llm", pos)
        first_vit, last_vit = pos == layout.first_position("vit"), pos == layout.last_position("vit")
        first_llm, last_llm = pos == layout.first_position("llm"), pos == layout.last_position("llm")
        self.image_encoder = vision_encoder(cfg.vision, vit, first_vit, last_vit, ps.vit) if len(vit) else None
        has_output = last_llm and (not cfg.text.tie_word_embeddings or layout.pp_size > 1)
        self.vocab = cfg.text.vocab_size  # the real vocabulary: logits of padded rows are cut off (real_vocab_logits)
        self.text_decoder = TextDecoder(padded_vocab_config(cfg, layout), llm, first_llm, last_llm, has_output, ps.tp,
                                        ps.ep) if len(llm) else None
        if self.text_decoder is not None:
            self.text_decoder.real_vocab = self.vocab

    def forward(self, payload: dict, batch: dict, cache: dict | None) -> dict:
        """payload: what the previous position produced; batch: this step's inputs (every rank has them)."""
        if self.image_encoder is not None and batch.get("pixel_values") is not None:
            x = payload.pop("vision_hidden", None)
            payload.update(self.image_encoder(x, batch["pixel_values"], batch.get("image_grid_thw")))
        if self.text_decoder is not None:
            deepstack = {k: v for k, v in payload.items() if k.startswith("deepstack_")}
            payload = self.text_decoder(payload.get("hidden"), batch["input_ids"], payload.get("image_embeds"),
                                        batch["position_ids"], cache, self.pos, deepstack, batch.get("cu_seqlens"),
                                        batch.get("labels") if self.returns_loss else None,
                                        bool(batch.get("last_logits_only", False)))
            payload = real_vocab_logits(payload, self.vocab)
        return payload


def vision_encoder(vc: VisionConfig, layers: range, first: bool, last: bool, group: Group) -> nn.Module:
    """The image encoder of the config's vision block kind: the Qwen-VL line's, or InternViT's (train/internvit.py)."""
    if vc.block == "intern":
        from .internvit import InternImageEncoder  # it builds on this module's norms and MLP

        return InternImageEncoder(vc, layers, first, last, group)
    return ImageEncoder(vc, layers, first, last, group)


# ---- vocabulary padding (Megatron's make_vocab_size_divisible_by) -------------------------------------------

def padded_vocab_config(cfg: ModelConfig, layout: ParallelLayout) -> ModelConfig:
    """``cfg`` with the text vocabulary as the rows the layout's embedding and output layer hold (padded rows
    are zeros after the real ones)."""
    from dataclasses import replace

    rows = layout.vocab_rows(cfg.text.vocab_size)
    return cfg if rows == cfg.text.vocab_size else replace(cfg, text=replace(cfg.text, vocab_size=rows))


def real_vocab_logits(payload: dict, vocab: int) -> dict:
    """The logits of the real vocabulary only: padded ids can never be sampled, and the loss (softmax over the
    real ids) is what it is without padding."""
    logits = payload.get("logits")
    if logits is not None and logits.shape[-1] > vocab:
        payload["logits"] = logits[..., :vocab]
    return payload


def check_divisible(cfg: ModelConfig, layout: ParallelLayout) -> None:
    """Every TP / EP split the layout asks must divide evenly (the family's rules: whole heads, query groups,
    experts per rank), and the layer lists must sum to the model's depths."""
    layout.check_layer_counts(cfg.vision.depth, cfg.text.num_layers)
    layout.check_divisible(spec_of(cfg).tp_divisible(cfg))
    if layout.ep_size > 1 and not cfg.text.num_experts:
        raise LayoutError(f"ep_size {layout.ep_size}: this {cfg.family} model has no experts")
    t = cfg.text
    if t.num_heads % t.num_kv_heads:
        raise LayoutError(f"num_attention_heads {t.num_heads} is not a multiple of num_key_value_heads {t.num_kv_heads}")
