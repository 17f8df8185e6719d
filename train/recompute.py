"""Activation recomputation with Megatron's meanings, for the LLM's layers (``--recompute-*`` flags) and the
vision encoder's blocks (model.json ``vision_encoder.recompute_*``), counted per pipeline position:

- ``full`` + ``uniform`` + N: the position's layers in consecutive chunks of N; each chunk keeps only its input
  and is run again in the backward;
- ``full`` + ``block`` + N: each of the first N layers keeps only its input; the rest keep everything;
- ``selective``: each layer drops only its attention's activations.

Recomputation changes memory, never results: the backward reruns the same operations on the same inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from mm_convert.errors import ConfigError

GRANULARITIES = ("full", "selective")
METHODS = ("uniform", "block")


@dataclass(frozen=True)
class Recompute:
    granularity: str | None = None
    method: str | None = None
    num_layers: int | None = None

    @classmethod
    def checked(cls, granularity, method, num_layers, where: str) -> "Recompute":
        """Megatron's rules for the three settings, as one-line errors naming ``where`` they came from."""
        if granularity is None:
            return cls()
        if granularity not in GRANULARITIES:
            raise ConfigError(f"{where}: recompute granularity {granularity!r}; expected one of {GRANULARITIES}")
        if granularity == "selective":
            if method is not None or num_layers is not None:
                raise ConfigError(f"{where}: selective recomputation takes no recompute method or number of layers "
                                  f"(got {method!r}, {num_layers!r})")
            return cls("selective")
        if method not in METHODS:
            raise ConfigError(f"{where}: full recomputation needs a recompute method, one of {METHODS} (got {method!r})")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ConfigError(f"{where}: full recomputation needs a number of layers >= 1 (got {num_layers!r})")
        return cls("full", method, num_layers)

    def chunks(self, n: int) -> list[tuple[range, str]]:
        """The ``n`` layers of one position as (layers, how): how is "plain", "full" (the chunk keeps only its
        input) or "selective"."""
        if self.granularity == "selective":
            return [(range(n), "selective")]
        if self.granularity != "full" or n == 0:
            return [(range(n), "plain")]
        k = self.num_layers
        if self.method == "uniform":
            return [(range(i, min(i + k, n)), "full") for i in range(0, n, k)]
        return [(range(i, i + 1), "full") for i in range(min(k, n))] + [(range(min(k, n), n), "plain")]


LayerStep = Callable[[int, torch.Tensor, bool], tuple[torch.Tensor, dict]]


def run_layers(step: LayerStep, x: torch.Tensor, n: int, policy: Recompute) -> tuple[torch.Tensor, dict]:
    """Run ``step(i, x, recompute_attention) -> (x, outputs)`` for the position's layers 0..n-1 under ``policy``;
    returns the last hidden state and every layer's side outputs merged (e.g. deepstack features)."""
    if not torch.is_grad_enabled():
        policy = Recompute()  # nothing to save activations for

    def run(layers: range, h, selective: bool):
        outs: dict = {}
        for i in layers:
            h, o = step(i, h, selective)
            outs.update(o)
        return h, outs

    merged: dict = {}
    for layers, how in policy.chunks(n):
        if how == "full":
            x, outs = checkpoint(run, layers, x, False, use_reentrant=False)
        else:
            x, outs = run(layers, x, how == "selective")
        merged.update(outs)
    return x, merged


def attention_then_mlp(layer, x, attend: Callable, recompute_attention: bool) -> torch.Tensor:
    """A pre-norm block: ``x + attention(norm(x))`` then ``x + mlp(norm(x))``; with ``recompute_attention`` the
    attention half keeps only its input (selective recomputation)."""
    attn = lambda h: attend(layer.input_layernorm(h))  # noqa: E731
    x = x + (checkpoint(attn, x, use_reentrant=False) if recompute_attention else attn(x))
    return x + layer.mlp(layer.pre_mlp_layernorm(x))
