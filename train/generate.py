"""Greedy and sampled generation with a KV cache, run by every rank of the runtime in lockstep.

The sampler rank (TP rank 0 of the last LLM stage) picks each token and broadcasts it; everyone then feeds it
to the next decode step. Logit processing follows transformers' order: repetition penalty, then (sampling
only) temperature, top-k, top-p.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .runtime import Runtime


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: tuple[int, ...] = ()
    use_cache: bool = True
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict | None, **overrides) -> "GenerationConfig":
        """From a ``generation_config`` block (MindSpeed-MM inference json or HF): unknown keys are ignored,
        ``kv_cache`` is MindSpeed's name for ``use_cache``."""
        d = {**(d or {}), **{k: v for k, v in overrides.items() if v is not None}}
        if "kv_cache" in d and overrides.get("use_cache") is None:
            d["use_cache"] = d["kv_cache"]
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        eos = kw.get("eos_token_id", ())
        kw["eos_token_id"] = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        return cls(**kw)


def process_scores(logits: torch.Tensor, seen: list[int], gen: GenerationConfig) -> torch.Tensor:
    """The last position's logits (vocab,) after the penalties and warpers in effect (float32)."""
    scores = logits.float().clone()
    if gen.repetition_penalty != 1.0:
        idx = torch.tensor(sorted(set(seen)), dtype=torch.long, device=scores.device)
        s = scores[idx]
        scores[idx] = torch.where(s < 0, s * gen.repetition_penalty, s / gen.repetition_penalty)
    if not sampling(gen):
        return scores
    scores = scores / gen.temperature
    if gen.top_k > 0:
        kth = torch.topk(scores, min(gen.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if gen.top_p < 1.0:
        sorted_scores, order = scores.sort()  # ascending: drop the low tail holding 1 - top_p of the mass
        drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - gen.top_p
        drop[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return scores


def sampling(gen: GenerationConfig) -> bool:
    return gen.do_sample and gen.temperature > 0


def next_token(logits: torch.Tensor, seen: list[int], gen: GenerationConfig, rng: torch.Generator) -> int:
    """Pick a token from the last position's logits (vocab,): argmax, or a draw from ``rng``."""
    scores = process_scores(logits, seen, gen)
    if not sampling(gen):
        return int(scores.argmax())
    return int(torch.multinomial(scores.softmax(-1).cpu(), 1, generator=rng))


@torch.inference_mode()
def generate(rt: Runtime, inputs: dict, gen: GenerationConfig, step_logits: list | None = None) -> list[int]:
    """New token ids after the prompt (stopping after an eos token or ``max_new_tokens``); same on every rank.

    inputs: from ``train.inputs.build_inputs``. Without the KV cache every step re-runs the whole sequence.
    step_logits: if a list, the sampler rank appends each step's last-position logits (float32, CPU)."""
    rng = torch.Generator().manual_seed(gen.seed)
    seq = inputs["input_ids"][0].tolist()
    delta = inputs["rope_delta"]
    rt.reset_cache(gen.use_cache)
    batch = {**rt.to_device(inputs), "last_logits_only": True}  # only the last position's logits are used
    new: list[int] = []
    for _ in range(gen.max_new_tokens):
        logits = rt.step(batch)
        tok = None
        if rt.ps.rank == rt.sampler_rank:
            tok = next_token(logits[0, -1], seq, gen, rng)
            if step_logits is not None:
                step_logits.append(logits[0, -1].float().cpu())
        tok = rt.broadcast_token(tok)
        seq.append(tok)
        new.append(tok)
        if tok in gen.eos_token_id:
            break
        if gen.use_cache:  # decode one token: its mrope position is its index shifted by the image's delta
            pos = torch.full((3, 1, 1), len(seq) - 1 + delta, dtype=torch.long)
            batch = {"input_ids": torch.tensor([[tok]]), "position_ids": pos, "last_logits_only": True}
        else:
            pos = torch.cat([inputs["position_ids"], torch.arange(len(inputs["input_ids"][0]), len(seq))
                             .add(delta).view(1, 1, -1).expand(3, 1, -1)], dim=-1)
            batch = {**batch, "input_ids": torch.tensor([seq]), "position_ids": pos}
        batch = {k: (v.to(rt.ps.device) if k in ("input_ids", "position_ids") else v) for k, v in batch.items()}
    return new
