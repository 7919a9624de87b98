"""`qwen chat`: an interactive terminal chat, with the original cli_demo's commands.

Replies stream as they are generated; Ctrl-C stops a reply and keeps the chat (and the partial
reply in the history); Ctrl-D or :exit leaves. `:conf key=value` really changes the settings
used by the next reply (in the original it had no effect).
"""

from __future__ import annotations

import ast
import os
import sys

from .common import (add_model_options, add_sampling_options, describe, load_from_args, prompt_progress,
                     sampling_overrides)

HELP = """Commands:
  :help / :h                 show this help
  :exit / :quit / :q         leave the chat (also /exit, /quit, /bye: any command works with /)
  :clear / :cl               clear the screen
  :clear-history / :clh      forget the conversation
  :history / :his            show the conversation
  :seed                      show the random seed
  :seed N                    set the random seed
  :conf                      show the generation settings
  :conf key=value            change a generation setting (e.g. :conf temperature=0.5)
  :reset-conf                restore the model's generation settings
  :stats                     show (or stop showing) each reply's tokens, tokens/s and prompt wait
Anything else is sent to the model. For several lines (pasted code), begin and end with QQQ:
  QQQ
  def f(x):
      return x
  What does f do?QQQ
Ctrl-C stops a reply; Ctrl-D leaves.""".replace("QQQ", '"' * 3)

QUOTE = '"' * 3


def read_message(read) -> str:
    """One message from `read(prompt)` (input): a line, or the lines between an opening and a
    closing triple quote (the quotes removed; the text inside kept as typed)."""
    line = read("\nUser> ")
    if not line.lstrip().startswith(QUOTE):
        return line
    text = line.lstrip()[len(QUOTE):]
    lines = []
    while True:
        if text.rstrip().endswith(QUOTE):
            lines.append(text.rstrip()[:-len(QUOTE)])
            return "\n".join(lines).strip("\n")
        lines.append(text)
        text = read("... ")


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal")
    p.add_argument("--system", default="You are a helpful assistant.", help="system prompt")
    add_model_options(p)
    add_sampling_options(p)
    p.set_defaults(func=run)


class ChatSession:
    """State of one terminal chat; `handle(line)` does one command or one turn."""

    def __init__(self, model, tokenizer, system: str, overrides: dict, out=sys.stdout, stats: bool = False):
        self.model, self.tokenizer, self.system, self.out = model, tokenizer, system, out
        self.stats = stats
        self.base = model.generation_config.update(**{k: v for k, v in overrides.items() if k != "seed"})
        self.config = self.base
        self.seed = overrides.get("seed", 1234)
        self.history: list[tuple[str, str]] = []

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def handle(self, line: str) -> bool:
        """Return False when the chat should end."""
        query = line.strip()
        if not query:
            self.say("[ERROR] Query is empty")
            return True
        if query[0] in ":/":  # ':' as in the original cli_demo; '/' as in llama.cpp and ollama
            name, _, arg = query[1:].partition(" ")
            handler = _COMMANDS.get(name)
            if handler is not None:
                return handler(self, arg.strip()) is not False
        self.turn(query)
        return True

    def turn(self, query: str) -> None:
        from ..errors import UserError
        from ..generation.api import chat_stream

        response = ""
        self.out.write("\nQwen: ")
        try:
            with prompt_progress(self.model, self.out, "Qwen: "):
                for text in chat_stream(self.model, self.tokenizer, query, self.history, self.system,
                                        generation_config=self.config, seed=self.seed):
                    self.out.write(text[len(response):])
                    self.out.flush()
                    response = text
        except KeyboardInterrupt:
            self.say("\n[WARNING] Generation interrupted")
        except UserError as e:  # e.g. a message longer than the context: say so, keep the chat
            self.say(f"\n[ERROR] {e}\n")
            return
        self.say("\n")
        if self.stats:
            from ..engine import get_engine

            self.say(f"[{get_engine(self.model).last_stats.summary()}]")
        self.history.append((query, response))

    # ---- commands -------------------------------------------------------------------------
    def cmd_help(self, arg):
        self.say(HELP)

    def cmd_exit(self, arg):
        return False

    def cmd_clear(self, arg):
        self.out.write("\033[H\033[2J" if self.out.isatty() else "")
        self.out.flush()

    def cmd_clear_history(self, arg):
        self.history = []
        self.say("[INFO] History cleared")

    def cmd_history(self, arg):
        if not self.history:
            self.say("[INFO] No history yet")
        for i, (q, r) in enumerate(self.history, 1):
            self.say(f"[{i}] User: {q}\n[{i}] Qwen: {r}")

    def cmd_seed(self, arg):
        if arg:
            try:
                self.seed = int(arg)
            except ValueError:
                self.say(f"[ERROR] seed must be an integer, not {arg!r}")
                return
        self.say(f"[INFO] Current random seed: {self.seed}")

    def cmd_conf(self, arg):
        if not arg:
            for k, v in self.config.to_dict().items():
                self.say(f"  {k} = {v!r}")
            return
        key, sep, raw = arg.partition("=")
        if not sep:
            self.say("[ERROR] use :conf key=value, e.g. :conf temperature=0.5")
            return
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        try:
            self.config = self.config.update(**{key.strip(): value})
        except (ValueError, TypeError) as e:
            self.say(f"[ERROR] {e}")
            return
        self.say(f"[INFO] {key.strip()} = {value!r}")

    def cmd_reset_conf(self, arg):
        self.config = self.base
        self.say("[INFO] Generation settings reset")

    def cmd_stats(self, arg):
        self.stats = not self.stats
        self.say(f"[INFO] Reply statistics {'on' if self.stats else 'off'}")


_COMMANDS = {}
for _names, _fn in (
    (("help", "h"), ChatSession.cmd_help), (("exit", "quit", "q", "bye"), ChatSession.cmd_exit),
    (("clear", "cl"), ChatSession.cmd_clear),
    (("clear-history", "clear-his", "clh"), ChatSession.cmd_clear_history),
    (("history", "his"), ChatSession.cmd_history), (("seed",), ChatSession.cmd_seed),
    (("conf",), ChatSession.cmd_conf), (("reset-conf",), ChatSession.cmd_reset_conf),
    (("stats",), ChatSession.cmd_stats),
):
    for _n in _names:
        _COMMANDS[_n] = _fn


def run(args) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    model, tokenizer = load_from_args(args)
    session = ChatSession(model, tokenizer, args.system, sampling_overrides(args), stats=args.stats)
    name = os.path.basename(os.path.normpath(getattr(model, "name_or_path", "model")))
    session.say(f"Chatting with {name} ({describe(model)}). Type :help for commands, :exit or Ctrl-D to leave.")
    while True:
        try:
            line = read_message(input)
        except EOFError:
            session.say()
            return 0
        except KeyboardInterrupt:
            session.say()
            continue
        if not session.handle(line):
            return 0
