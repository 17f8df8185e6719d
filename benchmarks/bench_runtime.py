"""The training runtime (train/, ``mm_train``) against transformers on the same model, samples and threads.

    python benchmarks/bench_runtime.py                         # CPU, fp32: results in benchmarks/runtime_results.{md,json}
    python benchmarks/bench_runtime.py --steps 2 --rounds 1    # quicker
    python benchmarks/bench_runtime.py --device cuda           # a GPU: generation tokens/s on a shape-real 3B (bf16)

Model: a published config (``--config``, default Qwen2.5-VL 3B, mm_convert/data/qwen2_5_vl_3b.json) cut in depth to
``--llm-layers`` LLM layers and ``--vit-layers`` vision blocks (the last one a full-attention block, the others
window attention), real widths and vocabulary; random weights written by mm_convert.testing.synthetic (fp32 on
CPU), converted to MM shards (tp1) by the converter. Transformers loads the HF directory, the runtime the MM one.

Samples: ``--samples`` image+text samples of varied length built from token ids (no tokenizer needed): a prompt,
an image of its own size (random pixels), a reply whose tokens carry the labels. They form one global batch,
``--micro-batch`` samples per micro-batch (gradient accumulation over the rest), the same for every side.

Training (each side in its own fresh subprocess, so its peak RSS (VmHWM) is its own; torch threads set to
``--threads`` on every side):

- ``transformers``: Qwen2_5_VLForConditionalGeneration (its default attention, sdpa), right-padded micro-batches
  with attention masks, loss with ``num_items_in_batch`` = the global batch's label tokens (the token mean over the
  global batch, as the runtime's), backward, clip_grad_norm_ 1.0, AdamW;
- ``ours``: ``mm_train.engine.TrainModel`` (one rank, gloo) driven like ``mm_train.finetune``'s loop:
  forward_backward per micro-batch, reduce_grads, clip_grads 1.0, the run's AdamW (``make_optimizer``);
- ``ours-packed``: the same with packed micro-batches (``--packed-sequences``: samples concatenated without padding,
  per-sample attention bounds and mrope positions).

Both optimizers are torch's per-tensor AdamW (foreach=False, the runtime's choice), lr 1e-5, no weight decay; the
vision encoder is trained. Each side runs ``--warmup`` untimed steps, then ``--steps`` timed steps; the whole set
of sides is repeated ``--rounds`` times, interleaved (the machine is shared; its speed drifts). Every step time is
recorded; the table gives the best and the median.

Generation: the same image+text prompt, greedy, ``--new-tokens`` new tokens (eos ignored) with KV cache:
``mm_train.generate`` on one rank against transformers' ``generate``; the ids must agree. Tokens/s = new tokens
/ wall time of the call (prefill included); the prefill (one new token) is timed on its own as well.

Sampler: the bucket-vs-random step-time comparison is ``benchmarks/bench_sampler.py``
(``benchmarks/sampler_results.md``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
IGNORE = -100

# (image height, width in pixels, prompt text tokens, reply tokens): 300-480 tokens each; micro-batches of two pair
# a long sample with a short one (padding ~ 30% of a padded micro-batch)
SAMPLES = [(448, 448, 80, 120), (336, 336, 60, 90), (448, 392, 100, 150), (392, 336, 70, 60),
           (448, 336, 90, 100), (308, 308, 40, 70), (392, 448, 60, 130), (336, 280, 50, 80)]


# ---- model and samples (parent) -----------------------------------------------------------------------------
def build_model(work: Path, config: Path, llm_layers: int, vit_layers: int, dtype: str) -> tuple[Path, Path]:
    import torch

    from mm_convert import Qwen2_5_VLConverter
    from mm_convert.testing.synthetic import write_synthetic_checkpoint

    tag = f"L{llm_layers or 'all'}-V{vit_layers or 'all'}-{dtype}"
    hf, mm = work / f"hf-{tag}", work / f"mm-{tag}"
    if not (hf / "config.json").exists():
        write_synthetic_checkpoint(config, hf, layers=llm_layers, vit_layers=vit_layers, dtype=getattr(torch, dtype))
        cfg = json.loads((hf / "config.json").read_text())
        cfg["torch_dtype"] = dtype
        (hf / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if not (mm / "latest_checkpointed_iteration.txt").exists():
        Qwen2_5_VLConverter(progress=False).hf_to_mm(hf, mm, tp_size=1, overwrite=True)
    return hf, mm


def make_samples(hf: Path, n: int, seed: int = 0) -> list[dict]:
    """Encoded samples (train.data.encode's format) from token ids and random pixels."""
    import torch

    cfg = json.loads((hf / "config.json").read_text())
    vc = cfg["vision_config"]
    patch, merge, tps = vc["patch_size"], vc["spatial_merge_size"], vc.get("temporal_patch_size", 2)
    g = torch.Generator().manual_seed(seed)
    text_hi = min(cfg["bos_token_id"], cfg["vision_start_token_id"])  # ordinary tokens only
    out = []
    for i in range(n):
        h, w, prompt, reply = SAMPLES[i % len(SAMPLES)]
        gh, gw = h // patch, w // patch
        n_img = gh * gw // merge ** 2
        pre = torch.randint(0, text_hi, (prompt // 2,), generator=g)
        post = torch.randint(0, text_hi, (prompt - prompt // 2,), generator=g)
        ans = torch.randint(0, text_hi, (reply,), generator=g)
        ids = torch.cat([pre, torch.tensor([cfg["vision_start_token_id"]]),
                         torch.full((n_img,), cfg["image_token_id"]), torch.tensor([cfg["vision_end_token_id"]]),
                         post, ans, torch.tensor([cfg["eos_token_id"]])])
        labels = ids.clone()
        labels[:len(ids) - reply - 1] = IGNORE
        pixels = torch.randn(gh * gw, vc.get("in_chans", 3) * tps * patch * patch, generator=g)
        out.append({"input_ids": ids, "labels": labels, "pixel_values": pixels,
                    "image_grid_thw": torch.tensor([[1, gh, gw]])})
    return out


# ---- workers (each in its own process) -----------------------------------------------------------------------
def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _dist_env() -> None:
    from mm_train.launch import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))


def micro_batches(samples: list[dict], mbs: int) -> list[list[dict]]:
    return [samples[i:i + mbs] for i in range(0, len(samples), mbs)]


def worker_train_hf(job: dict) -> dict:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mm_train.batch import collate, label_tokens
    from mm_train.config import ModelConfig

    device = torch.device(job["device"])
    cfg = ModelConfig.from_hf(job["hf"])
    samples = torch.load(job["samples"], weights_only=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(job["hf"], dtype=torch.float32).to(device).train()
    batches = []
    for mb in micro_batches(samples, job["micro_batch"]):
        b = collate(mb, cfg)
        mask = torch.zeros_like(b["input_ids"])
        for i, s in enumerate(mb):
            mask[i, :len(s["input_ids"])] = 1
        kw = {"input_ids": b["input_ids"], "labels": b["labels"], "attention_mask": mask,
              "mm_token_type_ids": (b["input_ids"] == cfg.image_token_id).int(),
              "pixel_values": b["pixel_values"], "image_grid_thw": b["image_grid_thw"]}
        batches.append((kw, label_tokens(b)))
    denom = sum(n for _, n in batches)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, foreach=False)
    loaded = rss_now()

    def step():
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for kw, _ in batches:
            kw = {k: v.to(device) for k, v in kw.items()}
            loss = model(**kw, num_items_in_batch=torch.tensor(denom, device=device)).loss
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return total

    return timed_steps(step, job, loaded, attn=model.config._attn_implementation)


def worker_train_ours(job: dict) -> dict:
    import torch

    from mm_convert.layout import ParallelLayout
    from mm_train.batch import collate, label_tokens, to_device
    from mm_train.config import ModelConfig
    from mm_train.engine import TrainModel
    from mm_train.optimizer import make_optimizer

    _dist_env()
    cfg = ModelConfig.from_hf(job["hf"])
    layout = ParallelLayout.create(1, [cfg.text.num_layers], [cfg.vision.depth])
    samples = torch.load(job["samples"], weights_only=True)
    tm = TrainModel(cfg, layout, job["mm"], train_vit=True)
    args = argparse.Namespace(weight_decay=0.0, lr=1e-5, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8)
    opt = make_optimizer(args, tm)
    kinds = {"ours-packed": ["packed"], "ours-alternating": ["padded", "packed"]}.get(job["side"], ["padded"])
    sets = {"padded": [collate(mb, cfg) for mb in micro_batches(samples, job["micro_batch"])]}
    if "packed" in kinds:  # (a baseline commit may not have it)
        from mm_train.batch import collate_packed
        sets["packed"] = [collate_packed(mb, cfg) for mb in micro_batches(samples, job["micro_batch"])]
    denom = float(sum(label_tokens(b) for b in sets["padded"]))
    loaded = rss_now()
    count = [0]

    def step():  # "ours-alternating": a padded step, then a packed one, and so on (the same weights' speed)
        batches = sets[kinds[count[0] % len(kinds)]]
        count[0] += 1
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for b in batches:
            total += float(tm.forward_backward(to_device(b, tm.ps.device), denom)) / denom
        tm.reduce_grads()
        tm.clip_grads(1.0)
        opt.step()
        return total

    n = len(kinds)
    out = timed_steps(step, {**job, "warmup": job["warmup"] * n, "steps": job["steps"] * n}, loaded)
    if n > 1:
        for i, kind in enumerate(kinds):
            out[f"{kind}_s"], out[f"{kind}_cpu_s"] = out["step_s"][i::n], out["cpu_s"][i::n]
    return out


def timed_steps(step, job: dict, loaded: int, **extra) -> dict:
    import torch

    times, cpu, losses = [], [], []
    sync = torch.cuda.synchronize if job["device"] == "cuda" else (lambda: None)
    for i in range(job["warmup"] + job["steps"]):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        sync()
        if i >= job["warmup"]:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    out = {"step_s": times, "cpu_s": cpu, "losses": losses, "rss_loaded": loaded, "peak_rss": peak_rss(), **extra}
    if job.get("profile"):  # one more step under torch.profiler: where the time goes, by operator
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if job["device"] == "cuda" else [])
        with profile(activities=acts, record_shapes=False) as prof:
            step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60)
        Path(job["profile"]).write_text(table)
    if job["device"] == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def prompt_inputs(hf: str, cfg, device: str, seed: int = 1) -> dict:
    """One image (448 x 448) + text prompt, as train.inputs.build_inputs returns it."""
    import torch

    from mm_train.positions import mrope_positions

    s = make_samples(Path(hf), 3, seed)[2]
    ids = s["input_ids"][None, :-(int((s["labels"] != IGNORE).sum()))]  # the prompt part only
    pos, delta = mrope_positions(ids, s["image_grid_thw"], cfg.image_token_id, cfg.vision.spatial_merge_size)
    return {"input_ids": ids, "mm_token_type_ids": (ids == cfg.image_token_id).int(), "position_ids": pos,
            "rope_delta": delta, "pixel_values": s["pixel_values"].to(torch.float32), "image_grid_thw": s["image_grid_thw"]}


def worker_generate_hf(job: dict) -> dict:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mm_train.config import ModelConfig
    from mm_train.inputs import hf_kwargs

    device = torch.device(job["device"])
    dtype = getattr(torch, job["dtype"])
    cfg = ModelConfig.from_hf(job["hf"])
    inputs = prompt_inputs(job["hf"], cfg, job["device"])
    kwargs = {"attn_implementation": "sdpa"} if job["device"] == "cuda" else {}
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(job["hf"], dtype=dtype, **kwargs).to(device).eval()
    model.generation_config.eos_token_id = None
    kw = {k: v.to(device) for k, v in hf_kwargs(inputs).items()}
    kw["pixel_values"] = kw["pixel_values"].to(dtype)
    def gen(k):
        with torch.inference_mode():
            out = model.generate(**kw, max_new_tokens=k, min_new_tokens=k, do_sample=False)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    return timed_generation(gen, job, prompt_len=inputs["input_ids"].shape[1])


def worker_generate_ours(job: dict) -> dict:
    from mm_convert.layout import ParallelLayout
    from mm_train.config import ModelConfig
    from mm_train.generate import GenerationConfig, generate
    from mm_train.runtime import Runtime

    _dist_env()
    cfg = ModelConfig.from_hf(job["hf"])
    layout = ParallelLayout.create(1, [cfg.text.num_layers], [cfg.vision.depth])
    inputs = prompt_inputs(job["hf"], cfg, job["device"])
    rt = Runtime(cfg, layout, job["mm"])
    dtype = next(rt.stages[0].parameters()).dtype
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)

    def gen(k):
        return generate(rt, inputs, GenerationConfig(max_new_tokens=k, eos_token_id=()))

    return timed_generation(gen, job, prompt_len=inputs["input_ids"].shape[1])


def timed_generation(gen, job: dict, prompt_len: int) -> dict:
    import torch

    sync = torch.cuda.synchronize if job["device"] == "cuda" else (lambda: None)
    gen(2)  # warm-up
    prefill, full, ids = [], [], None
    for _ in range(job["gen_runs"]):
        sync()
        t0 = time.perf_counter()
        gen(1)
        sync()
        prefill.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ids = gen(job["new_tokens"])
        sync()
        full.append(time.perf_counter() - t0)
    return {"prefill_s": prefill, "generate_s": full, "ids": ids, "prompt_len": prompt_len,
            "peak_rss": peak_rss()}


# ---- findings: each before / after in isolation (issue 14's profile candidates) --------------------------------
# "before" re-implements the code the runtime had at the commit before the change (71a3bc6), "after" calls today's.
FINDINGS = {
    "loss": ("cross-entropy over the full vocabulary: output layer + CE forward and backward, 2 micro-batches of the "
             "benchmark's samples (batch 2, 477 positions, 272 with a label)", ["before", "label-rows", "label-rows+fused-grad"]),
    "grad_norm": ("global grad norm over the cut 3B's trainable gradients (540M values)", ["before", "after"]),
    "embedding_grad": ("tied embedding's gradient: its lookup backward added to the output layer's dense gradient, "
                       "2 micro-batches of 954 tokens", ["before", "after"]),
    "vision_windows": ("vision window attention of the 4 benchmark images (3168 patches, 16 heads x 80; windows of 64 "
                       "patches and smaller edge windows), forward and backward", ["before", "after"]),
    "prefill_logits": ("generation prefill: output layer over a 326-token prompt's final hidden states", ["before", "after"]),
    "load_copy": ("fp32 training copy of a loaded bf16 embedding (151936 x 2048)", ["before", "after"]),
}


def _finding_setup(name: str, variant: str):
    """Inputs and the timed function of one finding's variant."""
    import torch
    import torch.nn.functional as F

    from mm_train.parallel import Group, VocabEmbedding, output_linear

    g = torch.Generator().manual_seed(0)
    hidden, vocab = 2048, 151936
    one = Group(None, 0, 1)
    if name == "loss":
        from mm_train.model import token_loss
        w = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g) * 0.02)
        hs = [torch.randn(2, 477, hidden, generator=g).requires_grad_() for _ in range(2)]
        labels = torch.full((2, 477), IGNORE)
        labels[0, 459 - 121:459], labels[1, 477 - 151:] = 1, 2

        def run():
            w.grad = None
            for h in hs:
                if variant == "before":  # engine.py at 71a3bc6: logits of every position, sliced, then CE
                    logits = F.linear(h, w).float()[:, :-1]
                    loss = F.cross_entropy(logits.reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=IGNORE,
                                           reduction="sum")
                elif variant == "label-rows":  # the labelled rows only, the weight gradient through autograd
                    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)
                    rows = (target != IGNORE).nonzero().squeeze(1)
                    logits = F.linear(h.reshape(-1, hidden).index_select(0, rows), w)
                    loss = F.cross_entropy(logits, target.index_select(0, rows), reduction="sum")
                else:
                    loss = token_loss(h, w, one, labels, vocab)
                loss.backward()
        return run
    if name == "grad_norm":
        from mm_train.engine import squared_norm
        shapes = [(vocab, hidden)] + [(2 * 11008, hidden), (hidden, 11008), (2560, hidden), (hidden, hidden)] * 2 + \
            [(3 * 1280, 1280), (1280, 1280), (2 * 3420, 1280), (1280, 3420)] * 2 + [(5120, 5120), (2048, 5120)]
        grads = [torch.randn(s, generator=g) for s in shapes]

        def run():
            if variant == "before":  # engine.grad_norm at 71a3bc6
                return float(sum(p.double().pow(2).sum() for p in grads)) ** 0.5
            return float(sum(squared_norm(p) for p in grads)) ** 0.5
        return run
    if name == "embedding_grad":
        emb = VocabEmbedding(vocab, hidden, one)
        emb.weight = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g) * 0.02)
        emb.sparse_grad = variant == "after"
        ids = [torch.randint(0, vocab, (2, 477), generator=g) for _ in range(2)]
        emb.weight.grad = torch.randn(vocab, hidden, generator=g)  # the output layer's gradient, already there

        def run():
            for i in ids:
                emb(i).sum().backward()
        return run
    if name == "vision_windows":
        from mm_train.kernels import TorchKernels
        from mm_train.positions import window_order
        grids = torch.tensor([[1, 32, 32], [1, 24, 24], [1, 32, 28], [1, 28, 24]])
        _, cu = window_order(grids, 2, 112, 14)
        n = int(cu[-1])
        q, k, v = (torch.randn(n, 16, 80, generator=g).requires_grad_() for _ in range(3))

        def run():
            if variant == "before":  # VisionAttention.forward at 71a3bc6: one SDPA call per window
                bounds, out = cu.tolist(), []
                for a, b in zip(bounds[:-1], bounds[1:]):
                    qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
                    out.append(F.scaled_dot_product_attention(qs, ks, vs).squeeze(0).transpose(0, 1))
                o = torch.cat(out)
            else:
                o = TorchKernels().varlen_attention(q, k, v, cu, None, causal=False)
            o.sum().backward()
        return run
    if name == "prefill_logits":
        w = torch.randn(vocab, hidden, generator=g) * 0.02
        h = torch.randn(1, 326, hidden, generator=g)

        def run():
            with torch.inference_mode():
                return output_linear(h if variant == "before" else h[:, -1:], w)
        return run
    if name == "load_copy":
        t = (torch.randn(vocab, hidden, generator=g) * 0.02).to(torch.bfloat16)

        def run():
            from mm_train.engine import fp32_copy
            return t.clone().float() if variant == "before" else fp32_copy(t)
        return run
    raise ValueError(name)


def worker_finding(job: dict) -> dict:
    import gc

    run = _finding_setup(job["finding"], job["variant"])
    gc.collect()
    base = rss_now()
    times = []
    for i in range(1 + job["reps"]):
        t0 = time.perf_counter()
        run()
        if i:
            times.append(time.perf_counter() - t0)
    return {"times": times, "peak_over_setup": peak_rss() - base}


def findings_report(found: dict) -> list[str]:
    lines = ["## Findings: each change before / after, in isolation", "",
             "Each variant in its own process (peak RSS over what its inputs hold), 1 warm-up then timed repetitions; "
             "the variants alternate, round after round. 'before' re-implements the runtime's code at 71a3bc6.", "",
             "| finding | variant | best s | every run (s) | peak RSS over inputs GiB |", "|---|---|---|---|---|"]
    for name, variants in found.items():
        for variant, runs in variants.items():
            times = [t for r in runs for t in r["times"]]
            lines.append(f"| {name} | {variant} | {min(times):.3f} | {', '.join(f'{t:.3f}' for t in times)} | "
                         f"{gib(max(r['peak_over_setup'] for r in runs))} |")
    lines += [""] + [f"- {name}: {desc}" for name, (desc, _) in FINDINGS.items()] + [""]
    return lines


WORKERS = {"finding": worker_finding, "train:transformers": worker_train_hf, "train:ours": worker_train_ours,
           "train:ours-packed": worker_train_ours, "train:ours-alternating": worker_train_ours, "generate:transformers": worker_generate_hf,
           "generate:ours": worker_generate_ours}


def import_train_from(path: str) -> None:
    """Make ``mm_train`` the runtime in ``path`` (another commit's train/, for a before / after comparison)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mm_train", Path(path) / "__init__.py",
                                                  submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["mm_train"] = module
    spec.loader.exec_module(module)


def worker(job_path: str) -> None:
    import torch

    job = json.loads(Path(job_path).read_text())
    if job.get("train_dir"):
        import_train_from(job["train_dir"])
    torch.set_num_threads(job["threads"])
    res = WORKERS[job["kind"]](job)
    res["threads"] = torch.get_num_threads()
    Path(job["out"]).write_text(json.dumps(res))


def run_worker(job: dict, work: Path) -> dict:
    tag = (job["kind"].split(":")[0] + "_" + job["side"]).replace("@", "_")
    path = work / f"job_{tag}.json"
    job = {**job, "out": str(work / f"out_{tag}.json")}
    path.write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    t0, load = time.monotonic(), os.getloadavg()[0]
    proc = subprocess.run([sys.executable, __file__, "--worker", str(path)], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{job['kind']} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    res = json.loads(Path(job["out"]).read_text())
    res["wall_s"], res["load_before"], res["load_after"] = time.monotonic() - t0, load, os.getloadavg()[0]
    return res


# ---- report -------------------------------------------------------------------------------------------------
def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "train", "benchmarks/bench_runtime.py"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return head + (" (train/ modified)" if dirty else "")
    except OSError:
        return "unknown"


def gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def report(meta: dict, train: dict, gen: dict, out: Path, found: dict | None = None) -> None:
    lines = [f"# Runtime vs transformers ({meta['device']})", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}, git commit {meta['commit']}  ",
             f"Machine: {meta['machine']}  ",
             f"Model: {meta['model']}  ", f"Samples: {meta['samples_desc']}  ",
             f"Threads: torch.set_num_threads({meta['threads']}) on every side; each side in its own process, "
             f"{meta['warmup']} warm-up step(s) then {meta['steps']} timed, {meta['rounds']} round(s) interleaved.", ""]
    if train:
        ref = train.get("transformers") or next(iter(train.values()))
        base = min(t for r in ref for t in r["step_s"])
        base_cpu = min(t for r in ref for t in r["cpu_s"])
        base_rss = max(r["peak_rss"] for r in ref)
        lines += ["## Training step", "",
                  "Wall: seconds per optimizer step; CPU: the process's CPU seconds in that step (all threads; less "
                  "sensitive to other load on a shared machine). Ratios against transformers' best.", "",
                  "| side | best wall s | median wall s | wall vs transformers | best CPU s | CPU vs transformers "
                  "| peak RSS GiB (vs transformers) | RSS after load GiB |",
                  "|---|---|---|---|---|---|---|---|"]
        alternating = train.get("ours-alternating")
        for side, runs in train.items():
            if side == "ours-alternating":
                continue
            steps = [t for r in runs for t in r["step_s"]]
            cpu = [t for r in runs for t in r["cpu_s"]]
            rss = max(r["peak_rss"] for r in runs)
            lines.append(f"| {side} | {min(steps):.2f} | {statistics.median(steps):.2f} | {min(steps) / base:.2f}x | "
                         f"{min(cpu):.2f} | {min(cpu) / base_cpu:.2f}x | {gib(rss)} ({rss / base_rss:.2f}x) | "
                         f"{gib(max(r['rss_loaded'] for r in runs))} |")
        lines += ["", "Every step, by round (wall s / CPU s; load average of the machine before and after the side's "
                  "process):", ""]
        for side, runs in train.items():
            for k, r in enumerate(runs):
                label = side + (" (padded, packed, ... alternating)" if side == "ours-alternating" else "")
                lines.append(f"- {label}, round {k}: " + ", ".join(f"{w:.2f} / {c:.2f}" for w, c in
                                                                   zip(r["step_s"], r["cpu_s"]))
                             + f" (load {r['load_before']:.1f} -> {r['load_after']:.1f}; peak RSS {gib(r['peak_rss'])})")
        if alternating:
            pad = [t for r in alternating for t in r["padded_s"]]
            pk = [t for r in alternating for t in r["packed_s"]]
            pad_c = [t for r in alternating for t in r["padded_cpu_s"]]
            pk_c = [t for r in alternating for t in r["packed_cpu_s"]]
            ratios = [b / a for a, b in zip(pad, pk)]
            lines += ["", "### Packed vs padded, alternating step by step in one process", "",
                      "A padded step, then a packed one, on the same model (the weights move on; the work per step does "
                      "not), so both see the same machine load. Packed / padded of each pair (wall): "
                      + ", ".join(f"{x:.2f}" for x in ratios) + f"; median {statistics.median(ratios):.2f}.", "",
                      "| micro-batches | best wall s | median wall s | best CPU s | median CPU s |", "|---|---|---|---|---|",
                      f"| padded | {min(pad):.2f} | {statistics.median(pad):.2f} | {min(pad_c):.2f} | "
                      f"{statistics.median(pad_c):.2f} |",
                      f"| packed | {min(pk):.2f} | {statistics.median(pk):.2f} | {min(pk_c):.2f} | "
                      f"{statistics.median(pk_c):.2f} |", "",
                      "Every pair (padded wall / CPU s, packed wall / CPU s): "
                      + "; ".join(f"{a:.2f} / {c:.2f}, {b:.2f} / {d:.2f}" for a, c, b, d in zip(pad, pad_c, pk, pk_c))]
        lines += ["", "Loss of the first step (the same samples and weights): "
                  + ", ".join(f"{s} {runs[0]['losses'][0]:.6f}" for s, runs in train.items()), ""]
    if gen:
        lines += ["## Generation (greedy, KV cache)", "",
                  f"Prompt {gen['transformers'][0]['prompt_len']} tokens (one image), {meta['new_tokens']} new tokens.", "",
                  "| side | tokens/s (best) | generate s (every run) | prefill s (every run) | peak RSS GiB | ids equal |",
                  "|---|---|---|---|---|---|"]
        ref = gen["transformers"][0]["ids"]
        for side, runs in gen.items():
            g = [t for r in runs for t in r["generate_s"]]
            p = [t for r in runs for t in r["prefill_s"]]
            lines.append(f"| {side} | {meta['new_tokens'] / min(g):.2f} | {', '.join(f'{t:.3f}' for t in g)} | "
                         f"{', '.join(f'{t:.3f}' for t in p)} | {gib(max(r['peak_rss'] for r in runs))} | "
                         f"{all(r['ids'] == ref for r in runs)} |")
        lines.append("")
    if found:
        lines += findings_report(found)
    lines += ["## Sampler", "", "BucketBatchSampler vs random step time on a length-varied set: "
              "`benchmarks/bench_sampler.py`, results in `benchmarks/sampler_results.md`.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "train": train, "generate": gen,
                                                    "findings": found or {}}, indent=1) + "\n")
    print("\n".join(lines))


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a.add_argument("--worker")
    a.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a.add_argument("--config", default=str(REPO / "mm_convert/data/qwen2_5_vl_3b.json"))
    a.add_argument("--llm-layers", type=int, help="LLM layers kept (default: 2 on CPU, all on CUDA)")
    a.add_argument("--vit-layers", type=int, help="vision blocks kept (default: 2 on CPU, all on CUDA)")
    a.add_argument("--samples", type=int, default=4)
    a.add_argument("--micro-batch", type=int, default=2)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--warmup", type=int, default=1)
    a.add_argument("--steps", type=int, default=3)
    a.add_argument("--rounds", type=int, default=1)
    a.add_argument("--new-tokens", type=int, help="default: 32 on CPU, 128 on CUDA")
    a.add_argument("--gen-runs", type=int, default=3)
    a.add_argument("--sides", default="transformers,ours,ours-packed,ours-alternating",
                   help="ours-alternating: padded and packed steps alternating in one process (the packed / padded "
                        "ratio without the machine's drift between processes)")
    a.add_argument("--what", help="train,generate,findings (CPU default: train,generate); generate (CUDA default); "
                   "findings: each change of docs/performance.md's runtime section before / after, in isolation")
    a.add_argument("--finding-reps", type=int, default=3)
    a.add_argument("--workdir", help="keep the checkpoints here (reused by later runs)")
    a.add_argument("--baseline", metavar="COMMIT", help="also train with the runtime of this commit (a git worktree "
                   "in the workdir), side 'ours@COMMIT': the before of a before / after")
    a.add_argument("--profile", action="store_true", help="one more training step per side under torch.profiler; "
                   "the operator tables go to the workdir (profile_<side>.txt)")
    a.add_argument("--out", help="results file stem (default benchmarks/runtime_results, _cuda on CUDA)")
    args = a.parse_args()
    if args.worker:
        return worker(args.worker)
    cuda = args.device == "cuda"
    # CUDA: the whole 3B (shape-real) in bf16, generation only by default: a short run (a few minutes)
    cut = (None, None) if cuda else (2, 2)
    args.llm_layers = args.llm_layers if args.llm_layers is not None else cut[0]
    args.vit_layers = args.vit_layers if args.vit_layers is not None else cut[1]
    args.new_tokens = args.new_tokens or (128 if cuda else 32)
    args.what = args.what or ("generate" if cuda else "train,generate")
    args.out = args.out or str(REPO / "benchmarks" / ("runtime_results_cuda" if cuda else "runtime_results"))
    dtype = "bfloat16" if cuda else "float32"
    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_runtime_")
        work = Path(tmp.name)
    t0 = time.monotonic()
    hf, mm = build_model(work, Path(args.config), args.llm_layers, args.vit_layers, dtype)
    print(f"checkpoints ready in {time.monotonic() - t0:.0f} s", flush=True)
    import torch
    samples = make_samples(hf, args.samples)
    torch.save(samples, work / "samples.pt")
    base = {"hf": str(hf), "mm": str(mm), "samples": str(work / "samples.pt"), "threads": args.threads,
            "device": args.device, "dtype": dtype, "micro_batch": args.micro_batch, "warmup": args.warmup,
            "steps": args.steps, "new_tokens": args.new_tokens, "gen_runs": args.gen_runs}
    sides = args.sides.split(",")
    train: dict = {s: [] for s in sides} if "train" in args.what else {}
    gen: dict = {s: [] for s in sides if s in ("transformers", "ours")} if "generate" in args.what else {}
    dirs = {}
    if args.baseline:
        rev = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        tree = work / f"baseline-{rev}"
        if not tree.exists():
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=REPO, check=True,
                           capture_output=True)
        side = f"ours@{rev}"
        train = {side: [], **train} if train else train
        dirs[side] = str(tree / "train")
    found: dict = {n: {v: [] for v in FINDINGS[n][1]} for n in FINDINGS} if "findings" in args.what else {}
    for r in range(args.rounds):
        for name, variants in found.items():
            for v in variants:
                res = run_worker({**base, "kind": "finding", "side": f"{name}-{v}", "finding": name, "variant": v,
                                  "reps": args.finding_reps}, work)
                variants[v].append(res)
                print(f"round {r} finding {name} {v}: {[round(t, 3) for t in res['times']]} s, peak over inputs "
                      f"{gib(res['peak_over_setup'])} GiB", flush=True)
        for s in train:
            prof = {"profile": str(work / f"profile_{s}.txt")} if args.profile and r == 0 else {}
            kind = "train:ours" if s.startswith("ours@") else f"train:{s}"
            res = run_worker({**base, "kind": kind, "side": s, "train_dir": dirs.get(s), **prof}, work)
            train[s].append(res)
            print(f"round {r} train {s}: steps {[round(t, 2) for t in res['step_s']]} s, peak RSS "
                  f"{gib(res['peak_rss'])} GiB, losses {[round(x, 5) for x in res['losses']]}", flush=True)
        for s in gen:
            res = run_worker({**base, "kind": f"generate:{s}", "side": s}, work)
            gen[s].append(res)
            print(f"round {r} generate {s}: {[round(t, 3) for t in res['generate_s']]} s for {args.new_tokens} tokens, "
                  f"prefill {[round(t, 3) for t in res['prefill_s']]} s", flush=True)
    cfg = json.loads((hf / "config.json").read_text())
    lens = [len(s["input_ids"]) for s in samples]
    meta = {"command": "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:]),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "commit": git_commit(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, torch "
                       f"{torch.__version__}, transformers {__import__('transformers').__version__}, "
                       f"Python {platform.python_version()}",
            "device": f"CUDA ({torch.cuda.get_device_name()}), bf16" if cuda else "CPU, fp32",
            "model": f"{Path(args.config).name} cut to {cfg['num_hidden_layers']} LLM layers and "
                     f"{cfg['vision_config']['depth']} vision blocks (full attention: "
                     f"{cfg['vision_config']['fullatt_block_indexes']}), hidden {cfg['hidden_size']}, vocab "
                     f"{cfg['vocab_size']}, {'bf16' if cuda else 'fp32'}, random weights",
            "samples_desc": f"{len(samples)} image+text samples of {lens} tokens (images "
                            f"{[tuple(s['image_grid_thw'][0].tolist()) for s in samples]} patches), micro-batch "
                            f"{args.micro_batch}, one global batch of {len(samples)} per step",
            "threads": args.threads, "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
            "new_tokens": args.new_tokens}
    report(meta, train, gen, Path(args.out), found)
    for tree in dirs.values():
        subprocess.run(["git", "worktree", "remove", "--force", str(Path(tree).parent)], cwd=REPO, capture_output=True)
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
