"""Options shared by the commands that load a model."""

from __future__ import annotations

import argparse
from contextlib import contextmanager


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", "-c", "--checkpoint-path", dest="model", default=None,
                   help="checkpoint directory, .gguf file or hub id (default: the offline default model)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    p.add_argument("--cpu-only", action="store_true", help="same as --device cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--quantize", choices=["auto", "none", "int4", "int8", "gguf"], default="auto",
                   help="weight-only layers for a CPU. auto (default): gguf for a model converted from a GGUF "
                        "file (the default model), else int8 (a GPTQ checkpoint: its float head), on a CPU unless "
                        "--dtype is given; as stored on a GPU. gguf: the GGUF file's own 4/5/8-bit blocks (its exact weights, ~1.25x int8's "
                        "speed); int8: 8-bit (~5x fp32's speed, the same greedy text on the default model); "
                        "int4: 4-bit, the fastest (~1.25x gguf); none: the weights as stored")
    p.add_argument("--kv-cache", choices=["auto", "float", "int8"], default="auto",
                   help="int8: keys/values in 8 bits (about half the memory of bf16, a quarter of fp32); "
                        "auto: config.json's use_cache_quantization")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (default: the model's generation_config.json)")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--greedy", action="store_true", help="always pick the most likely token")
    g.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--stats", action="store_true",
                   help="after each reply: tokens generated, tokens/s, and the prompt's tokens and wait")


def sampling_overrides(args: argparse.Namespace) -> dict:
    out = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k",
                                          "repetition_penalty", "seed")}
    if args.greedy:
        out["do_sample"] = False
    return {k: v for k, v in out.items() if v is not None}


def load_from_args(args: argparse.Namespace):
    from ..auto import load

    device = "cpu" if args.cpu_only else args.device
    return load(args.model, dtype=args.dtype, device=device, quantize=args.quantize, kv_cache=args.kv_cache)


def describe(model) -> str:
    """Where and how the model runs, for banners: "cpu, 8-bit weights", "cuda, bfloat16", ..."""
    q = getattr(model, "quantization", None)
    kinds = {"q8-avx2": "8-bit weights", "q4-avx2": "4-bit weights"}
    how = kinds.get(q) or (q.split(" ")[0] if q else str(model.dtype).replace("torch.", ""))
    if model.kv_int8:
        how += ", 8-bit KV cache"
    return f"{model.device.type}, {how}"


@contextmanager
def prompt_progress(model, stream, prefix: str = ""):
    """While active, a long prompt (read in chunks: a CPU) shows how much of it is read on `stream`
    when that is a terminal, as `prefix[reading the prompt: 1,024/3,000 tokens]`; the line is
    set back to `prefix` once the prompt is read."""
    from ..engine import get_engine

    engine = get_engine(model)
    before = engine.on_prefill

    def show(done: int, total: int) -> None:
        note = f"[reading the prompt: {done:,}/{total:,} tokens]" if done < total else ""
        stream.write(f"\r\033[K{prefix}{note}")
        stream.flush()

    engine.on_prefill = show if stream.isatty() else None
    try:
        yield
    finally:
        engine.on_prefill = before
