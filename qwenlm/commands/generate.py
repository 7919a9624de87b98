"""`qwen generate [PROMPT]`: one completion for scripts. The prompt comes from the argument or
stdin; the reply streams to stdout. `--raw` skips the chat template (base models)."""

from __future__ import annotations

import sys

from .common import add_model_options, add_sampling_options, load_from_args, prompt_progress, sampling_overrides


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="complete one prompt (argument or stdin) and exit")
    p.add_argument("prompt", nargs="?", help="the prompt; read from stdin when omitted")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the text as is")
    p.add_argument("--system", default="You are a helpful assistant.", help="system prompt (chat mode)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    add_model_options(p)
    add_sampling_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import UserError
    from ..generation.generate import stream_text
    from ..tokenizer.chatml import make_context

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise UserError("the prompt is empty: pass it as an argument or on stdin")
    model, tokenizer = load_from_args(args)
    overrides = sampling_overrides(args)
    if args.stop:
        overrides["stop"] = args.stop
    cfg = model.generation_config.update(**overrides)
    if args.raw:
        ids = tokenizer.encode(prompt)
        extra = [tokenizer.eod_id]
    else:
        _, ids = make_context(tokenizer, prompt, system=args.system, max_window_size=cfg.max_window_size)
        extra = [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]
    with prompt_progress(model, sys.stderr):
        for piece in stream_text(model, tokenizer, ids, cfg, extra):
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        from ..engine import get_engine

        print(f"[{get_engine(model).last_stats.summary()}]", file=sys.stderr)
    return 0
