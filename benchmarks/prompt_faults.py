"""What reading a prompt costs the operating system on a CPU: wall time, system CPU time and minor page
faults (`getrusage`) of `model.generate` with a `--prompt-len`-token prompt and one new token, the
default model as `qwen chat` loads it, each prompt read anew (the kept conversation released first).
Run it with QWENLM_TUNE_MALLOC=0 and without to compare glibc's defaults with `reuse_freed_memory`
(qwenlm/memory.py), each in its own process:

    QWENLM_TUNE_MALLOC=0 python benchmarks/prompt_faults.py --prompt-len 128
    python benchmarks/prompt_faults.py --prompt-len 128
"""

import argparse
import resource
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description="Wall time, system CPU time and minor page faults of reading one prompt "
                                             "on a CPU (QWENLM_TUNE_MALLOC=0: glibc's malloc as it is set).")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    import qwenlm
    from qwenlm.engine import get_engine
    from qwenlm.memory import reuse_freed_memory

    torch.set_num_threads(2)
    model, _ = qwenlm.load(None, quantize="auto")
    ids = torch.arange(1000, 1000 + args.prompt_len)[None]
    model.generate(ids, max_new_tokens=1, do_sample=False)  # (one-off work: kernels, first allocations)
    tuned = reuse_freed_memory()  # (what loading did: False with QWENLM_TUNE_MALLOC=0, or without glibc)
    print(f"{args.prompt_len}-token prompt, allocator {'tuned' if tuned else 'as glibc sets it'}:")
    for _ in range(args.rounds):
        get_engine(model).release()
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        print(f"  wall {wall * 1e3:6.0f} ms   system CPU {(r1.ru_stime - r0.ru_stime) * 1e3:5.0f} ms   "
              f"minor page faults {r1.ru_minflt - r0.ru_minflt:7d}")


if __name__ == "__main__":
    main()
