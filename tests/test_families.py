"""Qwen2-VL and Qwen3-VL (dense and MoE, with expert parallelism) through the converter: tiny checkpoints made
by transformers' own classes, hf_to_mm then mm_to_hf bit-exact over every layout kind, resplit equal to a
direct conversion, and the MM tensors checked from first principles (expert placement and numbering, deepstack
mergers on their vision blocks, fused expert tensors transposed per expert)."""
from __future__ import annotations

import pytest
import torch

from helpers import assert_same_tensors, load_hf_tensors, load_mm_shards
from mm_convert import CONVERTERS
from math import prod

from mm_convert.errors import LayoutError
from mm_convert.models import FAMILIES

LAYOUTS = {
    "tp1_pp1": dict(tp_size=1, llm_pp_layers=[4], vit_pp_layers=[4]),
    "tp2_pp2": dict(tp_size=2, llm_pp_layers=[1, 3], vit_pp_layers=[4, 0]),
    "vpp": dict(tp_size=1, llm_pp_layers=[[0, 1], [1, 2]], vit_pp_layers=[[2, 2], [0, 0]]),
    "vit_split": dict(tp_size=2, vit_tp_size=1, llm_pp_layers=[0, 4], vit_pp_layers=[2, 2]),
}
MOE_LAYOUTS = {
    "tp2_ep2_pp2": dict(tp_size=2, ep_size=2, llm_pp_layers=[1, 3], vit_pp_layers=[4, 0]),
    "tp2_ep4": dict(tp_size=2, ep_size=4, llm_pp_layers=[4], vit_pp_layers=[4]),
    "ep2_vpp": dict(tp_size=1, ep_size=2, llm_pp_layers=[[0, 1], [1, 2]], vit_pp_layers=[[2, 2], [0, 0]]),
}
# (family, variant, dtype, tied, expert layout of the files[, key scheme, config style])
MODELS = {
    "qwen2vl-newscheme-nested": ("Qwen2-VL", "", "float32", False, "linear", "new", "nested"),
    "qwen3moe-legacyscheme-nested": ("Qwen3-VL", "moe", "float32", False, "hub", "legacy", "nested"),
    "qwen2vl-fp32": ("Qwen2-VL", "", "float32", False, "linear"),
    "qwen2vl-bf16-tied": ("Qwen2-VL", "", "bfloat16", True, "linear"),
    "qwen3vl-fp32-tied": ("Qwen3-VL", "", "float32", True, "linear"),
    "qwen3vl-bf16": ("Qwen3-VL", "", "bfloat16", False, "linear"),
    "qwen3moe-fp32": ("Qwen3-VL", "moe", "float32", False, "linear"),
    "qwen3moe-bf16-hub": ("Qwen3-VL", "moe", "bfloat16", False, "hub"),
}
PLAIN = [m for m in MODELS if len(MODELS[m]) == 5]
CASES = [(m, l) for m in PLAIN for l in LAYOUTS] + [(m, l) for m in PLAIN if MODELS[m][1] == "moe" for l in MOE_LAYOUTS] \
    + [(m, "tp2_pp2") for m in MODELS if m not in PLAIN] + [("qwen3moe-legacyscheme-nested", "tp2_ep2_pp2")]


@pytest.fixture(scope="module")
def family_hf(tmp_path_factory):
    from mm_convert.testing import make_tiny_hf_checkpoint

    cache = {}

    def make(key):
        if key not in cache:
            fam, variant, dtype, tied, experts, *style = MODELS[key]
            scheme, config_style = style or (None, "published")
            cache[key] = make_tiny_hf_checkpoint(tmp_path_factory.mktemp(key), family_name=fam, variant=variant,
                                                 dtype=dtype, tied=tied, expert_layout=experts, scheme=scheme,
                                                 config_style=config_style)
        return cache[key]
    return make


def converter(key):
    from mm_convert.testing import family
    return CONVERTERS[family(MODELS[key][0]).CONVERTER](progress=False)


@pytest.mark.parametrize("model,layout", CASES, ids=[f"{m}-{l}" for m, l in CASES])
def test_round_trip_bit_exact(family_hf, tmp_path, model, layout):
    hf, conv = family_hf(model), converter(model)
    mm, back = tmp_path / "mm", tmp_path / "back"
    conv.hf_to_mm(hf, mm, **{**LAYOUTS, **MOE_LAYOUTS}[layout])
    assert conv.verify(hf, mm).ok
    conv.mm_to_hf(mm, back, hf_dir=hf)
    assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(back), f"{model} {layout}")


RESPLITS = [("qwen2vl-fp32", "tp2_pp2", "vpp"), ("qwen2vl-fp32", "vit_split", "tp1_pp1"),
            ("qwen3vl-bf16", "vpp", "vit_split"), ("qwen3moe-fp32", "tp2_ep2_pp2", "tp2_ep4"),
            ("qwen3moe-fp32", "tp2_ep4", "ep2_vpp"), ("qwen3moe-bf16-hub", "tp1_pp1", "tp2_ep2_pp2")]


@pytest.mark.parametrize("model,src,dst", RESPLITS, ids=[f"{m}-{a}-to-{b}" for m, a, b in RESPLITS])
def test_resplit_equals_direct_conversion(family_hf, tmp_path, model, src, dst):
    hf, conv = family_hf(model), converter(model)
    layouts = {**LAYOUTS, **MOE_LAYOUTS}
    conv.hf_to_mm(hf, tmp_path / "src", **layouts[src])
    conv.resplit(tmp_path / "src", tmp_path / "resplit", **layouts[dst])
    conv.hf_to_mm(hf, tmp_path / "direct", **layouts[dst])
    a, b = load_mm_shards(tmp_path / "resplit"), load_mm_shards(tmp_path / "direct")
    assert set(a) == set(b)
    for rel in a:
        for slot in (k for k in a[rel] if k.startswith("model")):
            assert_same_tensors(a[rel][slot], b[rel][slot], f"{rel} {slot}")


def test_expert_shards_from_first_principles(family_hf, tmp_path):
    """tp2 ep4 without a pipeline: shards mp_rank_TT_EEE; EP rank r holds global experts 2r, 2r + 1 as local
    0, 1; fc1 = [gate; up] of the expert's TP slice (gate_up_proj[e] is [gate | up] along its last axis in the
    hub layout), fc2 = down_proj[e] transposed, split on dim 1; non-expert tensors in every EP shard."""
    hf, conv = family_hf("qwen3moe-bf16-hub"), converter("qwen3moe-bf16-hub")
    conv.hf_to_mm(hf, tmp_path / "mm", **MOE_LAYOUTS["tp2_ep4"])
    shards = load_mm_shards(tmp_path / "mm")
    assert sorted(shards) == [f"mp_rank_{t:02d}_{e:03d}/model_optim_rng.pt" for t in range(2) for e in range(4)]
    src = load_hf_tensors(hf)
    gate_up, down = src["model.language_model.layers.0.mlp.experts.gate_up_proj"], src["model.language_model.layers.0.mlp.experts.down_proj"]
    experts, hidden, f2 = gate_up.shape
    f = f2 // 2
    for t in range(2):
        for e in range(4):
            sd = shards[f"mp_rank_{t:02d}_{e:03d}/model_optim_rng.pt"]["model"]
            for local in range(2):
                g = e * 2 + local
                p = "text_decoder.decoder.layers.0.mlp.experts.local_experts.%d." % local
                gate, up = gate_up[g, :, :f].T, gate_up[g, :, f:].T
                half = f // 2
                want = torch.cat([gate[t * half:(t + 1) * half], up[t * half:(t + 1) * half]])
                assert torch.equal(sd[p + "linear_fc1.weight"], want)
                assert torch.equal(sd[p + "linear_fc2.weight"], down[g].T[:, t * half:(t + 1) * half])
            assert "text_decoder.decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight" not in sd
            assert torch.equal(sd["text_decoder.decoder.layers.0.mlp.router.weight"],
                               src["model.language_model.layers.0.mlp.gate.weight"])
            assert "text_decoder.decoder.layers.1.mlp.linear_fc1.weight" in sd  # mlp_only_layers: a dense layer


def test_deepstack_mergers_live_on_their_vision_blocks(family_hf, tmp_path):
    """deepstack_visual_indexes [0, 2] with vision split [2, 2]: merger 0 on stage 0 block 0, merger 1 on
    stage 1 as its local block 0; q/k norms and the learned position embedding where MindSpeed-MM puts them."""
    hf, conv = family_hf("qwen3vl-fp32-tied"), converter("qwen3vl-fp32-tied")
    conv.hf_to_mm(hf, tmp_path / "mm", tp_size=1, llm_pp_layers=[0, 4], vit_pp_layers=[2, 2])
    shards = load_mm_shards(tmp_path / "mm")
    s0, s1 = (shards[f"mp_rank_00_{p:03d}/model_optim_rng.pt"]["model"] for p in range(2))
    src = load_hf_tensors(hf)
    ds = "image_encoder.encoder.blocks.layers.0.deepstack_layer."
    assert torch.equal(s0[ds + "layernorm.weight"], src["model.visual.deepstack_merger_list.0.norm.weight"])
    assert torch.equal(s1[ds + "encoder.linear_fc2.weight"], src["model.visual.deepstack_merger_list.1.linear_fc2.weight"])
    assert not any("layers.1.deepstack_layer" in k for k in (*s0, *s1))
    assert torch.equal(s0["image_encoder.encoder.pos_embed.weight"], src["model.visual.pos_embed.weight"])
    assert torch.equal(s1["text_decoder.decoder.layers.3.self_attention.k_layernorm.weight"],
                       src["model.language_model.layers.3.self_attn.k_norm.weight"])
    assert "text_decoder.output_layer.weight" in s1  # tied, pp 2: the last stage's copy of the embedding


def test_impossible_parallel_sizes_are_refused(family_hf, tmp_path):
    conv = converter("qwen3moe-fp32")
    with pytest.raises(LayoutError, match=r"ep_size 3 does not divide the num_experts \(8\)"):
        conv.hf_to_mm(family_hf("qwen3moe-fp32"), tmp_path / "a", tp_size=1, ep_size=3, llm_pp_layers=[4], vit_pp_layers=[4])
    with pytest.raises(LayoutError, match="no experts"):
        converter("qwen2vl-fp32").hf_to_mm(family_hf("qwen2vl-fp32"), tmp_path / "b", ep_size=2,
                                            llm_pp_layers=[4], vit_pp_layers=[4])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_key_schemes_and_config_layouts_are_kept(family_hf, tmp_path):
    """The files' key scheme and config layout come back as they were (transformers' nested config and the
    model.visual / model.language_model names for Qwen2-VL; the legacy names for Qwen3-VL)."""
    import json

    for key, prefix in (("qwen2vl-newscheme-nested", "model.language_model."), ("qwen3moe-legacyscheme-nested", "model.layers.")):
        hf, conv = family_hf(key), converter(key)
        assert "text_config" in json.loads((hf / "config.json").read_text())
        assert any(k.startswith(prefix) for k in load_hf_tensors(hf))
        conv.hf_to_mm(hf, tmp_path / key / "mm", tp_size=2, llm_pp_layers=[4], vit_pp_layers=[4])
        conv.mm_to_hf(tmp_path / key / "mm", tmp_path / key / "back")  # config from the manifest, no reference dir
        assert json.loads((tmp_path / key / "back" / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
        assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(tmp_path / key / "back"), key)


PUBLISHED_REFUSALS = [  # (family, size, tp, ep, message)
    ("Qwen3-VL", "30b_a3b", 1, 3, r"ep_size 3 does not divide the num_experts \(128\)"),
    ("Qwen3-VL", "235b_a22b", 8, 1, r"tp_size 8 does not divide the num_key_value_heads \(4\)"),
    ("Qwen3-VL", "8b", 1, 2, r"ep_size 2: this Qwen3-VL model has no experts"),
    ("Qwen2-VL", "7b", 8, 1, r"tp_size 8 does not divide the num_attention_heads \(28\), num_key_value_heads \(4\)"),
    ("Qwen2-VL", "2b", 4, 1, r"tp_size 4 does not divide the num_key_value_heads \(2\)"),
]


@pytest.mark.parametrize("fam,size,tp,ep,message", PUBLISHED_REFUSALS, ids=[f"{f}-{s}-tp{t}-ep{e}" for f, s, t, e, _ in PUBLISHED_REFUSALS])
def test_published_configs_refuse_impossible_sizes(fam, size, tp, ep, message):
    """Real sizes (the bundled published configs): an impossible TP / EP is refused in one line naming them."""
    import json

    from mm_convert.checkpoint import BoundModel, checked_layout
    from mm_convert.layout import LayoutOptions
    from mm_convert.testing import family, published_config_path

    spec = family(fam)
    cfg = spec.config_from_hf(json.loads(published_config_path(size, fam).read_text()), size)
    want = LayoutOptions(tp, [cfg.text.num_layers], [cfg.vision.depth], ep_size=ep)
    with pytest.raises(LayoutError, match=message) as e:
        checked_layout(BoundModel(spec, cfg), want, "--cfg.parallel_config")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fam,size", [(f.NAME, s) for f in FAMILIES for s in f.PUBLISHED])
def test_published_configs_read_and_plan(fam, size):
    """Every bundled published config reads, and plans at a layout its sizes allow (shapes only, no weights):
    the HF tensor count and bytes match the model's published parameter count."""
    import json

    from mm_convert.converter import BoundModel
    from mm_convert.layout import LayoutOptions
    from mm_convert.testing import family, published_config_path

    spec = family(fam)
    cfg = spec.config_from_hf(json.loads(published_config_path(size, fam).read_text()), size)
    model = BoundModel(spec, cfg)
    params = sum(prod(s) for s in model.shapes.values())
    billions = float(size.split("_")[0].rstrip("b"))
    assert 0.75 * billions < params / 1e9 < 1.25 * billions + 0.5, (size, params)
    ep = 2 if cfg.text.num_experts else 1
    # a vocabulary tp 2 does not divide (InternVL2.5-8B's 92553) is padded, as Megatron would
    layout = LayoutOptions(2, [cfg.text.num_layers], [cfg.vision.depth], ep_size=ep, make_vocab_size_divisible_by=1
                           ).resolve(cfg.text.num_layers, cfg.vision.depth, "p", cfg.text.vocab_size)
    files = model.plan(layout, {n: None for n in model.shapes})
    assert len(files) == 2 * ep


@pytest.mark.parametrize("chunk", [1 << 20, 16 << 10], ids=["1MiB-blocks", "16KiB-blocks"])
def test_expert_fast_path_round_trip_on_larger_experts(tmp_path, monkeypatch, chunk):
    """Experts large enough for the executor's slab + blocked-transpose path (hidden 256, moe_intermediate 160:
    [256, 320] per expert's gate_up), and with 16 KiB blocks the split of whole-expert rows of the 3-D HF tensor
    into smaller blocks: a synthetic hub-layout checkpoint through hf_to_mm (tp2 ep2) and back is bit-exact,
    and the MM experts equal the transposed HF slices."""
    import json

    import mm_convert.execute as execute
    from mm_convert.testing.synthetic import write_synthetic_checkpoint
    from mm_convert.testing import tiny_config_dict

    monkeypatch.setattr(execute, "CHUNK_BYTES", chunk)
    cfg = tiny_config_dict("Qwen3-VL", "moe")
    cfg["text_config"].update(hidden_size=256, moe_intermediate_size=160, intermediate_size=192, num_hidden_layers=2,
                              mlp_only_layers=[])
    cfg["vision_config"].update(out_hidden_size=256, depth=1, deepstack_visual_indexes=[0])
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    hf = write_synthetic_checkpoint(tmp_path / "cfg.json", tmp_path / "hf", max_shard_size=2 * 10**6)
    conv = CONVERTERS["Qwen3VLMegatronConverter"](progress=False, workers=2)
    conv.hf_to_mm(hf, tmp_path / "mm", tp_size=2, ep_size=2, llm_pp_layers=[2], vit_pp_layers=[1])
    src = load_hf_tensors(hf)
    shard = load_mm_shards(tmp_path / "mm")["mp_rank_01_001/model_optim_rng.pt"]["model"]
    gate_up = src["model.language_model.layers.1.mlp.experts.gate_up_proj"]  # [8, 256, 320]
    e, half = 4 + 3, 80  # EP rank 1's local expert 3; TP rank 1's halves of gate and up
    want = torch.cat([gate_up[e, :, half:160].T, gate_up[e, :, 160 + half:].T])
    assert torch.equal(shard["text_decoder.decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"], want)
    conv.mm_to_hf(tmp_path / "mm", tmp_path / "back", hf_dir=hf)
    assert_same_tensors(src, load_hf_tensors(tmp_path / "back"))
