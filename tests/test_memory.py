"""Bounded memory, shown structurally: conversions of a checkpoint whose largest tensor (the 3B embedding,
152064 x 2048 bf16 = 623 MB) is several times the allowance run with a peak RSS growth below that allowance.

What is measured and why: the converter runs in a child process that records its RSS after imports and
planning inputs (baseline) and its peak RSS (VmHWM) after hf_to_mm, resplit and mm_to_hf; forked workers are
covered by RUSAGE_CHILDREN's max RSS. RSS counts anonymous memory plus mapped file pages actually touched; the
converter reads sources with preadv (not through its mmaps) so page cache never shows up in it, and what is
left is what the process holds. RLIMIT_AS cannot be used as the cap (the torch.load mmap of every source shard
and the shared libraries count against address space whether touched or not); peak RSS growth is the honest
per-process measure. Where a memory cgroup can be created (root, as on the development machines), a second
test runs the three commands inside one capped below the largest tensor; elsewhere it is skipped, with the
reason. Blocks of 4 MiB
(MM_CONVERT_CHUNK_BYTES) make the allowance small: 3 pooled blocks + 1 scratch block + a tensor's worth of
metadata, far below any tensor that matters.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mm_convert.testing import published_config_path

CONFIG = published_config_path("3b")
ALLOWANCE = 160 << 20  # peak RSS growth allowed; the largest tensor is 623 MB, the checkpoint ~1 GB

SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from mm_convert import Qwen2_5_VLConverter
    from mm_convert.formats.hf import HFReader

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    hf, work, workers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    conv = Qwen2_5_VLConverter(progress=False, workers=workers)
    conv.hf_to_mm(hf, work / "warm", tp_size=1, llm_pp_layers=[[1]], vit_pp_layers=[[1]], dry_run=True)
    base = status("VmRSS")
    conv.hf_to_mm(hf, work / "mm", tp_size=2, llm_pp_layers=[[1, 0]], vit_pp_layers=[[1, 0]])
    conv.resplit(work / "mm", work / "mm2", tp_size=1, llm_pp_layers=[[1]], vit_pp_layers=[[1]])
    conv.mm_to_hf(work / "mm2", work / "hf", hf_dir=hf)
    largest = max(HFReader(hf).meta(n)[1][0] * HFReader(hf).meta(n)[1][-1] * 2 for n in HFReader(hf).names()
                  if len(HFReader(hf).meta(n)[1]) == 2)
    print(json.dumps({"base": base, "hwm": status("VmHWM"), "largest": largest,
                      "children_maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
""")


@pytest.fixture(scope="module")
def big_tensor_hf(tmp_path_factory):
    from mm_convert.testing.synthetic import write_synthetic_checkpoint
    root = tmp_path_factory.mktemp("mem")
    yield write_synthetic_checkpoint(CONFIG, root / "hf", layers=1, vit_layers=1)
    shutil.rmtree(root, ignore_errors=True)  # ~1 GB; pytest keeps its last runs' temp dirs


@pytest.fixture
def work(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)  # ~3 GB of outputs


@pytest.mark.parametrize("workers", [1, 2])
def test_peak_rss_bounded_below_largest_tensor(big_tensor_hf, work, workers):
    tmp_path = work
    env = {**os.environ, "MM_CONVERT_CHUNK_BYTES": str(4 << 20), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(big_tensor_hf), str(tmp_path), str(workers)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    size = sum(p.stat().st_size for p in big_tensor_hf.glob("*.safetensors"))
    assert m["largest"] > 3 * ALLOWANCE and size > 5 * ALLOWANCE  # the check means something
    growth = m["hwm"] - m["base"]
    assert growth < ALLOWANCE, f"peak RSS grew by {growth >> 20} MiB (largest tensor {m['largest'] >> 20} MiB)"
    if workers > 1:  # forked workers start from the parent's RSS
        assert m["children_maxrss"] - m["base"] < ALLOWANCE, m
    # and the outputs are whole: the round trip gives back the input's bytes
    from safetensors import safe_open
    out = {}
    for f in sorted((tmp_path / "hf").glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: f for k in h.keys()})
    src = {}
    for f in sorted(big_tensor_hf.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            src.update({k: f for k in h.keys()})
    assert set(out) == set(src)
    name = "model.embed_tokens.weight"
    with safe_open(str(out[name]), "pt") as a, safe_open(str(src[name]), "pt") as b:
        for r0 in range(0, 152064, 30000):
            assert a.get_slice(name)[r0:r0 + 500].equal(b.get_slice(name)[r0:r0 + 500])


def _child_memory_cgroup(limit: int) -> Path:
    """A new memory cgroup (v1 or v2) below this process's own, capped at ``limit`` bytes; skips the test with
    the reason when none can be made here (no privileges, no memory controller)."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    v1 = [ln.split(":", 2)[2] for ln in lines if ln.split(":")[1:2] == ["memory"]]
    if v1 and Path("/sys/fs/cgroup/memory").is_dir():
        parent, limit_file = Path("/sys/fs/cgroup/memory") / v1[0].lstrip("/"), "memory.limit_in_bytes"
    else:
        v2 = [ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")]
        parent, limit_file = Path("/sys/fs/cgroup") / (v2[0].lstrip("/") if v2 else ""), "memory.max"
    cg = parent / f"mm_convert_test_{os.getpid()}"
    try:
        cg.mkdir()
        (cg / limit_file).write_text(str(limit))
    except OSError as e:
        if cg.is_dir():
            cg.rmdir()
        pytest.skip(f"no memory cgroup can be created under {parent} ({e.strerror or e})")
    return cg


def test_converts_inside_a_memory_cgroup_below_the_largest_tensor(big_tensor_hf, work):
    """The three commands (2 workers) run inside a memory cgroup capped at 448 MiB, which counts every process
    of the run and the page cache they fill, while the checkpoint is 892 MB and its largest tensor 623 MB: a
    converter that held a whole tensor, let alone a shard, would be OOM-killed. (The same run needs ~235 MiB
    just for the interpreter with torch.)"""
    cap = 448 << 20
    cg = _child_memory_cgroup(cap)
    try:
        env = {**os.environ, "MM_CONVERT_CHUNK_BYTES": str(4 << 20), "OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, "-c", SCRIPT, str(big_tensor_hf), str(work), "2"], capture_output=True,
                           text=True, env=env, timeout=600,
                           preexec_fn=lambda: (cg / "cgroup.procs").write_text(str(os.getpid())))
        assert r.returncode == 0, f"exit {r.returncode} inside a {cap >> 20} MiB cgroup: {r.stderr[-2000:]}"
        m = json.loads(r.stdout.strip().splitlines()[-1])
        size = sum(p.stat().st_size for p in big_tensor_hf.glob("*.safetensors"))
        assert m["largest"] > cap and size > 1.8 * cap  # the cap means something
        from mm_convert import Qwen2_5_VLConverter
        assert Qwen2_5_VLConverter(progress=False).verify(None, work / "hf").ok  # whole outputs (sha256 manifest)
    finally:
        cg.rmdir()
