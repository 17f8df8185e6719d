"""Conversion throughput and memory against ``cp -r`` of the same bytes, on shape-real synthetic checkpoints.

    python benchmarks/bench.py                      # 3B and 7B shapes, results in benchmarks/results.{md,json}
    python benchmarks/bench.py --shapes 3b --workdir /big/disk/tmp
    python benchmarks/bench.py --shapes qwen3_vl_30b_a3b 3b --merge   # a bundled config of any family; other
                                                    # shapes' rows of the results file are kept

For each shape (a config of ../shared/configs/qwen2_5_vl/, e.g. ``3b``, or a config bundled in mm_convert/data/,
e.g. ``qwen3_vl_30b_a3b``, optionally with its LLM depth cut: ``qwen3_vl_30b_a3b:8``; the MoE configs are cut by
default, see ``LAYER_CUTS``, so the checkpoint fits the disk): write a synthetic HF checkpoint (random bf16, hub
key names and layouts, e.g. fused 3-D experts; hub-like 4 GB shard files; not timed), then time, in one run:

    cp -r HF       baseline for hf_to_mm        hf_to_mm HF -> MM (tp2, llm [[L/2, L/2]], vit [[V, 0]])
    cp -r MM       baseline for resplit/mm_to_hf resplit MM -> MM' (tp1, llm [[L]], vit [[V]])
                                                 mm_to_hf MM -> HF'

with the family's converter (``Qwen3VLMegatronConverter`` for Qwen3-VL); a MoE shape's hf_to_mm is at ep2 too
(``--cfg.parallel_config.ep_size 2``) and its resplits go to tp1 ep1.

Each command runs as a subprocess (the CLI, with its default --workers = cores), twice, and so does each ``cp -r``
baseline; the faster run of each counts and both are recorded (the machine is shared and its speed drifts by
20% and more between minutes). Wall time includes interpreter start-up and planning. ``cp -r`` is timed together with a ``sync`` because the converter fsyncs every file it
writes (both numbers are recorded). The page cache is made comparable without root: before each timed command,
the files it reads are written back and evicted with ``posix_fadvise(POSIX_FADV_DONTNEED)`` (drop_caches needs
root), so every command reads its input from disk. Peak RSS is sampled every 100 ms over the whole process tree
(the CLI and its worker processes; cp is timed under the same sampler): the sum of VmRSS (forked workers share the parent's pages, which this counts
once per process, so it overstates) and the largest single VmHWM. Page cache is not part of RSS.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CONFIGS = REPO.parent / "shared" / "configs" / "qwen2_5_vl"
BUNDLED = REPO / "mm_convert" / "data"  # published configs of every family (qwen3_vl_30b_a3b.json, ...)
# LLM layers kept of a bundled config unless the shape names its own (``name:layers``): the MoE checkpoints whole
# (61 GB, 470 GB) do not fit the disk; 8 layers of the 30B-A3B (1.2 GB of experts each) make ~12 GB.
LAYER_CUTS = {"qwen3_vl_30b_a3b": 8, "qwen3_vl_235b_a22b": 2}


POLL_S = 0.1  # RSS sampling period; the per-process VmHWM is exact whatever the period
RUNS = 2  # runs of each command and of each cp baseline; the faster counts (the machine is shared, its speed drifts)


# ---- measuring ----------------------------------------------------------------------------------------------
def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return pids


def run_measured(cmd: list[str], env=None) -> dict:
    """Run ``cmd``; wall seconds and peak RSS of its process tree."""
    peak = {"tree_rss": 0, "tree_anon": 0, "max_hwm": 0}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            stats = [_status(p) for p in _tree(proc.pid)]
            peak["tree_rss"] = max(peak["tree_rss"], sum(s.get("VmRSS", 0) for s in stats))
            peak["tree_anon"] = max(peak["tree_anon"], sum(s.get("RssAnon", 0) for s in stats))
            peak["max_hwm"] = max([peak["max_hwm"]] + [s.get("VmHWM", 0) for s in stats])
            stop.wait(POLL_S)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, _ = proc.communicate()
    wall = time.monotonic() - t0
    end_epoch = time.time()
    stop.set()
    th.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out.decode(errors='replace')[-3000:]}")
    return {"wall_s": wall, **peak, "load_after": os.getloadavg()[0], "end_epoch": end_epoch,
            "output": out.decode(errors="replace").strip().splitlines()[-3:]}


def evict(root: Path) -> None:
    """Write back and drop the page cache of every file under ``root`` (no root privileges needed)."""
    subprocess.run(["sync"], check=True)
    for p in Path(root).rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def du(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def time_cp(src: Path, dst: Path) -> dict:
    evict(src)
    load = os.getloadavg()[0]
    r = run_measured(["sh", "-c", 'cp -r "$0" "$1" && t=$(date +%s.%N) && sync && echo "$t"', str(src), str(dst)])
    cp_end = float(r["output"][-1])  # when cp itself ended (epoch), before the sync
    shutil.rmtree(dst)
    return {"wall_s": r["wall_s"], "cp_only_s": r["wall_s"] - (r["end_epoch"] - cp_end), "bytes": du(src),
            "load_before": load}


# ---- one shape ----------------------------------------------------------------------------------------------
def resolve_shape(shape: str, configs: Path = CONFIGS) -> tuple[Path, int | None]:
    """(config path, LLM layers to keep or None) of a shape: ``3b`` (``configs``, else the bundled Qwen2.5-VL
    config), ``qwen3_vl_30b_a3b`` (a bundled config file's name), either with ``:layers``."""
    name, _, cut = shape.partition(":")
    layers = int(cut) if cut else None
    if (configs / f"{name}.json").is_file():
        return configs / f"{name}.json", layers
    if (BUNDLED / f"{name}.json").is_file():
        return BUNDLED / f"{name}.json", layers if cut else LAYER_CUTS.get(name)
    from mm_convert.testing import published_config_path  # no ../shared checkout: the same configs ship with the package
    return published_config_path(name), layers


def bench_shape(shape: str, work: Path, workers: int | None, configs: Path = CONFIGS) -> dict:
    from mm_convert.models import spec_for_model_type
    from mm_convert.testing.synthetic import write_synthetic_checkpoint
    cfg_path, cut = resolve_shape(shape, configs)
    tag = shape.replace(":", "-L")
    hf, mm, mm2, hf2 = (work / f"{tag}-{n}" for n in ("hf", "mm", "mm-resplit", "hf-back"))
    for d in (hf, mm, mm2, hf2):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.monotonic()
    write_synthetic_checkpoint(cfg_path, hf, layers=cut)
    gen_s = time.monotonic() - t0
    cfg = json.loads((hf / "config.json").read_text())  # as written: the depth cut applied
    text = cfg.get("text_config") or cfg
    layers, vit = text["num_hidden_layers"], cfg["vision_config"]["depth"]
    experts = text.get("num_experts") or text.get("num_local_experts") or 0
    print(f"[{shape}] synthetic checkpoint: {du(hf) / 1e9:.2f} GB in {gen_s:.0f} s ({layers} LLM layers"
          f"{f', {experts} experts' if experts else ''})", flush=True)

    cli = [sys.executable, "-m", "mm_convert.cli", spec_for_model_type(cfg.get("model_type")).CONVERTER]
    extra = ["--workers", str(workers)] if workers else []
    ep = ["--cfg.parallel_config.ep_size", "2"] if experts else []  # MoE: hf_to_mm at ep2, resplits to ep1
    ep1 = ["--cfg.target_parallel_config.ep_size", "1"] if experts else []
    half = [layers // 2, layers - layers // 2]
    rows = []

    def step(name, src, dst, cmd, baseline):
        """Twice, like the cp baseline (the faster run counts; both are recorded); peak RSS is the larger."""
        runs = []
        for k in range(RUNS):
            if k:
                shutil.rmtree(dst)
            evict(src)
            runs.append(run_measured(cmd))
        r = dict(min(runs, key=lambda x: x["wall_s"]))
        for m in ("tree_rss", "tree_anon", "max_hwm"):
            r[m] = max(x[m] for x in runs)
        r.update(command=name, argv=" ".join(cmd[1:]), bytes=du(dst), cp_s=baseline["wall_s"],
                 cp_only_s=baseline["cp_only_s"], runs_s=[x["wall_s"] for x in runs])
        r["ratio"] = r["wall_s"] / baseline["wall_s"]
        r["baseline"] = baseline
        r["gb_s"] = r["bytes"] / r["wall_s"] / 1e9
        rows.append(r)
        print(f"[{shape}] {name}: {', '.join('%.1f' % x for x in r['runs_s'])} s; "
              f"{r['wall_s']:.1f} s ({r['ratio']:.2f}x cp -r), {r['gb_s']:.2f} GB/s, "
              f"peak RSS tree {r['tree_rss'] / 2**20:.0f} MiB", flush=True)

    def baseline(src, what):
        """cp -r twice (the machine is shared and its speed drifts); the ratio uses the faster, the stricter."""
        runs = [time_cp(src, work / f"{tag}-cp") for _ in range(RUNS)]
        best = min(runs, key=lambda r: r["wall_s"])
        times = ", ".join("%.1f" % r["wall_s"] for r in runs)
        print(f"[{shape}] cp -r {what}: {times} s (+sync); "
              f"{best['cp_only_s']:.1f} s without sync", flush=True)
        return {**best, "runs_s": [r["wall_s"] for r in runs]}

    cp_hf = baseline(hf, "HF")
    step("hf_to_mm", hf, mm, cli + ["hf_to_mm", "--cfg.hf_config.hf_dir", str(hf), "--cfg.mm_dir", str(mm),
                                    "--cfg.parallel_config.tp_size", "2",
                                    "--cfg.parallel_config.llm_pp_layers", json.dumps([half]).replace(" ", ""),
                                    "--cfg.parallel_config.vit_pp_layers", json.dumps([[vit, 0]]).replace(" ", "")]
         + ep + extra, cp_hf)
    ref = work / f"{tag}-ref"  # config.json only: the HF weights go now, to keep disk use at two checkpoints
    ref.mkdir(exist_ok=True)
    shutil.copyfile(hf / "config.json", ref / "config.json")
    shutil.rmtree(hf)
    cp_mm = baseline(mm, "MM")
    step("resplit", mm, mm2, cli + ["resplit", "--cfg.source_dir", str(mm), "--cfg.target_dir", str(mm2),
                                    "--cfg.target_parallel_config.tp_size", "1",
                                    "--cfg.target_parallel_config.llm_pp_layers", json.dumps([half]).replace(" ", ""),
                                    "--cfg.target_parallel_config.vit_pp_layers", json.dumps([[vit, 0]]).replace(" ", "")]
         + ep1 + extra, cp_mm)
    shutil.rmtree(mm2)
    step("resplit to one file", mm, mm2, cli + ["resplit", "--cfg.source_dir", str(mm), "--cfg.target_dir", str(mm2),
                                                "--cfg.target_parallel_config.tp_size", "1",
                                                "--cfg.target_parallel_config.llm_pp_layers", f"[[{layers}]]",
                                                "--cfg.target_parallel_config.vit_pp_layers", f"[[{vit}]]"] + ep1 + extra,
         cp_mm)
    shutil.rmtree(mm2)
    step("mm_to_hf", mm, hf2, cli + ["mm_to_hf", "--cfg.mm_dir", str(mm), "--cfg.save_hf_dir", str(hf2),
                                     "--cfg.hf_config.hf_dir", str(ref)] + extra, cp_mm)
    for d in (hf, mm, hf2, ref):
        shutil.rmtree(d, ignore_errors=True)
    return {"shape": shape, "config": str(cfg_path), "llm_layers": layers, "vit_layers": vit, "experts": experts,
            "converter": cli[3], "checkpoint_bytes": cp_hf["bytes"],
            "synthetic_s": gen_s, "cp_hf": cp_hf, "cp_mm": cp_mm, "commands": rows}


def machine() -> dict:
    mem = next((int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    fs = subprocess.run(["df", "-hT", "."], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return {"host": platform.node(), "cpu": cpu, "cores": len(os.sched_getaffinity(0)), "mem_gib": round(mem / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(), "filesystem": fs}


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        return head + ("+changes" if dirty else "") if head else "?"
    except OSError:
        return "?"


def table(results: list[dict]) -> str:
    lines = ["| shape | command | bytes | wall s (runs) | cp -r (+sync) s (runs) | ratio (goal <= 1.3) | GB/s | peak RSS tree MiB | max single-process HWM MiB | load avg | run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        run = res.get("run", {})
        when = f"{run.get('date', '')[:16].replace('T', ' ')} ({run.get('commit', '?')})" if run else ""
        for r in res["commands"]:
            runs = "/".join("%.1f" % x for x in r.get("runs_s", [r["wall_s"]]))
            cps = "/".join("%.1f" % x for x in r["baseline"].get("runs_s", [r["cp_s"]]))
            lines.append(f"| {res['shape']} | {r['command']} | {r['bytes'] / 1e9:.2f} GB | {r['wall_s']:.1f} ({runs}) | {r['cp_s']:.1f} ({cps}) "
                         f"| {r['ratio']:.2f} | {r['gb_s']:.2f} | {r['tree_rss'] / 2**20:.0f} | {r['max_hwm'] / 2**20:.0f} "
                         f"| {r.get('load_after', 0):.1f} | {when} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["3b", "7b"])
    ap.add_argument("--configs", default=str(CONFIGS), help="directory of the shapes' config.json files")
    ap.add_argument("--workdir", default="/tmp/mm_convert_bench")
    ap.add_argument("--workers", type=int, help="--workers for the CLI (default: its own default, the cores)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="results file stem (.md and .json)")
    ap.add_argument("--merge", action="store_true", help="keep the results file's rows of shapes not run now "
                    "(each row says which run, date and commit it comes from)")
    a = ap.parse_args(argv)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    command = " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))
    run = {"command": command, "date": started.isoformat(timespec="seconds"), "commit": git_commit(), "machine": machine()}
    results = []
    for shape in a.shapes:
        results.append({**bench_shape(shape, work, a.workers, Path(a.configs)), "run": run})
    if a.merge and Path(a.out + ".json").is_file():  # earlier rows of other shapes, tagged with their own run
        old = json.loads(Path(a.out + ".json").read_text())
        kept = [{**r, "run": r.get("run") or {"command": old["command"], "date": old["date"], "commit": old.get("commit", "?"),
                                              "machine": old["machine"]}}
                for r in old["results"] if r["shape"] not in a.shapes]
        results = kept + results
    doc = {"command": command, "date": run["date"], "commit": run["commit"], "machine": machine(), "results": results}
    Path(a.out + ".json").write_text(json.dumps(doc, indent=2) + "\n")
    Path(a.out + ".md").write_text(render(doc))
    print()
    print(table(results))


def _machine_line(m: dict) -> str:
    return (f"{m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB RAM, kernel {m['kernel']}, "
            f"Python {m['python']}; work dir file system: `{m['filesystem']}`")


def render(doc: dict) -> str:
    """The results file's markdown, from its json (``bench.render(json.load(...))`` re-renders one)."""
    results = doc["results"]
    m = doc["machine"]
    earlier: dict[tuple, list[str]] = {}  # rows kept by --merge from earlier runs, by run
    for r in results:
        run = r.get("run") or {}
        if run.get("date", doc["date"]) != doc["date"]:
            key = (run.get("command", "?"), run.get("date", "?"), run.get("commit", "?"),
                   _machine_line(run["machine"]) if "machine" in run else "not recorded")
            earlier.setdefault(key, []).append(r["shape"])
    others = "".join(f"Rows of {', '.join(shapes)}: `python benchmarks/{cmd}` on {date} (commit {commit}); machine: {mach}\n\n"
                     for (cmd, date, commit, mach), shapes in earlier.items())
    return (f"# Benchmark results\n\n`python benchmarks/{doc['command']}` on {doc['date']}\n\n"
          f"Machine: {_machine_line(m)}\n\n" + others +
          "ratio = command wall time / (`cp -r` of the command's input + `sync`), the faster of two runs of each (both listed), each "
          "with its input evicted from the page cache first; peak RSS tree = largest sum of VmRSS over the CLI and its workers, sampled every "
          "100 ms (shared pages of forked workers counted once per process); load avg = 1-minute load average "
          "after the command (the machine is shared: other jobs' load shows there; 2 cores); run = the date and commit of "
          "the bench run a row comes from (`--merge` keeps other shapes' rows of the previous file).\n\n"
          "hf_to_mm: tp2, llm [[L/2, L/2]], vit [[V, 0]] (4 files); resplit: to tp1 with the same stages (2 files); "
          "resplit to one file: tp1, llm [[L]], vit [[V]] (one writer process); mm_to_hf: safetensors files of at most 5 GB, balanced (2 x 3.75 GB for 3B). "
          "MoE shapes (Qwen3-VL 30B-A3B, LLM depth cut to fit the disk, published widths and 128 experts in the hub's fused "
          "3-D layout): hf_to_mm also at ep2 (8 files), the resplits to tp1 ep1.\n\n"
          + table(results) + "\n")


if __name__ == "__main__":
    main()
