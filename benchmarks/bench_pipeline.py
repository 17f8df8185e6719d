"""Pipeline schedules of the training runtime at pp 2: step time and activation memory of 1F1B, GPipe and the
sequential schedule on the same model, micro-batches and ranks.

    python benchmarks/bench_pipeline.py                 # results in benchmarks/pipeline_results.{md,json}
    python benchmarks/bench_pipeline.py --steps 1       # quicker

Model: the published Qwen2.5-VL 3B config scaled down (``--hidden``, default 512, the other widths in
proportion; ``--vocab`` rows, default 32768, the special tokens moved with the top of the vocabulary: the
published 151936 rows would make every figure the output layer's), ``--llm-layers`` LLM layers and
``--vit-layers`` vision blocks; random weights (mm_convert.testing.synthetic), converted to MM shards at tp 1, pp 2 (the vision
encoder and half the LLM on stage 0). Samples: ``--micro-batches`` micro-batches of one image+text sample
each (about 250-450 tokens, varied), all trained (vision encoder too), fp32, one thread per rank (2 ranks).

Memory: each schedule in fresh ranks (so each peak RSS is its own): two steps, then one step with autograd's
saved-tensor hooks that count the bytes of the distinct storages the saved tensors hold (parameters left out) and
their peak over the step. Reported per stage: forward contexts held at once (1F1B: TrainModel.peak_in_flight;
GPipe: every micro-batch; sequential: one), the peak of saved-tensor bytes, and VmHWM (peak RSS) over the two
steps minus the RSS with the model loaded. Time: one launch runs a step of each schedule in turn, ``--warmup``
untimed rounds, then ``--steps`` timed rounds (the machine is shared; interleaving keeps the drift out of the
comparison); the table gives the median.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
IGNORE = -100
# (image height, width in pixels, prompt text tokens, reply tokens)
SAMPLES = [(336, 336, 50, 40), (448, 392, 60, 80), (308, 308, 30, 50), (392, 308, 40, 70),
           (224, 448, 70, 60), (448, 336, 40, 150), (336, 392, 80, 30), (392, 448, 50, 90)]


def build(work: Path, hidden: int, vocab: int, llm_layers: int, vit_layers: int) -> tuple[Path, Path]:
    import torch

    from mm_convert import Qwen2_5_VLConverter
    from mm_convert.testing.synthetic import write_synthetic_checkpoint

    cfg = json.loads((REPO / "mm_convert" / "data" / "qwen2_5_vl_3b.json").read_text())
    scale = hidden / cfg["hidden_size"]
    cut = cfg["vocab_size"] - vocab  # the special tokens keep their place at the top of the vocabulary
    cfg.update({k: v - cut for k, v in cfg.items() if k.endswith("_token_id") and isinstance(v, int)})
    cfg.update(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(cfg["intermediate_size"] * scale) // 64 * 64,
               num_attention_heads=max(2, int(cfg["num_attention_heads"] * scale)))
    vis = cfg["vision_config"]
    vis.update(hidden_size=int(vis["hidden_size"] * scale) // 64 * 64, out_hidden_size=hidden,
               intermediate_size=int(vis["intermediate_size"] * scale) // 64 * 64,
               num_heads=max(2, int(vis["num_heads"] * scale)))
    hf, mm = work / "hf", work / "mm"
    (work / "config.json").write_text(json.dumps(cfg))
    write_synthetic_checkpoint(work / "config.json", hf, layers=llm_layers, vit_layers=vit_layers, dtype=torch.float32)
    half = llm_layers // 2
    Qwen2_5_VLConverter(progress=False).hf_to_mm(hf, mm, tp_size=1, llm_pp_layers=[half, llm_layers - half],
                                                 vit_pp_layers=[vit_layers, 0], overwrite=True)
    return hf, mm


def make_samples(hf: Path, n: int, seed: int = 0) -> list[dict]:
    """Encoded samples (train.data.encode's format) from token ids and random pixels."""
    import torch

    cfg = json.loads((hf / "config.json").read_text())
    vc = cfg["vision_config"]
    patch, merge, tps = vc["patch_size"], vc["spatial_merge_size"], vc.get("temporal_patch_size", 2)
    g = torch.Generator().manual_seed(seed)
    text_hi = min(cfg["bos_token_id"], cfg["vision_start_token_id"])
    out = []
    for i in range(n):
        h, w, prompt, reply = SAMPLES[i % len(SAMPLES)]
        gh, gw = h // patch, w // patch
        ids = torch.cat([torch.randint(0, text_hi, (prompt // 2,), generator=g),
                         torch.tensor([cfg["vision_start_token_id"]]),
                         torch.full((gh * gw // merge ** 2,), cfg["image_token_id"]),
                         torch.tensor([cfg["vision_end_token_id"]]),
                         torch.randint(0, text_hi, (prompt - prompt // 2 + reply,), generator=g),
                         torch.tensor([cfg["eos_token_id"]])])
        labels = ids.clone()
        labels[:len(ids) - reply - 1] = IGNORE
        out.append({"input_ids": ids, "labels": labels, "image_grid_thw": torch.tensor([[1, gh, gw]]),
                    "pixel_values": torch.randn(gh * gw, vc.get("in_chans", 3) * tps * patch * patch, generator=g)})
    return out


# ---- ranks -------------------------------------------------------------------------------------------------
class SavedBytes:
    """saved_tensors_hooks that count the bytes of the distinct storages autograd's saved tensors hold (not the
    parameters'), released when the graph lets go of them; ``peak``: the most at once."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.live: dict[int, list[int]] = {}
        self.now = self.peak = 0

    def pack(self, t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in self.params or st.nbytes() == 0:
            return t
        entry = self.live.setdefault(ptr, [st.nbytes(), 0])
        if entry[1] == 0:
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        return _Held(t, self, ptr)

    @staticmethod
    def unpack(h):
        return h.t if isinstance(h, _Held) else h

    def release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[ptr]


class _Held:
    __slots__ = ("t", "owner", "ptr")

    def __init__(self, t, owner, ptr):
        self.t, self.owner, self.ptr = t, owner, ptr

    def __del__(self):
        self.owner.release(self.ptr)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def worker(job_path: str) -> None:
    """mode "memory": one schedule in fresh ranks; mode "time": every schedule, step by step in turn."""
    import torch
    import torch.distributed as dist

    from mm_convert.converter import converter_for
    from mm_train.batch import collate, label_tokens
    from mm_train.config import ModelConfig, read_hf_config
    from mm_train.engine import TrainModel

    job = json.loads(Path(job_path).read_text())
    hf, mm = job["hf"], job["mm"]
    cfg = ModelConfig.from_hf(hf)
    layout = converter_for(read_hf_config(hf)[0], progress=False).layout_of(mm, hf)
    tm = TrainModel(cfg, layout, mm, train_vit=True)
    batches = [collate([s], cfg) for s in torch.load(job["samples"], weights_only=True)]
    denom = float(sum(label_tokens(b) for b in batches))

    def step(schedule: str) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for p in tm.parameters():
            p.grad = None
        if schedule == "1f1b":
            tm.train_step(batches, denom, schedule="1f1b")
        elif schedule == "gpipe":  # as mm_train.finetune runs them
            for ctx in [tm.forward(b, denom) for b in batches]:
                tm.backward(ctx)
        else:
            for b in batches:
                tm.forward_backward(b, denom)
        tm.reduce_grads()
        dist.barrier()
        return time.perf_counter() - t0

    if job["mode"] == "time":
        times: dict = {}
        for rnd in range(job["warmup"] + job["steps"]):
            for schedule in job["schedules"]:
                t = step(schedule)
                if rnd >= job["warmup"]:
                    times.setdefault(schedule, []).append(t)
        rep: dict = {"stage": tm.ps.pp_rank, "step_s": times}
    else:
        schedule = job["schedules"][0]
        dist.barrier()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, the model loaded
        loaded = _status("VmRSS")
        step(schedule)
        step(schedule)
        hwm = _status("VmHWM")
        counter = SavedBytes(tm.parameters())
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            step(schedule)
        n = len(batches)
        rep = {"stage": tm.ps.pp_rank, "in_flight": tm.peak_in_flight if schedule == "1f1b" else n if schedule == "gpipe" else 1,
               "saved_peak": counter.peak, "rss_loaded": loaded, "hwm": hwm, "hwm_growth": hwm - loaded}
    Path(job["out"], f"{job['mode']}.{job['schedules'][0]}.rank{dist.get_rank()}.json").write_text(json.dumps(rep))
    dist.barrier()
    dist.destroy_process_group()


# ---- parent ------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--llm-layers", type=int, default=4)
    ap.add_argument("--vit-layers", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds (one step of each schedule)")
    ap.add_argument("--steps", type=int, default=3, help="timed rounds")
    ap.add_argument("--time-only", action="store_true", help="skip the memory runs")
    ap.add_argument("--schedules", nargs="+", default=["1f1b", "gpipe", "sequential"])
    ap.add_argument("--out", type=Path, default=HERE / "pipeline_results")
    a = ap.parse_args()
    import torch

    from mm_train.launch import launch_local

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        work = Path(tmp)
        hf, mm = build(work, a.hidden, a.vocab, a.llm_layers, a.vit_layers)
        torch.save(make_samples(hf, a.micro_batches), work / "samples.pt")
        env = {"PYTHONPATH": os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1"}
        base = {"hf": str(hf), "mm": str(mm), "samples": str(work / "samples.pt"), "out": tmp,
                "warmup": a.warmup, "steps": a.steps}
        for schedule in a.schedules:
            results[schedule] = [{"stage": r, "in_flight": None, "saved_peak": 0, "hwm_growth": 0} for r in range(2)]
            if a.time_only:
                continue
            (work / "job.json").write_text(json.dumps({**base, "mode": "memory", "schedules": [schedule]}))
            launch_local("bench_pipeline", [str(work / "job.json")], 2, env=env, timeout=3600)
            results[schedule] = [json.loads((work / f"memory.{schedule}.rank{r}.json").read_text()) for r in range(2)]
            print(schedule, [(r["in_flight"], r["saved_peak"] >> 20, r["hwm_growth"] >> 20) for r in results[schedule]],
                  flush=True)
        (work / "job.json").write_text(json.dumps({**base, "mode": "time", "schedules": a.schedules}))
        launch_local("bench_pipeline", [str(work / "job.json")], 2, env=env, timeout=3600)
        times = json.loads((work / f"time.{a.schedules[0]}.rank0.json").read_text())["step_s"]
        for schedule in a.schedules:
            for r in results[schedule]:
                r["step_s"] = times[schedule]
            print(schedule, " ".join(f"{t:.2f}" for t in times[schedule]), flush=True)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    if subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                      text=True).stdout.strip():
        commit += "+changes"
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "load_avg": os.getloadavg()[0], "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}}
    a.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    lines = [f"# Pipeline schedules at pp 2\n\n`python benchmarks/bench_pipeline.py` on {meta['date']} (commit {commit}); "
             f"{meta['machine']}, 1-min load {meta['load_avg']:.1f}. Model: Qwen2.5-VL 3B scaled to hidden {a.hidden}, "
             f"vocabulary {a.vocab}, "
             f"{a.llm_layers} LLM layers, {a.vit_layers} vision blocks, fp32; {a.micro_batches} micro-batches of one "
             f"image+text sample; 2 ranks (stage 0: vision + LLM half, stage 1: LLM half + loss), 1 thread each.\n",
             "| schedule | stage | forward contexts held at once | saved-tensor bytes, peak | peak RSS over the RSS with the model loaded "
             "| step time (median; all) |", "|---|---|---|---|---|---|"]
    for schedule, reps in results.items():
        for r in reps:
            lines.append(f"| {schedule} | {r['stage']} | {r['in_flight']} | {r['saved_peak'] / 2**20:.0f} MiB | "
                         f"{r['hwm_growth'] / 2**20:.0f} MiB | {statistics.median(r['step_s']):.2f} s "
                         f"({' / '.join(f'{t:.2f}' for t in r['step_s'])}) |")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json") and "RANK" in os.environ:
        from mm_train.launch import worker_main

        worker_main(worker, sys.argv[1])
    else:
        main()
