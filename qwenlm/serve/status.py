"""`qwen serve`'s status line: every few seconds while there is work, what the engine did since the
last line (as vLLM logs its throughput): requests running, waiting and finished, prompt tokens read
(and those taken from the prefix cache instead), tokens generated, each per second. Silent when idle."""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("qwenlm.serve.status")
_REASONS = ("stop", "length", "abort", "error")


def snapshot(engine) -> dict:
    """The engine's counters now (read from another thread: one dict lookup each)."""
    s = engine.stats
    return {"prompt": s.get("prompt_tokens", 0), "reused": s.get("prompt_tokens_reused", 0),
            "generated": s.get("generation_tokens", 0),
            "finished": sum(s.get("finished_" + r, 0) for r in _REASONS),
            "running": engine.running, "waiting": engine.queue_length}


def status_line(before: dict, after: dict, seconds: float) -> str:
    """`running 4 · waiting 2 · finished 3 · prompt tokens 312 (31.2/s; 120 more from the prefix cache) ·
    generated tokens 852 (85.2/s)`: counts since `before`, `seconds` ago."""
    d = {k: after[k] - before[k] for k in ("prompt", "reused", "generated", "finished")}
    read = d["prompt"] - d["reused"]
    cache = f"; {d['reused']} more from the prefix cache" if d["reused"] else ""
    return (f"running {after['running']} · waiting {after['waiting']} · finished {d['finished']} · "
            f"prompt tokens {read} ({read / seconds:.1f}/s{cache}) · "
            f"generated tokens {d['generated']} ({d['generated'] / seconds:.1f}/s)")


async def report(engine, every: float) -> None:
    """Log a status line every `every` seconds in which the engine had work (a task of the app)."""
    before, since = snapshot(engine), time.monotonic()
    while True:
        await asyncio.sleep(every)
        after, now = snapshot(engine), time.monotonic()
        if after != before or after["running"] or after["waiting"]:
            log.info(status_line(before, after, now - since))
        before, since = after, now
