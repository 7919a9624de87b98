"""How long running streams stall when a long prompt arrives, on the serving engine (BatchEngine,
in process, the default model on this CPU): `--streams` greedy streams are decoding when a prompt of
`--prompt-len` tokens (the standard library's os.py) arrives. Reported for each `--chunks` setting
(0: the prompt is read whole before the next decode step; N: N prompt tokens per step):

- the longest and the 99th-percentile gap between two tokens of a running stream;
- the long prompt's time to first token;
- the whole run's wall time (every stream finished).

    python benchmarks/long_prompt_stall.py [--streams 4] [--prompt-len 2000] [--tokens 96] [--chunks 0,256,128]
"""

import argparse
import inspect
import json
import os
import threading
import time

import torch


def run(model, tok, chunk: int, streams: int, prompt_len: int, tokens: int) -> dict:
    from qwenlm import GenerationConfig
    from qwenlm.engine.batch import BatchEngine, Sequence
    from qwenlm.generation import StopChecker

    cfg = GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=tokens, eos_token_id=None)
    long_ids = tok.encode(open(inspect.getsourcefile(os), encoding="utf-8").read())[:prompt_len]
    eng = BatchEngine(model, max_num_seqs=streams + 1, max_model_len=prompt_len + tokens + 64,
                      prefill_chunk=chunk).start()
    times: list[list[float]] = [[] for _ in range(streams + 1)]
    done = threading.Semaphore(0)

    def emit(i):
        def f(t, reason):
            times[i].append(time.perf_counter())
            if reason is not None:
                done.release()
        return f

    try:
        t0 = time.perf_counter()
        for i in range(streams):
            ids = tok.encode(f"Write a Python function number {i} that checks whether a number is prime.")
            eng.submit(Sequence(ids, cfg, StopChecker(cfg), emit(i)))
        while min(len(t) for t in times[:streams]) < 8:  # the streams are running
            time.sleep(0.01)
        arrival = time.perf_counter()
        eng.submit(Sequence(long_ids, cfg.update(max_new_tokens=16), StopChecker(cfg), emit(streams)))
        for _ in range(streams + 1):
            done.acquire()
        wall = time.perf_counter() - t0
    finally:
        eng.shutdown()
    gaps = sorted(b - a for t in times[:streams] for a, b in zip(t, t[1:]) if b > arrival)
    return {"prefill_chunk": chunk, "max_gap_s": round(gaps[-1], 3),
            "p99_gap_s": round(gaps[int(0.99 * (len(gaps) - 1))], 3),
            "long_prompt_ttft_s": round(times[streams][0] - arrival, 2), "wall_s": round(wall, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--chunks", default="0,256,128")
    args = ap.parse_args()
    from qwenlm import load

    torch.set_grad_enabled(False)
    model, tok = load(device="cpu")
    run(model, tok, 256, 2, 300, 24)  # warm-up
    for chunk in [int(c) for c in args.chunks.split(",")]:
        print(json.dumps(run(model, tok, chunk, args.streams, args.prompt_len, args.tokens)), flush=True)


if __name__ == "__main__":
    main()
