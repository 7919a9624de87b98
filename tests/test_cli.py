"""`qwen` commands: info, generate, chat (the cli_demo commands, :conf taking effect, Ctrl-C),
and clear one-line errors instead of tracebacks."""

import io
import json
import os
import re
import subprocess
import sys

import pytest
from safetensors import safe_open

from qwenlm.cli import main
from qwenlm.commands.chat import ChatSession


def _run(*args, stdin=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "qwenlm", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


def test_info_json(v1_chat_dir, capsys):
    assert main(["info", "--model", v1_chat_dir, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    with safe_open(os.path.join(v1_chat_dir, "model.safetensors"), "pt") as f:
        n = sum(f.get_tensor(k).numel() for k in f.keys())
    assert info["architecture"] == "QWenLMHeadModel" and info["parameters"] == n
    assert info["context_length"] == 32768 and info["path"] == os.path.abspath(v1_chat_dir)
    assert info["dynamic_ntk"] and info["chat_format"] == "chatml"
    # an MLP 48 wide does not fit the CPU kernel's 32-wide blocks: loaded as stored; not from a GGUF
    assert info["cpu_weights"].startswith("as stored") and info["gguf_source"] is None


def test_generate_matches_chat(v1_chat_dir):
    from qwenlm import load

    model, tok = load(v1_chat_dir)
    want, _ = model.chat(tok, "Hi there", do_sample=False, max_new_tokens=6)
    r = _run("generate", "--model", v1_chat_dir, "--greedy", "--max-new-tokens", "6", "Hi there")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == want
    r2 = _run("generate", "--model", v1_chat_dir, "--greedy", "--max-new-tokens", "6", stdin="Hi there")
    assert r2.stdout == r.stdout


@pytest.mark.parametrize("args,message", [
    (["info", "--model", "/no/such/dir"], "no model at"),
    (["generate", "--model", "/no/such/dir", "hi"], "no model at"),
    (["convert", "/no/such.gguf", "/tmp/out-x"], "not found"),
    (["chat", "--model", "Qwen/Definitely-Not-Here"], "Hugging Face Hub"),
])
def test_user_errors_are_one_line(args, message):
    r = _run(*args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_empty_prompt(v1_chat_dir):
    r = _run("generate", "--model", v1_chat_dir, stdin="  \n")
    assert r.returncode == 2 and "prompt is empty" in r.stderr


@pytest.fixture(scope="module")
def session_factory(v1_chat_dir):
    from qwenlm import load

    model, tok = load(v1_chat_dir)

    def make(**overrides):
        out = io.StringIO()
        return ChatSession(model, tok, "You are a helpful assistant.", overrides, out=out), out
    return make


def test_chat_commands(session_factory):
    s, out = session_factory(do_sample=False)
    assert s.handle(":help") and "clear-history" in out.getvalue()
    s.handle("")
    assert "[ERROR] Query is empty" in out.getvalue()
    s.handle("hello")
    assert len(s.history) == 1 and s.history[0][0] == "hello"
    s.handle(":his")
    assert "[1] User: hello" in out.getvalue()
    s.handle(":seed 42")
    assert s.seed == 42
    s.handle(":seed nope")
    assert s.seed == 42 and "[ERROR] seed must be an integer" in out.getvalue()
    s.handle(":clear-history")
    assert s.history == []
    s.handle(":unknown-command")  # like the original: an unknown ':' command is a query
    assert s.history[0][0] == ":unknown-command"
    assert s.handle(":exit") is False and s.handle(":q") is False


def test_chat_commands_also_take_a_slash(session_factory):
    """llama.cpp's and ollama's users type /exit or /bye: a known command name works after '/', and
    anything else that starts with '/' (a path) is a message."""
    s, out = session_factory(do_sample=False)
    s.handle("hello")
    s.handle("/clear-history")
    assert s.history == []
    s.handle("/usr/lib/python3 is missing")
    assert s.history[0][0] == "/usr/lib/python3 is missing"
    assert s.handle("/exit") is False and s.handle("/bye") is False and s.handle(":bye") is False


def test_message_longer_than_the_context_keeps_the_chat(session_factory, monkeypatch):
    s, out = session_factory(do_sample=False)
    s.handle("hello")
    monkeypatch.setattr(s.model, "use_dynamic_ntk", False)  # the window becomes seq_length
    window = s.model.context_window
    s.handle("word " * window)
    assert "[ERROR] the prompt is" in out.getvalue() and f"at most {window:,}" in out.getvalue()
    assert [q for q, _ in s.history] == ["hello"]  # the long message is not kept, the chat goes on
    s.handle("again")
    assert len(s.history) == 2


def test_long_prompt_progress_on_a_terminal(session_factory, monkeypatch):
    """On a terminal a long prompt shows how much of it is read, then the line is given back to the
    reply; anywhere else (a pipe, a file) nothing is added."""
    from qwenlm.engine import get_engine

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    s, _ = session_factory(do_sample=False, max_new_tokens=4)
    monkeypatch.setattr(get_engine(s.model), "prefill_chunk", 8)
    get_engine(s.model).release()  # (nothing kept from earlier tests: the whole prompt is read)
    s.out = Terminal()
    s.handle("please read this message, which is long enough for several chunks of eight tokens")
    text = s.out.getvalue()
    total = int(text.split("[reading the prompt: 8/")[1].split(" ")[0])
    assert total > 24 and f"[reading the prompt: 16/{total} tokens]" in text
    assert "\r\x1b[KQwen: " + s.history[-1][1] in text  # the note is erased before the reply
    assert get_engine(s.model).on_prefill is None  # not left behind
    s.out = io.StringIO()
    s.handle("please read this message, which is long enough for several chunks of eight tokens")
    assert "reading the prompt" not in s.out.getvalue()


def test_multiline_messages_between_triple_quotes():
    from qwenlm.commands.chat import read_message

    def reader(*lines):
        shown, it = [], iter(lines)

        def read(prompt):
            shown.append(prompt)
            return next(it)
        return read, shown

    read, shown = reader("just one line")
    assert read_message(read) == "just one line" and shown == ["\nUser> "]
    q = '"' * 3
    read, shown = reader(q, "def f(x):", "    return x", "", f"What does f do?{q}")
    assert read_message(read) == "def f(x):\n    return x\n\nWhat does f do?"
    assert shown == ["\nUser> "] + ["... "] * 4
    read, _ = reader(f"  {q}inline{q}  ")
    assert read_message(read) == "inline"
    read, _ = reader(f"{q}first", f"second{q}")
    assert read_message(read) == "first\nsecond"


def test_conf_takes_effect(session_factory):
    s, out = session_factory(do_sample=False)
    s.handle(":conf max_new_tokens=1")
    s.handle("tell me a long story")
    assert len(s.tokenizer.encode(s.history[-1][1])) <= 1
    s.handle(":conf top_p=7")
    assert "[ERROR] top_p must be in (0, 1]" in out.getvalue()
    s.handle(":reset-conf")
    s.handle("tell me a long story")
    assert len(s.tokenizer.encode(s.history[-1][1])) > 1


def test_ctrl_c_stops_the_reply_not_the_chat(session_factory, monkeypatch):
    import qwenlm.generation.api as api

    def interrupted(*a, **k):
        yield "partial"
        yield "partial reply"
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "chat_stream", interrupted)
    s, out = session_factory()
    s.handle("go")
    assert "[WARNING] Generation interrupted" in out.getvalue()
    assert s.history == [("go", "partial reply")]
    assert s.handle(":his")  # still chatting


def test_chat_through_a_pipe(v1_chat_dir):
    r = _run("chat", "--model", v1_chat_dir, "--greedy", "--max-new-tokens", "4",
             stdin="你好\n:conf max_new_tokens=2\n:his\n:exit\n")
    assert r.returncode == 0, r.stderr
    assert "[1] User: 你好" in r.stdout and "[INFO] max_new_tokens = 2" in r.stdout
    assert "(cpu, float32)" in r.stdout  # the banner says how it runs (48-wide layers: not 8-bit)


def test_chat_stats_report_what_the_turn_read_and_wrote(session_factory):
    """`--stats` / `:stats`: each reply's token count (the reference loop's, end token included), its
    prompt's length, and on the next turn how many prompt tokens came from the kept cache."""
    from qwenlm.generation import StopChecker, generate
    from qwenlm.tokenizer.chatml import make_context

    s, out = session_factory(do_sample=False, max_new_tokens=8)
    model, tok = s.model, s.tokenizer
    control = [tok.im_end_id, tok.im_start_id, tok.eod_id]

    def expected(query, history):
        _, ids = make_context(tok, query, history=history, system=s.system, max_window_size=s.config.max_window_size)
        new = generate(model, [ids], s.config, StopChecker(s.config, control, tok), vocab_limit=tok.id_limit)[0]
        return ids, new

    def stats_line():
        lines = [x for x in out.getvalue().splitlines() if x.startswith("[") and "tokens" in x]
        return lines[-1] if lines else None

    s.handle("Hi")
    assert stats_line() is None  # off by default
    s.handle(":stats")
    ids1, new1 = expected("Hello there", s.history)
    s.handle("Hello there")
    m = re.fullmatch(r"\[(\d+) tokens?(, [\d.]+ tokens/s)?; prompt (\d+) tokens( \((\d+) reused\))? in [\d.]+ s\]",
                     stats_line())
    assert m, stats_line()
    assert int(m[1]) == len(new1) and int(m[3]) == len(ids1)
    # the next turn's prompt starts with this one and its reply (but the reply's last token, never fed back)
    ids2, new2 = expected("And then?", s.history)
    s.handle("And then?")
    m = re.fullmatch(r"\[(\d+) tokens?(, [\d.]+ tokens/s)?; prompt (\d+) tokens \((\d+) reused\) in [\d.]+ s\]",
                     stats_line())
    assert m, stats_line()
    kept = ids1 + new1[:-1]
    shared = next((i for i, (a, b) in enumerate(zip(ids2, kept)) if a != b), min(len(ids2), len(kept)))
    assert int(m[1]) == len(new2) and int(m[3]) == len(ids2) and int(m[4]) == min(shared, len(ids2) - 1) > 0
    s.handle(":stats")
    n = len(out.getvalue())
    s.handle("Bye")
    assert "tokens/s" not in out.getvalue()[n:] and "reused)" not in out.getvalue()[n:]


def test_generate_stats_go_to_stderr(v1_chat_dir):
    r = _run("generate", "--model", v1_chat_dir, "--greedy", "--max-new-tokens", "5", "--stats", "Hi there")
    assert r.returncode == 0, r.stderr
    assert "tokens" not in r.stdout
    assert re.search(r"^\[\d+ tokens?(, [\d.]+ tokens/s)?; prompt \d+ tokens in [\d.]+ s\]$", r.stderr, re.M), r.stderr
