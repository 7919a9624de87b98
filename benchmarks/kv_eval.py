"""Quality of the int8 KV cache on the offline default model: perplexity of held-out text (Python
standard-library asyncio/ sources) when every token past a prefill attends to cached keys/values kept
as floats, in qwenlm's int8 format, or in the original's `use_cache_quantization` format (per-chunk
scale, truncation). Teacher-forced through the reference forward: the first `--prefill` tokens of each
window in one chunk, the rest one token at a time (so they read the cache, as generation does).

    python benchmarks/kv_eval.py [--windows 8] [--prefill 64] [--decode 192] [--json out.json]
"""

import argparse
import glob
import json
import math
import os
import sysconfig
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--decode", type=int, default=192)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    from qwenlm import load
    from qwenlm.models.layers import KVCache
    from qwenlm.quant.kv import fake_quantize_original

    class Original(KVCache):
        def update(self, i, k, v):
            return super().update(i, fake_quantize_original(k), fake_quantize_original(v))

    model, tok = load(None, device="cpu")
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "asyncio", "*.py")))
    ids = tok.encode("\n".join(open(p, encoding="utf-8").read() for p in files), allowed_special=set())
    n = args.prefill + args.decode
    windows = torch.tensor(ids[:args.windows * n]).view(args.windows, n)
    caches = {"float": lambda: KVCache(len(model.blocks)),
              "int8 (qwenlm: per token and head, rounded, keys centered)": lambda: KVCache(len(model.blocks), int8=True),
              "int8 (original: per chunk and head, truncated)": lambda: Original(len(model.blocks))}
    results = {"model": model.name_or_path, "text": "asyncio/*.py", "windows": args.windows,
               "prefill": args.prefill, "decode": args.decode}
    for name, make in caches.items():
        t0 = time.perf_counter()
        total = 0.0
        with torch.inference_mode():
            r = model(windows[:, :args.prefill], past_key_values=make(), use_cache=True)
            logits = r.logits[:, -1]
            for t in range(args.prefill, n):
                total += torch.nn.functional.cross_entropy(logits.float(), windows[:, t], reduction="sum").item()
                if t + 1 < n:
                    r = model(windows[:, t:t + 1], past_key_values=r.past_key_values, use_cache=True)
                    logits = r.logits[:, -1]
        count = args.windows * args.decode
        results[name] = {"perplexity": math.exp(total / count), "tokens": count, "seconds": time.perf_counter() - t0}
        print(name, json.dumps(results[name]), flush=True)
    base = results["float"]["perplexity"]
    for name in caches:
        results[name]["vs_float"] = results[name]["perplexity"] / base - 1
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
