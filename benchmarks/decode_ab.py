"""Batch-1 decoding with each recent change on and off, side by side in one process on one set of random
weights: what each change is worth, and the GPTQ Int4 model against bf16 (issue 5's target), for the
price of one model build, one import and one round of compilation.

    python benchmarks/decode_ab.py --shape 7B [--tokens 1024] [--rounds 2] [--variants base,gemv,...] [--json OUT]
    python benchmarks/decode_ab.py --list          # the variants and what each changes

Every variant gets its own engine (its own CUDA graphs, captured under the variant's settings: a knob read
when a step is captured stays in its graphs). Round 1 builds each engine, captures every slot bucket's graph
in an untimed generation, then times one; later rounds time each engine again, in turn, so that a drift
of the machine's speed spreads over all variants. Reported per variant: tokens/s of each round, their
median, the ratio to `base` (the first variant), the fraction of the memory-bandwidth roofline, the
weights' size (the embedding table included), which kernels the engine used, and how many greedy tokens
equal those of the first variant on the same weights (bf16 rounding may flip near-ties on random
weights: a hint, not a test).
Partial results are written when the run is stopped (SIGTERM, SIGINT); a variant that fails (a kernel,
memory) is reported with its error and the others go on.

On a CPU (`--device cpu --shape tiny`, with QWENLM_TRITON=interpret for the Triton variants) it checks
its own wiring, not speed (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field

if os.environ.get("QWENLM_TRITON") == "interpret":  # before Triton is imported: kernels on CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qwenlm.engine import Engine  # noqa: E402
from qwenlm.eval import bench as B  # noqa: E402
from qwenlm.generation.config import GenerationConfig  # noqa: E402


@dataclass(frozen=True)
class Variant:
    about: str
    weights: str = "float"  # float | gptq4h8 | gptq4 | gptq8 (each built once, on first use)
    env: dict = field(default_factory=dict)
    kv: str = "float"
    gemv: bool = False  # float layers' one-row products through the Triton kernel
    gptq: dict = field(default_factory=dict)  # kernels.gptq.GEMV entries while the engine captures


VARIANTS = {
    "base": Variant("the defaults, float weights"),
    "nonorm": Variant("residual adds outside the norms (QWENLM_FUSE_NORM=0)", env={"QWENLM_FUSE_NORM": "0"}),
    "norotary": Variant("rotary and cache write unfused (QWENLM_FUSE_ROTARY=0)", env={"QWENLM_FUSE_ROTARY": "0"}),
    "gemv": Variant("float one-row products through the Triton kernel (QWENLM_GEMV=1)",
                    env={"QWENLM_GEMV": "1"}, gemv=True),
    "kv8": Variant("int8 KV cache (its write fused into the rotary kernel)", kv="int8"),
    "kv8-norotary": Variant("int8 KV cache, unfused write (QWENLM_FUSE_ROTARY=0)", kv="int8",
                            env={"QWENLM_FUSE_ROTARY": "0"}),
    "gptq4h8": Variant("GPTQ Int4 decoder layers, head in 8 bits (weights <= 5 GiB)", weights="gptq4h8"),
    "gptq4h8-fixup": Variant("the same, K splits summed in one launch (GEMV split 'fixup')", weights="gptq4h8",
                             gptq={"split": "fixup"}),
    "gptq4": Variant("GPTQ Int4 decoder layers, head in the model dtype", weights="gptq4"),
    "gptq8": Variant("GPTQ Int8 decoder layers, head in the model dtype", weights="gptq8"),
}
DEFAULT = "base,gptq4h8,gemv,norotary,nonorm,kv8,kv8-norotary,gptq4h8-fixup"  # the most telling first

RESULTS: dict = {}  # written out as the run goes, and when it is stopped


class Stopped(Exception):
    pass


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


class Run:
    """The models, engines and settings of one comparison."""

    def __init__(self, shape: str, dtype: torch.dtype, device: torch.device, tokens: int):
        self.cfg = B.shape_config(shape)
        self.dtype, self.device, self.tokens = dtype, device, tokens
        self.models: dict[str, torch.nn.Module] = {}
        self.engines: dict[str, Engine] = {}
        self.gemv_ok: bool | None = None
        vocab = min(self.cfg.vocab_size, 151643)
        self.prompts = torch.randint(0, vocab, (1, 1), generator=torch.Generator().manual_seed(0)).tolist()
        self.greedy = GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=tokens,
                                       eos_token_id=None, pad_token_id=0)

    def model(self, kind: str):
        if kind not in self.models:
            from qwenlm.commands.bench import _random_gptq

            print(f"building random weights: {kind}...", file=sys.stderr)
            m = B.random_model(self.cfg, self.dtype, self.device, seed=0 if kind == "float" else 1)
            if kind != "float":
                notes: list[str] = []
                _random_gptq(m, 8 if kind == "gptq8" else 4, kind == "gptq4h8", notes)
            self.models[kind] = m
        return self.models[kind]

    def enter(self, v: Variant):
        """Apply the variant's settings; returns what `leave` restores."""
        from qwenlm.kernels import gptq as G

        saved_env = {k: os.environ.get(k) for k in v.env}
        os.environ.update(v.env)
        saved_gptq = dict(G.GEMV)
        G.GEMV.update(v.gptq)
        m = self.model(v.weights)
        m.kv_cache = v.kv
        if v.weights == "float":  # the class of the layers, for the eager steps (a prompt's first token)
            if v.gemv and self.gemv_ok is None:
                from qwenlm.kernels import kernel_works

                self.gemv_ok = kernel_works("gemv", m.device, m.dtype)
            m.use_gemv(v.gemv and bool(self.gemv_ok))
        return saved_env, saved_gptq

    def leave(self, saved):
        from qwenlm.kernels import gptq as G

        saved_env, saved_gptq = saved
        for k, old in saved_env.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old
        G.GEMV.clear()
        G.GEMV.update(saved_gptq)

    def time_one(self, name: str, v: Variant) -> dict:
        saved = self.enter(v)
        try:
            m = self.model(v.weights)
            eng = self.engines.get(name)
            first = eng is None
            if first:
                eng = self.engines[name] = Engine(m, keep_state=True)
                eng.generate(self.prompts, self.greedy, sync_every=self.tokens)  # captures every bucket's graph
            B._sync(self.device)
            t0 = time.perf_counter()
            out = eng.generate(self.prompts, self.greedy, sync_every=self.tokens)
            B._sync(self.device)
            dt = time.perf_counter() - t0
            assert len(out[0]) == self.tokens
            res = {"tokens_per_s": self.tokens / dt}
            if first:
                st = eng._state or {}
                res.update(tokens=out[0], kernel_attention=bool(st.get("kernel_attention")),
                           fused_rotary=bool(st.get("fused_rotary")),
                           kv_int8=bool(st["cache"].int8) if "cache" in st else None,
                           gemv_layers=sum(type(x).__name__ == "GemvLinear" for x in m.modules()),
                           weight_bytes=B.weight_bytes(m),
                           bytes_per_step=B.decode_bytes_per_step(eng, self.tokens))
            return res
        finally:
            self.leave(saved)


def _summary(names: list[str], bw: float | None) -> list[dict]:
    rows = []
    base = RESULTS["variants"].get(names[0])
    for n in names:
        r = RESULTS["variants"].get(n)
        if not r or not r["rounds"]:
            continue
        med = statistics.median(r["rounds"])
        row = {"variant": n, "about": VARIANTS[n].about, "tokens_per_s": med, "rounds": r["rounds"],
               "vs_base": med / statistics.median(base["rounds"]) if base and base["rounds"] else None,
               "weight_gib": r["weight_bytes"] / 2**30, "kernel_attention": r["kernel_attention"],
               "fused_rotary": r["fused_rotary"], "kv_int8": r["kv_int8"], "gemv_layers": r["gemv_layers"]}
        if bw:
            row["roofline_fraction"] = r["bytes_per_step"] * med / bw
        ref = next(m for m in names if VARIANTS[m].weights == VARIANTS[n].weights and m in RESULTS["variants"])
        if ref != n:  # the first variant on the same weights
            a, b = RESULTS["variants"][ref]["tokens"], r["tokens"]
            row["greedy_equal"] = [ref, next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))]
        rows.append(row)
    return rows


def _write(path: str | None) -> None:
    if path:
        with open(path + ".part", "w") as f:
            json.dump(RESULTS, f, indent=1)
        os.replace(path + ".part", path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="7B", choices=list(B.SHAPES))
    p.add_argument("--tokens", type=int, default=1024, help="greedy tokens per timed generation, from one token")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default=DEFAULT, help=f"comma-separated, the first is the baseline "
                   f"(default {DEFAULT}; --list shows all)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU, fp32 on a CPU), bf16, fp16, fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="write the results here (also when stopped part way)")
    p.add_argument("--list", action="store_true")
    a = p.parse_args(argv)
    if a.list:
        for n, v in VARIANTS.items():
            print(f"{n:>14}  {v.about}")
        return 0
    names = list(dict.fromkeys(n.strip() for n in a.variants.split(",") if n.strip()))  # each once, in order
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        p.error(f"unknown variant(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(VARIANTS)}")
    if a.tokens < 1 or a.rounds < 1:
        p.error("--tokens and --rounds must be at least 1")
    from qwenlm.auto import resolve_device, resolve_dtype

    device = resolve_device(a.device)
    run = Run(a.shape, resolve_dtype(a.dtype, device, B.shape_config(a.shape)), device, a.tokens)
    bw = B._bandwidth(device)
    RESULTS.clear()
    RESULTS.update(shape=a.shape, tokens=a.tokens, dtype=str(run.dtype).replace("torch.", ""),
                   device=torch.cuda.get_device_name() if device.type == "cuda" else str(device),
                   variants={}, summary=[], stopped=None, failed={})
    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    failed: dict[str, str] = {}
    try:
        for rnd in range(a.rounds):
            for n in names:
                if n in failed:
                    continue
                print(f"round {rnd + 1}/{a.rounds}: {n}...", file=sys.stderr)
                try:
                    res = run.time_one(n, VARIANTS[n])
                except Stopped:
                    raise
                except Exception as e:  # one variant's failure (a kernel, memory) costs only that variant
                    failed[n] = f"{type(e).__name__}: {e}"
                    run.engines.pop(n, None)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    print(f"  -> {n} failed: {failed[n]}", file=sys.stderr)
                    RESULTS["failed"] = failed
                    _write(a.json)
                    continue
                r = RESULTS["variants"].setdefault(n, {"rounds": []})
                r["rounds"].append(res.pop("tokens_per_s"))
                r.update(res)
                print(f"  -> {n}: {r['rounds'][-1]:.1f} tok/s", file=sys.stderr)
                RESULTS["summary"] = _summary(names, bw)
                _write(a.json)
    except Stopped as e:
        RESULTS["stopped"] = str(e)
        print(f"stopped ({e}): writing what was timed", file=sys.stderr)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        RESULTS["summary"] = _summary(names, bw)
        _write(a.json)
    print(f"{a.shape} {RESULTS['dtype']} on {RESULTS['device']}, batch 1, {a.tokens} greedy tokens, "
          f"median of {a.rounds} rounds")
    print(f"{'variant':>14} {'tok/s':>9} {'vs base':>8} {'roofline':>9} {'weights':>9}  kernels")
    for r in RESULTS["summary"]:
        roof = f"{100 * r['roofline_fraction']:.0f}%" if "roofline_fraction" in r else "-"
        ks = ", ".join(k for k, on in (("triton attention", r["kernel_attention"]), ("fused rotary", r["fused_rotary"]),
                                       ("int8 kv", r["kv_int8"]), (f"{r['gemv_layers']} gemv", r["gemv_layers"])) if on)
        same = f"; greedy = {r['greedy_equal'][0]}'s for {r['greedy_equal'][1]}" if "greedy_equal" in r else ""
        vs = "-" if r["vs_base"] is None else f"{r['vs_base']:.2f}x"
        print(f"{r['variant']:>14} {r['tokens_per_s']:>9.1f} {vs:>8} {roof:>9} "
              f"{r['weight_gib']:>6.2f} GiB  {ks or 'no Triton kernels'}{same}")
    for n, err in failed.items():
        print(f"{n:>14} failed: {err}")
    return 1 if RESULTS["stopped"] or failed else 0


if __name__ == "__main__":
    sys.exit(main())
