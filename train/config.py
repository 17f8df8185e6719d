"""The runtime's model description, read from an HF ``config.json`` (by the family's spec in
mm_convert/models) or from a MindSpeed-MM model / inference json (``image_encoder`` / ``text_decoder``).

Both map onto ``mm_convert.models.base.ModelConfig``, the one architecture description the converter and the
runtime share, so the runtime never looks at either format again.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from mm_convert.errors import ConfigError
from mm_convert.models import FAMILIES, spec_for_model_type
from mm_convert.models.base import ModelConfig, TextConfig, VisionConfig

__all__ = ["ModelConfig", "TextConfig", "VisionConfig", "from_hf", "from_mm", "to_mm", "mm_pipeline_layers", "spec_of"]

_NORMS = {"rms": "RMSNorm", "layer": "LayerNorm"}


def read_hf_config(cfg: dict | str | os.PathLike) -> tuple[dict, str]:
    if isinstance(cfg, dict):
        return cfg, "HF config"
    path = Path(cfg)
    path = path / "config.json" if path.is_dir() else path
    if not path.exists():
        raise ConfigError(f"{path}: no HF config.json")
    return json.loads(path.read_text()), str(path)


def from_hf(cfg: dict | str | os.PathLike) -> ModelConfig:
    """The architecture of an HF config (a dict, a config.json or its directory), read by its family's spec."""
    cfg, source = read_hf_config(cfg)
    spec = spec_for_model_type(cfg.get("model_type"))
    if spec is None:
        known = sorted(t for f in FAMILIES for t in f.MODEL_TYPES)
        raise ConfigError(f"{source}: model_type {cfg.get('model_type')!r} is not a supported family ({', '.join(known)})")
    return spec.config_from_hf(cfg, source)


def spec_of(cfg: ModelConfig):
    """The family module a ModelConfig was read for."""
    for f in FAMILIES:
        if f.NAME == cfg.family:
            return f
    raise ConfigError(f"model family {cfg.family!r} is not one of {', '.join(f.NAME for f in FAMILIES)}")


def _family_of_mm(td: dict) -> str:
    model_id = td.get("model_id", "qwen2_5_lm")
    for f in FAMILIES:
        if f.MM_MODEL_IDS.get("text_decoder") == model_id:
            return f.NAME
    raise ConfigError(f"MM model json: text_decoder.model_id {model_id!r} is not a supported family")


def from_mm(cfg: dict) -> ModelConfig:
    """The architecture of a MindSpeed-MM model / inference json. Fields MindSpeed-MM's Qwen2.5-VL jsons
    leave out take Qwen2.5-VL's values."""
    try:
        enc = cfg["image_encoder"]["vision_encoder"]
        proj = cfg["image_encoder"]["vision_projector"]
        td = cfg["text_decoder"]
        norm = {v: k for k, v in _NORMS.items()}
        vision = VisionConfig(
            depth=enc["num_layers"], hidden_size=enc["hidden_size"], intermediate_size=enc["ffn_hidden_size"],
            num_heads=enc["num_attention_heads"], out_hidden_size=proj["hidden_size"],
            in_channels=enc.get("in_channels", 3), patch_size=enc.get("patch_size", 14),
            temporal_patch_size=enc.get("temporal_patch_size", 2),
            spatial_merge_size=enc.get("spatial_merge_size", 2), window_size=enc.get("window_attn_size", 112),
            fullatt_block_indexes=tuple(enc.get("fullatt_block_indexes", ())),
            tokens_per_second=enc.get("tokens_per_second", 2), eps=enc.get("layernorm_epsilon", 1e-6),
            norm=norm[enc.get("normalization", "RMSNorm")], mlp="glu" if enc.get("gated_linear_unit", True) else "plain",
            act=enc.get("activation_func", "silu"), patch_bias=bool(enc.get("patch_bias", False)),
            num_position_embeddings=enc.get("num_position_embeddings", 0),
            deepstack_indexes=tuple(enc.get("deepstack_visual_indexes", ())),
            merger_norm=norm[proj.get("normalization", "RMSNorm")], merger_act=proj.get("activation_func", "gelu"))
        experts = td.get("num_moe_experts") or 0
        txt = TextConfig(
            num_layers=td["num_layers"], hidden_size=td["hidden_size"], intermediate_size=td["ffn_hidden_size"],
            num_heads=td["num_attention_heads"],
            num_kv_heads=td.get("num_query_groups") or td["num_attention_heads"], vocab_size=td["vocab_size"],
            mrope_section=tuple(td.get("mrope_section", (16, 24, 24))), rope_theta=td.get("rope_theta", 1e6),
            eps=td.get("layernorm_epsilon", 1e-6),
            tie_word_embeddings=not td.get("untie_embeddings_and_output_weights", True),
            head_dim_override=td.get("kv_channels") or 0, qkv_bias=bool(td.get("add_qkv_bias", True)),
            qk_norm=bool(td.get("qk_layernorm", False)), mrope_interleaved=bool(td.get("mrope_interleaved", False)),
            num_experts=experts, experts_per_token=td.get("moe_router_topk") or 0,
            moe_intermediate_size=td.get("moe_ffn_hidden_size") or 0, norm_topk_prob=bool(td.get("norm_topk_prob", True)),
            moe_layers=tuple(td.get("moe_layers", range(td["num_layers"]) if experts else ())))
    except KeyError as e:
        raise ConfigError(f"MM model json: missing field {e.args[0]!r}") from None
    gen = cfg.get("generation_config") or {}
    eos = gen.get("eos_token_id")
    return ModelConfig(vision, txt, family=_family_of_mm(td), dtype=cfg.get("dtype", "bfloat16"),
                       image_token_id=cfg.get("img_context_token_id", 151655),
                       video_token_id=cfg.get("video_token_id", gen.get("video_token_id", 151656)),
                       vision_start_token_id=cfg.get("vision_start_token_id", gen.get("vision_start_token_id", 151652)),
                       eos_token_ids=tuple(eos if isinstance(eos, list) else [eos] if eos is not None else []))


def to_mm(cfg: ModelConfig, llm_pp_layers, vit_pp_layers) -> dict:
    """The ``image_encoder`` / ``text_decoder`` blocks of a MindSpeed-MM model or inference json (inverse of
    ``from_mm``), with ``pipeline_num_layers`` set to the given layout."""
    v, t = cfg.vision, cfg.text
    ids = spec_of(cfg).MM_MODEL_IDS
    td = {
        "model_id": ids["text_decoder"], "num_layers": t.num_layers, "pipeline_num_layers": llm_pp_layers,
        "hidden_size": t.hidden_size, "ffn_hidden_size": t.intermediate_size,
        "num_attention_heads": t.num_heads, "group_query_attention": True, "num_query_groups": t.num_kv_heads,
        "vocab_size": t.vocab_size, "position_embedding_type": "mrope", "mrope_section": list(t.mrope_section),
        "rope_theta": t.rope_theta, "untie_embeddings_and_output_weights": not t.tie_word_embeddings,
        "add_qkv_bias": t.qkv_bias, "add_bias_linear": False, "normalization": "RMSNorm", "layernorm_epsilon": t.eps,
        "activation_func": "silu", "gated_linear_unit": True}
    if t.head_dim_override:
        td["kv_channels"] = t.head_dim_override
    if t.qk_norm:
        td["qk_layernorm"] = True
    if t.mrope_interleaved:
        td["mrope_interleaved"] = True
    if t.num_experts:
        td.update({"num_moe_experts": t.num_experts, "moe_router_topk": t.experts_per_token,
                   "moe_ffn_hidden_size": t.moe_intermediate_size, "norm_topk_prob": t.norm_topk_prob,
                   "moe_layers": list(t.moe_layers)})
    enc = {
        "model_id": ids["vision_encoder"], "num_layers": v.depth, "pipeline_num_layers": vit_pp_layers,
        "hidden_size": v.hidden_size, "ffn_hidden_size": v.intermediate_size,
        "num_attention_heads": v.num_heads, "in_channels": v.in_channels, "patch_size": v.patch_size,
        "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size,
        "window_attn_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
        "tokens_per_second": v.tokens_per_second, "normalization": _NORMS[v.norm], "layernorm_epsilon": v.eps,
        "activation_func": v.act, "gated_linear_unit": v.mlp == "glu"}
    if v.patch_bias:
        enc["patch_bias"] = True
    if v.num_position_embeddings:
        enc["num_position_embeddings"] = v.num_position_embeddings
    if v.deepstack_indexes:
        enc["deepstack_visual_indexes"] = list(v.deepstack_indexes)
    return {
        "img_context_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id, "dtype": cfg.dtype,
        "image_encoder": {
            "vision_encoder": enc,
            "vision_projector": {
                "model_id": ids["vision_projector"], "input_size": v.hidden_size, "hidden_size": v.out_hidden_size,
                "ffn_hidden_size": v.merged_size, "activation_func": v.merger_act,
                "normalization": _NORMS[v.merger_norm], "layernorm_epsilon": 1e-6, "add_bias_linear": True},
        },
        "text_decoder": td,
    }


def mm_pipeline_layers(cfg: dict) -> tuple[list, list]:
    """(llm_pp_layers, vit_pp_layers) from a MindSpeed-MM json's ``pipeline_num_layers`` fields."""
    enc = cfg["image_encoder"]["vision_encoder"]
    td = cfg["text_decoder"]
    return td.get("pipeline_num_layers", [td["num_layers"]]), enc.get("pipeline_num_layers", [enc["num_layers"]])


# the call sites' spelling: ModelConfig.from_hf(...) / ModelConfig.from_mm(...)
ModelConfig.from_hf = staticmethod(from_hf)
ModelConfig.from_mm = staticmethod(from_mm)
