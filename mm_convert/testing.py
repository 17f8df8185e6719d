"""Tiny Qwen2.5-VL checkpoints for tests, examples and the demo (random weights, no download).

The tiny config is bundled (``mm_convert/data/tiny_qwen2_5_vl.json``): 4 vision blocks (4 heads, two of them
full-attention), 4 decoder layers with GQA (4 heads, 2 kv heads), vocab 256. Weights come from transformers'
own ``Qwen2_5_VLForConditionalGeneration`` so that logits can be compared against it.
"""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

TINY_CONFIG = "tiny_qwen2_5_vl.json"


def tiny_config_dict(**overrides) -> dict:
    """The bundled tiny config (flat hub format), with top-level keys overridden."""
    cfg = json.loads(resources.files("mm_convert.data").joinpath(TINY_CONFIG).read_text())
    cfg.update(overrides)
    return cfg


def published_config_path(size: str) -> Path:
    """A published Qwen2.5-VL config bundled with the package: size is "3b", "7b", "32b" or "72b"."""
    path = Path(str(resources.files("mm_convert.data").joinpath(f"qwen2_5_vl_{size.lower()}.json")))
    if not path.is_file():
        raise FileNotFoundError(f"no bundled config for {size!r}; expected one of 3b, 7b, 32b, 72b")
    return path


def make_tiny_hf_checkpoint(
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    tied: bool = False,
    scheme: str = "legacy",
    config_style: str = "flat",
    max_shard_size: str | None = None,
    seed: int = 0,
) -> Path:
    """Write a tiny random Qwen2.5-VL HF checkpoint made by transformers.

    scheme: "legacy" (``model.layers.N``, ``visual.*``: the hub files) or "new" (``model.language_model.*``,
    ``model.visual.*``). config_style: "flat" (hub) or "nested" (``text_config``, as transformers 5 writes it).
    max_shard_size: e.g. "20KB" to get a sharded checkpoint with ``model.safetensors.index.json``.
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = tiny_config_dict(tie_word_embeddings=tied, torch_dtype=dtype)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**flat)).to(getattr(torch, dtype))
    # transformers initialises norms to ones and biases to zeros; randomise every tensor so that a
    # mix-up of any two tensors (or of rows within one) shows up in bit comparisons and logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 + 0.1 * torch.randn_like(p, dtype=torch.float32)).to(p.dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    if config_style == "flat":
        (out / "config.json").write_text(json.dumps(flat, indent=2) + "\n")
    if scheme == "new":
        _rename_to_new_scheme(out, load_file, save_file)
    from .tiny_tokenizer import write_tiny_processor

    write_tiny_processor(out)  # tokenizer, chat template, image processor: the runtime and check_logits need them
    return out


def _rename_to_new_scheme(out: Path, load_file, save_file) -> None:
    def rename(k: str) -> str:
        if k.startswith("visual."):
            return "model." + k
        if k.startswith("model."):
            return "model.language_model." + k[len("model."):]
        return k

    index_path = out / "model.safetensors.index.json"
    files = sorted(p.name for p in out.glob("*.safetensors"))
    for f in files:
        sd = load_file(out / f)
        save_file({rename(k): v for k, v in sd.items()}, out / f, metadata={"format": "pt"})
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index, indent=2) + "\n")
