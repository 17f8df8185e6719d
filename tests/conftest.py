"""Shared fixtures: tiny Qwen2.5-VL HF checkpoints made by transformers (random weights), built once."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """make(dtype, tied, scheme, config_style, sharded) -> path, cached per combination."""
    from mm_convert.testing import make_tiny_hf_checkpoint
    cache = {}

    def make(dtype="float32", tied=False, scheme="legacy", config_style="flat", sharded=False):
        key = (dtype, tied, scheme, config_style, sharded)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"hf_{dtype}_{'tied' if tied else 'untied'}_{scheme}_{config_style}")
            cache[key] = make_tiny_hf_checkpoint(d, dtype=dtype, tied=tied, scheme=scheme, config_style=config_style,
                                                 max_shard_size="40KB" if sharded else None)
        return cache[key]
    return make


@pytest.fixture
def conv():
    from mm_convert import Qwen2_5_VLConverter
    return Qwen2_5_VLConverter(progress=False)
