"""Vocabulary padding (Megatron's make_vocab_size_divisible_by) for every family: a tiny model whose vocabulary no
TP size of 4 divides converts at tp 4 with zero rows after the real ones, round-trips bit for bit (mm_to_hf cuts
the rows off without being told: they are read off the shards), resplits to another padding or none, is refused
without padding in one line naming the sizes, and runs in the runtime with the logits, loss and gradients of
transformers on the real vocabulary (padded ids never win)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import assert_same_tensors, load_hf_tensors, load_mm_shards
from mm_convert import CONVERTERS
from mm_convert.errors import LayoutError
from mm_convert.layout import LayoutOptions, ParallelLayout, padded_vocab
from mm_convert.testing import family, make_tiny_hf_checkpoint

VOCAB = 322  # 2 x 7 x 23: tp 4 does not divide it
# 4 kv heads so that tp 4 divides every other size of the tiny configs
OVERRIDES = {"Qwen2.5-VL": {"vocab_size": VOCAB, "num_key_value_heads": 4},
             "Qwen2-VL": {"vocab_size": VOCAB, "num_key_value_heads": 4},
             "Qwen3-VL": {"text_config": {"vocab_size": VOCAB, "num_key_value_heads": 4}}}
EMB, OUT = "text_decoder.embedding.word_embeddings.weight", "text_decoder.output_layer.weight"


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    cache = {}

    def make(fam: str = "Qwen2.5-VL", tied: bool = False, dtype: str = "float32"):
        if (fam, tied, dtype) not in cache:
            d = tmp_path_factory.mktemp(f"vocab_{fam}_{tied}_{dtype}")
            cache[fam, tied, dtype] = make_tiny_hf_checkpoint(d, family_name=fam, tied=tied, dtype=dtype,
                                                              overrides=OVERRIDES[fam])
        return cache[fam, tied, dtype]
    return make


def conv(fam: str = "Qwen2.5-VL"):
    return CONVERTERS[family(fam).CONVERTER](progress=False)


def test_padded_size_is_megatrons():
    assert padded_vocab(VOCAB, 1, 4) == 324 and padded_vocab(VOCAB, 128, 4) == 512
    assert padded_vocab(151674, 128, 8) == 152576 and padded_vocab(152064, 128, 4) == 152064
    layout = LayoutOptions(4, make_vocab_size_divisible_by=1).resolve(4, 4, "p", VOCAB)
    assert layout.padded_vocab_size == 324 and "vocab_rows=324" in layout.describe()
    assert LayoutOptions(2, make_vocab_size_divisible_by=1).resolve(4, 4, "p", VOCAB).padded_vocab_size == 0


def test_refused_without_padding_in_one_line(hf, tmp_path):
    with pytest.raises(LayoutError) as e:
        conv().hf_to_mm(hf(), tmp_path / "mm", tp_size=4, llm_pp_layers=[4], vit_pp_layers=[4])
    msg = str(e.value)
    assert "\n" not in msg and "tp_size 4 does not divide the vocab_size (322)" in msg
    assert "make_vocab_size_divisible_by" in msg
    assert not (tmp_path / "mm").exists()


CASES = [("Qwen2.5-VL", False, "float32", dict(llm_pp_layers=[1, 3], vit_pp_layers=[4, 0])),
         ("Qwen2.5-VL", True, "bfloat16", dict(llm_pp_layers=[[0, 1], [1, 2]], vit_pp_layers=[[2, 2], [0, 0]])),
         ("Qwen2-VL", True, "float32", dict(llm_pp_layers=[4], vit_pp_layers=[4])),
         ("Qwen3-VL", False, "bfloat16", dict(llm_pp_layers=[0, 4], vit_pp_layers=[2, 2]))]


@pytest.mark.parametrize("fam,tied,dtype,lists", CASES, ids=[f"{c[0]}-{'tied' if c[1] else 'untied'}-{c[2]}" for c in CASES])
def test_tp4_padded_round_trip_bit_exact(hf, tmp_path, fam, tied, dtype, lists):
    src, c = hf(fam, tied, dtype), conv(fam)
    r = c.hf_to_mm(src, tmp_path / "mm", tp_size=4, make_vocab_size_divisible_by=1, **lists)
    assert "vocab_rows=324 (padded)" in r.layout
    manifest = json.loads((tmp_path / "mm" / "mm_convert_manifest.json").read_text())
    assert manifest["layout"]["padded_vocab_size"] == 324
    assert c.layout_of(tmp_path / "mm").padded_vocab_size == 324  # read off the shards
    assert c.verify(src, tmp_path / "mm").ok  # the padded rows are zeros, the others the HF rows
    shards = load_mm_shards(tmp_path / "mm")
    ref = load_hf_tensors(src)
    table = next(v for k, v in ref.items() if k.endswith("embed_tokens.weight"))
    for rel, sd in shards.items():
        tp_rank = int(rel.split("_")[2][:2])
        for slot, state in ((k, v) for k, v in sd.items() if k.startswith("model")):
            for name in (EMB, OUT):
                if name in state:
                    t = state[name]
                    assert t.shape[0] == 81, (rel, slot, name, t.shape)
                    real = table if name == EMB or tied else next(v for k, v in ref.items() if k.endswith("lm_head.weight"))
                    lo = tp_rank * 81
                    n = max(0, min(81, VOCAB - lo))
                    assert torch.equal(t[:n], real[lo:lo + n]) and not t[n:].any()
    c.mm_to_hf(tmp_path / "mm", tmp_path / "back")  # no option, no HF directory: the manifest and the shards
    assert_same_tensors(ref, load_hf_tensors(tmp_path / "back"), f"{fam} padded")


def test_resplit_repads_and_equals_direct(hf, tmp_path):
    src, c = hf(), conv()
    c.hf_to_mm(src, tmp_path / "mm", tp_size=4, make_vocab_size_divisible_by=1, llm_pp_layers=[1, 3],
               vit_pp_layers=[4, 0])
    for name, extra in (("none", {}), ("pad64", {"make_vocab_size_divisible_by": 64})):
        c.resplit(tmp_path / "mm", tmp_path / f"rs_{name}", tp_size=2, llm_pp_layers=[4], vit_pp_layers=[4], **extra)
        c.hf_to_mm(src, tmp_path / f"direct_{name}", tp_size=2, llm_pp_layers=[4], vit_pp_layers=[4], **extra)
        a, b = load_mm_shards(tmp_path / f"rs_{name}"), load_mm_shards(tmp_path / f"direct_{name}")
        assert set(a) == set(b)
        for rel in a:
            assert_same_tensors(a[rel]["model"], b[rel]["model"], f"{name} {rel}")
    assert c.layout_of(tmp_path / "rs_none").padded_vocab_size == 0
    assert c.layout_of(tmp_path / "rs_pad64").padded_vocab_size == 384
    # a stated padding is checked against the shards
    with pytest.raises(LayoutError, match="does not match the shards"):
        c.mm_to_hf(tmp_path / "mm", tmp_path / "x", make_vocab_size_divisible_by=64)
    c.mm_to_hf(tmp_path / "mm", tmp_path / "ok", make_vocab_size_divisible_by=1)


def test_torch_dist_holds_the_padded_rows(hf, tmp_path):
    src, c = hf(), conv()
    c.hf_to_mm(src, tmp_path / "dist", tp_size=4, make_vocab_size_divisible_by=1, save_format="torch_dist")
    assert c.layout_of(tmp_path / "dist").padded_vocab_size == 324
    c.mm_to_hf(tmp_path / "dist", tmp_path / "back", hf_dir=src)
    assert_same_tensors(load_hf_tensors(src), load_hf_tensors(tmp_path / "back"), "torch_dist padded")


def test_cli_option_and_plan(hf, tmp_path):
    src = hf()
    base = [sys.executable, "-m", "mm_convert.cli", "Qwen2_5_VLConverter"]
    args = ["--cfg.mm_dir", str(tmp_path / "mm"), "--cfg.hf_config.hf_dir", str(src),
            "--cfg.parallel_config.tp_size", "4", "--cfg.parallel_config.make_vocab_size_divisible_by", "1"]
    plan = subprocess.run(base + ["plan", "hf_to_mm", "-v"] + args, capture_output=True, text=True)
    assert plan.returncode == 0, plan.stderr
    out = " ".join(plan.stdout.split())
    assert "vocab_rows=324 (padded)" in out and "zeros[79:81,0:64]" in out
    r = subprocess.run(base + ["hf_to_mm", "--quiet"] + args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    bad = subprocess.run(base + ["hf_to_mm", "--quiet"] + args[:-2] + ["--cfg.mm_dir", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "vocab_size (322)" in bad.stderr


def test_runtime_logits_equal_transformers_on_the_real_vocabulary(hf, tmp_path):
    """tp 4 (4 local ranks) on the padded shards: logits (1, S, 322) equal transformers' within 1e-5, and the
    padded ids are not among them (so they never win a greedy step)."""
    from mm_train.check_logits import check_logits

    from test_runtime import reweight

    src = reweight(make_tiny_hf_checkpoint(tmp_path / "hf", overrides=OVERRIDES["Qwen2.5-VL"]), 0.1, 3.0)
    conv().hf_to_mm(src, tmp_path / "mm", tp_size=4, make_vocab_size_divisible_by=1, llm_pp_layers=[4],
                    vit_pp_layers=[4])
    lines = []
    assert check_logits(tmp_path / "mm", src, tolerance=1e-5, log=lines.append) <= 1e-5
    assert "vocab_rows=324" in lines[0] and "tp=4" in lines[0]


def test_training_step_with_padding_equals_transformers(hf, tmp_path):
    """tp 2 pp 2 padded to 384 rows: the loss, grad norm and every gradient equal transformers' (the padded rows
    take no part: zero gradients, cut off by mm_to_hf like the rows themselves)."""
    from mm_train.check_grads import engine_loss_and_grads, hf_loss_and_grads

    from test_family_runtime import assert_step_equal
    from test_train_step import make_batch

    src = hf("Qwen2.5-VL", True)
    cfg, batch = make_batch(src, tmp_path)
    conv().hf_to_mm(src, tmp_path / "mm", tp_size=2, make_vocab_size_divisible_by=64, llm_pp_layers=[0, 4],
                    vit_pp_layers=[2, 2])
    ref_loss, ref = hf_loss_and_grads(src, batch)
    loss, got = engine_loss_and_grads(tmp_path / "mm", src, cfg, ParallelLayout.create(2, [0, 4], [2, 2]), batch)
    assert_step_equal(loss, got, ref_loss, ref)


def test_finetune_flags_check_the_padded_rows():
    """--vocab-size / --make-vocab-size-divisible-by describe the checkpoint's rows, padded or not (Megatron's
    rule: the tokenizer's vocabulary padded to a multiple of N x tp)."""
    from types import SimpleNamespace

    from mm_convert.errors import ConfigError
    from mm_train.config import ModelConfig
    from mm_train.finetune import check_layout_flags

    cfg = ModelConfig.from_hf(_tiny_cfg())
    padded = ParallelLayout.create(4, [4], [4], padded_vocab_size=324)

    def args(vocab, n):
        return SimpleNamespace(tensor_model_parallel_size=None, pipeline_model_parallel_size=None, mm_layout=None,
                               load="ckpt", vocab_size=vocab, make_vocab_size_divisible_by=n)
    check_layout_flags(args(VOCAB, 1), cfg, padded, "Qwen2_5_VLConverter")
    check_layout_flags(args(None, 1), cfg, padded, "Qwen2_5_VLConverter")
    with pytest.raises(ConfigError, match="is 512, but the model has 324 vocabulary rows"):
        check_layout_flags(args(None, 128), cfg, padded, "Qwen2_5_VLConverter")
    with pytest.raises(ConfigError, match="is 324, but the model has 322 vocabulary rows"):
        check_layout_flags(args(VOCAB, 1), cfg, ParallelLayout.create(4, [4], [4]), "Qwen2_5_VLConverter")


def _tiny_cfg() -> dict:
    from mm_convert.testing import tiny_config_dict

    return tiny_config_dict("Qwen2.5-VL", **OVERRIDES["Qwen2.5-VL"])
