"""One activation row times a float weight (y = x W^T + b), for batch-1 decoding, where every weight is
read once per token and the speed is the memory's.

cuBLAS reads the 7B decode step's bf16 matrices at 2.5-2.7 TB/s on an H100 (kernel sweep, 2026-11-24)
of the 3.35 the memory allows; this kernel is the alternative that the sweep times beside it and the
engines use with QWENLM_GEMV=1 (off by default until a GPU run shows it ahead). Its design: one program
per block of output rows of W (row-major (N, K), each row contiguous along K), reading the whole K
range in wide tiles (16-byte loads, many in flight per thread), products summed in fp32 in registers,
one reduction at the end, the bias and the cast in the same kernel: one launch, no K split and no
second kernel to add splits (blocks of rows are chosen small enough to give every SM several
programs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_wn, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn  # the head's rows pass 2**31 elements
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        if EVEN_K:
            x = tl.load(x_ptr + kk).to(tl.float32)
            w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None], other=0)
        else:
            x = tl.load(x_ptr + kk, mask=kk < K, other=0).to(tl.float32)
            w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & (kk < K)[None, :], other=0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_ok, other=0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


# Launch settings (benchmarks/kernel_sweep.py times alternatives; pass them as `config`):
# block_k: weights of a row per loop step; programs: the fewest programs aimed for (the blocks of
# rows shrink, down to min_block_n, until there are this many); max_block_n: the most rows per program.
GEMV = {"block_k": 512, "programs": 1024, "max_block_n": 16, "min_block_n": 2, "num_warps": 4}


def _block_n(n: int, c: dict) -> int:
    b = c["max_block_n"]
    while b > c["min_block_n"] and triton.cdiv(n, b) < c["programs"]:
        b //= 2
    return b


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: dict | None = None) -> torch.Tensor:
    """x (1, K) @ weight (N, K)^T (+ bias (N,)) -> (1, N) in x's dtype; weight rows contiguous."""
    c = {**GEMV, **(config or {})}
    n, k = weight.shape
    if x.shape != (1, k) or weight.stride(1) != 1:
        raise ValueError(f"gemv needs one row of {k} and a weight with contiguous rows, got {tuple(x.shape)}")
    x = x.contiguous()
    block_n, block_k = _block_n(n, c), min(c["block_k"], triton.next_power_of_2(k))
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _gemv[(triton.cdiv(n, block_n),)](x, weight, weight if bias is None else bias, y, n, k, weight.stride(0),
                                      HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0, BLOCK_N=block_n,
                                      BLOCK_K=block_k, num_warps=c["num_warps"])
    return y


def self_check(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if the kernel gives the plain product on small problems (a K that tiles evenly and one that
    does not, a bias, a ragged last block of rows)."""
    g = torch.Generator().manual_seed(0)
    for n, k in ((100, 1024), (37, 200)):
        w = torch.randn(n, k, generator=g)
        x = torch.randn(1, k, generator=g)
        b = torch.randn(n, generator=g)
        y = gemv(x.to(device, dtype), w.to(device, dtype), b.to(device, dtype)).float().cpu()
        want = x.to(dtype).float() @ w.to(dtype).float().t() + b.to(dtype).float()
        err = ((y - want).abs().max() / want.abs().max()).item()
        if not err <= (1e-5 if dtype == torch.float32 else 2e-2):
            return f"relative error {err:.3g} for {n}x{k}"
    return None
