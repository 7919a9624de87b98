"""A multi-turn chat on this CPU with the default model: the wait before each reply starts, as the
conversation grows. Each engine holds its own conversation (its own greedy replies as history, the
original's ChatML prompt, system "You are a helpful assistant."):

- qwenlm (the weights `qwen chat` loads on a CPU: the GGUF file's blocks), `model.chat_stream` as
  `qwen chat` uses it: the engine keeps the conversation's cache and
  reads only what is new of each prompt (the CPU default);
- qwenlm with that turned off (every prompt read whole, as the original and transformers do);
- llama.cpp (llama-cpp-python, the same Q4_K_M GGUF, `generate` on the prompt's tokens; it too keeps its
  last tokens and evaluates only what differs), when `--llama-python` is given.

    python benchmarks/chat_turns.py [--tokens 160] [--threads 2] [--llama-python /path/to/python]
    python benchmarks/chat_turns.py --serve   # the same conversation through `qwen serve` (in process,
                                              # streaming, the openai client), prefix cache on and off

Per turn: prompt tokens, time to the first reply token, and (qwenlm) prompt tokens read.
"""

import argparse
import json
import subprocess
import sys
import time

import torch

MESSAGES = [
    "Write a Python function that checks whether a number is prime.",
    "Now make it faster for large numbers, and explain the change.",
    "Write unit tests for it with pytest.",
    "Add type hints and a docstring to the function.",
    "What is the time complexity of the final version?",
    "Rewrite it in Rust.",
]
SYSTEM = "You are a helpful assistant."

LLAMA = r"""
import json, sys, time
from llama_cpp import Llama
path, threads, n, messages, system = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
llm = Llama(model_path=path, n_ctx=8192, n_threads=threads, verbose=False, seed=0, n_batch=512)
end = llm.tokenize(b"<|im_end|>", add_bos=False, special=True)[0]
def chatml(history, query):
    text = f"<|im_start|>system\n{system}<|im_end|>"
    for q, r in history:
        text += f"\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{r}<|im_end|>"
    return text + f"\n<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"
llm.eval(llm.tokenize(b"warm up", add_bos=False)); llm.reset()
history, rows = [], []
for q in messages:
    ids = llm.tokenize(chatml(history, q).encode(), add_bos=False, special=True)
    t0 = time.perf_counter(); out = []
    for i, tok in enumerate(llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0)):
        if i == 0: ttft = time.perf_counter() - t0
        if tok == end or len(out) == n: break
        out.append(tok)
    reply = llm.detokenize(out).decode(errors="replace").strip()
    rows.append({"prompt_tokens": len(ids), "ttft_s": round(ttft, 2), "reply_tokens": len(out)})
    history.append((q, reply))
print(json.dumps(rows))
"""


def ours(model, tok, n: int, reuse: bool) -> list[dict]:
    from qwenlm.engine import get_engine
    from qwenlm.tokenizer import make_context

    eng = get_engine(model)
    eng.release()
    eng.reuse_prefix = reuse
    reads = []
    prefill = eng._prefill
    eng._prefill = lambda st: reads.append(st["w"] - st["keep"]) or prefill(st)
    history, rows = [], []
    try:
        for q in MESSAGES:
            prompt = len(make_context(tok, q, history, SYSTEM)[1])
            t0 = time.perf_counter()
            ttft, text = None, ""
            for text in model.chat_stream(tok, q, history, SYSTEM, do_sample=False, repetition_penalty=1.0,
                                          max_new_tokens=n):
                ttft = ttft or time.perf_counter() - t0
            history.append((q, text.strip()))
            rows.append({"prompt_tokens": prompt, "read_tokens": reads[-1], "ttft_s": round(ttft, 2),
                         "reply_tokens": len(tok.encode(text))})
    finally:
        del eng._prefill
        eng.reuse_prefix = model.device.type == "cpu"
        eng.release()
    return rows


def served(model, tok, n: int, prefix_cache: bool) -> list[dict]:
    import openai

    from qwenlm.serve import ServerOptions, create_app, serve_in_thread

    app = create_app(model, tok, ServerOptions(served_model_name="qwen", max_model_len=4096, max_num_seqs=4,
                                               prefix_cache=prefix_cache))
    engine = app.state.server.engine
    messages, rows = [{"role": "system", "content": SYSTEM}], []
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
        for q in MESSAGES:
            messages.append({"role": "user", "content": q})
            before = engine.stats["prompt_tokens_reused"]
            t0, ttft, text = time.perf_counter(), None, ""
            for ch in client.chat.completions.create(model="qwen", messages=messages, temperature=0, max_tokens=n,
                                                     stream=True, stream_options={"include_usage": True}):
                if ch.usage is not None:
                    prompt = ch.usage.prompt_tokens
                if ch.choices and ch.choices[0].delta.content:
                    ttft = ttft or time.perf_counter() - t0
                    text += ch.choices[0].delta.content
            messages.append({"role": "assistant", "content": text})
            reused = engine.stats["prompt_tokens_reused"] - before
            rows.append({"prompt_tokens": prompt, "read_tokens": prompt - reused, "ttft_s": round(ttft, 2)})
    engine.shutdown()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=160, help="longest reply, in tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-python", default=None, help="a python with llama-cpp-python installed")
    ap.add_argument("--serve", action="store_true", help="through `qwen serve`, prefix cache on and off")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from qwenlm import load

    model, tok = load(device="cpu", quantize="auto")  # what `qwen chat` loads: the GGUF file's own blocks
    model.chat(tok, "hi", max_new_tokens=2)  # warm-up
    if args.serve:
        res = {"qwen serve (prefix cache)": served(model, tok, args.tokens, True),
               "qwen serve --no-prefix-cache": served(model, tok, args.tokens, False)}
        json.dump(res, sys.stdout, indent=1)
        print()
        return
    res = {"qwenlm (kept cache)": ours(model, tok, args.tokens, True),
           "qwenlm (every prompt read whole)": ours(model, tok, args.tokens, False)}
    if args.llama_python:
        from qwenlm.hub import default_gguf_path

        r = subprocess.run([args.llama_python, "-c", LLAMA, default_gguf_path(), str(args.threads), str(args.tokens),
                            json.dumps(MESSAGES), SYSTEM], capture_output=True, text=True)
        res["llama.cpp Q4_K_M"] = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-800:]}
    json.dump(res, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
