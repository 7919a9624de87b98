"""Decode attention over the engines' KV store (engine/cache.py) in two Triton kernels, reading only
each row's valid slots and, for an 8-bit cache, the codes and their fp16 scale/minimum directly (no
dequantized copy of the layer).

Row b attends to slots [start[b], end[b]). The slots are cut into `splits` ranges, one program per
(row, query head, range) (flash-decoding: enough programs to fill the GPU at batch 1 and long
contexts); each keeps a running max, sum and weighted sum of values, and a second kernel merges the
ranges (with one range, as with many rows or few slots, the first kernel writes the output itself).
Keys of an 8-bit cache are stored centered (k - c, quant/kv.py): every score of a query moves by q·c,
which softmax ignores, so the center is never read here.

`start`, `end` are device tensors and the grid depends only on `length` (the slots that may be read),
so a call can be captured in a CUDA graph and replayed as the rows grow.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_partial(q_ptr, k_ptr, v_ptr, ks_ptr, kl_ptr, vs_ptr, vl_ptr, start_ptr, end_ptr,
                    acc_ptr, ml_ptr, sm_scale, split_len,
                    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_sb, stride_sh,
                    H, GROUPS, SPLITS, out_ptr, stride_ob, stride_oh,
                    D: tl.constexpr, BLOCK_S: tl.constexpr, INT8: tl.constexpr, DIRECT: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # b * stride_kb passes 2**31 in caches of over 2**31 elements a layer
    h = tl.program_id(1)
    sp = tl.program_id(2)
    hk = h // GROUPS
    rd = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rd).to(tl.float32) * sm_scale
    row_start = tl.load(start_ptr + b)
    row_end = tl.load(end_ptr + b)
    lo = sp * split_len
    m_i = -1.0e30
    l_i = 0.0
    acc = tl.zeros((D,), dtype=tl.float32)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_kb + hk * stride_kh
    for s0 in range(lo, lo + split_len, BLOCK_S):
        rs = s0 + tl.arange(0, BLOCK_S)
        ok = (rs >= row_start) & (rs < row_end)
        offs = rs[:, None] * stride_ks + rd[None, :]
        k = tl.load(k_base + offs, mask=ok[:, None], other=0).to(tl.float32)
        v = tl.load(v_base + offs, mask=ok[:, None], other=0).to(tl.float32)
        if INT8:
            meta = b * stride_sb + hk * stride_sh + rs
            k = k * tl.load(ks_ptr + meta, mask=ok, other=0).to(tl.float32)[:, None] + \
                tl.load(kl_ptr + meta, mask=ok, other=0).to(tl.float32)[:, None]
            v = v * tl.load(vs_ptr + meta, mask=ok, other=0).to(tl.float32)[:, None] + \
                tl.load(vl_ptr + meta, mask=ok, other=0).to(tl.float32)[:, None]
        scores = tl.sum(q[None, :] * k, axis=1)
        scores = tl.where(ok, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    if DIRECT:  # one range per row and head: the output itself, no partial sums to merge
        tl.store(out_ptr + b * stride_ob + h * stride_oh + rd, (acc / l_i).to(out_ptr.dtype.element_ty))
    else:
        part = (b * H + h) * SPLITS + sp
        tl.store(acc_ptr + part * D + rd, acc)
        tl.store(ml_ptr + part * 2, m_i)
        tl.store(ml_ptr + part * 2 + 1, l_i)


@triton.jit
def _decode_merge(acc_ptr, ml_ptr, out_ptr, stride_ob, stride_oh, H, SPLITS,
                  D: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    rp = tl.arange(0, BLOCK_P)
    rd = tl.arange(0, D)
    ok = rp < SPLITS
    base = (b * H + h) * SPLITS
    m = tl.load(ml_ptr + (base + rp) * 2, mask=ok, other=-1.0e30)
    l = tl.load(ml_ptr + (base + rp) * 2 + 1, mask=ok, other=0.0)
    acc = tl.load(acc_ptr + (base + rp)[:, None] * D + rd[None, :], mask=ok[:, None], other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + rd, out.to(out_ptr.dtype.element_ty))


# Launch settings (`benchmarks/kernel_sweep.py` times alternatives on a GPU; pass them as `config`):
# programs: the (row, head, range) programs aimed for (528: four per H100 SM); block_s: slots per loop step;
# min_blocks: the fewest loop steps a range gets; max_splits: the most ranges per row and head.
# The defaults are the sweep's best overall on an H100 (2026-11-24, BENCHMARKS.md): within 14% of each
# case's best; at batch 1, 1.35-2.2x faster than the earlier 32-slot blocks at 264 programs (the same at 64 rows).
ATTENTION = {"programs": 528, "block_s": 64, "min_blocks": 4, "max_splits": 64, "num_warps": 4}


def plan_splits(rows: int, heads: int, length: int, config: dict | None = None) -> tuple[int, int]:
    """(splits, slots per split) for `length` readable slots: enough programs, none reading fewer
    than `min_blocks` blocks of slots."""
    c = {**ATTENTION, **(config or {})}
    bs = c["block_s"]
    blocks = math.ceil(length / bs)
    splits = max(1, min(math.ceil(c["programs"] / (rows * heads)), blocks // c["min_blocks"], c["max_splits"]))
    per = math.ceil(blocks / splits) * bs
    return math.ceil(length / per), per


def decode_attention(q: torch.Tensor, layer: tuple[torch.Tensor, ...], start: torch.Tensor, end: torch.Tensor,
                     length: int, config: dict | None = None) -> torch.Tensor:
    """q (B, H, D), already rotated and LogN-scaled -> (B, H, D) attention output in q's dtype.

    `layer`: (k, v, k_scale, k_low, v_scale, v_low) of one layer, k/v (B', H_kv, S, D) in a float
    dtype or uint8 codes with (B', H_kv, S) fp16 scales (B' >= B; rows [0, B) are read).
    `start`/`end` (B,) int32: the valid slots of each row; `length` bounds `end` (sets the grid).
    `config` overrides entries of ATTENTION."""
    c = {**ATTENTION, **(config or {})}
    k, v, ks, kl, vs, vl = layer
    b, h, d = q.shape
    hk = k.shape[1]
    if d & (d - 1) or k.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("decode_attention needs a power-of-two head size and contiguous heads")
    int8 = k.dtype == torch.uint8
    splits, per = plan_splits(b, h, length, c)
    out = torch.empty((b, h, d), dtype=q.dtype, device=q.device)
    direct = splits == 1  # (many rows, or short rows: one launch, no merge)
    acc = out if direct else torch.empty((b, h, splits, d), dtype=torch.float32, device=q.device)
    ml = out if direct else torch.empty((b, h, splits, 2), dtype=torch.float32, device=q.device)
    if not int8:
        ks = kl = vs = vl = k  # unused pointers
    _decode_partial[(b, h, splits)](
        q, k, v, ks, kl, vs, vl, start, end, acc, ml, 1.0 / math.sqrt(d), per,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        ks.stride(0) if int8 else 0, ks.stride(1) if int8 else 0,
        h, h // hk, splits, out, out.stride(0), out.stride(1),
        D=d, BLOCK_S=c["block_s"], INT8=int8, DIRECT=direct, num_warps=c["num_warps"])
    if not direct:
        _decode_merge[(b, h)](acc, ml, out, out.stride(0), out.stride(1), h, splits, D=d,
                              BLOCK_P=max(2, triton.next_power_of_2(splits)))
    return out


def self_check(device: torch.device, dtype: torch.dtype, int8: bool, head_dim: int) -> str | None:
    """None if the kernel gives plain attention's output on a small problem with the model's head size
    (see kernels.kernel_works)."""
    from ..engine.cache import KVStore

    g = torch.Generator().manual_seed(0)
    b, h, hk, s, d = 2, 4, 2, 80, head_dim
    kv = KVStore(1, b, hk, s, d, dtype, device, int8=int8)
    k, v = (torch.randn(b, hk, s, d, generator=g).to(device, dtype) for _ in range(2))
    kv.store(0, k, v, lambda dst, x: dst.copy_(x), first=True)
    q = torch.randn(b, h, d, generator=g).to(device, dtype)
    start = torch.tensor([0, 3], dtype=torch.int32, device=device)
    end = torch.tensor([s, 41], dtype=torch.int32, device=device)
    out = decode_attention(q, kv.kernel_layer(0, b)[:6], start, end, s).float()
    kk, vv = (t.float() for t in kv.load(0, lambda t: t))
    slots = torch.arange(s, device=device)
    mask = (slots[None] >= start[:, None]) & (slots[None] < end[:, None])
    want = torch.nn.functional.scaled_dot_product_attention(q.float()[:, :, None], kk.repeat_interleave(h // hk, 1),
                                                            vv.repeat_interleave(h // hk, 1),
                                                            attn_mask=mask[:, None, None])[:, :, 0]
    err = (out - want).abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    return None if err <= tol else f"max error {err:.3g} against plain attention"
