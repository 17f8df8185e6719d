"""Training saves in the MM layout: ``<save>/iter_NNNNNNN/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`` plus
``latest_checkpointed_iteration.txt``, so ``mm_to_hf`` / ``resplit`` read them like converted weights.

One file per TP x PP (x EP) rank (written by data-parallel rank 0, or with EP the first EP group's ranks; the
other replicas are identical):
  {"model" (or "model0", ...): weights under the converter's keys, in the checkpoint's dtype,
   "checkpoint_version": 3.0, "iteration": N,
   "optimizer": {"adamw": AdamW state_dict, "master": fp32 weights when the saved dtype is lower},
   "opt_param_scheduler": {...}, "rng_state": [one dict per DP rank], "data_state": {...}, "args": {...}}
``--no-save-optim`` / ``--no-save-rng`` leave out "optimizer" / "rng_state"; the iteration, scheduler and data
position are always kept, so a run resumed without optimizer state still continues the data where it was.
Everything is tensors, dicts, lists, numbers and strings: ``torch.load(weights_only=True)`` reads it.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mm_convert.formats.mm import TRACKER, iteration_dir_name, load_torch_file, resolve_iteration_dir
from mm_convert.plan import shard_path as rel_shard


def rng_state() -> dict:
    """Python, numpy and torch RNG states as plain lists and numbers (they travel by all_gather_object)."""
    ver, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"random": [ver, list(state), gauss], "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(s: dict) -> None:
    ver, state, gauss = s["random"]
    random.setstate((ver, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))


STAGING = ".saving"  # suffix of an iteration directory being written
ASIDE = ".replaced"  # suffix of a complete iteration directory moved aside while its replacement moves in


def recover(save_dir) -> list[str]:
    """Make a save directory consistent after a crash (rank 0, before loading): an iteration moved aside while
    being replaced comes back if its replacement never arrived; staging directories of saves that never
    finished are removed. Returns what was done, one line each."""
    root = Path(save_dir)
    done = []
    if not root.is_dir():
        return done
    for d in sorted(root.glob(f"iter_*{ASIDE}")):
        final = d.with_name(d.name[: -len(ASIDE)])
        try:
            if final.exists():
                shutil.rmtree(d)
            else:
                os.replace(d, final)
                done.append(f"{final}: restored (a save replacing it was interrupted)")
        except FileNotFoundError:
            pass  # another rank did it
    for d in sorted(root.glob(f"iter_*{STAGING}")):
        shutil.rmtree(d, ignore_errors=True)
        done.append(f"{d}: removed, an interrupted save that never completed")
    return done


def save(save_dir, iteration: int, tm, optimizer, scheduler: dict, data_state: dict, args: dict, *,
         save_optim: bool = True, save_rng: bool = True) -> Path:
    """Every rank writes its shard into ``iter_NNNNNNN.saving/``; once all are there, rank 0 renames it to
    ``iter_NNNNNNN`` and only then moves the tracker: a crash at any moment leaves the tracker naming a
    complete iteration (the staging directory is removed by ``recover`` at the next start)."""
    ps = tm.ps
    root = Path(save_dir)
    it_dir = root / iteration_dir_name(iteration)
    stage = it_dir.with_name(it_dir.name + STAGING)
    if ps.rank == 0:
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
    dist.barrier()
    rngs = [None] * ps.dp_size
    if save_rng:  # every DP rank's RNG goes into the file its replica 0 writes
        if ps.dp is not None:
            dist.all_gather_object(rngs, rng_state(), group=ps.dp.group)
        else:
            rngs = [rng_state()]
    ep = tm.layout.ep_size
    if ps.dp_rank < ep:  # data-parallel replica 0 (with EP: the first EP group, one file per EP rank)
        obj: dict = {}
        master: dict = {}
        for slot, n, p in tm.named_parameters():
            obj.setdefault(slot, {})[n] = p.detach().to(tm.save_dtype).clone()
            if tm.save_dtype != torch.float32:
                master.setdefault(slot, {})[n] = p.detach().clone()
        obj.update({"checkpoint_version": 3.0, "iteration": iteration, "args": args,
                    "opt_param_scheduler": scheduler, "data_state": data_state})  # small: always kept
        if save_optim:
            obj["optimizer"] = {"adamw": optimizer.state_dict(), "master": master}
        if save_rng:
            obj["rng_state"] = rngs
        path = stage / rel_shard(ps.tp_rank, ps.pp_rank, tm.layout.pp_size, ps.ep_rank, ep)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, path)  # a reader never sees half a file
    dist.barrier()
    if ps.rank == 0:  # every shard is in: the iteration moves into place, then the tracker follows
        aside = it_dir.with_name(it_dir.name + ASIDE)
        if it_dir.exists():  # the same iteration saved before (a rerun): replaced as a whole
            os.replace(it_dir, aside)
        os.replace(stage, it_dir)
        shutil.rmtree(aside, ignore_errors=True)
        tmp = root / (TRACKER + ".tmp")
        tmp.write_text(f"{iteration}\n")
        os.replace(tmp, root / TRACKER)
    dist.barrier()
    return it_dir


def is_own_save(obj) -> bool:
    """A save this trainer wrote (its optimizer, scheduler and RNG formats), not another trainer's."""
    optim = obj.get("optimizer")
    rngs = obj.get("rng_state")
    return (type(obj.get("iteration")) is int and "data_state" in obj
            and (optim is None or (isinstance(optim, dict) and {"adamw", "master"} <= optim.keys()))
            and (not rngs or all(isinstance(r, dict) and {"random", "numpy", "torch"} <= r.keys() for r in rngs)))


def load(load_dir, tm, optimizer, *, load_optim: bool = True, load_rng: bool = True) -> dict:
    """Weights are already in ``tm`` (it reads the same file). Restores the optimizer (and the fp32 master
    weights), RNG and returns {"iteration", "scheduler", "data_state"}; a ``release`` checkpoint starts at 0."""
    ps = tm.ps
    it_dir = resolve_iteration_dir(load_dir, "--load")
    if it_dir.name == "release":
        return {"iteration": 0, "scheduler": None, "data_state": None}
    obj = load_torch_file(it_dir / rel_shard(ps.tp_rank, ps.pp_rank, tm.layout.pp_size, ps.ep_rank, tm.layout.ep_size))
    if not is_own_save(obj):
        # a Megatron / MindSpeed-MM training save: its weights are in tm already; its optimizer, scheduler and
        # RNG are another trainer's formats, so fine-tuning starts from it like from a release (Megatron's --finetune)
        if ps.rank == 0:
            print(f"[load] {it_dir}: a training save of another trainer (Megatron / MindSpeed-MM); its weights are "
                  f"loaded, its optimizer, scheduler and RNG state are not; starting at iteration 0", flush=True)
        return {"iteration": 0, "scheduler": None, "data_state": None}
    out = {"iteration": int(obj["iteration"]), "scheduler": obj.get("opt_param_scheduler"),
           "data_state": obj.get("data_state")}
    if load_optim and "optimizer" in obj:
        with torch.no_grad():
            for slot, n, p in tm.named_parameters():
                m = obj["optimizer"]["master"].get(slot, {}).get(n)
                if m is not None:
                    p.copy_(m)
        optimizer.load_state_dict(obj["optimizer"]["adamw"])
    if load_rng and obj.get("rng_state") and len(obj["rng_state"]) == ps.dp_size:
        set_rng_state(obj["rng_state"][ps.dp_rank])
    return out
