"""data.json honoured as MindSpeed-MM reads it: the sample cache in cache_dir (built once by rank 0, reused by
later starts and other ranks, rebuilt when the data, the tokenizer or a setting changes or when corrupt), image_max_pixels /
image_min_pixels (MindSpeed-MM's pre-resize before transformers' image processor), max_samples, shuffle,
drop_last, unknown and no-effect keys, values that cannot be honoured."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import mm_train.dataset as dataset_mod
from mm_train.data import IGNORE, DataConfigError, encode, load_data_config, read_samples
from mm_train.dataset import Data
from mm_train.sampler import BucketBatchSampler, RandomBatchSampler

REPO = Path(__file__).resolve().parents[1]
ASK = {"from": "human", "value": "<image>\nWhat is in the picture?"}
SIZES = [(56, 56), (84, 56), (112, 84), (200, 150), (30, 20), (300, 60)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny tokenizer + Qwen2.5-VL image processor (56*56 .. 224*224 pixels, patch 14, merge 2)."""
    from mm_convert.testing.tiny_tokenizer import write_tiny_processor
    return write_tiny_processor(tmp_path_factory.mktemp("proc"), "Qwen2_5_VLProcessor")


@pytest.fixture
def calls(monkeypatch):
    """Counts tokenizer calls of every Data built in the test."""
    count = [0]

    class Counting:
        def __init__(self, tok):
            self.__dict__["_tok"] = tok

        def __call__(self, *a, **k):
            count[0] += 1
            return self._tok(*a, **k)

        def __getattr__(self, name):
            return getattr(self._tok, name)

    real = dataset_mod.load_processors
    monkeypatch.setattr(dataset_mod, "load_processors", lambda path: (Counting(real(path)[0]), real(path)[1]))
    return count


def write_set(root: Path, model_dir, n: int = 8, *, cache=True, **extra) -> Path:
    """n samples (images of SIZES with random pixels, every third sample text-only, one in the messages
    format) and a data.json; ``extra``: {"section.key": value} set in data.json."""
    from PIL import Image
    (root / "img").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        if i % 3 == 2:
            items.append({"id": f"t{i}", "conversations": [{"from": "human", "value": f"Say {i}."},
                                                           {"from": "gpt", "value": "word " * i}]})
            continue
        w, h = SIZES[i % len(SIZES)]
        Image.fromarray(np.random.RandomState(i).randint(0, 255, (h, w, 3), np.uint8)).save(root / "img" / f"{i}.png")
        if i == 4:
            items.append({"id": f"m{i}", "images": [f"img/{i}.png"], "messages": [
                {"role": "user", "content": "<image>Describe."}, {"role": "assistant", "content": f"Picture {i}."}]})
        else:
            items.append({"id": f"s{i}", "image": f"img/{i}.png", "conversations": [ASK, {"from": "gpt", "value": f"Picture {i}."}]})
    (root / "set.json").write_text(json.dumps(items))
    doc = {"dataset_param": {"dataset_type": "huggingface",
                             "preprocess_parameters": {"model_name_or_path": str(model_dir)},
                             "basic_parameters": {"template": "qwen2vl", "dataset_dir": str(root),
                                                  "dataset": str(root / "set.json")}},
           "dataloader_param": {"dataloader_mode": "sampler", "sampler_type": "BucketBatchSampler", "shuffle": True,
                                "drop_last": True}}
    if cache:
        doc["dataset_param"]["basic_parameters"]["cache_dir"] = str(root / "cache")
    for key, value in extra.items():
        *path, last = key.split(".")
        node = doc
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    path = root / "data.json"
    path.write_text(json.dumps(doc))
    return path


def make(data_json, mbs: int = 2, dp: int = 1, rank: int = 0, seq_length: int | None = None) -> Data:
    """Data as finetune builds it (bad samples skipped); the model config only needs what collate reads."""
    args = types.SimpleNamespace(data_config=data_json, seq_length=seq_length, skip_bad_samples=True,
                                 micro_batch_size=mbs, seed=7)
    cfg = types.SimpleNamespace(image_token_id=None, vision=types.SimpleNamespace(spatial_merge_size=2))
    d = Data(args, cfg, dp, rank)
    cfg.image_token_id = d.pad
    return d


def same_batch(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_second_start_reuses_the_cache_and_equals_no_cache(tmp_path, model, calls, capsys):
    data = write_set(tmp_path, model)
    first = make(data)
    built = calls[0]
    assert built > 0 and "none yet; tokenising 8 samples" in capsys.readouterr().out
    second = make(data)
    assert calls[0] == built, "a cache hit must not tokenise"
    assert "token ids of 8 samples reused" in capsys.readouterr().out
    plain = make(write_set(tmp_path / "nocache", model, cache=False))  # the same samples, no cache_dir
    assert first.lengths == second.lengths == plain.lengths and len(first.lengths) == 8
    refs = [encode(plain.samples[i], plain.tok, plain.improc, plain.root, **plain.encoding) for i in range(8)]
    hits = calls[0]
    for i, ref in enumerate(refs):  # the cached ids, and the ids kept without a cache, are encode()'s
        assert same_batch(second.encoded(i), ref) and same_batch(plain.encoded(i), ref)
        assert len(ref["input_ids"]) == second.lengths[i]
    assert same_batch(second.batch([0, 1]), first.batch([0, 1]))
    assert calls[0] == hits, "batches take their ids from the table, they do not tokenise"
    assert [p.name for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name] == []


def test_rebuilt_when_data_tokenizer_or_settings_change(tmp_path, model, calls, capsys):
    import shutil
    tok_dir = tmp_path / "tok"
    shutil.copytree(model, tok_dir)
    data = write_set(tmp_path, tok_dir)
    make(data)
    n = calls[0]
    make(data)
    assert calls[0] == n
    items = json.loads((tmp_path / "set.json").read_text())
    items.append({"id": "new", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]})
    (tmp_path / "set.json").write_text(json.dumps(items))
    capsys.readouterr()
    assert len(make(data).samples) == 9 and calls[0] > n
    assert "stale, rebuilt (dataset files changed)" in capsys.readouterr().out
    n = calls[0]
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 2048}))
    make(data)
    assert calls[0] > n and "stale, rebuilt (tokenizer files changed)" in capsys.readouterr().out
    n = calls[0]
    doc = json.loads(data.read_text())
    doc["dataset_param"]["preprocess_parameters"]["image_max_pixels"] = 5000
    data.write_text(json.dumps(doc))
    make(data)
    assert calls[0] > n and "stale, rebuilt (image_max_pixels changed)" in capsys.readouterr().out
    n = calls[0]
    doc["dataset_param"]["basic_parameters"]["overwrite_cache"] = True
    data.write_text(json.dumps(doc))
    make(data)
    assert calls[0] > n and "rebuilt (overwrite_cache true)" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_corrupt_cache_is_rebuilt(tmp_path, model, calls, capsys, damage):
    data = write_set(tmp_path, model)
    ref = make(data)
    [cache] = (tmp_path / "cache").glob("*.bin")
    raw = bytearray(cache.read_bytes())
    if damage == "flip":
        raw[-40] ^= 0xFF  # inside the arrays: only the sha256 notices
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw[30:60] = b"x" * 30  # the header
    else:
        raw = bytearray()
    cache.write_bytes(bytes(raw))
    n = calls[0]
    capsys.readouterr()
    again = make(data)
    out = capsys.readouterr().out
    assert calls[0] > n and len([line for line in out.splitlines() if "corrupt, rebuilt" in line]) == 1, out
    assert again.lengths == ref.lengths and all(same_batch(again.encoded(i), ref.encoded(i)) for i in range(8))
    n = calls[0]
    make(data)
    assert calls[0] == n  # the rebuilt file is good


def test_cache_hit_still_checks_images(tmp_path, model, calls, capsys):
    """A hit skips tokenising, not the image checks: a deleted image is a bad sample, an image replaced by one of
    another size is encoded again (the cache updated), and --seq-length applies to the cached lengths."""
    from PIL import Image
    data = write_set(tmp_path, model)
    ref = make(data)
    (tmp_path / "img" / "0.png").unlink()
    Image.fromarray(np.zeros((224, 224, 3), np.uint8)).save(tmp_path / "img" / "1.png")  # was 84x56
    n = calls[0]
    capsys.readouterr()
    d = make(data)
    out = capsys.readouterr().out
    assert d.skipped == 1 and "missing image" in out and "1 samples encoded again" in out
    assert 0 < calls[0] - n < 10  # sample 1 only
    i = [s.id for s in d.samples].index("s1")
    assert ref.samples[1].id == "s1" and d.lengths[i] > ref.lengths[1]
    assert same_batch(d.encoded(i), encode(d.samples[i], d.tok, d.improc, d.root, **d.encoding))
    n = calls[0]
    make(data)
    assert calls[0] == n  # updated cache: a clean hit
    short = make(data, seq_length=min(d.lengths))
    assert calls[0] == n and len(short.samples) == d.lengths.count(min(d.lengths))


def test_image_pixel_bounds_as_mindspeed_mm(tmp_path, model):
    """image_max_pixels / image_min_pixels resize the image (PIL, nearest) before transformers' processor, as
    MindSpeed-MM's Qwen2-VL plugin does; the processor's own bounds apply after. Token counts and pixels equal
    transformers' processor on the pre-resized image; image_min_pixels 0 means no lower bound."""
    import math

    from PIL import Image
    from transformers import AutoImageProcessor
    proc = AutoImageProcessor.from_pretrained(model)

    def hf_tokens(img):
        out = proc(images=[img.convert("RGB")], return_tensors="pt")
        return int(out["image_grid_thw"][0].prod()) // 4, out

    def mindspeed(img, max_px, min_px):  # MindSpeed-MM's MMPluginMixin._preprocess_image, written out
        if img.width * img.height > max_px:
            f = math.sqrt(max_px / (img.width * img.height))
            img = img.resize((int(img.width * f), int(img.height * f)), resample=Image.Resampling.NEAREST)
        if img.width * img.height < min_px:
            f = math.sqrt(min_px / (img.width * img.height))
            img = img.resize((int(img.width * f), int(img.height * f)), resample=Image.Resampling.NEAREST)
        return img

    for max_px, min_px in [(10000, 0), (None, 9000), (6000, 1024), (None, None)]:
        extra = {"dataset_param.preprocess_parameters.image_max_pixels": max_px,
                 "dataset_param.preprocess_parameters.image_min_pixels": min_px}
        root = tmp_path / f"{max_px}_{min_px}"
        d = make(write_set(root, model, cache=False, **extra))
        for i, s in enumerate(d.samples):
            if not s.images:
                continue
            original = Image.open(root / s.images[0])
            n, ref = hf_tokens(mindspeed(original, max_px or 10 ** 9, min_px or 0))
            enc = d.encoded(i)
            assert int((enc["input_ids"] == d.pad).sum()) == n, (max_px, min_px, original.size)
            assert torch.equal(enc["pixel_values"], ref["pixel_values"]) and torch.equal(enc["image_grid_thw"], ref["image_grid_thw"])
            assert d.lengths[i] == len(enc["input_ids"])
            if max_px is None and min_px is None:  # no bound: the processor alone
                assert n == hf_tokens(original)[0]
    # the bound matters: 200x150 gives 35 tokens unbounded, 12 with image_max_pixels 10000
    big = Image.open(tmp_path / "None_None" / "img" / "3.png")
    assert (hf_tokens(big)[0], hf_tokens(mindspeed(big, 10000, 0))[0]) == (35, 12)
    dc = load_data_config(write_set(tmp_path / "defaults", model, n=1))
    assert (dc.image_max_pixels, dc.image_min_pixels) == (768 * 768, 32 * 32)  # MindSpeed-MM's defaults


def test_max_samples_first_entries_of_the_files(tmp_path, model):
    """MindSpeed-MM: dataset.select(range(N)) on the files taken together, malformed entries included."""
    data = write_set(tmp_path, model, n=3)
    (tmp_path / "more.json").write_text(json.dumps([{"id": "bad", "conversations": []},
                                                    {"id": "x", "conversations": [{"from": "human", "value": "a"},
                                                                                  {"from": "gpt", "value": "b"}]}]))
    doc = json.loads(data.read_text())
    doc["dataset_param"]["basic_parameters"]["dataset"] += f",{tmp_path / 'more.json'}"
    for n, good, bad in [(None, 4, 1), (0, 4, 1), (4, 3, 1), (2, 2, 0), (99, 4, 1)]:
        doc["dataset_param"]["basic_parameters"]["max_samples"] = n
        data.write_text(json.dumps(doc))
        g, b = read_samples(load_data_config(data))
        assert (len(g), len(b)) == (good, bad), n
    doc["dataset_param"]["basic_parameters"]["max_samples"] = -1
    data.write_text(json.dumps(doc))
    with pytest.raises(DataConfigError, match="max_samples -1"):
        load_data_config(data)


def test_shuffle_false_keeps_the_data_order(tmp_path, model):
    lengths = [5, 3, 9, 1, 7, 2, 8, 6, 4, 10]
    seq = RandomBatchSampler(lengths, 2, 2, 0, seed=3, shuffle=False)
    assert seq.steps() == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    seq.set_epoch(5)
    assert seq.steps() == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    b = BucketBatchSampler(lengths, 1, 2, 0, seed=3, bucket_steps=2, shuffle=False)
    steps = b.steps()
    # windows of 2 steps in data order ([5,3,9,1], [7,2,8,6], [4,10]); inside a window steps go by length
    assert steps == [[[3], [1]], [[0], [2]], [[5], [7]], [[4], [6]], [[8], [9]]]
    b.set_epoch(1)
    assert b.steps() == steps
    assert BucketBatchSampler(lengths, 1, 2, 0, seed=3, bucket_steps=2).steps() != steps  # shuffle true: not so
    d = make(write_set(tmp_path, model, cache=False, **{"dataloader_param.shuffle": False,
                                                         "dataloader_param.sampler_type": "random"}), mbs=1, dp=2)
    assert [d.next_step() for _ in range(4)] == [[[0], [1]], [[2], [3]], [[4], [5]], [[6], [7]]]


def test_drop_last_false_keeps_the_remainder(tmp_path, model):
    lengths = list(range(11))
    for cls in (RandomBatchSampler, BucketBatchSampler):
        for shuffle in (True, False):
            kept = cls(lengths, 2, 2, 0, seed=1, drop_last=False, shuffle=shuffle).steps()
            dropped = cls(lengths, 2, 2, 0, seed=1, drop_last=True, shuffle=shuffle).steps()
            assert kept[:-1] == dropped and len(kept) == 3  # same full steps; the partial one last
            assert sorted(i for st in kept for mb in st for i in mb) == lengths  # every sample once
            assert sorted(len(mb) for mb in kept[-1]) == [1, 2]  # 3 samples dealt round-robin
    one = RandomBatchSampler([4], 1, 2, 0, drop_last=False).steps()
    assert one == [[[0], []]]
    d = make(write_set(tmp_path, model, n=5, cache=False, **{"dataloader_param.drop_last": False}), mbs=2, dp=2)
    steps = [d.next_step() for _ in range(2)]
    assert sorted(i for st in steps for mb in st for i in mb) == list(range(5)) and d.epoch == 0
    filler = d.batch([])  # a rank the partial step leaves empty
    assert filler["input_ids"].shape[0] == 1 and bool((filler["labels"] == IGNORE).all())
    dropped = make(write_set(tmp_path / "dropped", model, n=3, cache=False), mbs=2, dp=2)
    with pytest.raises(Exception, match="drop_last false keeps them"):
        dropped.next_step()


def test_keys_unknown_no_effect_and_unsupported(tmp_path, model, capsys):
    """MindSpeed-MM's own data_7b.json (attr, collate_param, video keys, ...) reads with its no-effect keys listed
    once; unknown keys are listed as ignored; values this runtime cannot honour are one-line errors."""
    extra = {"dataset_param.preprocess_parameters.use_fast_tokenizer": True,
             "dataset_param.preprocess_parameters.split_special_tokens": False,
             "dataset_param.preprocess_parameters.video_max_pixels": 16384,
             "dataset_param.basic_parameters.train_on_prompt": False, "dataset_param.basic_parameters.mask_history": False,
             "dataset_param.basic_parameters.preprocessing_num_workers": 16, "dataset_param.basic_parameters.tool_format": None,
             "dataset_param.attr": {"images": "images", "messages": "messages", "role_tag": "role"},
             "dataloader_param.collate_param": {"model_name": "qwen2vl", "ignore_pad_token_for_loss": True},
             "dataloader_param.pin_memory": True, "dataloader_param.num_workers": 0,
             "dataset_param.basic_parameters.foo": 1, "dataset_param.bar": {"x": 1}, "extra_top": True}
    data = write_set(tmp_path, model, cache=False, **extra)
    dc = load_data_config(data)
    assert dc.ignored == ["dataset_param.basic_parameters.foo", "dataset_param.bar", "extra_top"]
    assert [e.split(" (")[0] for e in dc.no_effect] == [
        "dataset_param.preprocess_parameters.video_max_pixels", "dataset_param.basic_parameters.preprocessing_num_workers",
        "dataset_param.attr", "dataloader_param.collate_param", "dataloader_param.pin_memory"]
    make(data)
    out = capsys.readouterr().out.splitlines()
    assert out.count("[data] ignored keys in data.json: dataset_param.basic_parameters.foo, dataset_param.bar, extra_top") == 1
    assert sum(line.startswith("[data] accepted, no effect here: dataset_param.preprocess_parameters.video_max_pixels (")
               for line in out) == 1
    load_data_config(REPO / "examples" / "qwen2.5vl" / "data_7b.json")  # the shipped example reads
    for key, value, words in [("dataset_param.basic_parameters.template", "qwen3_vl", "template \"qwen3_vl\" is not supported here; supported: 'qwen2vl'"),
                              ("dataset_param.basic_parameters.packing", True, "packing true is not supported"),
                              ("dataset_param.basic_parameters.streaming", True, "streaming true"),
                              ("dataset_param.basic_parameters.cutoff_len", 2048, "use --seq-length"),
                              ("dataloader_param.dataloader_mode", "base", "supported: 'sampler'"),
                              ("dataloader_param.shuffle", "yes", "expected true or false"),
                              ("dataset_param.preprocess_parameters.image_max_pixels", 0, "image_max_pixels 0")]:
        with pytest.raises(DataConfigError) as e:
            load_data_config(write_set(tmp_path / "bad", model, n=1, **{key: value}))
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_train_on_prompt_labels_every_token(tmp_path, model):
    d = make(write_set(tmp_path, model, cache=False, **{"dataset_param.basic_parameters.train_on_prompt": True}))
    off = make(write_set(tmp_path / "off", model, cache=False))
    for i in range(len(d.samples)):
        on, ref = d.encoded(i), off.encoded(i)
        assert torch.equal(on["labels"], on["input_ids"]) and torch.equal(on["input_ids"], ref["input_ids"])
        assert bool((ref["labels"] == IGNORE).any())


RANK_SCRIPT = """
import json, os, sys, types
import torch.distributed as dist
sys.path.insert(0, {tests!r})
import test_data_config as t
import mm_train.dataset as dm
count = [0]
real = dm.load_processors
class Counting:
    def __init__(self, tok): self.__dict__["_tok"] = tok
    def __call__(self, *a, **k):
        count[0] += 1
        return self._tok(*a, **k)
    def __getattr__(self, n): return getattr(self._tok, n)
dm.load_processors = lambda p: (Counting(real(p)[0]), real(p)[1])
dist.init_process_group("gloo")
d = t.make({data!r}, dp=2, rank=dist.get_rank())
print("RESULT", json.dumps({{"calls": count[0], "lengths": d.lengths}}), flush=True)
dist.destroy_process_group()
"""


def test_rank0_builds_the_others_wait_and_reuse(tmp_path, model):
    """Two ranks (gloo): rank 0 tokenises into the cache, rank 1 waits on the barrier and only reads it."""
    from mm_train.launch import free_port
    data = write_set(tmp_path, model)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(tests=str(REPO / "tests"), data=str(data)))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=REPO) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    res = [json.loads(next(line for line in o[0].splitlines() if line.startswith("RESULT"))[7:]) for o in outs]
    assert res[0]["calls"] > 0 and res[1]["calls"] == 0 and res[0]["lengths"] == res[1]["lengths"]
    assert "tokenising 8 samples" in outs[0][0] and "[data]" not in outs[1][0]


def test_training_loop_with_a_partial_last_step(tiny_hf, tmp_path):
    """drop_last false through the real loop: 5 samples, DP 2 x micro-batch 2. Step 2 is the remainder: one sample
    on rank 0, rank 1 a filler whose labels are all -100. Loss and grad norm equal one rank training on the same
    samples (micro-batch 4: step 2 is that sample alone), so the filler adds nothing."""
    from mm_convert import Qwen2_5_VLConverter
    from mm_train.finetune import main as finetune
    from mm_train.toydata import make_caption_set
    hf = tiny_hf()
    Qwen2_5_VLConverter(progress=False).hf_to_mm(hf, tmp_path / "mm", tp_size=1, llm_pp_layers=[4], vit_pp_layers=[4])
    data = make_caption_set(tmp_path / "data", 5, hf, sampler="random")
    doc = json.loads(data.read_text())
    doc["dataloader_param"].update(shuffle=False, drop_last=False)
    data.write_text(json.dumps(doc))
    logs = []
    for nproc, mbs in ((2, 2), (1, 4)):
        log = tmp_path / f"log{nproc}.jsonl"
        finetune([str(a) for a in ["--nproc", nproc, "--data-config", data, "--load", tmp_path / "mm", "--train-iters", 2,
                                   "--micro-batch-size", mbs, "--global-batch-size", 4, "--lr", "1e-3",
                                   "--lr-decay-style", "constant", "--log-json", log]])
        logs.append([json.loads(line) for line in log.read_text().splitlines()])
    for a, b in zip(*logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
