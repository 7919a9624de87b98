"""A decode step's rotary embedding and cache write in one kernel: the new token's query rotated (and
LogN-scaled) into a contiguous tensor for the attention kernel, its key rotated and its value copied
straight into their cache slots. Unfused that is three launches per layer (the compiled rotary, then
one indexed write each for keys and values), each a few microseconds of a step that moves only a few
kilobytes. Float caches only: an 8-bit cache's quantization keeps its own path.

The same arithmetic as models/layers.py `_rotary_qk` (rotate-half in fp32, LogN on the query, cast
back to the input's dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_store(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, logn_ptr, slot_ptr, kc_ptr, vc_ptr, qo_ptr,
                  stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_cb, stride_slot,
                  stride_cache_b, stride_cache_h, stride_cache_s, stride_ob, stride_oh, HK,
                  HALF: tl.constexpr, HAS_LOGN: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.arange(0, HALF)
    c1 = tl.load(cos_ptr + b * stride_cb + r)
    c2 = tl.load(cos_ptr + b * stride_cb + HALF + r)
    s1 = tl.load(sin_ptr + b * stride_cb + r)
    s2 = tl.load(sin_ptr + b * stride_cb + HALF + r)
    q = q_ptr + b * stride_qb + h * stride_qh
    x1 = tl.load(q + r).to(tl.float32)
    x2 = tl.load(q + HALF + r).to(tl.float32)
    o1 = x1 * c1 - x2 * s1
    o2 = x2 * c2 + x1 * s2
    if HAS_LOGN:
        scale = tl.load(logn_ptr + b).to(tl.float32)
        o1 = o1 * scale
        o2 = o2 * scale
    qo = qo_ptr + b * stride_ob + h * stride_oh
    tl.store(qo + r, o1.to(qo_ptr.dtype.element_ty))
    tl.store(qo + HALF + r, o2.to(qo_ptr.dtype.element_ty))
    if h < HK:  # the programs of the first HK heads also write the key/value heads
        slot = tl.load(slot_ptr + b * stride_slot).to(tl.int64)
        dst = b.to(tl.int64) * stride_cache_b + h * stride_cache_h + slot * stride_cache_s
        k = k_ptr + b * stride_kb + h * stride_kh
        y1 = tl.load(k + r).to(tl.float32)
        y2 = tl.load(k + HALF + r).to(tl.float32)
        tl.store(kc_ptr + dst + r, (y1 * c1 - y2 * s1).to(kc_ptr.dtype.element_ty))
        tl.store(kc_ptr + dst + HALF + r, (y2 * c2 + y1 * s2).to(kc_ptr.dtype.element_ty))
        v = v_ptr + b * stride_vb + h * stride_vh
        tl.store(vc_ptr + dst + r, tl.load(v + r))
        tl.store(vc_ptr + dst + HALF + r, tl.load(v + HALF + r))


def rotary_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 logn: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slots: torch.Tensor) -> torch.Tensor:
    """q (B, H, 1, D), k/v (B, H_kv, 1, D) (any strides along B and heads, contiguous along D); cos/sin
    (B, 1, D) fp32; logn (B, 1) or None; caches (B', H_kv, S, D) (rows [0, B) written, at slot
    slots[b] of row b). Returns the rotated query (B, H, D), contiguous, in q's dtype."""
    b, h, _, d = q.shape
    hk = k.shape[1]
    if d % 2 or d & (d - 1) or hk > h or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or \
            k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride() or cos.stride(-1) != 1:
        raise ValueError("rotary_store needs a power-of-two head size and contiguous heads")
    cos, sin = cos.reshape(b, d), sin.reshape(b, d)
    if cos.stride() != sin.stride():
        sin = sin.contiguous()
        cos = cos.contiguous()
    out = torch.empty((b, h, d), dtype=q.dtype, device=q.device)
    _rotary_store[(b, h)](
        q, k, v, cos, sin, q if logn is None else logn.reshape(b), slots, k_cache, v_cache, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        slots.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1), hk,
        HALF=d // 2, HAS_LOGN=logn is not None, num_warps=1)
    return out


def self_check(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None if the kernel gives `_rotary_qk`'s query and key and the plain cache writes on a small
    problem with the model's head size (q/k/v as views of one projection, LogN on; see kernels.kernel_works)."""
    from ..models.layers import _rotary_qk, rotary_cos_sin

    g = torch.Generator().manual_seed(0)
    b, h, hk, s, d = 2, 4, 2, 16, head_dim
    qkv = torch.randn(b, 1, (h + 2 * hk) * d, generator=g).to(dtype)
    q = qkv[..., :h * d].view(b, 1, h, d).transpose(1, 2)
    k = qkv[..., h * d:(h + hk) * d].view(b, 1, hk, d).transpose(1, 2)
    v = qkv[..., (h + hk) * d:].view(b, 1, hk, d).transpose(1, 2)
    slots = torch.tensor([3, 15])
    cos, sin = rotary_cos_sin(slots[:, None], d, 10000.0)
    logn = torch.tensor([[1.0], [1.25]])
    want_q, want_k = _rotary_qk(q, k, cos, sin, logn)
    kc, vc = (torch.zeros(b, hk, s, d, dtype=dtype, device=device) for _ in range(2))
    out = rotary_store(q.to(device), k.to(device), v.to(device), cos.to(device), sin.to(device), logn.to(device),
                       kc, vc, slots.to(device))
    want_kc, want_vc = (torch.zeros(b, hk, s, d, dtype=dtype) for _ in range(2))
    want_kc[torch.arange(b), :, slots] = want_k[:, :, 0]
    want_vc[torch.arange(b), :, slots] = v[:, :, 0]
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # (of the largest value: a 16-bit float's rounding)
    for name, got, want in (("query", out, want_q[:, :, 0]), ("key cache", kc, want_kc), ("value cache", vc, want_vc)):
        err = ((got.float().cpu() - want.float()).abs().max() / want.float().abs().max()).item()
        if not err <= tol:
            return f"{name}: relative error {err:.3g} against the unfused rotary and cache write"
    return None
