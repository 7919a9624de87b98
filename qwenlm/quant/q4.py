"""Q4 layers: 4-bit weights (blocks of 32, fp16 scale and minimum, like llama.cpp's Q4_1) multiplied
by int8-quantized activations in a hand-written AVX2 kernel (`csrc/q4_gemv.cpp`), built on first use
with torch's C++ extension loader. The same layer and kernel take 8-bit blocks (signed codes, fp16
scale and offset: GPTQ Int8 checkpoints, `quantize="int8"`) and 5-bit blocks in pairs (a GGUF file's Q5_0
layers, `quantize="gguf"`, gguf_blocks.py). A long prefill (more than 40 rows) dequantizes a layer to
fp32 and uses one matmul instead. `available()` says whether this machine can use it; otherwise `int4.py` serves.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

import torch
from torch import nn

log = logging.getLogger("qwenlm")
BLOCK = 32
_GEMV_MAX_ROWS = 40  # above this, dequantize (one C++ pass) + one fp32 matmul beats the kernel (BENCHMARKS.md)
# A layer larger than this (weights; the output head) is dequantized and multiplied a slice of its rows
# at a time, each slice about _TILE weights: its fp32 copy stays in cache, and memory does not grow
# by the whole layer in fp32 (545 MB for the default model's head). 64 rows x the head: 431 -> 171 ms.
_TILE_ABOVE = 1 << 24
_TILE = 1 << 20


@lru_cache(maxsize=1)
def _extension():
    import sys

    from torch.utils.cpp_extension import load

    # torch looks for `ninja` on PATH; a venv's python may run without the venv being activated
    extra = [os.path.dirname(sys.executable)]
    try:
        import ninja

        extra.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    os.environ["PATH"] = os.pathsep.join(extra + [os.environ.get("PATH", "")])
    src = os.path.join(os.path.dirname(__file__), "csrc", "q4_gemv.cpp")
    try:
        from torch.utils.cpp_extension import _get_build_directory

        built = os.path.join(_get_build_directory("qwenlm_q4", False), "qwenlm_q4.so")
        fresh = os.path.getmtime(built) >= os.path.getmtime(src)
    except Exception:  # private helper moved, or nothing built yet
        fresh = False
    (log.info if fresh else log.warning)("building the 4-bit CPU kernel (once, about 10 s)...")
    load("qwenlm_q4", [src], extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
         extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    return torch.ops.qwenlm_q4  # the ops the library registers (csrc/q4_gemv.cpp, TORCH_LIBRARY)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@lru_cache(maxsize=1)
def available() -> bool:
    """True when the CPU has AVX2/FMA/F16C and the kernel builds (QWENLM_Q4_KERNEL=0 disables it)."""
    if os.environ.get("QWENLM_Q4_KERNEL", "1") == "0" or not {"avx2", "fma", "f16c"} <= _cpu_flags():
        return False
    try:
        _extension()
        return True
    except Exception as e:  # no compiler / ninja: say why once, the caller falls back
        log.warning("4-bit AVX2 kernel unavailable (%s: %s)", type(e).__name__, str(e).splitlines()[0][:200])
        return False


_CHUNK_ROWS = 512  # rows quantized at a time: each pass over a chunk stays in cache (~5x faster at load)


def _by_rows(fn, weight: torch.Tensor, width: int) -> list[torch.Tensor]:
    """`fn` over chunks of `weight`'s rows, the pieces joined (after checking the blocks fit)."""
    n, k = weight.shape
    if k % width:
        raise ValueError(f"in_features {k} is not a multiple of {width}")
    parts = [fn(weight[i:i + _CHUNK_ROWS]) for i in range(0, n, _CHUNK_ROWS)]
    return [torch.cat(p) if len(parts) > 1 else p[0] for p in zip(*parts)]


def _q4_rows(weight: torch.Tensor):
    n, k = weight.shape
    w = weight.float().view(n, k // BLOCK, BLOCK)
    m = w.amin(-1).half()
    d = ((w.amax(-1) - m.float()) / 15).half()
    dd = d.float().clamp(min=1e-12)
    q = ((w - m.float()[..., None]) / dd[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    return pack_q4(q), d, m, q


def quantize_q4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) -> codes (N, K/32, 16) uint8, d and m (N, K/32) fp16, and the 0..15 codes (N, K/32, 32)."""
    return tuple(_by_rows(_q4_rows, weight, BLOCK))


def _q8_rows(weight: torch.Tensor):
    n, k = weight.shape
    w = weight.float().view(n, k // BLOCK, BLOCK)
    d = (w.abs().amax(-1) / 127).half()
    dd = d.float().clamp(min=1e-12)
    return (w / dd[..., None]).round_().clamp_(-127, 127).to(torch.int8), d


def _q8_rows_kernel(weight: torch.Tensor):
    return tuple(_extension().quantize_q8(weight.float().contiguous()))


def quantize_q8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) -> 8-bit blocks: codes (N, K/32, 32) int8 in [-127, 127], d = amax/127 and m = 0
    (N, K/32) fp16 (symmetric, rounded to nearest). In the C++ extension where it runs (one pass,
    bit-identical, ~1.3-4x faster), else `_q8_rows` (the same arithmetic in torch)."""
    codes, d = _by_rows(_q8_rows_kernel if available() else _q8_rows, weight, BLOCK)
    return codes.contiguous(), d, torch.zeros_like(d)


def pack_q4(q: torch.Tensor) -> torch.Tensor:
    """0..15 codes (N, K/32, 32) -> the kernel's bytes (N, K/32, 16): code j low, code j+16 high."""
    q = q.to(torch.uint8)
    return (q[..., :16] | (q[..., 16:] << 4)).contiguous()


def pack_q5(q: torch.Tensor) -> torch.Tensor:
    """0..31 codes (N, K/32, 32), K a multiple of 64 -> the kernel's 5-bit blocks (N, K/64, 40)."""
    q = q.to(torch.uint8)
    n, nb, _ = q.shape
    high = ((q >> 4) & 1).view(n, nb, 4, 8) << torch.arange(8, dtype=torch.uint8)
    return pack_q5_words(pack_q4(q & 0x0F), high.sum(-1, dtype=torch.uint8))


def pack_q5_words(nibbles: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    """4-bit blocks' bytes (N, K/32, 16) and each block's fifth bits as 4 bytes (N, K/32, 4) of a
    little-endian word whose bit j is code j's (llama.cpp's Q5_0 `qh`) -> 5-bit blocks (N, K/64, 40):
    for each pair of blocks, their nibbles, then 8 bytes: byte i has the fifth bits of codes i, 8+i,
    16+i, 24+i of the first block in bits 4..7 and of the second block in bits 0..3 (csrc/q4_gemv.cpp,
    pair_dot)."""
    n, nb, _ = nibbles.shape
    if nb % 2:
        raise ValueError("5-bit blocks come in pairs: in_features must be a multiple of 64")
    pairs = nb // 2
    bits = (qh.to(torch.uint8).view(n, pairs, 2, 4, 1) >> torch.arange(8, dtype=torch.uint8)) & 1  # [block, lane, i]
    shift = (torch.tensor([4, 0], dtype=torch.uint8).view(2, 1, 1) + torch.arange(4, dtype=torch.uint8).view(1, 4, 1))
    word = (bits << shift).sum((2, 3), dtype=torch.uint8)  # (N, K/64, 8): distinct bits, so the sum is an or
    return torch.cat((nibbles.reshape(n, pairs, 32), word), dim=-1).contiguous()


def unpack_codes(codes: torch.Tensor) -> torch.Tensor:
    """The kernel's code bytes -> one code per weight (N, K/32, 32): 0..15 (4 bits), 0..31 (5 bits)
    or -128..127 (8 bits)."""
    if codes.dtype == torch.int8:
        return codes
    if codes.shape[-1] == 16:
        return torch.cat((codes & 0x0F, codes >> 4), dim=-1)
    n, pairs, _ = codes.shape
    nib = codes[..., :32].reshape(n, pairs * 2, 16)
    q = torch.cat((nib & 0x0F, nib >> 4), dim=-1).view(n, pairs, 2, 4, 8)  # (pair, block, lane, i)
    w = codes[..., 32:].view(n, pairs, 1, 1, 8)
    shift = torch.tensor([[4], [0]], dtype=torch.uint8).view(1, 1, 2, 1, 1) + torch.arange(4, dtype=torch.uint8).view(1, 1, 1, 4, 1)
    q = q | (((w >> shift) & 1) << 4)
    return q.reshape(n, pairs * 2, 32)


def code_bits(codes: torch.Tensor) -> int:
    return 8 if codes.dtype == torch.int8 else 5 if codes.shape[-1] == 40 else 4


def block_count(codes: torch.Tensor) -> int:
    """Blocks of 32 per row."""
    return codes.shape[1] * (2 if code_bits(codes) == 5 else 1)


def dequantize_q4(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The (N, K) weight of 4-bit or 5-bit (uint8) or 8-bit (int8) blocks: d * q + m (in torch: the
    reference that the extension's one-pass `dequantize`, which the layers use, is tested against)."""
    q = unpack_codes(codes).float()  # (N, K/32, 32)
    w = q * d.float()[..., None] + m.float()[..., None]
    return w.view(codes.shape[0], -1)


class Q4Linear(nn.Module):
    """y = x @ W.T + b, W in 4-bit (or 8-bit) blocks of 32; decode rows go through the AVX2 GEMV."""

    def __init__(self, linear: nn.Linear | None = None, *, codes=None, d=None, m=None, bias=None, perm=None,
                 bits: int = 4):
        """From an nn.Linear (quantized here to `bits`, 4 or 8), or from ready blocks: `codes`
        (N, K/32, 16) or (N, K/64, 40) uint8 as `pack_q4`/`pack_q5` make them or (N, K/32, 32) int8,
        `d`/`m` (N, K/32) fp16, and optionally
        `perm`, the input-column order the blocks were built in (GPTQ act-order checkpoints)."""
        super().__init__()
        if linear is not None:
            if bits not in (4, 8):
                raise ValueError(f"a layer is quantized here to 4 or 8 bits, not {bits} (5-bit blocks come from GGUF files)")
            if bits == 8:
                codes, d, m = quantize_q8(linear.weight.detach())
            else:
                codes, d, m, _ = quantize_q4(linear.weight.detach())
            bias = None if linear.bias is None else linear.bias.detach()
        self.bits = code_bits(codes)
        self.out_features, self.in_features = codes.shape[0], block_count(codes) * BLOCK
        self.register_buffer("codes", codes)
        self.register_buffer("d", d)
        self.register_buffer("m", m)
        self.register_buffer("perm", perm)
        self.bias = None if bias is None else nn.Parameter(bias.float().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2[:, self.perm]
        if x2.shape[0] <= _GEMV_MAX_ROWS:
            xf = x2 if x2.dtype == torch.float32 and x2.is_contiguous() else x2.float().contiguous()
            y = _extension().q4_gemv(xf, self.codes, self.d, self.m)
        else:
            y = self._dequantized_matmul(x2.float())
        y = y.view(*shape[:-1], self.out_features)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _dequantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        # fp32, not bf16: CPUs without AVX512-BF16 multiply bf16 matrices slowly
        ext, n = _extension(), self.out_features
        if n * self.in_features <= _TILE_ABOVE:
            return x @ ext.dequantize(self.codes, self.d, self.m).t()
        y = torch.empty(x.shape[0], n)
        step = max(64, _TILE // self.in_features)
        for s in range(0, n, step):
            e = min(n, s + step)
            torch.matmul(x, ext.dequantize(self.codes[s:e], self.d[s:e], self.m[s:e]).t(), out=y[:, s:e])
        return y


def _concat_rows(layers: list[Q4Linear]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One (sum N, K/32, ...) weight for several layers; each layer's buffers become views into it,
    so the fused and the per-layer paths share memory."""
    if len(layers) == 1:
        return layers[0].codes, layers[0].d, layers[0].m
    packed = [torch.cat([getattr(lay, name) for lay in layers]) for name in ("codes", "d", "m")]
    start = 0
    for lay in layers:
        n = lay.out_features
        for name, t in zip(("codes", "d", "m"), packed):
            setattr(lay, name, t[start:start + n])
        start += n
    return tuple(packed)


def pack_blocks(model) -> list[list[torch.Tensor]] | None:
    """The weights of each decoder block in the order `decode_block` takes them, or None when the
    model cannot use the fused decode step (not all Q4, not fp32, no kernel, QWENLM_FUSED_DECODE=0)."""
    if os.environ.get("QWENLM_FUSED_DECODE", "1") == "0" or model.device.type != "cpu":
        return None
    if model.dtype != torch.float32 or not any(isinstance(m, Q4Linear) for m in model.modules()):
        return None
    if not available():
        return None
    cached = getattr(model, "_qwenlm_packs", None)
    if cached is not None:  # packing twice would copy the packed weights again
        return cached
    packs = []
    for block in model.blocks:
        p = block.parts() if hasattr(block, "parts") else None
        linears = [] if p is None else p["qkv"] + [p["o"], p["gate"], p["up"], p["down"]]
        if not linears or not all(isinstance(lay, Q4Linear) and lay.perm is None for lay in linears) \
                or p["o"].bias is not None \
                or any(lay.bias is not None for lay in (p["gate"], p["up"], p["down"])):
            return None
        qkv = _concat_rows(p["qkv"])
        biases = [lay.bias for lay in p["qkv"]]
        if all(b is None for b in biases):
            bias = torch.empty(0)
        else:
            bias = torch.cat([b.detach() if b is not None else torch.zeros(lay.out_features)
                              for b, lay in zip(biases, p["qkv"])]).float().contiguous()
        gu = _concat_rows([p["gate"], p["up"]])
        o, down = p["o"], p["down"]
        packs.append([p["ln1"].weight.detach().float().contiguous(), *qkv, bias, o.codes, o.d, o.m,
                      p["ln2"].weight.detach().float().contiguous(), *gu, down.codes, down.d, down.m])
    object.__setattr__(model, "_qwenlm_packs", packs)
    return packs


def fused_decode(model, packs, tok: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, logn: torch.Tensor | None,
                 kv, slot: torch.Tensor, valid: torch.Tensor, length: int) -> torch.Tensor:
    """One decode step of B = len(tok) rows, each block in one kernel call: cos/sin (B, D), logn (B)
    or None, kv an engine KVStore (float32 or int8; rows [0, B) used), slot (B,) where each row writes,
    valid (B, S) the slots each row reads among the first `length`. Returns the final-normed hidden (B, H)."""
    c, ext = model.config, _extension()
    b = tok.shape[0]
    h = model.embed(tok).float().contiguous()
    logn = logn.contiguous() if logn is not None else torch.empty(0)
    cos, sin, slot, valid = cos.contiguous(), sin.contiguous(), slot.contiguous(), valid.contiguous()
    for i, w in enumerate(packs):
        ext.decode_block(h, w, c.rms_eps, cos, sin, logn, list(kv.kernel_layer(i, b)), slot, valid, length,
                         c.num_heads, c.num_kv_heads)
    return model.final_norm(h)
