"""Qwen2.5-VL: everything mm_convert knows about this model family, as data.

* ``config_from_hf``: the architecture read from an HF config (flat hub format or nested ``text_config``).
* ``hf_shapes``: every HF tensor (legacy key scheme) and its shape, so inputs can be checked before any copy.
* ``rules``: one ``Rule`` per MM tensor: its MM name, the HF tensor(s) it is made of, how they are fused
  (``concat`` / ``qkv_groups`` / ``qkv_heads``), where it lives in the pipeline and how TP splits it.
The vision QKV per-head reorder is the ``qkv_heads`` fusion below; the LLM is base.gpt_llm_rules.
"""
from __future__ import annotations

from . import base
from .base import (HF_VIT, KEY_SCHEMES, LAYER_PREFIXES, TIED_PAIR, TRAINABLE, VIT, ModelConfig, VisionConfig,  # noqa: F401
                   Rule)

NAME = "Qwen2.5-VL"
CONVERTER = "Qwen2_5_VLConverter"
MODEL_TYPES = ("qwen2_5_vl",)
HF_CLASSES = {"qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration")}  # model_type -> transformers config and model classes
PUBLISHED = {s: f"qwen2_5_vl_{s}.json" for s in ("3b", "7b", "32b", "72b")}
TINY = {"": "tiny_qwen2_5_vl.json"}
HUB_SCHEME = "legacy"  # the key scheme of the published files
HF_PROCESSOR = "Qwen2_5_VLProcessor"
MM_MODEL_IDS = {"vision_encoder": "qwen2vit", "vision_projector": "lnmlp", "text_decoder": "qwen2_5_lm"}


def config_from_hf(cfg: dict, source: str = "config.json") -> ModelConfig:
    base.check_model_type(cfg, MODEL_TYPES, NAME, source)
    text, vis = base.text_section(cfg), base.vision_section(cfg, source, NAME)
    need = lambda key: base.need(vis, key, "vision_config.", source)  # noqa: E731
    vision = VisionConfig(
        **base.vision_fields(vis, text, source, 14), hidden_size=need("hidden_size"),
        intermediate_size=need("intermediate_size"), out_hidden_size=vis.get("out_hidden_size", text.get("hidden_size")),
        window_size=vis.get("window_size", 112), fullatt_block_indexes=tuple(vis.get("fullatt_block_indexes", ())),
        tokens_per_second=vis.get("tokens_per_second", 2), norm="rms", mlp="glu", act="silu", merger_norm="rms")
    t = base.text_config_from_hf(text, source, tie_word_embeddings=base.tied_flag(cfg), qkv_bias=True)
    return base.model_config(NAME, cfg, vision, t, source)


def tp_divisible(cfg: ModelConfig) -> list[tuple[str, str, int]]:
    """Sizes each module's TP size must divide: (module, what, value)."""
    v = cfg.vision
    return base.llm_tp_divisible(cfg.text) + [
        ("vit", "vision num_heads", v.num_heads), ("vit", "vision MLP intermediate_size", v.intermediate_size),
        ("vit", "projector hidden size (vision hidden x spatial_merge_size^2)", v.merged_size)]


def hf_shapes(cfg: ModelConfig, expert_layout: str = "hub") -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF Qwen2.5-VL checkpoint (legacy key scheme) with its shape."""
    v = cfg.vision
    vh, f, merged = v.hidden_size, v.intermediate_size, v.merged_size
    s = {"visual.patch_embed.proj.weight": (vh, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)}
    s.update(base.vit_block_shapes(v, {
        **base.vit_attention_shapes(v, norm_bias=False), "mlp.gate_proj.weight": (f, vh),
        "mlp.gate_proj.bias": (f,), "mlp.up_proj.weight": (f, vh), "mlp.up_proj.bias": (f,),
        "mlp.down_proj.weight": (vh, f), "mlp.down_proj.bias": (vh,)}))
    s.update({"visual.merger.ln_q.weight": (vh,),
              "visual.merger.mlp.0.weight": (merged, merged), "visual.merger.mlp.0.bias": (merged,),
              "visual.merger.mlp.2.weight": (v.out_hidden_size, merged), "visual.merger.mlp.2.bias": (v.out_hidden_size,)})
    return {**s, **base.gpt_llm_shapes(cfg.text)}


def views(cfg: ModelConfig, expert_layout: str = "hub") -> dict:
    return {}  # dense: every tensor a rule names is stored as it is


def rules(cfg: ModelConfig, pp_size: int) -> list[Rule]:
    """The MM tensors of Qwen2.5-VL, in the order a shard stores them."""
    r = [Rule("image_encoder.encoder.patch_embed.proj.weight", ("visual.patch_embed.proj.weight",), "vit", "first")]
    r += base.layer_rules("vit", VIT, HF_VIT, base.vit_attention_rows(cfg.vision.num_heads, norm_bias=False) + [
        ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "split_dim0", ("concat",)),
        ("mlp.linear_fc1.bias", ("mlp.gate_proj.bias", "mlp.up_proj.bias"), "split_dim0", ("concat",)),
        ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "split_dim1", ("concat",)),
        ("mlp.linear_fc2.bias", ("mlp.down_proj.bias",), "replicate", ("concat",)),
    ])
    r += [
        Rule("image_encoder.projector.layernorm.weight", ("visual.merger.ln_q.weight",), "vit", "last"),
        Rule("image_encoder.projector.encoder.linear_fc1.weight", ("visual.merger.mlp.0.weight",), "vit", "last", "split_dim0"),
        Rule("image_encoder.projector.encoder.linear_fc1.bias", ("visual.merger.mlp.0.bias",), "vit", "last", "split_dim0"),
        Rule("image_encoder.projector.encoder.linear_fc2.weight", ("visual.merger.mlp.2.weight",), "vit", "last", "split_dim1"),
        Rule("image_encoder.projector.encoder.linear_fc2.bias", ("visual.merger.mlp.2.bias",), "vit", "last"),
    ]
    return r + base.gpt_llm_rules(cfg.text, pp_size)
