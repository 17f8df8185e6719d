"""The training set of a run: samples read and checked up front (their token lengths feed the sampler), the
sampler's steps, and the position in them (epoch, step in epoch) that saves record."""
from __future__ import annotations

import os

from mm_convert.errors import DataError

from .batch import collate
from .config import ModelConfig
from .data import BadSample, checked_length, encode, load_data_config, read_samples
from .inputs import load_processors
from .sampler import BucketBatchSampler, RandomBatchSampler

MAX_LISTED = 20  # bad samples listed before the run stops


class Data:
    """Samples (their token lengths computed up front, for the sampler) and the sampler's steps; the position
    is (epoch, step in epoch)."""

    def __init__(self, args, cfg: ModelConfig, dp_size: int, dp_rank: int):
        dc = load_data_config(args.data_config)
        self.tok, self.improc = load_processors(dc.model_name_or_path)
        self.cfg = cfg
        self.root = dc.dataset_dir
        self.samples, self.lengths = [], []
        parsed, bad = read_samples(dc)
        total = len(parsed) + len(bad)
        for sample, file, index in parsed:
            n, what = checked_length(sample, self.tok, self.improc, self.root, args.seq_length)
            if what:
                bad.append(BadSample(file, index, sample.id, what))
            else:
                self.samples.append(sample)
                self.lengths.append(n)
        self.skipped = len(bad)
        if bad and not args.skip_bad_samples:
            shown = [b.line() for b in sorted(bad, key=lambda b: (b.file, b.index))[:MAX_LISTED]]
            more = f" ({len(bad) - MAX_LISTED} more not listed)" if len(bad) > MAX_LISTED else ""
            raise DataError("\n".join(shown) + f"\n{len(bad)} bad samples of {total} read{more}; nothing was "
                            f"trained: fix them or pass --skip-bad-samples")
        if bad and dp_rank == 0 and int(os.environ.get("RANK", 0)) == 0:
            print(f"[data] skipped {len(bad)} bad samples (--skip-bad-samples), training on {len(self.samples)}; "
                  f"first: {bad[0].line()}", flush=True)
        if not self.samples:
            raise DataError(f"{args.data_config}: no usable samples")
        lengths = self.lengths
        cls = BucketBatchSampler if dc.sampler_type == "BucketBatchSampler" else RandomBatchSampler
        self.sampler = cls(lengths, args.micro_batch_size, dp_size, dp_rank, seed=args.seed)
        self.dp_rank = dp_rank
        self.epoch, self.pos = 0, 0
        self._steps = None

    def next_step(self) -> list[list[int]]:
        """One sampler step (a micro-batch for every DP rank); a new epoch when this one is used up."""
        if self._steps is None:
            self.sampler.set_epoch(self.epoch)
            self._steps = self.sampler.steps()
            if not self._steps:
                raise DataError("the dataset has fewer samples than micro_batch_size x DP")
        if self.pos >= len(self._steps):
            self.epoch, self.pos, self._steps = self.epoch + 1, 0, None
            return self.next_step()
        self.pos += 1
        return self._steps[self.pos - 1]

    def state(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.pos, "skipped_samples": self.skipped}

    def restore(self, s: dict) -> None:
        self.epoch, self.pos, self._steps = s["epoch"], s["step_in_epoch"], None

    def batch(self, idx: list[int]) -> dict:
        """Encoded on demand (images decoded only for the step that uses them)."""
        enc = [encode(self.samples[i], self.tok, self.improc, self.root) for i in idx]
        return collate(enc, self.cfg, self.tok.pad_token_id or 0)
