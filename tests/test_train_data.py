"""Fine-tuning data (groundwork of the training issue): both sample formats, data.json, loss masks on
assistant tokens only, image tokens from the grid, BucketBatchSampler balance, LLaVA conversion."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mm_train.data import IGNORE, encode, image_tokens, load_data_config, load_samples, parse_sample
from mm_train.sampler import BucketBatchSampler, RandomBatchSampler, padding_stats

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    from mm_convert.testing.tiny_tokenizer import write_tiny_processor
    from mm_train.inputs import load_processors
    d = tmp_path_factory.mktemp("proc")
    write_tiny_processor(d, "Qwen2_5_VLProcessor")
    return load_processors(d)


def test_both_formats_and_data_json(tmp_path):
    from PIL import Image
    Image.fromarray(np.zeros((56, 84, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "d1.json").write_text(json.dumps([
        {"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}]))
    (tmp_path / "d2.json").write_text(json.dumps([
        {"images": ["a.png"], "messages": [{"role": "user", "content": "<image>Describe."}, {"role": "assistant", "content": "Black."}]}]))
    (tmp_path / "data.json").write_text(json.dumps({
        "dataset_param": {"dataset_type": "huggingface", "preprocess_parameters": {"model_name_or_path": "ckpt"},
                          "basic_parameters": {"dataset_dir": str(tmp_path), "dataset": f"{tmp_path / 'd1.json'},{tmp_path / 'd2.json'}",
                                               "cache_dir": str(tmp_path / "cache"), "max_samples": 3}},
        "dataloader_param": {"sampler_type": "BucketBatchSampler"}}))
    cfg = load_data_config(tmp_path / "data.json")
    samples = load_samples(cfg)
    assert [s.images for s in samples] == [["a.png"], [], ["a.png"]]
    assert samples[2].turns == [("user", "<image>Describe."), ("assistant", "Black.")]
    cfg.max_samples = 1
    assert len(load_samples(cfg)) == 1
    with pytest.raises(ValueError, match="placeholders"):
        parse_sample({"image": "a.png", "conversations": [{"from": "human", "value": "<image><image>x"},
                                                          {"from": "gpt", "value": "y"}]}, "x[0]")


def test_encode_masks_all_but_assistant_and_expands_image(tmp_path, processors):
    from PIL import Image
    tok, ip = processors
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (56, 84, 3), np.uint8)).save(tmp_path / "a.png")
    s = parse_sample({"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                          {"from": "gpt", "value": "A cat."}]}, "t")
    out = encode(s, tok, ip, tmp_path)
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    n_img = ids.count(tok.convert_tokens_to_ids("<|image_pad|>"))
    assert n_img == int(out["image_grid_thw"][0].prod()) // 4 == image_tokens(84, 56, ip)
    learned = [t for t, l in zip(ids, labels) if l != IGNORE]
    assert tok.decode(learned) == "A cat.<|im_end|>"
    # the text equals the chat template's rendering of the same conversation
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is it?"}]},
                                    {"role": "assistant", "content": "A cat."}], tokenize=False)
    assert tok.decode(ids) == text.replace("<|image_pad|>", "<|image_pad|>" * n_img).rstrip("\n") + "\n"


def test_bucket_sampler_balances_ranks_and_is_rank_consistent():
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(20, 60), rng.randint(400, 2000)]) for _ in range(2000)]
    dp, mbs = 4, 2
    buckets = [BucketBatchSampler(lengths, mbs, dp, r, seed=7) for r in range(dp)]
    steps = buckets[0].steps()
    assert all(b.steps() == steps for b in buckets)  # same plan on every rank
    seen = sorted(i for st in steps for mb in st for i in mb)
    assert len(seen) == len(set(seen)) and len(seen) == len(lengths) // (dp * mbs) * dp * mbs
    per_rank = [list(b) for b in buckets]
    assert all(per_rank[r][s] == steps[s][r] for r in range(dp) for s in range(len(steps)))
    bucket = padding_stats(lengths, steps)
    rand = padding_stats(lengths, RandomBatchSampler(lengths, mbs, dp, 0, seed=7).steps())
    assert bucket["padding_fraction"] < 0.1 < rand["padding_fraction"]
    assert bucket["mean_max_over_min"] < rand["mean_max_over_min"]
    # resuming skips the consumed micro-batches
    b = BucketBatchSampler(lengths, mbs, dp, 1, seed=7)
    b.load_state_dict({"epoch": 0, "skip": 5, "seed": 7})
    assert list(b) == per_rank[1][5:]


def test_llava_conversion_skips_missing_images(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.jpg").write_bytes(b"jpg")
    (tmp_path / "in.json").write_text(json.dumps([
        {"id": "a", "image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "b", "image": "gone.jpg", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]))
    p = subprocess.run([sys.executable, str(ROOT / "examples/qwen2vl/llava_instruct_2_mllm_demo_format.py"), str(tmp_path / "in.json"),
                        "--image-dir", str(tmp_path / "img"), "--image-prefix", "img", "-o", str(tmp_path / "out.json")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert [s["id"] for s in out] == ["a", "c"] and out[0]["image"] == "img/x.jpg"
    assert "gone.jpg" in p.stderr


def test_token_length_matches_encode_without_decoding(tmp_path, processors):
    """The samplers' lengths come from image headers; they must be the encoded lengths exactly."""
    from PIL import Image
    from mm_train.data import token_length
    tok, ip = processors
    for i, (w, h) in enumerate([(28, 28), (84, 56), (224, 112), (300, 41)]):
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / f"{i}.png")
    for i in range(4):
        s = parse_sample({"image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                                 {"from": "gpt", "value": "word " * i}]}, "t")
        assert token_length(s, tok, ip, tmp_path) == len(encode(s, tok, ip, tmp_path)["input_ids"])
    s = parse_sample({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}, "t")
    assert token_length(s, tok, ip, tmp_path) == len(encode(s, tok, ip, tmp_path)["input_ids"])
