"""--use-distributed-optimizer (train/dist_optimizer.py, Megatron's ZeRO-1): at DP=2 each rank holds half the
AdamW state, the run is bit-identical to the replicated optimizer (losses, weights, state), the save's
distrib_optim.pt gathered from the ranks holds exactly the replicated run's per-parameter state, a resumed run is
bit-identical to an uninterrupted one, saves of either optimizer load into the other, --no-save-optim /
--no-load-optim skip the file, and mm_to_hf reads the save. Tiny bf16 checkpoint (so the fp32 master weights
in the save matter), CPU, gloo."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from mm_convert.errors import CheckpointError
from mm_convert.formats.mm import TRACKER
from mm_train.finetune import main as finetune
from mm_train.toydata import make_caption_set

HERE = Path(__file__).resolve().parent
COMMON = ["--global-batch-size", 4, "--micro-batch-size", 1, "--lr", "1e-3", "--lr-warmup-iters", 2,
          "--weight-decay", "0.1", "--train-vit", "--save-interval", 2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mm_convert import Qwen2_5_VLConverter
    from mm_convert.testing import make_tiny_hf_checkpoint
    root = tmp_path_factory.mktemp("distopt")
    hf = make_tiny_hf_checkpoint(root / "hf", dtype="bfloat16", tied=True)
    conv = Qwen2_5_VLConverter(progress=False)
    conv.hf_to_mm(hf, root / "mm", tp_size=1, llm_pp_layers=[4], vit_pp_layers=[4])
    conv.hf_to_mm(hf, root / "mm_pp2", tp_size=1, llm_pp_layers=[1, 3], vit_pp_layers=[4, 0])
    return root, hf, make_caption_set(root / "data", 16, hf)


def run(data, load, n, *extra, log=None, nproc=2):
    args = ["--nproc", nproc, "--data-config", data, "--load", load, "--train-iters", n, *extra]
    finetune([str(a) for a in args + (["--log-json", log] if log else [])])
    return [json.loads(line) for line in Path(log).read_text().splitlines()] if log else None


@pytest.fixture(scope="module")
def runs(setup):
    """4 steps at DP=2 (2 accumulated micro-batches each), saves at 2 and 4: replicated and distributed."""
    root, hf, data = setup
    logs = {}
    for kind, flags in (("rep", []), ("dist", ["--use-distributed-optimizer"])):
        logs[kind] = run(data, root / "mm", 4, "--save", root / kind, *COMMON, *flags, log=root / f"{kind}.jsonl")
    return root, logs


def load(save: Path, it: int, name: str = "model_optim_rng.pt") -> dict:
    return torch.load(save / f"iter_{it:07d}" / "mp_rank_00" / name, weights_only=True)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def replicated_state(obj: dict) -> dict[str, dict[str, torch.Tensor]]:
    """name -> fp32 weight and AdamW state of a replicated save, numbered as make_optimizer numbers them (every
    parameter trained here: the matrices first, then the rest, each in the file's order)."""
    model, adamw = obj["model"], obj["optimizer"]["adamw"]
    names = [n for n, t in model.items() if t.ndim > 1] + [n for n, t in model.items() if t.ndim <= 1]
    order = [i for g in adamw["param_groups"] for i in g["params"]]
    assert len(order) == len(names)
    return {n: {"param": obj["optimizer"]["master"]["model"][n], **adamw["state"][i]} for n, i in zip(names, order)}


def distributed_state(save: Path, it: int) -> dict[str, dict[str, torch.Tensor]]:
    """name -> weight and AdamW state, read off distrib_optim.pt's flat tensors by its param_map."""
    obj = load(save, it, "distrib_optim.pt")
    assert obj["buckets_coalesced"] is True and obj["mm_train"]["optimizer"] == "distributed"
    (world,) = obj[0].values()
    assert list(obj[0]) == [(torch.float32, torch.float32)]
    assert world["param"].numel() == world["exp_avg"].numel() == world["numel_unpadded"]
    out = {}
    for e in world["param_map"]:
        assert e["slot"] == "model"
        out[e["name"]] = {k: world[k][e["start"]:e["end"]].view(e["shape"]) for k in ("param", "exp_avg", "exp_avg_sq")}
    return out


def test_bit_identical_to_replicated_and_the_save_holds_its_state(runs):
    """Two 4-step DP=2 runs (replicated and distributed) of about 10 s each: same losses and grad norms, same
    weights; distrib_optim.pt's gathered shards equal the replicated AdamW state and fp32 weights bit for bit."""
    root, logs = runs
    rep, dist = logs["rep"], logs["dist"]
    assert [(r["loss"], r["grad_norm"]) for r in rep] == [(r["loss"], r["grad_norm"]) for r in dist]
    for it in (2, 4):
        r, d = load(root / "rep", it), load(root / "dist", it)
        assert same(r["model"], d["model"]) and same(r["data_state"], d["data_state"])
        assert r["optimizer"]["kind"] == "replicated" and d["optimizer"]["kind"] == "distributed"
        assert "adamw" not in d["optimizer"] and d["optimizer"]["master"] == {}  # everything trained: all in the file
        assert d["args"]["use_distributed_optimizer"] is True
        groups = d["optimizer"]["optimizer"]["param_groups"]
        assert [g["step"] for g in groups] == [it, it]
        assert [{k: v for k, v in g.items() if k != "params"} for g in r["optimizer"]["adamw"]["param_groups"]] == \
               [{k: v for k, v in g.items() if k != "step"} for g in groups]
        want, have = replicated_state(r), distributed_state(root / "dist", it)
        assert want.keys() == have.keys() == r["model"].keys()
        for n in want:
            assert float(want[n]["step"]) == it
            for k in ("param", "exp_avg", "exp_avg_sq"):
                assert same(want[n][k], have[n][k]), (it, n, k)
            assert same(have[n]["param"].to(torch.bfloat16), d["model"][n])
    assert not (root / "rep" / "iter_0000004" / "mp_rank_00" / "distrib_optim.pt").exists()
    assert sorted(p.name for p in (root / "dist").iterdir()) == ["iter_0000002", "iter_0000004", TRACKER]


def _resume(root: Path, src: str, it: int, dst: str) -> Path:
    (root / dst).mkdir()
    shutil.copytree(root / src / f"iter_{it:07d}", root / dst / f"iter_{it:07d}")
    (root / dst / TRACKER).write_text(str(it))
    return root / dst


@pytest.mark.parametrize("src,flags,want", [("dist", ["--use-distributed-optimizer"], "dist"),
                                            ("dist", [], "rep"),
                                            ("rep", ["--use-distributed-optimizer"], "dist")])
def test_resume_is_bit_identical(runs, setup, src, flags, want):
    """Steps 3-4 from the step-2 save (about 8 s per case): the same optimizer continues bit-identically, and either
    kind of save loads into the other optimizer (converted by name) with the same result."""
    root, logs = runs
    data = setup[2]
    b = _resume(root, src, 2, f"{src}_to_{want}")
    log = run(data, b, 4, "--save", b, *COMMON, *flags, log=root / f"{src}_to_{want}.jsonl")
    assert [r["loss"] for r in log] == [r["loss"] for r in logs[want][2:]]
    x, y = load(b, 4), load(root / want, 4)
    for part in ("model", "optimizer", "opt_param_scheduler", "data_state"):
        assert same(x[part], y[part]), part
    if src == want:  # the Python and numpy RNG are not seeded: only a resumed run has the same state
        assert same(x["rng_state"], y["rng_state"])
    if want == "dist":
        assert same(load(b, 4, "distrib_optim.pt"), load(root / want, 4, "distrib_optim.pt"))


def test_no_save_optim_no_load_optim_and_missing_file(runs, setup):
    """--no-load-optim ignores distrib_optim.pt (removed here), --no-save-optim writes none; without the flag a
    missing distrib_optim.pt is one line naming it. One rank (DP=1) loads the DP=2 save."""
    root, _ = runs
    data = setup[2]
    b = _resume(root, "dist", 2, "nofile")
    (b / "iter_0000002" / "mp_rank_00" / "distrib_optim.pt").unlink()
    with pytest.raises(CheckpointError, match=r"distrib_optim\.pt: missing; the save was written with "
                                              r"--use-distributed-optimizer"):
        run(data, b, 3, "--use-distributed-optimizer", *COMMON, nproc=1)
    run(data, b, 3, "--save", b, "--use-distributed-optimizer", "--no-load-optim", "--no-save-optim", *COMMON, nproc=1)
    assert (b / TRACKER).read_text().strip() == "3"
    assert sorted(p.name for p in (b / "iter_0000003" / "mp_rank_00").iterdir()) == ["model_optim_rng.pt"]
    assert "optimizer" not in load(b, 3)


def test_mm_to_hf_reads_the_save(runs, setup):
    """mm_to_hf of a distributed-optimizer save: the same HF tensors as the replicated run's save."""
    from safetensors.torch import load_file

    from mm_convert import Qwen2_5_VLConverter
    root, _ = runs
    hf = setup[1]
    conv = Qwen2_5_VLConverter(progress=False)
    for kind in ("rep", "dist"):
        conv.mm_to_hf(root / kind, root / f"hf_{kind}", hf_dir=hf)
    a, b = (load_file(next((root / f"hf_{k}").glob("*.safetensors"))) for k in ("rep", "dist"))
    start = load_file(next(Path(hf).glob("*.safetensors")))
    assert a.keys() == b.keys() == start.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], start[k]) for k in a)


def test_each_rank_holds_half_the_state(setup, tmp_path):
    """pp=2 x DP=2 ranks (each stage sharded over its own DP group, the tied embedding on both stages) build the
    real TrainModel; three steps with the same synthetic gradients (what every DP rank has after the DP sum)
    under each optimizer: bit-identical weights and state, and a distributed rank holds ceil(N / 2) elements of
    exp_avg where the replicated one holds N (N: its stage's trainable elements). About 20 s: starting 4 ranks
    on the test machine's 2 cores."""
    nproc = 4
    from mm_train.launch import launch_local
    root, hf, _ = setup
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    launch_local("test_dist_optimizer", [str(root / "mm_pp2"), str(hf), str(tmp_path)], nproc, env=env)
    for r in range(nproc):
        rep = json.loads((tmp_path / f"rank{r}.json").read_text())
        n, dp_rank, shard = rep["trainable"], r // (nproc // 2), -(-rep["trainable"] // 2)
        assert rep["replicated_numel"] == n and rep["distributed_numel"] == shard < n
        assert rep["pieces_numel"] == min(shard, n - dp_rank * shard)  # the last rank's range ends in padding
        assert rep["same_weights"] and rep["same_state"]


def _worker(mm: str, hf: str, out: str) -> None:
    """One rank of test_each_rank_holds_half_the_state."""
    from argparse import Namespace

    import torch.distributed as dist

    from mm_convert.converter import converter_for
    from mm_train.config import ModelConfig, read_hf_config
    from mm_train.engine import TrainModel
    from mm_train.optimizer import make_optimizer
    from mm_train.parallel import pick_backend

    dist.init_process_group(pick_backend()[0])
    layout = converter_for(read_hf_config(hf)[0], progress=False).layout_of(mm, hf)
    dp = dist.get_world_size() // (layout.tp_size * layout.pp_size)
    tm = TrainModel(ModelConfig.from_hf(hf), layout, mm, dp_size=dp, train_vit=True)
    start = tm.state_dicts()

    def train(distributed: bool):
        with torch.no_grad():
            for slot, n, p in tm.named_parameters():
                p.copy_(start[slot][n])
        opt = make_optimizer(Namespace(lr=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
                                       use_distributed_optimizer=distributed), tm)
        for step in range(3):
            opt.zero_grad(set_to_none=True)
            g = torch.Generator().manual_seed(step)  # the same gradients on every DP rank
            for p in tm.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            for group in opt.param_groups:
                group["lr"] = 1e-2 * (step + 1)
            opt.step()
        return opt, tm.state_dicts()

    rep, w_rep = train(False)
    dis, w_dis = train(True)
    same_state = True
    for view, p, a, b in dis._pieces:
        st = dis.inner.state[view]
        same_state &= float(st["step"]) == float(rep.state[p]["step"]) == 3.0
        for k in ("exp_avg", "exp_avg_sq"):
            same_state &= torch.equal(st[k], rep.state[p][k].reshape(-1)[a:b])
    report = {"trainable": sum(p.numel() for p in tm.parameters()),
              "replicated_numel": sum(s["exp_avg"].numel() for s in rep.state.values()),
              "distributed_numel": dis.state_numel(), "pieces_numel": sum(b - a for _, _, a, b in dis._pieces),
              "same_weights": all(torch.equal(w_rep[s][n], w_dis[s][n]) for s in w_rep for n in w_rep[s]),
              "same_state": bool(same_state)}
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
