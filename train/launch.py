"""Start N local ranks the way torchrun does (same environment variables), wait, and report failures.

A worker wrapped in ``worker_main`` that fails writes its exception to ``<error_dir>/rank<r>.json``; the
launcher kills the other ranks (they would wait forever on the failed one) and re-raises the first error with
its original mm_convert error class, so a bad shard surfaces as the CheckpointError naming the parameter.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import mm_convert.errors as errors

ERROR_DIR_ENV = "MM_RUNTIME_ERROR_DIR"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(module: str, args: list[str], nprocs: int, *, timeout: float | None = 900,
                 env: dict | None = None, show_rank0: bool = False) -> None:
    """Run ``python -m module *args`` as ranks 0..nprocs-1 on 127.0.0.1 (gloo on CPU). Output goes to
    per-rank logs (shown on failure); ``show_rank0`` passes rank 0's stdout through instead."""
    with tempfile.TemporaryDirectory(prefix="mm_runtime_") as tmp:
        base = {**os.environ, **(env or {}), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                "WORLD_SIZE": str(nprocs), "LOCAL_WORLD_SIZE": str(nprocs), ERROR_DIR_ENV: tmp}
        # no OMP_NUM_THREADS here: each rank takes its share of the cores (configure_threads)
        procs, logs = [], []
        for r in range(nprocs):
            log = open(Path(tmp) / f"rank{r}.log", "w+")
            logs.append(log)
            out = None if show_rank0 and r == 0 else log
            procs.append(subprocess.Popen([sys.executable, "-m", module, *args], stdout=out, stderr=log,
                                          env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}))
        deadline = time.monotonic() + timeout if timeout else float("inf")
        try:
            while any(p.poll() is None for p in procs):
                if _failed(procs, tmp) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for log in logs:
                log.close()
        failed = _failed(procs, tmp)
        if not failed:
            return
        # The root cause is the first error recorded; the other ranks then fail on closed connections.
        reports = sorted((json.loads(p.read_text()) for p in Path(tmp).glob("rank*.json")),
                         key=lambda info: (not _our_error(info["type"]), info["time"]))
        if reports:
            info = reports[0]
            if _our_error(info["type"]):
                raise getattr(errors, info["type"])(info["message"])
            raise RuntimeError(f"rank {info['rank']} failed: {info['type']}: {info['message']}\n{info['traceback']}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{module}: {nprocs} ranks did not finish within {timeout:.0f}s")
        tail = (Path(tmp) / f"rank{failed[0]}.log").read_text()[-3000:]
        raise RuntimeError(f"{module}: rank {failed[0]} exited with code {procs[failed[0]].returncode}:\n{tail}")


def _failed(procs, tmp: str) -> list[int]:
    """Ranks that exited non-zero before finishing their work. A rank that finished (its done marker, written
    after the closing barrier) and then aborted while gloo tore down (SIGABRT, "terminate called without an
    active exception", seen under heavy load) has done everything it had to."""
    return [r for r, p in enumerate(procs) if p.returncode not in (None, 0) and not Path(tmp, f"rank{r}.done").exists()]


def _our_error(name: str) -> bool:
    cls = getattr(errors, name, None)
    return isinstance(cls, type) and issubclass(cls, errors.MMConvertError)


def thread_plan(cores: int, local_ranks: int, omp_env: str | None) -> tuple[int, str | None]:
    """(intra-op threads for one rank, a note to print once or None). Each of the node's ``local_ranks`` ranks
    gets ``cores // local_ranks`` threads unless OMP_NUM_THREADS is set; a setting that leaves cores idle
    (torchrun sets 1 when it starts several ranks) is kept and said."""
    share = max(1, cores // max(1, local_ranks))
    if not omp_env:
        return share, None
    try:
        threads = max(1, int(omp_env))
    except ValueError:
        return share, f"OMP_NUM_THREADS={omp_env!r} is not a number: ignored, {share} threads per rank"
    idle = cores - threads * local_ranks
    if idle > 0:
        return threads, (f"OMP_NUM_THREADS={threads} x {local_ranks} local ranks leaves {idle} of {cores} cores "
                         f"idle (torchrun sets 1 by default); unset it to give each rank {share}")
    return threads, None


def configure_threads() -> int:
    """Set this rank's torch threads by :func:`thread_plan`; local rank 0 prints the note, once."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads, note = thread_plan(cores, int(os.environ.get("LOCAL_WORLD_SIZE", 1)), os.environ.get("OMP_NUM_THREADS"))
    torch.set_num_threads(threads)
    if note and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print(f"[threads] {note}", file=sys.stderr, flush=True)
    return threads


def worker_main(fn, *args) -> None:
    """Run ``fn(*args)`` in a rank (its threads set first, see :func:`configure_threads`); on an exception record
    it for the launcher and exit non-zero."""
    import torch.distributed as dist

    configure_threads()
    try:
        fn(*args)
    except BaseException as e:
        err_dir = os.environ.get(ERROR_DIR_ENV)
        if err_dir:
            info = {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc(),
                    "rank": int(os.environ.get("RANK", 0)), "time": time.time()}
            Path(err_dir, f"rank{os.environ.get('RANK', 0)}.json").write_text(json.dumps(info))
        raise
    if dist.is_initialized():
        # every rank reaches the end before any tears down: gloo aborts a rank ("terminate called without an
        # active exception") whose peer destroys the group while its last messages are still in flight
        dist.barrier()
        _mark_done()
        dist.destroy_process_group()
    else:
        _mark_done()


def _mark_done() -> None:
    err_dir = os.environ.get(ERROR_DIR_ENV)
    if err_dir:
        Path(err_dir, f"rank{os.environ.get('RANK', 0)}.done").touch()
