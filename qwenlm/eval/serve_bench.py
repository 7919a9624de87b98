"""Serving benchmark: N concurrent streaming clients against `qwen serve` on loopback, each asking
for the same number of tokens (`ignore_eos`), compared with the same requests served one at a
time. Reports output tokens/s, time to first token and latency percentiles."""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx
import torch


def prompts_for(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n distinct token-id prompts of `length` ordinary tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 151643), (n, length), generator=g).tolist()


async def _one(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                raise RuntimeError(obj["error"]["message"])
            if obj.get("choices") and first is None:
                first = time.perf_counter()
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "latency": end - t0, "tokens": tokens}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def _level(url: str, prompts: list[list[int]], max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=len(prompts) + 4)) as client:
        await _one(client, url, prompts[0], 2)  # warm-up
        t0 = time.perf_counter()
        solo = [await _one(client, url, p, max_tokens) for p in prompts]
        t_solo = time.perf_counter() - t0
        t0 = time.perf_counter()
        crowd = await asyncio.gather(*(_one(client, url, p, max_tokens) for p in prompts))
        t_crowd = time.perf_counter() - t0
    tok_solo, tok_crowd = sum(r["tokens"] for r in solo), sum(r["tokens"] for r in crowd)
    return {"concurrency": len(prompts), "max_tokens": max_tokens, "tokens": tok_crowd,
            "tokens_per_s": tok_crowd / t_crowd, "one_at_a_time_tokens_per_s": tok_solo / t_solo,
            "speedup": (tok_crowd / t_crowd) / (tok_solo / t_solo),
            "ttft_p50_s": _pct([r["ttft"] for r in crowd], 0.5), "ttft_p90_s": _pct([r["ttft"] for r in crowd], 0.9),
            "ttft_p99_s": _pct([r["ttft"] for r in crowd], 0.99),
            "latency_p50_s": _pct([r["latency"] for r in crowd], 0.5),
            "latency_p99_s": _pct([r["latency"] for r in crowd], 0.99),
            "solo_latency_mean_s": statistics.mean(r["latency"] for r in solo)}


def bench_serve(model, tokenizer, levels: list[int], max_tokens: int, prompt_len: int, progress=print) -> list[dict]:
    """Start a server in this process and measure each concurrency level."""
    from ..serve import ServerOptions, create_app, serve_in_thread

    top = max(levels)
    opts = ServerOptions(served_model_name="bench", max_model_len=prompt_len + max_tokens + 8, max_num_seqs=top,
                         max_queue=4 * top)
    rows = []
    with serve_in_thread(create_app(model, tokenizer, opts)) as url:
        for c in levels:
            progress(f"{c} concurrent stream(s) of {max_tokens} tokens, then the same requests one at a time...")
            rows.append(asyncio.run(_level(url, prompts_for(c, prompt_len, model.config.vocab_size, seed=c),
                                           max_tokens)))
    return rows
