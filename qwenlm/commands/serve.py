"""`qwen serve`: the OpenAI-compatible server (FastAPI + uvicorn) with a chat page at `/`."""

from __future__ import annotations

import math
import os

from .common import add_model_options, describe, load_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI API (chat, completions, tools) and a web chat page")
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (0: any free one; default 8000)")
    p.add_argument("--api-key", default=os.environ.get("QWENLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health and the page "
                        "(default: $QWENLM_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model id clients see (default: the model's name)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="sequences decoded together (default: 8 on CPU, 64 on GPU, fewer if memory is short)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context per sequence, prompt + completion (default: the model's, at most 4096 on "
                        "CPU and 8192 on GPU; less if --max-num-seqs sequences of it would not fit in memory)")
    p.add_argument("--max-queue", type=int, default=256, help="requests allowed to wait; beyond it: 429")
    p.add_argument("--prefill-chunk", type=_count, default=None, metavar="N",
                   help="prompt tokens read per step between decode steps, so that a long prompt does not "
                        "stall the running streams (default: 256 on CPU; 0 on GPU, where prompts are read "
                        "whole; 0: whole)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false", default=None,
                   help="do not keep finished requests' keys/values for prompts that start with the same "
                        "tokens (kept by default: a conversation's next turn reads only its new part)")
    p.add_argument("--no-warm-up", dest="warm_up", action="store_false", default=None,
                   help="on a GPU, do not run each batch size once before serving (the warm-up compiles "
                        "and captures the steps, a few seconds, so the first crowd of requests does not wait)")
    p.add_argument("--status-every", type=_seconds, default=10.0, metavar="SECONDS",
                   help="while there is work, print a status line this often: requests running and waiting, "
                        "prompt and generated tokens per second (default 10; 0: never)")
    p.add_argument("--allowed-origins", action="append", default=None, metavar="ORIGIN",
                   help="enable CORS for this origin (repeatable; '*' for any)")
    p.add_argument("--tool-format", choices=("auto", "react", "hermes"), default="auto",
                   help="how tools are put to the model and its calls read: react (the original Qwen's "
                        "ReAct prompt), hermes (<tool_call> blocks, what Qwen2.5 models are trained on), "
                        "auto (default): hermes where the model's chat template uses it, else react")
    p.set_defaults(func=run)


def _number(text: str, parse, low, high, what: str):
    """`parse(text)` if it is a finite number in [low, high], else argparse's one-line error."""
    import argparse

    try:
        value = parse(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def _port(text: str) -> int:
    return _number(text, int, 0, 65535, "a port number (0-65535)")


def _seconds(text: str) -> float:
    return _number(text, float, 0, math.inf, "a number of seconds >= 0")


def _count(text: str) -> int:
    return _number(text, int, 0, math.inf, "a whole number >= 0")


def bind_listener(host: str, port: int):
    """The server's listening socket, bound before the model loads so that a busy port or a wrong
    address is a one-line error at once instead of after the load."""
    import errno
    import socket

    from ..errors import UserError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise UserError(f"cannot listen on --host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        where = f"{host}:{port}"
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"{where} is already in use (another server?): pick another --port") from None
        if e.errno == errno.EACCES:
            raise UserError(f"not allowed to listen on {where}: ports below 1024 need privileges; "
                            f"pick another --port") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"{host!r} is not an address of this machine: use --host 127.0.0.1 (this "
                            f"machine only) or 0.0.0.0 (every interface)") from None
        raise UserError(f"cannot listen on {where}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _available_bytes(device) -> int:
    """What the KV cache may take: 85% of free GPU memory, or half of the machine's available memory."""
    from ..memory import free_bytes

    free = free_bytes(device)
    if free is None:
        return 4 << 30
    return int(free * 0.85) if device.type == "cuda" else free // 2


MIN_SHRUNK_LEN = 256  # the shortest context a default may shrink to, to fit the sequences asked for


def plan_memory(model, max_num_seqs: int | None, max_model_len: int | None,
                budget: int | None = None) -> tuple[int, int, str | None]:
    """(slots, context per slot, a note for the start-up lines or None). Explicit values are checked;
    defaults shrink to fit `budget` bytes of KV cache (by default what is free): the slots (at most 8 on a
    CPU, 64 on a GPU) at the default context, or, with the slots given, the context (down to
    MIN_SHRUNK_LEN tokens, a multiple of 256)."""
    from ..engine.batch import BatchEngine
    from ..errors import UserError

    cpu = model.device.type == "cpu"
    full = min(model.context_window, 4096 if cpu else 8192)
    length = max_model_len or full
    if max_model_len is not None and max_model_len < 16:
        raise UserError("--max-model-len must be at least 16")
    if max_model_len is not None and max_model_len > model.context_window:
        raise UserError(f"--max-model-len {max_model_len} is more than the model's context window "
                        f"({model.context_window} tokens)")
    if max_num_seqs is not None and max_num_seqs < 1:
        raise UserError("--max-num-seqs must be at least 1")
    per_token = BatchEngine.kv_bytes_per_token(model)
    budget = _available_bytes(model.device) if budget is None else budget
    free = f"about {budget / 2**30:.1f} GiB is free for the KV cache"
    int8 = "" if model.kv_int8 else " --kv-cache int8 holds nearly twice the tokens in the same memory."
    fit = budget // (per_token * length)
    if max_num_seqs is not None:
        if max_num_seqs <= fit:
            return max_num_seqs, length, None
        room = budget // (per_token * max_num_seqs)
        if max_model_len is None and room >= MIN_SHRUNK_LEN:
            shrunk = room // 256 * 256
            return max_num_seqs, shrunk, (f"each sequence has {shrunk} tokens of context instead of {full}: "
                                          f"{free}. Fewer --max-num-seqs give each more.{int8}")
        raise UserError(f"{max_num_seqs} sequences of {length} tokens need "
                        f"{max_num_seqs * per_token * length / 2**30:.1f} GiB of KV cache; {free}. Lower "
                        f"--max-num-seqs or --max-model-len.{int8}")
    if fit < 1:
        raise UserError(f"one sequence of {length} tokens needs {per_token * length / 2**30:.1f} GiB of KV cache; "
                        f"{free}. Lower --max-model-len.{int8}")
    cap = 8 if cpu else 64
    if fit >= cap:
        return cap, length, None
    more = min(cap, budget // (per_token * 2048)) if length > 2048 else 0
    hint = f" --max-model-len 2048 gives {more}." if more > fit else ""
    return fit, length, f"{fit} sequences at a time, not {cap}: {free}.{hint}{int8}"


def _print_status_lines() -> None:
    """The server's status lines (serve/status.py) go to stdout, with the time, whatever -v says."""
    import logging
    import sys

    log = logging.getLogger("qwenlm.serve.status")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def run(args) -> int:
    import uvicorn

    from ..errors import UserError
    from ..serve import ServerOptions, create_app, hermes

    sock = bind_listener(args.host, args.port)
    port = sock.getsockname()[1]
    model, tokenizer = load_from_args(args)
    seqs, length, note = plan_memory(model, args.max_num_seqs, args.max_model_len)
    name = args.served_model_name or os.path.basename(os.path.normpath(getattr(model, "name_or_path", "qwen")))
    opts = ServerOptions(served_model_name=name, api_key=args.api_key, max_model_len=length, max_num_seqs=seqs,
                         max_queue=args.max_queue, cors_origins=args.allowed_origins or [],
                         prefill_chunk=args.prefill_chunk, prefix_cache=args.prefix_cache,
                         status_every=args.status_every, warm_up=args.warm_up, tool_format=args.tool_format)
    if args.tool_format == "hermes" and not hermes.has_tags(tokenizer):
        raise UserError("--tool-format hermes needs a tokenizer with <tool_call> and </tool_call> tokens "
                        "(Qwen2/2.5); this one has none: use --tool-format react")
    _print_status_lines()
    app = create_app(model, tokenizer, opts)
    warmed = app.state.server.warm_up_seconds
    if warmed is not None:
        print(f"qwen serve: warmed up in {warmed:.1f} s (each batch size up to {seqs} once)", flush=True)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"qwen serve: model {name!r} ({describe(model)}), {seqs} slots x {length} tokens, "
          f"tools in the {app.state.server.tool_format} format\n"
          f"  chat page:  http://{host}:{port}/\n"
          f"  OpenAI API: http://{host}:{port}/v1  (key: {'required' if args.api_key else 'none'})"
          + (f"\n  note: {note}" if note else ""), flush=True)
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=port, log_level="warning")).run(sockets=[sock])
    return 0
