"""`qwen info [--model M] [--json]`: what a model is, without loading its weights."""

from __future__ import annotations

import json
import os


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="show a model's architecture, size and location")
    p.add_argument("-m", "--model", default=None, help="checkpoint directory, .gguf file or hub id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def describe(path: str) -> dict:
    from ..auto import resolve_device, resolve_dtype
    from ..config import ModelConfig
    from ..generation.config import GenerationConfig
    from ..quant import q4
    from ..quant.gguf_blocks import recorded_source, source_of
    from ..quant.gptq import GPTQConfig
    from ..weights.loader import checkpoint_files

    cfg = ModelConfig.from_pretrained(path)
    gen = GenerationConfig.from_pretrained(path)
    device = resolve_device("auto")
    files = checkpoint_files(path)
    source = source_of(path)
    # what `--quantize auto` loads on this machine's CPU (auto_quantize, without building the kernel)
    kernel = {"avx2", "fma", "f16c"} <= q4._cpu_flags() and os.environ.get("QWENLM_Q4_KERNEL", "1") != "0"
    widths = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim)
    gptq = GPTQConfig.from_checkpoint(path, cfg.raw)
    if not kernel or any(w % q4.BLOCK for w in widths):
        cpu_weights = f"as stored ({cfg.torch_dtype})"
    elif gptq is not None:
        cpu_weights = f"its GPTQ {gptq.bits}-bit layers, the head in 8-bit blocks (int8)"
    else:
        cpu_weights = "the GGUF file's own blocks (gguf)" if source else "8-bit blocks (int8)"
    return {
        "path": os.path.abspath(path),
        "architecture": {"qwen": "QWenLMHeadModel", "qwen2": "Qwen2ForCausalLM"}[cfg.arch],
        "model_type": cfg.arch,
        "parameters": cfg.num_parameters(),
        "checkpoint_dtype": cfg.torch_dtype,
        "load_dtype": str(resolve_dtype("auto", device, cfg)).replace("torch.", ""),
        "device": str(device),
        "context_length": cfg.context_length,
        "layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads, "vocab_size": cfg.vocab_size,
        "dynamic_ntk": cfg.use_dynamic_ntk, "logn_attn": cfg.use_logn_attn,
        "chat_format": gen.chat_format,
        "weight_files": len(files),
        "weight_bytes": sum(os.path.getsize(f) for f in files),
        "gguf_source": source["path"] if source else None,
        # a lean conversion: the quantized weights are read from the GGUF file (not in weight_bytes)
        "weights_in_gguf": bool((recorded_source(path) or {}).get("lean")),
        "cpu_weights": cpu_weights,
    }


def run(args) -> int:
    from ..hub import resolve_model

    info = describe(resolve_model(args.model))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        if k == "parameters":
            v = f"{v:,} ({v / 1e9:.2f}B)"
        elif k == "weight_bytes":
            v = f"{v / 2**30:.2f} GiB"
        print(f"{k.replace('_', ' '):<{width}}  {v}")
    return 0
