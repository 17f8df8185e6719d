"""The training set of a run: samples read and checked up front (their token lengths feed the sampler), the
sampler's steps, and the position in them (epoch, step in epoch) that saves record.

Sample cache (data.json's ``basic_parameters.cache_dir``): the token ids, labels and image token counts of every
sample read (not pixels: images are decoded when their step comes) are kept in one file,
``<cache_dir>/mm_train_samples_<id>.bin``, ``<id>`` naming the dataset files, dataset_dir and model path. Global rank
0 builds or refreshes it under a lock file while the other ranks wait (on a barrier of a gloo group with a long
timeout when a process group is up); then every rank reads it. Its key (sha256 of ``cache_components``) covers the
dataset files' content (sha256 of every byte, each start: the files are read and parsed each start anyway),
dataset_dir, max_samples, the tokenizer / processor files of model_name_or_path (sha256 of each), the
transformers version, image_max_pixels / image_min_pixels, the template, train_on_prompt and ``CACHE_FORMAT``; a
different key rebuilds the file, saying which of these changed. ``--seq-length`` is not in it: the cache holds
whole samples and the length check runs each start. The file is written to a temporary name, synced and
renamed, so a crash never leaves a half-written cache under the real name; a file that does not parse or whose
sha256 does not match is rebuilt with a one-line notice.

On a cache hit every start still parses the samples (malformed ones, unknown roles, placeholder counts), checks
``--seq-length`` on the cached lengths and stats every image: a missing image is a bad sample, and an image whose
size or mtime changed is checked and encoded again (and the cache updated). What a hit skips is the tokenising,
the image header reads and PIL's ``verify()`` of unchanged images.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import time
from array import array
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mm_convert.errors import DataError

from .batch import collate, collate_packed
from .config import ModelConfig
from .data import IGNORE, IMAGE_PAD, BadSample, DataConfig, Encoded, checked_encoding, encode, load_data_config, read_samples
from .inputs import load_processors
from .sampler import BucketBatchSampler, RandomBatchSampler

MAX_LISTED = 20  # bad samples listed before the run stops
CACHE_FORMAT = 1
CACHE_MAGIC = b"mm_train sample cache\n"
CACHE_WAIT = timedelta(hours=12)  # how long ranks wait for rank 0 to tokenise the data set
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "chat_template.json", "chat_template.jinja",
                   "preprocessor_config.json", "processor_config.json")
_ALIGN = 64


class Data:
    """Samples (their token lengths computed up front, for the sampler) and the sampler's steps; the position
    is (epoch, step in epoch)."""

    def __init__(self, args, cfg: ModelConfig, dp_size: int, dp_rank: int):
        dc = load_data_config(args.data_config)
        rank0 = _global_rank() == 0
        if rank0 and dc.ignored:
            print(f"[data] ignored keys in data.json: {', '.join(dc.ignored)}", flush=True)
        if rank0 and dc.no_effect:
            print(f"[data] accepted, no effect here: {'; '.join(dc.no_effect)}", flush=True)
        self.tok, self.improc = load_processors(dc.model_name_or_path)
        self.encoding = dc.encoding()
        self.pad = self.tok.convert_tokens_to_ids(IMAGE_PAD)
        self.cfg = cfg
        self.collate = collate_packed if getattr(args, "packed_sequences", False) else collate
        self.root = dc.dataset_dir
        parsed, bad = read_samples(dc)
        total = len(parsed) + len(bad)
        self.table, whats = sample_table(dc, parsed, self.tok, self.improc)
        self.samples, self.rows, self.lengths = [], [], []
        for k, (sample, file, index) in enumerate(parsed):
            what, n = whats[k], int(self.table.arrays["length"][k])
            if what is None and args.seq_length and n > args.seq_length:
                what = f"{n} tokens, longer than --seq-length {args.seq_length}"
            if what:
                bad.append(BadSample(file, index, sample.id, what))
            else:
                self.samples.append(sample)
                self.rows.append(k)
                self.lengths.append(n)
        self.skipped = len(bad)
        if bad and not args.skip_bad_samples:
            shown = [b.line() for b in sorted(bad, key=lambda b: (b.file, b.index))[:MAX_LISTED]]
            more = f" ({len(bad) - MAX_LISTED} more not listed)" if len(bad) > MAX_LISTED else ""
            raise DataError("\n".join(shown) + f"\n{len(bad)} bad samples of {total} read{more}; nothing was "
                            f"trained: fix them or pass --skip-bad-samples")
        if bad and dp_rank == 0 and rank0:
            print(f"[data] skipped {len(bad)} bad samples (--skip-bad-samples), training on {len(self.samples)}; "
                  f"first: {bad[0].line()}", flush=True)
        if not self.samples:
            raise DataError(f"{args.data_config}: no usable samples")
        self.filler = min(range(len(self.lengths)), key=self.lengths.__getitem__)  # for ranks without a sample
        cls = BucketBatchSampler if dc.sampler_type == "BucketBatchSampler" else RandomBatchSampler
        shuffle = dc.shuffle and dc.sampler_type != "SequentialSampler"
        self.sampler = cls(self.lengths, args.micro_batch_size, dp_size, dp_rank, seed=args.seed,
                           drop_last=dc.drop_last, shuffle=shuffle)
        self.dp_rank = dp_rank
        self.epoch, self.pos = 0, 0
        self._steps = None

    def next_step(self) -> list[list[int]]:
        """One sampler step (a micro-batch for every DP rank); a new epoch when this one is used up."""
        if self._steps is None:
            self.sampler.set_epoch(self.epoch)
            self._steps = self.sampler.steps()
            if not self._steps:
                raise DataError("the dataset has fewer samples than micro_batch_size x DP (data.json's "
                                "dataloader_param.drop_last false keeps them)")
        if self.pos >= len(self._steps):
            self.epoch, self.pos, self._steps = self.epoch + 1, 0, None
            return self.next_step()
        self.pos += 1
        return self._steps[self.pos - 1]

    def state(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.pos, "skipped_samples": self.skipped}

    def restore(self, s: dict) -> None:
        self.epoch, self.pos, self._steps = s["epoch"], s["step_in_epoch"], None

    def encoded(self, i: int) -> dict:
        """Sample ``i`` as ``train.data.encode`` gives it, its token ids taken from the table (no tokenising)."""
        return encode(self.samples[i], self.tok, self.improc, self.root, **self.encoding,
                      tokens=self.table.tokens(self.rows[i], self.pad))

    def batch(self, idx: list[int]) -> dict:
        """Encoded on demand (images decoded only for the step that uses them). An empty ``idx`` (a rank left
        without a sample by the last partial step, drop_last false) gives the shortest sample with every label
        -100: the rank runs the step's collectives, and the sample adds nothing to loss or gradients."""
        if not idx:
            enc = self.encoded(self.filler)
            enc["labels"] = torch.full_like(enc["labels"], IGNORE)
            return self.collate([enc], self.cfg, self.tok.pad_token_id or 0)
        return self.collate([self.encoded(i) for i in idx], self.cfg, self.tok.pad_token_id or 0)


def _global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


# ---- the table of encodings ----------------------------------------------------------------------------------
_DTYPES = {"file": "<i4", "index": "<i8", "length": "<i8", "tok_off": "<i8", "ids": "<i4", "learn": "|u1",
           "img_off": "<i8", "img_tokens": "<i4", "img_size": "<i8", "img_mtime": "<i8"}
_CODES = {"<i4": "i", "<i8": "q", "|u1": "B"}


class Table:
    """Every read sample's tokens as flat arrays: row k is parsed sample k (``file`` / ``index`` say which),
    ``length`` its token count (-1: not encodable, e.g. a missing image), its ids in ``ids[tok_off[k]:tok_off[k+1]]``
    with each image's run of image-pad tokens collapsed to one (``img_tokens`` holds the run lengths), ``learn`` 1
    where the label is the token, and each image file's size and mtime when it was encoded."""

    def __init__(self, arrays: dict[str, np.ndarray], digest: str | None = None):
        self.arrays, self.digest = arrays, digest  # digest: the sha256 of the cache file it was read from
        n, a = len(arrays["length"]), arrays
        if not (len(a["file"]) == len(a["index"]) == n and len(a["tok_off"]) == len(a["img_off"]) == n + 1
                and int(a["tok_off"][-1]) == len(a["ids"]) == len(a["learn"])
                and int(a["img_off"][-1]) == len(a["img_tokens"]) == len(a["img_size"]) == len(a["img_mtime"])):
            raise ValueError("inconsistent array sizes")

    def __len__(self) -> int:
        return len(self.arrays["length"])

    @classmethod
    def from_rows(cls, rows, pad: int) -> Table:
        """rows: (file number, index in file, Encoded or None) per parsed sample."""
        cols = {name: array(_CODES[dt]) for name, dt in _DTYPES.items()}
        cols["tok_off"].append(0)
        cols["img_off"].append(0)
        for file_no, index, enc in rows:
            cols["file"].append(file_no)
            cols["index"].append(index)
            cols["length"].append(-1 if enc is None else len(enc.input_ids))
            if enc is not None:
                ids, learn = _collapse(enc, pad)
                cols["ids"].extend(ids)
                cols["learn"].extend(learn)
                cols["img_tokens"].extend(enc.image_tokens)
                cols["img_size"].extend(s for s, _ in enc.image_stats)
                cols["img_mtime"].extend(m for _, m in enc.image_stats)
            cols["tok_off"].append(len(cols["ids"]))
            cols["img_off"].append(len(cols["img_tokens"]))
        return cls({name: np.frombuffer(col, dtype=_DTYPES[name]) if len(col) else np.zeros(0, _DTYPES[name])
                    for name, col in cols.items()})

    def row(self, k: int, pad: int) -> Encoded | None:
        return None if self.arrays["length"][k] < 0 else self.tokens(k, pad)

    def image_stats(self, k: int) -> list[tuple[int, int]]:
        lo, hi = int(self.arrays["img_off"][k]), int(self.arrays["img_off"][k + 1])
        return list(zip(self.arrays["img_size"][lo:hi].tolist(), self.arrays["img_mtime"][lo:hi].tolist()))

    def tokens(self, k: int, pad: int) -> Encoded:
        a = self.arrays
        lo, hi = int(a["tok_off"][k]), int(a["tok_off"][k + 1])
        ids, learn = np.asarray(a["ids"][lo:hi], dtype=np.int64), np.asarray(a["learn"][lo:hi], dtype=bool)
        counts = a["img_tokens"][int(a["img_off"][k]):int(a["img_off"][k + 1])].tolist()
        reps = np.ones(len(ids), dtype=np.int64)
        at = np.flatnonzero(ids == pad)
        if len(at) != len(counts):
            raise DataError(f"sample cache row {k}: {len(at)} image runs for {len(counts)} images")
        reps[at] = counts
        ids, learn = np.repeat(ids, reps), np.repeat(learn, reps)
        return Encoded(ids.tolist(), np.where(learn, ids, IGNORE).tolist(), counts, self.image_stats(k))


def _collapse(enc: Encoded, pad: int) -> tuple[list[int], list[int]]:
    """Token ids with each run of image pads as one id, and 1 where the label is the token."""
    ids, learn, runs = [], [], []
    prev = None
    for t, lab in zip(enc.input_ids, enc.labels):
        if t == pad and prev == pad:
            runs[-1] += 1
            continue
        if t == pad:
            runs.append(1)
        prev = t
        ids.append(t)
        learn.append(int(lab != IGNORE))
    if runs != list(enc.image_tokens):
        raise ValueError(f"image token runs {runs} differ from the image token counts {enc.image_tokens}")
    return ids, learn


# ---- building, checking and caching the table ----------------------------------------------------------------
def sample_table(dc: DataConfig, parsed, tokenizer, image_processor, say=None) -> tuple[Table, list[str | None]]:
    """The table of ``parsed`` (``read_samples``' well-formed samples) and, per sample, what makes it unusable
    (None: usable). Without ``dc.cache_dir`` everything is encoded here; with it, see the module docstring."""
    rank = _global_rank()
    say = say or (lambda line: print(f"[data] {line}" if rank == 0 else f"[data] rank {rank}: {line}", flush=True))
    work = _Work(dc, parsed, tokenizer, image_processor)
    if not dc.cache_dir:
        return work.build()
    cache = SampleCache(dc)
    group = None
    if dist.is_initialized() and dist.get_world_size() > 1:  # the wait may be long: a gloo group of its own
        group = dist.new_group(backend="gloo", timeout=CACHE_WAIT)
    result = failed = None
    if rank == 0:
        try:
            result = work.cached(cache, say, rebuild=dc.overwrite_cache)
        except BaseException as e:  # the others must not wait for nothing
            failed = e
    if group is not None:
        flag = torch.tensor([1 if failed is not None else 0])
        dist.all_reduce(flag, group=group)
        if flag.item() and rank != 0:
            raise DataError(f"rank 0 could not prepare the sample cache {cache.path} (its error is reported)")
    if failed is not None:
        raise failed
    return result if rank == 0 else work.cached(cache, say, rebuild=False)


class _Work:
    def __init__(self, dc: DataConfig, parsed, tokenizer, image_processor):
        self.dc, self.parsed, self.tok, self.improc = dc, parsed, tokenizer, image_processor
        self.pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        files = {str(Path(name)): n for n, name in enumerate(dc.datasets)}
        self.where = [(files[file], index) for _, file, index in parsed]

    def encode(self, sample) -> tuple[Encoded | None, str | None]:
        return checked_encoding(sample, self.tok, self.improc, self.dc.dataset_dir, **self.dc.encoding())

    def build(self) -> tuple[Table, list[str | None]]:
        rows, whats = [], []
        for (sample, _, _), (file_no, index) in zip(self.parsed, self.where):
            enc, what = self.encode(sample)
            rows.append((file_no, index, enc))
            whats.append(what)
        return Table.from_rows(rows, self.pad), whats

    def check(self, table: Table) -> tuple[list[str | None], dict[int, Encoded | None]]:
        """A cache hit: what is wrong with each sample now, and the rows that had to be encoded again (a missing
        image, an image whose size or mtime changed, a sample that was not encodable before)."""
        whats: list[str | None] = []
        changed: dict[int, Encoded | None] = {}
        lengths = table.arrays["length"]
        for k, (sample, _, _) in enumerate(self.parsed):
            if lengths[k] >= 0 and _same_files(sample, self.dc.dataset_dir, table.image_stats(k)):
                whats.append(None)
                continue
            enc, what = self.encode(sample)
            whats.append(what)
            if enc is not None and enc != table.row(k, self.pad):
                changed[k] = enc
        return whats, changed

    def usable(self, table: Table | None) -> bool:
        return table is not None and np.array_equal(table.arrays["file"], [f for f, _ in self.where]) \
            and np.array_equal(table.arrays["index"], [i for _, i in self.where])

    def cached(self, cache: SampleCache, say, rebuild: bool) -> tuple[Table, list[str | None]]:
        """The table from the cache file, built (or refreshed) and written under the lock when it has to be."""
        seen = None  # (sha256 of the file checked, its check)
        if not rebuild:  # no lock needed to read: the file under the real name is always complete
            table, _ = cache.load()
            if self.usable(table):
                whats, changed = self.check(table)
                if not changed:
                    if _global_rank() == 0:
                        say(f"sample cache {cache.path}: token ids of {len(table)} samples reused")
                    return table, whats
                seen = (table.digest, (whats, changed))
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(cache.lock())
            except OSError as e:
                say(f"cannot use cache_dir {cache.path.parent} ({e}); encoding {len(self.parsed)} samples without it")
                return self.build()
            table, why = (None, "rebuilt (overwrite_cache true)") if rebuild else cache.load()
            if table is not None and not self.usable(table):
                table, why = None, "stale, rebuilt (it holds other samples)"
            if table is None:
                say(f"sample cache {cache.path}: {why}; tokenising {len(self.parsed)} samples")
                t0 = time.perf_counter()
                table, whats = self.build()
                cache.write(table, say)
                say(f"sample cache {cache.path}: {len(self.parsed)} samples tokenised in {time.perf_counter() - t0:.1f} s")
                return table, whats
            whats, changed = seen[1] if seen and seen[0] == table.digest else self.check(table)
            if changed:
                table = Table.from_rows(((f, i, changed[k] if k in changed else table.row(k, self.pad))
                                         for k, (f, i) in enumerate(self.where)), self.pad)
                say(f"sample cache {cache.path}: {len(changed)} samples encoded again (their images changed)")
                cache.write(table, say)
            elif _global_rank() == 0:
                say(f"sample cache {cache.path}: token ids of {len(table)} samples reused")
            return table, whats


def _same_files(sample, root, stats: list[tuple[int, int]]) -> bool:
    """Each image file still there with the size and mtime it had when the sample was encoded."""
    if len(stats) != len(sample.images):
        return False
    for p, (size, mtime) in zip(sample.images, stats):
        try:
            st = os.stat(Path(root) / p)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != (size, mtime):
            return False
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_components(dc: DataConfig) -> dict:
    """Everything the cached encodings depend on (the cache key is the sha256 of this, as sorted JSON)."""
    import transformers

    files = []
    for name in dc.datasets:
        p = Path(name)
        try:
            files.append([str(p.resolve()), p.stat().st_size, _sha256(p)])
        except OSError:
            files.append([str(p.resolve()), None, None])  # read_samples reports it
    model = Path(dc.model_name_or_path)
    tok = ({f: _sha256(model / f) for f in TOKENIZER_FILES if (model / f).is_file()} if model.is_dir()
           else {"name": dc.model_name_or_path})
    return {"format": CACHE_FORMAT, "dataset files": files, "dataset_dir": str(Path(dc.dataset_dir).resolve()),
            "max_samples": dc.max_samples, "tokenizer files": tok, "transformers": transformers.__version__,
            "image_max_pixels": dc.image_max_pixels, "image_min_pixels": dc.image_min_pixels,
            "template": dc.template, "train_on_prompt": dc.train_on_prompt}


class SampleCache:
    """One cache file: CACHE_MAGIC, an 8-byte header length, the JSON header (format, key, components, arrays:
    name -> [dtype, count, offset], payload bytes, sha256 of the arrays' bytes), then the arrays, 64-byte aligned."""

    def __init__(self, dc: DataConfig):
        self.components = cache_components(dc)
        self.key = hashlib.sha256(json.dumps(self.components, sort_keys=True).encode()).hexdigest()
        ident = json.dumps([[f[0] for f in self.components["dataset files"]], self.components["dataset_dir"],
                            str(Path(dc.model_name_or_path).resolve())])
        self.path = Path(dc.cache_dir) / f"mm_train_samples_{hashlib.sha256(ident.encode()).hexdigest()[:16]}.bin"

    @contextlib.contextmanager
    def lock(self):
        """Exclusive among processes (flock on a side file); tidies temporary files a crashed writer left."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a+") as f:
            try:
                import fcntl
                fcntl.flock(f, fcntl.LOCK_EX)
            except ImportError:  # no flock (not POSIX): writes stay atomic, two builders may both work
                pass
            for tmp in self.path.parent.glob(self.path.name + ".tmp-*"):
                with contextlib.suppress(OSError):
                    tmp.unlink()
            yield

    def load(self) -> tuple[Table | None, str | None]:
        """(table, None), or (None, why it cannot be used)."""
        if not self.path.exists():
            return None, "none yet"
        try:
            with open(self.path, "rb") as f:
                if f.read(len(CACHE_MAGIC)) != CACHE_MAGIC:
                    raise ValueError("not a sample cache file")
                n = int.from_bytes(f.read(8), "little")
                if n > 1 << 26:
                    raise ValueError(f"header of {n} bytes")
                raw = f.read(n)
            header = json.loads(raw)
            if header.get("format") != CACHE_FORMAT:
                return None, f"stale, rebuilt (cache format {header.get('format')}, this code writes {CACHE_FORMAT})"
            if header["key"] != self.key:
                old = header.get("components", {})
                what = [k for k in self.components if old.get(k) != self.components[k]] or ["key"]
                return None, f"stale, rebuilt ({', '.join(what)} changed)"
            start = _aligned(len(CACHE_MAGIC) + 8 + n)
            size = self.path.stat().st_size
            if size != start + header["payload"]:
                raise ValueError(f"{size} bytes, the header says {start + header['payload']}")
            mm = np.memmap(self.path, dtype=np.uint8, mode="r")
            h = hashlib.sha256()
            arrays = {}
            for name, dtype in _DTYPES.items():
                dt, count, off = header["arrays"][name]
                if dt != dtype:
                    raise ValueError(f"array {name} is {dt}, expected {dtype}")
                nbytes = count * np.dtype(dt).itemsize
                a = mm[start + off:start + off + nbytes].view(dt)
                if len(a) != count:
                    raise ValueError(f"array {name} is cut short")
                h.update(a.data)
                arrays[name] = a
            if h.hexdigest() != header["sha256"]:
                raise ValueError("its sha256 does not match the header")
            return Table(arrays, header["sha256"]), None
        except (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
            return None, f"corrupt, rebuilt ({type(e).__name__}: {e})"

    def write(self, table: Table, say) -> None:
        """Temporary file, fsync, rename: the real name only ever holds a complete file. A cache_dir that cannot
        be written is reported and the run goes on with the table in memory."""
        h = hashlib.sha256()
        layout, off = {}, 0
        for name, dtype in _DTYPES.items():
            a = np.ascontiguousarray(table.arrays[name], dtype=dtype)
            layout[name] = [dtype, len(a), off]
            h.update(a.data)
            off = _aligned(off + a.nbytes)
        header = json.dumps({"format": CACHE_FORMAT, "key": self.key, "components": self.components,
                             "arrays": layout, "payload": off, "sha256": h.hexdigest()}).encode()
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(CACHE_MAGIC + len(header).to_bytes(8, "little") + header)
                start = _aligned(f.tell())
                f.write(b"\0" * (start - f.tell()))
                for name, dtype in _DTYPES.items():
                    a = np.ascontiguousarray(table.arrays[name], dtype=dtype)
                    f.seek(start + layout[name][2])
                    f.write(a.data)
                f.truncate(start + off)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            say(f"cannot write the sample cache {self.path} ({e}); going on without it")


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN
