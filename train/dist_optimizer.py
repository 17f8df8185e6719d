"""Megatron's distributed optimizer (ZeRO-1) for ``--use-distributed-optimizer``: the AdamW state is sharded
over the data-parallel ranks.

Scheme (Megatron's): the trainable parameters of each model chunk (``model``, or ``model0``, ``model1``... with
VPP) are laid end to end in a flat buffer, in ``TrainModel.named_parameters`` order; the buffer is padded to a
multiple of the replica group's size G and rank r owns elements [r * S, (r + 1) * S), S = ceil(N / G). A range
may cut a parameter anywhere. Each rank holds exp_avg and exp_avg_sq for its range only (two flat fp32 tensors of
S elements per buffer, instead of N). The parameters themselves are fp32 in this runtime (the checkpoint's dtype
is only the save dtype, bf16 runs use autocast), so they are their own master weights, as with the replicated
optimizer: no extra copy is kept.

A step: the gradients are summed over DP as before (``TrainModel.reduce_grads``, an all-reduce: every rank has
the whole sum) and clipped with the global norm (unchanged); each rank runs ``torch.optim.AdamW`` on 1-d views
of its range of the parameters (the owned pieces, ``foreach=False``, the per-tensor implementation the
replicated optimizer is also forced to), then the ranges are all-gathered so every rank holds all the updated
weights. AdamW is elementwise, so each element sees exactly the arithmetic of the replicated optimizer: losses,
weights and state are bit-identical to it (tests/test_dist_optimizer.py). Weight decay follows ``make_optimizer``:
pieces of matrices are decayed, of biases and norm weights not.

Expert parallelism: each expert's parameters are replicated over the expert-data-parallel group (the ranks
holding the same experts, over which ``reduce_grads`` sums their gradients); they go into separate buffers
sharded over that group, the dense ones over the whole DP group (Megatron's second, expert optimizer). Where
``reduce_grads`` sums expert gradients over no group (ep == dp) expert parameters stay unsharded: each rank
steps its own copy, as the replicated optimizer does. Without EP (ep 1) experts are summed and sharded over DP.

Checkpoint (Megatron's legacy torch format, ``get_parameter_state_dp_zero`` / ``save_parameter_state``): at a
save the shards of each buffer are gathered on rank 0 of its group, which writes ``distrib_optim.pt`` beside
``model_optim_rng.pt`` in its ``mp_rank_*`` directory (saving.py). Its content, one dict per optimizer::

    {"buckets_coalesced": True,
     <gbuf index 0, 1, ...: one per model chunk with trainable parameters>:
         {(torch.float32, torch.float32):            # (param dtype, grad dtype)
             {"param": fp32[numel_unpadded],          # the weights (fp32 masters)
              "exp_avg": fp32[numel_unpadded], "exp_avg_sq": fp32[numel_unpadded],
              "numel_unpadded": int,
              "param_map": [{"slot": "model", "name": <converter's key>, "shape": [...],
                             "start": int, "end": int}, ...]}},   # where each parameter lies (not in Megatron)
     "mm_train": {"optimizer": "distributed", "format_version": 1, "group": "dp" | "expert_dp",
                  "group_size": G, "shard_numel": [S of each gbuf]}}

With expert parameters the file holds a list ``[dense, expert]`` (Megatron's ChainedOptimizer), with None for an
optimizer whose group rank 0 is not the writer (the dense state is in the EP rank 0 directory). The per-parameter
state is not in ``model_optim_rng.pt``: its ``optimizer`` is ``state_dict()``, ``{"kind": "distributed",
"optimizer": {"param_groups": [AdamW's group options without "params", with "step"]}}`` (plus saving.py's
``master``). Loading reads ``param_map`` by name, so any DP size can load the file, and the replicated optimizer
can load it too (and this one a replicated save): saving.load converts.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .parallel import Group

STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")
DTYPE_KEY = (torch.float32, torch.float32)  # (param dtype, grad dtype) of every buffer here
FORMAT_VERSION = 1


def _step_tensor(value: float = 0.0) -> torch.Tensor:
    """AdamW's per-parameter step counter, as torch.optim makes it (a CPU scalar of the default float type)."""
    return torch.tensor(value, dtype=torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32)


class FlatBuffer:
    """The trainable parameters of one model chunk replicated over one group, end to end; this rank's range."""

    def __init__(self, entries: list[tuple[str, str, torch.nn.Parameter]], group: Group | None, device):
        self.entries, self.group = entries, group
        self.size = group.size if group else 1
        self.rank = group.rank if group else 0
        self.starts, n = [], 0
        for _, _, p in entries:
            self.starts.append(n)
            n += p.numel()
        self.numel = n
        self.shard = -(-n // self.size)
        lo, hi = self.rank * self.shard, (self.rank + 1) * self.shard
        self.exp_avg = torch.zeros(self.shard, dtype=torch.float32, device=device)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.pieces: list[tuple[int, int, int, int]] = []  # (entry, start in the param, end, start in the shard)
        for i, ((_, _, p), s) in enumerate(zip(entries, self.starts)):
            a, b = max(lo, s), min(hi, s + p.numel())
            if a < b:
                self.pieces.append((i, a - s, b - s, a - lo))

    def pack_params(self) -> torch.Tensor:
        """This rank's range of the weights, padding zero."""
        out = torch.zeros(self.shard, dtype=torch.float32, device=self.exp_avg.device)
        for i, a, b, off in self.pieces:
            out[off:off + b - a] = self.entries[i][2].detach().view(-1)[a:b]
        return out

    @torch.no_grad()
    def all_gather_params(self) -> None:
        if self.size == 1:
            return
        parts = [torch.empty_like(self.exp_avg) for _ in range(self.size)]
        dist.all_gather(parts, self.pack_params(), group=self.group.group)
        world = torch.cat(parts)
        for (_, _, p), s in zip(self.entries, self.starts):
            p.view(-1).copy_(world[s:s + p.numel()])

    def gather_state(self) -> dict | None:
        """Megatron's per-gbuf dict on the group's rank 0 (None elsewhere): the shards concatenated, padding cut."""
        mine = {"param": self.pack_params(), "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}
        root = self.rank == 0
        out: dict = {}
        for key in STATE_KEYS:
            if self.size == 1:
                world = mine[key]
            else:
                parts = [torch.empty_like(self.exp_avg) for _ in range(self.size)] if root else None
                dst = dist.get_process_group_ranks(self.group.group)[0]
                dist.gather(mine[key].contiguous(), parts, dst=dst, group=self.group.group)
                world = torch.cat(parts) if root else None
            if root:
                out[key] = world[:self.numel].cpu().clone()
        if not root:
            return None
        out["numel_unpadded"] = self.numel
        out["param_map"] = [{"slot": slot, "name": name, "shape": list(p.shape), "start": s, "end": s + p.numel()}
                            for (slot, name, p), s in zip(self.entries, self.starts)]
        return {DTYPE_KEY: out}


class DistributedOptimizer:
    """AdamW with its state sharded over the data-parallel ranks; the loop uses it like ``torch.optim.AdamW``
    (``param_groups`` for the learning rate, ``zero_grad``, ``step``); saving.py uses ``state_dict``,
    ``parameter_state`` and ``load_parameter_state``."""

    kind = "distributed"

    def __init__(self, args, tm):
        ps = tm.ps
        self.buffers: dict[str, list[FlatBuffer]] = {"dense": [], "expert": []}
        self.groups = {"dense": ps.dp, "expert": ps.expert_dp if tm.layout.ep_size > 1 else ps.dp}
        self.params = [p for _, _, p in tm.named_parameters() if p.requires_grad]
        by: dict[tuple[str, str], list] = {}
        for slot, n, p in tm.named_parameters():
            if p.requires_grad:
                if not p.is_contiguous():
                    p.data = p.data.contiguous()
                by.setdefault(("expert" if id(p) in tm.experts else "dense", slot), []).append((slot, n, p))
        slots = list(dict.fromkeys(slot for slot, _, _ in tm.named_parameters()))
        for kind in self.buffers:
            for slot in slots:
                if (kind, slot) in by:
                    self.buffers[kind].append(FlatBuffer(by[kind, slot], self.groups[kind], ps.device))
        self.has_experts = bool(self.buffers["expert"])
        decay, no_decay = [], []
        self._pieces: list[tuple[torch.Tensor, torch.nn.Parameter, int, int]] = []
        state = {}
        for buf in self.all_buffers():
            for i, a, b, off in buf.pieces:
                p = buf.entries[i][2]
                view = p.detach().view(-1)[a:b]
                self._pieces.append((view, p, a, b))
                (decay if p.ndim > 1 else no_decay).append(view)
                state[view] = {"step": _step_tensor(), "exp_avg": buf.exp_avg[off:off + b - a],
                               "exp_avg_sq": buf.exp_avg_sq[off:off + b - a]}
        self.inner = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                        {"params": no_decay, "weight_decay": 0.0}],
                                       lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                                       foreach=False)
        for view, s in state.items():  # the state lives in the flat shards: AdamW updates them in place
            self.inner.state[view] = s
        self.steps = 0

    def all_buffers(self) -> list[FlatBuffer]:
        return self.buffers["dense"] + self.buffers["expert"]

    # ---- what the loop uses --------------------------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        for view, _, _, _ in self._pieces:
            view.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """This rank's range steps (the gradients are the DP sum already), then every rank gets all weights."""
        for view, p, a, b in self._pieces:
            view.grad = None if p.grad is None else p.grad.reshape(-1)[a:b]
        self.inner.step()
        self.steps += 1
        for buf in self.all_buffers():
            buf.all_gather_params()

    def state_numel(self) -> int:
        """Elements of exp_avg held by this rank (exp_avg_sq holds as many)."""
        return sum(b.exp_avg.numel() for b in self.all_buffers())

    # ---- checkpoint ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The state that is not per parameter (Megatron's DistributedOptimizer.state_dict): group options, step."""
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "step": self.steps} for g in self.inner.param_groups]
        return {"kind": self.kind, "optimizer": {"param_groups": groups}}

    def covers(self) -> set[int]:
        """ids of the parameters whose weights and state ``parameter_state`` holds."""
        return {id(p) for b in self.all_buffers() for _, _, p in b.entries}

    def parameter_state(self):
        """Collective over each buffer's group: what this rank writes as distrib_optim.pt (the dense dict, or
        ``[dense, expert]`` with expert parameters; None for an optimizer this rank is not the root of)."""
        out = []
        for kind in ("dense", "expert") if self.has_experts else ("dense",):
            bufs = self.buffers[kind]
            gathered = [b.gather_state() for b in bufs]
            group = self.groups[kind]
            if group is not None and group.rank != 0:
                out.append(None)
                continue
            state: dict = {"buckets_coalesced": True}
            for i, g in enumerate(gathered):
                state[i] = g
            state["mm_train"] = {"optimizer": self.kind, "format_version": FORMAT_VERSION,
                                 "group": "dp" if kind == "dense" else "expert_dp",
                                 "group_size": group.size if group else 1, "shard_numel": [b.shard for b in bufs]}
            out.append(state)
        return out if self.has_experts else out[0]

    @torch.no_grad()
    def load_parameter_state(self, lookup, step: int, saved_groups: list[dict] | None) -> None:
        """``lookup(slot, name)``: that parameter's saved {"exp_avg", "exp_avg_sq"} (flat fp32; "param" is
        restored by the caller, on every rank); this rank copies its ranges. ``saved_groups``: the saved AdamW
        group options (restored like torch's load_state_dict does), ``step``: the steps taken."""
        for buf in self.all_buffers():
            for i, a, b, off in buf.pieces:
                slot, name, _ = buf.entries[i]
                st = lookup(slot, name)
                for key, dst in (("exp_avg", buf.exp_avg), ("exp_avg_sq", buf.exp_avg_sq)):
                    dst[off:off + b - a].copy_(st[key].reshape(-1)[a:b])
        for s in self.inner.state.values():
            s["step"].fill_(float(step))
        self.steps = int(step)
        if saved_groups is not None:
            if len(saved_groups) != len(self.inner.param_groups):
                raise ValueError(f"the save has {len(saved_groups)} optimizer groups, this run {len(self.inner.param_groups)}")
            for g, saved in zip(self.inner.param_groups, saved_groups):
                g.update({k: v for k, v in saved.items() if k not in ("params", "step")})


def index_parameter_state(state) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """{(slot, name): {"param", "exp_avg", "exp_avg_sq"} flat views} of a distrib_optim.pt object written here
    (a dict, or a list of dicts and Nones)."""
    out = {}
    for opt in state if isinstance(state, list) else [state]:
        if opt is None:
            continue
        for gbuf, by_dtype in opt.items():
            if not isinstance(gbuf, int):
                continue
            for world in by_dtype.values():
                for e in world["param_map"]:
                    out[e["slot"], e["name"]] = {k: world[k][e["start"]:e["end"]] for k in STATE_KEYS}
    return out
