"""The runtime on Qwen2-VL and Qwen3-VL (dense and MoE) shards against transformers' own classes: logits over
TP x PP (and EP for MoE) within 1e-5 (fp32), greedy generation equal to transformers' generate, one training
step's loss and every gradient within 1e-5. Tiny checkpoints made by transformers, reweighted as in
test_runtime (centred biases, larger matrices) so that attention, positions, deepstack features and routing
move the logits well above the tolerance (asserted in test_the_comparison_is_sensitive)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mm_convert import CONVERTERS
from mm_convert.layout import ParallelLayout
from mm_convert.testing import family, make_tiny_hf_checkpoint
from mm_train.check_grads import engine_loss_and_grads, hf_loss_and_grads
from mm_train.check_logits import check_logits, default_image, reference_class, run_local
from mm_train.config import ModelConfig
from mm_train.inputs import build_inputs, hf_kwargs, load_processors
from test_runtime import reweight  # noqa: E402  (centred biases, larger matrices)

MODELS = {"qwen2vl": ("Qwen2-VL", "", False), "qwen3vl-tied": ("Qwen3-VL", "", True), "qwen3moe": ("Qwen3-VL", "moe", False)}
LAYOUTS = {  # (tp, pp, ep) -> (llm_pp_layers, vit_pp_layers)
    (1, 1, 1): ([4], [4]), (2, 1, 1): ([4], [4]), (1, 2, 1): ([1, 3], [4, 0]), (2, 2, 1): ([0, 4], [2, 2]),
    (1, 1, 2): ([4], [4]), (2, 1, 2): ([4], [4]),
}
LOGIT_CASES = [("qwen2vl", k) for k in list(LAYOUTS)[:4]] + [("qwen3vl-tied", (1, 1, 1)), ("qwen3vl-tied", (2, 2, 1))] \
    + [("qwen3moe", k) for k in LAYOUTS]


def assert_step_equal(loss, got: dict, ref_loss, ref: dict) -> None:
    """Loss, the engine's global grad norm and every gradient within 1e-5 of transformers'."""
    assert abs(loss - ref_loss) <= 1e-5, (loss, ref_loss)
    norm = got.pop("<grad_norm>").item()
    ref_norm = torch.sqrt(sum(g.double().pow(2).sum() for g in ref.values())).item()
    assert abs(norm - ref_norm) <= 1e-5 * ref_norm, (norm, ref_norm)
    assert set(ref) == set(got)
    bad = {n: (got[n] - g).abs().max().item() for n, g in ref.items() if (got[n] - g).abs().max() > 1e-5}
    assert not bad, bad


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    cache = {}

    def make(model: str, purpose: str = "logits") -> Path:
        if (model, purpose) not in cache:
            fam, variant, tied = MODELS[model]
            d = make_tiny_hf_checkpoint(tmp_path_factory.mktemp(f"{model}_{purpose}"), family_name=fam, variant=variant,
                                        tied=tied)
            cache[model, purpose] = d if purpose == "grads" else reweight(d, 0.1, 10.0 if purpose == "generate" else 3.0)
        return cache[model, purpose]
    return make


@pytest.fixture(scope="module")
def mm(tmp_path_factory, hf):
    cache = {}

    def make(model: str, key, purpose: str = "logits") -> Path:
        if (model, key, purpose) not in cache:
            tp, _, ep = key
            llm, vit = LAYOUTS[key]
            out = tmp_path_factory.mktemp(f"mm_{model}")
            converter(model).hf_to_mm(hf(model, purpose), out, tp_size=tp, llm_pp_layers=llm, vit_pp_layers=vit,
                                      ep_size=ep, overwrite=True)
            cache[model, key, purpose] = out
        return cache[model, key, purpose]
    return make


def converter(model: str):
    return CONVERTERS[family(MODELS[model][0]).CONVERTER](progress=False)


@pytest.mark.parametrize("model,key", LOGIT_CASES, ids=[f"{m}-tp{k[0]}pp{k[1]}ep{k[2]}" for m, k in LOGIT_CASES])
def test_logits_equal_transformers(model, key, hf, mm):
    """The layout is read off the shards (EP included)."""
    lines = []
    assert check_logits(mm(model, key), hf(model), tolerance=1e-5, log=lines.append) <= 1e-5
    assert [line.split(":")[0] for line in lines] == ["image+text", "text"]
    tp, pp, ep = key
    assert (f"ep={ep}" in lines[0]) == (ep > 1) and f"tp={tp}" in lines[0] and f"pp={pp}" in lines[0]


def test_the_comparison_is_sensitive(hf):
    """transformers itself: without the deepstack features, the learned position embedding, or with routing to
    the top-1 expert only, the logits move far above 1e-5, so the runtime's agreement means it does each."""
    moe = hf("qwen3moe")
    cfg = ModelConfig.from_hf(moe)
    inputs = build_inputs(*load_processors(moe), cfg, "Describe this image.", default_image())
    model = reference_class(moe).from_pretrained(moe).eval()
    with torch.inference_mode():
        ref = model(**hf_kwargs(inputs)).logits
        visual = model.model.visual
        saved = visual.deepstack_visual_indexes
        visual.deepstack_visual_indexes = []
        no_deepstack = model(**hf_kwargs(inputs)).logits
        visual.deepstack_visual_indexes = saved
        table = visual.pos_embed.weight.clone()
        visual.pos_embed.weight.zero_()
        no_pos = model(**hf_kwargs(inputs)).logits
        visual.pos_embed.weight.copy_(table)
        for layer in model.model.language_model.layers:
            if hasattr(layer.mlp, "gate") and hasattr(layer.mlp.gate, "top_k"):
                layer.mlp.gate.top_k = 1
        top1 = model(**hf_kwargs(inputs)).logits
    for other in (no_deepstack, no_pos, top1):
        assert (ref - other).abs().max() > 1e-3


@pytest.mark.parametrize("model,key", [("qwen2vl", (2, 2, 1)), ("qwen3moe", (2, 2, 1)), ("qwen3moe", (1, 1, 2))],
                         ids=["qwen2vl-tp2pp2", "qwen3moe-tp2pp2", "qwen3moe-ep2"])
def test_greedy_generation_matches_transformers(model, key, hf, mm):
    path = hf(model, "generate")
    cfg = ModelConfig.from_hf(path)
    tok, improc = load_processors(path)
    cases = {"image": build_inputs(tok, improc, cfg, "Describe this image.", default_image()),
             "text": build_inputs(tok, improc, cfg, "Write a haiku about the sea.")}
    n = 8
    ref_model = reference_class(path).from_pretrained(path).eval()
    ref = {}
    for case, inputs in cases.items():
        out = ref_model.generate(**hf_kwargs(inputs), max_new_tokens=n, do_sample=False)
        ref[case] = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(set(ref["image"])) > 2, ref  # the checkpoint does not just repeat a token
    g = {"max_new_tokens": n, "eos_token_id": cfg.eos_token_ids}
    tp, pp, ep = key
    llm, vit = LAYOUTS[key]
    got = run_local(mm(model, key, "generate"), cfg, ParallelLayout.create(tp, llm, vit, ep_size=ep), cases,
                    [{"kind": "generate", "case": c, "generation": g} for c in cases], timeout=600)
    assert dict(zip(cases, got)) == ref


@pytest.mark.parametrize("model,key", [("qwen2vl", (1, 1, 1)), ("qwen2vl", (2, 2, 1)), ("qwen3moe", (1, 1, 1)),
                                       ("qwen3moe", (2, 2, 1)), ("qwen3vl-tied", (2, 2, 1))],
                         ids=["qwen2vl-1-1", "qwen2vl-2-2", "qwen3moe-1-1", "qwen3moe-2-2", "qwen3vl-tied-2-2"])
def test_training_step_equals_transformers(model, key, hf, mm, tmp_path):
    """Loss, global grad norm and every parameter's gradient (the vision encoder trained too) within 1e-5."""
    from test_train_step import make_batch

    path = hf(model, "grads")
    cfg, batch = make_batch(path, tmp_path)
    tp, pp, _ = key
    llm, vit = LAYOUTS[key]
    ref_loss, ref = hf_loss_and_grads(path, batch)
    loss, got = engine_loss_and_grads(mm(model, key, "grads"), path, cfg, ParallelLayout.create(tp, llm, vit), batch)
    assert_step_equal(loss, got, ref_loss, ref)


@pytest.mark.parametrize("key", [(1, 1, 2), (2, 2, 2), (1, 1, 1)], ids=["tp1-ep2", "tp2-pp2-ep2", "tp1-dp2-ep1"])
def test_training_step_with_expert_parallelism(key, hf, tmp_path):
    """EP ranks are data-parallel ranks with their own batches (here: the image sample on one, the text sample
    on the other); the MoE layers gather the EP group's tokens for every rank's experts. Loss and every
    gradient equal transformers' on both samples together; expert gradients come back from each EP rank's
    shard, the rest reduced over data parallel. Without EP (ep 1, two data-parallel ranks) the experts'
    gradients are summed over data parallel like every other."""
    from test_train_step import make_batch

    from mm_train.batch import collate
    from mm_train.data import encode, parse_sample

    path = hf("qwen3moe", "grads")
    cfg, batch = make_batch(path, tmp_path)
    tok, ip = load_processors(path)
    samples = [parse_sample({"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                                  {"from": "gpt", "value": "A red cat on a mat."}]}, "a"),
               parse_sample({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there."}]}, "b")]
    per_rank = [collate([encode(s, tok, ip, tmp_path)], cfg) for s in samples]
    tp, pp, ep = key
    llm, vit = LAYOUTS[(tp, pp, 1)]
    converter("qwen3moe").hf_to_mm(path, tmp_path / "mm", tp_size=tp, llm_pp_layers=llm, vit_pp_layers=vit, ep_size=ep)
    ref_loss, ref = hf_loss_and_grads(path, batch)
    loss, got = engine_loss_and_grads(tmp_path / "mm", path, cfg, ParallelLayout.create(tp, llm, vit, ep_size=ep),
                                      batch, dp_batches=per_rank)
    assert_step_equal(loss, got, ref_loss, ref)
