"""Model families: one module each (what it must provide: ``base.ModelSpec``), registered here.

Adding a family: write ``models/<family>.py`` (names, shapes from its config, fusions, TP rules, placement,
tie rule, divisibility, runtime architecture), bundle its configs in ``mm_convert/data/``, add one line below.
"""
from __future__ import annotations

from . import internvl, qwen2_5_vl, qwen2_vl, qwen3_vl

FAMILIES = (qwen2_vl, qwen2_5_vl, qwen3_vl, internvl)


def spec_for_model_type(model_type: str):
    """The family whose config.json ``model_type`` this is, or None."""
    return next((f for f in FAMILIES if model_type in f.MODEL_TYPES), None)

DEFAULT = qwen2_5_vl  # the embedded default of `make demo` and of the test fixtures
