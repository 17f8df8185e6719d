"""Qwen2.5-VL: everything mm_convert knows about this model family, as data.

* ``Dims``: the sizes read from an HF config (flat hub format or nested ``text_config``).
* ``hf_shapes``: every HF tensor (legacy key scheme) and its shape, so inputs can be checked before any copy.
* ``rules``: one ``Rule`` per MM tensor: its MM name, the HF tensor(s) it is made of, how they are fused
  (``concat`` / ``qkv_groups`` / ``qkv_heads``), where it lives in the pipeline and how TP splits it.
The engine (plan.py) knows nothing of Qwen; adding a model family is adding a file like this one.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..plan import Rule

NAME = "Qwen2_5_VL"
MODEL_TYPES = ("qwen2_5_vl",)


@dataclass(frozen=True)
class Dims:
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    layers: int
    tied: bool
    vit_hidden: int
    vit_heads: int
    vit_ffn: int
    vit_layers: int
    vit_out: int
    in_chans: int
    patch: int
    temporal_patch: int
    merge: int
    dtype: str

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def vit_head_dim(self) -> int:
        return self.vit_hidden // self.vit_heads


def dims_from_config(cfg: dict, source: str = "config.json") -> Dims:
    """Read sizes from a flat (hub) or nested (``text_config``) Qwen2.5-VL config."""
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{source}: model_type is {model_type!r}, expected one of {list(MODEL_TYPES)} (Qwen2.5-VL)")
    text = dict(cfg)
    text.update(cfg.get("text_config") or {})
    vision = cfg.get("vision_config")
    if not isinstance(vision, dict):
        raise ConfigError(f"{source}: vision_config missing; expected a Qwen2.5-VL config with a vision_config section")

    def need(d, key, where):
        if key not in d:
            raise ConfigError(f"{source}: {where}{key} missing")
        return d[key]

    tied = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    if (cfg.get("text_config") or {}).get("tie_word_embeddings") is not None and "tie_word_embeddings" not in cfg:
        tied = cfg["text_config"]["tie_word_embeddings"]
    heads = need(text, "num_attention_heads", "")
    return Dims(
        hidden=need(text, "hidden_size", ""), heads=heads,
        kv_heads=text.get("num_key_value_heads") or heads,
        ffn=need(text, "intermediate_size", ""), vocab=need(text, "vocab_size", ""),
        layers=need(text, "num_hidden_layers", ""), tied=bool(tied),
        vit_hidden=need(vision, "hidden_size", "vision_config."), vit_heads=need(vision, "num_heads", "vision_config."),
        vit_ffn=need(vision, "intermediate_size", "vision_config."), vit_layers=need(vision, "depth", "vision_config."),
        vit_out=vision.get("out_hidden_size", text.get("hidden_size")),
        in_chans=vision.get("in_chans", vision.get("in_channels", 3)),
        patch=vision.get("patch_size", 14), temporal_patch=vision.get("temporal_patch_size", 2),
        merge=vision.get("spatial_merge_size", 2),
        dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or text.get("torch_dtype") or "bfloat16"),
    )


def tp_divisible(d: Dims) -> list[tuple[str, str, int]]:
    """Sizes each module's TP size must divide: (module, what, value)."""
    return [
        ("llm", "num_attention_heads", d.heads),
        ("llm", "num_key_value_heads", d.kv_heads),
        ("llm", "LLM intermediate_size", d.ffn),
        ("llm", "vocab_size", d.vocab),
        ("vit", "vision num_heads", d.vit_heads),
        ("vit", "vision MLP intermediate_size", d.vit_ffn),
        ("vit", "projector hidden size (vision hidden x spatial_merge_size^2)", d.vit_hidden * d.merge ** 2),
    ]


def hf_shapes(d: Dims) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF Qwen2.5-VL checkpoint (legacy key scheme) with its shape."""
    s: dict[str, tuple[int, ...]] = {
        "visual.patch_embed.proj.weight": (d.vit_hidden, d.in_chans, d.temporal_patch, d.patch, d.patch)}
    vh, merged = d.vit_hidden, d.vit_hidden * d.merge ** 2
    for n in range(d.vit_layers):
        b = f"visual.blocks.{n}."
        s.update({b + "norm1.weight": (vh,), b + "norm2.weight": (vh,),
                  b + "attn.qkv.weight": (3 * vh, vh), b + "attn.qkv.bias": (3 * vh,),
                  b + "attn.proj.weight": (vh, vh), b + "attn.proj.bias": (vh,)})
        for p in ("gate_proj", "up_proj"):
            s[b + f"mlp.{p}.weight"] = (d.vit_ffn, vh)
            s[b + f"mlp.{p}.bias"] = (d.vit_ffn,)
        s[b + "mlp.down_proj.weight"] = (vh, d.vit_ffn)
        s[b + "mlp.down_proj.bias"] = (vh,)
    s.update({"visual.merger.ln_q.weight": (vh,),
              "visual.merger.mlp.0.weight": (merged, merged), "visual.merger.mlp.0.bias": (merged,),
              "visual.merger.mlp.2.weight": (d.vit_out, merged), "visual.merger.mlp.2.bias": (d.vit_out,)})
    h, kv = d.hidden, d.kv_heads * d.head_dim
    s["model.embed_tokens.weight"] = (d.vocab, h)
    for n in range(d.layers):
        b = f"model.layers.{n}."
        s.update({b + "input_layernorm.weight": (h,), b + "post_attention_layernorm.weight": (h,),
                  b + "self_attn.q_proj.weight": (h, h), b + "self_attn.q_proj.bias": (h,),
                  b + "self_attn.k_proj.weight": (kv, h), b + "self_attn.k_proj.bias": (kv,),
                  b + "self_attn.v_proj.weight": (kv, h), b + "self_attn.v_proj.bias": (kv,),
                  b + "self_attn.o_proj.weight": (h, h),
                  b + "mlp.gate_proj.weight": (d.ffn, h), b + "mlp.up_proj.weight": (d.ffn, h),
                  b + "mlp.down_proj.weight": (h, d.ffn)})
    s["model.norm.weight"] = (h,)
    if not d.tied:
        s["lm_head.weight"] = (d.vocab, h)
    return s


VIT = "image_encoder.encoder.blocks.layers.{i}."
LLM = "text_decoder.decoder.layers.{i}."


def rules(d: Dims, pp_size: int) -> list[Rule]:
    """The MM tensors of Qwen2.5-VL, in the order a shard stores them."""
    qkv_heads = ("qkv_heads", d.vit_heads)
    qkv_groups = ("qkv_groups", d.kv_heads, d.heads // d.kv_heads)
    r = [
        Rule("image_encoder.encoder.patch_embed.proj.weight", ("visual.patch_embed.proj.weight",), "vit", "first"),
    ]
    r += [Rule(VIT + mm, tuple(f"visual.blocks.{{i}}.{h}" for h in hf), "vit", "layer", tp, fuse)
          for mm, hf, tp, fuse in [
              ("input_layernorm.weight", ("norm1.weight",), "replicate", ("concat",)),
              ("self_attention.linear_proj.weight", ("attn.proj.weight",), "split_dim1", ("concat",)),
              ("self_attention.linear_proj.bias", ("attn.proj.bias",), "replicate", ("concat",)),
              ("self_attention.linear_qkv.weight", ("attn.qkv.weight",), "split_dim0", qkv_heads),
              ("self_attention.linear_qkv.bias", ("attn.qkv.bias",), "split_dim0", qkv_heads),
              ("pre_mlp_layernorm.weight", ("norm2.weight",), "replicate", ("concat",)),
              ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "split_dim0", ("concat",)),
              ("mlp.linear_fc1.bias", ("mlp.gate_proj.bias", "mlp.up_proj.bias"), "split_dim0", ("concat",)),
              ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "split_dim1", ("concat",)),
              ("mlp.linear_fc2.bias", ("mlp.down_proj.bias",), "replicate", ("concat",)),
          ]]
    r += [
        Rule("image_encoder.projector.layernorm.weight", ("visual.merger.ln_q.weight",), "vit", "last"),
        Rule("image_encoder.projector.encoder.linear_fc1.weight", ("visual.merger.mlp.0.weight",), "vit", "last", "split_dim0"),
        Rule("image_encoder.projector.encoder.linear_fc1.bias", ("visual.merger.mlp.0.bias",), "vit", "last", "split_dim0"),
        Rule("image_encoder.projector.encoder.linear_fc2.weight", ("visual.merger.mlp.2.weight",), "vit", "last", "split_dim1"),
        Rule("image_encoder.projector.encoder.linear_fc2.bias", ("visual.merger.mlp.2.bias",), "vit", "last"),
        Rule("text_decoder.embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "llm", "first", "split_dim0"),
    ]
    r += [Rule(LLM + mm, tuple(f"model.layers.{{i}}.{h}" for h in hf), "llm", "layer", tp, fuse)
          for mm, hf, tp, fuse in [
              ("input_layernorm.weight", ("input_layernorm.weight",), "replicate", ("concat",)),
              ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "split_dim1", ("concat",)),
              ("self_attention.linear_qkv.weight",
               ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "split_dim0", qkv_groups),
              ("self_attention.linear_qkv.bias",
               ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "split_dim0", qkv_groups),
              ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "replicate", ("concat",)),
              ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "split_dim0", ("concat",)),
              ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "split_dim1", ("concat",)),
          ]]
    r.append(Rule("text_decoder.decoder.final_layernorm.weight", ("model.norm.weight",), "llm", "last"))
    # Tied embeddings: Megatron keeps a copy of the word embeddings as the output layer on the last stage
    # when the pipeline has more than one stage; with one stage there is no output_layer at all.
    if not d.tied:
        r.append(Rule("text_decoder.output_layer.weight", ("lm_head.weight",), "llm", "last", "split_dim0"))
    elif pp_size > 1:
        r.append(Rule("text_decoder.output_layer.weight", ("model.embed_tokens.weight",), "llm", "last", "split_dim0",
                      copy=True))
    return r


def check_config(d: Dims, source: str) -> None:
    if d.hidden % d.heads or d.heads % d.kv_heads or d.vit_hidden % d.vit_heads:
        raise ConfigError(f"{source}: hidden sizes must divide evenly by head counts "
                          f"(hidden {d.hidden}, heads {d.heads}, kv heads {d.kv_heads}, vision {d.vit_hidden}/{d.vit_heads})")
