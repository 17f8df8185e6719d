"""The kernel seam (train/kernels.py): which implementation is picked for a device, and every implementation
computing the reference's function. flash-attention and torch_npu are not installed here, so each is replaced
by a stand-in module written in plain torch from the kernel's documented interface (layouts, cu_seqlens /
actual_seq_qlen, causal alignment, grouped-query heads, the compressed causal mask, returned tuples); the
stand-ins check the arguments they are given, so the seam's argument plumbing is what these tests cover."""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from mm_train import kernels
from mm_train.kernels import FlashKernels, NpuKernels, TorchKernels


# ---- stand-ins ----------------------------------------------------------------------------------------------
def _attend(q, k, v, causal: bool, scale: float):
    """(Sq, Hq, D), (Sk, Hkv, D): plain softmax attention in fp32, causal aligned bottom-right, GQA by head // rep."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).float(), v.repeat_interleave(rep, 1).float()
    s = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if causal:
        sq, sk = q.shape[0], k.shape[0]
        s = s.masked_fill(torch.arange(sk)[None, :] > (sk - sq + torch.arange(sq))[:, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v).to(q.dtype)


def fake_flash_attn(calls: list) -> types.ModuleType:
    m = types.ModuleType("flash_attn")

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, **kw):
        assert q.dim() == k.dim() == 3 and q.shape[1] % k.shape[1] == 0, (q.shape, k.shape)
        assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
        lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
        assert max_seqlen_q == max_seqlen_k == max(lens) and int(cu_seqlens_q[-1]) == q.shape[0]
        assert dropout_p == 0.0
        calls.append(("varlen", causal, cu_seqlens_q.tolist()))
        bounds = cu_seqlens_q.tolist()
        return torch.cat([_attend(q[a:b], k[a:b], v[a:b], causal, softmax_scale) for a, b in zip(bounds[:-1], bounds[1:])])

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kw):
        assert q.dim() == 4 and q.shape[0] == k.shape[0] and q.shape[2] % k.shape[2] == 0  # (B, S, H, D)
        calls.append(("dense", causal, tuple(q.shape)))
        return torch.stack([_attend(q[b], k[b], v[b], causal, softmax_scale) for b in range(q.shape[0])])

    m.flash_attn_varlen_func, m.flash_attn_func = flash_attn_varlen_func, flash_attn_func
    return m


def fake_torch_npu(calls: list) -> types.ModuleType:
    m = types.ModuleType("torch_npu")

    def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                             scale=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647,
                             inner_precise=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                             gen_mask_parallel=True, sync=False):
        assert keep_prob == 1.0 and pse is None and padding_mask is None
        if sparse_mode == 3:  # rightDownCausal with the compressed 2048 x 2048 mask (True: masked out)
            assert atten_mask.dtype == torch.bool and atten_mask.shape == (2048, 2048)
            assert torch.equal(atten_mask, torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1))
            causal = True
        else:
            assert sparse_mode == 0 and atten_mask is None
            causal = False
        calls.append(("attention", input_layout, causal))
        if input_layout == "BNSD":
            assert query.shape[1] == head_num and query.shape[1] % key.shape[1] == 0
            out = torch.stack([_attend(query[b].transpose(0, 1), key[b].transpose(0, 1), value[b].transpose(0, 1),
                                       causal, scale).transpose(0, 1) for b in range(query.shape[0])])
        elif input_layout == "TND":
            assert query.shape[1] == head_num and actual_seq_qlen == actual_seq_kvlen
            assert all(isinstance(e, int) for e in actual_seq_qlen) and actual_seq_qlen[-1] == query.shape[0]
            bounds = [0] + list(actual_seq_qlen)
            out = torch.cat([_attend(query[a:b], key[a:b], value[a:b], causal, scale)
                             for a, b in zip(bounds[:-1], bounds[1:])])
        else:
            raise AssertionError(input_layout)
        return out, None, None, None, 0, 0, 0

    def npu_rms_norm(x, gamma, epsilon=1e-6):
        assert x.dtype == gamma.dtype
        calls.append(("rms_norm",))
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + epsilon)
        return (x.float() * rstd).to(x.dtype) * gamma, rstd

    def npu_rotary_mul(x, r1, r2, rotary_mode="half"):
        assert x.dim() == r1.dim() == r2.dim() == 4 and x.dtype == r1.dtype == r2.dtype
        calls.append(("rotary",))
        a, b = x.chunk(2, -1)
        return r1 * x + r2 * torch.cat([-b, a], -1)

    def npu_swiglu(x, dim=-1):
        assert x.is_contiguous()
        calls.append(("swiglu",))
        a, b = x.chunk(2, dim)
        return F.silu(a) * b

    m.npu_fusion_attention, m.npu_rms_norm = npu_fusion_attention, npu_rms_norm
    m.npu_rotary_mul, m.npu_swiglu = npu_rotary_mul, npu_swiglu
    return m


class FlashAnyDtype(FlashKernels):
    """The flash path for fp32 too (the real kernel has no fp32), so the model's fp32 outputs can be compared."""

    @staticmethod
    def _ok(q) -> bool:
        return True


# ---- the reference against plain loops ------------------------------------------------------------------------
def qkv(t=37, hq=4, hkv=2, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv)]


CU = torch.tensor([0, 5, 21, 22, 37], dtype=torch.int32)  # lengths 5, 16, 1, 15
WINDOWS = torch.tensor([0, 8, 16, 24, 32, 37], dtype=torch.int32)  # mostly one length, an edge window


@pytest.mark.parametrize("cu", [CU, WINDOWS, torch.tensor([0, 37], dtype=torch.int32)], ids=["mixed", "windows", "one"])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_varlen_equals_per_segment_loop(cu, causal):
    q, k, v = qkv()
    got = TorchKernels().varlen_attention(q, k, v, cu, None, causal)
    bounds = cu.tolist()
    want = torch.cat([_attend(q[a:b], k[a:b], v[a:b], causal, 8 ** -0.5) for a, b in zip(bounds[:-1], bounds[1:])])
    assert torch.allclose(got, want, atol=1e-6)


def test_reference_attention_with_cache_prefix():
    """Causal with a KV-cache prefix: the queries are the last positions (bottom-right)."""
    q, k, v = (t.transpose(0, 1)[None] for t in qkv())  # (1, H, S, D)
    full = TorchKernels().attention(q, k, v, causal=True)
    tail = TorchKernels().attention(q[:, :, -3:], k, v, causal=True)
    one = TorchKernels().attention(q[:, :, -1:], k, v, causal=True)
    assert torch.allclose(tail, full[:, :, -3:], atol=1e-6) and torch.allclose(one, full[:, :, -1:], atol=1e-6)


# ---- each implementation against the reference ----------------------------------------------------------------
def implementations(calls):
    return {"flash": FlashKernels(fake_flash_attn(calls)), "npu": NpuKernels(fake_torch_npu(calls))}


@pytest.mark.parametrize("name", ["flash", "npu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interface_equals_reference(name, dtype):
    calls: list = []
    kern, ref = implementations(calls)[name], TorchKernels()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    q, k, v = qkv(dtype=dtype)
    for cu in (CU, WINDOWS):
        for causal in (False, True):
            want = ref.varlen_attention(q.float(), k.float(), v.float(), cu, None, causal)
            got = kern.varlen_attention(q, k, v, cu, int((cu[1:] - cu[:-1]).max()), causal)
            assert got.shape == q.shape and (got.float() - want).abs().max() <= tol, (cu, causal)
    qb, kb, vb = (t.transpose(0, 1)[None].expand(2, -1, -1, -1).contiguous() for t in (q, k, v))  # (2, H, S, D)
    for sq in (37, 4, 1):  # prefill, several tokens after a cached prefix, one decode token
        want = ref.attention(qb[:, :, -sq:].float(), kb.float(), vb.float(), causal=True)
        got = kern.attention(qb[:, :, -sq:], kb, vb, causal=True)
        assert (got.float() - want).abs().max() <= tol, sq
    x = torch.randn(2, 5, 16).to(dtype)
    w = (1 + 0.1 * torch.randn(16)).to(dtype)
    assert (kern.rms_norm(x, w, 1e-6).float() - ref.rms_norm(x, w, 1e-6).float()).abs().max() <= tol
    cos, sin = torch.randn(2, 1, 5, 8).to(dtype), torch.randn(2, 1, 5, 8).to(dtype)
    xr = torch.randn(2, 3, 5, 8).to(dtype)
    assert (kern.rotary(xr, cos, sin).float() - ref.rotary(xr, cos, sin).float()).abs().max() <= tol
    assert (kern.swiglu(x).float() - ref.swiglu(x).float()).abs().max() <= tol
    kinds = {c[0] for c in calls}
    if name == "flash":  # fp16 / bf16 only: fp32 stays on the reference
        assert kinds == ({"varlen", "dense"} if dtype == torch.bfloat16 else set())
        if dtype == torch.bfloat16:
            assert ("varlen", True, CU.tolist()) in calls and ("dense", False, (2, 1, 4, 8)) in calls
    else:
        assert kinds == {"attention", "rms_norm", "rotary", "swiglu"}
        assert ("attention", "TND", True) in calls and ("attention", "BNSD", False) in calls


# ---- choice -------------------------------------------------------------------------------------------------
def test_choice_per_device(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed: import fails
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    assert type(kernels.choose("cpu")) is TorchKernels
    assert type(kernels.choose("cuda")) is TorchKernels  # CUDA without flash-attention: SDPA
    assert type(kernels.choose("npu")) is TorchKernels
    calls: list = []
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn(calls))
    monkeypatch.setitem(sys.modules, "torch_npu", fake_torch_npu(calls))
    assert type(kernels.choose("cpu")) is TorchKernels
    assert type(kernels.choose("cuda")) is FlashKernels
    assert type(kernels.choose("npu")) is NpuKernels
    monkeypatch.setenv(kernels.ENV, "torch")
    assert type(kernels.choose("cuda")) is TorchKernels
    monkeypatch.setenv(kernels.ENV, "bogus")
    with pytest.raises(ValueError, match="expected one of torch, flash, npu"):
        kernels.choose("cpu")


def test_use_says_the_choice_once(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    lines: list = []
    prev = kernels.set_active(TorchKernels())
    try:
        first = kernels.use("cpu", log=lines.append)
        assert kernels.use("cpu", log=lines.append) is first is kernels.active()
        assert lines == ["[kernels] torch: torch SDPA, unfused RMSNorm / rotary / SwiGLU (cpu)"]
    finally:
        kernels.set_active(prev)


# ---- the model through each implementation ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """A whole tiny Qwen2.5-VL (window and full-attention vision blocks, GQA) as one in-process stage, and inputs:
    an image + text prompt, and a packed training micro-batch of two samples."""
    from mm_convert import Qwen2_5_VLConverter
    from mm_convert.layout import ParallelLayout
    from mm_convert.testing import make_tiny_hf_checkpoint
    from mm_train.batch import collate_packed
    from mm_train.check_logits import default_image
    from mm_train.config import ModelConfig
    from mm_train.inputs import build_inputs, load_processors
    from mm_train.parallel import Group, ParallelState
    from mm_train.pipeline import load_stages

    tmp = tmp_path_factory.mktemp("kernels")
    hf = make_tiny_hf_checkpoint(tmp / "hf")
    Qwen2_5_VLConverter(progress=False).hf_to_mm(hf, tmp / "mm", tp_size=1)
    cfg = ModelConfig.from_hf(hf)
    one = Group(None, 0, 1)
    ps = ParallelState(0, 1, 1, 1, torch.device("cpu"), one, one)
    stages, _ = load_stages(cfg, ParallelLayout.create(1, [4], [4]), tmp / "mm", ps)
    tok, ip = load_processors(hf)
    prompt = build_inputs(tok, ip, cfg, "Describe this image.", default_image())
    infer = {k: prompt[k] for k in ("input_ids", "position_ids", "pixel_values", "image_grid_thw")}
    text = build_inputs(tok, ip, cfg, "Hi there, how are you?")
    samples = [{"input_ids": p["input_ids"][0], "labels": p["input_ids"][0],
                **({"pixel_values": p["pixel_values"], "image_grid_thw": p["image_grid_thw"]} if "pixel_values" in p else {})}
               for p in (prompt, text)]
    return stages[0], infer, collate_packed(samples, cfg)


@pytest.mark.parametrize("name", ["flash", "npu"])
def test_model_through_each_implementation(name, stage):
    """Logits of an image + text prompt and the loss of a packed micro-batch (with its gradients) equal the
    reference's within 1e-5; every kernel of the implementation was used."""
    model, infer, packed = stage
    model.returns_loss = True
    calls: list = []
    impls = {"flash": FlashAnyDtype(fake_flash_attn(calls)), "npu": NpuKernels(fake_torch_npu(calls))}

    def run(kern):
        prev = kernels.set_active(kern)
        try:
            model.zero_grad(set_to_none=True)
            for p in model.parameters():
                p.requires_grad_(True)
            with torch.no_grad():
                logits = model({}, dict(infer), None)["logits"]
            loss = model({}, dict(packed), None)["loss"]
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            return logits, loss.detach(), grads
        finally:
            kernels.set_active(prev)
            for p in model.parameters():
                p.requires_grad_(False)

    ref_logits, ref_loss, ref_grads = run(TorchKernels())
    logits, loss, grads = run(impls[name])
    assert (logits - ref_logits).abs().max() <= 1e-5
    assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(float(ref_loss)))
    assert max((grads[n] - g).abs().max().item() for n, g in ref_grads.items()) <= 1e-5
    kinds = {c[0] for c in calls}
    if name == "flash":
        assert kinds == {"varlen", "dense"}  # vision windows and packed samples: varlen; the prompt: dense
        assert any(c[0] == "varlen" and c[1] for c in calls) and any(c[0] == "varlen" and not c[1] for c in calls)
    else:
        assert kinds == {"attention", "rms_norm", "rotary", "swiglu"}
