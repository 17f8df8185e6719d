"""The 1F1B pipeline schedule (train/schedule.py, TrainModel.train_step).

Pure checks of the schedule tables: every rank's program runs to the end when each transfer blocks until the
other side reaches it (no deadlock, for pp 1-5, vpp 1-3, 1-10 micro-batches, with and without trailing empty
positions), each unit's backwards run in micro-batch order, and the forward contexts held at once are exactly
Megatron's (pp - stage for 1F1B, every micro-batch for GPipe).

On the tiny checkpoint (CPU, gloo): two steps of 4 accumulated micro-batches of varied shapes, with AdamW, run by
1F1B, GPipe and the sequential orders give bit-identical losses, grad norms, gradients and weights
to the sequential path (``forward_backward`` per micro-batch), at pp 2, at pp 2 with 2 virtual chunks per stage,
and at tp 2 x pp 2; and ``--pipeline-schedule 1f1b`` of the training command logs and saves what its
sequential schedule does.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from mm_train.schedule import compute_order, peak_in_flight, programs

HERE = Path(__file__).resolve().parent


# ---- the tables --------------------------------------------------------------------------------------------

def play(progs) -> list[int]:
    """Run the programs with blocking transfers (a send or receive waits until the other rank is at the matching
    one); returns how far each rank got (all the way: no deadlock)."""
    idx = [0] * len(progs)
    moved = True
    while moved:
        moved = False
        for r, prog in enumerate(progs):
            while idx[r] < len(prog) and prog[idx[r]][0] in ("F", "B"):
                idx[r] += 1
                moved = True
            if idx[r] < len(prog):
                kind, what, m, u, peer = prog[idx[r]]
                other = progs[peer][idx[peer]] if idx[peer] < len(progs[peer]) else None
                if other == ("recv" if kind == "send" else "send", what, m, u, r):
                    idx[r] += 1
                    idx[peer] += 1
                    moved = True
    return idx


CASES = [(pp, vpp, n, units) for pp in range(1, 6) for vpp in range(1, 4) for n in range(1, 11)
         for units in ([1] if pp == 1 else range(pp * vpp - pp + 1, pp * vpp + 1))]


def test_programs_never_deadlock():
    for schedule in ("1f1b", "gpipe", "sequential"):
        for pp, vpp, n, units in CASES:
            progs = programs(schedule, pp, vpp, n, units)
            assert play(progs) == [len(p) for p in progs], (schedule, pp, vpp, n, units)
            for r, prog in enumerate(progs):
                ops = [op for op in prog if op[0] in ("F", "B")]
                mine = [u for u in range(units) if u % pp == r]
                assert sorted(ops) == sorted((k, m, u) for k in "FB" for m in range(n) for u in mine)
                for u in mine:  # .grad adds the micro-batches in the sequential schedule's order
                    assert [m for k, m, v in ops if k == "B" and v == u] == list(range(n)), (schedule, pp, vpp, n)


def test_in_flight_is_megatrons():
    """Forward contexts held at once by stage s (one per micro-batch and position): 1F1B min(pp - s, n); GPipe n
    per position; sequential one micro-batch; interleaved 1F1B (pp divides n) Megatron's warm-up + 1."""
    for pp, vpp, n, units in CASES:
        for s in range(pp):
            held = {k: peak_in_flight([op for op in programs(k, pp, vpp, n, units)[s] if op[0] in ("F", "B")])
                    for k in ("1f1b", "gpipe", "sequential")}
            mine = len([u for u in range(units) if u % pp == s])
            assert held["gpipe"] == n * mine and held["sequential"] == mine
            if vpp == 1 or pp == 1:
                assert held["1f1b"] == (min(pp - s, n) if pp > 1 else 1) * mine  # mine: 0 on an empty last stage
            elif n % pp == 0 and units == pp * vpp:
                assert held["1f1b"] == min((pp - s - 1) * 2 + (vpp - 1) * pp + 1, n * vpp), (pp, vpp, n, s)
            else:
                assert held["1f1b"] <= held["gpipe"]
    assert [peak_in_flight(compute_order("1f1b", 4, 1, 8, 4, s)) for s in range(4)] == [4, 3, 2, 1]


def test_transfers_sit_where_megatron_puts_them():
    """pp 2, 4 micro-batches: stage 0 warms up with one forward, then each steady step receives the gradient of
    micro-batch i before sending the output of micro-batch i + 1 (stage 1 sends that gradient, then receives)."""
    s0, s1 = programs("1f1b", 2, 1, 4, 2)
    assert s0[:6] == (("F", 0, 0), ("send", "act", 0, 1, 1), ("F", 1, 0), ("recv", "grad", 0, 0, 1),
                      ("send", "act", 1, 1, 1), ("B", 0, 0))
    assert s1[:6] == (("recv", "act", 0, 1, 0), ("F", 0, 1), ("B", 0, 1), ("send", "grad", 0, 0, 0),
                      ("recv", "act", 1, 1, 0), ("F", 1, 1))


# ---- the runtime -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def micro_batches(tiny_hf, tmp_path_factory):
    """6 micro-batches of 1-2 samples, images of different sizes and text-only ones: every transfer's shapes
    differ from the last."""
    import numpy as np
    from PIL import Image

    from mm_train.batch import collate
    from mm_train.config import ModelConfig
    from mm_train.data import encode, parse_sample
    from mm_train.inputs import load_processors

    hf = tiny_hf("float32", tied=True)
    root = tmp_path_factory.mktemp("sched")
    tok, ip = load_processors(hf)
    cfg = ModelConfig.from_hf(hf)
    rng = np.random.RandomState(0)

    def sample(i: int, image: tuple | None):
        turns = [{"from": "human", "value": ("<image>\n" if image else "") + "What is it?" + " more" * i},
                 {"from": "gpt", "value": "A cat." + " yes" * (3 * i % 5)}]
        doc = {"conversations": turns}
        if image:
            Image.fromarray(rng.randint(0, 255, image + (3,), np.uint8)).save(root / f"{i}.png")
            doc["image"] = f"{i}.png"
        return encode(parse_sample(doc, str(i)), tok, ip, root)

    shapes = [[(56, 84)], [None, (28, 56)], [(84, 56), (56, 56)], [None], [(28, 28)], [None, (56, 28)]]
    batches, i = [], 0
    for mb in shapes:
        enc = []
        for image in mb:
            enc.append(sample(i, image))
            i += 1
        batches.append({k: v for k, v in collate(enc, cfg).items() if k != "attention_mask"})
    torch.save(batches, root / "batches.pt")
    return hf, root / "batches.pt"


LAYOUTS = {"pp2": (1, [1, 3], [4, 0]), "pp2-vpp2": (1, [[1, 1], [1, 1]], [[4, 0], [0, 0]]),
           "tp2-pp2": (2, [1, 3], [4, 0])}


@pytest.mark.parametrize("names", [("pp2", "pp2-vpp2", "finetune"), ("tp2-pp2",)], ids="+".join)
def test_1f1b_is_bit_identical(names, micro_batches, conv, tmp_path):
    """Two steps of 4 micro-batches each (the ViT trained, tied embeddings on both stages), AdamW between them:
    every schedule's per-micro-batch losses, grad norm, every gradient of both steps and the weights after
    them are bit-identical to ``forward_backward`` per micro-batch; the forward contexts each stage held at once
    are exactly the schedule's (1F1B: pp - stage, GPipe: 4 per position; with VPP per chunk). "finetune": the
    training command's ``--pipeline-schedule 1f1b`` at pp 2 (2 steps of 4 micro-batches) logs the same losses and
    grad norms and saves the same weights and optimizer state as its sequential schedule. One launch per world
    size, 20-40 s each on the test machine's 2 shared cores (starting the ranks is much of it)."""
    from mm_train.launch import launch_local
    from mm_train.toydata import make_caption_set
    from test_train_loop import same, shards

    hf, batches = micro_batches
    tp = LAYOUTS[names[0]][0]
    for name in names:
        tp_, llm, vit = LAYOUTS["pp2" if name == "finetune" else name]
        conv.hf_to_mm(hf, tmp_path / name, tp_size=tp_, llm_pp_layers=llm, vit_pp_layers=vit)
    if "finetune" in names:
        make_caption_set(tmp_path / "data", 8, hf)
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    launch_local("test_pipeline_schedule", [str(hf), str(batches), str(tmp_path), *names], tp * 2, env=env,
                 timeout=300)
    for name in (n for n in names if n != "finetune"):
        vpp = 2 if "vpp" in name else 1
        for r in range(tp * 2):
            rep = json.loads((tmp_path / f"{name}.rank{r}.json").read_text())
            stage = rep["stage"]
            assert rep["differs"] == [], (name, rep["differs"])
            assert rep["gradients"] > 0 and rep["loss_stage"] == (stage == 1)
            if vpp == 1:
                assert rep["peak"] == {"1f1b": [2 - stage] * 2, "gpipe": [4, 4], "sequential": [1, 1]}, name
            else:  # Megatron's interleaved warm-up ((pp - s - 1) * 2 + (vpp - 1) * pp) + 1, in chunk contexts
                assert rep["peak"] == {"1f1b": [5 - 2 * stage] * 2, "gpipe": [8, 8], "sequential": [2, 2]}, name
    if "finetune" in names:
        logs = {k: [json.loads(line) for line in (tmp_path / f"{k}.jsonl").read_text().splitlines()]
                for k in ("sequential", "1f1b")}
        assert len(logs["1f1b"]) == 2
        assert [(r["loss"], r["grad_norm"]) for r in logs["1f1b"]] == \
            [(r["loss"], r["grad_norm"]) for r in logs["sequential"]]
        a, b = shards(tmp_path / "sequential" / "iter_0000002"), shards(tmp_path / "1f1b" / "iter_0000002")
        assert len(a) == 2 and a.keys() == b.keys()
        assert all(same(a[k]["model"], b[k]["model"]) and same(a[k]["optimizer"], b[k]["optimizer"]) for k in a)


def _worker(hf: str, batches_path: str, out: str, *names: str) -> None:
    """One rank of test_1f1b_is_bit_identical: for each layout, the same two steps under each schedule from the
    same weights; "finetune": the training command's loop (``train``) under each schedule, in these ranks."""
    import torch.distributed as dist

    from mm_train.finetune import parse_args, train

    for name in names:
        if name == "finetune":
            for sched in ("sequential", "1f1b"):
                train(parse_args(["--data-config", str(Path(out, "data", "data.json")), "--load", str(Path(out, name)),
                                  "--train-iters", "2", "--save", str(Path(out, sched)), "--global-batch-size", "4",
                                  "--micro-batch-size", "1", "--train-vit", "--pipeline-schedule", sched,
                                  "--no-save-rng", "--log-json", str(Path(out, f"{sched}.jsonl"))]))
            continue
        report = _compare_schedules(str(Path(out, name)), hf, batches_path)
        Path(out, f"{name}.rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def _compare_schedules(mm: str, hf: str, batches_path: str) -> dict:
    from argparse import Namespace

    from mm_convert.converter import converter_for
    from mm_train.batch import label_tokens
    from mm_train.config import ModelConfig, read_hf_config
    from mm_train.engine import TrainModel
    from mm_train.optimizer import make_optimizer

    layout = converter_for(read_hf_config(hf)[0], progress=False).layout_of(mm, hf)
    tm = TrainModel(ModelConfig.from_hf(hf), layout, mm, train_vit=True)
    start = tm.state_dicts()
    all_batches = torch.load(batches_path, weights_only=True)
    steps = [all_batches[:4], all_batches[2:]]
    runs, peaks = {}, {}
    for schedule in ("reference", "1f1b", "gpipe", "sequential"):
        with torch.no_grad():
            for slot, n, p in tm.named_parameters():
                p.copy_(start[slot][n])
        opt = make_optimizer(Namespace(lr=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8), tm)
        rec: dict = {"losses": [], "norms": [], "grads": []}
        for batches in steps:
            denom = float(sum(label_tokens(b) for b in batches))
            opt.zero_grad(set_to_none=True)
            if schedule == "reference":
                outs = [tm.forward_backward(b, denom) for b in batches]
            else:
                outs = tm.train_step(batches, denom, schedule=schedule)
                peaks.setdefault(schedule, []).append(tm.peak_in_flight)
            tm.reduce_grads()
            rec["norms"].append(tm.clip_grads(1.0))
            rec["losses"].append(outs)
            rec["grads"].append({(s, n): p.grad.clone() for s, n, p in tm.named_parameters() if p.grad is not None})
            opt.step()
        rec["weights"] = tm.state_dicts()
        runs[schedule] = rec

    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    ref = runs["reference"]
    return {"stage": tm.ps.pp_rank, "differs": [f"{s}: {k}" for s, rec in runs.items() for k in rec if not same(rec[k], ref[k])],
            "peak": peaks, "gradients": len(ref["grads"][0]), "loss_stage": ref["losses"][0][0] is not None}


if __name__ == "__main__":
    from mm_train.launch import worker_main

    worker_main(_worker, *sys.argv[1:])
