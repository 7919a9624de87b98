"""Read a GPU session's results (the JSON files of `gpu_session.sh`, unpacked from results.tgz) and
print what each says, including the decisions that wait on it: what each change is worth end to end
(decode_ab.py), which launch settings of each kernel are fastest over a decode step's products, whether
the float one-row kernel beats cuBLAS, and how far each target is.

    python benchmarks/gpu_results.py DIR            # DIR: where results.tgz was unpacked

No GPU needed: it only reads files. A file that is missing (a step skipped) is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# shapes of one Qwen v1 decode layer, each product once (the sweeps' keys)
GPTQ_LAYER = {(4096, 12288), (4096, 22016), (11008, 4096), (4096, 4096)}  # (K, N), 7B, gate/up fused
GEMV_LAYERS = {"7B": {(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)},  # (N, K)
               "1.8B": {(6144, 2048), (2048, 2048), (11008, 2048), (2048, 5504)}}


def _load(d: str, name: str):
    path = os.path.join(d, name)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"({name}: unreadable, {e})")
        return None


def _key(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True)


def best_setting(rows: list[dict], case_of, cases: set) -> dict | None:
    """Of the settings timed on every case in `cases`, the one with the least total time; with the
    default's total and each case's time under both. `case_of(row)` gives a row's case."""
    times: dict[str, dict] = {}
    default = None
    for r in rows:
        c = case_of(r)
        if c in cases and "us" in r:
            times.setdefault(_key(r["config"]), {})[c] = r["us"]
            if r.get("default"):
                default = _key(r["config"])
    full = {k: v for k, v in times.items() if set(v) == cases}
    if not full:
        return None
    best = min(full, key=lambda k: sum(full[k].values()))
    return {"best": json.loads(best), "best_us": full[best], "best_total": sum(full[best].values()),
            "default": json.loads(default) if default in full else None,
            "default_us": full.get(default), "default_total": sum(full[default].values()) if default in full else None}


def gptq_sweep(rows: list[dict]) -> None:
    print("\n## GPTQ one-row kernel (sweep_gptq.json), 7B layer products")
    case = lambda r: (r["k"], r["n"])  # noqa: E731
    four = [r for r in rows if r.get("bits") == 4]
    pick = best_setting(four, case, GPTQ_LAYER & {case(r) for r in four})
    if pick:
        base = {case(r): r["bf16_us"] for r in four}
        print(f"per layer, 4-bit: default {pick['default_total'] or float('nan'):.1f} us, best "
              f"{pick['best_total']:.1f} us ({pick['best']}); bf16 cuBLAS {sum(base[c] for c in pick['best_us']):.1f} us")
        for c, us in sorted(pick["best_us"].items()):
            d = (pick["default_us"] or {}).get(c, float("nan"))
            print(f"  {c[0]}x{c[1]}: default {d:.1f} us, best {us:.1f} us, bf16 {base[c]:.1f} us ({base[c] / us:.2f}x)")
    for r in rows:
        if r.get("error"):
            print(f"  failed: {r['k']}x{r['n']} {r['bits']}-bit {r['config']}: {r['error']}")
    if pick and pick["default"]:  # the default's blocks with each way of summing K splits, codes converted
        base_cfg = {k: v for k, v in pick["default"].items() if k not in ("split", "magic")}
        variants: dict[str, dict] = {}
        for r in four:
            c = r["config"]
            if "us" in r and case(r) in pick["best_us"] and {k: v for k, v in c.items()
                                                             if k not in ("split", "magic")} == base_cfg:
                name = c.get("split", "reduce") + ("" if c.get("magic", True) else ", codes converted")
                variants.setdefault(name, {})[case(r)] = r["us"]
        for name, t in sorted(variants.items()):
            if len(t) == len(pick["best_us"]):
                print(f"  default blocks, {name}: {sum(t.values()):.1f} us per layer")
    head = [r for r in rows if r.get("bits") == 8 and r.get("n", 0) > 100000 and "us" in r]
    if head:
        b = min(head, key=lambda r: r["us"])
        d = next((r for r in head if r.get("default")), None)
        print(f"  8-bit head: default {d['us'] if d else float('nan'):.1f} us, best {b['us']:.1f} us "
              f"({b['config']}), bf16 {b['bf16_us']:.1f} us")


def gemv_sweep(rows: list[dict]) -> None:
    print("\n## Float one-row kernel against cuBLAS (sweep_gemv.json): QWENLM_GEMV")
    case = lambda r: (r["n"], r["k"])  # noqa: E731
    for model, shapes in GEMV_LAYERS.items():
        pick = best_setting(rows, case, shapes & {case(r) for r in rows})
        if not pick:
            continue
        blas = {case(r): r["cublas_us"] for r in rows}
        cu = sum(blas[c] for c in pick["best_us"])
        print(f"{model} layer: cuBLAS {cu:.1f} us, kernel default {pick['default_total'] or float('nan'):.1f} us, "
              f"best {pick['best_total']:.1f} us ({pick['best']}) -> "
              f"{'the kernel' if pick['best_total'] < cu else 'cuBLAS'} is faster by "
              f"{abs(cu - pick['best_total']) / max(cu, pick['best_total']) * 100:.0f}%")
    for r in rows:
        if r.get("error"):
            print(f"  failed: {r['n']}x{r['k']} {r['config']}: {r['error']}")


def attention_sweep(rows: list[dict]) -> None:
    print("\n## Decode attention (sweep_attention.json)")
    case = lambda r: (r["batch"], r["length"], r["int8"])  # noqa: E731
    cases = sorted({case(r) for r in rows})
    pick = best_setting(rows, case, set(cases))
    for c in cases:
        timed = [r for r in rows if case(r) == c and "us" in r]
        if not timed:
            continue
        b = min(timed, key=lambda r: r["us"])
        d = next((r for r in timed if r.get("default")), None)
        print(f"  {c[0]} rows, {c[1]} slots, {'int8' if c[2] else 'bf16'}: SDPA {b['sdpa_us']:.1f} us, default "
              f"{d['us'] if d else float('nan'):.1f} us, best {b['us']:.1f} us {b['config']}")
    if pick:
        print(f"  one setting for all cases: {pick['best']} ({pick['best_total']:.1f} us in all, "
              f"default {pick['default_total'] or float('nan'):.1f} us)")


def ab_runs(d: str) -> dict:
    """benchmarks/decode_ab.py's files (decode_ab_SHAPE.json): each variant against the defaults, same
    process and weights. Returns {f"ab:{shape}:{variant}": row}."""
    out = {}
    for name in sorted(os.listdir(d)):
        if not (name.startswith("decode_ab") and name.endswith(".json")):
            continue
        r = _load(d, name)
        if not isinstance(r, dict) or not (r.get("summary") or r.get("failed")):
            continue
        stop = f", stopped ({r['stopped']})" if r.get("stopped") else ""
        print(f"\n## {r['shape']} batch-1 decode, {r['tokens']} tokens, each variant in one process ({name}{stop})")
        for row in r["summary"]:
            roof = f", {100 * row['roofline_fraction']:.0f}% of roofline" if "roofline_fraction" in row else ""
            same = f"; greedy = {row['greedy_equal'][0]}'s for {row['greedy_equal'][1]}" if "greedy_equal" in row else ""
            vs = "" if row["vs_base"] is None else f", {row['vs_base']:.3f}x {r['summary'][0]['variant']}"
            print(f"  {row['variant']}: {row['tokens_per_s']:.1f} tok/s{vs}{roof}, weights {row['weight_gib']:.2f} GiB"
                  f"{same}  ({row['about']})")
            out[f"ab:{r['shape']}:{row['variant']}"] = row
        for variant, err in (r.get("failed") or {}).items():
            print(f"  {variant}: FAILED: {err}")
    return out


def benches(d: str) -> dict:
    print("\n## qwen bench runs")
    out = {}
    for name in sorted(os.listdir(d)):
        if not name.endswith(".json") or name.startswith(("sweep_", "profile", "decode_ab")):
            continue
        r = _load(d, name)
        if not isinstance(r, dict):
            continue
        stem = name[:-5]
        if r.get("decode"):
            out[stem] = r["decode"][0]["tokens_per_s"]
            rows = ", ".join(f"{x['tokens']} tokens {x['tokens_per_s']:.1f} tok/s (peak "
                             f"{x['peak_memory_bytes'] / 2**30:.2f} GiB)" for x in r["decode"])
            pre = f"; prefill {r['prefill']['ms']:.1f} ms" if r.get("prefill") else ""
            hf = f"; transformers {r['hf']['tokens_per_s']:.1f} tok/s" if r.get("hf") else ""
            print(f"{stem}: {r['dtype']}, weights {r['weight_bytes'] / 2**30:.2f} GiB, KV {r.get('kv_cache')}: "
                  f"{rows}{pre}{hf}")
        for s in r.get("serve") or []:
            ahead = f", {s['engine_steps_ahead']} of {s['engine_steps']} steps run ahead" if "engine_steps" in s else ""
            print(f"{stem}: {s['concurrency']} streams {s['tokens_per_s']:.1f} tok/s (one at a time "
                  f"{s['one_at_a_time_tokens_per_s']:.1f}), first token p50 {s['ttft_p50_s']:.2f} s, "
                  f"latency p50 {s['latency_p50_s']:.2f} s{ahead}")
            out[f"{stem}@{s['concurrency']}"] = s["tokens_per_s"]
    return out


def targets(tok: dict, ab: dict | None = None) -> None:
    print("\n## Against the targets")
    ab = ab or {}

    def line(what, got, want, at_most=False):
        if got is not None:
            met = got <= want if at_most else got >= want
            print(f"  {what}: {got:.2f} (target {'<=' if at_most else '>='} {want}) {'met' if met else 'NOT met'}")

    def base(shape):
        return (ab.get(f"ab:{shape}:base") or {}).get("tokens_per_s")

    line("7B bf16 batch-1 tok/s", base("7B") or tok.get("ab_7b") or tok.get("bench_7b"), 175)
    line("1.8B bf16 batch-1 tok/s", base("1.8B") or tok.get("ab_1.8b") or tok.get("bench_1.8b"), 550)
    int4 = ab.get("ab:7B:gptq4h8")
    if int4 and int4["vs_base"] is not None:  # side by side with bf16, one process
        line("7B Int4 (head 8-bit) / bf16", int4["vs_base"], 2.0)
        line("7B Int4 (head 8-bit) weights GiB", int4["weight_gib"], 5.0, at_most=True)
    bf16 = tok.get("gptq_bf16") or tok.get("ab_7b")
    if not int4 and bf16 and tok.get("gptq_int4_head8"):
        line("7B Int4 (head 8-bit) / bf16", tok["gptq_int4_head8"] / bf16, 2.0)
    for k in ("serve_7b@64", "serve_7b_kv8@64"):
        line(f"{k} output tok/s", tok.get(k), 8000)
    if tok.get("serve_7b@64") and tok.get("serve_7b_sync@64"):  # (two runs of one session, one after the other)
        print(f"  serve_7b@64, decode steps run ahead / not: {tok['serve_7b@64'] / tok['serve_7b_sync@64']:.3f}x")
    for k, v in sorted(tok.items()):
        base = k.rsplit("_", 1)[0]
        if k.startswith("ab_") and base in tok and base != k:
            print(f"  {k}: {v / tok[base]:.3f}x {base}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir")
    a = p.parse_args(argv)
    if not os.path.isdir(a.dir):
        print(f"error: {a.dir} is not a directory (unpack results.tgz into one)", file=sys.stderr)
        return 2
    for name, fn in (("sweep_gptq.json", gptq_sweep), ("sweep_gemv.json", gemv_sweep),
                     ("sweep_attention.json", attention_sweep)):
        rows = _load(a.dir, name)
        if rows:
            fn(rows)
    ab = ab_runs(a.dir)
    targets(benches(a.dir), ab)
    return 0


if __name__ == "__main__":
    sys.exit(main())
