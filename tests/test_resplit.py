"""resplit from any layout to any other equals hf_to_mm straight to the target, file for file, tensor for tensor."""
from __future__ import annotations

import pytest

from helpers import assert_same_tensors, load_mm_shards

L = {
    "tp1": dict(tp_size=1, llm_pp_layers=[[4]], vit_pp_layers=[[4]]),
    "tp2": dict(tp_size=2, llm_pp_layers=[[4]], vit_pp_layers=[[4]]),
    "tp2_pp2": dict(tp_size=2, llm_pp_layers=[[1, 3]], vit_pp_layers=[[4, 0]]),
    "pp4": dict(tp_size=1, llm_pp_layers=[1, 1, 1, 1], vit_pp_layers=[4, 0, 0, 0]),
    "llm04": dict(tp_size=1, llm_pp_layers=[[0, 4]], vit_pp_layers=[[2, 2]]),
    "vpp": dict(tp_size=2, llm_pp_layers=[[0, 1], [1, 2]], vit_pp_layers=[[4, 0], [0, 0]]),
    "vittp1": dict(tp_size=2, vit_tp_size=1, llm_pp_layers=[[2, 2]], vit_pp_layers=[[4, 0]]),
}
PAIRS = [("tp1", "tp2_pp2"), ("tp2_pp2", "pp4"), ("pp4", "vpp"), ("vpp", "llm04"), ("llm04", "tp2"),
         ("tp2", "vittp1"), ("vittp1", "vpp"), ("tp2_pp2", "tp2_pp2")]


def _compare(a_dir, b_dir):
    a, b = load_mm_shards(a_dir), load_mm_shards(b_dir)
    assert sorted(a) == sorted(b)
    for path in a:
        assert set(a[path]) == set(b[path]), path
        for slot in a[path]:
            if slot.startswith("model"):
                assert list(a[path][slot]) == list(b[path][slot]), f"{path} {slot}: key order differs"
                assert_same_tensors(a[path][slot], b[path][slot], f"{path} {slot}")


@pytest.mark.parametrize("dtype,tied", [("bfloat16", False), ("float32", True)])
@pytest.mark.parametrize("src,dst", PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_resplit_equals_direct(tiny_hf, conv, tmp_path, src, dst, dtype, tied):
    hf = tiny_hf(dtype=dtype, tied=tied)
    conv.hf_to_mm(hf, tmp_path / "src", **L[src])
    conv.hf_to_mm(hf, tmp_path / "direct", **L[dst])
    conv.resplit(tmp_path / "src", tmp_path / "resplit", **L[dst])
    _compare(tmp_path / "direct", tmp_path / "resplit")
    assert conv.verify(hf, tmp_path / "resplit").ok


def test_resplit_checks_given_source_layout(tiny_hf, conv, tmp_path):
    from mm_convert.errors import LayoutError
    hf = tiny_hf()
    conv.hf_to_mm(hf, tmp_path / "src", **L["tp2_pp2"])
    with pytest.raises(LayoutError, match="does not match the shards"):
        conv.resplit(tmp_path / "src", tmp_path / "out", **L["tp1"], source_tp_size=2,
                     source_llm_pp_layers=[[2, 2]], source_vit_pp_layers=[[4, 0]])
    assert not (tmp_path / "out").exists()
