"""Test helpers that read checkpoints independently of the converter's planning code."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


def load_hf_tensors(hf_dir) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory, by the names in its files."""
    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def load_mm_shards(mm_dir) -> dict[str, dict]:
    """{relative shard path: loaded dict} of an MM checkpoint's release directory."""
    root = Path(mm_dir)
    it = (root / "latest_checkpointed_iteration.txt").read_text().strip()
    it_dir = root / ("release" if it == "release" else f"iter_{int(it):07d}")
    return {str(p.relative_to(it_dir)): torch.load(p, map_location="cpu", weights_only=True)
            for p in sorted(it_dir.glob("mp_rank_*/model_optim_rng.pt"))}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same_tensors(a: dict, b: dict, what: str = "") -> None:
    assert set(a) == set(b), f"{what}: key sets differ: only in first {sorted(set(a) - set(b))[:5]}, only in second {sorted(set(b) - set(a))[:5]}"
    for k in a:
        assert a[k].dtype == b[k].dtype, f"{what}: {k} dtype {a[k].dtype} vs {b[k].dtype}"
        assert a[k].shape == b[k].shape, f"{what}: {k} shape {tuple(a[k].shape)} vs {tuple(b[k].shape)}"
        assert torch.equal(bits(a[k]), bits(b[k])), f"{what}: {k} differs in bits"


def read_config(d) -> dict:
    return json.loads((Path(d) / "config.json").read_text())
