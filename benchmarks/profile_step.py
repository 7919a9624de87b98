"""Where a serving decode step's time goes: the GPU kernels of `--rows` streams decoding at about
`--context` tokens each, on random weights of a real shape, as the serving engine runs them (CUDA
graphs, the Triton attention kernel).

    python benchmarks/profile_step.py --shape 7B --rows 64 --context 256 [--json out.json]

Prints the step's wall time (graphs replayed, no profiler) and the profiler's kernels by GPU time.
With the profiler on, graphs are still replayed: the kernels inside them are listed where the CUDA
version allows, else the graph launch shows as one entry; then run with QWENLM_GRAPHS=0 too. On a CPU
(`--shape tiny`), it lists operators instead: a dry run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="7B")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--context", type=int, default=256, help="tokens each row holds when the steps are timed")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    from qwenlm.engine.batch import BatchEngine, Sequence
    from qwenlm.eval.bench import random_model, shape_config
    from qwenlm.generation import GenerationConfig, StopChecker

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = random_model(shape_config(a.shape), dtype, dev)
    graphs = os.environ.get("QWENLM_GRAPHS", "1") != "0"
    eng = BatchEngine(model, max_num_seqs=a.rows, max_model_len=a.context + 2 * a.steps + 8,
                      cuda_graphs=graphs if dev.type == "cuda" else None)
    vocab = min(model.config.vocab_size, 151643)
    cfg = GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=2 * a.steps + 4,
                           eos_token_id=None, pad_token_id=0)
    g = torch.Generator().manual_seed(0)
    for _ in range(a.rows):
        prompt = torch.randint(0, vocab, (a.context,), generator=g).tolist()
        eng.submit(Sequence(prompt, cfg, StopChecker(cfg), emit=lambda t, r: None))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        while len(eng.active) < a.rows:  # every prompt read; the rows decode from here on
            eng.step(eng.take_waiting())
        for _ in range(3):  # graphs captured, kernels compiled
            eng.step()
        sync()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            eng.step()
        sync()
        step_ms = (time.perf_counter() - t0) / a.steps * 1000
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                        if dev.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(a.steps):
                eng.step()
            sync()
    # self times: each kernel (GPU) or operator (CPU) once, so that the rows add up to the total
    if dev.type == "cuda":
        key = "self_device_time_total"
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        key, events = "self_cpu_time_total", list(prof.key_averages())
    events.sort(key=lambda e: getattr(e, key, 0), reverse=True)
    total = sum(getattr(e, key, 0) for e in events) / a.steps
    rows = [{"name": e.key, "calls": e.count, "us_per_step": getattr(e, key, 0) / a.steps} for e in events[:a.top]]
    graphs = eng.cuda_graphs
    print(f"{a.shape}, {a.rows} rows at ~{a.context} tokens, {dev.type} {dtype}, graphs {graphs}: "
          f"{step_ms:.2f} ms per step ({a.rows / step_ms * 1000:.0f} tok/s); profiled: {total:.0f} us per step",
          flush=True)
    for r in rows:
        print(f"  {r['us_per_step']:9.1f} us/step  {r['calls'] / a.steps:5.1f}x  {r['name'][:90]}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shape": a.shape, "rows": a.rows, "context": a.context, "device": str(dev),
                       "graphs": graphs, "step_ms": step_ms, "kernels": rows, "profiled_us_per_step": total}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
