"""BucketBatchSampler: micro-batches of similar token counts on every data-parallel rank at every step.

Samples are shuffled with a seed (the same permutation on every rank), cut into windows of
``bucket_steps`` global steps, sorted by token count inside a window, and cut into steps of
``dp * micro_batch_size`` neighbours, so all ranks of a step get samples of about the same length; the
steps are then shuffled (same seed) so that lengths do not rise monotonically through an epoch.
"""
from __future__ import annotations

import random
from typing import Iterator, Sequence


class BucketBatchSampler:
    def __init__(self, lengths: Sequence[int], micro_batch_size: int, dp_size: int = 1, dp_rank: int = 0,
                 seed: int = 1234, bucket_steps: int = 64, drop_last: bool = True):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside 0..{dp_size - 1}")
        self.lengths, self.mbs, self.dp, self.rank = list(lengths), micro_batch_size, dp_size, dp_rank
        self.seed, self.bucket_steps, self.drop_last = seed, bucket_steps, drop_last
        self.epoch = 0
        self.skip = 0  # micro-batches already consumed in this epoch (resume)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps(self) -> list[list[list[int]]]:
        """All steps of the epoch: steps[s][rank] = the indices of that rank's micro-batch."""
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed * 100003 + self.epoch)
        rng.shuffle(order)
        per_step = self.dp * self.mbs
        window = per_step * self.bucket_steps
        steps = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w:w + window], key=lambda i: self.lengths[i])
            for s in range(0, len(chunk), per_step):
                group = chunk[s:s + per_step]
                if len(group) < per_step and self.drop_last:
                    continue
                # deal neighbours round-robin so that each rank gets one of every dp similar samples
                steps.append([group[r::self.dp] for r in range(self.dp)])
        rng.shuffle(steps)
        return steps

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
        random.Random(self.seed * 100003 + self.epoch).shuffle(order)
        per_step = self.dp * self.mbs
        n = len(order) - len(order) % per_step if self.drop_last else len(order)
        return [[order[s + r * self.mbs: s + (r + 1) * self.mbs] for r in range(self.dp)] for s in range(0, n, per_step)]


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
