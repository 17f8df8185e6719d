"""What a model family declares, and the architecture description every part of mm_convert reads.

A family is one module in this package that provides the names of ``ModelSpec`` (a Protocol: a module
satisfies it structurally) and one line in ``models/__init__.py``. Nothing outside ``models/`` names a
family's tensors: the planner walks ``rules``, the readers use ``key_schemes`` and ``layer_prefixes``, the
runtime builds its modules from ``ModelConfig`` (the architecture, read from ``config.json`` by
``config_from_hf``) and asks ``trainable`` / ``tied_pair`` which parameters are which.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence

from ..errors import ConfigError
from ..layout import VOCAB
from ..plan import Rule, View


# ---- the architecture, as the converter and the runtime read it ---------------------------------------------------
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
    window_size: int = 0  # pixels per window side; 0: every block attends over the whole image
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: int = 2
    rope_theta: float = 10000.0
    eps: float = 1e-6
    norm: str = "rms"          # "rms" (RMSNorm, weight) or "layer" (LayerNorm, weight and bias)
    mlp: str = "glu"           # "glu" (fc1 = [gate; up]) or "plain" (fc1 -> act -> fc2)
    act: str = "silu"          # silu, quick_gelu, gelu_tanh, gelu
    patch_bias: bool = False   # the patch embedding's conv has a bias
    num_position_embeddings: int = 0  # learned position embedding (interpolated to each grid); 0: none
    deepstack_indexes: tuple[int, ...] = ()  # vision blocks whose output feeds a deepstack merger
    merger_norm: str = "rms"   # norm of the patch merger
    merger_act: str = "gelu"
    # InternViT (block "intern"): a class token and learned absolute positions (num_position_embeddings = 1 +
    # patches of an image_size image), no rotary, layer scale on both residual branches, separate q / k / v
    block: str = "qwen"        # "qwen" (the Qwen-VL blocks) or "intern"
    qk_norm: bool = False      # RMSNorm over the whole hidden size on q and k (InternViT-6B)
    qkv_bias: bool = True      # (InternViT) q / k / v projections with bias
    image_size: int = 0        # (InternViT) the side of the image the learned position grid is for
    final_norm: bool = False   # (InternViT without mean pooling) a LayerNorm after the last block
    projector: str = "merger"  # "merger" (Qwen: norm, then an MLP per merged block) or "pixel_shuffle"
    # (InternVL: merge x merge patches shuffled into one token, then LayerNorm and the MLP)
    feature_layer: int = -1    # (InternVL) the block whose output feeds the projector (-1: the last)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merged_size(self) -> int:
        return self.hidden_size * self.spatial_merge_size ** 2


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
    head_dim_override: int = 0  # an explicit head_dim (Qwen3); 0: hidden_size // num_heads
    qkv_bias: bool = True
    qk_norm: bool = False       # RMSNorm over head_dim on q and k before rotary
    mrope_interleaved: bool = False
    num_experts: int = 0        # 0: dense
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[int, ...] = ()  # indices of the layers whose MLP is a mixture of experts
    rope: str = "mrope"         # "mrope" (3-axis positions) or "1d" (one position per token: InternVL)

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_heads

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig
    text: TextConfig
    family: str = ""
    dtype: str = "bfloat16"
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    image_seq_length: int = 0  # (InternVL) image tokens per tile: the LLM sees this many per 448 x 448 tile

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of ``to_dict`` (how workers receive the config)."""
        tup = lambda x: tuple(x) if isinstance(x, list) else x  # noqa: E731
        v = {k: tup(x) for k, x in d["vision"].items()}
        t = {k: tup(x) for k, x in d["text"].items()}
        rest = {k: tup(x) for k, x in d.items() if k not in ("vision", "text")}
        return cls(VisionConfig(**v), TextConfig(**t), **rest)


# ---- the interface of a family module -----------------------------------------------------------------------------
class ModelSpec(Protocol):
    """A model family. ``hf`` names are the checkpoint's (legacy scheme: ``visual.*``, ``model.layers.N``)."""

    NAME: str                       # what users call it: "Qwen2.5-VL"
    CONVERTER: str                  # the converter class and CLI name: "Qwen2_5_VLConverter"
    MODEL_TYPES: tuple[str, ...]    # config.json model_type values it accepts
    HF_CLASSES: dict[str, tuple[str, str]]  # model_type -> transformers config class, model class (references)
    TINY: dict[str, str]            # variant -> bundled tiny config (tests, examples, the demo)
    PUBLISHED: dict[str, str]       # size -> bundled config file in mm_convert/data
    MM_MODEL_IDS: dict[str, str]    # MindSpeed-MM's model_id per json block (vision_encoder, ...)

    def config_from_hf(self, cfg: dict, source: str) -> ModelConfig: ...
    def hf_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]: ...
    def rules(self, cfg: ModelConfig, pp_size: int) -> list[Rule]: ...
    def tp_divisible(self, cfg: ModelConfig) -> list[tuple[str, str, int]]: ...


# Shared by every family of MindSpeed-MM's VLM tree: the module names of its two layer lists, and how the
# checkpoint key schemes of transformers map onto the legacy names (prefix renames, first match wins).
LAYER_PREFIXES = {"vit": "image_encoder.encoder.blocks.layers.", "llm": "text_decoder.decoder.layers."}
EXPERT_INFIX = ".mlp.experts.local_experts."
KEY_SCHEMES = {"legacy": (), "new": (("model.visual.", "visual."), ("model.language_model.", "model."))}
# trainable groups of the runtime (MindSpeed-MM's freeze switches): MM name pattern -> group, first match wins;
# everything else is "llm". Deepstack mergers are mergers like the projector, though they live in vision blocks.
TRAINABLE = ((r"^image_encoder\.encoder\.blocks\.layers\.\d+\.deepstack_layer\.", "projector"),
             (r"^image_encoder\.encoder\.", "vision"), (r"^image_encoder\.projector\.", "projector"))
TIED_PAIR = ("text_decoder.embedding.word_embeddings.weight", "text_decoder.output_layer.weight")


def trainable_group(spec, name: str) -> str:
    """"vision", "projector" or "llm": which freeze switch of the runtime a parameter answers to."""
    import re

    return next((group for pattern, group in spec.TRAINABLE if re.match(pattern, name)), "llm")


def need(d: dict, key: str, where: str, source: str):
    if key not in d:
        raise ConfigError(f"{source}: {where}{key} missing")
    return d[key]


def text_section(cfg: dict) -> dict:
    """The text fields of a flat (hub) or nested (``text_config``) config: nested values win."""
    return {**cfg, **(cfg.get("text_config") or {})}


def vision_section(cfg: dict, source: str, family: str) -> dict:
    vision = cfg.get("vision_config")
    if not isinstance(vision, dict):
        raise ConfigError(f"{source}: vision_config missing; expected a {family} config with a vision_config section")
    return vision


def check_model_type(cfg: dict, types: Sequence[str], family: str, source: str) -> None:
    if cfg.get("model_type") not in types:
        from . import spec_for_model_type  # the registry imports the family modules, which import this one

        other = spec_for_model_type(cfg.get("model_type"))
        hint = f"; it is a {other.NAME} checkpoint: use {other.CONVERTER}" if other else ""
        raise ConfigError(f"{source}: model_type is {cfg.get('model_type')!r}, expected one of {list(types)} "
                          f"({family}){hint}")


def tied_flag(cfg: dict) -> bool:
    text = cfg.get("text_config") or {}
    if "tie_word_embeddings" in cfg:
        return bool(cfg["tie_word_embeddings"])
    return bool(text.get("tie_word_embeddings", False))


def dtype_of(cfg: dict) -> str:
    text = cfg.get("text_config") or {}
    return str(cfg.get("torch_dtype") or cfg.get("dtype") or text.get("torch_dtype") or text.get("dtype") or "bfloat16")


def token_ids(cfg: dict) -> dict:
    text = text_section(cfg)
    eos = text.get("eos_token_id")
    return {"image_token_id": cfg.get("image_token_id", 151655), "video_token_id": cfg.get("video_token_id", 151656),
            "vision_start_token_id": cfg.get("vision_start_token_id", 151652),
            "eos_token_ids": tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])}


def rope_section(text: dict) -> dict:
    return text.get("rope_scaling") or text.get("rope_parameters") or {}


def check_heads(cfg: ModelConfig, source: str) -> None:
    v, t = cfg.vision, cfg.text
    if (not t.head_dim_override and t.hidden_size % t.num_heads) or t.num_heads % t.num_kv_heads \
            or v.hidden_size % v.num_heads:
        raise ConfigError(f"{source}: hidden sizes must divide evenly by head counts (hidden {t.hidden_size}, heads "
                          f"{t.num_heads}, kv heads {t.num_kv_heads}, vision {v.hidden_size}/{v.num_heads})")


def llm_tp_divisible(t: TextConfig) -> list[tuple[str, str, int]]:
    out = [("llm", "num_attention_heads", t.num_heads), ("llm", "num_key_value_heads", t.num_kv_heads),
           ("llm", VOCAB, t.vocab_size)]
    if len(t.moe_layers) < t.num_layers:
        out.append(("llm", "LLM intermediate_size", t.intermediate_size))
    if t.num_experts:
        out.append(("llm", "moe_intermediate_size", t.moe_intermediate_size))
    return out


def output_layer_rules(t: TextConfig, pp_size: int) -> list[Rule]:
    """Untied: the LM head. Tied: Megatron keeps a copy of the word embeddings as the output layer on the
    last stage when the pipeline has more than one stage; with one stage there is no output_layer at all."""
    if not t.tie_word_embeddings:
        return [Rule("text_decoder.output_layer.weight", ("lm_head.weight",), "llm", "last", "split_dim0", vocab=True)]
    if pp_size > 1:
        return [Rule("text_decoder.output_layer.weight", ("model.embed_tokens.weight",), "llm", "last", "split_dim0",
                     copy=True, vocab=True)]
    return []


# ---- the LLM of the Qwen line: Megatron's GPT layer over transformers' Qwen2 / Qwen3 decoder ------------------------
LLM = "text_decoder.decoder.layers.{i}."
HF_LLM = "model.layers.{i}."


def gpt_llm_rules(t: TextConfig, pp_size: int) -> list[Rule]:
    """Embedding, decoder layers (GQA qkv with or without bias, optional q/k norms, dense GLU MLP or a mixture
    of experts with a router), final norm and output layer, in the order a shard stores them."""
    qkv_groups = ("qkv_groups", t.num_kv_heads, t.num_heads // t.num_kv_heads)
    dense = frozenset(range(t.num_layers)) - frozenset(t.moe_layers)
    moe = frozenset(t.moe_layers)
    qkv = [f"self_attn.{p}_proj" for p in "qkv"]
    table = [
        ("input_layernorm.weight", ("input_layernorm.weight",), "replicate", ("concat",), None, 0),
        ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "split_dim1", ("concat",), None, 0),
        ("self_attention.linear_qkv.weight", tuple(p + ".weight" for p in qkv), "split_dim0", qkv_groups, None, 0),
    ]
    if t.qkv_bias:
        table.append(("self_attention.linear_qkv.bias", tuple(p + ".bias" for p in qkv), "split_dim0", qkv_groups, None, 0))
    if t.qk_norm:
        table += [("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), "replicate", ("concat",), None, 0),
                  ("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), "replicate", ("concat",), None, 0)]
    table.append(("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "replicate", ("concat",), None, 0))
    if dense:
        table += [("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "split_dim0", ("concat",),
                   dense, 0),
                  ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "split_dim1", ("concat",), dense, 0)]
    if moe:
        ex = "mlp.experts.local_experts.{e}."
        table += [("mlp.router.weight", ("mlp.gate.weight",), "replicate", ("concat",), moe, 0),
                  (ex + "linear_fc1.weight", ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),
                   "split_dim0", ("concat",), moe, t.num_experts),
                  (ex + "linear_fc2.weight", ("mlp.experts.{e}.down_proj.weight",), "split_dim1", ("concat",), moe,
                   t.num_experts)]
    r = [Rule("text_decoder.embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "llm", "first", "split_dim0",
              vocab=True)]
    r += [Rule(LLM + mm, tuple(HF_LLM + h for h in hf), "llm", "layer", tp, fuse, layers=layers, experts=experts)
          for mm, hf, tp, fuse, layers, experts in table]
    r.append(Rule("text_decoder.decoder.final_layernorm.weight", ("model.norm.weight",), "llm", "last"))
    return r + output_layer_rules(t, pp_size)


# How a checkpoint stores fused 3-D expert tensors: "hub" as the published files do (``gate_up_proj``
# [experts, hidden, 2 x moe_intermediate] with [gate | up] along the last axis, ``down_proj`` [experts,
# moe_intermediate, hidden]); "linear" as transformers 5 saves them (each expert in nn.Linear layout:
# [experts, 2 x moe_intermediate, hidden] and [experts, hidden, moe_intermediate]).
EXPERT_LAYOUTS = ("hub", "linear")


def gpt_llm_shapes(t: TextConfig, expert_layout: str = "hub") -> dict[str, tuple[int, ...]]:
    """The HF tensors of the decoder (legacy names), fused expert tensors in ``expert_layout``."""
    h, q, kv = t.hidden_size, t.q_size, t.kv_size
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (t.vocab_size, h)}
    for n in range(t.num_layers):
        b = HF_LLM.format(i=n)
        s.update({b + "input_layernorm.weight": (h,), b + "post_attention_layernorm.weight": (h,),
                  b + "self_attn.q_proj.weight": (q, h), b + "self_attn.k_proj.weight": (kv, h),
                  b + "self_attn.v_proj.weight": (kv, h), b + "self_attn.o_proj.weight": (h, q)})
        if t.qkv_bias:
            s.update({b + "self_attn.q_proj.bias": (q,), b + "self_attn.k_proj.bias": (kv,),
                      b + "self_attn.v_proj.bias": (kv,)})
        if t.qk_norm:
            s.update({b + "self_attn.q_norm.weight": (t.head_dim,), b + "self_attn.k_norm.weight": (t.head_dim,)})
        if t.is_moe(n):
            e, f = t.num_experts, t.moe_intermediate_size
            hub = expert_layout == "hub"
            s.update({b + "mlp.gate.weight": (e, h), b + "mlp.experts.gate_up_proj": (e, h, 2 * f) if hub else (e, 2 * f, h),
                      b + "mlp.experts.down_proj": (e, f, h) if hub else (e, h, f)})
        else:
            s.update({b + "mlp.gate_proj.weight": (t.intermediate_size, h), b + "mlp.up_proj.weight": (t.intermediate_size, h),
                      b + "mlp.down_proj.weight": (h, t.intermediate_size)})
    s["model.norm.weight"] = (h,)
    if not t.tie_word_embeddings:
        s["lm_head.weight"] = (t.vocab_size, h)
    return s


def gpt_llm_views(t: TextConfig, expert_layout: str = "hub") -> dict[str, View]:
    """Each expert's gate, up and down weight (nn.Linear layout) inside the fused 3-D HF tensors."""
    out: dict[str, View] = {}
    h, f = t.hidden_size, t.moe_intermediate_size
    hub = expert_layout == "hub"  # hub: transposed, gate | up along the last axis; linear: gate; up along dim 1
    for n in t.moe_layers:
        b = HF_LLM.format(i=n) + "mlp.experts."
        for e in range(t.num_experts):
            out[f"{b}{e}.gate_proj.weight"] = View(b + "gate_up_proj", (e,), (f, h), hub, (0, 0))
            out[f"{b}{e}.up_proj.weight"] = View(b + "gate_up_proj", (e,), (f, h), hub, (0, f) if hub else (f, 0))
            out[f"{b}{e}.down_proj.weight"] = View(b + "down_proj", (e,), (h, f), hub, (0, 0))
    return out


def text_config_from_hf(text: dict, source: str, **extra) -> TextConfig:
    heads = need(text, "num_attention_heads", "", source)
    rope = rope_section(text)
    return TextConfig(
        num_layers=need(text, "num_hidden_layers", "", source), hidden_size=need(text, "hidden_size", "", source),
        intermediate_size=text.get("intermediate_size") or 0, num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads, vocab_size=need(text, "vocab_size", "", source),
        mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
        rope_theta=text.get("rope_theta", rope.get("rope_theta", 1000000.0)), eps=text.get("rms_norm_eps", 1e-6),
        **extra)


VIT = "image_encoder.encoder.blocks.layers.{i}."
HF_VIT = "visual.blocks.{i}."


def layer_rules(module: str, mm_prefix: str, hf_prefix: str, table) -> list[Rule]:
    """One per-layer Rule per row (mm suffix, hf suffixes, tp, fuse)."""
    return [Rule(mm_prefix + mm, tuple(hf_prefix + h for h in hf), module, "layer", tp, fuse) for mm, hf, tp, fuse in table]


def vit_block_shapes(v: VisionConfig, names: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The HF tensors of every vision block, from one block's (suffix -> shape)."""
    return {HF_VIT.format(i=n) + k: shape for n in range(v.depth) for k, shape in names.items()}


# ---- what the vision towers of the line share ---------------------------------------------------------------------
def vision_fields(vis: dict, text: dict, source: str, patch_size: int) -> dict:
    """VisionConfig fields every family reads the same way (``patch_size``: the family's default)."""
    return dict(depth=need(vis, "depth", "vision_config.", source), num_heads=need(vis, "num_heads", "vision_config.", source),
                in_channels=vis.get("in_channels", vis.get("in_chans", 3)), patch_size=vis.get("patch_size", patch_size),
                temporal_patch_size=vis.get("temporal_patch_size", 2), spatial_merge_size=vis.get("spatial_merge_size", 2),
                rope_theta=(vis.get("rope_parameters") or {}).get("rope_theta", 10000.0))


def model_config(family: str, cfg: dict, vision: VisionConfig, text: TextConfig, source: str) -> ModelConfig:
    out = ModelConfig(vision, text, family=family, dtype=dtype_of(cfg), **token_ids(cfg))
    check_heads(out, source)
    return out


def vit_attention_rows(heads: int, norm_bias: bool) -> list[tuple]:
    """Rule rows (mm suffix, hf suffixes, tp, fuse) of a vision block's norms and attention, in shard order: qkv is
    per head [q_h; k_h; v_h] in MM (whole heads per TP rank), HF's fused [q; k; v] reordered."""
    qkv_heads = ("qkv_heads", heads)
    norm = lambda mm, hf: [(f"{mm}.weight", (f"{hf}.weight",), "replicate", ("concat",))] + (  # noqa: E731
        [(f"{mm}.bias", (f"{hf}.bias",), "replicate", ("concat",))] if norm_bias else [])
    return norm("input_layernorm", "norm1") + [
        ("self_attention.linear_proj.weight", ("attn.proj.weight",), "split_dim1", ("concat",)),
        ("self_attention.linear_proj.bias", ("attn.proj.bias",), "replicate", ("concat",)),
        ("self_attention.linear_qkv.weight", ("attn.qkv.weight",), "split_dim0", qkv_heads),
        ("self_attention.linear_qkv.bias", ("attn.qkv.bias",), "split_dim0", qkv_heads),
    ] + norm("pre_mlp_layernorm", "norm2")


def vit_attention_shapes(v: VisionConfig, norm_bias: bool) -> dict[str, tuple[int, ...]]:
    vh = v.hidden_size
    s = {"norm1.weight": (vh,), "norm2.weight": (vh,), "attn.qkv.weight": (3 * vh, vh), "attn.qkv.bias": (3 * vh,),
         "attn.proj.weight": (vh, vh), "attn.proj.bias": (vh,)}
    if norm_bias:
        s.update({"norm1.bias": (vh,), "norm2.bias": (vh,)})
    return s
