"""Packed sequences (``--packed-sequences``, MindSpeed-MM's ``use_remove_padding``): a micro-batch's samples back to
back without padding, attention inside each sample (cu_seqlens), mrope positions restarting per sample. One training
step on a packed micro-batch gives the loss and every gradient of the padded one within 1e-5 (fp32)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mm_convert import CONVERTERS
from mm_convert.layout import ParallelLayout
from mm_convert.testing import family, make_tiny_hf_checkpoint
from mm_train.batch import collate, collate_packed, label_tokens, pad_to, to_device
from mm_train.check_grads import engine_loss_and_grads
from mm_train.config import ModelConfig
from mm_train.data import IGNORE, encode, parse_sample
from mm_train.inputs import load_processors


def encoded_samples(hf_dir, tmp_path) -> tuple[ModelConfig, list[dict]]:
    """Three samples of different lengths: a non-square image, text only, a second image of another size."""
    from PIL import Image
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 255, (56, 84, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.randint(0, 255, (56, 56, 3), np.uint8)).save(tmp_path / "b.png")
    tok, ip = load_processors(hf_dir)
    raw = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                 {"from": "gpt", "value": "A red cat on a mat, asleep in the sun."}]},
           {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there."}]},
           {"image": "b.png", "conversations": [{"from": "human", "value": "<image>\nAnd this?"},
                                                {"from": "gpt", "value": "A dog."}]}]
    enc = [encode(parse_sample(r, str(i)), tok, ip, tmp_path) for i, r in enumerate(raw)]
    return ModelConfig.from_hf(hf_dir), enc


def test_packed_layout(tiny_hf, tmp_path):
    """cu_seqlens, per-sample positions, the first label of each sample dropped, the same label tokens."""
    cfg, enc = encoded_samples(tiny_hf("float32"), tmp_path)
    padded, packed = collate(enc, cfg), collate_packed(enc, cfg)
    lens = [len(e["input_ids"]) for e in enc]
    assert packed["input_ids"].shape == (1, sum(lens)) and packed["position_ids"].shape == (3, 1, sum(lens))
    assert packed["cu_seqlens"].tolist() == [0, lens[0], lens[0] + lens[1], sum(lens)]
    assert packed["cu_seqlens"].dtype == torch.int32
    for b, (a, e) in enumerate(zip(packed["cu_seqlens"][:-1].tolist(), packed["cu_seqlens"][1:].tolist())):
        assert torch.equal(packed["input_ids"][0, a:e], padded["input_ids"][b, :e - a])
        assert torch.equal(packed["position_ids"][:, 0, a:e], padded["position_ids"][:, b, :e - a])
        assert packed["labels"][0, a] == IGNORE
        assert torch.equal(packed["labels"][0, a + 1:e], padded["labels"][b, 1:e - a])
    assert label_tokens(packed) == label_tokens(padded) > 0
    assert torch.equal(packed["pixel_values"], padded["pixel_values"])
    # fixed pipeline shapes: the padding becomes a segment of its own; grids and bounds stay on the host
    fixed = pad_to(packed, sum(lens) + 5)
    assert fixed["cu_seqlens"].tolist()[-2:] == [sum(lens), sum(lens) + 5]
    assert fixed["input_ids"].shape == (1, sum(lens) + 5) and label_tokens(fixed) == label_tokens(packed)
    assert to_device(fixed, "cpu")["cu_seqlens"] is fixed["cu_seqlens"]


CASES = [("Qwen2.5-VL", "", 1, [4], [4]), ("Qwen2.5-VL", "", 2, [1, 3], [4, 0]), ("Qwen3-VL", "", 1, [4], [4])]


@pytest.mark.parametrize("fam,variant,tp,llm,vit", CASES, ids=["qwen2.5vl-tp1pp1", "qwen2.5vl-tp2pp2", "qwen3vl"])
def test_packed_equals_padded(fam, variant, tp, llm, vit, tmp_path):
    """Loss, grad norm and every gradient (vision encoder trained) of a packed micro-batch against the padded one,
    through TP and PP; Qwen3-VL adds q/k norms, interleaved mrope and deepstack features. About 30-60 s a case:
    two engine runs of separate ranks each."""
    hf = make_tiny_hf_checkpoint(tmp_path / "hf", family_name=fam, variant=variant)
    cfg, enc = encoded_samples(hf, tmp_path)
    CONVERTERS[family(fam).CONVERTER](progress=False).hf_to_mm(hf, tmp_path / "mm", tp_size=tp, llm_pp_layers=llm,
                                                                vit_pp_layers=vit)
    layout = ParallelLayout.create(tp, llm, vit)
    padded, packed = collate(enc, cfg), collate_packed(enc, cfg)
    ref_loss, ref = engine_loss_and_grads(tmp_path / "mm", hf, cfg, layout, padded)
    loss, got = engine_loss_and_grads(tmp_path / "mm", hf, cfg, layout, packed)
    assert abs(loss - ref_loss) <= 1e-5, (loss, ref_loss)
    norm, ref_norm = got.pop("<grad_norm>").item(), ref.pop("<grad_norm>").item()
    assert abs(norm - ref_norm) <= 1e-5 * ref_norm, (norm, ref_norm)
    assert set(ref) == set(got)
    bad = {n: (got[n] - g).abs().max().item() for n, g in ref.items() if (got[n] - g).abs().max() > 1e-5}
    assert not bad, bad
    assert min(g.abs().max().item() for g in ref.values()) > 0  # every parameter gets a gradient


def test_packed_differs_without_bounds(tiny_hf, tmp_path):
    """The bounds matter: the same packed row attended as one causal sequence gives other logits."""
    from mm_train import kernels

    cfg, enc = encoded_samples(tiny_hf("float32"), tmp_path)
    packed = collate_packed(enc, cfg)
    torch.manual_seed(0)
    q, k, v = torch.randn(3, packed["input_ids"].shape[1], 4, 8).unbind(0)
    kern = kernels.TorchKernels()
    inside = kern.varlen_attention(q, k, v, packed["cu_seqlens"], None, causal=True)
    whole = kern.varlen_attention(q, k, v, torch.tensor([0, q.shape[0]], dtype=torch.int32), None, causal=True)
    n0 = int(packed["cu_seqlens"][1])
    assert torch.allclose(inside[:n0], whole[:n0], atol=1e-6)  # the first sample sees nothing else either way
    assert (inside[n0:] - whole[n0:]).abs().max() > 1e-2


def test_finetune_packed_equals_padded(tmp_path):
    """``--packed-sequences`` through the training command (2 steps of 2 accumulated micro-batches of 2, vision
    encoder trained): the logged losses and grad norms equal the padded run's; at pp 2 with fixed pipeline
    shapes (--seq-length without --variable-seq-lengths) too, where a packed micro-batch is padded to
    seq-length x micro-batch-size by a segment of its own. About 60 s: four runs of the command."""
    import json

    from mm_convert import Qwen2_5_VLConverter
    from mm_train.finetune import main as finetune
    from mm_train.toydata import make_caption_set

    hf = make_tiny_hf_checkpoint(tmp_path / "hf", tied=True)
    conv = Qwen2_5_VLConverter(progress=False)
    conv.hf_to_mm(hf, tmp_path / "mm1", tp_size=1)
    conv.hf_to_mm(hf, tmp_path / "mm2", tp_size=1, llm_pp_layers=[1, 3], vit_pp_layers=[4, 0])
    data = make_caption_set(tmp_path / "data", 8, hf, sampler="random")

    def run(load, nproc, tag, *extra):
        log = tmp_path / f"{tag}.jsonl"
        finetune([str(a) for a in ["--nproc", nproc, "--data-config", data, "--load", load, "--train-iters", 2,
                                   "--global-batch-size", 4, "--micro-batch-size", 2, "--lr", "1e-3", "--train-vit",
                                   "--log-json", log, *extra]])
        return [json.loads(line) for line in log.read_text().splitlines()]

    for load, nproc, extra in ((tmp_path / "mm1", 1, []), (tmp_path / "mm2", 2, ["--seq-length", 512])):
        padded = run(load, nproc, f"padded{nproc}", *extra)
        packed = run(load, nproc, f"packed{nproc}", "--packed-sequences", *extra)
        assert len(padded) == len(packed) == 2
        for a, b in zip(padded, packed):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


def test_model_json_use_remove_padding(tmp_path):
    """MindSpeed-MM's switch for the same thing: model.json text_decoder.use_remove_padding."""
    import json

    from mm_train.args import apply_model_json, parse_args

    (tmp_path / "model.json").write_text(json.dumps({"text_decoder": {"use_remove_padding": True}}))
    base = ["--data-config", "d.json", "--load", "ckpt", "--train-iters", "1"]
    args = parse_args(base + ["--mm-model", str(tmp_path / "model.json")])
    assert not args.packed_sequences
    apply_model_json(args)
    assert args.packed_sequences
    args = parse_args(base)
    apply_model_json(args)
    assert not args.packed_sequences and parse_args(base + ["--packed-sequences"]).packed_sequences
