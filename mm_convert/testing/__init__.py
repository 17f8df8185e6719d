"""Tiny checkpoints of every family for tests, examples and the demo (random weights, no download).

Each family bundles its tiny configs (``spec.TINY``: ``mm_convert/data/tiny_*.json``); weights come from
transformers' own model class of the family so that logits can be compared against it. The Qwen2.5-VL tiny
model: 4 vision blocks (4 heads, two of them full-attention), 4 decoder layers with GQA (4 heads, 2 kv
heads), vocab 320.
"""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from ..models import FAMILIES

from ..models import DEFAULT

DEFAULT_FAMILY = DEFAULT.NAME


def family(name: str = DEFAULT_FAMILY):
    """A family spec by its NAME ("Qwen2-VL", "Qwen2.5-VL", "Qwen3-VL")."""
    for f in FAMILIES:
        if f.NAME == name:
            return f
    raise KeyError(f"no family {name!r}; known: {', '.join(f.NAME for f in FAMILIES)}")


def tiny_config_dict(family_name: str = DEFAULT_FAMILY, variant: str = "", **overrides) -> dict:
    """A bundled tiny config (as published: flat or nested), with top-level keys overridden."""
    cfg = json.loads(resources.files("mm_convert.data").joinpath(family(family_name).TINY[variant]).read_text())
    cfg.update(overrides)
    return cfg


def published_config_path(size: str, family_name: str = DEFAULT_FAMILY) -> Path:
    """A published config bundled with the package, e.g. ("7b", "Qwen2.5-VL") or ("30b_a3b", "Qwen3-VL")."""
    spec = family(family_name)
    if size.lower() not in spec.PUBLISHED:
        raise FileNotFoundError(f"no bundled {spec.NAME} config for {size!r}; expected one of {', '.join(spec.PUBLISHED)}")
    return Path(str(resources.files("mm_convert.data").joinpath(spec.PUBLISHED[size.lower()])))


def make_tiny_hf_checkpoint(
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    tied: bool = False,
    scheme: str | None = None,
    config_style: str = "published",
    max_shard_size: str | None = None,
    seed: int = 0,
    family_name: str = DEFAULT_FAMILY,
    variant: str = "",
    expert_layout: str = "linear",
    overrides: dict | None = None,
) -> Path:
    """Write a tiny random HF checkpoint of a family, made by transformers.

    scheme: None (as transformers saves it), "legacy" (``model.layers.N``, ``visual.*``) or "new"
    (``model.language_model.*``, ``model.visual.*``). config_style: "published" (the bundled file's layout:
    flat for Qwen2/2.5-VL, nested for Qwen3-VL), "flat" (same) or "nested" (as transformers 5 writes it).
    expert_layout (MoE): "linear" as transformers 5 saves experts, or "hub" as the published files store them.
    max_shard_size: e.g. "20KB" to get a sharded checkpoint with ``model.safetensors.index.json``.
    overrides: config keys replaced (top level; ``text_config`` / ``vision_config`` given as dicts are merged into
    those sections), e.g. a vocab_size no TP size divides.
    """
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    spec = family(family_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config_dict(family_name, variant, tie_word_embeddings=tied)
    for key, value in (overrides or {}).items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    _set_dtype(cfg, dtype)
    config_cls, model_cls = (getattr(transformers, n) for n in spec.HF_CLASSES[cfg["model_type"]])
    torch.manual_seed(seed)
    model = model_cls(config_cls(**cfg)).to(getattr(torch, dtype))
    # transformers initialises norms to ones and biases to zeros; randomise every tensor so that a
    # mix-up of any two tensors (or of rows within one) shows up in bit comparisons and logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 + 0.1 * torch.randn_like(p, dtype=torch.float32)).to(p.dtype))
            elif not p.any():  # initialised to zeros (InternViT's class token and positions): random too
                p.copy_((0.02 * torch.randn_like(p, dtype=torch.float32)).to(p.dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    if config_style in ("published", "flat"):
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    _rewrite_tensors(out, load_file, save_file, spec.KEY_SCHEMES, scheme,
                     tuple(getattr(spec, "FUSED_EXPERTS", ())) if expert_layout == "hub" else ())
    from .tiny_tokenizer import write_tiny_processor

    # tokenizer, chat template, image processor: the runtime and check_logits need them
    write_tiny_processor(out, spec.HF_PROCESSOR, spec.config_from_hf(cfg, "tiny").vision.patch_size,
                         getattr(spec, "TINY_PROCESSOR", None))
    return out


def _set_dtype(cfg: dict, dtype: str) -> None:
    if "text_config" in cfg:
        cfg["text_config"]["dtype"] = dtype
    cfg["torch_dtype"] = dtype


def _rewrite_tensors(out: Path, load_file, save_file, schemes: dict, scheme: str | None, fused: tuple) -> None:
    """Rename keys to another scheme and/or store fused expert tensors as the published files do
    (transposed: [experts, hidden, 2 x intermediate] and [experts, intermediate, hidden])."""
    from ..formats.hf import from_legacy, to_legacy

    hub_experts = bool(fused)  # key suffixes of the fused expert tensors, to transpose into the hub layout
    if scheme is None and not hub_experts:
        return

    def rename(k: str) -> str:
        return k if scheme is None else from_legacy(to_legacy(k, schemes), scheme, schemes)

    index_path = out / "model.safetensors.index.json"
    for f in sorted(p.name for p in out.glob("*.safetensors")):
        sd = load_file(out / f)
        if hub_experts:
            sd = {k: v.transpose(1, 2).contiguous() if k.endswith(fused) else v for k, v in sd.items()}
        save_file({rename(k): v for k, v in sd.items()}, out / f, metadata={"format": "pt"})
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index, indent=2) + "\n")
