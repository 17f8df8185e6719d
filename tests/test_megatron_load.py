"""The converted text decoder loads into megatron-core's own GPTModel and computes the same logits as
transformers' Qwen2.5-VL.

The tiny fp32 checkpoint is converted at tp 1, pp 1; the ``text_decoder.*`` part of the shard (prefix
stripped) is loaded into a GPTModel built with the local (non-Transformer-Engine) layer spec and the
Qwen2.5 text settings (RMSNorm, qkv bias, no other linear bias, gated SiLU MLP, GQA with 2 query groups,
rope theta 1e6, untied embeddings), in a single-process gloo "distributed" world on CPU.

For text-only input Qwen2.5-VL's mrope gives all three position streams the same ids, which is plain 1D
rope with the same theta; both Megatron and HF rotate halves (not interleaved pairs), so the logits must
agree to float rounding.
"""
from __future__ import annotations

import importlib.util
import socket
import warnings

import pytest
import torch
import torch.nn.functional as F

from mm_convert import Qwen2_5_VLConverter
from mm_convert.testing import make_tiny_hf_checkpoint

# megatron.core is imported lazily, inside the fixtures below, never at collection time: importing it
# registers ~26 classes (argparse.Namespace, numpy arrays, pathlib paths, ...) as torch.load weights_only safe
# globals for the whole process, which would change what other test files' weights_only loads accept.
# The `_undo_megatron_safe_globals` fixture restores torch's list after this module's tests.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron.core") is None,
                                reason="megatron-core is not installed")

PREFIX = "text_decoder."
VOCAB, HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, THETA = 320, 64, 4, 2, 96, 4, 1_000_000.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def _undo_megatron_safe_globals():
    from torch import serialization

    saved = list(serialization.get_safe_globals())
    try:
        yield
    finally:
        serialization.clear_safe_globals()
        serialization.add_safe_globals(saved)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_load")
    hf_dir = make_tiny_hf_checkpoint(root / "hf", dtype="float32")
    mm_dir = root / "mm"
    Qwen2_5_VLConverter(progress=False).hf_to_mm(hf_dir, mm_dir, tp_size=1, llm_pp_layers=[[4]], vit_pp_layers=[[4]])
    shard = torch.load(mm_dir / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)
    sd = {k[len(PREFIX):]: v for k, v in shard["model"].items()
          if k.startswith(PREFIX) and not k.endswith("_extra_state")}
    return hf_dir, sd


@pytest.fixture(scope="module")
def megatron_world():
    import torch.distributed as dist
    from megatron.core import parallel_state

    started_dist = not dist.is_initialized()
    if started_dist:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if started_dist:
            dist.destroy_process_group()


def _build_gpt(megatron_world):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=KV_HEADS,
        ffn_hidden_size=FFN, kv_channels=HIDDEN // HEADS,
        normalization="RMSNorm", layernorm_epsilon=1e-6,
        add_bias_linear=False, add_qkv_bias=True,
        gated_linear_unit=True, activation_func=F.silu,
        hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        use_cpu_initialization=True, params_dtype=torch.float32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Apex is not installed. Falling back to Torch Norm", etc.
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    return GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=64,
                    share_embeddings_and_output_weights=False, position_embedding_type="rope",
                    rotary_base=int(THETA), parallel_output=True)


@pytest.fixture(scope="module")
def loaded(converted, megatron_world):
    hf_dir, sd = converted
    model = _build_gpt(megatron_world)
    result = model.load_state_dict(sd, strict=False)
    return hf_dir, sd, model.eval(), result


def test_load_state_dict_has_no_missing_or_unexpected_keys(loaded):
    _, _, _, result = loaded
    assert [k for k in result.missing_keys if not k.endswith("_extra_state")] == []
    assert result.unexpected_keys == []


def test_key_sets_equal_exactly(loaded):
    _, sd, model, _ = loaded
    model_keys = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    assert sorted(model_keys - set(sd)) == [], "in the Megatron model, not in the converted shard"
    assert sorted(set(sd) - model_keys) == [], "in the converted shard, not in the Megatron model"
    # the Megatron-side names the doc promises are all there (sanity: the comparison is not vacuous)
    assert "embedding.word_embeddings.weight" in model_keys and "output_layer.weight" in model_keys
    assert f"decoder.layers.{LAYERS - 1}.self_attention.linear_qkv.bias" in model_keys


def test_shapes_match_and_values_loaded(loaded):
    _, sd, model, _ = loaded
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for k, v in sd.items():
        target = params.get(k, buffers.get(k))
        assert target is not None, k
        assert tuple(v.shape) == tuple(target.shape), k
        assert v.dtype == target.dtype, k
        assert torch.equal(target.detach(), v), k
    # the GQA shapes, spelled out: qkv = (heads + 2 * kv_heads) * head_dim rows; fc1 = 2 * ffn rows
    assert tuple(params["decoder.layers.0.self_attention.linear_qkv.weight"].shape) == (128, HIDDEN)
    assert tuple(params["decoder.layers.0.mlp.linear_fc1.weight"].shape) == (2 * FFN, HIDDEN)


def _megatron_logits(model, ids: torch.Tensor, monkeypatch) -> torch.Tensor:
    """Forward on CPU. megatron-core 0.16 assumes CUDA in two places we route around for this test only:
    RotaryEmbedding.get_emb moves inv_freq to torch.cuda.current_device(), and DotProductAttention forks the
    CUDA RNG tracker for attention dropout (a no-op here: dropout is 0 and the model is in eval mode)."""
    from megatron.core.tensor_parallel import random as mrandom

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(mrandom, "_CUDA_RNG_STATE_TRACKER", None)
    monkeypatch.setattr(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False)
    mrandom.initialize_rng_tracker(inference_rng_tracker=True)
    s = ids.shape[1]
    position_ids = torch.arange(s).unsqueeze(0).expand_as(ids)
    causal_mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]  # True = masked out
    with torch.no_grad():
        return model(ids, position_ids, causal_mask)


@pytest.fixture(scope="module")
def hf_logits_fn(converted):
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf_dir, _ = converted
    hf_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def fn(ids):
        with torch.no_grad():
            return hf_model(input_ids=ids).logits
    return fn


IDS = torch.tensor([[1, 5, 17, 42, 99, 250, 3, 8, 11, 300, 64, 7],
                    [319, 0, 128, 77, 2, 2, 2, 190, 45, 301, 12, 9]])


def test_logits_match_transformers(loaded, hf_logits_fn, monkeypatch):
    _, _, model, _ = loaded
    got = _megatron_logits(model, IDS, monkeypatch)
    ref = hf_logits_fn(IDS)
    assert got.shape == ref.shape == (2, IDS.shape[1], VOCAB)
    assert ref.abs().max() > 0.1  # not degenerate
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_logits_comparison_detects_a_wrong_qkv_layout(converted, megatron_world, hf_logits_fn, monkeypatch):
    """Negative control: the naive [q; k; v] layout (no GQA interleave) loads fine (same shape) but gives
    different logits, so the comparison above really checks the interleave."""
    hf_dir, sd = converted
    from safetensors.torch import load_file

    hf = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        hf.update(load_file(f))
    bad = dict(sd)
    for n in range(LAYERS):
        for kind in ("weight", "bias"):
            bad[f"decoder.layers.{n}.self_attention.linear_qkv.{kind}"] = torch.cat(
                [hf[f"model.layers.{n}.self_attn.{x}_proj.{kind}"] for x in "qkv"])
    model = _build_gpt(megatron_world)
    model.load_state_dict(bad, strict=True)
    got = _megatron_logits(model.eval(), IDS, monkeypatch)
    assert not torch.allclose(got, hf_logits_fn(IDS), rtol=1e-4, atol=1e-5)
