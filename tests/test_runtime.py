"""The train/ runtime against transformers on tiny Qwen2.5-VL checkpoints converted by the real converter.

Each TP x PP case starts its ranks as separate processes (gloo on 127.0.0.1), as check_logits does for users.

The tiny checkpoints are make_tiny_hf_checkpoint's, reweighted: its biases sit near 1 and its matrices near
0.02, which makes every attention output nearly the same vector; then swapping window attention for full
attention moves the logits by only 2e-5, too little for a 1e-5 check to notice. Centred biases and larger
matrices make attention patterns, rotary and mrope positions matter by 1e-2..1e-1 (asserted below), and larger
still for generation, so that greedy decoding does not repeat one token.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm_convert.errors import CheckpointError, LayoutError, VerifyError
from mm_convert.layout import ParallelLayout
from mm_train.check_logits import check_logits, default_image, run_local
from mm_train.config import ModelConfig, mm_pipeline_layers, to_mm
from mm_train.inputs import build_inputs, hf_kwargs, load_processors

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = {  # (tp, pp) -> (llm_pp_layers, vit_pp_layers)
    (1, 1): ([4], [4]),
    (2, 1): ([4], [4]),
    (1, 2): ([1, 3], [4, 0]),    # vision + 1 LLM layer, then 3 LLM layers
    (2, 2): ([0, 4], [2, 2]),    # vision split over both stages, the LLM starts on stage 1
}
PROMPT = "Describe this image."


def reweight(hf_dir: Path, bias_scale: float, matrix_scale: float) -> Path:
    from safetensors.torch import load_file, save_file

    path = hf_dir / "model.safetensors"
    sd = load_file(path)
    for k, v in sd.items():
        if v.dim() >= 2:
            sd[k] = v * matrix_scale
        elif k.endswith(".bias"):
            sd[k] = (v - 1) * bias_scale  # make_tiny_hf_checkpoint draws 1-D tensors around 1
    save_file(sd, path, metadata={"format": "pt"})
    return hf_dir


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    """kind ("tied" | "untied" | "generate") -> tiny HF checkpoint directory (fp32, with tokenizer files)."""
    from mm_convert.testing import make_tiny_hf_checkpoint

    cache = {}

    def make(kind: str) -> Path:
        if kind not in cache:
            d = make_tiny_hf_checkpoint(tmp_path_factory.mktemp(f"hf_{kind}"), tied=kind == "tied")
            cache[kind] = reweight(d, 0.1, 10.0) if kind == "generate" else reweight(d, 0.1, 3.0)
        return cache[kind]
    return make


@pytest.fixture(scope="module")
def mm_ckpt(tmp_path_factory, hf_ckpt):
    """(kind, tp, llm_pp_layers, vit_pp_layers) -> MM checkpoint written by the converter."""
    from mm_convert import Qwen2_5_VLConverter

    cache = {}

    def make(kind: str, tp: int, llm, vit) -> Path:
        key = (kind, tp, str(llm), str(vit))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"mm_{kind}_tp{tp}")
            Qwen2_5_VLConverter(progress=False).hf_to_mm(hf_ckpt(kind), out, tp_size=tp, llm_pp_layers=llm,
                                                          vit_pp_layers=vit, overwrite=True)
            cache[key] = out
        return cache[key]
    return make


# ---- logits ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["untied", "tied"])
@pytest.mark.parametrize("tp,pp", list(LAYOUTS))
def test_logits_equal_transformers(kind, tp, pp, hf_ckpt, mm_ckpt):
    llm, vit = LAYOUTS[tp, pp]
    lines = []
    worst = check_logits(mm_ckpt(kind, tp, llm, vit), hf_ckpt(kind), tp, llm, vit, tolerance=1e-5, log=lines.append)
    assert worst <= 1e-5
    assert [line.split(":")[0] for line in lines] == ["image+text", "text"]


def test_logits_virtual_pipeline(hf_ckpt, mm_ckpt):
    """VPP: two chunks per stage (model0/model1 in each shard), positions interleaved over the stages."""
    llm, vit = [[0, 1], [1, 2]], [[2, 2], [0, 0]]
    assert check_logits(mm_ckpt("untied", 2, llm, vit), hf_ckpt("untied"), 2, llm, vit, log=lambda s: None) <= 1e-5


def test_logits_smaller_vision_tp_layout_read_off_checkpoint(hf_ckpt, tmp_path):
    """vit_tp_size 1 under tp 2 (vision weights whole on both ranks), the layout left for check_logits to find."""
    from mm_convert import Qwen2_5_VLConverter

    hf = hf_ckpt("untied")
    Qwen2_5_VLConverter(progress=False).hf_to_mm(hf, tmp_path / "mm", tp_size=2, llm_pp_layers=[1, 3],
                                                  vit_pp_layers=[4, 0], vit_tp_size=1)
    lines = []
    assert check_logits(tmp_path / "mm", hf, log=lines.append) <= 1e-5
    assert "tp=2 vit_tp=1 pp=2" in lines[0]


def test_check_logits_fails_on_other_weights(hf_ckpt, mm_ckpt):
    """Same shapes, other weights: the difference is far above tolerance and check_logits says so."""
    llm, vit = LAYOUTS[1, 1]
    with pytest.raises(VerifyError, match="differ from transformers"):
        check_logits(mm_ckpt("generate", 1, llm, vit), hf_ckpt("untied"), 1, llm, vit, log=lambda s: None)


def test_check_logits_rejects_bad_layout(hf_ckpt, mm_ckpt):
    with pytest.raises(LayoutError, match="sums to 3"):
        check_logits(mm_ckpt("untied", 1, [4], [4]), hf_ckpt("untied"), 1, [3], [4])


def test_comparison_is_sensitive(hf_ckpt):
    """On the reweighted checkpoint, the features the runtime reimplements move the logits far above 1e-5."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = hf_ckpt("untied")
    cfg = ModelConfig.from_hf(hf)
    inputs = build_inputs(*load_processors(hf), cfg, PROMPT, default_image())
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf).eval()
    with torch.inference_mode():
        ref = model(**hf_kwargs(inputs)).logits
        model.model.visual.fullatt_block_indexes = list(range(cfg.vision.depth))  # no window attention
        full = model(**hf_kwargs(inputs)).logits
        model.model.visual.fullatt_block_indexes = list(cfg.vision.fullatt_block_indexes)
        flat = model(**hf_kwargs(inputs), position_ids=torch.arange(ref.shape[1]).view(1, 1, -1).expand(3, 1, -1)).logits
    assert (ref - full).abs().max() > 1e-3
    assert (ref - flat).abs().max() > 1e-3


# ---- generation --------------------------------------------------------------------------------------------

def test_generation_matches_transformers(hf_ckpt, mm_ckpt):
    """Greedy ids equal transformers' generate (image and text-only, with and without KV cache, with a
    repetition penalty); KV-cache step logits equal a full forward over the generated sequence; sampling is
    reproducible per seed and top_k=1 sampling is greedy."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = hf_ckpt("generate")
    cfg = ModelConfig.from_hf(hf)
    tok, improc = load_processors(hf)
    cases = {"image": build_inputs(tok, improc, cfg, PROMPT, default_image()),
             "text": build_inputs(tok, improc, cfg, "Write a haiku about the sea.")}
    n = 10
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf).eval()

    def hf_generate(case, **kw):
        inputs = cases[case]
        out = model.generate(**hf_kwargs(inputs), max_new_tokens=n, do_sample=False, **kw)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    ref = {"image": hf_generate("image"), "text": hf_generate("text"),
           "penalty": hf_generate("image", repetition_penalty=1.3)}
    assert len(set(ref["image"])) > 3, ref  # the checkpoint does not just repeat a token

    g = {"max_new_tokens": n, "eos_token_id": cfg.eos_token_ids}
    tasks = [{"kind": "generate", "case": "image", "generation": g, "record_logits": True},
             {"kind": "generate", "case": "text", "generation": g},
             {"kind": "generate", "case": "image", "generation": {**g, "use_cache": False}},
             {"kind": "generate", "case": "image", "generation": {**g, "repetition_penalty": 1.3}},
             {"kind": "generate", "case": "image", "generation": {**g, "do_sample": True, "top_k": 1, "seed": 5}},
             {"kind": "generate", "case": "image", "generation": {**g, "do_sample": True, "seed": 7}},
             {"kind": "generate", "case": "image", "generation": {**g, "do_sample": True, "seed": 7}}]
    llm, vit = LAYOUTS[2, 2]
    layout = ParallelLayout.create(2, llm, vit)
    greedy, text, no_cache, penalty, top1, sample_a, sample_b = run_local(
        mm_ckpt("generate", 2, llm, vit), cfg, layout, cases, tasks, timeout=600)

    assert greedy["ids"] == ref["image"]
    assert text == ref["text"]
    assert no_cache == ref["image"]
    assert penalty == ref["penalty"]
    assert top1 == ref["image"]
    assert sample_a == sample_b and len(sample_a) == n

    prompt = cases["image"]["input_ids"]
    full = torch.cat([prompt, torch.tensor([greedy["ids"][:-1]])], dim=1)
    kw = hf_kwargs({**cases["image"], "input_ids": full, "mm_token_type_ids": (full == cfg.image_token_id).int()})
    with torch.inference_mode():
        teacher = model(**kw).logits[0, prompt.shape[1] - 1:]
    scale = teacher.abs().max().item()
    assert (greedy["logits"] - teacher).abs().max().item() <= 1e-5 * max(1.0, scale)


def test_sampling_processors_match_transformers():
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    from mm_train.generate import GenerationConfig, process_scores

    torch.manual_seed(0)
    logits = torch.randn(320) * 3
    seen = [5, 17, 17, 200, 301]
    for gen in (GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),
                GenerationConfig(do_sample=True, temperature=1.3, top_p=0.5),
                GenerationConfig(do_sample=False, repetition_penalty=1.2)):
        procs = [RepetitionPenaltyLogitsProcessor(gen.repetition_penalty)]
        if gen.do_sample:
            procs += [TemperatureLogitsWarper(gen.temperature)]
            procs += [TopKLogitsWarper(gen.top_k)] if gen.top_k else []
            procs += [TopPLogitsWarper(gen.top_p)]
        want = LogitsProcessorList(procs)(torch.tensor([seen]), logits[None].clone())[0]
        got = process_scores(logits, seen, gen)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        assert torch.allclose(got[~torch.isinf(got)], want[~torch.isinf(want)], atol=1e-6)


def test_infer_cli(hf_ckpt, mm_ckpt, tmp_path):
    """python -m mm_train.infer with a MindSpeed-style inference json starts its ranks and decodes like
    transformers' generate (repetition penalty 1.05 as in the examples)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = hf_ckpt("generate")
    cfg = ModelConfig.from_hf(hf)
    llm, vit = [2, 2], [4, 0]
    image = tmp_path / "image.png"
    default_image().save(image)
    conf = {**to_mm(cfg, llm, vit), "load": str(mm_ckpt("generate", 1, llm, vit)), "tensor_model_parallel_size": 1,
            "tokenizer": {"from_pretrained": str(hf)}, "image_path": str(image), "prompts": PROMPT,
            "generation_config": {"do_sample": False, "kv_cache": True, "max_new_tokens": 8,
                                  "repetition_penalty": 1.05, "eos_token_id": [302, 300]}}
    (tmp_path / "infer.json").write_text(json.dumps(conf))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", "mm_train.infer", "--config", str(tmp_path / "infer.json"),
                           "--output", str(tmp_path / "out.json")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())

    tok, improc = load_processors(hf)
    inputs = build_inputs(tok, improc, cfg, PROMPT, image)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf).eval()
    ids = model.generate(**hf_kwargs(inputs), max_new_tokens=8, do_sample=False, repetition_penalty=1.05,
                         eos_token_id=[302, 300])[0, inputs["input_ids"].shape[1]:].tolist()
    assert out["ids"] == ids
    assert out["text"] == tok.decode(ids, skip_special_tokens=True)
    assert out["text"] in proc.stdout


# ---- strict loading ----------------------------------------------------------------------------------------

def _edit_shard(src: Path, dst: Path, shard: str, edit) -> None:
    import shutil

    shutil.copytree(src, dst)
    path = dst / "release" / shard / "model_optim_rng.pt"
    obj = torch.load(path, weights_only=True)
    edit(obj["model"])
    torch.save(obj, path)


def test_missing_parameter_is_refused(hf_ckpt, mm_ckpt, tmp_path):
    llm, vit = LAYOUTS[1, 2]
    name = "text_decoder.decoder.layers.1.mlp.linear_fc2.weight"
    bad = tmp_path / "mm"
    _edit_shard(mm_ckpt("untied", 1, llm, vit), bad, "mp_rank_00_001", lambda sd: sd.pop(name))
    with pytest.raises(CheckpointError, match=rf"mp_rank_00_001.*missing parameter {name}"):
        check_logits(bad, hf_ckpt("untied"), 1, llm, vit, timeout=120, log=lambda s: None)


def test_wrong_shape_and_unexpected_parameters_are_refused(hf_ckpt, mm_ckpt, tmp_path):
    llm, vit = LAYOUTS[2, 1]
    name = "image_encoder.encoder.blocks.layers.2.self_attention.linear_qkv.weight"

    def edit(sd):
        sd[name] = sd[name][:-1]
        sd["text_decoder.decoder.layers.9.input_layernorm.weight"] = torch.ones(64)

    bad = tmp_path / "mm"
    _edit_shard(mm_ckpt("untied", 2, llm, vit), bad, "mp_rank_01", edit)
    with pytest.raises(CheckpointError) as err:
        check_logits(bad, hf_ckpt("untied"), 2, llm, vit, timeout=120, log=lambda s: None)
    assert f"parameter {name} has shape [47, 32], expected [48, 32]" in str(err.value)
    assert "unexpected parameter text_decoder.decoder.layers.9.input_layernorm.weight" in str(err.value)
    assert "mp_rank_01" in str(err.value)


# ---- inputs and configs ------------------------------------------------------------------------------------

def test_inputs_expand_image_tokens_and_mrope_matches_transformers(hf_ckpt):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    from mm_train.positions import mrope_positions

    hf = hf_ckpt("untied")
    cfg = ModelConfig.from_hf(hf)
    tok, improc = load_processors(hf)
    inputs = build_inputs(tok, improc, cfg, PROMPT, default_image())
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 8]]  # 84 x 112 pixels in 14-pixel patches
    assert int((inputs["input_ids"] == cfg.image_token_id).sum()) == 6 * 8 // 4
    assert inputs["pixel_values"].shape == (48, 3 * 2 * 14 * 14)
    text = tok.decode(inputs["input_ids"][0])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert text.endswith(f"<|vision_end|>{PROMPT}<|im_end|>\n<|im_start|>assistant\n")

    # two images of different grids between text runs, against transformers' get_rope_index
    img = cfg.image_token_id
    ids = torch.tensor([[1, 2, 303] + [img] * 4 + [304, 7, 303] + [img] * 12 + [304, 9, 9]])
    grids = torch.tensor([[1, 4, 4], [1, 6, 8]])
    model = Qwen2_5_VLModel(Qwen2_5_VLConfig(**json.loads((hf / "config.json").read_text())))
    want, want_delta = model.get_rope_index(ids, mm_token_type_ids=(ids == img).int(), image_grid_thw=grids)
    got, delta = mrope_positions(ids, grids, img, 2)
    assert torch.equal(got, want) and delta == int(want_delta)


def test_tiny_processor_loads_offline(tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer

    from mm_convert.testing import tiny_config_dict
    from mm_convert.testing.tiny_tokenizer import SPECIAL_TOKENS, write_tiny_processor

    write_tiny_processor(tmp_path, "Qwen2_5_VLProcessor")
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(300, 308))
    assert tok.decode(tok("héllo wörld")["input_ids"]) == "héllo wörld"  # byte-level: any text round-trips
    assert max(tok("the quick brown fox")["input_ids"]) < 300
    assert AutoImageProcessor.from_pretrained(tmp_path).merge_size == 2
    try:
        import torchvision  # noqa: F401  (transformers 5 needs it for Qwen2.5-VL's video processor)
    except ImportError:
        return
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tmp_path)
    cfg = ModelConfig.from_hf(tiny_config_dict())
    mine = build_inputs(tok, processor.image_processor, cfg, PROMPT, default_image())
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
                                         add_generation_prompt=True, tokenize=False)
    theirs = processor(text=[text], images=[default_image()], return_tensors="pt")
    assert torch.equal(theirs["input_ids"], mine["input_ids"])


def test_model_config_sources_agree():
    """Flat hub config, transformers' nested config and the MM json describe the same model."""
    from transformers import Qwen2_5_VLConfig

    from mm_convert.testing import tiny_config_dict

    flat = ModelConfig.from_hf(tiny_config_dict())
    assert ModelConfig.from_hf(Qwen2_5_VLConfig(**tiny_config_dict()).to_dict()) == flat
    mm = ModelConfig.from_mm(to_mm(flat, [4], [4]))
    assert (mm.vision, mm.text, mm.image_token_id) == (flat.vision, flat.text, flat.image_token_id)
    assert ModelConfig.from_dict(flat.to_dict()) == flat
    assert flat.text.mrope_section == (2, 3, 3) and flat.vision.fullatt_block_indexes == (1, 3)


CONVERTER_LAYOUTS = {  # the hf_to_mm commands of MindSpeed-MM's Qwen2.5-VL guide: tp, llm, vit
    "3b": (1, [36], [32]), "7b": (1, [1, 10, 10, 7], [32, 0, 0, 0]),
    "32b": (2, [4, 9, 9, 9, 9, 9, 9, 6], [32, 0, 0, 0, 0, 0, 0, 0]), "72b": (8, [14, 23, 23, 20], [32, 0, 0, 0]),
}


@pytest.mark.parametrize("size", list(CONVERTER_LAYOUTS))
def test_example_inference_configs(size):
    conf = json.loads((REPO / "examples/qwen2.5vl" / f"inference_qwen2_5_vl_{size}.json").read_text())
    cfg = ModelConfig.from_mm(conf)
    tp, llm, vit = CONVERTER_LAYOUTS[size]
    assert (conf["tensor_model_parallel_size"], *mm_pipeline_layers(conf)) == (tp, llm, vit)
    from mm_train.model import check_divisible

    check_divisible(cfg, ParallelLayout.create(tp, llm, vit))  # layer sums and TP splits fit the model
    from mm_convert.testing import published_config_path

    hf = ModelConfig.from_hf(published_config_path(size))  # the published HF config describes the same model
    assert hf.vision == cfg.vision and hf.text == cfg.text and hf.image_token_id == cfg.image_token_id
