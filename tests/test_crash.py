"""Crash safety (issue 5): conversions killed with SIGKILL at random moments, interrupted with SIGINT, ended by SIGTERM.

Each run is a real ``mm-convert`` process (its own process group, so forked workers die with it, as in a crash
of the whole job). It imports everything, prints ``ready``, then converts; the kill comes after a random delay
in [0, 1.2 x the measured conversion time], so the moments cover creating the temporary directory, writing
shards, the manifest and the final rename. Afterwards the final name holds nothing or a complete checkpoint that
``verify`` accepts, and a rerun with --resume or without (--overwrite) succeeds, bit-identical to a clean run.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mm_convert.cli import main
from mm_convert.manifest import JOURNAL, read_journal

LAYOUT = ["--cfg.parallel_config.tp_size", "2", "--cfg.parallel_config.llm_pp_layers", "[1,3]",
          "--cfg.parallel_config.vit_pp_layers", "[4,0]"]
KILLS = 20

CHILD = """
import signal, sys, time
# a shell without job control starts background jobs with SIGINT ignored, and the ignore is inherited: Ctrl-C
# semantics are under test, so start from Python's own default whatever ran this suite
signal.signal(signal.SIGINT, signal.default_int_handler)
from mm_convert.cli import run
import mm_convert.manifest as m
if sys.argv[1] == "pause":  # stop for good right after the first finished file is journaled
    real = m.record_written
    def record(*a):
        real(*a)
        print("wrote", flush=True)
        time.sleep(120)
    m.record_written = record
print("ready", flush=True)
t0 = time.monotonic()
try:
    run(sys.argv[2:])
finally:
    print(f"took {time.monotonic() - t0:.4f}", flush=True)
"""


def _args(hf, out, *extra):
    return ["Qwen2_5_VLConverter", "hf_to_mm", "--cfg.mm_dir", str(out), "--cfg.hf_config.hf_dir", str(hf), *LAYOUT, "-q", *extra]


def _command_args(command, hf, mm, out, *extra):
    """hf_to_mm from ``hf``; resplit (to tp1 pp2: two files) and mm_to_hf (several safetensors files) from ``mm``."""
    if command == "hf_to_mm":
        return _args(hf, out, *extra)
    if command == "resplit":
        return ["Qwen2_5_VLConverter", "resplit", "--cfg.source_dir", str(mm), "--cfg.target_dir", str(out),
                "--cfg.target_parallel_config.tp_size", "1", "--cfg.target_parallel_config.llm_pp_layers", "[3,1]",
                "--cfg.target_parallel_config.vit_pp_layers", "[4,0]", "-q", *extra]
    return ["Qwen2_5_VLConverter", "mm_to_hf", "--cfg.mm_dir", str(mm), "--cfg.save_hf_dir", str(out),
            "--cfg.hf_config.hf_dir", str(hf), "--cfg.max_shard_size", "300KB", "-q", *extra]


def _spawn(mode, args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-c", CHILD, mode, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True, env=env)
    line = p.stdout.readline()
    assert line.strip() == "ready", (line, p.stderr.read() if p.poll() is not None else "")
    return p


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _cli(args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, (r.exit_code, r.stderr, r.exception)
    return r


@pytest.fixture(scope="module")
def clean(tiny_hf, tmp_path_factory):
    hf = tiny_hf()
    out = tmp_path_factory.mktemp("crash_clean") / "mm"
    _cli(_args(hf, out))
    return hf, _files(out)


@pytest.mark.parametrize("command,kills", [("hf_to_mm", KILLS), ("resplit", KILLS // 2), ("mm_to_hf", KILLS // 2)])
def test_sigkill_at_random_moments(clean, tmp_path, command, kills):
    hf, _ = clean
    mm = tmp_path / "source_mm"
    _cli(_args(hf, mm))
    args = lambda out, *extra: _command_args(command, hf, mm, out, *extra)
    _cli(args(tmp_path / "clean"))
    want = _files(tmp_path / "clean")
    source = _files(mm)
    # how long the conversion itself takes in a child (after imports)
    p = _spawn("run", args(tmp_path / "calib"))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    took = float(out.split("took")[-1])
    seed = int(os.environ.get("MM_CONVERT_CRASH_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    outcomes = {"nothing": 0, "complete": 0, "partial_kept": 0}
    for i in range(kills):
        target = tmp_path / f"out{i}"
        p = _spawn("run", args(target))
        time.sleep(rng.uniform(0, 1.2 * took))
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=60)
        tmp = target.parent / f".{target.name}.mm_convert-tmp"
        where = f"kill {i} (seed {seed})"
        if target.exists():
            outcomes["complete"] += 1
            r = CliRunner().invoke(main, ["Qwen2_5_VLConverter", "verify", "--cfg.mm_dir", str(target)])
            assert r.exit_code == 0, (where, r.stdout, r.stderr)
            assert _files(target) == want, where
            assert not tmp.exists(), where
        else:
            outcomes["nothing"] += 1
            if tmp.exists() and read_journal(tmp)[1]:
                outcomes["partial_kept"] += 1
        # rerun: alternately with --resume and without (then --overwrite, in case it completed)
        extra = ["--resume"] if i % 2 == 0 else ["--overwrite"]
        _cli(args(target, *extra))
        assert _files(target) == want, f"{where}: rerun {extra} differs from a clean run"
        assert not tmp.exists()
    assert _files(mm) == source, "a killed run changed its source"
    print(f"{command}: SIGKILL outcomes over {kills} kills (seed {seed}, conversion {took:.3f} s): {outcomes}")


def test_sigint_keeps_finished_files_and_resume_is_bit_identical(clean, tmp_path):
    hf, want = clean
    target = tmp_path / "mm"
    p = _spawn("pause", _args(hf, target))
    assert p.stdout.readline().strip() == "wrote"
    os.killpg(p.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, (p.returncode, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["mm-convert: interrupted; nothing was written at the destination (finished files are kept for --resume)"], err
    assert not target.exists()
    tmp = target.parent / f".{target.name}.mm_convert-tmp"
    assert (tmp / JOURNAL).is_file()
    kept = read_journal(tmp)[1]
    assert kept, "the file finished before the interrupt is journaled"
    _cli(_args(hf, target, "--resume"))  # asserts exit 0
    assert _files(target) == want
    assert not tmp.exists()


@pytest.mark.parametrize("to", ["parent", "group"])
def test_sigterm_cleans_up_like_ctrl_c(clean, tmp_path, to):
    """SIGTERM to the CLI process only (``kill PID``) or to every process of the run (a scheduler ending the
    job): exit 143 with one line, the workers stopped, nothing at the destination, finished files kept for
    --resume, which completes the run."""
    hf, want = clean
    target = tmp_path / "mm"
    p = _spawn("pause", _args(hf, target, "--workers", "2"))
    assert p.stdout.readline().strip() == "wrote"
    if to == "parent":
        p.send_signal(signal.SIGTERM)
    else:
        os.killpg(p.pid, signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, (p.returncode, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["mm-convert: terminated (SIGTERM); nothing was written at the destination (finished files "
                     "are kept for --resume)"], err
    assert not target.exists()
    tmp = target.parent / f".{target.name}.mm_convert-tmp"
    assert read_journal(tmp)[1], "the file finished before SIGTERM is journaled"
    time.sleep(0.5)
    alive = subprocess.run(["pgrep", "-s", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert alive == [], f"processes of the run still alive after SIGTERM: {alive}"
    _cli(_args(hf, target, "--resume"))
    assert _files(target) == want
    assert not tmp.exists()


def test_resume_then_plain_rerun_of_complete_output(clean, tmp_path):
    """--resume on an output that is already complete for the same plan does nothing and succeeds; without
    --resume the same command refuses to touch it unless --overwrite."""
    hf, want = clean
    target = tmp_path / "mm"
    _cli(_args(hf, target))
    before = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    _cli(_args(hf, target, "--resume"))
    assert {p: p.stat().st_mtime_ns for p in target.rglob("*")} == before
    r = CliRunner().invoke(main, _args(hf, target))
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    _cli(_args(hf, target, "--overwrite"))
    assert _files(target) == want
