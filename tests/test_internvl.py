"""InternVL (transformers' InternVLForConditionalGeneration) through the converter: tiny checkpoints made by
transformers' own class (InternViT-300M's block kind with a Qwen2 LLM, and InternViT-6B's: RMSNorm, q / k norms, no
qkv bias, a final norm, with a Llama LLM), bit-exact round trips over every layout kind and both key schemes,
resplit equal to direct conversion, the MM tensors checked from first principles (MindSpeed-MM's names, the
per-rank [q_r; k_r; v_r] of linear_qkv, layer scale, the replicated projector), and the published configs planned
at their example layouts (vision TP 1 for the 6B tower's 25 heads, vocabulary padding for tp 8)."""
from __future__ import annotations

import json
import subprocess
import sys
from math import prod
from pathlib import Path

import pytest
import torch

from helpers import assert_same_tensors, load_hf_tensors, load_mm_shards
from mm_convert import CONVERTERS
from mm_convert.checkpoint import BoundModel, checked_layout
from mm_convert.errors import ConfigError, LayoutError
from mm_convert.layout import LayoutOptions
from mm_convert.models import internvl
from mm_convert.plan import check_coverage
from mm_convert.testing import make_tiny_hf_checkpoint, published_config_path, tiny_config_dict

LAYOUTS = {
    "tp1_pp1": dict(tp_size=1, llm_pp_layers=[4], vit_pp_layers=[4]),
    "tp2_pp2": dict(tp_size=2, llm_pp_layers=[1, 3], vit_pp_layers=[4, 0]),
    "vpp": dict(tp_size=1, llm_pp_layers=[[0, 1], [1, 2]], vit_pp_layers=[[2, 2], [0, 0]]),
    "vit_split": dict(tp_size=2, vit_tp_size=1, llm_pp_layers=[0, 4], vit_pp_layers=[2, 2]),
}
# variant, dtype, tied, key scheme (None: as transformers saves it, the hub's)
MODELS = {"300m-fp32": ("", "float32", False, None), "300m-bf16-tied": ("", "bfloat16", True, None),
          "6b-fp32": ("6b", "float32", False, None), "6b-bf16-newscheme": ("6b", "bfloat16", False, "new")}
CASES = [(m, lay) for m in MODELS for lay in LAYOUTS]
VIT = "image_encoder.encoder.encoder.layers."


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    cache = {}

    def make(key):
        if key not in cache:
            variant, dtype, tied, scheme = MODELS[key]
            cache[key] = make_tiny_hf_checkpoint(tmp_path_factory.mktemp(key), family_name="InternVL", variant=variant,
                                                 dtype=dtype, tied=tied, scheme=scheme)
        return cache[key]
    return make


def conv():
    return CONVERTERS["InternVLConverter"](progress=False)


@pytest.mark.parametrize("model,layout", CASES, ids=[f"{m}-{lay}" for m, lay in CASES])
def test_round_trip_bit_exact(hf, tmp_path, model, layout):
    src, c = hf(model), conv()
    c.hf_to_mm(src, tmp_path / "mm", **LAYOUTS[layout])
    assert c.verify(src, tmp_path / "mm").ok
    c.mm_to_hf(tmp_path / "mm", tmp_path / "back", hf_dir=src)
    assert_same_tensors(load_hf_tensors(src), load_hf_tensors(tmp_path / "back"), f"{model} {layout}")


def test_key_schemes_are_kept_without_a_reference(hf, tmp_path):
    """The hub's names (language_model.model.*, vision_tower.*) and transformers' module tree
    (model.language_model.*, lm_head) come back as they were, from the manifest alone."""
    for key, prefix in (("300m-fp32", "language_model.model."), ("6b-bf16-newscheme", "model.language_model.")):
        src = hf(key)
        assert any(k.startswith(prefix) for k in load_hf_tensors(src))
        conv().hf_to_mm(src, tmp_path / key / "mm", tp_size=2, llm_pp_layers=[2, 2], vit_pp_layers=[4, 0])
        conv().mm_to_hf(tmp_path / key / "mm", tmp_path / key / "back")
        assert_same_tensors(load_hf_tensors(src), load_hf_tensors(tmp_path / key / "back"), key)


RESPLITS = [("300m-fp32", "tp2_pp2", "vpp"), ("300m-bf16-tied", "vit_split", "tp2_pp2"), ("6b-fp32", "vpp", "vit_split"),
            ("6b-bf16-newscheme", "tp1_pp1", "tp2_pp2")]


@pytest.mark.parametrize("model,src,dst", RESPLITS, ids=[f"{m}-{a}-to-{b}" for m, a, b in RESPLITS])
def test_resplit_equals_direct_conversion(hf, tmp_path, model, src, dst):
    path, c = hf(model), conv()
    c.hf_to_mm(path, tmp_path / "src", **LAYOUTS[src])
    c.resplit(tmp_path / "src", tmp_path / "resplit", **LAYOUTS[dst])
    c.hf_to_mm(path, tmp_path / "direct", **LAYOUTS[dst])
    a, b = load_mm_shards(tmp_path / "resplit"), load_mm_shards(tmp_path / "direct")
    assert set(a) == set(b)
    for rel in a:
        for slot in (k for k in a[rel] if k.startswith("model")):
            assert_same_tensors(a[rel][slot], b[rel][slot], f"{rel} {slot}")
    assert c.layout_of(tmp_path / "resplit") == c.layout_of(tmp_path / "direct")


def test_mm_tensors_from_first_principles(hf, tmp_path):
    """tp 2, pp 2 (vision and 1 LLM layer on stage 0): MindSpeed-MM's names; linear_qkv of TP rank r is
    [q rows of its heads; k rows; v rows]; ls1 / ls2 are lambda_1 / lambda_2; the class token, positions and the
    projector whole on both TP ranks; the 6B block kind's q / k norms and final norm where they belong."""
    for key in ("300m-fp32", "6b-fp32"):
        src = load_hf_tensors(hf(key))
        conv().hf_to_mm(hf(key), tmp_path / key, tp_size=2, llm_pp_layers=[1, 3], vit_pp_layers=[4, 0])
        shards = load_mm_shards(tmp_path / key)
        hv = "vision_tower.encoder.layer.2."
        for t in range(2):
            s0 = shards[f"mp_rank_0{t}_000/model_optim_rng.pt"]["model"]
            q, k, v = (src[hv + f"attention.{p}_proj.weight"] for p in "qkv")
            half = q.shape[0] // 2
            want = torch.cat([x[t * half:(t + 1) * half] for x in (q, k, v)])
            assert torch.equal(s0[VIT + "2.self_attention.linear_qkv.weight"], want)
            assert torch.equal(s0[VIT + "2.ls1"], src[hv + "lambda_1"]) and torch.equal(s0[VIT + "2.ls2"], src[hv + "lambda_2"])
            assert torch.equal(s0[VIT + "2.mlp.linear_fc2.weight"], src[hv + "mlp.fc2.weight"][:, t * 32:(t + 1) * 32])
            assert torch.equal(s0["image_encoder.encoder.embeddings.class_embedding"], src["vision_tower.embeddings.cls_token"])
            assert torch.equal(s0["image_encoder.encoder.embeddings.position_embedding"],
                               src["vision_tower.embeddings.position_embeddings"])
            assert torch.equal(s0["image_encoder.projector.linear_fc1.weight"], src["multi_modal_projector.linear_1.weight"])
            assert torch.equal(s0["image_encoder.projector.norm.bias"], src["multi_modal_projector.layer_norm.bias"])
            if key == "6b-fp32":
                assert torch.equal(s0[VIT + "2.self_attention.k_layernorm.weight"], src[hv + "attention.k_norm.weight"])
                assert torch.equal(s0["image_encoder.encoder.encoder.final_layernorm.weight"], src["vision_tower.layernorm.weight"])
                assert VIT + "2.self_attention.linear_qkv.bias" not in s0 and VIT + "2.input_layernorm.bias" not in s0
            else:
                qb = [src[hv + f"attention.{p}_proj.bias"][t * half:(t + 1) * half] for p in "qkv"]
                assert torch.equal(s0[VIT + "2.self_attention.linear_qkv.bias"], torch.cat(qb))
                assert not any("layernorm" in n and "encoder.encoder.final" in n for n in s0)
            s1 = shards[f"mp_rank_0{t}_001/model_optim_rng.pt"]["model"]
            assert not any(n.startswith("image_encoder") for n in s1)
            assert "text_decoder.output_layer.weight" in s1 and "text_decoder.decoder.layers.2.input_layernorm.weight" in s1


def test_tied_embeddings(hf, tmp_path):
    """Tied (the tiny configs say so at the top level, as transformers 5 writes it): no lm_head in the files,
    no output layer at pp 1, the last stage's copy of the embedding at pp 2."""
    src = hf("300m-bf16-tied")
    assert not any("lm_head" in k for k in load_hf_tensors(src))
    conv().hf_to_mm(src, tmp_path / "pp1", tp_size=1, llm_pp_layers=[4], vit_pp_layers=[4])
    assert "text_decoder.output_layer.weight" not in load_mm_shards(tmp_path / "pp1")["mp_rank_00/model_optim_rng.pt"]["model"]
    conv().hf_to_mm(src, tmp_path / "pp2", tp_size=1, llm_pp_layers=[2, 2], vit_pp_layers=[4, 0])
    shards = load_mm_shards(tmp_path / "pp2")
    assert torch.equal(shards["mp_rank_00_001/model_optim_rng.pt"]["model"]["text_decoder.output_layer.weight"],
                       shards["mp_rank_00_000/model_optim_rng.pt"]["model"]["text_decoder.embedding.word_embeddings.weight"])


def test_impossible_sizes_and_unsupported_configs_are_refused(hf, tmp_path):
    with pytest.raises(LayoutError, match=r"tp_size 4 does not divide the num_key_value_heads \(2\)") as e:
        conv().hf_to_mm(hf("300m-fp32"), tmp_path / "a", tp_size=4, llm_pp_layers=[4], vit_pp_layers=[4])
    assert "\n" not in str(e.value) and not (tmp_path / "a").exists()
    cfg = tiny_config_dict("InternVL")
    for change, message in (({"vision_config": {**cfg["vision_config"], "use_mask_token": True}}, "use_mask_token"),
                            ({"text_config": {**cfg["text_config"], "model_type": "internlm2"}},
                             "text_config.model_type 'internlm2' is not supported"),
                            ({"downsample_ratio": 0.3}, "downsample_ratio 0.3")):
        with pytest.raises(ConfigError, match=message):
            internvl.config_from_hf({**cfg, **change}, "config.json")


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from make_family_examples import CONVERT_ONLY  # noqa: E402  (the example layouts, one place)

EXAMPLES = CONVERT_ONLY["InternVL"]
PARAMS = {"1b": 0.94, "8b": 7.94, "38b": 38.39, "78b": 78.41, "1b_v2_5": 0.94, "8b_v2_5": 8.08, "38b_v2_5": 38.39,
          "78b_v2_5": 78.41}


def test_every_published_size_has_an_example():
    assert set(EXAMPLES) == set(internvl.PUBLISHED) == set(PARAMS)


@pytest.mark.parametrize("size", list(EXAMPLES))
def test_published_configs_plan_at_their_example_layouts(size):
    """Shapes only: the published parameter count, a checked layout, every element of every shard covered once;
    without the padding and vision TP 1 the same TP size is refused in one line naming the sizes. The example
    script (examples/internvl/convert_*.sh) parses and states that layout."""
    cfg = internvl.config_from_hf(json.loads(published_config_path(size, "InternVL").read_text()), size)
    model = BoundModel(internvl, cfg)
    assert abs(sum(prod(s) for s in model.shapes.values()) / 1e9 - PARAMS[size]) < 0.01
    stem, repo, want = EXAMPLES[size]
    script = ROOT / "examples" / "internvl" / f"convert_{stem}.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "mm-convert InternVLConverter hf_to_mm" in text and repo in text
    assert f"--cfg.parallel_config.tp_size {want['tp_size']}" in text
    assert "--cfg.parallel_config.llm_pp_layers " + str(want["llm_pp_layers"]).replace(" ", "") in text
    layout = checked_layout(model, LayoutOptions(**want), "--cfg.parallel_config")
    files = model.plan(layout, {n: None for n in model.shapes})
    check_coverage(files)
    assert len(files) == layout.tp_size * layout.pp_size
    if want.get("make_vocab_size_divisible_by"):
        assert layout.padded_vocab_size % (128 * layout.tp_size) == 0 and layout.padded_vocab_size > cfg.text.vocab_size
        bare = {k: v for k, v in want.items() if k not in ("make_vocab_size_divisible_by", "vit_tp_size")}
        with pytest.raises(LayoutError, match=f"vocab_size \\({cfg.text.vocab_size}\\)") as e:
            checked_layout(model, LayoutOptions(**bare), "--cfg.parallel_config")
        assert "\n" not in str(e.value)
        if cfg.vision.num_heads == 25:
            assert "vision num_attention_heads (25)" in str(e.value)


def test_cli(hf, tmp_path):
    """The converter group on the command line: plan, then hf_to_mm and verify as MindSpeed-MM's guide types them."""
    base = [sys.executable, "-m", "mm_convert.cli", "InternVLConverter"]
    args = ["--cfg.mm_dir", str(tmp_path / "mm"), "--cfg.hf_config.hf_dir", str(hf("300m-fp32")),
            "--cfg.parallel_config.llm_pp_layers", "[[1,3]]", "--cfg.parallel_config.vit_pp_layers", "[[4,0]]",
            "--cfg.parallel_config.tp_size", "2"]
    r = subprocess.run(base + ["plan", "hf_to_mm"] + args, capture_output=True, text=True)
    assert r.returncode == 0 and "tp=2 pp=2" in r.stdout and not (tmp_path / "mm").exists(), r.stderr
    assert subprocess.run(base + ["hf_to_mm", "--quiet"] + args, capture_output=True, text=True).returncode == 0
    v = subprocess.run(base + ["verify", "--cfg.mm_dir", str(tmp_path / "mm"), "--cfg.hf_config.hf_dir",
                               str(hf("300m-fp32"))], capture_output=True, text=True)
    assert v.returncode == 0 and "OK:" in v.stdout, v.stdout + v.stderr


# ---- the runtime (train/internvit.py) against transformers' InternVLForConditionalGeneration -------------------------
RUNTIME_LAYOUTS = {(1, 1): ([4], [4]), (2, 2): ([0, 4], [2, 2])}  # (tp, pp) -> (llm, vit): (2, 2) splits the tower


@pytest.fixture(scope="module")
def hf_runtime(tmp_path_factory):
    """Tiny fp32 checkpoints for the runtime: reweighted as test_runtime does (centred biases, larger matrices), so
    that attention, positions and layer scale move the logits well above the tolerance."""
    from test_runtime import reweight

    cache = {}

    def make(variant: str, purpose: str = "logits"):
        if (variant, purpose) not in cache:
            d = make_tiny_hf_checkpoint(tmp_path_factory.mktemp(f"rt_{variant}_{purpose}"), family_name="InternVL",
                                        variant=variant)
            cache[variant, purpose] = d if purpose == "grads" else reweight(d, 0.1, 3.0)
        return cache[variant, purpose]
    return make


LOGIT_CASES = [(v, k) for v in ("", "6b") for k in RUNTIME_LAYOUTS]


@pytest.mark.parametrize("variant,key", LOGIT_CASES, ids=[f"{v or '300m'}-tp{k[0]}pp{k[1]}" for v, k in LOGIT_CASES])
def test_logits_equal_transformers(hf_runtime, tmp_path, variant, key):
    """Image tiles (a 112 x 84 image: 4 tiles and the thumbnail) and text, the layout read off the shards."""
    from mm_train.check_logits import check_logits

    src = hf_runtime(variant)
    llm, vit = RUNTIME_LAYOUTS[key]
    conv().hf_to_mm(src, tmp_path / "mm", tp_size=key[0], llm_pp_layers=llm, vit_pp_layers=vit)
    lines = []
    assert check_logits(tmp_path / "mm", src, tolerance=1e-5, log=lines.append) <= 1e-5
    assert [line.split(":")[0] for line in lines] == ["image+text", "text"]
    assert f"tp={key[0]} pp={key[1]}" in lines[0]


def test_the_comparison_is_sensitive(hf_runtime):
    """transformers itself: without layer scale, the learned positions or the class token, or with the pixel
    shuffle's height and width left swapped, the logits move far above 1e-5."""
    from mm_train.check_logits import default_image, reference_class
    from mm_train.config import ModelConfig
    from mm_train.inputs import build_inputs, hf_kwargs, load_processors

    src = hf_runtime("6b")
    cfg = ModelConfig.from_hf(src)
    inputs = build_inputs(*load_processors(src), cfg, "Describe this image.", default_image())
    assert inputs["pixel_values"].shape[0] == 5 and int((inputs["input_ids"] == cfg.image_token_id).sum()) == 5 * 4
    model = reference_class(src).from_pretrained(src).eval()
    tower = model.model.vision_tower
    with torch.inference_mode():
        ref = model(**hf_kwargs(inputs)).logits
        changed = []
        for tensor in (tower.encoder.layer[1].lambda_1, tower.embeddings.position_embeddings, tower.embeddings.cls_token):
            saved = tensor.clone()
            tensor.fill_(1.0 if tensor.dim() == 1 else 0.0)
            changed.append(model(**hf_kwargs(inputs)).logits)
            tensor.copy_(saved)
        shuffle = model.model.pixel_shuffle
        model.model.pixel_shuffle = lambda x, scale_factor: shuffle(x, scale_factor).transpose(1, 2)
        changed.append(model(**hf_kwargs(inputs)).logits)
    for other in changed:
        assert (ref - other).abs().max() > 1e-3


def test_greedy_generation_matches_transformers(hf_runtime, tmp_path):
    """tp 2 pp 2 with the KV cache: 1-D rope positions continue past the image tokens as transformers' do."""
    from mm_train.check_logits import default_image, reference_class, run_local
    from mm_train.config import ModelConfig
    from mm_train.inputs import build_inputs, hf_kwargs, load_processors
    from mm_convert.layout import ParallelLayout
    from test_runtime import reweight

    src = reweight(make_tiny_hf_checkpoint(tmp_path / "hf", family_name="InternVL"), 0.1, 10.0)
    cfg = ModelConfig.from_hf(src)
    tok, improc = load_processors(src)
    inputs = build_inputs(tok, improc, cfg, "Describe this image.", default_image())
    model = reference_class(src).from_pretrained(src).eval()
    out = model.generate(**hf_kwargs(inputs), max_new_tokens=8, do_sample=False)
    ref = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(set(ref)) > 2, ref
    conv().hf_to_mm(src, tmp_path / "mm", tp_size=2, llm_pp_layers=[0, 4], vit_pp_layers=[2, 2])
    got = run_local(tmp_path / "mm", cfg, ParallelLayout.create(2, [0, 4], [2, 2]), {"image": inputs},
                    [{"kind": "generate", "case": "image",
                      "generation": {"max_new_tokens": 8, "eos_token_id": cfg.eos_token_ids}}], timeout=600)
    assert got == [ref]


def tile_batch(path):
    """Two right-padded samples: an image (its tiles) with a question and the answer, and a text-only turn;
    labels on the answers only, one position per token."""
    import numpy as np
    from PIL import Image

    from mm_train.config import ModelConfig
    from mm_train.inputs import build_inputs, load_processors

    cfg = ModelConfig.from_hf(path)
    tok, ip = load_processors(path)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (56, 84, 3), np.uint8))
    samples = [(build_inputs(tok, ip, cfg, "What is it?", image), "A red cat on a mat."),
               (build_inputs(tok, ip, cfg, "Hi"), "Hello there.")]
    rows = []
    for inputs, answer in samples:
        a = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append((torch.cat([inputs["input_ids"][0], torch.tensor(a)]), len(a)))
    length = max(len(r) for r, _ in rows)
    ids, labels = torch.full((2, length), 300), torch.full((2, length), -100)
    mask = torch.zeros((2, length), dtype=torch.long)
    for b, (r, n) in enumerate(rows):
        ids[b, :len(r)], labels[b, len(r) - n:len(r)], mask[b, :len(r)] = r, r[-n:], 1
    positions = torch.arange(length).view(1, 1, -1).expand(3, 2, -1).clone()
    return cfg, {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": positions,
                 "pixel_values": samples[0][0]["pixel_values"]}


@pytest.mark.parametrize("variant", ["", "6b"], ids=["300m", "6b"])
def test_training_step_equals_transformers(hf_runtime, variant):
    """tp 2 pp 2 (the tower split over both stages): loss, global grad norm and every gradient (vision tower,
    projector, LLM) within 1e-5 of transformers'."""
    from mm_convert.layout import ParallelLayout
    from mm_train.check_grads import engine_loss_and_grads, hf_loss_and_grads

    from test_family_runtime import assert_step_equal

    path = hf_runtime(variant, "grads")
    cfg, batch = tile_batch(path)
    mm = path.parent / f"{path.name}_mm"
    conv().hf_to_mm(path, mm, tp_size=2, llm_pp_layers=[0, 4], vit_pp_layers=[2, 2], overwrite=True)
    ref_loss, ref = hf_loss_and_grads(path, batch)
    loss, got = engine_loss_and_grads(mm, path, cfg, ParallelLayout.create(2, [0, 4], [2, 2]), batch)
    assert_step_equal(loss, got, ref_loss, ref)


def test_synthetic_checkpoint_of_an_internvl_config(tmp_path):
    """Shape-real synthetic checkpoints (tests of real dimensions, benchmarks) cut InternViT's layers by its own
    key (num_hidden_layers) and use the hub's names; they convert and verify."""
    from mm_convert.testing.synthetic import write_synthetic_checkpoint

    (tmp_path / "c.json").write_text(json.dumps(tiny_config_dict("InternVL", "6b")))
    src = write_synthetic_checkpoint(tmp_path / "c.json", tmp_path / "hf", layers=2, vit_layers=2)
    assert json.loads((src / "config.json").read_text())["vision_config"]["num_hidden_layers"] == 2
    assert any(k.startswith("language_model.model.") for k in load_hf_tensors(src))
    conv().hf_to_mm(src, tmp_path / "mm", tp_size=2, llm_pp_layers=[2], vit_pp_layers=[2])
    assert conv().verify(src, tmp_path / "mm").ok
