"""Compile the Triton kernels for a GPU that is not here (ahead of time, to a cubin), exactly as the
launches of `gptq_matmul` / `decode_attention` / `gemv` / `rotary_store` would specialize them.

Triton's interpreter (what the CPU tests run) checks a kernel's arithmetic but not that the compiler
accepts it: loop-carried types, `tl.dot` shapes and dtypes, shared memory and register limits only
show up when compiling for a real target. Triton compiles to PTX and assembles it with the `ptxas`
it ships, neither of which needs a GPU or a driver, so this module:

* `record(module, names)`: swaps the named kernels of `module` for recorders, so a call of the host
  function (with CPU tensors) records each launch's grid, arguments and options instead of running;
* `compile_launch(launch, capability)`: specializes one recorded launch with Triton's own binder (tensor
  dtypes, scalar widths, constexpr values) and compiles it for `capability` (90 = H100/H200);
* `ptxas_report(kernel, capability)`: registers and spill bytes per thread, from `ptxas -v`;
* `loop_instructions(sass(kernel))`: the instructions one iteration of the kernel's main loop issues
  (nvdisasm, also shipped): where a kernel is limited by issuing rather than by memory (the GPTQ
  one-row kernel), their count per weight is what its speed follows;
* `python -m qwenlm.kernels.aot [--capability 90 80] [--json]`: all of it for every configuration that
  `gptq_matmul`, `decode_attention`, `gemv` and `rotary_store` launch for the engines' shapes (`launches()`).

Run it in a process without TRITON_INTERPRET: in a process where Triton's interpreter has run, the
compiler can trip over the interpreter's patched language objects.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch




@dataclass
class Launch:
    kernel: object  # the jit-decorated kernel (JITFunction or InterpretedFunction)
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


class _Recorder:
    def __init__(self, kernel, launches: list[Launch]):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        grid = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)
        return lambda *args, **kwargs: self.launches.append(Launch(self.kernel, grid, args, kwargs))


@contextmanager
def record(module, names: tuple[str, ...]):
    """Within the block, launching `module.<name>[grid](...)` appends a `Launch` to the yielded list."""
    launches: list[Launch] = []
    saved = {n: getattr(module, n) for n in names}
    try:
        for n, k in saved.items():
            setattr(module, n, _Recorder(k, launches))
        yield launches
    finally:
        for n, k in saved.items():
            setattr(module, n, k)


def _specialize(launch: Launch, capability: int):
    """(jit function, signature, constexprs, attrs, options) of a launch, built by Triton's own binder
    and argument packer for the target (the types, the constexpr 1s and the divisibility-by-16 hints
    that a real launch would give, from the arguments' values and the tensors' addresses)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = JITFunction(launch.kernel.fn)
    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, sig, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    return fn, sig, constexprs, attrs, options


def signature(launch: Launch, capability: int = 90) -> dict:
    """{argument: Triton type} of a launch ("constexpr" for compile-time values)."""
    return _specialize(launch, capability)[1]


def compile_launch(launch: Launch, capability: int = 90):
    """The compiled kernel (its `.asm` holds ttir/ttgir/llir/ptx/cubin) for an NVIDIA GPU of compute
    capability `capability`; raises the compiler's error if Triton or ptxas rejects it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, sig, constexprs, attrs, options = _specialize(launch, capability)
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options.__dict__)


def ptxas_report(compiled, capability: int = 90) -> dict:
    """{"registers": per thread, "spill_stores"/"spill_loads": bytes, "shared": bytes} from `ptxas -v`
    run on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([get_ptxas(capability).path, f"-arch={arch}", "-v", ptx, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr

    def num(pattern: str) -> int:
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "shared": int(compiled.metadata.shared)}


def sass(compiled) -> str:
    """The kernel's machine code (SASS), from the nvdisasm that Triton ships."""
    from triton.backends.nvidia.compiler import get_ptxas

    nvdisasm = os.path.join(os.path.dirname(get_ptxas(90).path), "nvdisasm")
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout


def loop_instructions(code: str) -> dict[str, int]:
    """Instruction counts by opcode in the longest loop of SASS `code` (from a label to the branch that
    jumps back to it): what one iteration of a kernel's main loop issues per thread."""
    lines = code.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    best: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > len(best):
            best = lines[labels[m.group(1)]:i + 1]
    ops: dict[str, int] = {}
    for line in best:
        m = re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops[m.group(1)] = ops.get(m.group(1), 0) + 1
    return ops


def gptq_launches() -> list[Launch]:
    """The launches of `gptq_matmul` for 4/8 bits, groups of 32 and 128, fp16/bf16/fp32 activations,
    1 to 300 rows (every kernel, K split or not)."""
    from . import gptq

    with record(gptq, ("_gptq_gemv", "_gptq_reduce", "_gptq_mm", "_gptq_dequant")) as launches:
        for bits in (4, 8):
            for group in (32, 128):
                k, n = 4096, 256
                qweight = torch.zeros(k * bits // 32, n, dtype=torch.int32)
                scales = torch.zeros(k // group, n, dtype=torch.float16)
                for dtype in (torch.float16, torch.bfloat16, torch.float32):
                    for rows in (1, 4, 5, 24, 64, 300):
                        gptq.gptq_matmul(torch.zeros(rows, k, dtype=dtype), qweight, scales, scales, bits, group)
                    # a bias (added by the split-sum kernel), and the atomic way of summing the splits
                    x, bias = torch.zeros(1, k, dtype=dtype), torch.zeros(n, dtype=dtype)
                    gptq.gptq_matmul(x, qweight, scales, scales, bits, group, bias=bias)
                    gptq.gptq_matmul(x, qweight, scales, scales, bits, group, config={"split": "atomic"})
                    gptq.gptq_matmul(x, qweight, scales, scales, bits, group, bias=bias, config={"split": "fixup"})
                # one row over a short K: a single split, written without atomics
                short = 256
                gptq.gptq_matmul(torch.zeros(1, short, dtype=torch.float16), qweight[:short * bits // 32],
                                 scales[:short // group], scales[:short // group], bits, group)
    return launches


def attention_launches() -> list[Launch]:
    """The launches of `decode_attention` over float (fp16/bf16/fp32) and 8-bit caches, head sizes 64
    (Qwen2.5-0.5B, GQA 14:2) and 128 (Qwen v1), 1 to 4 rows, one or many splits."""
    from ..engine.cache import KVStore
    from . import attention

    with record(attention, ("_decode_partial", "_decode_merge")) as launches:
        for int8 in (False, True):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                for head_dim, heads, kv_heads in ((64, 14, 2), (128, 32, 32)):
                    kv = KVStore(1, 4, kv_heads, 1024, head_dim, dtype, torch.device("cpu"), int8=int8)
                    for rows, length in ((1, 1024), (4, 256), (4, 32)):
                        q = torch.zeros(rows, heads, head_dim, dtype=dtype)
                        slots = torch.zeros(rows, dtype=torch.int32)
                        attention.decode_attention(q, kv.kernel_layer(0, rows)[:6], slots, slots, length)
    return launches


def gemv_launches() -> list[Launch]:
    """The launches of `gemv` (one row times a float weight) for the Qwen v1 7B/1.8B and Qwen2.5-0.5B
    decode shapes and the head, fp16/bf16/fp32, with and without a bias."""
    from . import gemv

    with record(gemv, ("_gemv",)) as launches:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for n, k in ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (6144, 2048), (2048, 2048),
                         (1152, 896), (896, 4864), (151936, 4096)):
                w = torch.empty((n, k), dtype=dtype, device="meta")
                x = torch.zeros(1, k, dtype=dtype)
                gemv.gemv(x, w)
                gemv.gemv(x, w, torch.zeros(n, dtype=dtype))
    return launches


def rotary_launches() -> list[Launch]:
    """The launches of `rotary_store` for Qwen v1 (32 heads of 128, LogN) and Qwen2.5-0.5B (14 query and
    2 key/value heads of 64), 1 and 64 rows, fp16/bf16/fp32, into float and 8-bit caches."""
    from ..engine.cache import KVStore
    from . import rotary

    with record(rotary, ("_rotary_store",)) as launches:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for h, hk, d, logn in ((32, 32, 128, True), (14, 2, 64, False)):
                for b in (1, 64):
                    q = torch.zeros(b, h, 1, d, dtype=dtype)
                    k = torch.zeros(b, hk, 1, d, dtype=dtype)
                    cos = torch.zeros(b, 1, d)
                    for int8 in (False, True):
                        layer = KVStore(1, b, hk, 8, d, dtype, "cpu", int8=int8).kernel_layer(0, b)
                        rotary.rotary_store(q, k, k, cos, cos, torch.ones(b, 1) if logn else None, layer[0],
                                            layer[1], torch.zeros(b, dtype=torch.long),
                                            int8=layer[2:7] if int8 else None)
    return launches


def launches() -> list[Launch]:
    return gptq_launches() + attention_launches() + gemv_launches() + rotary_launches()


def distinct(items: list[Launch], capability: int = 90) -> list[Launch]:
    """One launch per distinct specialization (the same one compiled twice tells nothing new)."""
    seen, out = set(), []
    for launch in items:
        key = (launch.name, tuple(signature(launch, capability).items()),
               tuple(sorted((k, str(v)) for k, v in launch.kwargs.items())))
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


_TODO: list[tuple[int, Launch]] = []  # report()'s work, read by its forked workers by index


def _report_row(i: int) -> dict:
    cap, launch = _TODO[i]
    sig = signature(launch, cap)
    row = {"capability": cap, "kernel": launch.name, "options": dict(launch.kwargs),
           "pointers": {k: v for k, v in sig.items() if v.startswith("*")}}
    try:
        kernel = compile_launch(launch, cap)
        row.update(ptxas_report(kernel, cap))
        row["loop_instructions"] = sum(loop_instructions(sass(kernel)).values())
    except Exception as e:  # reported, not raised: one bad configuration must not hide the rest
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def report(capabilities=(90,), jobs: int | None = None) -> list[dict]:
    """One row per (capability, distinct launch): its constexprs/options, argument types, and either the
    ptxas numbers or the compiler's error. The compilations run in `jobs` forked processes (default: one
    per core; Triton's compiler and ptxas keep a core busy each), the rows in the same order."""
    import multiprocessing

    _TODO[:] = [(cap, launch) for cap in capabilities for launch in distinct(launches(), cap)]
    jobs = min(jobs or os.cpu_count() or 1, len(_TODO))
    if jobs <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [_report_row(i) for i in range(len(_TODO))]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_report_row, range(len(_TODO)), chunksize=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwenlm.kernels.aot",
                                description="Compile qwenlm's Triton kernels for NVIDIA GPUs without one.")
    p.add_argument("--capability", type=int, nargs="+", default=[90], help="compute capabilities (90: H100)")
    p.add_argument("--json", action="store_true", help="one JSON list on stdout")
    p.add_argument("--jobs", type=int, default=None, help="compilations at a time (default: one per core)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: unset TRITON_INTERPRET (the compiler cannot run beside the interpreter)", file=sys.stderr)
        return 2
    rows = report(tuple(args.capability), args.jobs)
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            opts = " ".join(f"{k}={v}" for k, v in r["options"].items())
            types = ",".join(v[1:] for v in r["pointers"].values())
            status = r.get("error") or (f"{r['registers']} regs, spills {r['spill_stores']}/{r['spill_loads']} B, "
                                        f"shared {r['shared']} B, main loop {r['loop_instructions']} instructions")
            print(f"sm_{r['capability']} {r['kernel']:16s} {opts} [{types}]: {status}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
