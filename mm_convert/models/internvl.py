"""InternVL 2.5 / 3 in transformers' native format (``InternVLForConditionalGeneration``, the ``OpenGVLab/InternVL3-*-hf``
checkpoints): an InternViT vision tower, a pixel-shuffle projector and a Qwen2 (or Llama / Qwen3) LLM.

Vision (InternViT-300M / -6B): a patch embedding with bias, a class token and a learned absolute position
embedding (``[1, 1 + patches, hidden]``) at the first vision position; blocks of LayerNorm (300M) or RMSNorm (6B),
attention with separate q / k / v projections (bias: 300M; none: 6B), RMS norms over the whole hidden size on q and
k (6B's qk_normalization), a plain gelu MLP, and layer scale: ``lambda_1`` / ``lambda_2`` scale the attention and MLP
outputs before each residual add. Without mean pooling a final LayerNorm follows the last block. Projector: pixel
shuffle (2 x 2 patches -> one token of 4 x hidden, ``downsample_ratio`` 0.5), LayerNorm, linear_1, gelu, linear_2.

MM names as MindSpeed-MM's InternVL converter has them (its ``checkpoint/vlm_model/converters/internvl.py``, written
for the original ``InternVLChatModel`` files, whose names map one to one onto these): ``image_encoder.encoder.``
+ ``embeddings.{class_embedding, patch_embedding, position_embedding}``, blocks under
``image_encoder.encoder.encoder.layers.N.`` with ``ls1`` / ``ls2`` (the original's names of ``lambda_1`` /
``lambda_2``), ``self_attention.{linear_qkv, q_layernorm, k_layernorm, linear_proj}``, ``input_layernorm``,
``pre_mlp_layernorm``, ``mlp.linear_fc1`` / ``linear_fc2``; projector ``image_encoder.projector.{norm, linear_fc1,
linear_fc2}`` (the original's ``mlp1.0 / 1 / 3``), replicated over TP as MindSpeed-MM leaves it; the LLM is the
Megatron GPT decoder of every family. The vision ``linear_qkv`` is MindSpeed-MM's: the original fused ``qkv``
[q; k; v] (transformers splits it into q_proj / k_proj / v_proj), each TP rank holding [its q heads; its k heads;
its v heads]. Where MindSpeed-MM has no name (the final LayerNorm without mean pooling) we follow Megatron's
TransformerBlock: ``image_encoder.encoder.encoder.final_layernorm`` (docs/format.md).
"""
from __future__ import annotations

from dataclasses import replace

from . import base
from .base import TIED_PAIR, TRAINABLE, ModelConfig, Rule, VisionConfig  # noqa: F401
from ..errors import ConfigError

NAME = "InternVL"
CONVERTER = "InternVLConverter"  # MindSpeed-MM's name
MODEL_TYPES = ("internvl",)
HF_CLASSES = {"internvl": ("InternVLConfig", "InternVLForConditionalGeneration")}
TINY = {"": "tiny_internvl.json", "6b": "tiny_internvl_6b.json"}  # "6b": InternViT-6B's block kind (RMSNorm, q/k norms, no qkv bias, a final norm), a Llama LLM
# InternVL3 and InternVL2.5 (the -hf conversions are of the MPO checkpoints) 1B / 8B / 38B / 78B
PUBLISHED = {**{s: f"internvl3_{s}.json" for s in ("1b", "8b", "38b", "78b")},
             **{f"{s}_v2_5": f"internvl2_5_{s}.json" for s in ("1b", "8b", "38b", "78b")}}
HF_PROCESSOR = "InternVLProcessor"
# The tiny checkpoints' tokenizer and image processor (ids 300..: the tiny configs' image_token_id is <IMG_CONTEXT>),
# in the form of the -hf checkpoints' files: extra special tokens naming the image tokens, InternVL's chat template
# (an image is one <IMG_CONTEXT> the processor expands), GotOcr2's image processor cropping to 448-style tiles.
TINY_PROCESSOR = {
    "special_tokens": ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<video>", "<IMG_CONTEXT>",
                       "<quad>"),
    "extra_special_tokens": {"start_image_token": "<img>", "end_image_token": "</img>",
                             "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    "chat_template": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
        "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}{% elif content['type'] == 'text' %}"
        "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"),
    "image_processor": {"image_processor_type": "GotOcr2ImageProcessor", "crop_to_patches": False, "min_patches": 1,
                        "max_patches": 4, "do_resize": True, "size": {"height": 56, "width": 56}, "resample": 3,
                        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
                        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
}
MM_MODEL_IDS = {"vision_encoder": "InternViT", "vision_projector": "InternVLMLP", "text_decoder": "internllm"}
TEXT_MODEL_TYPES = ("qwen2", "llama", "qwen3")  # the decoders the Megatron GPT layer describes

# The hub's files (and transformers 5's saves) name the LLM ``language_model.model.*`` / ``language_model.lm_head``,
# the vision tower ``vision_tower.*`` and the projector ``multi_modal_projector.*``: these are the legacy names here.
# The other scheme is transformers' module tree (``model.language_model.*``, ``lm_head``), as some tools save it.
HUB_SCHEME = "legacy"
KEY_SCHEMES = {"legacy": (), "new": (("model.language_model.", "language_model.model."),
                                     ("model.vision_tower.", "vision_tower."),
                                     ("model.multi_modal_projector.", "multi_modal_projector."),
                                     ("lm_head.", "language_model.lm_head."))}
LAYER_PREFIXES = {"vit": "image_encoder.encoder.encoder.layers.", "llm": base.LAYER_PREFIXES["llm"]}
VIT = "image_encoder.encoder.encoder.layers.{i}."
HF_VIT = "vision_tower.encoder.layer.{i}."
EMB = "image_encoder.encoder.embeddings."
HF_EMB = "vision_tower.embeddings."
PROJ = "multi_modal_projector."


def _llm_name(name: str) -> str:
    """A name of the GPT decoder's rules (``model.*``, ``lm_head.*``) as this family's files spell it."""
    for old, new in (("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _pair(value, key: str, source: str) -> int:
    """A square size given as an int or [h, w] (transformers writes lists)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{source}: vision_config.{key} {list(value)}: only square sizes are supported")
        value = value[0]
    return int(value)


def config_from_hf(cfg: dict, source: str = "config.json") -> ModelConfig:
    base.check_model_type(cfg, MODEL_TYPES, NAME, source)
    vis = base.vision_section(cfg, source, NAME)
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{source}: text_config missing; expected an {NAME} config with a text_config section")
    kind = text.get("model_type", "qwen2")
    if kind not in TEXT_MODEL_TYPES:
        raise ConfigError(f"{source}: text_config.model_type {kind!r} is not supported (expected one of "
                          f"{', '.join(TEXT_MODEL_TYPES)})")
    if vis.get("use_mask_token"):
        raise ConfigError(f"{source}: vision_config.use_mask_token true: the mask token is not part of InternVL's "
                          f"published checkpoints and is not supported")
    need = lambda key: base.need(vis, key, "vision_config.", source)  # noqa: E731
    ratio = float(cfg.get("downsample_ratio", 0.5))
    merge = round(1 / ratio)
    if abs(merge * ratio - 1) > 1e-6:
        raise ConfigError(f"{source}: downsample_ratio {ratio}: only 1 / integer ratios are supported")
    patch, image = _pair(vis.get("patch_size", 14), "patch_size", source), _pair(vis.get("image_size", 448), "image_size", source)
    grid = image // patch
    vision = VisionConfig(
        depth=need("num_hidden_layers"), hidden_size=need("hidden_size"), intermediate_size=need("intermediate_size"),
        num_heads=need("num_attention_heads"), out_hidden_size=base.need(text, "hidden_size", "text_config.", source),
        in_channels=vis.get("num_channels", 3), patch_size=patch, temporal_patch_size=1, spatial_merge_size=merge,
        eps=vis.get("layer_norm_eps", 1e-6), norm="rms" if vis.get("norm_type", "layer_norm") == "rms_norm" else "layer",
        mlp="plain", act=vis.get("hidden_act", "gelu"), patch_bias=True,
        num_position_embeddings=grid * grid + 1 if vis.get("use_absolute_position_embeddings", True) else 0,
        merger_norm="layer", merger_act=cfg.get("projector_hidden_act", "gelu"),
        block="intern", qk_norm=bool(vis.get("use_qk_norm", False)), qkv_bias=bool(vis.get("attention_bias", False)),
        image_size=image, final_norm=not vis.get("use_mean_pooling", True), projector="pixel_shuffle",
        feature_layer=int(cfg.get("vision_feature_layer", -1)))
    qwen2 = kind == "qwen2"
    t = base.text_config_from_hf(
        text, source, tie_word_embeddings=base.tied_flag(cfg), head_dim_override=text.get("head_dim") or 0,
        qkv_bias=True if qwen2 else bool(text.get("attention_bias", False)), qk_norm=kind == "qwen3", rope="1d")
    t = replace(t, mrope_section=(t.head_dim // 2,))  # one band: every rotary frequency from the one position
    if text.get("mlp_bias"):
        raise ConfigError(f"{source}: text_config.mlp_bias true is not supported (the GPT decoder's MLP has no bias)")
    eos = text.get("eos_token_id")
    out = ModelConfig(vision, t, family=NAME, dtype=base.dtype_of(cfg), image_token_id=cfg.get("image_token_id", 151667),
                      video_token_id=cfg.get("image_token_id", 151667), vision_start_token_id=-1,
                      eos_token_ids=tuple(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                      image_seq_length=int(cfg.get("image_seq_length", (grid // merge) ** 2)))
    base.check_heads(out, source)
    return out


def tp_divisible(cfg: ModelConfig) -> list[tuple[str, str, int]]:
    """Whole vision heads per TP rank (the q, k and v parts of linear_qkv are each cut), the MLP; the projector is
    replicated."""
    v = cfg.vision
    return base.llm_tp_divisible(cfg.text) + [
        ("vit", "vision num_attention_heads", v.num_heads), ("vit", "vision intermediate_size", v.intermediate_size)]


def hf_shapes(cfg: ModelConfig, expert_layout: str = "hub") -> dict[str, tuple[int, ...]]:
    v = cfg.vision
    h, f, merged, out_h = v.hidden_size, v.intermediate_size, v.merged_size, v.out_hidden_size
    s = {HF_EMB + "cls_token": (1, 1, h),
         HF_EMB + "patch_embeddings.projection.weight": (h, v.in_channels, v.patch_size, v.patch_size),
         HF_EMB + "patch_embeddings.projection.bias": (h,)}
    if v.num_position_embeddings:
        s[HF_EMB + "position_embeddings"] = (1, v.num_position_embeddings, h)
    block = {"lambda_1": (h,), "lambda_2": (h,), "layernorm_before.weight": (h,), "layernorm_after.weight": (h,),
             "attention.q_proj.weight": (h, h), "attention.k_proj.weight": (h, h), "attention.v_proj.weight": (h, h),
             "attention.projection_layer.weight": (h, h), "attention.projection_layer.bias": (h,),
             "mlp.fc1.weight": (f, h), "mlp.fc1.bias": (f,), "mlp.fc2.weight": (h, f), "mlp.fc2.bias": (h,)}
    if v.norm == "layer":
        block.update({"layernorm_before.bias": (h,), "layernorm_after.bias": (h,)})
    if v.qkv_bias:
        block.update({f"attention.{p}_proj.bias": (h,) for p in "qkv"})
    if v.qk_norm:
        block.update({"attention.q_norm.weight": (h,), "attention.k_norm.weight": (h,)})
    s.update({HF_VIT.format(i=n) + k: shape for n in range(v.depth) for k, shape in block.items()})
    if v.final_norm:
        s.update({"vision_tower.layernorm.weight": (h,), "vision_tower.layernorm.bias": (h,)})
    s.update({PROJ + "layer_norm.weight": (merged,), PROJ + "layer_norm.bias": (merged,),
              PROJ + "linear_1.weight": (out_h, merged), PROJ + "linear_1.bias": (out_h,),
              PROJ + "linear_2.weight": (out_h, out_h), PROJ + "linear_2.bias": (out_h,)})
    return {**s, **{_llm_name(k): shape for k, shape in base.gpt_llm_shapes(cfg.text).items()}}


def views(cfg: ModelConfig, expert_layout: str = "hub") -> dict:
    return {}  # dense: every tensor a rule names is stored as it is


def rules(cfg: ModelConfig, pp_size: int) -> list[Rule]:
    """The MM tensors of InternVL, in the order a shard stores them (a block's own parameters ls1 / ls2 first,
    as a Megatron layer module holds them)."""
    v = cfg.vision
    r = [Rule(EMB + "class_embedding", (HF_EMB + "cls_token",), "vit", "first"),
         Rule(EMB + "patch_embedding.weight", (HF_EMB + "patch_embeddings.projection.weight",), "vit", "first"),
         Rule(EMB + "patch_embedding.bias", (HF_EMB + "patch_embeddings.projection.bias",), "vit", "first")]
    if v.num_position_embeddings:
        r.append(Rule(EMB + "position_embedding", (HF_EMB + "position_embeddings",), "vit", "first"))
    norm = lambda mm, hf: [(f"{mm}.weight", (f"{hf}.weight",), "replicate", ("concat",))] + (  # noqa: E731
        [(f"{mm}.bias", (f"{hf}.bias",), "replicate", ("concat",))] if v.norm == "layer" else [])
    qkv = [f"attention.{p}_proj" for p in "qkv"]
    table = [("ls1", ("lambda_1",), "replicate", ("concat",)), ("ls2", ("lambda_2",), "replicate", ("concat",))]
    table += norm("input_layernorm", "layernorm_before")
    table += [("self_attention.linear_proj.weight", ("attention.projection_layer.weight",), "split_dim1", ("concat",)),
              ("self_attention.linear_proj.bias", ("attention.projection_layer.bias",), "replicate", ("concat",)),
              # [q_r; k_r; v_r] per TP rank: each part cut in whole heads
              ("self_attention.linear_qkv.weight", tuple(p + ".weight" for p in qkv), "split_dim0", ("concat",))]
    if v.qkv_bias:
        table.append(("self_attention.linear_qkv.bias", tuple(p + ".bias" for p in qkv), "split_dim0", ("concat",)))
    if v.qk_norm:  # over the whole hidden size (all heads): replicated
        table += [("self_attention.q_layernorm.weight", ("attention.q_norm.weight",), "replicate", ("concat",)),
                  ("self_attention.k_layernorm.weight", ("attention.k_norm.weight",), "replicate", ("concat",))]
    table += norm("pre_mlp_layernorm", "layernorm_after")
    table += [("mlp.linear_fc1.weight", ("mlp.fc1.weight",), "split_dim0", ("concat",)),
              ("mlp.linear_fc1.bias", ("mlp.fc1.bias",), "split_dim0", ("concat",)),
              ("mlp.linear_fc2.weight", ("mlp.fc2.weight",), "split_dim1", ("concat",)),
              ("mlp.linear_fc2.bias", ("mlp.fc2.bias",), "replicate", ("concat",))]
    r += base.layer_rules("vit", VIT, HF_VIT, table)
    if v.final_norm:
        r += [Rule("image_encoder.encoder.encoder.final_layernorm.weight", ("vision_tower.layernorm.weight",), "vit", "last"),
              Rule("image_encoder.encoder.encoder.final_layernorm.bias", ("vision_tower.layernorm.bias",), "vit", "last")]
    r += [Rule("image_encoder.projector." + mm, (PROJ + hf,), "vit", "last")
          for mm, hf in (("norm.weight", "layer_norm.weight"), ("norm.bias", "layer_norm.bias"),
                         ("linear_fc1.weight", "linear_1.weight"), ("linear_fc1.bias", "linear_1.bias"),
                         ("linear_fc2.weight", "linear_2.weight"), ("linear_fc2.bias", "linear_2.bias"))]
    return r + [replace(rule, hf=tuple(_llm_name(h) for h in rule.hf)) for rule in base.gpt_llm_rules(cfg.text, pp_size)]
