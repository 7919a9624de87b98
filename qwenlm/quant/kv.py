"""The 8-bit KV cache's number format.

Asymmetric uint8 with one fp16 scale and one fp16 minimum per token and head, rounded to nearest:
x ~ q * scale + low. Keys are centered first: each sequence's first chunk fixes, per layer and head,
the mean key c, and every key of that sequence is stored as k - c. Attention does not change —
q·(k_j - c) = q·k_j - q·c shifts all of a query's scores by the same amount, which softmax ignores —
but the few key channels that carry a large near-constant offset (Qwen2's k_proj biases, and the
slowly rotating rotary pairs) no longer stretch every token's 8-bit range. On the default model the
keys' error falls from +2.5% perplexity to nothing measurable (BENCHMARKS.md); values need no help.

It differs from the original's `use_cache_quantization` (spec §2.7) on purpose: the original shares
one scale per head over a whole forward chunk (one outlier token coarsens every other token of a
prompt, and a token's stored value depends on how its prompt was chunked), truncates instead of
rounding (a biased error, twice as large) and does not center keys. `fake_quantize_original` keeps the
original's arithmetic for comparisons (tests, benchmarks/kv_eval.py). Per-token scales cost 4 bytes per
token and head: the cache stores D + 4 bytes per head where bf16 stores 2·D, 1.94x the tokens for
D = 128 (3.8x against fp32, the CPU dtype).
"""

from __future__ import annotations

import torch

_FP16_MAX = 65504.0


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(..., D) float -> codes (..., D) uint8, scale (...) fp16, low (...) fp16."""
    xf = x.float()
    lo = xf.amin(-1).clamp(-_FP16_MAX, _FP16_MAX)
    hi = xf.amax(-1).clamp(-_FP16_MAX, _FP16_MAX)
    scale, low = ((hi - lo) / 255).half(), lo.half()
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))  # a constant vector: every code 0
    q = ((xf - low.float()[..., None]) / s[..., None]).round_().clamp_(0, 255).to(torch.uint8)
    return q, scale, low


def key_center(k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The center of a first chunk of keys (B, H, T, D): their mean over the real tokens (`mask`
    (B, T), None = all), (B, H, D) fp32. Padding is left out so a row's values do not depend on
    the batch it was prefilled in."""
    if mask is None:
        return k.float().mean(2)
    w = mask.to(torch.float32)[:, None, :, None]  # (B, 1, T, 1)
    return (k.float() * w).sum(2) / w.sum(2).clamp(min=1)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()[..., None] + low.float()[..., None]).to(dtype)


def fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """The values an int8 cache gives back for keys or values x (..., D)."""
    return dequantize_kv(*quantize_kv(x), x.dtype)


def fake_quantize_original(x: torch.Tensor) -> torch.Tensor:
    """The original's scheme on a chunk x (B, H, T, D): one scale/zero per (row, head) over the whole
    chunk, truncated codes (spec §2.7)."""
    f = x.float().flatten(2)
    lo, hi = f.amin(-1, keepdim=True), f.amax(-1, keepdim=True)
    scale = ((hi - lo) / 255)[..., None]
    zero = (-lo)[..., None] / scale
    q = (x.float() / scale + zero).clamp(0, 255).to(torch.uint8)
    return (scale * (q.float() - zero)).to(x.dtype)
