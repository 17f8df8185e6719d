"""Runs a plan: reads the pieces of each target tensor, assembles it, and streams it into its file."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .formats import hf as hf_format
from .formats import mm as mm_format
from .plan import HF, OutputFile, Ref, TargetTensor


class Sources:
    """Resolves a Ref to a reader: the HF checkpoint or the shards of an MM checkpoint."""

    def __init__(self, hf: hf_format.HFReader | None = None, mm: mm_format.MMReader | None = None):
        self.hf, self.mm = hf, mm

    def meta(self, ref: Ref) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.hf.meta(ref.key) if ref.file == HF else self.mm.meta(ref)

    def read(self, ref: Ref, start, shape) -> torch.Tensor:
        return self.hf.read(ref.key, start, shape) if ref.file == HF else self.mm.read(ref, start, shape)


def materialize(t: TargetTensor, sources: Sources) -> torch.Tensor:
    """The target tensor; a single piece covering it whole is returned as read (no extra copy)."""
    if len(t.pieces) == 1 and tuple(t.pieces[0].shape) == tuple(t.shape):
        p = t.pieces[0]
        return sources.read(p.src, p.src_start, p.shape)
    out = torch.empty(t.shape, dtype=t.dtype)
    for p in t.pieces:
        out[tuple(slice(d, d + n) for d, n in zip(p.dst_start, p.shape))] = sources.read(p.src, p.src_start, p.shape)
    return out


def write_file(f: OutputFile, root: Path, kind: str, sources: Sources, on_bytes: Callable[[int], None]) -> int:
    """Write one planned output file under ``root`` (kind "mm" or "hf"); returns its size."""
    path = root / f.path
    path.parent.mkdir(parents=True, exist_ok=True)

    def produce(tensors: list[TargetTensor], i: int) -> torch.Tensor:
        t = materialize(tensors[i], sources)
        on_bytes(tensors[i].nbytes)
        return t

    if kind == "hf":
        ts = f.slots[""]
        return hf_format.write_safetensors(path, [(t.key, t.dtype, t.shape) for t in ts], lambda i: produce(ts, i))
    return mm_format.write_shard(path, {s: [(t.key, t.dtype, t.shape) for t in ts] for s, ts in f.slots.items()},
                                 lambda s, i: produce(f.slots[s], i))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
