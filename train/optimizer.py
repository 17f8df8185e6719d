"""The optimizer of a run: AdamW over the trainable parameters, weight decay on matrices only (Megatron's
grouping: biases and norm weights are not decayed). With ``--use-distributed-optimizer`` its state is sharded
over the data-parallel ranks (dist_optimizer.py), with the same arithmetic. Both use torch's per-tensor AdamW
(``foreach=False``): the multi-tensor one may differ from it in the last bit, and the two must not differ."""
from __future__ import annotations

import torch


def decay_groups(tm) -> tuple[list, list]:
    """(slot, name, param) of the trainable parameters, decayed and not, in the optimizer's order (a replicated
    AdamW state_dict numbers its parameters through the first list, then the second)."""
    decay = [(s, n, p) for s, n, p in tm.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [(s, n, p) for s, n, p in tm.named_parameters() if p.requires_grad and p.ndim <= 1]
    return decay, no_decay


def make_optimizer(args, tm):
    if getattr(args, "use_distributed_optimizer", False):
        from .dist_optimizer import DistributedOptimizer
        return DistributedOptimizer(args, tm)
    decay, no_decay = decay_groups(tm)
    return torch.optim.AdamW([{"params": [p for _, _, p in decay], "weight_decay": args.weight_decay},
                              {"params": [p for _, _, p in no_decay], "weight_decay": 0.0}],
                             lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                             foreach=False)
