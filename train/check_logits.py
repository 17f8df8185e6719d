"""check_logits: transformers on the HF checkpoint vs. the runtime on the MM checkpoint, on the same inputs.

The parent builds the inputs (chat template, image patches), runs transformers, frees it, then starts the
tp x pp runtime ranks locally (``python -m mm_train.check_logits JOB.json``, torchrun-compatible) and compares
the logits they write. ``run_local`` is the same machinery for other tasks (generation).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from mm_convert.errors import VerifyError
from mm_convert.layout import ParallelLayout

from .checkpoint import read_shard, shard_path, with_vocab_rows
from .config import ModelConfig, spec_of
from .inputs import build_inputs, hf_kwargs, load_processors
from .launch import launch_local, worker_main
from .model import check_divisible

DEFAULT_PROMPT = "Describe this image."


def default_image():
    """A fixed 112x84 random image: exercises several attention windows and a non-square grid."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.RandomState(0).randint(0, 256, (84, 112, 3), dtype=np.uint8))


def check_logits(mm_dir, hf_dir, tp_size: int | None = None, llm_pp_layers=None, vit_pp_layers=None,
                 tolerance: float = 1e-5, *, vit_tp_size: int | None = None, ep_size: int | None = None, image=None,
                 prompt: str = DEFAULT_PROMPT, text_only: bool = True, processor_dir=None, timeout: float = 1800,
                 log=print) -> float:
    """Max abs logit difference over an image+text input (and a text-only one); VerifyError above tolerance.

    Layout values left None are read off the MM checkpoint (as mm_to_hf does). image: a PIL image or a path
    (default: a fixed random image). processor_dir: where the tokenizer and image processor files are
    (default hf_dir)."""
    cfg = ModelConfig.from_hf(hf_dir)
    if None in (tp_size, llm_pp_layers, vit_pp_layers, vit_tp_size, ep_size):
        from mm_convert.converter import converter_for

        from .config import read_hf_config

        found = converter_for(read_hf_config(hf_dir)[0], progress=False).layout_of(mm_dir, hf_dir)
        tp_size = found.tp_size if tp_size is None else tp_size
        llm_pp_layers = [list(c) for c in found.llm_pp_layers] if llm_pp_layers is None else llm_pp_layers
        vit_pp_layers = [list(c) for c in found.vit_pp_layers] if vit_pp_layers is None else vit_pp_layers
        vit_tp_size = found.vit_tp_size if vit_tp_size is None else vit_tp_size
        ep_size = found.ep_size if ep_size is None else ep_size
    layout = ParallelLayout.create(tp_size, llm_pp_layers, vit_pp_layers, vit_tp_size, ep_size=ep_size)
    layout = with_vocab_rows(layout, cfg, mm_dir)  # a padded vocabulary, read off the shards
    check_divisible(cfg, layout)  # before the (possibly long) transformers run
    tok, improc = load_processors(processor_dir or hf_dir)
    cases = {"image+text": build_inputs(tok, improc, cfg, prompt, image if image is not None else default_image())}
    if text_only:
        cases["text"] = build_inputs(tok, improc, cfg, prompt)
    ref = hf_logits(hf_dir, cases, shard_dtype(mm_dir, layout))
    got = run_local(mm_dir, cfg, layout, cases, [{"kind": "logits", "case": name} for name in cases], timeout=timeout)
    worst = 0.0
    for (name, ref_logits), logits in zip(ref.items(), got):
        diff = (logits.float() - ref_logits).abs().max().item()
        worst = max(worst, diff)
        log(f"{name}: {ref_logits.shape[1]} tokens, max |logits difference| = {diff:.3e} ({layout.describe()})")
    if not worst <= tolerance:  # also catches NaN
        raise VerifyError(f"runtime logits on {mm_dir} differ from transformers on {hf_dir} by {worst:.3e} "
                          f"(tolerance {tolerance:.1e}, {layout.describe()})")
    return worst


def shard_dtype(mm_dir, layout: ParallelLayout) -> torch.dtype:
    """The dtype the runtime computes in: that of the first floating tensor of the first shard."""
    state = read_shard(shard_path(mm_dir, 0, 0, layout.pp_size, 0, layout.ep_size), layout.vpp_size)[0]
    return next(t.dtype for t in state.values() if t.is_floating_point())


def hf_logits(hf_dir, cases: dict, dtype: torch.dtype | str = "auto") -> dict[str, torch.Tensor]:
    """transformers' logits (as float32) for each input, computed in ``dtype`` (the runtime's, so that both
    round alike); the model is freed before the runtime starts."""
    model = reference_class(hf_dir).from_pretrained(hf_dir, dtype=dtype).eval()
    with torch.inference_mode():
        out = {name: model(**hf_kwargs(c)).logits.float() for name, c in cases.items()}
    del model
    return out


def reference_class(hf_dir):
    """transformers' model class of the checkpoint's family (the spec names it)."""
    import transformers

    from .config import read_hf_config

    cfg = read_hf_config(hf_dir)[0]
    return getattr(transformers, spec_of(ModelConfig.from_hf(cfg)).HF_CLASSES[cfg["model_type"]][1])


def run_local(mm_dir, cfg: ModelConfig, layout: ParallelLayout, cases: dict, tasks: list[dict], *,
              timeout: float = 1800) -> list:
    """Start the tp x pp runtime ranks here and run ``tasks`` on ``cases`` (name -> build_inputs output).

    A task is {"kind": "logits", "case": name} (result: logits tensor) or {"kind": "generate", "case": name,
    "generation": GenerationConfig fields[, "record_logits": True]} (result: list of new token ids, or with
    record_logits {"ids": ..., "logits": (steps, vocab)}). Results come back in task order."""
    with tempfile.TemporaryDirectory(prefix="mm_check_") as tmp:
        torch.save(cases, Path(tmp, "inputs.pt"))
        job = {"mm_dir": str(mm_dir), "config": cfg.to_dict(), "layout": layout.to_dict(),
               "inputs": str(Path(tmp, "inputs.pt")),
               "tasks": [{**t, "out": str(Path(tmp, f"task{i}.pt"))} for i, t in enumerate(tasks)]}
        Path(tmp, "job.json").write_text(json.dumps(job))
        launch_local("mm_train.check_logits", [str(Path(tmp, "job.json"))], layout.model_ranks,
                     timeout=timeout)
        return [torch.load(t["out"], weights_only=True) for t in job["tasks"]]


def run_tasks(job_path: str) -> None:
    """Worker: one rank of the runtime. Only the sampler rank (TP 0 of the last LLM stage) writes results."""
    from .generate import GenerationConfig, generate
    from .runtime import Runtime

    job = json.loads(Path(job_path).read_text())
    rt = Runtime(ModelConfig.from_dict(job["config"]), ParallelLayout.create(**job["layout"]), job["mm_dir"])
    cases = torch.load(job["inputs"], weights_only=True)
    writer = rt.ps.rank == rt.sampler_rank  # one rank writes (EP replicas compute the same logits)
    for task in job["tasks"]:
        inputs = cases[task["case"]]
        if task["kind"] == "logits":
            rt.reset_cache(False)
            result = rt.step(rt.to_device(inputs))
            result = result.cpu() if writer else None
        elif task["kind"] == "generate":
            logits = [] if task.get("record_logits") else None
            result = generate(rt, inputs, GenerationConfig.from_dict(task.get("generation")), logits)
            if logits is not None and writer:
                result = {"ids": result, "logits": torch.stack(logits)}
        else:
            raise ValueError(f"unknown task kind {task['kind']!r}")
        if writer:
            torch.save(result, task["out"])


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.exists(sys.argv[1]):
        sys.exit("usage: python -m mm_train.check_logits JOB.json  (a rank of run_local; use check_logits() instead)")
    worker_main(run_tasks, sys.argv[1])
