"""The runtime's kernel seam: attention (batched with a KV-cache prefix, and variable-length over packed segments),
RMSNorm, rotary and SwiGLU, each with one interface and one implementation per backend.

- ``TorchKernels`` (the reference, and the CPU path): torch's scaled_dot_product_attention and plain ops.
- ``FlashKernels`` (CUDA, when ``flash_attn`` imports): ``flash_attn_varlen_func`` / ``flash_attn_func`` for fp16 /
  bf16 attention (fp32 has no flash kernel: the reference then); the rest as the reference.
- ``NpuKernels`` (Ascend, when ``torch_npu`` imports and an NPU is there): ``npu_fusion_attention`` (BNSD, and TND
  with ``actual_seq_qlen`` for variable lengths), ``npu_rms_norm``, ``npu_rotary_mul`` and ``npu_swiglu``.

``use(device)`` picks one at start (``MM_TRAIN_KERNELS=torch|flash|npu`` forces a choice) and says which, once;
``active()`` is what the model calls. Every implementation computes the same function as the reference (tests
compare them on CPU with stand-in kernels where the real ones are absent).

Layouts: ``attention`` takes q (B, Hq, Sq, D), k / v (B, Hkv, Sk, D) with Hq a multiple of Hkv (grouped-query
attention), causal meaning query i sees keys up to Sk - Sq + i (the queries are the last Sq positions: a KV-cache
prefix comes first). ``varlen_attention`` takes token-major q (T, Hq, D), k / v (T, Hkv, D) and ``cu_seqlens``
(int32, [0, end_1, ..., T]): each segment attends only within itself (vision windows, packed samples).
"""
from __future__ import annotations

import math
import os
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F

ENV = "MM_TRAIN_KERNELS"


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class TorchKernels:
    """The reference: torch SDPA and plain ops (any device, any dtype)."""

    name = "torch"
    describe = "torch SDPA, unfused RMSNorm / rotary / SwiGLU"

    def attention(self, q, k, v, causal: bool):
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        sq, sk = q.shape[2], k.shape[2]
        if not causal or sq == 1:
            return F.scaled_dot_product_attention(q, k, v)
        if sq == sk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        past = sk - sq  # several new tokens after a cached prefix
        mask = torch.arange(sk, device=q.device)[None, :] <= (past + torch.arange(sq, device=q.device))[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def varlen_attention(self, q, k, v, cu_seqlens, max_seqlen: int | None, causal: bool):
        """Segments of equal length run as one batched call (vision windows are mostly of one size)."""
        bounds = [int(b) for b in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
        by_len: dict[int, list[int]] = defaultdict(list)
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                by_len[b - a].append(a)
        total = q.shape[0]
        if len(by_len) == 1 and bounds[0] == 0 and bounds[-1] == total:  # one length, back to back: views only
            (length, starts), = by_len.items()
            n = len(starts)
            out = self.attention(*(t.view(n, length, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v)),
                                 causal)
            return out.transpose(1, 2).reshape(q.shape)
        outs, order = [], []
        for length, starts in by_len.items():
            n = len(starts)
            idx = (torch.tensor(starts, device=q.device)[:, None] + torch.arange(length, device=q.device)).reshape(-1)
            o = self.attention(*(t[idx].view(n, length, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v)),
                               causal)
            outs.append(o.transpose(1, 2).reshape(n * length, q.shape[1], q.shape[2]))
            order.append(idx)
        return q.new_zeros(q.shape).index_copy(0, torch.cat(order), torch.cat(outs))

    def rms_norm(self, x, weight, eps: float):
        """In fp32, cast back, then scaled (transformers' order)."""
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(dtype)

    def rotary(self, x, cos, sin):
        return x * cos + rotate_half(x) * sin

    def swiglu(self, x):
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class FlashKernels(TorchKernels):
    """flash-attention 2 (``flash_attn``) for fp16 / bf16 attention on CUDA; the reference otherwise."""

    name = "flash"
    describe = "flash_attn varlen / dense (fp16, bf16), torch SDPA for fp32, unfused RMSNorm / rotary / SwiGLU"

    def __init__(self, flash_attn=None):
        if flash_attn is None:
            import flash_attn
        self.fa = flash_attn

    @staticmethod
    def _ok(q) -> bool:
        return q.dtype in (torch.float16, torch.bfloat16)

    def attention(self, q, k, v, causal: bool):
        if not self._ok(q):
            return super().attention(q, k, v, causal)
        # (B, H, S, D) -> (B, S, H, D); flash-attention's causal mask is aligned bottom-right, as ours
        out = self.fa.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0,
                                      softmax_scale=1 / math.sqrt(q.shape[-1]), causal=causal and q.shape[2] > 1)
        return out.transpose(1, 2)

    def varlen_attention(self, q, k, v, cu_seqlens, max_seqlen: int | None, causal: bool):
        if not self._ok(q):
            return super().varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal)
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        if max_seqlen is None:
            max_seqlen = int((cu[1:] - cu[:-1]).max())
        return self.fa.flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, 0.0,
                                              softmax_scale=1 / math.sqrt(q.shape[-1]), causal=causal)


class NpuKernels(TorchKernels):
    """torch_npu's fused operators (Ascend)."""

    name = "npu"
    describe = "torch_npu npu_fusion_attention (BNSD / TND), npu_rms_norm, npu_rotary_mul, npu_swiglu"
    MASK = 2048  # the compressed causal mask npu_fusion_attention takes with sparse_mode 2 / 3

    def __init__(self, torch_npu=None):
        if torch_npu is None:
            import torch_npu
        self.npu = torch_npu
        self._mask: dict = {}

    def _causal_mask(self, device):
        if device not in self._mask:  # True = masked out: the upper triangle
            self._mask[device] = torch.triu(torch.ones(self.MASK, self.MASK, dtype=torch.bool, device=device), 1)
        return self._mask[device]

    def attention(self, q, k, v, causal: bool):
        kw = {}
        if causal and q.shape[2] > 1:  # sparse_mode 3: causal aligned bottom-right (rightDownCausal), any prefix
            kw = {"atten_mask": self._causal_mask(q.device), "sparse_mode": 3}
        return self.npu.npu_fusion_attention(q, k, v, q.shape[1], "BNSD", scale=1 / math.sqrt(q.shape[-1]),
                                             **kw)[0]

    def varlen_attention(self, q, k, v, cu_seqlens, max_seqlen: int | None, causal: bool):
        ends = [int(e) for e in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)[1:]]
        kw = {"atten_mask": self._causal_mask(q.device), "sparse_mode": 3} if causal else {}
        return self.npu.npu_fusion_attention(q, k, v, q.shape[1], "TND", scale=1 / math.sqrt(q.shape[-1]),
                                             actual_seq_qlen=ends, actual_seq_kvlen=ends, **kw)[0]

    def rms_norm(self, x, weight, eps: float):
        if weight.dtype != x.dtype:  # the fused kernel wants one dtype: keep the reference's casts
            return super().rms_norm(x, weight, eps)
        return self.npu.npu_rms_norm(x, weight, epsilon=eps)[0]

    def rotary(self, x, cos, sin):
        if x.dim() != 4 or cos.dim() != 4:
            return super().rotary(x, cos, sin)
        return self.npu.npu_rotary_mul(x, cos.to(x.dtype), sin.to(x.dtype))

    def swiglu(self, x):
        return self.npu.npu_swiglu(x.contiguous(), dim=-1)


IMPLEMENTATIONS = {"torch": TorchKernels, "flash": FlashKernels, "npu": NpuKernels}

_active: TorchKernels = TorchKernels()
_chosen_for: str | None = None


def device_type(device) -> str:
    """"cpu", "cuda", "npu" (a string works before torch_npu has registered the npu device type)."""
    return device.split(":")[0] if isinstance(device, str) else device.type


def choose(device: torch.device | str, forced: str | None = None) -> TorchKernels:
    """The implementation for ``device``: ``forced`` (or $MM_TRAIN_KERNELS) if given, else npu on an NPU when
    torch_npu imports, flash on CUDA when flash_attn imports, torch otherwise."""
    dev = device_type(device)
    forced = forced or os.environ.get(ENV) or None
    if forced:
        if forced not in IMPLEMENTATIONS:
            raise ValueError(f"{ENV}={forced!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
        return IMPLEMENTATIONS[forced]()
    if dev == "npu":
        try:
            return NpuKernels()
        except ImportError:
            pass
    if dev == "cuda":
        try:
            return FlashKernels()
        except ImportError:
            pass
    return TorchKernels()


def use(device: torch.device | str, forced: str | None = None, log=None) -> TorchKernels:
    """Pick the implementation for this process's device once (later calls for the same device keep it) and say
    which on local rank 0."""
    global _active, _chosen_for
    key = f"{device_type(device)}:{forced or os.environ.get(ENV) or ''}"
    if _chosen_for != key:
        _active, _chosen_for = choose(device, forced), key
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            (log or (lambda s: print(s, file=sys.stderr, flush=True)))(
                f"[kernels] {_active.name}: {_active.describe} ({device_type(device)})")
    return _active


def active() -> TorchKernels:
    return _active


def set_active(kernels: TorchKernels) -> TorchKernels:
    """Install ``kernels`` (tests); returns the previous one."""
    global _active, _chosen_for
    prev, _active, _chosen_for = _active, kernels, None
    return prev
