"""Thread defaults of the runtime's ranks: each local rank takes its share of the cores unless OMP_NUM_THREADS
is set; a setting that leaves cores idle (torchrun's default of 1) is kept and said once."""
from __future__ import annotations

import json
import os

import pytest

from mm_train.launch import launch_local, thread_plan

PROBE = """
import json, os, sys
import torch
from mm_train.launch import worker_main

def report(out):
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(torch.get_num_threads(), f)

worker_main(report, sys.argv[1])
"""


@pytest.mark.parametrize("cores,ranks,env,threads,note", [
    (16, 1, None, 16, None),            # one rank gets every core
    (16, 4, None, 4, None),             # n ranks share them
    (2, 4, None, 1, None),              # never fewer than one thread
    (16, 2, "8", 8, None),              # the user's setting, using every core: kept, nothing said
    (16, 2, "1", 1, "leaves 14 of 16 cores idle"),  # torchrun's default: kept, said
    (16, 2, "many", 8, "is not a number"),
])
def test_thread_plan(cores, ranks, env, threads, note):
    got, said = thread_plan(cores, ranks, env)
    assert got == threads
    assert (said is None) if note is None else (note in said)


@pytest.mark.parametrize("nprocs", [1, 2])
def test_local_ranks_share_the_cores(tmp_path, monkeypatch, nprocs):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    (tmp_path / "threads_probe.py").write_text(PROBE)
    out = tmp_path / "out"
    out.mkdir()
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    launch_local("threads_probe", [str(out)], nprocs, env={"PYTHONPATH": path}, timeout=120)
    cores = len(os.sched_getaffinity(0))
    got = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nprocs)]
    assert got == [max(1, cores // nprocs)] * nprocs
