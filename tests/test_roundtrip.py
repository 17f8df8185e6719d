"""hf_to_mm then mm_to_hf gives back the original: same key set, dtypes and bits, and transformers loads the
result and computes identical logits. Every layout the issue names, bf16 and fp32, tied and untied."""
from __future__ import annotations

import pytest
import torch

from helpers import assert_same_tensors, load_hf_tensors, load_mm_shards

LAYOUTS = {
    "tp1_pp1": dict(tp_size=1, llm_pp_layers=[[4]], vit_pp_layers=[[4]]),
    "tp2_pp1": dict(tp_size=2, llm_pp_layers=[4], vit_pp_layers=[4]),
    "tp2_llm13_vit40": dict(tp_size=2, llm_pp_layers=[[1, 3]], vit_pp_layers=[[4, 0]]),
    "tp1_flat_1111": dict(tp_size=1, llm_pp_layers=[1, 1, 1, 1], vit_pp_layers=[4, 0, 0, 0]),
    "tp1_llm04_vit22": dict(tp_size=1, llm_pp_layers=[[0, 4]], vit_pp_layers=[[2, 2]]),
    "vpp_llm0112_vit4000": dict(tp_size=1, llm_pp_layers=[[0, 1], [1, 2]], vit_pp_layers=[[4, 0], [0, 0]]),
    "tp2_pp2_vpp": dict(tp_size=2, llm_pp_layers=[[0, 1], [1, 2]], vit_pp_layers=[[4, 0], [0, 0]]),
    "tp2_vittp1": dict(tp_size=2, vit_tp_size=1, llm_pp_layers=[[2, 2]], vit_pp_layers=[[4, 0]]),
}

CASES = [(name, "float32", False) for name in LAYOUTS] + [
    ("tp2_llm13_vit40", "bfloat16", False),
    ("vpp_llm0112_vit4000", "bfloat16", False),
    ("tp1_pp1", "float32", True),
    ("tp2_llm13_vit40", "float32", True),
    ("tp2_llm13_vit40", "bfloat16", True),
    ("tp1_llm04_vit22", "bfloat16", True),
]


def _logits(hf_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration
    m = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 200, 33, 4, 77, 100]])
    with torch.no_grad():
        return m(input_ids=ids).logits


@pytest.mark.parametrize("layout,dtype,tied", CASES, ids=[f"{l}-{d}-{'tied' if t else 'untied'}" for l, d, t in CASES])
def test_round_trip_bit_exact_and_logits(tiny_hf, conv, tmp_path, layout, dtype, tied):
    hf = tiny_hf(dtype=dtype, tied=tied)
    mm, back = tmp_path / "mm", tmp_path / "back"
    conv.hf_to_mm(hf, mm, **LAYOUTS[layout])
    assert conv.verify(hf, mm).ok
    conv.mm_to_hf(mm, back, hf_dir=hf)
    original, returned = load_hf_tensors(hf), load_hf_tensors(back)
    assert_same_tensors(original, returned, f"{layout} {dtype}")
    if tied:
        assert "lm_head.weight" not in returned
    assert torch.equal(_logits(hf), _logits(back))


def test_tied_output_layer_copy_only_with_pipeline(tiny_hf, conv, tmp_path):
    hf = tiny_hf(tied=True)
    conv.hf_to_mm(hf, tmp_path / "pp1", tp_size=1, llm_pp_layers=[4], vit_pp_layers=[4])
    conv.hf_to_mm(hf, tmp_path / "pp2", tp_size=2, llm_pp_layers=[[1, 3]], vit_pp_layers=[[4, 0]])
    pp1 = load_mm_shards(tmp_path / "pp1")["mp_rank_00/model_optim_rng.pt"]["model"]
    assert not any(k.startswith("text_decoder.output_layer") for k in pp1)
    shards = load_mm_shards(tmp_path / "pp2")
    for r in range(2):
        first = shards[f"mp_rank_{r:02d}_000/model_optim_rng.pt"]["model"]
        last = shards[f"mp_rank_{r:02d}_001/model_optim_rng.pt"]["model"]
        assert "text_decoder.embedding.word_embeddings.weight" in first
        assert torch.equal(last["text_decoder.output_layer.weight"], first["text_decoder.embedding.word_embeddings.weight"])


def test_new_key_scheme_and_nested_config_round_trip(tiny_hf, conv, tmp_path):
    hf = tiny_hf(dtype="bfloat16", scheme="new", config_style="nested", sharded=True)
    conv.hf_to_mm(hf, tmp_path / "mm", tp_size=2, llm_pp_layers=[[1, 3]], vit_pp_layers=[[4, 0]])
    r = conv.mm_to_hf(tmp_path / "mm", tmp_path / "back", hf_dir=hf, max_shard_size="40KB")
    original, returned = load_hf_tensors(hf), load_hf_tensors(tmp_path / "back")
    assert any(k.startswith("model.language_model.") for k in returned)
    assert_same_tensors(original, returned, "new scheme")
    assert len(r.files) > 1
    import json
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    for k, f in index["weight_map"].items():
        assert (tmp_path / "back" / f).is_file()


def test_mm_to_hf_without_reference_uses_manifest_config(tiny_hf, conv, tmp_path):
    hf = tiny_hf()
    conv.hf_to_mm(hf, tmp_path / "mm", tp_size=2, llm_pp_layers=[4], vit_pp_layers=[4])
    conv.mm_to_hf(tmp_path / "mm", tmp_path / "back")
    assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(tmp_path / "back"))
    assert torch.equal(_logits(hf), _logits(tmp_path / "back"))


def test_non_weight_files_copied(tiny_hf, conv, tmp_path):
    hf = tiny_hf()
    conv.hf_to_mm(hf, tmp_path / "mm")
    conv.mm_to_hf(tmp_path / "mm", tmp_path / "back", hf_dir=hf)
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (hf / name).read_bytes()


def test_shard_format(tiny_hf, conv, tmp_path):
    hf = tiny_hf()
    conv.hf_to_mm(hf, tmp_path / "mm", tp_size=1, llm_pp_layers=[[0, 1], [1, 2]], vit_pp_layers=[[4, 0], [0, 0]])
    assert (tmp_path / "mm" / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    shards = load_mm_shards(tmp_path / "mm")
    assert sorted(shards) == ["mp_rank_00_000/model_optim_rng.pt", "mp_rank_00_001/model_optim_rng.pt"]
    for s in shards.values():
        assert s["checkpoint_version"] == 3.0
        assert set(s) == {"model0", "model1", "checkpoint_version"}
    # position 0 (chunk 0, stage 0): the whole vision encoder, nothing of the LLM; position 1 (chunk 0,
    # stage 1): LLM layer 0 with the embedding; position 2 (chunk 1, stage 0): LLM layer 1 alone, renumbered
    # 0; position 3 (chunk 1, stage 1): LLM layers 2-3 (renumbered 0-1), final norm and output layer.
    s0, s1 = shards["mp_rank_00_000/model_optim_rng.pt"], shards["mp_rank_00_001/model_optim_rng.pt"]
    assert "image_encoder.projector.layernorm.weight" in s0["model0"]
    assert not any(k.startswith("text_decoder") for k in s0["model0"])
    assert "text_decoder.embedding.word_embeddings.weight" in s1["model0"]
    assert {k.split(".")[3] for k in s1["model1"] if k.startswith("text_decoder.decoder.layers.")} == {"0", "1"}
    assert "text_decoder.output_layer.weight" in s1["model1"]
    assert {k.rsplit(".layers.", 1)[1].split(".")[0] for k in s0["model1"]} == {"0"}
    assert all(k.startswith("text_decoder.decoder.layers.0.") for k in s0["model1"])
