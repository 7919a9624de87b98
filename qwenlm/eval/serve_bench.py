"""Serving benchmark: N concurrent streaming clients against `qwen serve` on loopback, each asking
for the same number of tokens (`ignore_eos`), compared with the same requests served one at a
time (the first 8 of them: one stream's rate needs no more, and at 64 streams on a GPU the 64 one
after the other took most of a run). Reports output tokens/s, time to first token and latency
percentiles.

The clients run in a process of their own and read the event streams with a few lines of plain
asyncio (no HTTP client library, no JSON but the last event's usage): in the server's process, or
with a heavier client, they would take the CPU time and the interpreter lock that the server is being
measured on, and at thousands of tokens per second they would be what is measured."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import statistics
import time
from urllib.parse import urlsplit

import torch


def prompts_for(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n distinct token-id prompts of `length` ordinary tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 151643), (n, length), generator=g).tolist()


async def _read_head(reader) -> tuple[int, dict[str, str]]:
    status = int((await reader.readline()).split()[1])
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return status, headers
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()


async def _read_body(reader, headers: dict[str, str], on_data=None) -> bytes:
    """The whole body, de-chunked; `on_data()` is called when each piece arrives."""
    if headers.get("transfer-encoding", "").lower() != "chunked":
        n = int(headers.get("content-length", "0"))
        return await reader.readexactly(n) if n else await reader.read()
    parts = []
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            await reader.readline()
            return b"".join(parts)
        parts.append((await reader.readexactly(size + 2))[:-2])
        if on_data is not None:
            on_data(parts[-1])


async def _one(url: str, prompt: list[int], max_tokens: int) -> dict:
    """One streaming /v1/completions request: time to the first token, latency, tokens (usage)."""
    u = urlsplit(url)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True, "stream_options": {"include_usage": True}}).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (u.netloc.encode(), len(body)) + body)
        status, headers = await _read_head(reader)
        first = None

        def seen(piece: bytes):
            nonlocal first
            if first is None and b'"index"' in piece:  # a choice (the usage event's list is empty)
                first = time.perf_counter()
        data = await _read_body(reader, headers, seen)
    finally:
        writer.close()
    end = time.perf_counter()
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {data[:300]!r}")
    tokens = 0
    for event in reversed(data.split(b"\n\n")):
        if event.startswith(b"data: {"):
            obj = json.loads(event[6:])
            if "error" in obj:
                raise RuntimeError(obj["error"]["message"])
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
                break
    return {"ttft": (first or end) - t0, "latency": end - t0, "tokens": tokens}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


SOLO_REQUESTS = 8  # one-at-a-time requests per level: the rate of one stream needs no more


async def _level(url: str, prompts: list[list[int]], max_tokens: int, mark=lambda: None) -> dict:
    """One level: a warm-up request, the first SOLO_REQUESTS one at a time, then all of them at once
    (`mark()` is called just before and just after these)."""
    await _one(url, prompts[0], 2)  # warm-up
    t0 = time.perf_counter()
    solo = [await _one(url, p, max_tokens) for p in prompts[:SOLO_REQUESTS]]
    t_solo = time.perf_counter() - t0
    mark()
    t0 = time.perf_counter()
    crowd = await asyncio.gather(*(_one(url, p, max_tokens) for p in prompts))
    t_crowd = time.perf_counter() - t0
    mark()
    tok_solo, tok_crowd = sum(r["tokens"] for r in solo), sum(r["tokens"] for r in crowd)
    return {"concurrency": len(prompts), "max_tokens": max_tokens, "tokens": tok_crowd, "solo_tokens": tok_solo,
            "tokens_per_s": tok_crowd / t_crowd, "one_at_a_time_tokens_per_s": tok_solo / t_solo,
            "speedup": (tok_crowd / t_crowd) / (tok_solo / t_solo),
            "ttft_p50_s": _pct([r["ttft"] for r in crowd], 0.5), "ttft_p90_s": _pct([r["ttft"] for r in crowd], 0.9),
            "ttft_p99_s": _pct([r["ttft"] for r in crowd], 0.99),
            "latency_p50_s": _pct([r["latency"] for r in crowd], 0.5),
            "latency_p99_s": _pct([r["latency"] for r in crowd], 0.99),
            "solo_latency_mean_s": statistics.mean(r["latency"] for r in solo), "solo_requests": len(solo)}


async def _conversations(url: str, firsts: list[list[int]], max_tokens: int, turns: int, vocab: int,
                         mark=lambda: None) -> dict:
    """`len(firsts)` conversations at once, each `turns` requests one after the other: the next turn's
    prompt is the last one, then `max_tokens` tokens in place of the reply and as many new tokens as
    the first prompt had (random ids: what a parked row holds in common with it is the last prompt)."""
    import random

    async def talk(first: list[int], seed: int) -> list[dict]:
        rng, prompt, out = random.Random(seed), list(first), []
        for _ in range(turns):
            r = await _one(url, prompt, max_tokens)
            out.append({"prompt_tokens": len(prompt), **r})
            prompt = prompt + [rng.randrange(vocab) for _ in range(max_tokens + len(first))]
        return out

    await _one(url, firsts[0][::-1], 2)  # warm-up (a prompt no conversation starts with)
    mark()
    t0 = time.perf_counter()
    talks = await asyncio.gather(*(talk(f, i) for i, f in enumerate(firsts)))
    took = time.perf_counter() - t0
    mark()
    tokens = sum(r["tokens"] for t in talks for r in t)
    return {"conversations": len(firsts), "turns": turns, "max_tokens": max_tokens, "tokens": tokens,
            "tokens_per_s": tokens / took, "seconds": took,
            "by_turn": [{"turn": k + 1, "prompt_tokens": talks[0][k]["prompt_tokens"],
                         "ttft_p50_s": _pct([t[k]["ttft"] for t in talks], 0.5),
                         "ttft_p90_s": _pct([t[k]["ttft"] for t in talks], 0.9),
                         "latency_p50_s": _pct([t[k]["latency"] for t in talks], 0.5)} for k in range(turns)]}


def _client(url: str, prompts: list[list[int]], max_tokens: int, conn, turns: int = 0, vocab: int = 0) -> None:
    """The client process: one level (`turns`: of conversations); MARK when the concurrent requests
    start and end, then the level's result (or its error), on `conn`."""
    try:
        mark = lambda: conn.send(MARK)  # noqa: E731
        run = _conversations(url, prompts, max_tokens, turns, vocab, mark) if turns else \
            _level(url, prompts, max_tokens, mark)
        conn.send(asyncio.run(run))
    except Exception as e:
        conn.send(RuntimeError(f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


MARK = "mark"


def run_level(url: str, prompts: list[list[int]], max_tokens: int, timeout: float = 3600, on_mark=None,
              turns: int = 0, vocab: int = 0) -> dict:
    """Measure one concurrency level from a separate client process (`turns`: conversations of that
    many turns, new ids below `vocab`); `on_mark()` is called when its concurrent requests start and
    when they end."""
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_client, args=(url, prompts, max_tokens, theirs, turns, vocab), daemon=True)
    proc.start()
    theirs.close()
    deadline = time.monotonic() + timeout
    try:
        while True:
            if not mine.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"the benchmark clients did not finish within {timeout:.0f} s")
            out = mine.recv()
            if out != MARK:
                break
            if on_mark is not None:
                on_mark()
    except EOFError:
        raise RuntimeError(f"the benchmark client process died (exit code {proc.exitcode})") from None
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    if isinstance(out, Exception):
        raise out
    return out


class ThreadClock:
    """CPU seconds used so far by one thread of this process (None where the platform cannot say)."""

    def __init__(self, thread):
        try:
            self.clock = time.pthread_getcpuclockid(thread.ident)
        except (AttributeError, OSError, TypeError):
            self.clock = None

    def seconds(self) -> float | None:
        try:
            return None if self.clock is None else time.clock_gettime(self.clock)
        except OSError:  # the thread has ended
            return None


def bench_serve(model, tokenizer, levels: list[int], max_tokens: int, prompt_len: int, progress=print) -> list[dict]:
    """Start a server in this process and measure each concurrency level. Each row also gives the CPU
    time that the HTTP server's thread and the engine's thread spent per output token while the
    concurrent requests ran: the interpreter time that serving needs besides the model, whose sum
    bounds the tokens/s that one process can stream."""
    import threading

    from ..serve import ServerOptions, create_app, serve_in_thread
    from ..serve.app import HTTP_THREAD

    top = max(levels)
    opts = ServerOptions(served_model_name="bench", max_model_len=prompt_len + max_tokens + 8, max_num_seqs=top,
                         max_queue=4 * top)
    rows = []
    app = create_app(model, tokenizer, opts)
    with serve_in_thread(app) as url:
        http = next(t for t in threading.enumerate() if t.name == HTTP_THREAD)
        clocks = {"http_server": ThreadClock(http), "engine": ThreadClock(app.state.server.engine.thread)}
        for c in levels:
            progress(f"{c} concurrent stream(s) of {max_tokens} tokens, then {min(c, SOLO_REQUESTS)} of them one "
                     "at a time...")
            marks, stats = [], app.state.server.engine.stats
            before = (stats["steps"], stats["steps_ahead"])
            row = run_level(url, prompts_for(c, prompt_len, model.config.vocab_size, seed=c), max_tokens,
                            on_mark=lambda: marks.append({k: v.seconds() for k, v in clocks.items()}))
            # decode steps of the level (the one-at-a-time requests' too), and how many ran one ahead
            row["engine_steps"], row["engine_steps_ahead"] = stats["steps"] - before[0], stats["steps_ahead"] - before[1]
            for k in clocks:
                a, b = (m[k] for m in marks)
                row[f"{k}_cpu_us_per_token"] = None if a is None or b is None else (b - a) / row["tokens"] * 1e6
            rows.append(row)
            progress(f"  -> {row['tokens_per_s']:.1f} tok/s ({row['one_at_a_time_tokens_per_s']:.1f} one at a time), "
                     f"time to first token p50 {row['ttft_p50_s']:.3f} s")
    return rows


def bench_serve_turns(model, tokenizer, levels: list[int], max_tokens: int, prompt_len: int, turns: int,
                      progress=print) -> list[dict]:
    """Multi-turn conversations (see `_conversations`) at each concurrency level, served with the
    prefix cache and without it, one server after the other: the wait for each turn's first token
    as the conversations grow. Each row also gives the prompt tokens the engine took from parked rows."""
    from ..serve import ServerOptions, create_app, serve_in_thread

    top = max(levels)
    vocab = min(model.config.vocab_size, 151643)
    rows = []
    for c in levels:
        for cached in (True, False):
            progress(f"{c} conversation(s) of {turns} turns, {max_tokens} tokens a reply, prefix cache "
                     f"{'on' if cached else 'off'}...")
            opts = ServerOptions(served_model_name="bench", max_num_seqs=top, max_queue=4 * top, status_every=0,
                                 max_model_len=turns * (prompt_len + max_tokens) + 8, prefix_cache=cached)
            app = create_app(model, tokenizer, opts)
            with serve_in_thread(app) as url:
                row = run_level(url, prompts_for(c, prompt_len, vocab, seed=c), max_tokens, turns=turns, vocab=vocab)
            row["prefix_cache"] = cached
            row["prompt_tokens_reused"] = app.state.server.engine.stats["prompt_tokens_reused"]
            rows.append(row)
            progress("  -> time to first token p50 by turn: "
                     + ", ".join(f"{t['ttft_p50_s']:.3f} s" for t in row["by_turn"])
                     + f"; {row['prompt_tokens_reused']} prompt tokens reused")
            del app
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
    return rows
