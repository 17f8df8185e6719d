"""Training saves in the MM layout: ``<save>/iter_NNNNNNN/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`` plus
``latest_checkpointed_iteration.txt``, so ``mm_to_hf`` / ``resplit`` read them like converted weights.

One file per TP x PP (x EP) rank (written by data-parallel rank 0, or with EP the first EP group's ranks; the
other replicas are identical):
  {"model" (or "model0", ...): weights under the converter's keys, in the checkpoint's dtype,
   "checkpoint_version": 3.0, "iteration": N,
   "optimizer": {"kind": "replicated", "adamw": AdamW state_dict, "master": fp32 weights when the saved dtype is
                 lower},
   "opt_param_scheduler": {...}, "rng_state": [one dict per DP rank], "data_state": {...}, "args": {...}}
With ``--use-distributed-optimizer`` "optimizer" is ``{"kind": "distributed", "optimizer": {"param_groups":
[options and "step"]}, "master": fp32 weights of the frozen parameters when the saved dtype is lower}`` and the
weights (fp32) and AdamW state of the trainable parameters are gathered from the DP ranks into
``distrib_optim.pt`` beside the file (Megatron's legacy format, dist_optimizer.py describes it). A save without
"kind" is a replicated one (written before the distributed optimizer existed). Either optimizer loads either
kind of save (any DP size): the per-parameter state is mapped by name.
``--no-save-optim`` / ``--no-save-rng`` leave out "optimizer" (and distrib_optim.pt) / "rng_state"; the
iteration, scheduler and data position are always kept, so a run resumed without optimizer state still continues
the data where it was. Everything is tensors, dicts, lists, numbers, strings and dtypes: ``torch.load(weights_only=
True)`` reads it.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mm_convert.errors import CheckpointError
from mm_convert.formats.mm import TRACKER, iteration_dir_name, load_torch_file, resolve_iteration_dir
from mm_convert.plan import shard_path as rel_shard

from .dist_optimizer import index_parameter_state
from .optimizer import decay_groups

DISTRIB_OPTIM = "distrib_optim.pt"  # Megatron's name (get_distributed_optimizer_checkpoint_name), beside the shard


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
    distributed = getattr(optimizer, "kind", None) == "distributed"
    # the distributed optimizer's shards are gathered on rank 0 of each group: every rank takes part
    param_state = optimizer.parameter_state() if save_optim and distributed else None
    ep = tm.layout.ep_size
    if ps.dp_rank < ep:  # data-parallel replica 0 (with EP: the first EP group, one file per EP rank)
        obj: dict = {}
        master: dict = {}
        covered = optimizer.covers() if distributed else set()  # fp32 weights in distrib_optim.pt
        for slot, n, p in tm.named_parameters():
            obj.setdefault(slot, {})[n] = p.detach().to(tm.save_dtype).clone()
            if tm.save_dtype != torch.float32 and id(p) not in covered:
                master.setdefault(slot, {})[n] = p.detach().clone()
        obj.update({"checkpoint_version": 3.0, "iteration": iteration, "args": args,
                    "opt_param_scheduler": scheduler, "data_state": data_state})  # small: always kept
        if save_optim:
            obj["optimizer"] = ({**optimizer.state_dict(), "master": master} if distributed else
                                {"kind": "replicated", "adamw": optimizer.state_dict(), "master": master})
        if save_rng:
            obj["rng_state"] = rngs
        path = stage / rel_shard(ps.tp_rank, ps.pp_rank, tm.layout.pp_size, ps.ep_rank, ep)
        path.parent.mkdir(parents=True, exist_ok=True)
        if param_state is not None:  # gathered here: the dense state on DP rank 0, the experts' on their group's rank 0
            _atomic_save(param_state, path.with_name(DISTRIB_OPTIM))
        _atomic_save(obj, path)
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


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a reader never sees half a file


def is_own_save(obj) -> bool:
    """A save this trainer wrote (its optimizer, scheduler and RNG formats), not another trainer's."""
    optim = obj.get("optimizer")
    rngs = obj.get("rng_state")
    return (type(obj.get("iteration")) is int and "data_state" in obj
            and (optim is None or (isinstance(optim, dict) and ({"adamw", "master"} <= optim.keys() or (
                optim.get("kind") == "distributed" and {"optimizer", "master"} <= optim.keys()))))
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
        _load_optimizer(it_dir, obj["optimizer"], tm, optimizer)
    if load_rng and obj.get("rng_state") and len(obj["rng_state"]) == ps.dp_size:
        set_rng_state(obj["rng_state"][ps.dp_rank])
    return out


def _load_optimizer(it_dir: Path, saved: dict, tm, optimizer) -> None:
    """Weights (fp32 masters) and AdamW state from either kind of save into either optimizer: the same kind
    loads its own way, across kinds the per-parameter state is converted by name (a gather or a scatter)."""
    ps = tm.ps
    with torch.no_grad():
        for slot, n, p in tm.named_parameters():
            m = saved["master"].get(slot, {}).get(n)
            if m is not None:
                p.copy_(m)
    distributed = getattr(optimizer, "kind", None) == "distributed"
    if saved.get("kind", "replicated") == "replicated":
        if not distributed:
            optimizer.load_state_dict(saved["adamw"])
            return
        adamw = saved["adamw"]
        by_name = {}
        for params, group in zip(decay_groups(tm), adamw["param_groups"]):
            if len(params) != len(group["params"]):
                raise CheckpointError(f"{it_dir}: its optimizer state covers {len(group['params'])} parameters of a "
                                      f"group where this run trains {len(params)} (other frozen modules?); match "
                                      f"the freeze flags or load with --no-load-optim")
            for (slot, n, _), i in zip(params, group["params"]):
                by_name[slot, n] = adamw["state"].get(i)
        steps = [float(s["step"]) for s in adamw["state"].values()]
        optimizer.load_parameter_state(_lookup(it_dir, by_name), int(steps[0]) if steps else 0,
                                       adamw["param_groups"])
        return
    # a distributed save: the dense state is in EP rank 0's directory, the experts' in this EP rank's
    shards = {}
    for ep_rank in dict.fromkeys((0, ps.ep_rank)):
        rel = Path(rel_shard(ps.tp_rank, ps.pp_rank, tm.layout.pp_size, ep_rank, tm.layout.ep_size)).parent / DISTRIB_OPTIM
        if not (it_dir / rel).exists():
            raise CheckpointError(f"{it_dir / rel}: missing; the save was written with --use-distributed-optimizer "
                                  f"and its optimizer state is there (load with --no-load-optim to start it afresh)")
        state = load_torch_file(it_dir / rel)
        if isinstance(state, list) and ep_rank != ps.ep_rank:
            state = state[:1]  # only the dense optimizer of EP rank 0's file
        elif isinstance(state, list) and ep_rank != 0:
            state = state[1:]
        shards.update(index_parameter_state(state))
    lookup = _lookup(it_dir, shards)
    with torch.no_grad():  # every rank restores all the fp32 weights, not only its range
        for slot, n, p in tm.named_parameters():
            if p.requires_grad:
                p.copy_(lookup(slot, n)["param"].view(p.shape))
    groups = saved["optimizer"]["param_groups"]
    step = int(groups[0]["step"]) if groups else 0
    if distributed:
        optimizer.load_parameter_state(lookup, step, groups)
        return
    names = {id(p): (slot, n) for slot, n, p in tm.named_parameters()}
    sd: dict = {"state": {}, "param_groups": []}
    for group, saved_group in zip(optimizer.param_groups, groups):
        ids = []
        for p in group["params"]:
            st = lookup(*names[id(p)])
            ids.append(len(sd["state"]))
            sd["state"][ids[-1]] = {"step": torch.tensor(float(step), dtype=torch.float32),
                                    "exp_avg": st["exp_avg"].view_as(p).clone(),
                                    "exp_avg_sq": st["exp_avg_sq"].view_as(p).clone()}
        sd["param_groups"].append({**{k: v for k, v in saved_group.items() if k != "step"}, "params": ids})
    optimizer.load_state_dict(sd)


def _lookup(it_dir: Path, by_name: dict):
    """(slot, name) -> the saved state of a trainable parameter; one line naming it when the save lacks it."""
    def get(slot: str, name: str):
        st = by_name.get((slot, name))
        if st is None:
            raise CheckpointError(f"{it_dir}: no optimizer state for {slot}.{name}, which this run trains (it was "
                                  f"frozen?); match the freeze flags or load with --no-load-optim")
        return st
    return get
