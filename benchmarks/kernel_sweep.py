"""Time the Triton kernels' launch settings on a GPU, for the shapes of a 7B decode step, so that a short
GPU session can choose them from one run (`bash benchmarks/gpu_session.sh sweep`).

    python benchmarks/kernel_sweep.py [--quick] [--only gptq|attention|gemv] [--json OUT]
    python benchmarks/kernel_sweep.py --dry-run --quick   # no GPU: tiny shapes in Triton's interpreter

For each shape: the bf16 matmul (cuBLAS) as the baseline; then every setting of the GPTQ one-row kernel
(4 and 8 bits, group 128), of the decode attention kernel and of the float one-row kernel, each first
checked against plain torch arithmetic (a setting that disagrees is reported, never ranked). Times are CUDA-graph replays of the
whole host function (its memset and cast included), `triton.testing.do_bench_cudagraph`, cycling
through copies of the weights (or keys/values) that together exceed the L2 cache, as a decode step
does; bandwidth counts the bytes the call must read. The current defaults are marked `*`.
"""

import argparse
import itertools
import json
import os
import signal
import sys
import time

DRY = "--dry-run" in sys.argv
if DRY:  # before Triton is imported: the kernels run interpreted on CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["QWENLM_TRITON"] = "interpret"

import torch  # noqa: E402

# (K, N) of Qwen v1 7B's GPTQ products, one each per layer: c_attn, w1 and w2 as one (FusedGPTQ), mlp
# c_proj, attn c_proj; the head (8 bits with --quantize-head)
GPTQ_SHAPES = [(4096, 12288), (4096, 22016), (11008, 4096), (4096, 4096)]
HEAD = (4096, 151936)
ATTN = {"heads": 32, "kv_heads": 32, "head_dim": 128}
ATTN_CASES = [(1, 2048, False), (1, 8192, False), (1, 8192, True), (16, 1024, False), (64, 512, False),
              (64, 256, False), (64, 256, True)]  # (64 rows at 256: the serving benchmark's steady state)
# (N, K) of the float one-row products: 7B q/k/v, out, gate/up, down, head; 1.8B q/k/v, out, gate/up, down
GEMV_SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (151936, 4096),
               (6144, 2048), (2048, 2048), (11008, 2048), (2048, 5504)]
DEV = "cuda"
if DRY:  # the script's own logic, on shapes the interpreter gets through in seconds
    GPTQ_SHAPES, HEAD = [(256, 128)], (256, 192)
    ATTN = {"heads": 4, "kv_heads": 2, "head_dim": 64}
    ATTN_CASES = [(1, 96, False), (2, 64, True)]
    GEMV_SHAPES = [(96, 512), (37, 200)]
    DEV = "cpu"


KEPT: list[dict] = []  # every row so far, written out even when the sweep is stopped part way


def _keep(rows: list[dict], row: dict) -> None:
    rows.append(row)
    KEPT.append(row)


def _bench(fn) -> float:
    """Milliseconds per call: CUDA-graph replays on a GPU, one plain call in a dry run."""
    if DRY:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=50)


ROTATE_BYTES = 256 << 20  # more than an H100's 50 MB L2 cache


def _copies(nbytes: int, *tensors) -> list[tuple]:
    """`tensors` and enough copies of them that a pass over all reads more than the L2 cache holds: a
    decode step reads each layer's weights (and keys/values) once, so timing one copy again and again
    would time the cache (the sweep of 2026-11-24 did, for shapes under 50 MB). One copy in a dry run."""
    n = 1 if DRY else max(1, -(-ROTATE_BYTES // nbytes))
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(n - 1)]


def _bench_each(fn, copies) -> float:
    """Milliseconds per call of fn(*c), over a pass through every copy c."""
    return _bench(lambda: [fn(*c) for c in copies]) / len(copies)


def _gptq_case(k, n, bits, group=128):
    from qwenlm.kernels.gptq import random_layer

    g = torch.Generator().manual_seed(0)
    qweight, scales, zeros, w = random_layer(k, n, bits, group, g)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    want = (x.float() @ w).to(DEV)
    args = (qweight.to(DEV), scales.to(DEV), zeros.to(DEV), bits, group)
    nbytes = k * n * bits // 8 + 2 * 2 * (k // group) * n + 2 * k + 2 * n
    return x.to(DEV), args, want, nbytes, w


def gemv_configs(quick: bool):
    """The defaults first; then block sizes x K splits x warps (splits summed by the reduce kernel),
    the atomic and the one-launch "fixup" summing at the default block sizes, and the defaults with codes
    converted to floats."""
    from qwenlm.kernels import gptq

    # (H100, 2026-11-24: wider column blocks and fewer warps were faster all the way to the grid's
    # edge, 128 columns and 4 warps; 8 warps were 3-6x slower everywhere: the grid moved past that edge)
    grid = {"block_n": [128, 256, 512], "block_k": [32, 64, 128], "programs": [512, 1024, 2048],
            "num_warps": [2, 4]}
    if quick:
        grid = {"block_n": [128, 256], "block_k": [64], "programs": [0, 1024], "num_warps": [2, 4]}
    default = {k: gptq.GEMV[k] for k in (*grid, "split", "magic")}
    out = [{**dict(zip(grid, v)), "split": "reduce", "magic": True} for v in itertools.product(*grid.values())]
    out += [{**default, "programs": p, "split": "atomic"} for p in grid["programs"] if p]
    out += [{**default, "programs": p, "split": "fixup"} for p in grid["programs"] if p]
    out += [{**default, "magic": False}]  # codes to floats by conversion: what the 2**23 trick saves
    return [default] + [c for c in out if c != default]


def attention_configs(quick: bool):
    from qwenlm.kernels import attention

    grid = {"block_s": [32, 64, 128], "programs": [264, 528, 1056], "num_warps": [2, 4, 8]}
    if quick:
        grid = {"block_s": [64, 128], "programs": [528], "num_warps": [2, 4]}
    out = [dict(zip(grid, v)) for v in itertools.product(*grid.values())]
    default = {k: attention.ATTENTION[k] for k in grid}
    return [default] + [c for c in out if c != default]


def sweep_gptq(quick: bool) -> list[dict]:
    from qwenlm.kernels.gptq import gptq_matmul

    rows = []
    shapes = [(s, 4) for s in GPTQ_SHAPES] + [(s, 8) for s in GPTQ_SHAPES[:1]] + [(HEAD, 8)]
    for (k, n), bits in shapes:
        x, args, want, nbytes, w = _gptq_case(k, n, bits)
        dense = _copies(k * n * 2, w.t().contiguous().to(DEV, torch.bfloat16))
        base = _bench_each(lambda d: torch.nn.functional.linear(x, d), dense)
        del w, dense
        copies = _copies(nbytes, *args[:3])
        print(f"\n{k}x{n} {bits}-bit: bf16 cuBLAS {base * 1000:.1f} us "
              f"({k * n * 2 / base / 1e6:.0f} GB/s)", flush=True)
        for i, cfg in enumerate(gemv_configs(quick)):
            row = {"kernel": "gptq_gemv", "k": k, "n": n, "bits": bits, "config": cfg, "default": i == 0,
                   "bf16_us": base * 1000}
            try:
                y = gptq_matmul(x, *args, config=cfg).float()
                err = ((y - want).abs().max() / want.abs().max()).item()
                row["rel_error"] = err
                if err > 3e-2:
                    row["error"] = f"relative error {err:.3g}"
                else:
                    ms = _bench_each(lambda *q: gptq_matmul(x, *q, *args[3:], config=cfg), copies)
                    row.update(us=ms * 1000, gb_s=nbytes / ms / 1e6, vs_bf16=base / ms)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            _keep(rows, row)
        ok = sorted((r for r in rows if r.get("k") == k and r.get("n") == n and r["bits"] == bits and "us" in r),
                    key=lambda r: r["us"])
        for r in ok[:5]:
            print(f"  {'*' if r['default'] else ' '} {r['us']:7.1f} us {r['gb_s']:6.0f} GB/s "
                  f"{r['vs_bf16']:4.2f}x bf16  {r['config']}", flush=True)
        default = [r for r in ok if r["default"]]
        if default and ok and default[0] is not ok[0]:
            print(f"  default: {default[0]['us']:.1f} us", flush=True)
        for r in ok:
            if not r["config"].get("magic", True):
                print(f"  default with codes converted (not magic): {r['us']:.1f} us", flush=True)
        del copies
    return rows


def sweep_attention(quick: bool) -> list[dict]:
    from qwenlm.engine.cache import KVStore
    from qwenlm.kernels.attention import decode_attention

    rows = []
    h, hk, d = ATTN["heads"], ATTN["kv_heads"], ATTN["head_dim"]
    for b, length, int8 in ATTN_CASES:
        kv = KVStore(1, b, hk, length, d, torch.bfloat16, torch.device(DEV), int8=int8)
        k, v = (torch.randn(b, hk, length, d, device=DEV, dtype=torch.bfloat16) for _ in range(2))
        kv.store(0, k, v, lambda dst, x: dst.copy_(x), first=True)
        q = torch.randn(b, h, d, device=DEV, dtype=torch.bfloat16)
        start = torch.zeros(b, dtype=torch.int32, device=DEV)
        end = torch.full((b,), length, dtype=torch.int32, device=DEV)
        layer = kv.kernel_layer(0, b)[:6]
        kk, vv = (t.float().repeat_interleave(h // hk, 1) for t in kv.load(0, lambda t: t))
        want = torch.nn.functional.scaled_dot_product_attention(q.float()[:, :, None], kk, vv)[:, :, 0]
        kr, vr = k.repeat_interleave(h // hk, 1), v.repeat_interleave(h // hk, 1)
        nbytes = kv.nbytes  # the whole layer is read: every slot is valid
        base = _bench_each(lambda a, b: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], a, b),
                           _copies(kr.nbytes * 2, kr, vr))
        layers = _copies(nbytes, *layer)
        print(f"\nattention batch {b}, {length} slots, {'int8' if int8 else 'bf16'}: SDPA (bf16) "
              f"{base * 1000:.1f} us", flush=True)
        for i, cfg in enumerate(attention_configs(quick)):
            row = {"kernel": "decode_attention", "batch": b, "length": length, "int8": int8, "config": cfg,
                   "default": i == 0, "sdpa_us": base * 1000}
            try:
                out = decode_attention(q, layer, start, end, length, config=cfg).float()
                err = (out - want).abs().max().item()
                row["max_error"] = err
                if err > 3e-2:
                    row["error"] = f"max error {err:.3g}"
                else:
                    ms = _bench_each(lambda *t: decode_attention(q, t, start, end, length, config=cfg), layers)
                    row.update(us=ms * 1000, gb_s=nbytes / ms / 1e6, vs_sdpa=base / ms)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            _keep(rows, row)
        ok = sorted((r for r in rows if (r.get("batch"), r.get("length"), r.get("int8")) == (b, length, int8)
                     and "us" in r), key=lambda r: r["us"])
        for r in ok[:5]:
            print(f"  {'*' if r['default'] else ' '} {r['us']:7.1f} us {r['gb_s']:6.0f} GB/s "
                  f"{r['vs_sdpa']:4.2f}x SDPA  {r['config']}", flush=True)
        del layers
        if not DRY:
            torch.cuda.empty_cache()
    return rows


def dense_configs(quick: bool):
    """The defaults first; then K tile x programs x rows per program x warps."""
    from qwenlm.kernels import gemv

    grid = {"block_k": [256, 512, 1024], "programs": [1024, 2048], "max_block_n": [8, 16, 32], "num_warps": [4, 8]}
    if quick:
        grid = {"block_k": [256, 512], "programs": [1024], "max_block_n": [16], "num_warps": [4]}
    default = {k: gemv.GEMV[k] for k in grid}
    out = [dict(zip(grid, v)) for v in itertools.product(*grid.values())]
    return [default] + [c for c in out if c != default]


def sweep_gemv(quick: bool) -> list[dict]:
    """The float one-row kernel (kernels/gemv.py, QWENLM_GEMV=1) against cuBLAS, bf16, on the 7B and
    1.8B decode step's matrices (q/k/v and gate/up fused as the engines multiply them) and the head."""
    from qwenlm.kernels.gemv import gemv

    rows = []
    for n, k in GEMV_SHAPES:
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(n, k, generator=g) * 0.02).to(DEV, torch.bfloat16)
        x = torch.randn(1, k, generator=g).to(DEV, torch.bfloat16)
        want = x.float() @ w.float().t()
        nbytes = n * k * 2
        copies = _copies(nbytes, w)
        base = _bench_each(lambda t: torch.nn.functional.linear(x, t), copies)
        print(f"\n{n}x{k} bf16 one row: cuBLAS {base * 1000:.1f} us ({nbytes / base / 1e6:.0f} GB/s)", flush=True)
        for i, cfg in enumerate(dense_configs(quick)):
            row = {"kernel": "gemv", "n": n, "k": k, "config": cfg, "default": i == 0, "cublas_us": base * 1000}
            try:
                err = ((gemv(x, w, config=cfg).float() - want).abs().max() / want.abs().max()).item()
                row["rel_error"] = err
                if err > 2e-2:
                    row["error"] = f"relative error {err:.3g}"
                else:
                    ms = _bench_each(lambda t: gemv(x, t, config=cfg), copies)
                    row.update(us=ms * 1000, gb_s=nbytes / ms / 1e6, vs_cublas=base / ms)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            _keep(rows, row)
        ok = sorted((r for r in rows if (r["n"], r["k"]) == (n, k) and "us" in r), key=lambda r: r["us"])
        for r in ok[:4]:
            print(f"  {'*' if r['default'] else ' '} {r['us']:7.1f} us {r['gb_s']:6.0f} GB/s "
                  f"{r['vs_cublas']:4.2f}x cuBLAS  {r['config']}", flush=True)
        default = [r for r in ok if r["default"]]
        if default and default[0] is not ok[0]:
            print(f"  default: {default[0]['us']:.1f} us ({default[0]['vs_cublas']:.2f}x cuBLAS)", flush=True)
        del copies, w
        if not DRY:
            torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few settings per kernel")
    ap.add_argument("--json", default=None, help="write every row here")
    ap.add_argument("--only", choices=["gptq", "attention", "gemv"], default=None)
    ap.add_argument("--dry-run", action="store_true", help="no GPU: tiny shapes in Triton's interpreter")
    args = ap.parse_args()
    if not DRY and not torch.cuda.is_available():
        print("error: kernel_sweep.py times GPU kernels and needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return 2
    print("dry run (interpreter)" if DRY else torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    # stopped by `timeout` (the GPU session's budget): the rows timed so far are still written
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    try:
        if args.only in (None, "gptq"):
            sweep_gptq(args.quick)
        if args.only in (None, "attention"):
            sweep_attention(args.quick)
        if args.only in (None, "gemv"):
            sweep_gemv(args.quick)
    finally:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(KEPT, f, indent=1)
    rows = KEPT
    bad = [r for r in rows if "error" in r]
    print(f"\n{len(rows)} settings, {len(bad)} failed or wrong" + (": " + json.dumps(bad[:5]) if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
