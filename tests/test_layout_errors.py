"""Bad layouts give one clear line naming the option and what was expected, a non-zero exit, no output."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mm_convert.errors import LayoutError
from mm_convert.layout import ParallelLayout, parse_layer_list

BAD = [
    ("sum_off", dict(tp_size=1, llm_pp_layers=[[1, 2]], vit_pp_layers=[[4, 0]]), "sums to 3, but the config's num_hidden_layers is 4"),
    ("vit_sum_off", dict(tp_size=1, llm_pp_layers=[[2, 2]], vit_pp_layers=[[3, 0]]), "vision depth is 4"),
    ("lengths_differ", dict(tp_size=1, llm_pp_layers=[[2, 2]], vit_pp_layers=[[4, 0, 0]]), "same shape"),
    ("llm_before_vision", dict(tp_size=1, llm_pp_layers=[[1, 3]], vit_pp_layers=[[2, 2]]), "vision encoder must come before the LLM"),
    ("tp_heads", dict(tp_size=3, llm_pp_layers=[[4]], vit_pp_layers=[[4]]), "tp_size 3 does not divide"),
    ("tp_kv_heads", dict(tp_size=4, llm_pp_layers=[[4]], vit_pp_layers=[[4]]), "num_key_value_heads (2)"),
    ("vit_tp", dict(tp_size=2, vit_tp_size=4, llm_pp_layers=[[4]], vit_pp_layers=[[4]]), "vit_tp_size 4 must divide"),
    ("vpp_ragged", dict(tp_size=1, llm_pp_layers=[[1, 1], [2]], vit_pp_layers=[[4, 0], [0, 0]]), "same number of stages"),
    ("negative", dict(tp_size=1, llm_pp_layers=[[5, -1]], vit_pp_layers=[[4, 0]]), "integers >= 0"),
    ("zero_tp", dict(tp_size=0, llm_pp_layers=[[4]], vit_pp_layers=[[4]]), "positive integer"),
]


@pytest.mark.parametrize("name,kw,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_layout_api(tiny_hf, conv, tmp_path, name, kw, msg):
    with pytest.raises(LayoutError) as e:
        conv.hf_to_mm(tiny_hf(), tmp_path / "mm", **kw)
    assert msg in str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "mm").exists()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mm_convert.cli", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("llm,vit,tp,needle", [
    ("[1,2]", "[4,0]", 1, "--cfg.parallel_config.llm_pp_layers [[1,2]] sums to 3"),
    ("[[2,2]]", "[[4,0,0]]", 1, "must have the same shape"),
    ("[1,3]", "[2,2]", 1, "vision encoder must come before the LLM"),
    ("[4]", "[4]", 3, "--cfg.parallel_config.tp_size 3 does not divide"),
    ("[[1,x]]", "[4]", 1, "cannot parse"),
])
def test_bad_layout_cli_one_line(tiny_hf, tmp_path, llm, vit, tp, needle):
    p = _cli("Qwen2_5_VLConverter", "hf_to_mm", "--cfg.mm_dir", tmp_path / "mm", "--cfg.hf_config.hf_dir", tiny_hf(),
             "--cfg.parallel_config.llm_pp_layers", llm, "--cfg.parallel_config.vit_pp_layers", vit,
             "--cfg.parallel_config.tp_size", tp)
    assert p.returncode == 2
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("mm-convert: error: ") and needle in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "mm").exists()


def test_parse_layer_lists():
    assert parse_layer_list("[1,10,10,7]", "x") == ((1, 10, 10, 7),)
    assert parse_layer_list("[[12,16]]", "x") == ((12, 16),)
    assert parse_layer_list([[0, 1], [1, 2]], "x") == ((0, 1), (1, 2))
    assert parse_layer_list("36", "x") == ((36,),)
    lay = ParallelLayout.create(1, "[[0,1],[1,2]]", "[[4,0],[0,0]]")
    assert (lay.pp_size, lay.vpp_size) == (2, 2)
    assert [list(lay.layer_range("llm", p)) for p in range(4)] == [[], [0], [1], [2, 3]]
    assert lay.first_position("llm") == 1 and lay.last_position("vit") == 0
