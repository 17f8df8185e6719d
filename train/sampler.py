"""BucketBatchSampler: micro-batches of similar token counts on every data-parallel rank at every step.

Samples are shuffled with a seed (the same permutation on every rank), cut into windows of
``bucket_steps`` global steps, sorted by token count inside a window, and cut into steps of
``dp * micro_batch_size`` neighbours, so all ranks of a step get samples of about the same length; the
steps are then shuffled (same seed) so that lengths do not rise monotonically through an epoch.

data.json's ``dataloader_param``: ``shuffle`` false keeps the data order, the same every epoch: the random
sampler is then sequential (samples 0..k-1 on rank 0, the next k on rank 1, ...); the bucket sampler takes its
windows in data order and keeps its steps in window order (inside a window steps still go by length, shortest
first: that is the bucketing). ``drop_last`` false keeps the last partial step (fewer samples than
``dp * micro_batch_size``) as the epoch's last step, its samples dealt round-robin over the ranks, so a rank may get
fewer than ``micro_batch_size`` samples or none (``train.dataset.Data.batch`` gives such a rank a filler sample
whose labels are all -100: it counts for nothing).
"""
from __future__ import annotations

import random
from typing import Iterator, Sequence


class BucketBatchSampler:
    def __init__(self, lengths: Sequence[int], micro_batch_size: int, dp_size: int = 1, dp_rank: int = 0,
                 seed: int = 1234, bucket_steps: int = 64, drop_last: bool = True, shuffle: bool = True):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside 0..{dp_size - 1}")
        self.lengths, self.mbs, self.dp, self.rank = list(lengths), micro_batch_size, dp_size, dp_rank
        self.seed, self.bucket_steps, self.drop_last, self.shuffle = seed, bucket_steps, drop_last, shuffle
        self.epoch = 0
        self.skip = 0  # micro-batches already consumed in this epoch (resume)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps(self) -> list[list[list[int]]]:
        """All steps of the epoch: steps[s][rank] = the indices of that rank's micro-batch."""
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed * 100003 + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        per_step = self.dp * self.mbs
        window = per_step * self.bucket_steps
        steps, partial = [], []
        for w in range(0, len(order), window):
            chunk = sorted(order[w:w + window], key=lambda i: self.lengths[i])
            for s in range(0, len(chunk), per_step):
                group = chunk[s:s + per_step]
                # deal neighbours round-robin so that each rank gets one of every dp similar samples
                (steps if len(group) == per_step else partial).append([group[r::self.dp] for r in range(self.dp)])
        if self.shuffle:
            rng.shuffle(steps)
        return steps + ([] if self.drop_last else partial)

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.steps()[self.skip:]:
            yield step[self.rank]

    def __len__(self) -> int:
        return len(self.steps()) - self.skip

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "skip": self.skip, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.skip, self.seed = state["epoch"], state["skip"], state["seed"]


class RandomBatchSampler(BucketBatchSampler):
    """Plain seeded random micro-batches (the baseline BucketBatchSampler is measured against)."""

    def steps(self) -> list[list[list[int]]]:
        order = list(range(len(self.lengths)))
        if self.shuffle:
            random.Random(self.seed * 100003 + self.epoch).shuffle(order)
        per_step = self.dp * self.mbs
        n = len(order) - len(order) % per_step
        steps = [[order[s + r * self.mbs: s + (r + 1) * self.mbs] for r in range(self.dp)] for s in range(0, n, per_step)]
        if n < len(order) and not self.drop_last:
            steps.append([order[n + r::self.dp] for r in range(self.dp)])
        return steps


def padding_stats(lengths: Sequence[int], steps: list[list[list[int]]]) -> dict:
    """Padding fraction (each micro-batch padded to its longest sample) and per-rank token spread per step."""
    real = padded = 0
    spread = []
    for step in steps:
        per_rank = []
        for mb in step:
            ls = [lengths[i] for i in mb]
            real += sum(ls)
            padded += max(ls) * len(ls)
            per_rank.append(sum(ls))
        spread.append(max(per_rank) / max(1, min(per_rank)))
    return {"padding_fraction": 1 - real / padded if padded else 0.0,
            "max_over_min_tokens_per_rank": max(spread) if spread else 1.0,
            "mean_max_over_min": sum(spread) / len(spread) if spread else 1.0}
