"""Bad training data and interrupted saves (issue 15): each bad sample is one line naming the data file, the
sample's index and id and what is wrong, printed once, no traceback, exit 2, nothing trained; with
--skip-bad-samples the run trains on the rest and records the count; a save interrupted at any moment leaves the
tracker on a complete iteration, and restarts reach the same weights as an uninterrupted run."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import load_mm_shards

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tiny_hf, tmp_path_factory):
    """A tiny model converted to MM (tp1 pp1), 8 good caption samples plus one bad sample of each kind."""
    from PIL import Image

    from mm_convert import Qwen2_5_VLConverter
    from mm_train.toydata import make_caption_set

    root = tmp_path_factory.mktemp("integrity")
    hf = tiny_hf()
    Qwen2_5_VLConverter(progress=False).hf_to_mm(hf, root / "mm", tp_size=1, llm_pp_layers=[4], vit_pp_layers=[4])
    data = make_caption_set(root / "data", 8, hf)
    (root / "data" / "images" / "broken.png").write_bytes(b"not an image at all")
    Image.new("RGB", (3000, 10), (1, 2, 3)).save(root / "data" / "images" / "thin.png")
    ask = {"from": "human", "value": "<image>\nWhat colour is this?"}
    bad = [  # (id, sample, what the message says)
        ("missing", {"id": "missing", "image": "images/nope.png", "conversations": [ask, {"from": "gpt", "value": "Red."}]},
         "missing image"),
        ("broken", {"id": "broken", "image": "images/broken.png", "conversations": [ask, {"from": "gpt", "value": "Red."}]},
         "unreadable image"),
        ("silent", {"id": "silent", "image": "images/0.png", "conversations": [ask]}, "no assistant turn"),
        ("robot", {"id": "robot", "conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Beep"}]},
         "unknown role 'robot'"),
        ("thin", {"id": "thin", "image": "images/thin.png", "conversations": [ask, {"from": "gpt", "value": "Grey."}]},
         "cannot be resized"),
        ("long", {"id": "long", "conversations": [{"from": "human", "value": "word " * 400}, {"from": "gpt", "value": "Ok."}]},
         "longer than --seq-length 300"),
    ]
    samples = json.loads((root / "data" / "captions.json").read_text())
    first_bad = len(samples)
    (root / "data" / "captions.json").write_text(json.dumps(samples + [s for _, s, _ in bad]))
    return {"root": root, "data": data, "mm": root / "mm", "bad": [(first_bad + i, id_, what) for i, (id_, _, what) in enumerate(bad)]}


def finetune(setup, *extra, save=None):
    args = [sys.executable, "-m", "mm_train.finetune", "--data-config", setup["data"], "--load", setup["mm"],
            "--train-iters", "2", "--micro-batch-size", "2", "--global-batch-size", "2", "--seq-length", "300",
            "--lr", "1e-3", *extra] + (["--save", save, "--save-interval", "2"] if save else [])
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_bad_samples_stop_the_run_before_training(setup, tmp_path):
    p = finetune(setup, save=tmp_path / "save")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "iteration" not in p.stdout
    lines = [line for line in p.stderr.splitlines() if line.startswith("mm_train.finetune: error: ")]
    captions = str(setup["root"] / "data" / "captions.json")
    for index, id_, what in setup["bad"]:
        mine = [line for line in lines if f"sample {index} (id '{id_}')" in line]
        assert len(mine) == 1 and captions in mine[0] and what in mine[0], (id_, lines)
    assert lines[-1].endswith("6 bad samples of 14 read; nothing was trained: fix them or pass --skip-bad-samples")
    assert not (tmp_path / "save").exists()


def test_skip_bad_samples_trains_on_the_rest_and_records_the_count(setup, tmp_path):
    p = finetune(setup, "--skip-bad-samples", save=tmp_path / "save")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "skipped 6 bad samples (--skip-bad-samples), training on 8" in p.stdout
    assert "iteration        2/       2" in p.stdout
    shard = load_mm_shards(tmp_path / "save")["mp_rank_00/model_optim_rng.pt"]
    assert shard["data_state"]["skipped_samples"] == 6


def test_corrupt_save_is_refused_in_one_line(setup, tmp_path):
    p = finetune(setup, "--skip-bad-samples", save=tmp_path / "save")
    assert p.returncode == 0, p.stderr[-2000:]
    shard = tmp_path / "save" / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    args = ["--skip-bad-samples"]
    p = subprocess.run([sys.executable, "-m", "mm_train.finetune", "--data-config", str(setup["data"]), "--load",
                        str(tmp_path / "save"), "--train-iters", "4", "--micro-batch-size", "2", "--global-batch-size",
                        "2", *args], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("mm_train.finetune: error: ")]
    assert len(errors) == 1 and str(shard) in errors[0] and "truncated or corrupt" in errors[0], p.stderr[-1500:]


def _complete(save: Path) -> int | None:
    """The tracker's iteration, after checking that every shard of it loads; None without a tracker."""
    tracker = save / "latest_checkpointed_iteration.txt"
    if not tracker.exists():
        return None
    it = int(tracker.read_text())
    shards = sorted((save / f"iter_{it:07d}").glob("mp_rank_*/model_optim_rng.pt"))
    assert len(shards) == 4, (it, shards)
    for s in shards:
        torch.load(s, map_location="cpu", weights_only=True)
    return it


def test_sigkill_at_random_moments_of_saves(setup, tiny_hf, tmp_path):
    """tp2 pp2 (4 ranks), a save every iteration: 20 times the whole run is killed (SIGKILL, process group) at a
    random moment while a save is being written; each time the tracker names a complete, loadable iteration,
    and the restart resumes from it (the interrupted save's staging directory is removed). The final weights
    equal an uninterrupted run's bit for bit. About 70 s: 22 starts of four ranks; the issue asks for 20
    moments of a tp2 pp2 save."""
    from mm_convert import Qwen2_5_VLConverter

    mm = tmp_path / "mm"
    Qwen2_5_VLConverter(progress=False).hf_to_mm(tiny_hf(), mm, tp_size=2, llm_pp_layers=[1, 3], vit_pp_layers=[4, 0])
    iters = "6"

    def cmd(save):
        return [sys.executable, "-m", "mm_train.finetune", "--nproc", "4", "--data-config", str(setup["data"]),
                "--load", str(save if (save / "latest_checkpointed_iteration.txt").exists() else mm),
                "--save", str(save), "--save-interval", "1", "--train-iters", iters, "--micro-batch-size", "2",
                "--global-batch-size", "2", "--lr", "1e-3", "--skip-bad-samples", "--seq-length", "300"]

    ref = tmp_path / "ref"
    ref.mkdir()
    assert subprocess.run(cmd(ref), capture_output=True, cwd=REPO, timeout=300).returncode == 0
    save = tmp_path / "save"
    save.mkdir()
    rng = random.Random(0)
    kills = cleaned = 0
    while kills < 20:
        p = subprocess.Popen(cmd(save), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO,
                             start_new_session=True, text=True)
        deadline = time.monotonic() + 120
        while p.poll() is None and not any(save.glob("iter_*.saving")) and time.monotonic() < deadline:
            time.sleep(0.002)
        if p.poll() is not None:  # finished before a save could be caught: start over from scratch
            out = p.stdout.read()
            assert p.returncode == 0, out[-2000:]
            for d in save.iterdir():
                subprocess.run(["rm", "-rf", str(d)], check=True)
            continue
        time.sleep(rng.uniform(0, 0.05))
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        kills += 1
        _complete(save)  # whatever the moment: a complete iteration, or none yet
        cleaned += bool(list(save.glob("iter_*.saving")))
    p = subprocess.run(cmd(save), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert _complete(save) == int(iters) and not list(save.glob("iter_*.saving"))
    a, b = load_mm_shards(ref), load_mm_shards(save)
    assert set(a) == set(b)
    for rel in a:
        for k, t in a[rel]["model"].items():
            assert torch.equal(t, b[rel]["model"][k]), (rel, k)
    assert cleaned > 0  # some kills did land inside a save
