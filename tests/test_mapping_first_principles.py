"""An independent check of the HF -> MM mapping at tp 2, pp 1, derived from the format reference
(docs/mm-checkpoint-format.md) alone.

Nothing here calls mm_convert's plan or model-spec code: every expected MM tensor is rebuilt from the HF
tensors with plain torch slicing, following the doc's transforms (GQA interleave for the LLM QKV, per-head
[q_h; k_h; v_h] for the vision QKV, GLU split of linear_fc1, dim-0/dim-1 splits, replication), and
compared bit for bit (torch.equal) with what the converter wrote. Key sets are derived from the doc's table.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mm_convert import Qwen2_5_VLConverter
from mm_convert.testing import make_tiny_hf_checkpoint

TP = 2


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def converted(request, tmp_path_factory):
    dtype = request.param
    root = tmp_path_factory.mktemp(f"fp_{dtype}")
    hf_dir = make_tiny_hf_checkpoint(root / "hf", dtype=dtype)
    mm_dir = root / "mm"
    Qwen2_5_VLConverter(progress=False).hf_to_mm(hf_dir, mm_dir, tp_size=TP, llm_pp_layers=[[4]], vit_pp_layers=[[4]])
    cfg = json.loads((hf_dir / "config.json").read_text())
    hf = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        hf.update(load_file(f))
    shards = []
    for r in range(TP):
        obj = torch.load(mm_dir / "release" / f"mp_rank_{r:02d}" / "model_optim_rng.pt", weights_only=True)
        shards.append(obj)
    return dict(dtype=getattr(torch, dtype), cfg=cfg, hf=hf, shards=shards, mm_dir=mm_dir)


# ---- helpers: the doc's rules, written out independently ---------------------------------------------------

def chunk0(t: torch.Tensor, r: int, t_size: int = TP) -> torch.Tensor:
    assert t.shape[0] % t_size == 0
    n = t.shape[0] // t_size
    return t[r * n:(r + 1) * n]


def chunk1(t: torch.Tensor, r: int, t_size: int = TP) -> torch.Tensor:
    assert t.shape[1] % t_size == 0
    n = t.shape[1] // t_size
    return t[:, r * n:(r + 1) * n]


def llm_qkv_rank(q, k, v, heads, kv_heads, r, t_size=TP):
    """Rows of linear_qkv (weight or bias) owned by rank r: whole query groups, contiguous."""
    d = q.shape[0] // heads
    per_group = heads // kv_heads
    assert kv_heads % t_size == 0
    groups_per_rank = kv_heads // t_size
    parts = []
    for g in range(r * groups_per_rank, (r + 1) * groups_per_rank):
        parts.append(q[g * per_group * d:(g + 1) * per_group * d])
        parts.append(k[g * d:(g + 1) * d])
        parts.append(v[g * d:(g + 1) * d])
    return torch.cat(parts, 0)


def vit_qkv_rank(qkv, heads, r, t_size=TP):
    """HF fused [q; k; v] -> per head [q_h; k_h; v_h]; rank r owns heads r*h/t .. (r+1)*h/t - 1."""
    hidden = qkv.shape[0] // 3
    d = hidden // heads
    q, k, v = qkv[:hidden], qkv[hidden:2 * hidden], qkv[2 * hidden:]
    per_rank = heads // t_size
    parts = []
    for h in range(r * per_rank, (r + 1) * per_rank):
        parts += [q[h * d:(h + 1) * d], k[h * d:(h + 1) * d], v[h * d:(h + 1) * d]]
    return torch.cat(parts, 0)


def glu_rank(gate, up, r, t_size=TP):
    return torch.cat([chunk0(gate, r, t_size), chunk0(up, r, t_size)], 0)


def expected_rank_state(hf: dict, cfg: dict, r: int) -> dict:
    """The whole MM state dict of tp rank r (pp 1), built from the doc's table and transforms."""
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    vheads = cfg["vision_config"]["num_heads"]
    exp = {}
    # vision encoder
    exp["image_encoder.encoder.patch_embed.proj.weight"] = hf["visual.patch_embed.proj.weight"]
    for n in range(cfg["vision_config"]["depth"]):
        s, m = f"visual.blocks.{n}.", f"image_encoder.encoder.blocks.layers.{n}."
        exp[m + "input_layernorm.weight"] = hf[s + "norm1.weight"]
        exp[m + "pre_mlp_layernorm.weight"] = hf[s + "norm2.weight"]
        exp[m + "self_attention.linear_qkv.weight"] = vit_qkv_rank(hf[s + "attn.qkv.weight"], vheads, r)
        exp[m + "self_attention.linear_qkv.bias"] = vit_qkv_rank(hf[s + "attn.qkv.bias"], vheads, r)
        exp[m + "self_attention.linear_proj.weight"] = chunk1(hf[s + "attn.proj.weight"], r)
        exp[m + "self_attention.linear_proj.bias"] = hf[s + "attn.proj.bias"]
        exp[m + "mlp.linear_fc1.weight"] = glu_rank(hf[s + "mlp.gate_proj.weight"], hf[s + "mlp.up_proj.weight"], r)
        exp[m + "mlp.linear_fc1.bias"] = glu_rank(hf[s + "mlp.gate_proj.bias"], hf[s + "mlp.up_proj.bias"], r)
        exp[m + "mlp.linear_fc2.weight"] = chunk1(hf[s + "mlp.down_proj.weight"], r)
        exp[m + "mlp.linear_fc2.bias"] = hf[s + "mlp.down_proj.bias"]
    # projector (merger)
    exp["image_encoder.projector.layernorm.weight"] = hf["visual.merger.ln_q.weight"]
    exp["image_encoder.projector.encoder.linear_fc1.weight"] = chunk0(hf["visual.merger.mlp.0.weight"], r)
    exp["image_encoder.projector.encoder.linear_fc1.bias"] = chunk0(hf["visual.merger.mlp.0.bias"], r)
    exp["image_encoder.projector.encoder.linear_fc2.weight"] = chunk1(hf["visual.merger.mlp.2.weight"], r)
    exp["image_encoder.projector.encoder.linear_fc2.bias"] = hf["visual.merger.mlp.2.bias"]
    # text decoder
    exp["text_decoder.embedding.word_embeddings.weight"] = chunk0(hf["model.embed_tokens.weight"], r)
    for n in range(cfg["num_hidden_layers"]):
        s, m = f"model.layers.{n}.", f"text_decoder.decoder.layers.{n}."
        exp[m + "input_layernorm.weight"] = hf[s + "input_layernorm.weight"]
        exp[m + "pre_mlp_layernorm.weight"] = hf[s + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias"):
            exp[m + f"self_attention.linear_qkv.{kind}"] = llm_qkv_rank(
                hf[s + f"self_attn.q_proj.{kind}"], hf[s + f"self_attn.k_proj.{kind}"],
                hf[s + f"self_attn.v_proj.{kind}"], heads, kv, r)
        exp[m + "self_attention.linear_proj.weight"] = chunk1(hf[s + "self_attn.o_proj.weight"], r)
        exp[m + "mlp.linear_fc1.weight"] = glu_rank(hf[s + "mlp.gate_proj.weight"], hf[s + "mlp.up_proj.weight"], r)
        exp[m + "mlp.linear_fc2.weight"] = chunk1(hf[s + "mlp.down_proj.weight"], r)
    exp["text_decoder.decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    exp["text_decoder.output_layer.weight"] = chunk0(hf["lm_head.weight"], r)
    return exp


def real_keys(sd: dict) -> set:
    """Keys minus Megatron's ``_extra_state`` entries (whose value is None; readers skip them)."""
    return {k for k, v in sd.items() if not k.endswith("_extra_state")}


# ---- the tests --------------------------------------------------------------------------------------------

def test_hf_checkpoint_is_what_the_test_assumes(converted):
    cfg, hf = converted["cfg"], converted["hf"]
    assert cfg["num_attention_heads"] == 4 and cfg["num_key_value_heads"] == 2 and cfg["hidden_size"] == 64
    assert cfg["vision_config"]["num_heads"] == 4 and cfg["vision_config"]["hidden_size"] == 32
    assert not cfg["tie_word_embeddings"] and "lm_head.weight" in hf
    assert all(t.dtype == converted["dtype"] for t in hf.values())
    # every HF tensor is distinct from the others (so a mix-up cannot pass by accident)
    flat = {k: v.float().flatten()[:8] for k, v in hf.items()}
    assert len({tuple(v.tolist()) for v in flat.values()}) == len(flat)


def test_shard_container(converted):
    assert (converted["mm_dir"] / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert sorted(p.name for p in (converted["mm_dir"] / "release").iterdir()) == ["mp_rank_00", "mp_rank_01"]
    for obj in converted["shards"]:
        assert set(obj) == {"model", "checkpoint_version"}
        assert obj["checkpoint_version"] == 3.0
        for k, v in obj["model"].items():
            if k.endswith("_extra_state"):
                assert v is None, k


@pytest.mark.parametrize("rank", range(TP))
def test_key_set_exact(converted, rank):
    exp = expected_rank_state(converted["hf"], converted["cfg"], rank)
    got = real_keys(converted["shards"][rank]["model"])
    assert sorted(got - set(exp)) == [], "unexpected keys"
    assert sorted(set(exp) - got) == [], "missing keys"
    # patch_embed + 4 blocks x 10 + projector 5 + embedding + 4 layers x 7 + final norm + output layer
    assert len(exp) == 1 + 4 * 10 + 5 + 1 + 4 * 7 + 2


def test_every_hf_tensor_is_used(converted):
    """The doc's table covers the whole HF checkpoint: building the expected MM state reads every HF tensor."""
    class Recording(dict):
        def __init__(self, d):
            super().__init__(d)
            self.read = set()

        def __getitem__(self, k):
            self.read.add(k)
            return super().__getitem__(k)

    hf = Recording(converted["hf"])
    for r in range(TP):
        expected_rank_state(hf, converted["cfg"], r)
    assert sorted(set(hf) - hf.read) == []


@pytest.mark.parametrize("rank", range(TP))
def test_every_tensor_bit_exact(converted, rank):
    exp = expected_rank_state(converted["hf"], converted["cfg"], rank)
    got = converted["shards"][rank]["model"]
    bad = []
    for k, e in exp.items():
        g = got.get(k)
        if g is None:
            bad.append(f"{k}: missing")
        elif g.dtype != e.dtype or g.shape != e.shape:
            bad.append(f"{k}: {g.dtype} {tuple(g.shape)} != expected {e.dtype} {tuple(e.shape)}")
        elif not torch.equal(g, e):
            bad.append(f"{k}: values differ")
    assert bad == []


def test_specific_llm_qkv_layout_by_hand(converted):
    """Spell the GQA interleave out for the tiny shape (4 heads, 2 kv heads, d 16): rank 0 holds group 0 =
    [q heads 0,1 (32 rows); k head 0 (16); v head 0 (16)], rank 1 holds group 1 likewise."""
    hf, shards = converted["hf"], converted["shards"]
    d = 16
    for n in range(converted["cfg"]["num_hidden_layers"]):
        for kind in ("weight", "bias"):
            q, k, v = (hf[f"model.layers.{n}.self_attn.{x}_proj.{kind}"] for x in "qkv")
            for r in range(TP):
                got = shards[r]["model"][f"text_decoder.decoder.layers.{n}.self_attention.linear_qkv.{kind}"]
                assert got.shape[0] == 64
                assert torch.equal(got[0:32], q[r * 32:(r + 1) * 32])
                assert torch.equal(got[32:48], k[r * d:(r + 1) * d])
                assert torch.equal(got[48:64], v[r * d:(r + 1) * d])


def test_specific_vit_qkv_layout_by_hand(converted):
    """Vision: hidden 32, 4 heads, d 8; HF qkv is [q(32); k(32); v(32)]; rank r holds heads 2r, 2r+1, each
    as [q_h; k_h; v_h] (24 rows)."""
    hf, shards = converted["hf"], converted["shards"]
    d = 8
    for n in range(converted["cfg"]["vision_config"]["depth"]):
        for kind in ("weight", "bias"):
            qkv = hf[f"visual.blocks.{n}.attn.qkv.{kind}"]
            for r in range(TP):
                got = shards[r]["model"][f"image_encoder.encoder.blocks.layers.{n}.self_attention.linear_qkv.{kind}"]
                assert got.shape[0] == 48
                for i, h in enumerate((2 * r, 2 * r + 1)):
                    blk = got[i * 24:(i + 1) * 24]
                    assert torch.equal(blk[0:8], qkv[h * d:(h + 1) * d])
                    assert torch.equal(blk[8:16], qkv[32 + h * d:32 + (h + 1) * d])
                    assert torch.equal(blk[16:24], qkv[64 + h * d:64 + (h + 1) * d])


def test_glu_split_is_not_chunk_of_concatenation(converted):
    """Rank 0's fc1 must be [gate[:48]; up[:48]], which differs from cat(gate, up)[:96] (= all of gate)."""
    hf, shards = converted["hf"], converted["shards"]
    gate, up = hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]
    got0 = shards[0]["model"]["text_decoder.decoder.layers.0.mlp.linear_fc1.weight"]
    assert not torch.equal(got0, torch.cat([gate, up])[:96])
    assert torch.equal(got0[:48], gate[:48]) and torch.equal(got0[48:], up[:48])


def test_replicated_tensors_equal_on_both_ranks(converted):
    a, b = (s["model"] for s in converted["shards"])
    replicated = [k for k in real_keys(a) if k.endswith(("layernorm.weight", "patch_embed.proj.weight"))
                  or k.endswith(("linear_proj.bias", "linear_fc2.bias"))]
    # 4 vision blocks x (2 norms + proj bias + fc2 bias) + patch_embed + projector norm + fc2 bias
    # + 4 LLM layers x 2 norms + final norm
    assert len(replicated) == 4 * 4 + 3 + 4 * 2 + 1
    for k in replicated:
        assert torch.equal(a[k], b[k]), k


def test_split_tensors_reassemble(converted):
    """Concatenating the ranks' dim-0 / dim-1 chunks gives the HF tensor back."""
    hf = converted["hf"]
    a, b = (s["model"] for s in converted["shards"])
    for mm, h, dim in [
        ("text_decoder.embedding.word_embeddings.weight", "model.embed_tokens.weight", 0),
        ("text_decoder.output_layer.weight", "lm_head.weight", 0),
        ("image_encoder.projector.encoder.linear_fc1.weight", "visual.merger.mlp.0.weight", 0),
        ("image_encoder.projector.encoder.linear_fc1.bias", "visual.merger.mlp.0.bias", 0),
        ("image_encoder.projector.encoder.linear_fc2.weight", "visual.merger.mlp.2.weight", 1),
        ("text_decoder.decoder.layers.3.self_attention.linear_proj.weight", "model.layers.3.self_attn.o_proj.weight", 1),
        ("text_decoder.decoder.layers.3.mlp.linear_fc2.weight", "model.layers.3.mlp.down_proj.weight", 1),
        ("image_encoder.encoder.blocks.layers.2.self_attention.linear_proj.weight", "visual.blocks.2.attn.proj.weight", 1),
        ("image_encoder.encoder.blocks.layers.2.mlp.linear_fc2.weight", "visual.blocks.2.mlp.down_proj.weight", 1),
    ]:
        assert torch.equal(torch.cat([a[mm], b[mm]], dim), hf[h]), mm
