"""Real dimensions: the published 7B config with layer counts cut to 2 (vocab 152064, 28 heads / 4 kv heads,
vision MLP 3420) converts at tp 2 and 4, bit-exact; tp 8 is refused naming the vision MLP size."""
from __future__ import annotations

import pytest

from mm_convert.errors import LayoutError
from mm_convert.testing import published_config_path


@pytest.fixture(scope="module")
def hf7b(tmp_path_factory):
    from mm_convert.testing.synthetic import write_synthetic_checkpoint
    return write_synthetic_checkpoint(published_config_path("7b"), tmp_path_factory.mktemp("hf7b"), layers=2, vit_layers=2,
                                      max_shard_size=1_500_000_000)


@pytest.mark.parametrize("tp", [2, 4])
def test_7b_shapes_convert(hf7b, conv, tmp_path, tp):
    r = conv.hf_to_mm(hf7b, tmp_path / "mm", tp_size=tp, llm_pp_layers=[[1, 1]], vit_pp_layers=[[2, 0]])
    assert len(r.files) == 2 * tp
    assert conv.verify(hf7b, tmp_path / "mm").ok
    import torch
    shard = torch.load(tmp_path / "mm" / "release" / "mp_rank_00_000" / "model_optim_rng.pt", weights_only=True, mmap=True)["model"]
    assert tuple(shard["text_decoder.embedding.word_embeddings.weight"].shape) == (152064 // tp, 3584)
    # 28 query heads in 4 groups: a rank holds 4/tp groups of (7 q + 1 k + 1 v) heads of 128 rows
    assert tuple(shard["text_decoder.decoder.layers.0.self_attention.linear_qkv.weight"].shape) == (4 // tp * 9 * 128, 3584)
    assert tuple(shard["image_encoder.encoder.blocks.layers.0.mlp.linear_fc1.weight"].shape) == (2 * 3420 // tp, 1280)
    if tp == 2:
        conv.mm_to_hf(tmp_path / "mm", tmp_path / "back", hf_dir=hf7b)
        from mm_convert.execute import same_bits
        from mm_convert.formats.hf import HFReader
        a, b = HFReader(hf7b), HFReader(tmp_path / "back")
        assert sorted(a.names()) == sorted(b.names())
        assert all(same_bits(a.read(n), b.read(n)) for n in a.names())


def test_7b_tp8_refused_naming_vision_mlp(hf7b, conv, tmp_path):
    with pytest.raises(LayoutError, match="3420") as e:
        conv.hf_to_mm(hf7b, tmp_path / "mm", tp_size=8, llm_pp_layers=[[2]], vit_pp_layers=[[2]])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "mm").exists()
