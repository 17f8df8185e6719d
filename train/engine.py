"""Training engine: this rank's pipeline positions as trainable modules, one micro-batch forward + backward
through TP and PP, gradient reduction over DP (and the tied embedding copies), global grad norm.

Schedule: ``forward_backward`` runs one micro-batch forward through every position, then backward in reverse;
``forward`` then ``backward`` for all micro-batches is GPipe (micro-batches overlap across stages, activations
of all of them are held). ``train_step`` runs a step's micro-batches in the order of a schedule of
train/schedule.py: 1F1B (at most pp - stage micro-batches in flight), GPipe or sequential, all bit-identical.
Stages exchange tensors of whatever shape the micro-batch has, with a header, so variable sequence lengths need
no global padding. The loss is the sum of token cross-entropies divided by the number of
label tokens of the whole global batch (``denom``), so accumulated micro-batches and DP ranks add up to one
token-mean, like transformers' loss over the same samples.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

from mm_convert.errors import LayoutError
from mm_convert.layout import ParallelLayout
from mm_convert.models.base import trainable_group
from mm_convert.plan import slot_name

from .config import ModelConfig, spec_of
from .model import Expert, ImageEncoder, MoE, TextDecoder, check_divisible
from .pipeline import forward_positions, load_stages
from .recompute import Recompute
from .parallel import ColumnLinear, Group, ParallelState, RowLinear, VocabEmbedding, densify_grad, init_parallel
from .parallel import recv_tensors, send_tensors


CHUNK = 1 << 22  # elements per piece of a squared norm


def squared_norm(t: torch.Tensor) -> torch.Tensor:
    """Sum of squares in float64: each 4M-element piece summed in its own dtype (torch's cascade sum: ~1e-7
    relative), the pieces added in float64; no full-size temporary (a float64 copy of a 151936 x 2048
    embedding gradient is 2.5 GB)."""
    flat = t.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    for piece in flat.split(CHUNK):
        total += piece.square().sum().double()
    return total


def fp32_copy(t: torch.Tensor) -> torch.Tensor:
    """A loaded tensor as the fp32 training copy: one copy (a bf16 tensor's ``float()``), not a clone first."""
    return t.clone() if t.dtype == torch.float32 else t.float()


class TrainModel:
    def __init__(self, cfg: ModelConfig, layout: ParallelLayout, mm_dir, *, dp_size: int = 1,
                 train_vit: bool = False, train_projector: bool = True, train_llm: bool = True,
                 recompute: dict[str, Recompute] | None = None, ps: ParallelState | None = None):
        """``recompute``: the policy of each module, "vision" and "llm" (none by default)."""
        check_divisible(cfg, layout)
        if dp_size % layout.ep_size:
            raise LayoutError(f"the checkpoint's ep_size {layout.ep_size} must divide the data-parallel size {dp_size} "
                              f"(world / (tp x pp)); start a multiple of {layout.ep_size} x tp x pp ranks")
        self.cfg, self.layout, self.spec = cfg, layout, spec_of(cfg)
        self.ps = ps or init_parallel(layout.tp_size, layout.pp_size, layout.vit_tp_size, dp_size, layout.ep_size)
        self.last = layout.last_position("llm")
        self.emb_group = self._embedding_group()
        self.stages, self.save_dtype = load_stages(cfg, layout, mm_dir, self.ps, prepare=fp32_copy)
        trains = {"vision": train_vit, "projector": train_projector, "llm": train_llm}
        for stage in self.stages.values():  # saves keep the checkpoint's dtype (save_dtype); training runs in fp32
            stage.train()
            stage.returns_loss = True  # the summed token loss instead of the logits (model.token_loss)
            for name, p in stage.named_parameters():
                p.requires_grad_(trains[trainable_group(self.spec, name)])
            for m in stage.modules():
                if isinstance(m, ImageEncoder):
                    m.recompute = (recompute or {}).get("vision", Recompute())
                if isinstance(m, TextDecoder):
                    m.recompute = (recompute or {}).get("llm", Recompute())
                if isinstance(m, MoE):
                    m.shared_tokens = False  # each data-parallel rank brings its own tokens
                if isinstance(m, VocabEmbedding):
                    m.sparse_grad = True  # the rows of the micro-batch's tokens (reduce_grads makes it dense)
        # experts differ between the ranks of an EP group: their gradients are reduced over the ranks holding
        # the same experts (expert data parallel), everything else over all data-parallel ranks
        self.experts = {id(p) for s in self.stages.values() for m in s.modules() if isinstance(m, Expert)
                        for p in m.parameters()}
        self.replicas = {id(p): self._replicas(n, p, s) for s in self.stages.values() for n, p in s.named_parameters()}
        dist.barrier()

    # ---- parameters ------------------------------------------------------------------------------------------
    def named_parameters(self):
        """(slot, name, param) in a fixed order: the optimizer's parameter order, the save's keys."""
        for v in range(self.layout.vpp_size):
            pos = self.layout.position(v, self.ps.pp_rank)
            for n, p in self.stages[pos].named_parameters():
                yield slot_name(v, self.layout.vpp_size), n, p

    def parameters(self):
        return [p for _, _, p in self.named_parameters() if p.requires_grad]

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        out: dict = {}
        for slot, n, p in self.named_parameters():
            out.setdefault(slot, {})[n] = p.detach().clone()
        return out

    def _replicas(self, name: str, p, stage) -> float:
        """How many ranks of this data-parallel replica hold the same tensor (0: a copy counted elsewhere), so the
        global grad norm counts each distinct parameter once."""
        owner = stage.get_submodule(name.rsplit(".", 1)[0])
        split = (isinstance(owner, (ColumnLinear, VocabEmbedding)) or type(owner).__name__ == "OutputLayer"
                 or (isinstance(owner, RowLinear) and name.endswith("weight")))
        if name == self.spec.TIED_PAIR[1] and (self.emb_group is not None or self._tied_on_one_stage()):
            return 0  # the tied embedding's copy on the last stage
        if trainable_group(self.spec, name) in ("vision", "projector"):
            return self.ps.vit_ratio if split else self.ps.tp_size
        if id(p) in getattr(self, "experts", ()):
            return 1 / self.layout.ep_size  # dp / ep copies of each expert, where other tensors have dp
        return 1 if split else self.ps.tp_size

    def _tied_on_one_stage(self) -> bool:
        """Tied embeddings, pp > 1, and the LLM's first and last positions on one stage: that stage holds both
        the embedding and its output-layer copy (MindSpeed-MM writes the copy whenever pp > 1)."""
        lo = self.layout
        return (self.cfg.text.tie_word_embeddings and lo.pp_size > 1
                and lo.first_position("llm") % lo.pp_size == self.last % lo.pp_size)

    def _embedding_group(self) -> Group | None:
        """Tied embeddings with the output layer on another stage: first and last LLM stage each hold a copy
        whose gradients must be summed (Megatron's embedding group)."""
        lo, ps = self.layout, self.ps
        first, last = lo.first_position("llm") % lo.pp_size, self.last % lo.pp_size
        if not self.cfg.text.tie_word_embeddings or first == last:
            return None
        mine = None
        for d in range(ps.dp_size):
            for t in range(ps.tp_size):
                base = d * ps.tp_size * ps.pp_size
                ranks = [base + first * ps.tp_size + t, base + last * ps.tp_size + t]
                g = dist.new_group(ranks)
                if ps.rank in ranks:
                    mine = Group(g, ranks.index(ps.rank), 2)
        return mine

    # ---- one micro-batch -------------------------------------------------------------------------------------
    def owner(self, pos: int) -> int:
        return pos % self.layout.pp_size

    def forward_backward(self, batch: dict, denom: float, autocast_dtype=None) -> torch.Tensor | None:
        """Forward and backward of one micro-batch; gradients accumulate in .grad. Returns the summed token
        loss (detached, before division) on the last LLM stage, None elsewhere."""
        return self.backward(self.forward(batch, denom, autocast_dtype))

    def forward(self, batch: dict, denom: float, autocast_dtype=None) -> dict:
        """Forward of one micro-batch through this rank's positions (receiving from / sending to the
        neighbouring stages). Returns what its backward needs. Several forwards may run before their backwards
        (GPipe: the next stage works on micro-batch m while this one computes m + 1), in the same order on
        every rank, so the blocking sends and receives always pair up."""
        saved: dict = {}
        loss = None

        def run(pos: int, payload: dict) -> dict:
            nonlocal loss
            inputs = dict(payload)
            payload, pos_loss = self._run_position(pos, payload, batch, autocast_dtype)
            loss = pos_loss if pos == self.last else loss
            saved[pos] = (inputs, payload)
            return payload

        forward_positions(self.ps, self.layout, self.last, run)
        return {"saved": saved, "loss": loss, "denom": denom}

    def _run_position(self, pos: int, payload: dict, batch: dict, autocast_dtype) -> tuple[dict, torch.Tensor | None]:
        """One position's forward: its output payload, and at the last LLM position the summed token loss."""
        with torch.autocast(self.ps.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            payload = self.stages[pos](dict(payload), batch, None)
        loss = None
        if pos == self.last:  # the summed token loss: the last position computes it (model.token_loss)
            loss = payload.pop("loss")
        return payload, loss

    def backward(self, ctx: dict) -> torch.Tensor | None:
        """Backward of a micro-batch ``forward`` returned, positions in reverse."""
        me, ps = self.ps.pp_rank, self.ps
        for pos in sorted(ctx["saved"], reverse=True):
            inputs, outputs = ctx["saved"][pos]
            if pos == self.last:
                (ctx["loss"] / ctx["denom"]).backward()
            elif self.owner(pos + 1) != me:
                grads = recv_tensors(ps.global_rank(ps.tp_rank, self.owner(pos + 1)), ps.device)
                outs = [outputs[k] for k in grads]
                if outs:
                    torch.autograd.backward(outs, [grads[k] for k in grads])
            if pos > 0 and self.owner(pos - 1) != me:
                back = {k: (t.grad if t.grad is not None else torch.zeros_like(t))
                        for k, t in inputs.items() if t.requires_grad}
                send_tensors(back, ps.global_rank(ps.tp_rank, self.owner(pos - 1)), ps.device)
        ctx["saved"].clear()
        return ctx["loss"].detach() if ctx["loss"] is not None else None

    # ---- all micro-batches of a step, by a pipeline schedule (train/schedule.py) ---------------------------------
    def train_step(self, batches: Sequence[dict], denom: float, autocast_dtype=None, schedule: str = "1f1b",
                   prepare: Callable[[dict], dict] | None = None) -> list[torch.Tensor | None]:
        """Forward and backward of every micro-batch of a step in ``schedule``'s order ("1f1b", "gpipe",
        "sequential"); gradients accumulate in .grad, each unit's backwards in micro-batch order, so every
        schedule gives bit-identical gradients. ``prepare`` maps a micro-batch before its first forward here
        (e.g. to the device; it is dropped after its last backward). Returns each micro-batch's summed token
        loss (detached) on the last LLM stage, None elsewhere. ``self.peak_in_flight``: the most forward
        contexts (micro-batch, position) this rank held at once."""
        from .schedule import programs, units

        ps, pp = self.ps, self.layout.pp_size
        unit_pos = units(pp, self.last)
        program = programs(schedule, pp, self.layout.vpp_size, len(batches), len(unit_pos))[ps.pp_rank]
        last_use = {op[1]: i for i, op in enumerate(program) if op[0] in ("F", "B")}
        ready: dict = {}   # micro-batch -> its batch, prepared
        inbox: dict = {}   # ("act" | "grad", m, u) -> tensors received
        outbox: dict = {}  # ("act" | "grad", m, u) -> tensors to send
        saved: dict = {}   # (m, u) -> (inputs, outputs, loss): what the unit's backward needs
        losses: list = [None] * len(batches)
        self.peak_in_flight = 0
        for i, op in enumerate(program):
            if op[0] == "recv":
                inbox[op[1:4]] = recv_tensors(ps.global_rank(ps.tp_rank, op[4]), ps.device)
            elif op[0] == "send":
                send_tensors(outbox.pop(op[1:4]), ps.global_rank(ps.tp_rank, op[4]), ps.device)
            elif op[0] == "F":
                _, m, u = op
                if m not in ready:
                    ready[m] = prepare(batches[m]) if prepare else batches[m]
                payload = inbox.pop(("act", m, u), {})
                inputs, loss = dict(payload), None
                for pos in unit_pos[u]:
                    payload, pos_loss = self._run_position(pos, payload, ready[m], autocast_dtype)
                    loss = pos_loss if pos == self.last else loss
                saved[m, u] = (inputs, payload, loss)
                self.peak_in_flight = max(self.peak_in_flight, len(saved))
                if u + 1 < len(unit_pos):
                    outbox["act", m, u + 1] = payload
            else:  # "B": as ``backward`` does for one position
                _, m, u = op
                inputs, outputs, loss = saved.pop((m, u))
                if loss is not None:
                    (loss / denom).backward()
                    losses[m] = loss.detach()
                else:
                    grads = inbox.pop(("grad", m, u))
                    outs = [outputs[k] for k in grads]
                    if outs:
                        torch.autograd.backward(outs, [grads[k] for k in grads])
                if u > 0:
                    outbox["grad", m, u - 1] = {k: (t.grad if t.grad is not None else torch.zeros_like(t))
                                                for k, t in inputs.items() if t.requires_grad}
                if last_use[m] == i:
                    ready.pop(m, None)
        return losses

    # ---- after the micro-batches -----------------------------------------------------------------------------
    def grad_group(self, p) -> Group | None:
        """The ranks whose gradients of ``p`` are summed: with expert parallelism an expert's are summed over the
        ranks holding the same experts (expert data parallel), everything else over data parallel (None: a
        group of one)."""
        if id(p) in self.experts and self.layout.ep_size > 1:
            return self.ps.expert_dp
        return self.ps.dp

    def reduce_grads(self) -> None:
        """Sum gradients over DP replicas and over the two copies of a tied embedding."""
        params = self.parameters()
        for p in params:
            densify_grad(p)  # the embedding's sparse rows
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for p in params:
            group = self.grad_group(p)
            if group is not None:
                dist.all_reduce(p.grad, group=group.group)
        if self.emb_group is not None:
            for _, n, p in self.named_parameters():
                if n in self.spec.TIED_PAIR:
                    dist.all_reduce(p.grad, group=self.emb_group.group)
        elif self._tied_on_one_stage():  # both copies here: each gets the sum
            copies = [p for _, n, p in self.named_parameters() if n in self.spec.TIED_PAIR and p.requires_grad]
            if len(copies) == 2:
                total = copies[0].grad + copies[1].grad
                for p in copies:
                    p.grad.copy_(total)

    def grad_norm(self) -> float:
        sq = torch.zeros((), dtype=torch.float64, device=self.ps.device)
        for p in self.parameters():
            r = self.replicas[id(p)]
            if r:
                sq += squared_norm(p.grad) / r
        dist.all_reduce(sq)  # every rank of every replica; replicas hold the same reduced gradients
        return float(sq.item() / self.ps.dp_size) ** 0.5

    def clip_grads(self, max_norm: float) -> float:
        norm = self.grad_norm()
        if max_norm > 0 and norm > max_norm:
            coef = max_norm / (norm + 1e-6)
            for p in self.parameters():
                p.grad.mul_(coef)
        return norm

