"""check_grads: one training step of the tp x pp engine against transformers on the same micro-batch.

The parent computes transformers' loss and parameter gradients, starts the ranks (``python -m
mm_train.check_grads JOB.json``), which run forward + backward and write their gradients as an MM checkpoint
(same shard keys as the weights). ``mm_to_hf`` then gathers and renames them exactly as it does weights, so
every gradient is compared under its HF name.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import tempfile
from pathlib import Path

import torch

from mm_convert.formats.mm import write_tracker
from mm_convert.layout import ParallelLayout

from .batch import label_tokens, to_device
from .config import ModelConfig
from .launch import launch_local, worker_main
from .recompute import Recompute


def hf_loss_and_grads(hf_dir, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    from .check_logits import reference_class

    model = reference_class(hf_dir).from_pretrained(hf_dir, dtype=torch.float32).train()
    ids = batch["input_ids"]
    kw = {"input_ids": ids, "labels": batch["labels"], "attention_mask": (batch["attention_mask"])}
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:  # the models with mrope take them
        kw["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
    if "pixel_values" in batch:
        kw["pixel_values"] = batch["pixel_values"]
        if "image_grid_thw" in batch:
            kw["image_grid_thw"] = batch["image_grid_thw"]
    loss = model(**kw).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def engine_loss_and_grads(mm_dir, hf_dir, cfg: ModelConfig, layout: ParallelLayout, batch: dict,
                          timeout: float = 600, recompute: dict | None = None,
                          dp_batches: list[dict] | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    """Run the ranks; return their loss and their gradients under transformers' parameter names (plus the
    engine's global grad norm under ``<grad_norm>``). ``dp_batches``: one batch per data-parallel rank (their
    union is ``batch``), e.g. to train with expert parallelism, whose EP ranks are data-parallel ranks."""
    from mm_convert.converter import converter_for

    from .check_logits import reference_class
    from .config import read_hf_config

    from .checkpoint import with_vocab_rows

    layout = with_vocab_rows(layout, cfg, mm_dir)  # a padded vocabulary, read off the shards
    with tempfile.TemporaryDirectory(prefix="mm_grads_") as tmp:
        batches = dp_batches or [batch]
        torch.save([{k: v for k, v in b.items() if k != "attention_mask"} for b in batches], Path(tmp, "batch.pt"))
        job = {"mm_dir": str(mm_dir), "config": cfg.to_dict(), "layout": layout.to_dict(), "batch": f"{tmp}/batch.pt",
               "out": f"{tmp}/grads",
               "recompute": {k: dataclasses.asdict(v) for k, v in (recompute or {}).items()}}
        Path(tmp, "job.json").write_text(json.dumps(job))
        launch_local("mm_train.check_grads", [f"{tmp}/job.json"], layout.tp_size * layout.pp_size * len(batches),
                     timeout=timeout)
        write_tracker(Path(job["out"]), "release")
        converter_for(read_hf_config(hf_dir)[0], progress=False).mm_to_hf(job["out"], f"{tmp}/hf", hf_dir=hf_dir)
        grads = reference_class(hf_dir).from_pretrained(f"{tmp}/hf", dtype=torch.float32)
        out = torch.load(f"{tmp}/loss.pt", weights_only=True)
        named = {n: p.detach().clone() for n, p in grads.named_parameters()}
        named["<grad_norm>"] = torch.tensor(out["grad_norm"])  # the engine's global norm, for the caller
        return out["loss"], named


def _worker(job_path: str) -> None:
    from .engine import TrainModel
    from mm_convert.plan import shard_path as rel_shard

    import torch.distributed as dist

    job = json.loads(Path(job_path).read_text())
    layout = ParallelLayout.create(**job["layout"])
    batches = torch.load(job["batch"], weights_only=True)
    tm = TrainModel(ModelConfig.from_dict(job["config"]), layout, job["mm_dir"], dp_size=len(batches), train_vit=True,
                    recompute={k: Recompute(**v) for k, v in job["recompute"].items()})
    ps = tm.ps
    denom = float(sum(label_tokens(b) for b in batches))
    batch = to_device(batches[ps.dp_rank], ps.device)
    loss = tm.forward_backward(batch, denom)
    tm.reduce_grads()
    grads: dict = {}
    for slot, n, p in tm.named_parameters():
        grads.setdefault(slot, {})[n] = p.grad.detach().clone()
    if ps.dp_rank < layout.ep_size:  # one file per TP x PP (x EP) rank, like a save
        path = Path(job["out"]) / rel_shard(ps.tp_rank, ps.pp_rank, layout.pp_size, ps.ep_rank, layout.ep_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**grads, "checkpoint_version": 3.0}, path)
    norm = tm.grad_norm()  # every rank takes part
    total = torch.tensor(float(loss) if loss is not None and ps.tp_rank == 0 else 0.0, dtype=torch.float64,
                         device=ps.device)
    dist.all_reduce(total)  # the token losses of every data-parallel rank's batch
    if ps.rank == 0:
        torch.save({"loss": float(total / denom), "grad_norm": norm}, Path(job["out"]).parent / "loss.pt")


if __name__ == "__main__":
    worker_main(_worker, sys.argv[1])
