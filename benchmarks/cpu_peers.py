"""CPU decode speed of the default model, side by side, one engine after another on an idle
machine: qwenlm's engine, transformers (fp32, same converted weights), llama.cpp (the same Q4_K_M
GGUF, via llama-cpp-python when it is installed). Same prompt, greedy, same number of tokens.

    python benchmarks/cpu_peers.py [--tokens 128] [--threads 2] [--llama-python /path/to/python]

With `--sample`: the chat's sampling settings instead of greedy (the model's generation_config.json:
temperature 0.7, top-p 0.8, top-k 20, repetition penalty 1.05), qwenlm int4/int8 against llama.cpp.

With `--prefill 128,512,1024`: prompt processing instead — the first N tokens of a Python source file
(the standard library's os.py), qwenlm int4 and gguf (the default) against llama.cpp, same tokens (ours,
given to llama.cpp).
"""

import argparse
import json
import subprocess
import sys
import time

import torch

PROMPT = "Write a Python function that checks whether a number is prime."

LLAMA = r"""
import json, sys, time
from llama_cpp import Llama
path, n, threads, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sampling = json.loads(sys.argv[5]) if len(sys.argv) > 5 else dict(top_k=1, temp=0.0, repeat_penalty=1.0)
llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, verbose=False, seed=0)
ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
def run(k):
    llm.reset(); out = []
    t0 = time.perf_counter()
    for i, tok in enumerate(llm.generate(ids, **sampling)):
        if i == 0: t1 = time.perf_counter()
        out.append(tok)
        if len(out) == k: break
    return t1 - t0, time.perf_counter() - t1, out
run(8)
ttft, dt, out = run(n)
print(json.dumps({"ttft_s": ttft, "decode_tokens_per_s": (n - 1) / dt, "tokens": out}))
"""


LLAMA_PREFILL = r"""
import json, sys, time
from llama_cpp import Llama
path, threads, batches = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
llm = Llama(model_path=path, n_ctx=4096, n_threads=threads, verbose=False, n_batch=512)
out = {}
for ids in batches:
    llm.reset(); llm.eval(ids[:16]); llm.reset()
    t0 = time.perf_counter(); llm.eval(ids); out[len(ids)] = len(ids) / (time.perf_counter() - t0)
print(json.dumps(out))
"""


def prefill(lengths, threads, llama_python):
    import inspect
    import os

    from qwenlm import GenerationConfig, load
    from qwenlm.engine import Engine

    text = open(inspect.getsourcefile(os), encoding="utf-8").read()
    cfg = GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=1, eos_token_id=None)
    rows = {n: {} for n in lengths}
    for quantize in ("int4", "gguf"):
        model, tok = load(device="cpu", quantize=quantize)
        all_ids = tok.encode(text)
        eng = Engine(model)
        for n in lengths:
            ids = all_ids[:n]
            eng.generate([ids], cfg)  # warm-up
            t0 = time.perf_counter()
            eng.generate([ids], cfg)  # the prompt plus one sampled token
            rows[n][f"qwenlm {quantize} tok/s"] = n / (time.perf_counter() - t0)
    if llama_python:
        from qwenlm.hub import default_gguf_path

        r = subprocess.run([llama_python, "-c", LLAMA_PREFILL, default_gguf_path(), str(threads),
                            json.dumps([all_ids[:n] for n in lengths])], capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-500:], file=sys.stderr)
        else:
            for n, v in json.loads(r.stdout).items():
                rows[int(n)]["llama.cpp tok/s"] = v
                for quantize in ("int4", "gguf"):
                    rows[int(n)][f"{quantize} / llama.cpp"] = rows[int(n)][f"qwenlm {quantize} tok/s"] / v
    for n, r in rows.items():
        print(f"prefill {n:>5}: {json.dumps(r)}")


def ours(n, dtype, quantize=None, sample=False):
    from qwenlm import load
    from qwenlm.engine import Engine
    from qwenlm.generation import GenerationConfig
    from qwenlm.tokenizer import make_context

    model, tok = load(dtype=dtype, device="cpu", quantize=quantize)
    _, ids = make_context(tok, PROMPT, system="You are a helpful assistant.")
    eng = Engine(model)
    cfg = GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=n, eos_token_id=None)
    if sample:  # the chat's own settings; no stop, so that every run makes n tokens
        cfg = model.generation_config.update(do_sample=True, max_new_tokens=n, eos_token_id=None, seed=0)
    eng.generate([ids], cfg.update(max_new_tokens=8))
    t0 = time.perf_counter()
    eng.generate([ids], cfg.update(max_new_tokens=1))
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = eng.generate([ids], cfg)[0]
    dt = time.perf_counter() - t0 - ttft
    return {"ttft_s": ttft, "decode_tokens_per_s": (n - 1) / dt, "tokens": out}, ids


def hf(n, ids):
    import transformers

    from qwenlm.hub import default_model_dir

    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    x = torch.tensor([ids])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(x, max_new_tokens=8, **kw)
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
        dt = time.perf_counter() - t0 - ttft
    return {"ttft_s": ttft, "decode_tokens_per_s": (n - 1) / dt, "tokens": out[0, len(ids):].tolist()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-python", default=None, help="a python with llama-cpp-python installed")
    ap.add_argument("--prefill", default=None, help="comma-separated prompt lengths: prompt processing instead")
    ap.add_argument("--sample", action="store_true", help="the chat's sampling settings instead of greedy")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.prefill:
        return prefill([int(x) for x in args.prefill.split(",")], args.threads, args.llama_python)
    if args.sample:
        return sampled(args)
    res = {}
    res["qwenlm fp32"], ids = ours(args.tokens, "float32")
    res["qwenlm bf16"], _ = ours(args.tokens, "bfloat16")
    res["qwenlm int4"], _ = ours(args.tokens, "auto", "int4")
    res["qwenlm int8"], _ = ours(args.tokens, "auto", "int8")
    res["qwenlm gguf"], _ = ours(args.tokens, "auto", "gguf")
    res["transformers fp32"] = hf(args.tokens, ids)
    if args.llama_python:
        from qwenlm.hub import default_gguf_path

        r = subprocess.run([args.llama_python, "-c", LLAMA, default_gguf_path(), str(args.tokens),
                            str(args.threads), PROMPT_CHAT(ids)], capture_output=True, text=True)
        res["llama.cpp Q4_K_M"] = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-500:]}
    ref = res["qwenlm fp32"]["tokens"]
    for name, r in res.items():
        toks = r.pop("tokens", None)
        if toks is not None:
            r["same_greedy_tokens_as_qwenlm_fp32"] = next((i for i, (a, b) in enumerate(zip(ref, toks)) if a != b),
                                                          len(ref))
        print(f"{name:>20}: {json.dumps(r)}")


def sampled(args):
    """Decode speed with the chat's sampling settings, qwenlm 4/8-bit and llama.cpp, alternating twice."""
    from qwenlm.hub import default_gguf_path, default_model_dir

    gen = json.load(open(f"{default_model_dir()}/generation_config.json"))
    llama_sampling = {"temp": gen["temperature"], "top_p": gen["top_p"], "top_k": gen["top_k"],
                      "repeat_penalty": gen["repetition_penalty"]}
    print(f"sampling: {llama_sampling}")
    for run in (1, 2):
        for name, quantize in (("qwenlm int4", "int4"), ("qwenlm int8", "int8"), ("qwenlm gguf", "gguf")):
            r, ids = ours(args.tokens, "auto", quantize, sample=True)
            r.pop("tokens")
            print(f"run {run} {name:>18}: {json.dumps(r)}", flush=True)
        if args.llama_python:
            r = subprocess.run([args.llama_python, "-c", LLAMA, default_gguf_path(), str(args.tokens),
                                str(args.threads), PROMPT_CHAT(ids), json.dumps(llama_sampling)],
                               capture_output=True, text=True)
            out = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-500:]}
            out.pop("tokens", None)
            print(f"run {run} {'llama.cpp Q4_K_M':>18}: {json.dumps(out)}", flush=True)


def PROMPT_CHAT(ids):  # the same ChatML prompt as text (llama.cpp parses the special tokens)
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + PROMPT
            + "<|im_end|>\n<|im_start|>assistant\n")


if __name__ == "__main__":
    sys.exit(main())
