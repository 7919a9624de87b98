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
    p.add_argument("--json", action="store_true", help="hold the reply to one JSON object (token by token)")
    p.add_argument("--json-schema", metavar="FILE", default=None,
                   help="hold the reply to a value of the JSON schema in FILE (token by token)")
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
    schema = _schema(args)
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
    constraint = None
    if schema is not None:
        from ..generation.grammar import GrammarError, grammars_for

        try:
            constraint = grammars_for(tokenizer, model.config.vocab_size, extra[0]).json(schema)
        except GrammarError as e:
            raise UserError(f"--json-schema {args.json_schema}: {e}" if args.json_schema else str(e)) from None
    with prompt_progress(model, sys.stderr):
        for piece in stream_text(model, tokenizer, ids, cfg, extra, constraint=constraint):
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        from ..engine import get_engine

        print(f"[{get_engine(model).last_stats.summary()}]", file=sys.stderr)
    return 0


def _schema(args) -> dict | None:
    """--json: any object; --json-schema FILE: the schema in it; neither: None. Read before the model
    loads, so that a bad file is a one-line error at once."""
    import json

    from ..errors import UserError

    if args.json_schema is None:
        return {"type": "object"} if args.json else None
    try:
        with open(args.json_schema, encoding="utf-8") as f:
            schema = json.load(f)
    except OSError as e:
        raise UserError(f"--json-schema {args.json_schema}: {e.strerror}") from None
    except ValueError as e:
        raise UserError(f"--json-schema {args.json_schema}: not JSON ({e})") from None
    if not isinstance(schema, dict):
        raise UserError(f"--json-schema {args.json_schema}: a JSON schema is an object, not {type(schema).__name__}")
    return schema
