"""The runtime's model description, read from an HF ``config.json`` or a MindSpeed-MM model/inference json.

Both sources map onto the same two dataclasses so that the runtime never looks at either format again.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mm_convert.errors import ConfigError


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int  # the LLM hidden size the projector maps to
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels per window side
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: int = 2
    rope_theta: float = 10000.0
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class TextConfig:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    mrope_section: tuple[int, ...] = (16, 24, 24)
    rope_theta: float = 1000000.0
    eps: float = 1e-6
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig
    text: TextConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of ``to_dict`` (how workers receive the config)."""
        v, t = dict(d["vision"]), dict(d["text"])
        v["fullatt_block_indexes"] = tuple(v["fullatt_block_indexes"])
        t["mrope_section"] = tuple(t["mrope_section"])
        rest = {k: (tuple(x) if isinstance(x, list) else x) for k, x in d.items() if k not in ("vision", "text")}
        return cls(VisionConfig(**v), TextConfig(**t), **rest)

    # ---- HF config.json (flat hub format or nested text_config) ---------------------------------------------
    @classmethod
    def from_hf(cls, cfg: dict | str | os.PathLike) -> "ModelConfig":
        if not isinstance(cfg, dict):
            path = Path(cfg)
            path = path / "config.json" if path.is_dir() else path
            if not path.exists():
                raise ConfigError(f"{path}: no HF config.json")
            cfg = json.loads(path.read_text())
        text = {**cfg, **cfg.get("text_config", {})}  # nested text_config wins over top-level leftovers
        vis = cfg.get("vision_config")
        if not vis:
            raise ConfigError("HF config: no vision_config (not a Qwen2.5-VL config?)")
        rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
        try:
            vision = VisionConfig(
                depth=vis["depth"], hidden_size=vis["hidden_size"], intermediate_size=vis["intermediate_size"],
                num_heads=vis["num_heads"], out_hidden_size=vis["out_hidden_size"],
                in_channels=vis.get("in_channels", vis.get("in_chans", 3)), patch_size=vis.get("patch_size", 14),
                temporal_patch_size=vis.get("temporal_patch_size", 2),
                spatial_merge_size=vis.get("spatial_merge_size", 2), window_size=vis.get("window_size", 112),
                fullatt_block_indexes=tuple(vis.get("fullatt_block_indexes", ())),
                tokens_per_second=vis.get("tokens_per_second", 2),
                rope_theta=(vis.get("rope_parameters") or {}).get("rope_theta", 10000.0))
            txt = TextConfig(
                num_layers=text["num_hidden_layers"], hidden_size=text["hidden_size"],
                intermediate_size=text["intermediate_size"], num_heads=text["num_attention_heads"],
                num_kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
                vocab_size=text["vocab_size"], mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
                rope_theta=text.get("rope_theta", rope.get("rope_theta", 1000000.0)),
                eps=text.get("rms_norm_eps", 1e-6),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))))
        except KeyError as e:
            raise ConfigError(f"HF config: missing field {e.args[0]!r}") from None
        eos = text.get("eos_token_id")
        return cls(vision, txt, image_token_id=cfg.get("image_token_id", 151655),
                   video_token_id=cfg.get("video_token_id", 151656),
                   vision_start_token_id=cfg.get("vision_start_token_id", 151652),
                   eos_token_ids=tuple(eos if isinstance(eos, list) else [eos] if eos is not None else []))

    # ---- MindSpeed-MM model json / inference json --------------------------------------------------------------
    @classmethod
    def from_mm(cls, cfg: dict) -> "ModelConfig":
        try:
            enc = cfg["image_encoder"]["vision_encoder"]
            proj = cfg["image_encoder"]["vision_projector"]
            td = cfg["text_decoder"]
            vision = VisionConfig(
                depth=enc["num_layers"], hidden_size=enc["hidden_size"], intermediate_size=enc["ffn_hidden_size"],
                num_heads=enc["num_attention_heads"], out_hidden_size=proj["hidden_size"],
                in_channels=enc.get("in_channels", 3), patch_size=enc.get("patch_size", 14),
                temporal_patch_size=enc.get("temporal_patch_size", 2),
                spatial_merge_size=enc.get("spatial_merge_size", 2), window_size=enc.get("window_attn_size", 112),
                fullatt_block_indexes=tuple(enc.get("fullatt_block_indexes", ())),
                tokens_per_second=enc.get("tokens_per_second", 2), eps=enc.get("layernorm_epsilon", 1e-6))
            txt = TextConfig(
                num_layers=td["num_layers"], hidden_size=td["hidden_size"], intermediate_size=td["ffn_hidden_size"],
                num_heads=td["num_attention_heads"],
                num_kv_heads=td.get("num_query_groups") or td["num_attention_heads"], vocab_size=td["vocab_size"],
                mrope_section=tuple(td.get("mrope_section", (16, 24, 24))), rope_theta=td.get("rope_theta", 1e6),
                eps=td.get("layernorm_epsilon", 1e-6),
                tie_word_embeddings=not td.get("untie_embeddings_and_output_weights", True))
        except KeyError as e:
            raise ConfigError(f"MM model json: missing field {e.args[0]!r}") from None
        gen = cfg.get("generation_config") or {}
        eos = gen.get("eos_token_id")
        return cls(vision, txt, image_token_id=cfg.get("img_context_token_id", 151655),
                   video_token_id=cfg.get("video_token_id", gen.get("video_token_id", 151656)),
                   vision_start_token_id=cfg.get("vision_start_token_id", gen.get("vision_start_token_id", 151652)),
                   eos_token_ids=tuple(eos if isinstance(eos, list) else [eos] if eos is not None else []))


def to_mm(cfg: ModelConfig, llm_pp_layers, vit_pp_layers) -> dict:
    """The ``image_encoder`` / ``text_decoder`` blocks of a MindSpeed-MM model or inference json (inverse of
    ``ModelConfig.from_mm``), with ``pipeline_num_layers`` set to the given layout."""
    v, t = cfg.vision, cfg.text
    return {
        "img_context_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "image_encoder": {
            "vision_encoder": {
                "model_id": "qwen2vit", "num_layers": v.depth, "pipeline_num_layers": vit_pp_layers,
                "hidden_size": v.hidden_size, "ffn_hidden_size": v.intermediate_size,
                "num_attention_heads": v.num_heads, "in_channels": v.in_channels, "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size,
                "window_attn_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "tokens_per_second": v.tokens_per_second, "normalization": "RMSNorm", "layernorm_epsilon": v.eps,
                "activation_func": "silu", "gated_linear_unit": True},
            "vision_projector": {
                "model_id": "lnmlp", "input_size": v.hidden_size, "hidden_size": v.out_hidden_size,
                "ffn_hidden_size": v.hidden_size * v.spatial_merge_size ** 2, "activation_func": "gelu",
                "normalization": "RMSNorm", "layernorm_epsilon": 1e-6, "add_bias_linear": True},
        },
        "text_decoder": {
            "model_id": "qwen2_5_lm", "num_layers": t.num_layers, "pipeline_num_layers": llm_pp_layers,
            "hidden_size": t.hidden_size, "ffn_hidden_size": t.intermediate_size,
            "num_attention_heads": t.num_heads, "group_query_attention": True, "num_query_groups": t.num_kv_heads,
            "vocab_size": t.vocab_size, "position_embedding_type": "mrope", "mrope_section": list(t.mrope_section),
            "rope_theta": t.rope_theta, "untie_embeddings_and_output_weights": not t.tie_word_embeddings,
            "add_qkv_bias": True, "add_bias_linear": False, "normalization": "RMSNorm", "layernorm_epsilon": t.eps,
            "activation_func": "silu", "gated_linear_unit": True},
    }


def mm_pipeline_layers(cfg: dict) -> tuple[list, list]:
    """(llm_pp_layers, vit_pp_layers) from a MindSpeed-MM json's ``pipeline_num_layers`` fields."""
    enc = cfg["image_encoder"]["vision_encoder"]
    td = cfg["text_decoder"]
    return td.get("pipeline_num_layers", [td["num_layers"]]), enc.get("pipeline_num_layers", [enc["num_layers"]])
