"""GPTQ layers on the GPU: one Triton kernel reads the packed 4- or 8-bit codes, dequantizes them in
registers and multiplies, so the weights stay packed in memory (7B Int4: about a quarter of bf16's
bytes) and a decode step reads only those bytes.

Layout (from the checkpoint, quant/gptq.py): codes packed along the input dimension, 32/bits per
int32 (`qweight` (K*bits/32, N)); per group of `group` input rows, a scale and a zero per output
column, kept here as two fp16 (G, N) tensors (the zero unpacked, stored + 1). Act-order checkpoints
are sorted at load so that groups are contiguous; the activations are permuted to match. The kernels
take row strides, so a layer's tensors may be column slices of a wider matrix (FusedGPTQ).

Three kernels:
* rows <= 4 (decode), `_gptq_gemv`: one program per (column block, K split, row); each packed int32 is
  loaded once and unpacked in registers; products summed in fp32 without tensor cores; the K splits
  (enough programs to fill the GPU at batch 1) summed by a second kernel, by atomics, or by the last
  split of each column block (GEMV["split"]);
* more rows (batches), `_gptq_mm`: tiles of rows times columns through `tl.dot` in the activations'
  dtype;
* from 256 rows (prompts), `_gptq_dequant` writes the weight out once, a slice of columns at a time,
  for the BLAS's matmul.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn


@triton.jit
def _zero_offset(z, MAGIC: tl.constexpr):
    """The integer zeros z (fp32, BLOCK_N) as _codes_minus_zeros takes them: + 2**23 with MAGIC."""
    if MAGIC:
        return z + 8388608.0
    return z


@triton.jit
def _codes_minus_zeros(q, zz, MAGIC: tl.constexpr):
    """code - zero in fp32 for codes q (int32, ..., BLOCK_N) and zeros zz from _zero_offset: with MAGIC,
    through the float whose bits are those of 2**23 with q in its mantissa (see _gptq_gemv)."""
    if MAGIC:
        return (q | 0x4B000000).to(tl.float32, bitcast=True) - zz
    return q.to(tl.float32) - zz


@triton.jit
def _gptq_gemv(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, N, K, k_per_split, stride_xm, stride_qk, stride_sg, stride_ym,
               stride_ys, maxq, ws_ptr, cnt_ptr, b_ptr, SPLITS, BITS: tl.constexpr, GROUP: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr, MAGIC: tl.constexpr,
               FIXUP: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One activation row (program axis 2) times a block of columns, over one K split. The split's sum
    goes to y[split] (stride_ys; 0 with one split), or is added into y with atomics (ATOMIC), or (FIXUP)
    into an fp32 workspace with atomics, after which the program that finds itself the last of its
    column block's SPLITS (a counter per block and row) takes the total out of the workspace, zeroing
    it for the next call, adds the bias and writes y in its dtype: one launch, no second kernel.

    Decoding reads each weight once, so the instructions spent per weight set the speed once the
    memory keeps up (on an H100 the earlier version issued about ten per weight and ran at a third
    of the memory's speed). Here a (packed rows, columns) tile stays in the layout it was loaded in
    (no trip through shared memory), and each of the 32/BITS codes of an int32 is taken in turn
    (a static loop): shift, mask, to float, minus the zero, one multiply-add with its activation,
    into a per-(row, column) sum. A K block lies in one group, so the block's sums are scaled once
    per (row, column) and added up over rows only at the end.

    MAGIC: a code becomes a float by OR-ing it into the mantissa of 2**23 (the bits of 2**23 + code);
    `- (2**23 + zero)` then leaves code - zero exactly (zeros are integers): no int-to-float
    conversion, which GPUs run below the rate of their float operations. `maxq` (2**BITS - 1) is an
    argument, not a constant: with a constant mask ptxas extracts each code with a bit-field
    instruction that cannot take the OR too; with a register mask, mask and OR are one LOP3.
    Compiled for sm_90 (`python -m qwenlm.kernels.aot`, nvdisasm), the loop issues 5.2 instructions
    per 4-bit weight (shift, mask-and-OR, subtract, multiply-add; the activations' loads and the scales
    shared), against 9.3 in the earlier version."""
    PER: tl.constexpr = 32 // BITS
    ROWS: tl.constexpr = BLOCK_K // PER  # packed rows per K block
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rr = tl.arange(0, ROWS)
    k_start = pid_k * k_per_split
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    # K is a multiple of the group, hence of BLOCK_K: blocks need no mask along K (the last split stops at K)
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        prow = k0 // PER + rr
        packed = tl.load(qw_ptr + prow[:, None] * stride_qk + rn[None, :], mask=n_ok[None, :], other=0)
        g = k0 // GROUP  # BLOCK_K divides GROUP: the whole K block shares one group
        s = tl.load(s_ptr + g * stride_sg + rn, mask=n_ok, other=0).to(tl.float32)
        z = _zero_offset(tl.load(z_ptr + g * stride_sg + rn, mask=n_ok, other=0).to(tl.float32), MAGIC)
        xp = x_ptr + row * stride_xm + k0 + rr * PER  # (ROWS,): the activations of code 0 of each row
        part = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(PER):  # code j of each int32: k = k0 + r * PER + j
            w = _codes_minus_zeros((packed >> (j * BITS)) & maxq, z[None, :], MAGIC)
            x = tl.load(xp + j).to(tl.float32)
            part += x[:, None] * w
        acc += part * s[None, :]
    out = tl.sum(acc, axis=0)
    if FIXUP:
        ws = ws_ptr + row * N + rn
        tl.atomic_add(ws, out, mask=n_ok)
        tl.debug_barrier()  # every thread's share is in before the block counts itself done
        counter = cnt_ptr + row * tl.num_programs(0) + pid_n
        if tl.atomic_add(counter, 1) == SPLITS - 1:
            total = tl.atomic_add(ws, tl.zeros_like(out), mask=n_ok)  # read at L2, where the sums were made
            tl.store(ws, tl.zeros_like(out), mask=n_ok)
            if HAS_BIAS:
                total += tl.load(b_ptr + rn, mask=n_ok, other=0).to(tl.float32)
            tl.store(y_ptr + row * stride_ym + rn, total.to(y_ptr.dtype.element_ty), mask=n_ok)
            tl.atomic_xchg(counter, 0)
    else:
        ptr = y_ptr + pid_k * stride_ys + row * stride_ym + rn
        if ATOMIC:
            tl.atomic_add(ptr, out, mask=n_ok)
        else:
            tl.store(ptr, out.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _gptq_reduce(p_ptr, b_ptr, y_ptr, N, SPLITS, stride_ps, stride_pm, stride_ym,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[row] = sum of the K splits' partial sums (fp32) + bias, in y's dtype."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = tl.program_id(1)
    ok = rn < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for sp in range(0, SPLITS):
        acc += tl.load(p_ptr + sp * stride_ps + row * stride_pm + rn, mask=ok, other=0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=ok, other=0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gptq_mm(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_qk, stride_sg, stride_ym,
             BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """Tiles of rows times columns through tl.dot, each weight tile dequantized in registers."""
    PER: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        packed = tl.load(qw_ptr + (kk // PER)[:, None] * stride_qk + rn[None, :],
                         mask=k_ok[:, None] & n_ok[None, :], other=0)
        q = (packed >> ((kk % PER) * BITS)[:, None]) & MAXQ  # (BLOCK_K, BLOCK_N)
        g = k0 // GROUP
        s = tl.load(s_ptr + g * stride_sg + rn, mask=n_ok, other=0).to(tl.float32)
        z = tl.load(z_ptr + g * stride_sg + rn, mask=n_ok, other=0).to(tl.float32)
        w = _codes_minus_zeros(q, _zero_offset(z, True), True)  # integers of at most 8 bits: exact in any float dtype
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        if IEEE:  # fp32 activations: full-precision products, not TF32
            acc += tl.dot(x, w, input_precision="ieee") * s[None, :]
        else:
            acc += tl.dot(x, w.to(x.dtype)) * s[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gptq_dequant(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, stride_qk, stride_sg, stride_wk,
                  BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[k, n] = (code - zero) * scale for one block of K rows (within one group) and of columns,
    written in W's dtype: read once, for a dense matmul of many rows."""
    PER: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    ROWS: tl.constexpr = BLOCK_K // PER
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    k0 = tl.program_id(1) * BLOCK_K
    rr = tl.arange(0, ROWS)
    rj = tl.arange(0, PER)
    prow = k0 // PER + rr
    packed = tl.load(qw_ptr + prow[:, None] * stride_qk + rn[None, :],
                     mask=(prow * PER < K)[:, None] & n_ok[None, :], other=0)
    q = (packed[:, None, :] >> (rj * BITS)[None, :, None]) & MAXQ  # (ROWS, PER, BLOCK_N): k = k0 + r*PER + j
    g = k0 // GROUP
    s = tl.load(s_ptr + g * stride_sg + rn, mask=n_ok, other=0).to(tl.float32)
    z = tl.load(z_ptr + g * stride_sg + rn, mask=n_ok, other=0).to(tl.float32)
    w = _codes_minus_zeros(q, _zero_offset(z, True), True) * s
    kk = k0 + rr[:, None] * PER + rj[None, :]  # (ROWS, PER)
    tl.store(w_ptr + kk[:, :, None] * stride_wk + rn[None, None, :], w.to(w_ptr.dtype.element_ty),
             mask=(kk < K)[:, :, None] & n_ok[None, None, :])


_GEMV_ROWS = 4  # up to this many rows, the per-row kernel; above, tl.dot tiles
# From this many rows (a prompt, a large batch) the weight is dequantized once, a slice of columns at
# a time, and multiplied by the BLAS: the tiles above dequantize each weight tile once per tile of rows
# (16 times for 1,024 rows), and on the H100 a 2048-token 7B prefill took 6x bf16's time through them.
_DENSE_ROWS = 256
_DENSE_SLICE = 1 << 25  # weights per dequantized slice (64 MiB in bf16)
# Launch settings. `benchmarks/kernel_sweep.py` times alternatives on a GPU (pass them as `config`).
# programs: how many concurrent programs the one-row kernel aims for by splitting K (0: never split;
# 512 keeps an H100's 132 SMs reading); min_k_blocks: the shortest split, in K blocks; split: how the
# splits' sums meet, "reduce" (each written apart, then one small kernel adds them, the bias and the
# cast: two launches), "atomic" (fp32 atomics into a zeroed buffer, then a cast: three, plus the bias)
# or "fixup" (atomics into a kept workspace; the last split of each block finishes: one launch).
# The defaults are the sweep's best on an H100 (2026-11-24, BENCHMARKS.md "GPTQ speed"): over the 7B
# shapes, within 6% of each shape's best at 4 bits and the best at 8; the earlier 64-column blocks at
# 512 programs ran 4-11x slower (and made Int4 decoding 3x slower than bf16).
# magic: codes to floats by the bits of 2**23 (_gptq_gemv), not by conversion (False: for comparisons).
GEMV = {"block_n": 128, "block_k": 64, "programs": 1024, "min_k_blocks": 8, "num_warps": 4, "split": "reduce",
        "magic": True}
# block_k/num_warps None: chosen by the rows and dtype (ptxas spills registers for 64-deep K blocks in
# fp32 at 4 warps and in 16-row tiles; 32-deep blocks, fp32 at 8 warps, do not: python -m qwenlm.kernels.aot)
MM = {"block_n": 64, "block_k": None, "num_warps": None}


def _block_k(group: int, cap: int) -> int:
    """The largest power of two <= cap dividing the group size (a K block never spans two groups)."""
    b = cap
    while group % b:
        b //= 2
    return b


_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device, m: int, n: int, col_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The "fixup" split's fp32 sums (m, n) and counters (m, col_blocks), zero between calls (the last
    program of each block leaves them so): one pair per shape and device, made once and never freed,
    so that CUDA graphs captured with them stay valid. Calls on one stream take turns with them."""
    key = (str(device), m, n, col_blocks)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (torch.zeros((m, n), dtype=torch.float32, device=device),
                            torch.zeros((m, col_blocks), dtype=torch.int32, device=device))
    return _WORKSPACES[key]


def _gemv_plan(n: int, k: int, block_n: int, block_k: int, programs: int, min_k_blocks: int) -> int:
    """How many K splits: enough programs for the GPU, each split at least `min_k_blocks` K blocks long."""
    col_blocks = triton.cdiv(n, block_n)
    k_blocks = triton.cdiv(k, block_k)
    return max(1, min(programs // col_blocks, k_blocks // min_k_blocks))


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                bits: int, group: int, config: dict | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ W (K, N) (+ bias) with W dequantized from (qweight, scales, zeros) inside the kernel.
    `group` must be a multiple of 32 dividing K. `config` overrides entries of GEMV (up to 4 rows) or
    MM (more rows)."""
    m, k = x.shape
    n = qweight.shape[1]
    x = x.contiguous()
    if m <= _GEMV_ROWS:
        c = {**GEMV, **(config or {})}
        block_n, block_k = c["block_n"], _block_k(group, c["block_k"])
        split = _gemv_plan(n, k, block_n, block_k, c["programs"], c["min_k_blocks"])
        k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
        split = triton.cdiv(k, k_per_split)
        atomic = split > 1 and c["split"] == "atomic"
        fixup = split > 1 and c["split"] == "fixup"
        ws = cnt = None
        if split == 1 or fixup:
            y = torch.empty((m, n), dtype=x.dtype, device=x.device)
            if fixup:
                ws, cnt = _workspace(x.device, m, n, triton.cdiv(n, block_n))
        elif atomic:
            y = torch.zeros((m, n), dtype=torch.float32, device=x.device)
        else:
            y = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        _gptq_gemv[(triton.cdiv(n, block_n), split, m)](
            x, qweight, scales, zeros, y, n, k, k_per_split, x.stride(0), qweight.stride(0), scales.stride(0),
            y.stride(-2), y.stride(0) if y.dim() == 3 else 0, (1 << bits) - 1, y if ws is None else ws,
            y if cnt is None else cnt,
            y if bias is None else bias, split, BITS=bits, GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k,
            ATOMIC=atomic, MAGIC=c["magic"], FIXUP=fixup, HAS_BIAS=fixup and bias is not None,
            num_warps=c["num_warps"])
        if fixup:
            return y
        if split > 1 and not atomic:
            out = torch.empty((m, n), dtype=x.dtype, device=x.device)
            _gptq_reduce[(triton.cdiv(n, 256), m)](
                y, y if bias is None else bias, out, n, split, y.stride(0), y.stride(1), out.stride(0),
                HAS_BIAS=bias is not None, BLOCK_N=256)
            return out
        y = y.to(x.dtype) if atomic else y
        return y if bias is None else y + bias.to(y.dtype)
    if m >= _DENSE_ROWS:
        return _dense_matmul(x, qweight, scales, zeros, bits, group, bias)
    c = {**MM, **(config or {})}
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    ieee = x.dtype == torch.float32
    block_n = c["block_n"]
    block_k = _block_k(group, c["block_k"] or (32 if ieee or block_m == 16 else 64))
    warps = c["num_warps"] or (8 if ieee else 4)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _gptq_mm[(triton.cdiv(n, block_n), triton.cdiv(m, block_m))](
        x, qweight, scales, zeros, y, m, n, k, x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        BITS=bits, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee, num_warps=warps)
    return y if bias is None else y + bias.to(y.dtype)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group: int,
               dtype: torch.dtype, cols: slice = slice(None)) -> torch.Tensor:
    """The (K, N) weight (or its columns `cols`) in `dtype`, dequantized by the kernel above."""
    qweight, scales, zeros = qweight[:, cols], scales[:, cols], zeros[:, cols]
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    w = torch.empty((k, n), dtype=dtype, device=qweight.device)
    block_n, block_k = 128, _block_k(group, 64)
    _gptq_dequant[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        qweight, scales, zeros, w, n, k, qweight.stride(0), scales.stride(0), w.stride(0),
        BITS=bits, GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k)
    return w


def _dense_matmul(x, qweight, scales, zeros, bits, group, bias):
    k, n = x.shape[1], qweight.shape[1]
    step = max(128, _DENSE_SLICE // k // 128 * 128)
    if step >= n:
        y = x @ dequantize(qweight, scales, zeros, bits, group, x.dtype)
    else:
        y = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
        for a in range(0, n, step):
            y[:, a:a + step] = x @ dequantize(qweight, scales, zeros, bits, group, x.dtype, slice(a, a + step))
    return y if bias is None else y.add_(bias.to(y.dtype))


class GPTQTritonLinear(nn.Module):
    """A GPTQ layer kept packed and run by the kernel above."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group: int,
                 perm: torch.Tensor | None, bias: torch.Tensor | None):
        super().__init__()
        self.bits, self.group = bits, group
        self.in_features = qweight.shape[0] * 32 // bits
        self.out_features = qweight.shape[1]
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.to(torch.float16).contiguous())
        self.register_buffer("zeros", zeros.to(torch.float16).contiguous())
        self.register_buffer("perm", perm)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_gptq(cls, layer) -> "GPTQTritonLinear":
        """From a loaded `quant.gptq.GPTQLinear` (same values; act-order rows sorted by group)."""
        from ..quant.gptq import pack_rows

        q, zeros, g, perm = layer.grouped_codes()  # (K, N), (G, N), (K,)
        k = q.shape[0]
        group = k // layer.scales.shape[0]
        if not bool((g == torch.arange(k, device=g.device) // group).all()):
            raise ValueError("GPTQ groups of unequal sizes are not supported by the GPU kernel")
        if group % 32 or k % group:
            raise ValueError(f"group size {group} / in_features {k} not supported by the GPU kernel")
        return cls(pack_rows(q, layer.bits).to(layer.qweight.device), layer.scales, zeros.to(torch.float16),
                   layer.bits, group, None if perm is None else perm.to(layer.qweight.device), layer.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group: int = 128) -> "GPTQTritonLinear":
        """Round-to-nearest quantization of a float layer into the same format (symmetric: zero
        2**(bits-1), like GPTQ's default), on the layer's device. For benchmarks on random weights:
        the speed is the kernel's whatever the values; `qwen quantize` (GPTQ) is what keeps quality."""
        from ..quant.gptq import pack_rows

        w = linear.weight.detach().float().t()  # (K, N)
        k, n = w.shape
        if k % group:
            raise ValueError(f"in_features {k} is not a multiple of the group size {group}")
        half = 2 ** (bits - 1)
        amax = w.view(k // group, group, n).abs().amax(1).clamp(min=1e-8)  # (G, N)
        scales = (amax / (half - 1)).half()
        s_k = scales.float().repeat_interleave(group, 0)
        q = torch.round(w / s_k + half).clamp(0, 2**bits - 1)
        del w, s_k
        zeros = torch.full_like(scales, half)
        return cls(pack_rows(q, bits), scales, zeros, bits, group, None, linear.bias)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def weight(self, dtype=torch.float32) -> torch.Tensor:
        """The dequantized (N, K) weight in the original input order (for tests and conversions)."""
        from ..quant.gptq import unpack_rows

        q = unpack_rows(self.qweight, self.bits).float()
        g = torch.arange(q.shape[0], device=q.device) // self.group
        w = (q - self.zeros.float()[g]) * self.scales.float()[g]
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(0, self.perm, w)
        return w.t().to(dtype).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        y = gptq_matmul(x2, self.qweight, self.scales, self.zeros, self.bits, self.group, bias=self.bias)
        return y.reshape(*shape[:-1], self.out_features)


class FusedGPTQ:
    """GPTQ layers of one module that read the same input (gate and up; q, k and v), multiplied as one:
    their packed codes, scales and zeros (and biases) stored side by side as column slices of one
    matrix, each layer's buffers views into it (the kernel takes the row strides), so one launch
    reads them all and the memory is unchanged. The GPTQ counterpart of models/layers.FusedLinears;
    it holds while each layer is still the module's attribute and still a view at its place."""

    def __init__(self, module: nn.Module, names: tuple[str, ...]):
        layers = [getattr(module, n) for n in names]
        first = layers[0]
        if not all(type(layer) is GPTQTritonLinear for layer in layers) or \
                len({(layer.bits, layer.group, layer.in_features, layer.qweight.device) for layer in layers}) != 1 or \
                any(layer.perm is not None for layer in layers) or len({layer.bias is None for layer in layers}) != 1:
            raise ValueError(f"cannot fuse {names}: not GPTQ kernel layers of one format and input, in order")
        self.module, self.names, self.layers = module, names, layers
        self.bits, self.group = first.bits, first.group
        self.sizes = [layer.out_features for layer in layers]
        with torch.no_grad():
            self.qweight, self.scales, self.zeros = (torch.cat([getattr(layer, t) for layer in layers], 1)
                                                     for t in ("qweight", "scales", "zeros"))
            self.bias = None if first.bias is None else torch.cat([layer.bias.detach() for layer in layers])
        start = 0
        for layer, n in zip(layers, self.sizes):
            for t in ("qweight", "scales", "zeros"):
                setattr(layer, t, getattr(self, t)[:, start:start + n])  # (registered buffers: views now)
            if self.bias is not None:
                layer.bias = nn.Parameter(self.bias[start:start + n], requires_grad=False)
            start += n

    def intact(self) -> bool:
        start = 0
        for name, layer, n in zip(self.names, self.layers, self.sizes):
            if getattr(self.module, name) is not layer or layer.perm is not None or \
                    layer.qweight.data_ptr() != self.qweight[:, start:].data_ptr():
                return False
            start += n
        return True

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.intact():
            return [getattr(self.module, n)(x) for n in self.names]
        shape = x.shape
        y = gptq_matmul(x.reshape(-1, shape[-1]), self.qweight, self.scales, self.zeros, self.bits, self.group,
                        bias=self.bias)
        return list(y.reshape(*shape[:-1], y.shape[-1]).split(self.sizes, dim=-1))


def random_layer(k: int, n: int, bits: int, group: int, generator: torch.Generator):
    """A random GPTQ layer on the CPU: (qweight, scales, zeros) as the kernel takes them, and its
    dequantized weight (K, N) in fp32, computed here without the kernel (for checks and the sweep)."""
    from ..quant.gptq import pack_rows

    q = torch.randint(0, 2**bits, (k, n), generator=generator)
    scales = (torch.rand(k // group, n, generator=generator) * 0.02 + 1e-3).half()
    zeros = torch.randint(1, 2**bits, (k // group, n), generator=generator).half()
    w = (q.float() - zeros.float().repeat_interleave(group, 0)) * scales.float().repeat_interleave(group, 0)
    return pack_rows(q, bits), scales, zeros, w


def self_check(device: torch.device, dtype: torch.dtype, bits: int, group: int = 128) -> str | None:
    """None if every way (one row with K split, tiles, the weight written out) gives the dequantized
    weight's product, for the checkpoint's bits and group size."""
    g = torch.Generator().manual_seed(bits)
    k, n = max(2048, 2 * group), 128  # long enough for the one-row path to split K
    qweight, scales, zeros, w = random_layer(k, n, bits, group, g)
    args = (qweight.to(device), scales.to(device), zeros.to(device), bits, group)
    for m in (1, 24, _DENSE_ROWS):
        x = torch.randn(m, k, generator=g).to(dtype)
        y = gptq_matmul(x.to(device), *args).float().cpu()
        want = x.float() @ w
        err = ((y - want).abs().max() / want.abs().max()).item()
        if not err <= (1e-5 if dtype == torch.float32 else 3e-2):
            return f"relative error {err:.3g} with {m} row(s)"
    return None
