"""Process groups, point-to-point activation transfer and the tensor-parallel layers.

Ranks are Megatron-ordered: ``rank = pp_rank * tp_size + tp_rank`` (TP fastest), so the ranks of one
pipeline stage are contiguous. Launch with torchrun (or ``train.launch``): RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT come from the environment.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def pick_backend() -> tuple[str, torch.device]:
    """hccl on Ascend when torch_npu imports, nccl on CUDA, gloo on CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    try:
        import torch_npu  # noqa: F401  (registers the "npu" device)
        if torch.npu.is_available():
            torch.npu.set_device(local_rank)
            return "hccl", torch.device("npu", local_rank)
    except ImportError:
        pass
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return "nccl", torch.device("cuda", local_rank)
    return "gloo", torch.device("cpu")


@dataclass
class Group:
    """One TP group as seen from this rank (``group`` is None when it has a single member: no comm)."""
    group: object
    rank: int
    size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group; the backward is the identity (each rank's input got the whole sum)."""
        if self.size > 1:
            if torch.is_grad_enabled() and x.requires_grad:
                return _ReduceFwd.apply(x, self)
            dist.all_reduce(x, group=self.group)
        return x

    def copy_in(self, x: torch.Tensor) -> torch.Tensor:
        """Identity forward; the backward sums the input gradient over the group (Megatron's "f"): a
        replicated input feeding split weights gets a partial gradient from each rank."""
        if self.size > 1 and torch.is_grad_enabled() and x.requires_grad:
            return _ReduceBwd.apply(x, self)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        if torch.is_grad_enabled() and x.requires_grad:
            return _GatherLast.apply(x, self)
        return _gather_last(x, self)


def _gather_last(x: torch.Tensor, g: "Group") -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(g.size)]
    dist.all_gather(parts, x.contiguous(), group=g.group)
    return torch.cat(parts, dim=-1)


class _ReduceFwd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g):
        x = x.clone()
        dist.all_reduce(x, group=g.group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ReduceBwd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g):
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.g.group)
        return grad, None


class _GatherLast(torch.autograd.Function):
    """All-gather along the last dim; the backward keeps this rank's slice of the (identical) gradient."""
    @staticmethod
    def forward(ctx, x, g):
        ctx.g, ctx.n = g, x.shape[-1]
        return _gather_last(x, g)

    @staticmethod
    def backward(ctx, grad):
        r = ctx.g.rank
        return grad[..., r * ctx.n:(r + 1) * ctx.n].contiguous(), None


@dataclass
class ParallelState:
    rank: int
    world_size: int
    tp_size: int
    pp_size: int
    device: torch.device
    tp: Group   # the LLM's TP group (all tp ranks of this stage)
    vit: Group  # the vision encoder's TP group (smaller when vit_tp_size < tp_size)
    dp: Group | None = None  # data-parallel replicas of this rank's shard (training)
    vit_ratio: int = 1       # tp_size // vit_tp_size: ranks holding the same vision slice
    ep: Group | None = None  # expert parallel: contiguous groups of ep_size data-parallel ranks, each with other experts
    expert_dp: Group | None = None  # the ranks holding the same experts (same ep rank in every EP group): their grads

    @property
    def ep_rank(self) -> int:
        return self.ep.rank if self.ep else 0

    @property
    def dp_size(self) -> int:
        return self.dp.size if self.dp else 1

    @property
    def dp_rank(self) -> int:
        return self.dp.rank if self.dp else 0

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank % (self.tp_size * self.pp_size) // self.tp_size

    def global_rank(self, tp_rank: int, pp_rank: int) -> int:
        """Global rank of (tp_rank, pp_rank) in this rank's data-parallel replica."""
        return self.dp_rank * self.tp_size * self.pp_size + pp_rank * self.tp_size + tp_rank


def init_parallel(tp_size: int, pp_size: int, vit_tp_size: int = 0, dp_size: int = 1, ep_size: int = 1) -> ParallelState:
    """Join the process group and build the TP (and DP, EP) groups. Every rank creates every group (torch
    requires it). rank = dp_rank * tp * pp + pp_rank * tp + tp_rank: each data-parallel replica is a contiguous
    block; EP groups are ep_size consecutive data-parallel replicas (ep rank = dp_rank % ep_size)."""
    backend, device = pick_backend()
    if not dist.is_initialized():
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    mp = tp_size * pp_size
    if world != mp * dp_size:
        raise RuntimeError(f"world size {world} != tp_size {tp_size} x pp_size {pp_size} x dp_size {dp_size}")
    vit_tp = vit_tp_size or tp_size
    ratio = tp_size // vit_tp
    dp_rank, local = divmod(rank, mp)
    pp_rank, tp_rank = divmod(local, tp_size)
    tp = vit = None
    for d in range(dp_size):
        for p in range(pp_size):
            base = d * mp + p * tp_size
            g = dist.new_group([base + t for t in range(tp_size)]) if tp_size > 1 else None
            if (d, p) == (dp_rank, pp_rank):
                tp = Group(g, tp_rank, tp_size)
            # vision weights are replicated over ``ratio`` neighbours: reduce among ranks holding distinct slices
            for o in range(ratio):
                vranks = [base + o + k * ratio for k in range(vit_tp)]
                vg = (g if ratio == 1 else dist.new_group(vranks)) if vit_tp > 1 else None
                if (d, p) == (dp_rank, pp_rank) and tp_rank % ratio == o:
                    vit = Group(vg, tp_rank // ratio, vit_tp)
    dp = ep = None
    if dp_size % ep_size:
        raise RuntimeError(f"ep_size {ep_size} must divide the data-parallel size {dp_size}")
    if dp_size > 1:
        for l in range(mp):
            g = dist.new_group([d * mp + l for d in range(dp_size)])
            if l == local:
                dp = Group(g, dp_rank, dp_size)
            if ep_size > 1:
                for k in range(dp_size // ep_size):
                    members = [d * mp + l for d in range(k * ep_size, (k + 1) * ep_size)]
                    g = g if ep_size == dp_size else dist.new_group(members)
                    if rank in members:
                        ep = Group(g, dp_rank % ep_size, ep_size)
    expert_dp = None
    if ep_size > 1 and dp_size > ep_size:
        for l in range(mp):
            for e in range(ep_size):
                members = [d * mp + l for d in range(e, dp_size, ep_size)]
                g = dist.new_group(members)
                if rank in members:
                    expert_dp = Group(g, members.index(rank), len(members))
    return ParallelState(rank, world, tp_size, pp_size, device, tp, vit, dp, ratio, ep, expert_dp)


# ---- expert parallelism: the tokens of an EP group (each rank its own batch) to every rank's experts ------------

def row_counts(rows: int, g: Group, device) -> list[int]:
    """Every rank's row count (ranks' batches differ in length)."""
    n = torch.tensor([rows], dtype=torch.long, device=device)
    counts = [torch.zeros_like(n) for _ in range(g.size)]
    dist.all_gather(counts, n, group=g.group)
    return [int(c.item()) for c in counts]


def gather_rows(x: torch.Tensor, g: Group, sizes: list[int]) -> torch.Tensor:
    """All ranks' rows, in rank order (``sizes``: every rank's row count)."""
    top = max(sizes)
    padded = torch.zeros((top,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(g.size)]
    dist.all_gather(parts, padded.contiguous(), group=g.group)
    return torch.cat([p[:k] for p, k in zip(parts, sizes)])


class GatherRows(torch.autograd.Function):
    """Forward: the EP group's rows (every rank gets all); backward: the gradients of this rank's rows summed
    over the ranks (each rank's experts contributed to them)."""
    @staticmethod
    def forward(ctx, x, g, sizes):
        ctx.g, ctx.sizes = g, sizes
        return gather_rows(x, g, sizes)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.g.group)
        start = sum(ctx.sizes[:ctx.g.rank])
        return grad[start:start + ctx.sizes[ctx.g.rank]], None, None


class ScatterSum(torch.autograd.Function):
    """Forward: every rank's partial output for all the group's rows, summed, then this rank's rows; backward:
    the gradients of each rank's rows gathered, since every rank's partial fed all of them."""
    @staticmethod
    def forward(ctx, z, g, sizes):
        z = z.contiguous().clone()
        dist.all_reduce(z, group=g.group)
        ctx.g, ctx.sizes = g, sizes
        start = sum(sizes[:g.rank])
        return z[start:start + sizes[g.rank]]

    @staticmethod
    def backward(ctx, grad):
        return gather_rows(grad.contiguous(), ctx.g, ctx.sizes), None, None


# ---- activations between pipeline stages --------------------------------------------------------------------
# A stage hands the next one a dict of named tensors whose shapes vary (image size, prompt length, decode
# step), so a pickled header (names, dtypes, shapes) goes first, then the tensors themselves.

def send_tensors(tensors: dict[str, torch.Tensor], dst: int, device: torch.device) -> None:
    header = pickle.dumps([(k, str(v.dtype).removeprefix("torch."), tuple(v.shape), v.requires_grad)
                           for k, v in tensors.items()])
    buf = torch.frombuffer(bytearray(header), dtype=torch.uint8).to(device)
    dist.send(torch.tensor([buf.numel()], dtype=torch.long, device=device), dst)
    dist.send(buf, dst)
    for v in tensors.values():
        dist.send(v.detach().contiguous(), dst)


def recv_tensors(src: int, device: torch.device) -> dict[str, torch.Tensor]:
    n = torch.empty(1, dtype=torch.long, device=device)
    dist.recv(n, src)
    buf = torch.empty(int(n.item()), dtype=torch.uint8, device=device)
    dist.recv(buf, src)
    out = {}
    for name, dtype, shape, grad in pickle.loads(buf.cpu().numpy().tobytes()):
        out[name] = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.recv(out[name], src)
        out[name].requires_grad_(grad and torch.is_grad_enabled())  # training: a leaf whose grad goes back
    return out


# ---- tensor-parallel layers (weights are this rank's slice, named as in the MM checkpoint) ------------------

class ColumnLinear(nn.Module):
    """Output features split over TP ranks; input replicated, output stays split (no communication)."""

    def __init__(self, in_features: int, out_local: int, bias: bool, group: Group | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_local, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_local), requires_grad=False) if bias else None
        self.group = group

    def forward(self, x):
        return F.linear(self.group.copy_in(x) if self.group else x, self.weight, self.bias)


class RowLinear(nn.Module):
    """Input features split; partial products summed over the group, the (replicated) bias added once after."""

    def __init__(self, in_local: int, out_features: int, bias: bool, group: Group):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_local), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.group = group

    def forward(self, x):
        y = self.group.all_reduce(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y


class VocabEmbedding(nn.Module):
    """Rows [rank * V/tp, (rank+1) * V/tp) of the table; ids outside give zeros, the all-reduce fills them in.
    With ``sparse_grad`` (training sets it) its gradient is sparse, the rows of the micro-batch's tokens: added in
    place into the dense gradient of a tied output layer, never a (vocab x hidden) table of zeros per micro-batch;
    ``densify_grad`` makes it dense before the reductions and the optimizer."""

    sparse_grad = False

    def __init__(self, vocab_local: int, hidden: int, group: Group):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_local, hidden), requires_grad=False)
        self.group = group

    def forward(self, ids):
        if self.group.size == 1:
            return F.embedding(ids, self.weight, sparse=self.sparse_grad)
        start = self.group.rank * self.weight.shape[0]
        local = ids - start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight, sparse=self.sparse_grad)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.group.all_reduce(out)


def densify_grad(p: torch.Tensor) -> None:
    """A sparse gradient (the embedding's) as the dense tensor the reductions and the optimizer take."""
    if p.grad is not None and p.grad.is_sparse:
        p.grad = p.grad.to_dense()


class _OutputLinear(torch.autograd.Function):
    """h @ W^T whose weight gradient is accumulated straight into ``W.grad`` (Megatron's gradient accumulation
    fusion): the output layer's (vocab x hidden) gradient is not a separate tensor per micro-batch, added to
    ``.grad`` afterwards."""

    @staticmethod
    def forward(ctx, h, weight):
        ctx.save_for_backward(h)
        ctx.weight = weight
        return F.linear(h, weight)

    @staticmethod
    def backward(ctx, grad):
        (h,), weight = ctx.saved_tensors, ctx.weight
        grad_h = grad @ weight if ctx.needs_input_grad[0] else None
        if ctx.needs_input_grad[1]:
            g2, h2 = grad.reshape(-1, grad.shape[-1]), h.reshape(-1, h.shape[-1])
            if weight.grad is None:
                weight.grad = g2.t() @ h2
            elif weight.grad.is_sparse:  # the tied embedding's rows came first
                weight.grad = torch.addmm(weight.grad.to_dense(), g2.t(), h2)
            else:
                weight.grad.addmm_(g2.t(), h2)
        return grad_h, None


def output_linear(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if (torch.is_grad_enabled() and weight.requires_grad and weight.is_leaf and h.dtype == weight.dtype
            and not torch.is_autocast_enabled(h.device.type)):
        return _OutputLinear.apply(h, weight)
    return F.linear(h, weight)


def vocab_logits(h: torch.Tensor, weight: torch.Tensor, group: Group) -> torch.Tensor:
    """Logits from a vocab slice of the output (or tied embedding) weight, gathered over TP so that every
    rank of the last stage holds all of them."""
    return group.all_gather_last(output_linear(group.copy_in(h), weight))
