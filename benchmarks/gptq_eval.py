"""Quality of `qwen quantize` on the offline default model: GPTQ Int4 and Int8, calibrated on Python
standard-library sources (email/, json/), evaluated by perplexity on held-out ones (asyncio/), and a
chat question. CPU, a few minutes per model.

    python benchmarks/gptq_eval.py [--bits 8,4] [--group-size 128] [--asym] [--act-order] [--samples 32]
                                   [--seq-len 256] [--eval-windows 16] [--out /tmp/gptq]
"""

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import sysconfig
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--asym", action="store_true", help="asymmetric groups")
    ap.add_argument("--act-order", action="store_true", help="quantize columns by decreasing Hessian diagonal")
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--out", default="/tmp/qwenlm-gptq-eval")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    from qwenlm import load
    from qwenlm.quant.gptq_quantize import nll

    stdlib = sysconfig.get_paths()["stdlib"]
    calib = [os.path.join(stdlib, "email"), os.path.join(stdlib, "json")]
    held_out = sorted(glob.glob(os.path.join(stdlib, "asyncio", "*.py")))
    results = {"calibration": [os.path.relpath(c, stdlib) for c in calib], "held_out": "asyncio/*.py",
               "samples": args.samples, "seq_len": args.seq_len, "group_size": args.group_size,
               "sym": not args.asym, "act_order": args.act_order}
    paths = {"fp32 (GGUF dequantized)": None}
    bit_list = [int(b) for b in args.bits.split(",")]
    for bits in bit_list:
        out = os.path.join(args.out, f"int{bits}")
        if not os.path.isdir(out):
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "qwenlm", "quantize", "default", out, "--bits", str(bits),
                   "--group-size", str(args.group_size), "--samples", str(args.samples), "--seq-len",
                   str(args.seq_len), "--device", "cpu"] + (["--asym"] if args.asym else []) \
                + (["--act-order"] if args.act_order else [])
            for c in calib:
                cmd += ["--calib", c]
            subprocess.run(cmd, check=True)
            results[f"int{bits}_quantize_s"] = time.perf_counter() - t0
        paths[f"GPTQ int{bits}"] = out
    text = "\n".join(open(p, encoding="utf-8").read() for p in held_out)
    for name, path in paths.items():
        model, tok = load(path, device="cpu")
        ids = tok.encode(text, allowed_special=set())
        n = args.eval_windows * args.seq_len
        windows = torch.tensor(ids[:n]).view(args.eval_windows, args.seq_len)
        t0 = time.perf_counter()
        total, count = nll(model, windows)
        reply = model.chat(tok, "What is the capital of France? Answer in one word.", history=None,
                           do_sample=False, max_new_tokens=16)[0]
        results[name] = {"perplexity": math.exp(total / count), "tokens": count, "eval_s": time.perf_counter() - t0,
                         "quantization": getattr(model, "quantization", None), "france": reply}
        print(name, json.dumps(results[name], ensure_ascii=False), flush=True)
    base = results["fp32 (GGUF dequantized)"]["perplexity"]
    for bits in bit_list:
        r = results[f"GPTQ int{bits}"]
        r["vs_fp32"] = r["perplexity"] / base - 1
    print(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
