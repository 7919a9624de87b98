"""A request's choices as engine sequences (`Job`: submitted together, their tokens arriving on one
queue, aborted when the client goes away), and the SSE text of a stream's chunks."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import Request

from ..engine.batch import BadToken, QueueFull, Sequence
from ..generation.generate import StopChecker, TextAssembler
from .http import APIError

log = logging.getLogger("qwenlm")


_GONE = "client gone"  # a queue item of Job: not a finish reason of the engine


class Job:
    """The choices of one request: one engine sequence each, tokens arriving on one queue."""

    def __init__(self, server, prompts: list[list[int]], cfgs, extra_stop_ids, request: Request,
                 logprobs: int | None = None, prompt_logprobs: int | None = None, constraints: list | None = None):
        loop = asyncio.get_running_loop()
        self.server, self.request = server, request
        self.queue: asyncio.Queue = asyncio.Queue()
        self.seqs: list[Sequence] = []
        self.prompt_tokens = len(prompts[0])  # n choices of one prompt count it once, as OpenAI does
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        for i, (p, cfg) in enumerate(zip(prompts, cfgs)):
            def emit(tok, reason, i=i):
                loop.call_soon_threadsafe(self.queue.put_nowait, (i, tok, reason))
            stop = StopChecker(cfg, extra_stop_ids, server.tokenizer)
            self.seqs.append(Sequence(prompt=p, cfg=cfg, stop=stop, emit=emit, logprobs=logprobs,
                                      prompt_logprobs=prompt_logprobs,
                                      constraint=constraints[i] if constraints else None))
        self.logprobs = logprobs is not None
        self._taken = [0] * len(self.seqs)  # each choice's tokens handed to `take_logprobs` so far
        self.hide_generated = False  # max_tokens 0: one token is generated and shown to nobody
        # each choice's text as it streams: stop tokens and stop strings cut it
        self.texts = [TextAssembler(server.tokenizer, s.stop.ids, s.cfg.stop or []) for s in self.seqs]

    def submit(self) -> None:
        try:
            for s in self.seqs:
                self.server.engine.submit(s)
        except QueueFull as e:
            self.abort()
            raise APIError(429, f"the server is busy ({e}); retry shortly", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except BadToken as e:
            self.abort()
            raise APIError(400, str(e), param="prompt") from None
        except ValueError as e:
            self.abort()
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None

    def abort(self) -> None:
        for s in self.seqs:
            if s.finish_reason is None:
                self.server.engine.abort(s)

    async def batches(self):
        """Lists of (choice index, token or None, finish reason or None), until every choice has
        finished: each list is all that had arrived when the previous one was handled, so a server
        that falls behind the engine writes several tokens of a stream at once. A client that goes
        away has its sequences aborted."""
        left = len(self.seqs)
        queue = self.queue
        watcher = asyncio.ensure_future(self._watch())
        try:
            while left:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                batch = []
                for i, tok, reason in items:
                    if reason == _GONE:
                        return
                    if tok is not None and self.first_token_at is None:
                        self.first_token_at = time.monotonic()
                        self.server.metrics.ttft.observe(self.first_token_at - self.started)
                    if reason is not None:
                        left -= 1
                        if reason == "error":
                            if batch:
                                yield batch
                            raise APIError(500, "the engine failed on this request (see the server log)",
                                           "server_error")
                    batch.append((i, tok, reason))
                yield batch
        finally:
            watcher.cancel()
            self.abort()
            self.server.metrics.latency.observe(time.monotonic() - self.started)

    async def _watch(self) -> None:
        """Every half second: has the client gone? Then end `events` (which aborts the sequences).
        A task of its own, so that waiting for a token is a plain queue read (a timeout on every read
        cost a task and a timer per token)."""
        while True:
            await asyncio.sleep(0.5)
            if await self.request.is_disconnected():
                break
        log.info("client went away: aborting its sequence(s)")
        self.queue.put_nowait((None, None, _GONE))

    async def collect(self) -> list[str | None]:
        """Run every choice to its end (non-streaming): fills `texts`, returns finish reasons."""
        texts = self.texts
        reasons: list[str | None] = [None] * len(self.seqs)
        async for batch in self.batches():
            for i, tok, reason in batch:
                if tok is not None:
                    texts[i].put(tok)
                if reason is not None:
                    texts[i].finish()
                    reasons[i] = reason
        return reasons

    def take_logprobs(self, i: int, tok: int) -> tuple | None:
        """The entry of choice i's next token `tok` (tokens arrive in order), None for a stop token
        (which is not part of the text, so not of the log-probabilities either)."""
        seq = self.seqs[i]
        entry = seq.token_logprobs[self._taken[i]]
        self._taken[i] += 1
        return None if tok in seq.stop.ids else entry

    def shown_logprobs(self, i: int) -> tuple[list[int], list]:
        """Choice i's generated tokens but stop tokens, and their entries (a finished choice)."""
        seq = self.seqs[i]
        pairs = [(t, e) for t, e in zip(seq.generated, seq.token_logprobs) if t not in seq.stop.ids]
        return [t for t, _ in pairs], [e for _, e in pairs]

    @property
    def completion_tokens(self) -> int:
        return 0 if self.hide_generated else sum(len(s.generated) for s in self.seqs)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens()}}

    def cached_tokens(self) -> int:
        """Prompt tokens read from the prefix cache, as OpenAI reports them: each prompt once (the
        choices of one prompt share it), as many as every one of its choices found there (the choices
        after the first copy its slots: what the request itself read is not cached)."""
        least: dict[int, int] = {}
        for s in self.seqs:
            least[id(s.prompt)] = min(least.get(id(s.prompt), s.reused), s.reused)
        return sum(least.values())


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# What json.dumps(ensure_ascii=False) writes for a str, without the encoder around it (C code).
json_str = json.encoder.encode_basestring
INDEX, TEXT, REASON = "\0index", "\0text", "\0reason"  # slots of a chunk format


def sse_format(obj) -> str:
    """The SSE event of `obj` as a str.format pattern whose fields are the slots found in it: {0} for
    INDEX (an int), {1} for TEXT (JSON), {2} for REASON (JSON). Streams fill one pattern per token
    instead of encoding the whole chunk again (which was the largest part of the server's work per
    token)."""
    s = sse(obj).replace("{", "{{").replace("}", "}}")
    for k, slot in enumerate((INDEX, TEXT, REASON)):
        s = s.replace(json.dumps(slot), "{%d}" % k)
    return s


def reason_json(reason: str | None) -> str:
    return "null" if reason is None else json_str(reason)


def sse_error(e: APIError) -> str:
    """An error after the stream has started: one `data:` event in the OpenAI error schema."""
    return sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
