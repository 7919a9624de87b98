"""A decode step's rotary embedding and cache write in one kernel: the new token's query rotated (and
LogN-scaled) into a contiguous tensor for the attention kernel, its key rotated and its value copied
straight into their cache slots. Unfused that is three launches per layer (the compiled rotary, then
one indexed write each for keys and values), each a few microseconds of a step that moves only a few
kilobytes. For an 8-bit cache it also quantizes (quant/kv.py: keys less their row's center, a scale
and minimum per token and head, codes rounded to nearest even), which unfused is some forty small
launches per layer (the casts, the center, four reductions, the scales, the rounding, six indexed writes).

The same arithmetic as models/layers.py `_rotary_qk` (rotate-half in fp32, LogN on the query, cast
back to the input's dtype) and quant/kv.py `quantize_kv` (divisions rounded as IEEE's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _codes(x1, x2, lo, s):
    """Codes of the two halves x1, x2 of a vector with minimum `lo` and step `s` (quant/kv.py:
    round to nearest even, clamp to 0..255)."""
    # x + 1.5 * 2**23 rounds x (|x| < 2**22) to the nearest integer, ties to even, as torch's round does
    y1 = (tl.math.div_rn(x1 - lo, s) + 12582912.0) - 12582912.0
    y2 = (tl.math.div_rn(x2 - lo, s) + 12582912.0) - 12582912.0
    y1 = tl.minimum(tl.maximum(y1, 0.0), 255.0)
    y2 = tl.minimum(tl.maximum(y2, 0.0), 255.0)
    return y1.to(tl.uint8), y2.to(tl.uint8)


@triton.jit
def _store_8bit(x1, x2, codes_ptr, scale_ptr, low_ptr, dst, meta, r, HALF: tl.constexpr):
    """One head vector (fp32 halves x1, x2) in quant/kv.py's format: codes at codes_ptr + dst, its fp16
    scale and minimum at scale_ptr/low_ptr + meta."""
    lo = tl.minimum(tl.min(x1, 0), tl.min(x2, 0))
    hi = tl.maximum(tl.max(x1, 0), tl.max(x2, 0))
    lo = tl.minimum(tl.maximum(lo, -65504.0), 65504.0)
    hi = tl.minimum(tl.maximum(hi, -65504.0), 65504.0)
    scale = tl.math.div_rn(hi - lo, 255.0).to(tl.float16)
    low = lo.to(tl.float16)
    s = scale.to(tl.float32)
    s = tl.where(s > 0, s, 1.0)  # a constant vector: every code 0
    c1, c2 = _codes(x1, x2, low.to(tl.float32), s)
    tl.store(codes_ptr + dst + r, c1)
    tl.store(codes_ptr + dst + HALF + r, c2)
    tl.store(scale_ptr + meta, scale)
    tl.store(low_ptr + meta, low)


@triton.jit
def _rotary_store(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, logn_ptr, slot_ptr, kc_ptr, vc_ptr, qo_ptr,
                  ks_ptr, kl_ptr, vs_ptr, vl_ptr, center_ptr,
                  stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_cb, stride_slot,
                  stride_cache_b, stride_cache_h, stride_cache_s, stride_ob, stride_oh,
                  stride_meta_b, stride_meta_h, stride_center_b, stride_center_h, HK,
                  HALF: tl.constexpr, HAS_LOGN: tl.constexpr, INT8: tl.constexpr):
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
        # the rotated key in the model's dtype, as the unfused rotary returns it
        k1 = (y1 * c1 - y2 * s1).to(q_ptr.dtype.element_ty)
        k2 = (y2 * c2 + y1 * s2).to(q_ptr.dtype.element_ty)
        v = v_ptr + b * stride_vb + h * stride_vh
        if INT8:  # keys less their row's center, then both in 8 bits (quant/kv.py)
            meta = b * stride_meta_b + h * stride_meta_h + slot
            center = center_ptr + b * stride_center_b + h * stride_center_h
            _store_8bit(k1.to(tl.float32) - tl.load(center + r), k2.to(tl.float32) - tl.load(center + HALF + r),
                        kc_ptr, ks_ptr, kl_ptr, dst, meta, r, HALF)
            _store_8bit(tl.load(v + r).to(tl.float32), tl.load(v + HALF + r).to(tl.float32),
                        vc_ptr, vs_ptr, vl_ptr, dst, meta, r, HALF)
        else:
            tl.store(kc_ptr + dst + r, k1.to(kc_ptr.dtype.element_ty))
            tl.store(kc_ptr + dst + HALF + r, k2.to(kc_ptr.dtype.element_ty))
            tl.store(vc_ptr + dst + r, tl.load(v + r))
            tl.store(vc_ptr + dst + HALF + r, tl.load(v + HALF + r))


def rotary_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 logn: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slots: torch.Tensor, int8: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """q (B, H, 1, D), k/v (B, H_kv, 1, D) (any strides along B and heads, contiguous along D); cos/sin
    (B, 1, D) fp32; logn (B, 1) or None; caches (B', H_kv, S, D) (rows [0, B) written, at slot
    slots[b] of row b). An 8-bit cache: uint8 caches and `int8` = (k_scale, k_low, v_scale, v_low)
    (B', H_kv, S) fp16 and the key centers (B', H_kv, D) fp32 (engine/cache.py's layer views).
    Returns the rotated query (B, H, D), contiguous, in q's dtype."""
    b, h, _, d = q.shape
    hk = k.shape[1]
    if d % 2 or d & (d - 1) or hk > h or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or \
            k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride() or cos.stride(-1) != 1:
        raise ValueError("rotary_store needs a power-of-two head size and contiguous heads")
    if int8 is not None:
        ks, kl, vs, vl, center = int8
        if not (ks.stride() == kl.stride() == vs.stride() == vl.stride() and ks.stride(-1) == 1
                and center.stride(-1) == 1 and k_cache.dtype == torch.uint8):
            raise ValueError("rotary_store: an 8-bit cache needs uint8 codes and slot-contiguous scales")
        meta = (ks.stride(0), ks.stride(1), center.stride(0), center.stride(1))
    else:
        ks = kl = vs = vl = center = q  # (not read)
        meta = (0, 0, 0, 0)
    cos, sin = cos.reshape(b, d), sin.reshape(b, d)
    if cos.stride() != sin.stride():
        sin = sin.contiguous()
        cos = cos.contiguous()
    out = torch.empty((b, h, d), dtype=q.dtype, device=q.device)
    _rotary_store[(b, h)](
        q, k, v, cos, sin, q if logn is None else logn.reshape(b), slots, k_cache, v_cache, out,
        ks, kl, vs, vl, center,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        slots.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1),
        *meta, hk, HALF=d // 2, HAS_LOGN=logn is not None, INT8=int8 is not None, num_warps=1)
    return out


def self_check(device: torch.device, dtype: torch.dtype, head_dim: int, int8: bool = False) -> str | None:
    """None if the kernel gives `_rotary_qk`'s query and the unfused cache writes (KVStore.store) on a
    small problem with the model's head size (q/k/v as views of one projection, LogN on, 8-bit keys with
    their centers; see kernels.kernel_works). 8-bit: the dequantized caches within one code's step."""
    from ..engine.cache import KVStore
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
    got, want = (KVStore(1, b, hk, s, d, dtype, device, int8=int8) for _ in range(2))
    if int8:
        center = torch.randn(b, hk, d, generator=g)
        got.k_center[0] = center.to(device)
        want.k_center[0] = center.to(device)
    rows, at = torch.arange(b, device=device), slots.to(device)

    def put(dst, x):
        dst[rows, :, at] = x[:, :, 0]

    want.store(0, want_k.to(device), v.to(device), put)
    layer = got.kernel_layer(0, b)
    out = rotary_store(q.to(device), k.to(device), v.to(device), cos.to(device), sin.to(device), logn.to(device),
                       layer[0], layer[1], at, int8=layer[2:7] if int8 else None)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # (of the largest value: a 16-bit float's rounding)
    checks = [("query", out.cpu(), want_q[:, :, 0])]
    for name, (gk, gv), (wk, wv) in (("cache", got.load(0, lambda t: t), want.load(0, lambda t: t)),):
        checks += [("key " + name, gk.cpu(), wk.cpu()), ("value " + name, gv.cpu(), wv.cpu())]
    for name, g_, w_ in checks:
        err = ((g_.float() - w_.float()).abs().max() / w_.float().abs().max()).item()
        limit = tol + (1.01 / 255 if int8 and name != "query" else 0)  # (8 bits: one code's step of the range)
        if not err <= limit:
            return f"{name}: relative error {err:.3g} against the unfused rotary and cache write"
    return None
