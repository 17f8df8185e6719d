"""Qwen2-VL: the vision encoder with LayerNorm (weight and bias) and a plain quick_gelu MLP, full attention
per image (no windows), a LayerNorm patch merger, mrope; the LLM is Qwen2 (GQA with qkv bias).

MM names as MindSpeed-MM's Qwen2-VL converter has them (its ``qwen2vl.py``): the vision block's norms keep
their biases, ``mlp.fc1`` / ``mlp.fc2`` become ``linear_fc1`` / ``linear_fc2`` (fc1 is not gated, so a TP split
is a plain contiguous cut), the merger's ``ln_q`` is the projector's ``layernorm`` with its bias.
"""
from __future__ import annotations

from . import base
from .base import (HF_VIT, KEY_SCHEMES, LAYER_PREFIXES, TIED_PAIR, TRAINABLE, VIT, ModelConfig, VisionConfig,  # noqa: F401
                   Rule)

NAME = "Qwen2-VL"
CONVERTER = "Qwen2VLConverter"
MODEL_TYPES = ("qwen2_vl",)
HF_CLASSES = {"qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration")}  # model_type -> transformers config and model classes
PUBLISHED = {s: f"qwen2_vl_{s}.json" for s in ("2b", "7b", "72b")}
TINY = {"": "tiny_qwen2_vl.json"}
HUB_SCHEME = "legacy"  # the key scheme of the published files
HF_PROCESSOR = "Qwen2VLProcessor"
MM_MODEL_IDS = {"vision_encoder": "qwen2vit", "vision_projector": "lnmlp", "text_decoder": "qwen2lm"}


def config_from_hf(cfg: dict, source: str = "config.json") -> ModelConfig:
    base.check_model_type(cfg, MODEL_TYPES, NAME, source)
    text, vis = base.text_section(cfg), base.vision_section(cfg, source, NAME)
    need = lambda key: base.need(vis, key, "vision_config.", source)  # noqa: E731
    embed = need("embed_dim")
    vision = VisionConfig(
        **base.vision_fields(vis, text, source, 14), hidden_size=embed,
        intermediate_size=int(embed * vis.get("mlp_ratio", 4)), out_hidden_size=vis.get("hidden_size", text.get("hidden_size")),
        norm="layer", mlp="plain", act=vis.get("hidden_act", "quick_gelu"), merger_norm="layer")
    t = base.text_config_from_hf(text, source, tie_word_embeddings=base.tied_flag(cfg), qkv_bias=True)
    return base.model_config(NAME, cfg, vision, t, source)


def tp_divisible(cfg: ModelConfig) -> list[tuple[str, str, int]]:
    v = cfg.vision
    return base.llm_tp_divisible(cfg.text) + [
        ("vit", "vision num_heads", v.num_heads), ("vit", "vision MLP size (embed_dim x mlp_ratio)", v.intermediate_size),
        ("vit", "projector hidden size (vision embed_dim x spatial_merge_size^2)", v.merged_size)]


def hf_shapes(cfg: ModelConfig, expert_layout: str = "hub") -> dict[str, tuple[int, ...]]:
    v = cfg.vision
    vh, f, merged = v.hidden_size, v.intermediate_size, v.merged_size
    s = {"visual.patch_embed.proj.weight": (vh, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)}
    s.update(base.vit_block_shapes(v, {
        **base.vit_attention_shapes(v, norm_bias=True), "mlp.fc1.weight": (f, vh), "mlp.fc1.bias": (f,), "mlp.fc2.weight": (vh, f),
        "mlp.fc2.bias": (vh,)}))
    s.update({"visual.merger.ln_q.weight": (vh,), "visual.merger.ln_q.bias": (vh,),
              "visual.merger.mlp.0.weight": (merged, merged), "visual.merger.mlp.0.bias": (merged,),
              "visual.merger.mlp.2.weight": (v.out_hidden_size, merged), "visual.merger.mlp.2.bias": (v.out_hidden_size,)})
    return {**s, **base.gpt_llm_shapes(cfg.text)}


def views(cfg: ModelConfig, expert_layout: str = "hub") -> dict:
    return {}  # dense: every tensor a rule names is stored as it is


def rules(cfg: ModelConfig, pp_size: int) -> list[Rule]:
    r = [Rule("image_encoder.encoder.patch_embed.proj.weight", ("visual.patch_embed.proj.weight",), "vit", "first")]
    r += base.layer_rules("vit", VIT, HF_VIT, base.vit_attention_rows(cfg.vision.num_heads, norm_bias=True) + [
        ("mlp.linear_fc1.weight", ("mlp.fc1.weight",), "split_dim0", ("concat",)),
        ("mlp.linear_fc1.bias", ("mlp.fc1.bias",), "split_dim0", ("concat",)),
        ("mlp.linear_fc2.weight", ("mlp.fc2.weight",), "split_dim1", ("concat",)),
        ("mlp.linear_fc2.bias", ("mlp.fc2.bias",), "replicate", ("concat",)),
    ])
    r += [
        Rule("image_encoder.projector.layernorm.weight", ("visual.merger.ln_q.weight",), "vit", "last"),
        Rule("image_encoder.projector.layernorm.bias", ("visual.merger.ln_q.bias",), "vit", "last"),
        Rule("image_encoder.projector.encoder.linear_fc1.weight", ("visual.merger.mlp.0.weight",), "vit", "last", "split_dim0"),
        Rule("image_encoder.projector.encoder.linear_fc1.bias", ("visual.merger.mlp.0.bias",), "vit", "last", "split_dim0"),
        Rule("image_encoder.projector.encoder.linear_fc2.weight", ("visual.merger.mlp.2.weight",), "vit", "last", "split_dim1"),
        Rule("image_encoder.projector.encoder.linear_fc2.bias", ("visual.merger.mlp.2.bias",), "vit", "last"),
    ]
    return r + base.gpt_llm_rules(cfg.text, pp_size)
