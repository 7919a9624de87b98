"""`qwen serve` as a command: starts, answers the official client, stops; bad options are one
`error:` line; and the real default model answers a question through it."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from qwenlm.commands.serve import plan_memory


def _serve(*args):
    """Start `qwen serve --port 0` and read the port it chose from its banner."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "qwenlm", "serve", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:  # ends when the process does
        lines.append(line)
        if "OpenAI API: http://127.0.0.1:" in line:
            break
    else:
        proc.wait(30)
        raise AssertionError(f"qwen serve exited: {''.join(lines)}")
    url = re.search(r"http://127\.0\.0\.1:(\d+)", lines[-1]).group(0)
    assert not url.endswith(":0")
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"qwen serve exited: {''.join(lines)}{proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                proc.banner = "".join(lines)
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("qwen serve did not come up")


def test_serve_command(v1_chat_dir):
    proc, url = _serve("-m", v1_chat_dir, "--served-model-name", "tiny-v1", "--max-model-len", "128",
                       "--max-num-seqs", "2", "--api-key", "k")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny-v1"]
        r = client.chat.completions.create(model="tiny-v1", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4)
        assert r.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        out = proc.banner + proc.communicate(timeout=30)[0]
    assert "chat page:  http://127.0.0.1:" in out and "key: required" in out
    assert "'tiny-v1' (cpu, float32)" in out and "tools in the react format" in out  # (a Qwen v1 tokenizer)


@pytest.mark.parametrize("args,message", [
    (["--max-num-seqs", "0"], "--max-num-seqs must be at least 1"),
    (["--max-num-seqs", "100000", "--max-model-len", "32768"], "of KV cache"),
    (["--max-model-len", "40000"], "--max-model-len 40000 is more than the model's context window (32768 tokens)"),
    (["--max-model-len", "8"], "--max-model-len must be at least 16"),
    (["--tool-format", "hermes"], "--tool-format hermes needs a tokenizer with <tool_call> and </tool_call> tokens"),
])
def test_bad_options_are_one_line(v1_chat_dir, args, message):
    r = subprocess.run([sys.executable, "-m", "qwenlm", "serve", "-m", v1_chat_dir, *args], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and message in r.stderr
    assert "Traceback" not in r.stderr


def test_listen_errors_come_before_the_model_loads(tmp_path):
    """A busy port or a wrong address is one line at once: the socket is bound before the model is
    looked for (the model path here does not exist, and its error must not be the one shown)."""
    missing = str(tmp_path / "no-model")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = [(["--port", str(port)], f"127.0.0.1:{port} is already in use"),
                 (["--host", "no-such-host.invalid"], "cannot listen on --host 'no-such-host.invalid'"),
                 (["--host", "192.0.2.7"], "'192.0.2.7' is not an address of this machine")]
        for args, message in cases:
            r = subprocess.run([sys.executable, "-m", "qwenlm", "serve", "-m", missing, *args],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 2 and r.stderr.strip().startswith("error:") and message in r.stderr, r.stderr
            assert "Traceback" not in r.stderr and "no model at" not in r.stderr
    for args, message in ((["--port", "70000"], "'70000' is not a port number (0-65535)"),
                          (["--prefill-chunk", "-5"], "'-5' is not a whole number >= 0"),
                          (["--no-prefix-cache", "yes"], "unrecognized arguments: yes"),
                          (["--tool-format", "json"], "argument --tool-format: invalid choice: 'json'")):
        r = subprocess.run([sys.executable, "-m", "qwenlm", "serve", *args], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and message in r.stderr


def test_memory_plan_shrinks_defaults(v1_chat_dir):
    from qwenlm import load_model
    from qwenlm.errors import UserError

    model = load_model(v1_chat_dir, dtype="float32", device="cpu")
    seqs, length, note = plan_memory(model, None, None)
    assert 1 <= seqs <= 8 and length == min(model.config.seq_length, 4096)
    assert plan_memory(model, 3, 64) == (3, 64, None)
    # bytes per token: 2 layers x (keys + values) x 32 channels x 4 bytes (fp32), counted here by hand
    token = 2 * 2 * 32 * 4
    full = min(model.config.seq_length, 4096)
    assert full == 4096
    # memory for 5 sequences of the full context: 5 slots, and the start-up lines say why not 8
    seqs, length, note = plan_memory(model, None, None, budget=5 * full * token + token)
    assert (seqs, length) == (5, full) and "5 sequences at a time, not 8" in note
    assert "--max-model-len 2048 gives 8" in note  # 10 would fit at 2048; the cap is 8
    # room for 8: no note
    assert plan_memory(model, None, None, budget=8 * full * token) == (8, full, None)
    # the sequences asked for, the context left to the default: the context shrinks to a multiple of 256
    seqs, length, note = plan_memory(model, 6, None, budget=6 * 1000 * token)
    assert (seqs, length) == (6, 768) and "each sequence has 768 tokens of context instead of 4096" in note
    assert "--kv-cache int8" in note
    # ... but not below 256 tokens, and never when the context was asked for too
    for args, budget in (((6, None), 6 * 255 * token), ((6, 1024), 6 * 1000 * token)):
        with pytest.raises(UserError, match="Lower --max-num-seqs or --max-model-len."):
            plan_memory(model, *args, budget=budget)
    with pytest.raises(UserError, match="one sequence of 4096 tokens needs"):
        plan_memory(model, None, None, budget=4095 * token)


@pytest.mark.slow
def test_default_model_answers_through_the_server():
    # the fastest CPU setup: 4-bit weights, 8-bit KV cache
    proc, url = _serve("--quantize", "int4", "--kv-cache", "int8", "--max-model-len", "1024", "--max-num-seqs", "2")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        r = client.chat.completions.create(model="x", messages=[
            {"role": "user", "content": "What is the capital of France? Answer in one word."}],
            temperature=0, max_tokens=16)
        assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
        s = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "你好"}],
                                           temperature=0, max_tokens=32, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
        assert any("\u4e00" <= ch <= "\u9fff" for ch in text)  # a Chinese reply
        # a tool call, in the model's own <tool_call> format (through ReAct this model wrote the tool's
        # JSON schema as its arguments)
        tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
        r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "What's the weather in "
                                                                  "Paris?"}], tools=tools, temperature=0, max_tokens=64)
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Paris"
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop has no Windows build")
def test_uvicorn_takes_the_c_parser_and_the_libuv_loop():
    """httptools and uvloop are dependencies because uvicorn picks them up when they are installed
    (a quarter less server CPU per streamed token than h11 and asyncio's own loop): check it does."""
    import uvicorn

    cfg = uvicorn.Config(app=lambda scope, receive, send: None)
    cfg.load()
    assert cfg.http_protocol_class.__module__.endswith("httptools_impl")
    assert cfg.get_loop_factory().__module__.startswith("uvloop")
