"""Shape-real synthetic HF checkpoints (random bf16, hub key names, hub-like shard files) written straight
from a config, without building a model: for tests of real dimensions and for benchmarks.

    python -m mm_convert.testing.synthetic ../shared/configs/qwen2_5_vl/7b.json OUT [--layers 2 --vit-layers 2]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..formats.hf import INDEX, from_legacy, write_index, write_safetensors
from ..models import spec_for_model_type


def write_synthetic_checkpoint(config_path: str | Path, out_dir: str | Path, *, layers: int | None = None,
                               vit_layers: int | None = None, dtype: torch.dtype = torch.bfloat16,
                               max_shard_size: int = 4 * 10**9, seed: int = 0) -> Path:
    """Write config.json and random safetensors shards for the config's shapes (layer counts optionally cut),
    with the key scheme its family's hub files use (``model.visual.*`` for Qwen3-VL)."""
    cfg = json.loads(Path(config_path).read_text())
    text = cfg.get("text_config") or cfg  # the text fields: nested (Qwen3-VL) or flat (Qwen2/2.5-VL)
    if layers is not None:
        text["num_hidden_layers"] = layers
        text["max_window_layers"] = min(text.get("max_window_layers", layers), layers)
        if "mlp_only_layers" in text:
            text["mlp_only_layers"] = [i for i in text["mlp_only_layers"] if i < layers]
    if vit_layers is not None:
        vis = cfg["vision_config"]
        vis["num_hidden_layers" if "num_hidden_layers" in vis else "depth"] = vit_layers  # InternViT's / Qwen's key
        for key in ("fullatt_block_indexes", "deepstack_visual_indexes"):
            if vis.get(key):
                vis[key] = [i for i in vis[key] if i < vit_layers] or [vit_layers - 1]
    spec = spec_for_model_type(cfg.get("model_type"))
    if spec is None:
        raise SystemExit(f"{config_path}: model_type {cfg.get('model_type')!r} is not a supported family")
    scheme = spec.HUB_SCHEME
    shapes = {from_legacy(n, scheme, spec.KEY_SCHEMES): s
              for n, s in spec.hf_shapes(spec.config_from_hf(cfg, str(config_path))).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = _numel(shape) * dtype.itemsize
        if groups[-1] and size + n > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    gen = torch.Generator().manual_seed(seed)
    pool = (torch.randn(_POOL, generator=gen) * 0.02).to(dtype)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(out / fname, [(n, dtype, shapes[n]) for n in names],
                          lambda j: _random(shapes[names[j]], pool, gen))
        weight_map.update({n: fname for n in names})
        total += sum(_numel(shapes[n]) * dtype.itemsize for n in names)
    write_index(out / INDEX, weight_map, total)
    return out


_POOL = (1 << 22) + 17  # a prime-ish length, so tiles of the pool do not line up with rows


def _random(shape, pool: torch.Tensor, gen) -> torch.Tensor:
    """Small normal values, fast: a random offset into a fixed random pool, tiled. Neighbouring rows and
    tensors differ, which is what bit-exact checks need; generating fresh randoms would dominate run time."""
    n = _numel(shape)
    start = int(torch.randint(0, pool.numel(), (1,), generator=gen))
    reps = (start + n + pool.numel() - 1) // pool.numel()
    flat = pool.repeat(reps)[start:start + n] if reps > 1 else pool[start:start + n]
    return flat.reshape(shape).clone()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, help="cut num_hidden_layers to this")
    ap.add_argument("--vit-layers", type=int, help="cut the vision depth to this")
    a = ap.parse_args(argv)
    write_synthetic_checkpoint(a.config, a.out, layers=a.layers, vit_layers=a.vit_layers)


if __name__ == "__main__":
    main()
