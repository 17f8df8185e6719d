"""The optimizer of a run: AdamW over the trainable parameters, weight decay on matrices only (Megatron's
grouping: biases and norm weights are not decayed)."""
from __future__ import annotations

import torch


def make_optimizer(args, tm) -> torch.optim.Optimizer:
    decay = [p for _, n, p in tm.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for _, n, p in tm.named_parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)
