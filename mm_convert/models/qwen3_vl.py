"""Qwen3-VL, dense (2B-32B) and MoE (30B-A3B, 235B-A22B), in MindSpeed-MM's Megatron layout.

Vision: patch embedding with bias, a learned position embedding (``pos_embed``, first vision position),
LayerNorm blocks with a plain gelu MLP, a LayerNorm patch merger, and deepstack mergers whose inputs are the
outputs of the blocks in ``deepstack_visual_indexes``: MindSpeed-MM stores merger K inside block
``deepstack_visual_indexes[K]`` as ``deepstack_layer``, so it travels with that block through the pipeline.
LLM: Qwen3 (GQA without qkv bias, q/k RMSNorms over head_dim, explicit head_dim, interleaved mrope); the
MoE layers have a router (``mlp.gate`` -> ``mlp.router``) and experts stored by HF as fused 3-D tensors, one
``local_experts.N.linear_fc1`` / ``linear_fc2`` per expert in MM (split over EP ranks, then TP like any MLP).
"""
from __future__ import annotations

from . import base
from .base import (HF_VIT, KEY_SCHEMES, LAYER_PREFIXES, TIED_PAIR, TRAINABLE, VIT, ModelConfig, VisionConfig,  # noqa: F401
                   Rule)

NAME = "Qwen3-VL"
CONVERTER = "Qwen3VLMegatronConverter"
DCP_CONVERTER = "Qwen3VLConverter"  # MindSpeed-MM's FSDP2 path: torch.distributed.checkpoint directories
MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")
HF_CLASSES = {"qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
              "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration")}
TINY = {"": "tiny_qwen3_vl.json", "moe": "tiny_qwen3_vl_moe.json"}
PUBLISHED = {s: f"qwen3_vl_{s}.json" for s in ("2b", "8b", "32b", "30b_a3b", "235b_a22b")}
HUB_SCHEME = "new"  # the key scheme of the published files (model.visual.*, model.language_model.*)
HF_PROCESSOR = "Qwen3VLProcessor"
MM_MODEL_IDS = {"vision_encoder": "qwen3vit", "vision_projector": "lnmlp", "text_decoder": "qwen3lm"}
FUSED_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # 3-D HF tensors, all experts in one
DCP_PREFIX = "model."  # MindSpeed-MM's FSDP2 state dict: the HF model under "model", keys as the hub writes them
DCP_KEY_SCHEME = HUB_SCHEME  # the HF key scheme of the keys after DCP_PREFIX (hf_to_dcp / dcp_to_hf)
DCP_TIED_COPY = "lm_head.weight"  # legacy name; a tied model's FSDP2 save may hold it too (the embeddings' copy)


def config_from_hf(cfg: dict, source: str = "config.json") -> ModelConfig:
    base.check_model_type(cfg, MODEL_TYPES, NAME, source)
    text, vis = base.text_section(cfg), base.vision_section(cfg, source, NAME)
    need = lambda key: base.need(vis, key, "vision_config.", source)  # noqa: E731
    vision = VisionConfig(
        **base.vision_fields(vis, text, source, 16), hidden_size=need("hidden_size"),
        intermediate_size=need("intermediate_size"), out_hidden_size=vis.get("out_hidden_size", text.get("hidden_size")),
        norm="layer", mlp="plain", act=vis.get("hidden_act", "gelu_pytorch_tanh"), patch_bias=True,
        num_position_embeddings=need("num_position_embeddings"),
        deepstack_indexes=tuple(vis.get("deepstack_visual_indexes") or ()), merger_norm="layer")
    experts = text.get("num_experts") or text.get("num_local_experts") or 0  # transformers 5 writes the latter
    sparse = max(1, text.get("decoder_sparse_step") or 1)
    dense_only = set(text.get("mlp_only_layers") or ())
    layers = base.need(text, "num_hidden_layers", "", source)
    moe = tuple(i for i in range(layers) if experts and i not in dense_only and (i + 1) % sparse == 0)
    rope = base.rope_section(text)
    t = base.text_config_from_hf(
        text, source, tie_word_embeddings=base.tied_flag(cfg), head_dim_override=text.get("head_dim") or 0,
        qkv_bias=bool(text.get("attention_bias", False)), qk_norm=True,
        mrope_interleaved=bool(rope.get("mrope_interleaved", True)), num_experts=experts,
        experts_per_token=text.get("num_experts_per_tok") or 0,
        moe_intermediate_size=text.get("moe_intermediate_size") or 0,
        norm_topk_prob=bool(text.get("norm_topk_prob", True)), moe_layers=moe)
    return base.model_config(NAME, cfg, vision, t, source)


def tp_divisible(cfg: ModelConfig) -> list[tuple[str, str, int]]:
    v = cfg.vision
    out = base.llm_tp_divisible(cfg.text) + [
        ("vit", "vision num_heads", v.num_heads), ("vit", "vision MLP intermediate_size", v.intermediate_size),
        ("vit", "projector hidden size (vision hidden x spatial_merge_size^2)", v.merged_size)]
    if cfg.text.num_experts:
        out.append(("ep", "num_experts", cfg.text.num_experts))
    return out


def hf_shapes(cfg: ModelConfig, expert_layout: str = "hub") -> dict[str, tuple[int, ...]]:
    v = cfg.vision
    vh, f, merged, out_h = v.hidden_size, v.intermediate_size, v.merged_size, v.out_hidden_size
    s = {"visual.patch_embed.proj.weight": (vh, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
         "visual.patch_embed.proj.bias": (vh,), "visual.pos_embed.weight": (v.num_position_embeddings, vh)}
    s.update(base.vit_block_shapes(v, {
        **base.vit_attention_shapes(v, norm_bias=True), "mlp.linear_fc1.weight": (f, vh), "mlp.linear_fc1.bias": (f,),
        "mlp.linear_fc2.weight": (vh, f), "mlp.linear_fc2.bias": (vh,)}))
    s.update({"visual.merger.norm.weight": (vh,), "visual.merger.norm.bias": (vh,),
              "visual.merger.linear_fc1.weight": (merged, merged), "visual.merger.linear_fc1.bias": (merged,),
              "visual.merger.linear_fc2.weight": (out_h, merged), "visual.merger.linear_fc2.bias": (out_h,)})
    for k in range(len(v.deepstack_indexes)):
        d = f"visual.deepstack_merger_list.{k}."
        s.update({d + "norm.weight": (merged,), d + "norm.bias": (merged,),
                  d + "linear_fc1.weight": (merged, merged), d + "linear_fc1.bias": (merged,),
                  d + "linear_fc2.weight": (out_h, merged), d + "linear_fc2.bias": (out_h,)})
    return {**s, **base.gpt_llm_shapes(cfg.text, expert_layout)}


def views(cfg: ModelConfig, expert_layout: str = "hub"):
    return base.gpt_llm_views(cfg.text, expert_layout)


def dcp_experts(cfg: ModelConfig, expert_layout: str = "hub") -> dict[str, tuple[int, tuple[int, int], bool]]:
    """The fused 3-D expert tensors, which MindSpeed-MM's FSDP2 checkpoint stores viewed 2-D, in the hub layout:
    [E, A, B] as [E * A, B] (``gate_up_proj`` [E, hidden, 2 x moe_intermediate] as [E * hidden, 2 x
    moe_intermediate], ``down_proj`` [E, moe_intermediate, hidden] as [E * moe_intermediate, hidden]).
    Legacy name -> (E, (A, B), whether ``expert_layout`` holds each expert as the transpose of its hub [A, B])."""
    hub = base.gpt_llm_shapes(cfg.text, "hub")
    fused = sorted({v.real for v in views(cfg, "hub").values()})
    return {n: (hub[n][0], (hub[n][1], hub[n][2]), expert_layout != "hub") for n in fused}


def rules(cfg: ModelConfig, pp_size: int) -> list[Rule]:
    r = [Rule("image_encoder.encoder.patch_embed.proj.weight", ("visual.patch_embed.proj.weight",), "vit", "first"),
         Rule("image_encoder.encoder.patch_embed.proj.bias", ("visual.patch_embed.proj.bias",), "vit", "first"),
         Rule("image_encoder.encoder.pos_embed.weight", ("visual.pos_embed.weight",), "vit", "first")]
    r += base.layer_rules("vit", VIT, HF_VIT, base.vit_attention_rows(cfg.vision.num_heads, norm_bias=True) + [
        ("mlp.linear_fc1.weight", ("mlp.linear_fc1.weight",), "split_dim0", ("concat",)),
        ("mlp.linear_fc1.bias", ("mlp.linear_fc1.bias",), "split_dim0", ("concat",)),
        ("mlp.linear_fc2.weight", ("mlp.linear_fc2.weight",), "split_dim1", ("concat",)),
        ("mlp.linear_fc2.bias", ("mlp.linear_fc2.bias",), "replicate", ("concat",)),
    ])
    for k, block in enumerate(cfg.vision.deepstack_indexes):
        d = f"visual.deepstack_merger_list.{k}."
        r += [Rule(VIT + "deepstack_layer." + mm, (d + hf,), "vit", "layer", tp, layers=frozenset({block}))
              for mm, hf, tp in [("layernorm.weight", "norm.weight", "replicate"),
                                 ("layernorm.bias", "norm.bias", "replicate"),
                                 ("encoder.linear_fc1.weight", "linear_fc1.weight", "split_dim0"),
                                 ("encoder.linear_fc1.bias", "linear_fc1.bias", "split_dim0"),
                                 ("encoder.linear_fc2.weight", "linear_fc2.weight", "split_dim1"),
                                 ("encoder.linear_fc2.bias", "linear_fc2.bias", "replicate")]]
    r += [
        Rule("image_encoder.projector.layernorm.weight", ("visual.merger.norm.weight",), "vit", "last"),
        Rule("image_encoder.projector.layernorm.bias", ("visual.merger.norm.bias",), "vit", "last"),
        Rule("image_encoder.projector.encoder.linear_fc1.weight", ("visual.merger.linear_fc1.weight",), "vit", "last", "split_dim0"),
        Rule("image_encoder.projector.encoder.linear_fc1.bias", ("visual.merger.linear_fc1.bias",), "vit", "last", "split_dim0"),
        Rule("image_encoder.projector.encoder.linear_fc2.weight", ("visual.merger.linear_fc2.weight",), "vit", "last", "split_dim1"),
        Rule("image_encoder.projector.encoder.linear_fc2.bias", ("visual.merger.linear_fc2.bias",), "vit", "last"),
    ]
    return r + base.gpt_llm_rules(cfg.text, pp_size)
