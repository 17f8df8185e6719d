"""The training loop end to end on the tiny checkpoint (CPU, gloo): overfitting a synthetic caption set, a
resumed run bit-identical to an uninterrupted one, and a trained save that mm_to_hf / resplit / transformers
read with logits equal to the runtime's."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mm_convert.formats.mm import TRACKER
from mm_train.finetune import main as finetune
from mm_train.toydata import make_caption_set


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mm_convert import Qwen2_5_VLConverter
    from mm_convert.testing import make_tiny_hf_checkpoint
    root = tmp_path_factory.mktemp("train")
    hf = make_tiny_hf_checkpoint(root / "hf", dtype="float32", tied=True)
    conv = Qwen2_5_VLConverter(progress=False)
    conv.hf_to_mm(hf, root / "mm11", tp_size=1, llm_pp_layers=[4], vit_pp_layers=[4])
    conv.hf_to_mm(hf, root / "mm22", tp_size=2, llm_pp_layers=[1, 3], vit_pp_layers=[4, 0])
    data = make_caption_set(root / "data", 16, hf)
    return root, hf, data


def run(data, load, n, *extra, nproc=1, log=None):
    args = ["--nproc", str(nproc), "--data-config", str(data), "--load", str(load), "--train-iters", str(n), *extra]
    if log:
        args += ["--log-json", str(log)]
    finetune([str(a) for a in args])
    return [json.loads(line) for line in Path(log).read_text().splitlines()] if log else None


def test_overfits_caption_set(setup, tmp_path, capfd):
    root, hf, data = setup
    recs = run(data, root / "mm11", 50, "--global-batch-size", 4, "--micro-batch-size", 2, "--lr", "3e-3",
               "--lr-warmup-iters", 5, "--log-tps", log=tmp_path / "log.jsonl")
    assert len(recs) == 50
    assert recs[-1]["loss"] <= 0.5 * recs[0]["loss"], (recs[0]["loss"], recs[-1]["loss"])
    out = capfd.readouterr().out
    for part in ("iteration       50/      50", "consumed samples:          200", "elapsed time per iteration (ms)",
                 "learning rate", "global batch size:     4", "loss:", "grad norm:", "tokens/s:"):
        assert part in out


def shards(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): torch.load(p, weights_only=True) for p in sorted(d.rglob("*.pt"))}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_bit_identical(setup, tmp_path, precision):
    """DP=2 with 2 accumulated micro-batches per rank, the ViT trained too: 10 steps saving at 5, then a run
    loaded from step 5; step 10's weights, optimizer state and data position are bit-identical (also under
    bf16 autocast, whose fp32 master weights and optimizer state are what is saved)."""
    root, hf, data = setup
    common = ["--global-batch-size", 4, "--micro-batch-size", 1, "--lr", "1e-3", "--lr-warmup-iters", 2,
              "--train-vit", "--save-interval", 5] + (["--bf16"] if precision == "bf16" else [])
    a = run(data, root / "mm11", 10, "--save", tmp_path / "a", *common, nproc=2, log=tmp_path / "a.jsonl")
    assert (tmp_path / "a" / TRACKER).read_text().strip() == "10"
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "iter_0000005", tmp_path / "b" / "iter_0000005")
    (tmp_path / "b" / TRACKER).write_text("5")
    b = run(data, tmp_path / "b", 10, "--save", tmp_path / "b", *common, nproc=2, log=tmp_path / "b.jsonl")
    assert [r["loss"] for r in b] == [r["loss"] for r in a[5:]]
    if precision == "bf16":  # autocast really ran: the first step's loss is not the fp32 one
        f = run(data, root / "mm11", 1, *common[:-1], nproc=2, log=tmp_path / "f.jsonl")
        assert f[0]["loss"] != a[0]["loss"]
    sa, sb = shards(tmp_path / "a" / "iter_0000010"), shards(tmp_path / "b" / "iter_0000010")
    assert sa.keys() == sb.keys() == {"mp_rank_00/model_optim_rng.pt"}
    for k in sa:
        for part in ("model", "optimizer", "opt_param_scheduler", "data_state"):
            assert same(sa[k][part], sb[k][part]), part
        assert sa[k]["iteration"] == 10 and sa[k]["checkpoint_version"] == 3.0
        assert len(sa[k]["rng_state"]) == 2  # one per DP rank
    # the run did change the weights
    start = torch.load(root / "mm11" / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)["model"]
    assert any(not torch.equal(start[n], t) for n, t in sa[k]["model"].items())


def test_trained_save_converts_back(setup, tmp_path):
    """tp=2 x pp=2 with tied embeddings: the save has exactly the converter's keys per rank (the frozen vision
    encoder unchanged, everything else trained); mm_to_hf reads it,
    transformers loads the result, and its logits equal the runtime's on the save; resplit reads it too."""
    from mm_convert import Qwen2_5_VLConverter
    from mm_train.check_logits import check_logits
    root, hf, data = setup
    run(data, root / "mm22", 3, "--save", tmp_path / "s", "--global-batch-size", 2, "--micro-batch-size", 1,
        "--lr", "1e-3", "--no-save-rng", nproc=4)
    for rel, obj in shards(tmp_path / "s" / "iter_0000003").items():
        ref = torch.load(root / "mm22" / "release" / rel, weights_only=True)["model"]
        assert {k: v.shape for k, v in obj["model"].items()} == {k: v.shape for k, v in ref.items()}
        assert "rng_state" not in obj and "optimizer" in obj
        for k, t in obj["model"].items():  # defaults: vision encoder frozen, projector and LLM trained
            assert torch.equal(t, ref[k]) == k.startswith("image_encoder.encoder."), k
    conv = Qwen2_5_VLConverter(progress=False)
    conv.mm_to_hf(tmp_path / "s", tmp_path / "hf", hf_dir=hf)
    assert check_logits(tmp_path / "s", tmp_path / "hf", tolerance=1e-5, log=lambda *_: None) <= 1e-5
    conv.resplit(tmp_path / "s", tmp_path / "r", tp_size=1, llm_pp_layers=[4], vit_pp_layers=[4], hf_dir=hf)
    conv.mm_to_hf(tmp_path / "r", tmp_path / "hf2", hf_dir=hf)
    from safetensors.torch import load_file
    a = {k: v for f in sorted((tmp_path / "hf").glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted((tmp_path / "hf2").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_data_parallel_equals_accumulation(setup, tmp_path):
    """The same global batch of 4 as DP=2 x 1 micro-batch of 2, or as 1 rank accumulating 2 micro-batches of 2
    (the random sampler deals the same samples either way): same token-mean loss and grad norm (so the DP sum
    and the global normalisation are right), also one step on."""
    root, hf, _ = setup
    data = make_caption_set(tmp_path / "data", 16, hf, sampler="random")
    common = ["--global-batch-size", 4, "--micro-batch-size", 2, "--lr", "1e-3", "--lr-decay-style", "constant"]
    one = run(data, root / "mm11", 2, *common, nproc=1, log=tmp_path / "one.jsonl")
    two = run(data, root / "mm11", 2, *common, nproc=2, log=tmp_path / "two.jsonl")
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_gpipe_schedule_equals_sequential(setup, tmp_path):
    """All forwards then all backwards (GPipe) gives bit-identical weights to one micro-batch at a time."""
    from mm_convert import Qwen2_5_VLConverter
    root, hf, data = setup
    Qwen2_5_VLConverter(progress=False).hf_to_mm(hf, tmp_path / "mm", tp_size=1, llm_pp_layers=[1, 3],
                                                 vit_pp_layers=[4, 0], overwrite=True)
    for sched in ("sequential", "gpipe"):
        run(data, tmp_path / "mm", 2, "--save", tmp_path / sched, "--global-batch-size", 4, "--micro-batch-size", 1,
            "--train-vit", "--pipeline-schedule", sched, "--no-save-rng", nproc=2)
    a, b = shards(tmp_path / "sequential" / "iter_0000002"), shards(tmp_path / "gpipe" / "iter_0000002")
    assert len(a) == 2 and all(same(a[k]["model"], b[k]["model"]) and same(a[k]["optimizer"], b[k]["optimizer"]) for k in a)
