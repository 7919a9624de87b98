"""`qwen <command>`: a dispatcher. Each command lives in `qwenlm/commands/<name>.py` with
`add_parser(subparsers)` and `run(args)`.

Mistakes a user can fix (bad path, bad option, damaged file) print one `error:` line and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = ("chat", "generate", "serve", "convert", "quantize", "info", "bench")


def _user_errors() -> tuple[type[BaseException], ...]:
    from .errors import UserError
    from .weights.gguf import GGUFError
    from .weights.loader import CheckpointError

    return (UserError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            PermissionError, CheckpointError, GGUFError)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="qwen", description="Run, chat with and convert Qwen models.")
    parser.add_argument("--version", action="version", version=f"qwenlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and how")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".commands.{name}", __package__).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.command:
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
