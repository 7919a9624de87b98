"""`qwen quantize --bits 4|8 --calib DATA MODEL OUT`: GPTQ, writing the original Int4/Int8 layout."""

from __future__ import annotations

import os
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="GPTQ-quantize a checkpoint to 4 or 8 bits (the original Int4/Int8 format)",
                       description="Calibrate on text, quantize every decoder linear layer with GPTQ, write a "
                                   "checkpoint that qwenlm, AutoGPTQ and vLLM load.")
    p.add_argument("model", help="checkpoint directory, .gguf file or hub id ('default' for the offline default model)")
    p.add_argument("out", help="output directory (must not exist or be empty)")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4)
    p.add_argument("--group-size", type=int, default=128, help="columns per scale/zero group (-1: one group per row)")
    p.add_argument("--act-order", action="store_true", help="quantize columns by decreasing Hessian diagonal (desc_act)")
    p.add_argument("--asym", action="store_true",
                   help="asymmetric groups (a zero point per group; the original releases are symmetric)")
    p.add_argument("--damp", type=float, default=0.01, help="dampening, as a fraction of the mean Hessian diagonal")
    p.add_argument("--calib", action="append", required=True, metavar="DATA",
                   help="calibration data: fine-tuning JSON ({'conversations': [...]}), a text file or a directory "
                        "of text files (repeatable)")
    p.add_argument("--samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--device", default="auto", help="where to run the calibration (auto, cpu, cuda)")
    p.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from ..auto import load
    from ..errors import UserError
    from ..hub import resolve_model
    from ..quant.gptq_quantize import calibration_tokens, quantize_model, save_gptq_checkpoint

    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise UserError(f"{args.out} exists and is not an empty directory")
    if args.group_size == 0 or args.group_size < -1:
        raise UserError("--group-size must be a positive number of columns, or -1")
    if args.samples < 1 or args.seq_len < 2:
        raise UserError("--samples must be >= 1 and --seq-len >= 2")
    for c in args.calib:  # before loading the model: a typo should not cost a load
        if not os.path.exists(c):
            raise UserError(f"calibration data not found: {c}")
    src = resolve_model(None if args.model == "default" else args.model)
    model, tok = load(src, dtype="float32", device=args.device)
    if getattr(model, "quantization", None):
        raise UserError(f"{args.model} is already quantized ({model.quantization})")
    k_sizes = {m.in_features for _, m in model.block_linears()}
    if args.group_size > 0 and any(k % args.group_size for k in k_sizes):
        raise UserError(f"--group-size {args.group_size} does not divide the layers' input sizes {sorted(k_sizes)}")
    tokens = calibration_tokens(tok, args.calib, args.samples, args.seq_len)
    print(f"calibrating on {tokens.shape[0]} x {tokens.shape[1]} tokens; {args.bits}-bit, group size "
          f"{args.group_size}{', act-order' if args.act_order else ''}", file=sys.stderr)
    bar = tqdm(total=len(model.blocks), desc="GPTQ", unit="layer")
    tensors = quantize_model(model, tokens, args.bits, args.group_size, args.act_order, args.damp,
                             sym=not args.asym, progress=lambda i, n: bar.update(1))
    bar.close()
    save_gptq_checkpoint(src, args.out, model, tensors, args.bits, args.group_size, args.act_order, args.damp,
                         sym=not args.asym)
    print(f"wrote {args.out} ({len(tensors)} quantized layers)")
    return 0
