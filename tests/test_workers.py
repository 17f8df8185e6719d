"""Parallel execution: the output is byte-identical whatever the number of workers, torchrun ranks or the
size of the row blocks tensors are streamed in; worker failures surface as errors with nothing written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mm_convert import Qwen2_5_VLConverter
from mm_convert import execute
from mm_convert.errors import CheckpointError
from mm_convert.plan import OutputFile

LAYOUT = dict(tp_size=2, llm_pp_layers=[[2, 2]], vit_pp_layers=[[4, 0]])


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes; the manifest compared without its source paths."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "mm_convert_manifest.json":
                doc = json.loads(data)
                data = json.dumps(doc.get("files"), sort_keys=True).encode()
            out[str(p.relative_to(root))] = data
    return out


def assert_same_tree(a: Path, b: Path) -> None:
    ta, tb = tree_bytes(a), tree_bytes(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k] == tb[k], f"{k} differs between {a} and {b}"


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from mm_convert.testing import make_tiny_hf_checkpoint
    d = tmp_path_factory.mktemp("hf_workers")
    return make_tiny_hf_checkpoint(d, dtype="bfloat16", tied=False, max_shard_size="40KB")


def _conv(workers):
    return Qwen2_5_VLConverter(progress=False, workers=workers)


@pytest.fixture(scope="module")
def reference(hf, tmp_path_factory):
    """hf_to_mm, resplit and mm_to_hf with one worker and one big block per tensor."""
    root = tmp_path_factory.mktemp("ref")
    _conv(1).hf_to_mm(hf, root / "mm", **LAYOUT)
    _conv(1).resplit(root / "mm", root / "mm2", tp_size=1, llm_pp_layers=[[4]], vit_pp_layers=[[4]])
    _conv(1).mm_to_hf(root / "mm", root / "hf", hf_dir=hf, max_shard_size="60KB")
    return root


def _run_all(conv, hf, root):
    conv.hf_to_mm(hf, root / "mm", **LAYOUT)
    conv.resplit(root / "mm", root / "mm2", tp_size=1, llm_pp_layers=[[4]], vit_pp_layers=[[4]])
    conv.mm_to_hf(root / "mm", root / "hf", hf_dir=hf, max_shard_size="60KB")


@pytest.mark.parametrize("workers", [2, 3, 8])
def test_workers_output_identical(hf, reference, tmp_path, workers):
    _run_all(_conv(workers), hf, tmp_path)
    for d in ("mm", "mm2", "hf"):
        assert_same_tree(reference / d, tmp_path / d)
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1  # several files really were split among workers


def test_small_row_blocks_identical(hf, reference, tmp_path, monkeypatch):
    """Tensors streamed in blocks of a few rows (and dim-1 TP splits gathered per block) give the same bytes."""
    monkeypatch.setattr(execute, "CHUNK_BYTES", 200)
    _run_all(_conv(1), hf, tmp_path)
    for d in ("mm", "mm2", "hf"):
        assert_same_tree(reference / d, tmp_path / d)


def test_paced_writeback_identical(hf, reference, tmp_path, monkeypatch):
    """Writes paced in 4 KiB steps (sync_file_range, wait, drop) leave the same bytes, and the pacing ran."""
    from mm_convert import manifest, writeback
    monkeypatch.setattr(writeback, "STEP", 4096)
    monkeypatch.setattr(manifest, "_WRITEBACK_STEP", 4096)
    waited = []
    real = writeback.Writeback._call
    monkeypatch.setattr(writeback.Writeback, "_call",
                        lambda self, off, n, flags: (waited.append(n) if flags & 4 else None, real(self, off, n, flags)))
    _conv(2).hf_to_mm(hf, tmp_path / "mm", **LAYOUT)
    _conv(1).mm_to_hf(tmp_path / "mm", tmp_path / "hf", hf_dir=hf, max_shard_size="60KB")
    assert_same_tree(reference / "mm", tmp_path / "mm")
    assert_same_tree(reference / "hf", tmp_path / "hf")
    if writeback._SFR is None:
        pytest.fail("sync_file_range is not available here (Linux with glibc expected)")
    assert sum(waited) > 8 * 4096  # steps written, waited for and dropped as files grew (mm_to_hf ran in this process)


def test_fallback_reads_identical(hf, reference, tmp_path, monkeypatch):
    """Where a source tensor has no byte location, it is read through the reader, block by block: same bytes."""
    monkeypatch.setattr(execute.Sources, "locate", lambda self, ref: None)
    monkeypatch.setattr(execute, "CHUNK_BYTES", 300)
    _run_all(_conv(2), hf, tmp_path)
    for d in ("mm", "mm2", "hf"):
        assert_same_tree(reference / d, tmp_path / d)


def _torchrun(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mm_convert.cli", "Qwen2_5_VLConverter"] + args
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_torchrun_two_ranks_identical(hf, reference, tmp_path):
    r = _torchrun(["hf_to_mm", "--cfg.hf_config.hf_dir", str(hf), "--cfg.mm_dir", str(tmp_path / "mm"),
                   "--cfg.parallel_config.tp_size", "2", "--cfg.parallel_config.llm_pp_layers", "[[2,2]]",
                   "--cfg.parallel_config.vit_pp_layers", "[[4,0]]", "-q"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_tree(reference / "mm", tmp_path / "mm")
    r = _torchrun(["mm_to_hf", "--cfg.mm_dir", str(tmp_path / "mm"), "--cfg.save_hf_dir", str(tmp_path / "hf"),
                   "--cfg.hf_config.hf_dir", str(hf), "--cfg.max_shard_size", "60KB", "-q"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_tree(reference / "hf", tmp_path / "hf")
    r = _torchrun(["resplit", "--cfg.source_dir", str(tmp_path / "mm"), "--cfg.target_dir", str(tmp_path / "mm2"),
                   "--cfg.target_parallel_config.tp_size", "1", "--cfg.target_parallel_config.llm_pp_layers", "[[4]]",
                   "--cfg.target_parallel_config.vit_pp_layers", "[[4]]", "-q"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_tree(reference / "mm2", tmp_path / "mm2")
    assert not list(tmp_path.glob(".*mm_convert-tmp"))


def test_torchrun_existing_output_refused_on_every_rank(hf, tmp_path):
    (tmp_path / "mm").mkdir()
    (tmp_path / "mm" / "keep.txt").write_text("x")
    r = _torchrun(["hf_to_mm", "--cfg.hf_config.hf_dir", str(hf), "--cfg.mm_dir", str(tmp_path / "mm"),
                   "--cfg.parallel_config.llm_pp_layers", "[[4]]", "--cfg.parallel_config.vit_pp_layers", "[[4]]", "-q"],
                  tmp_path)
    assert r.returncode != 0
    assert "not empty" in r.stderr
    assert (tmp_path / "mm" / "keep.txt").read_text() == "x"


def test_worker_failure_raises_and_writes_nothing(hf, tmp_path, monkeypatch):
    real = execute.write_file

    def failing(f, root, kind, sources, on_bytes):
        if f.path.startswith("mp_rank_01"):
            raise CheckpointError(f"{f.path}: injected failure")
        return real(f, root, kind, sources, on_bytes)

    monkeypatch.setattr(execute, "write_file", failing)
    with pytest.raises(CheckpointError, match="injected failure"):
        _conv(2).hf_to_mm(hf, tmp_path / "mm", **LAYOUT)
    assert not (tmp_path / "mm").exists()
    assert not list(tmp_path.glob(".*mm_convert-tmp"))


def test_assign_balanced_and_deterministic():
    files = [OutputFile(f"f{i}", {}) for i in range(7)]
    sizes = [50, 10, 40, 30, 20, 20, 30]
    for f, s in zip(files, sizes):
        f.__dict__["_n"] = s
    orig = OutputFile.nbytes
    try:
        OutputFile.nbytes = property(lambda self: self.__dict__["_n"])
        bins = execute.assign(files, 2)
        assert sorted(i for b in bins for i in b) == list(range(7))
        loads = [sum(sizes[i] for i in b) for b in bins]
        assert max(loads) - min(loads) <= 10
        assert bins == execute.assign(files, 2)
        assert execute.assign(files, 1) == [list(range(7))]
    finally:
        OutputFile.nbytes = orig


def test_mm_shards_valid_zip_crcs_and_load(reference):
    """The CRC-32 of each record, computed by the reader thread block by block, is the one zip tools check;
    shards load with plain torch.load, with and without mmap."""
    import zipfile

    import torch
    shards = sorted((reference / "mm").rglob("model_optim_rng.pt")) + sorted((reference / "mm2").rglob("model_optim_rng.pt"))
    assert shards
    for p in shards:
        with zipfile.ZipFile(p) as z:
            assert z.testzip() is None, p
        a = torch.load(p, map_location="cpu", weights_only=True)
        b = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        assert a["model"].keys() == b["model"].keys()


@pytest.mark.parametrize("sizes,limit", [([1] * 75, 50), ([30, 5, 5, 30, 5, 5, 30], 50), ([80, 10, 10], 50),
                                         ([7] * 10, 1000), ([3, 9, 2, 8, 1, 7, 6, 4, 5], 12)])
def test_hf_files_as_few_as_greedy_and_balanced(sizes, limit):
    """mm_to_hf's safetensors files: the greedy cut's file count, each file within the limit unless one tensor
    alone exceeds it, tensors in order, and no file bigger than the greedy cut's biggest."""
    import torch
    from mm_convert.plan import HF, Piece, Ref, hf_files_plan
    shapes = {f"t{i}": (n,) for i, n in enumerate(sizes)}
    inverse = {k: [Piece(Ref(HF, "", k), (0,), (0,), s)] for k, s in shapes.items()}
    files = hf_files_plan(inverse, shapes, lambda ref: torch.uint8, lambda k: k, limit)
    greedy, size = [[]], 0
    for n in sizes:
        if greedy[-1] and size + n > limit:
            greedy.append([])
            size = 0
        greedy[-1].append(n)
        size += n
    assert len(files) == len(greedy)
    assert [t.key for f in files for t in f.tensors] == list(shapes)
    for f in files:
        assert f.nbytes <= limit or len(list(f.tensors)) == 1
    assert max(f.nbytes for f in files) <= max(map(sum, greedy))
    if sizes == [1] * 75:
        assert sorted(f.nbytes for f in files) == [37, 38]


def test_next_tensor_prefetched_before_it_is_filled(hf, reference, tmp_path, monkeypatch):
    """While a tensor is filled, the disk reads of the next one's first bytes are already asked for (WILLNEED
    on its source byte ranges), so one process writing one file does not wait for the disk at every tensor;
    the output is unchanged."""
    events = []
    real_prefetch, real_fill = execute._Blocks.prefetch, execute._Blocks.fill
    advised = []
    real_fadvise = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, adv: (advised.append((fd, off, n, adv)),
                                                                       real_fadvise(fd, off, n, adv))[1])

    def prefetch(self, t):
        before = len(advised)
        real_prefetch(self, t)
        events.append(("prefetch", t.key, sum(1 for a in advised[before:] if a[3] == os.POSIX_FADV_WILLNEED)))
    monkeypatch.setattr(execute._Blocks, "prefetch", prefetch)
    monkeypatch.setattr(execute._Blocks, "fill", lambda self, t, locs, r0, r1, out: (events.append(("fill", t.key, r0)),
                                                                                    real_fill(self, t, locs, r0, r1, out))[1])
    _conv(1).resplit(reference / "mm", tmp_path / "mm2", tp_size=1, llm_pp_layers=[[4]], vit_pp_layers=[[4]])
    assert_same_tree(reference / "mm2", tmp_path / "mm2")
    first_fill = {}
    for i, e in enumerate(events):
        if e[0] == "fill" and e[1] not in first_fill:
            first_fill[e[1]] = i
    prefetched = {e[1]: (i, e[2]) for i, e in enumerate(events) if e[0] == "prefetch"}
    assert len(first_fill) > 50
    later = list(first_fill)[1:]  # the first tensor of each file has nothing before it
    covered = [k for k in later if k in prefetched and prefetched[k][0] < first_fill[k] and prefetched[k][1] > 0]
    assert len(covered) >= 0.9 * len(later), f"{len(covered)} of {len(later)} tensors prefetched before filling"


def test_failed_fork_leaves_ctrl_c_and_sigterm_deliverable(hf, tmp_path, monkeypatch):
    """SIGINT and SIGTERM are held while workers are forked; when forking fails, the started workers are
    stopped, the error comes through, and the two signals are no longer held."""
    import multiprocessing.process
    import signal
    real_start, started = multiprocessing.process.BaseProcess.start, []

    def start(self):
        if started:
            raise OSError(11, "Resource temporarily unavailable")
        started.append(self)
        real_start(self)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start)
    with pytest.raises(OSError, match="temporarily unavailable"):
        _conv(2).hf_to_mm(hf, tmp_path / "mm", **LAYOUT)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert signal.SIGINT not in held and signal.SIGTERM not in held
    assert started and not started[0].is_alive()
    assert not (tmp_path / "mm").exists()
