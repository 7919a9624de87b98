"""`qwen convert MODEL.gguf OUT_DIR`: import a GGUF (qwen2 or qwen architecture)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a GGUF file into a checkpoint directory",
                       description="Dequantise a Qwen/Qwen2 GGUF into safetensors + config + tokenizer files.")
    p.add_argument("gguf", help="input .gguf file (architecture qwen2 or qwen)")
    p.add_argument("out_dir", help="output directory (must not exist or be empty)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (float32 keeps the dequantised values exactly)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..weights.convert import convert_gguf

    out = convert_gguf(args.gguf, args.out_dir, dtype=args.dtype, progress=not args.no_progress)
    print(f"wrote {out}")
    return 0
