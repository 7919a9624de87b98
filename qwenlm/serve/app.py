"""`qwen serve`: an OpenAI-compatible HTTP server around one continuous-batching engine.

The server is thin: it turns requests into token prompts and sampling settings, submits one
engine sequence per choice, and turns the tokens that come back into JSON or SSE chunks. Every
error is in the OpenAI error schema; a mistake in a request is a 4xx with a message that says
what to change.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.batch import BatchEngine
from ..generation import grammar
from . import hermes
from .http import APIError, BodyLimit, Gate, error_response
from .jobs import INDEX, REASON, TEXT, Job, json_str, reason_json, sse, sse_error, sse_format
from .logprobs import CompletionLogprobs, TokenText, chat_content
from .metrics import Metrics
from .prompt import (PromptError, ToolCall, ToolStream, build_chat_prompt, forced_call_name, forced_call_prefix,
                     parse_reply, tool_specs)
from .protocol import ChatCompletionRequest, CompletionRequest
from .status import report

log = logging.getLogger("qwenlm")
STATIC = os.path.join(os.path.dirname(__file__), "static")


@dataclass
class ToolReplies:
    """How the replies of one chat request are read for tool calls."""

    names: list[str]  # the tools' names; empty: no tools, replies are text
    fmt: str = "react"  # or "hermes" (serve/hermes.py)
    legacy: bool = False  # functions/function_call: the first call, in the legacy fields
    forced: str = ""  # the start of each reply, written by the server to force a call
    single: bool = False  # parallel_tool_calls false: the first call only

    def stream(self):
        return (hermes.Stream if self.fmt == "hermes" else ToolStream)(self.names)

    def calls(self, parsed: "ToolCall | list[ToolCall] | str") -> "list[ToolCall] | str":
        """A parsed reply as its list of calls (ReAct gives one, the hermes format any number), or its text."""
        calls = [parsed] if isinstance(parsed, ToolCall) else parsed
        return calls[:1] if not isinstance(calls, str) and (self.legacy or self.single) else calls

    def parse(self, text: str) -> "list[ToolCall] | str":
        return self.calls(hermes.parse(text, self.names) if self.fmt == "hermes" else parse_reply(text, self.names))

    def delta(self, calls: "list[ToolCall]") -> tuple[dict, str]:
        """The message fields of `calls` and the finish reason."""
        if self.legacy:
            return {"function_call": {"name": calls[0].name, "arguments": calls[0].arguments}}, "function_call"
        return {"tool_calls": [c.openai() for c in calls]}, "tool_calls"


@dataclass
class ServerOptions:
    served_model_name: str = "qwen"
    api_key: str | None = None
    max_model_len: int = 4096
    max_num_seqs: int = 8
    max_queue: int = 256
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = 8 * 1024 * 1024
    max_stop_strings: int = 16
    prefill_chunk: int | None = None  # prompt tokens read per engine step (None: the engine's default)
    prefix_cache: bool | None = None  # finished rows kept for prompts that start with their tokens (None: default)
    status_every: float = 0.0  # seconds between status lines while busy (status.py; 0: none)
    warm_up: bool | None = None  # run each batch shape once before serving (BatchEngine.warm_up; None: on a GPU)
    tool_format: str = "auto"  # "react" (the original's), "hermes" (Qwen2.5's <tool_call>), auto: the model's


class Server:
    def __init__(self, model, tokenizer, opts: ServerOptions, engine: BatchEngine | None = None):
        self.model, self.tokenizer, self.opts = model, tokenizer, opts
        self.engine = engine or BatchEngine(model, opts.max_num_seqs, opts.max_model_len, opts.max_queue,
                                            vocab_limit=tokenizer.id_limit, prefill_chunk=opts.prefill_chunk,
                                            prefix_cache=opts.prefix_cache)
        warm = opts.warm_up if opts.warm_up is not None else (self.engine.device.type == "cuda"
                                                                and self.engine.thread is None)
        self.warm_up_seconds = self.engine.warm_up() if warm else None
        self.metrics = Metrics(self.engine)
        t = tokenizer
        self.token_text = TokenText(tokenizer)
        self.chat_stop_ids = [i for i in (t.im_end_id, t.im_start_id, t.eod_id) if i is not None]
        if opts.tool_format not in ("auto", "react", "hermes"):
            raise ValueError(f"tool format {opts.tool_format!r}: expected auto, react or hermes")
        self.tool_format = hermes.tool_format(tokenizer) if opts.tool_format == "auto" else opts.tool_format
        if self.tool_format == "hermes" and not hermes.has_tags(tokenizer):
            raise ValueError("the hermes tool format needs <tool_call> and </tool_call> tokens, which this "
                             "tokenizer lacks (a Qwen2/2.5 tokenizer has them)")
        self.created = int(time.time())

    # ---- request -> sampling settings ---------------------------------------------------------
    def sampling(self, req, prompt_len: int, max_tokens: int | None, extra_stops=()):
        limit = self.engine.max_model_len
        if prompt_len >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your "
                                f"prompt has {prompt_len} tokens. Shorten the prompt.",
                           param="messages", code="context_length_exceeded")
        room = limit - prompt_len
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(400, f"max_tokens is {max_tokens}, but the prompt has {prompt_len} tokens and "
                                f"the context is {limit}: at most {room} new tokens fit.",
                           param="max_tokens", code="context_length_exceeded")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > self.opts.max_stop_strings or any(len(s) > 256 for s in stops):
            raise APIError(400, f"at most {self.opts.max_stop_strings} stop strings of up to 256 characters",
                           param="stop")
        stops = [s for s in stops if s] + list(extra_stops)
        kw = {"max_new_tokens": max_tokens, "stop": stops or None, "seed": req.seed,
              "logit_bias": self._logit_bias(req.logit_bias)}
        if req.temperature is not None:
            kw.update(do_sample=req.temperature > 1e-5, temperature=max(req.temperature, 1e-5))
        for name in ("top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if getattr(req, name) is not None:
                kw[name] = getattr(req, name)
        if req.top_k is not None:
            kw["top_k"] = max(req.top_k, 0)
        try:
            cfg = self.model.generation_config.update(**kw)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        if req.ignore_eos:
            cfg.eos_token_id = None
        return cfg

    def _logit_bias(self, bias: dict[str, float] | None) -> dict[int, float] | None:
        """OpenAI's logit_bias (token id strings -> -100..100) as the generation setting."""
        if not bias:
            return None
        out = {}
        for k, v in bias.items():
            try:
                token = int(k)
            except ValueError:
                token = -1
            if not 0 <= token < self.tokenizer.id_limit or not -100 <= v <= 100:
                raise APIError(400, f"logit_bias: {k!r}: {v} is not a token id below {self.tokenizer.id_limit} "
                                    "with a bias between -100 and 100", param="logit_bias")
            out[token] = float(v)
        return out

    def choice_cfgs(self, cfg, n: int):
        """n choices: with a seed, choice i uses seed + i (so choices differ but repeat)."""
        return [cfg if cfg.seed is None or i == 0 else cfg.update(seed=cfg.seed + i) for i in range(n)]

    # ---- /v1/chat/completions -------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, request: Request):
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        prompt, replies, specs, forced_call = self._chat_prompt(req)
        forced = replies.forced
        max_tokens = req.max_completion_tokens or req.max_tokens
        if req.max_length is not None:
            max_tokens = min(max_tokens or req.max_length, req.max_length - len(prompt.ids))
            if max_tokens < 1:
                raise APIError(400, f"max_length {req.max_length} leaves no room after the {len(prompt.ids)}-token "
                                    "prompt", param="max_length", code="context_length_exceeded")
        cfg = self.sampling(req, len(prompt.ids), max_tokens, prompt.stop or [])
        cfgs = self.choice_cfgs(cfg, req.n)
        constraints = self._constraints(req, req.n, self.tokenizer.im_end_id, tools=bool(specs))
        if forced:
            constraints = self._forced_arguments(replies.fmt, forced_call, specs, req.n)
        await self._prepare(constraints)
        job = Job(self, [prompt.ids] * req.n, cfgs, [] if req.ignore_eos else self.chat_stop_ids, request,
                  logprobs=(req.top_logprobs or 0) if req.logprobs else None, constraints=constraints)
        job.submit()
        self.metrics.prompt_tokens.inc(job.prompt_tokens)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        texts = job.texts
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._chat_stream(job, texts, replies, rid, created, include_usage),
                                     media_type="text/event-stream")
        reasons = await job.collect()
        if any(r == "abort" for r in reasons):
            return Response(status_code=499)
        choices = []
        for i, (text, reason) in enumerate(zip(texts, reasons)):
            msg, reason = self._message(forced + text.text, reason, replies)
            lp = {"content": chat_content(self.token_text, *job.shown_logprobs(i)), "refusal": None} \
                if job.logprobs else None
            choices.append({"index": i, "message": msg, "finish_reason": reason, "logprobs": lp})
        self.metrics.generation_tokens.inc(job.completion_tokens)
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.opts.served_model_name,
                "choices": choices, "usage": job.usage()}

    def _chat_prompt(self, req: ChatCompletionRequest):
        """The prompt's token ids (with the start of a forced call at their end), how its replies are read
        for tool calls, the tools, and which call is forced (prompt.forced_call_name; None: none)."""
        tools = None if req.tool_choice == "none" else [t.model_dump(exclude_none=True) for t in req.tools or []]
        funcs = None if req.function_call == "none" else [f.model_dump(exclude_none=True) for f in req.functions or []]
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        choice = (req.tool_choice if tools is not None else None, req.function_call if funcs is not None else None)
        try:
            specs = tool_specs(tools, funcs)
            fmt = "hermes" if self.tool_format == "hermes" and (specs or hermes.uses_tools(messages)) else "react"
            if fmt == "hermes":
                prompt = hermes.build_prompt(self.tokenizer, messages, specs)
            else:
                prompt = build_chat_prompt(self.tokenizer, messages, specs)
            forced_call = forced_call_name(*choice, specs)
            forced = hermes.forced_prefix(forced_call) if fmt == "hermes" else \
                forced_call_prefix(forced_call, prompt.open_thought)
        except PromptError as e:
            raise APIError(400, f"Invalid request: {e}", param=e.param) from None
        replies = ToolReplies([f.get("name_for_model", f.get("name")) for f in specs], fmt, bool(funcs) and not tools,
                              forced, req.parallel_tool_calls is False)
        if forced:  # the reply starts inside the call: the model writes only the rest
            prompt.ids = prompt.ids + (hermes.encode_markup(self.tokenizer, forced) if fmt == "hermes"
                                       else self.tokenizer.encode(forced, allowed_special=set()))
        return prompt, replies, specs, forced_call

    def _constraints(self, req, n: int, end_id: int, tools: bool = False) -> list | None:
        """One grammar constraint per choice for `response_format` (json_object, json_schema) or vLLM's
        guided_json / guided_regex / guided_choice; None: free text."""
        asked = [name for name in ("guided_json", "guided_regex", "guided_choice") if getattr(req, name) is not None]
        param = asked[0] if asked else "response_format"
        try:
            held, schema = grammar.requested_schema(req.response_format)
            if len(asked) + held > 1:
                raise grammar.GrammarError(f"{', '.join(asked + ['response_format'] * held)}: one at a time")
            if not (asked or held):
                return None
            if tools:
                raise grammar.GrammarError(f"{param} with tools: a reply is held to a format or may call a tool, "
                                           "not both (tool_choice 'none' leaves the tools out)")
            grammars = grammar.grammars_for(self.tokenizer, self.model.config.vocab_size, end_id)
            if param == "guided_json":
                schema = req.guided_json
                if isinstance(schema, str):
                    try:
                        schema = json.loads(schema)
                    except ValueError as e:
                        raise grammar.GrammarError(f"guided_json is not JSON: {e}") from None
            if param in ("guided_json", "response_format"):
                return [grammars.json(schema) for _ in range(n)]
            if param == "guided_regex":
                return [grammars.regex(req.guided_regex) for _ in range(n)]
            return [grammars.one_of(req.guided_choice) for _ in range(n)]
        except grammar.GrammarError as e:
            raise APIError(400, str(e), param=param) from None

    GRAMMAR_SECONDS = 5.0  # the most a grammar's first step may take before its request is refused

    async def _prepare(self, constraints: list | None) -> None:
        """Each grammar's first step, computed off the event loop and before the engine sees it: a grammar
        whose first step takes longer than GRAMMAR_SECONDS (a regular expression such as a{100000000}
        builds a lexer for tens of seconds) is a 400, and never stalls the batch it would have joined."""
        if not constraints:
            return
        work = asyncio.to_thread(lambda: [c.allowed() for c in constraints if c is not None])
        try:
            await asyncio.wait_for(work, self.GRAMMAR_SECONDS)
        except asyncio.TimeoutError:
            raise APIError(400, f"the requested format takes too long to prepare (more than {self.GRAMMAR_SECONDS:g} "
                                "s for its first token): simplify the schema, expression or choices") from None

    def _forced_arguments(self, fmt: str, forced: tuple, specs: list[dict], n: int) -> list | None:
        """For a call the server forced (tool_choice named or "required"): one constraint per choice that
        holds the rest of the call, the tool's name where the model picks it and its arguments, to the
        tools' parameter schemas. None (the model writes freely) without llguidance or for a schema the
        grammar engine cannot use."""
        if not grammar.available():
            return None
        tools = [(f.get("name_for_model", f.get("name")), f.get("parameters")) for f in specs]
        if forced[0] is not None:
            tools = [t for t in tools if t[0] == forced[0]][:1]
        if fmt == "hermes":  # the reply so far: <tool_call>\n{"name": "NAME", "arguments":   (or {"name": ")
            options = [("" if forced[0] else json.dumps(name)[1:] + ', "arguments": ', schema, "}\n")
                       for name, schema in tools]
        else:  # ReAct, so far: Action: NAME\nAction Input:   (or Action:)
            options = [(" " if forced[0] else f" {name}\nAction Input: ", schema, "") for name, schema in tools]
        try:
            grammars = grammar.grammars_for(self.tokenizer, self.model.config.vocab_size, self.tokenizer.im_end_id)
            return [grammars.choice(options) for _ in range(n)]
        except grammar.GrammarError as e:
            log.warning("tool call arguments left free: %s", e)
            return None

    @staticmethod
    def _message(text: str, reason: str, replies: ToolReplies) -> tuple[dict, str]:
        calls = replies.parse(text) if replies.names else text
        if isinstance(calls, str):
            return {"role": "assistant", "content": calls}, reason
        content = "" if replies.forced else calls[0].content  # a forced call's ReAct thought is the server's words
        fields, reason = replies.delta(calls)
        return {"role": "assistant", "content": content or None, **fields}, reason

    async def _chat_stream(self, job: Job, texts, replies: ToolReplies, rid, created, include_usage):
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.opts.served_model_name}

        def chunk(i, delta, reason=None, logprobs=None):
            return sse({**head, "choices": [{"index": i, "delta": delta, "finish_reason": reason,
                                             "logprobs": logprobs}]})

        text_fmt = sse_format({**head, "choices": [{"index": INDEX, "delta": {"content": TEXT},
                                                     "finish_reason": None, "logprobs": None}]})
        tool_streams = [replies.stream() for _ in texts] if replies.names else None
        for ts in tool_streams or []:
            ts.put(replies.forced)  # held back (it holds "Action:" or <tool_call>), parsed with the model's part
        try:
            yield "".join(chunk(i, {"role": "assistant", "content": ""}) for i in range(len(texts)))
            async for batch in job.batches():
                out = []
                for i, tok, reason in batch:
                    delta = texts[i].put(tok) if tok is not None else ""
                    if reason is not None:
                        delta += texts[i].finish()
                    if tool_streams is not None:
                        delta = tool_streams[i].put(delta)
                    entry = job.take_logprobs(i, tok) if job.logprobs and tok is not None else None
                    if entry is not None:  # the token's entry goes with whatever text it let out
                        lp = {"content": chat_content(self.token_text, [tok], [entry]), "refusal": None}
                        out.append(chunk(i, {"content": delta}, logprobs=lp))
                    elif delta:
                        out.append(text_fmt.format(i, json_str(delta)))
                    if reason is None:
                        continue
                    if reason in ("abort", "error"):
                        return
                    if tool_streams is not None:
                        rest = replies.calls(tool_streams[i].finish())
                        if not isinstance(rest, str):
                            if rest[0].content and not replies.forced:
                                out.append(chunk(i, {"content": rest[0].content}))
                            fields, reason = replies.delta(rest)
                            for k, call in enumerate(fields.get("tool_calls", [])):
                                call["index"] = k
                            out.append(chunk(i, fields))
                        elif rest:
                            out.append(chunk(i, {"content": rest}))
                    out.append(chunk(i, {}, reason))
                if out:
                    yield "".join(out)
            yield self._stream_end(job, head, include_usage)
        except APIError as e:
            yield sse_error(e)

    def _stream_end(self, job: Job, head: dict, include_usage: bool) -> str:
        """The last events of a stream: the usage chunk when asked for, then [DONE]."""
        self.metrics.generation_tokens.inc(job.completion_tokens)
        usage = sse({**head, "choices": [], "usage": job.usage()}) if include_usage else ""
        return usage + "data: [DONE]\n\n"

    # ---- /v1/completions ------------------------------------------------------------------------
    def _prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        limit = min(self.tokenizer.id_limit, self.model.config.vocab_size)
        for p in prompt:
            ids = self.tokenizer.encode(p, allowed_special=set()) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "a prompt encodes to zero tokens", param="prompt")
            bad = [t for t in ids if not 0 <= t < limit]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{limit - 1})", param="prompt")
            out.append(ids)
        return out

    async def complete(self, req: CompletionRequest, request: Request):
        if req.suffix:
            raise APIError(400, "suffix (insertion) is not supported by this server", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is not supported by this server: ask for n choices instead", param="best_of")
        prompts = self._prompts(req.prompt)
        if len(prompts) * req.n > 64:
            raise APIError(400, "at most 64 completions (prompts times n) per request", param="n")
        # max_tokens 0: nothing generated, the prompt echoed (with echo and logprobs: its log-probabilities,
        # which is how evaluation harnesses score text); one token is generated and shown to nobody
        zero = req.max_tokens == 0
        all_prompts, cfgs = [], []
        for p in prompts:
            cfg = self.sampling(req, len(p), 1 if zero else req.max_tokens)
            all_prompts += [p] * req.n
            cfgs += self.choice_cfgs(cfg, req.n)
        k = req.logprobs
        constraints = None if zero else self._constraints(req, len(all_prompts), self.tokenizer.eod_id)
        await self._prepare(constraints)
        job = Job(self, all_prompts, cfgs, [] if req.ignore_eos else [self.tokenizer.eod_id], request,
                  logprobs=k, prompt_logprobs=k if req.echo else None, constraints=constraints)
        job.hide_generated = zero
        job.prompt_tokens = sum(len(p) for p in prompts)
        job.submit()
        self.metrics.prompt_tokens.inc(job.prompt_tokens)
        texts = job.texts
        echo = [self.tokenizer.decode(p) if req.echo else "" for p in all_prompts]
        rid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.opts.served_model_name
        lps = [CompletionLogprobs(self.token_text) for _ in all_prompts] if k is not None else None

        def echo_logprobs(i: int) -> dict | None:
            """The echoed prompt's part (once its prompt is read: its first token has arrived)."""
            if lps is None:
                return None
            return lps[i].part(all_prompts[i], [None] + job.seqs[i].prompt_token_logprobs) if req.echo \
                else lps[i].part([], [])

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            fmt = sse_format({"id": rid, "object": "text_completion", "created": created, "model": name,
                               "choices": [{"index": INDEX, "text": TEXT, "finish_reason": REASON,
                                            "logprobs": None}]})

            def chunk(i, text, reason=None, logprobs=None):
                if logprobs is None:
                    return fmt.format(i, json_str(text), reason_json(reason))
                return sse({"id": rid, "object": "text_completion", "created": created, "model": name,
                            "choices": [{"index": i, "text": text, "finish_reason": reason, "logprobs": logprobs}]})

            async def stream():
                try:
                    waiting = [bool(e) for e in echo]  # echoes sent when their log-probabilities are known
                    if lps is None:
                        for i, e in enumerate(echo):
                            if e:
                                yield chunk(i, e)
                        waiting = [False] * len(echo)
                    async for batch in job.batches():
                        out = []
                        for i, tok, reason in batch:
                            if reason in ("abort", "error"):
                                return
                            if waiting[i]:
                                waiting[i] = False
                                out.append(chunk(i, echo[i], logprobs=echo_logprobs(i)))
                            if zero:
                                if reason is not None:
                                    out.append(chunk(i, "", "length"))
                                continue
                            delta = texts[i].put(tok) if tok is not None else ""
                            if reason is not None:
                                delta += texts[i].finish()
                            entry = job.take_logprobs(i, tok) if lps is not None and tok is not None else None
                            if entry is not None:
                                out.append(chunk(i, delta, reason, lps[i].part([tok], [entry])))
                            elif delta or reason:
                                out.append(chunk(i, delta, reason))
                        if out:
                            yield "".join(out)
                    yield self._stream_end(job, {"id": rid, "object": "text_completion", "created": created,
                                                 "model": name}, include_usage)
                except APIError as e:
                    yield sse_error(e)
            return StreamingResponse(stream(), media_type="text/event-stream")
        reasons = await job.collect()
        if any(r == "abort" for r in reasons):
            return Response(status_code=499)
        self.metrics.generation_tokens.inc(job.completion_tokens)
        choices = []
        for i, (t, r) in enumerate(zip(texts, reasons)):
            lp = echo_logprobs(i)
            if lp is not None and not zero:
                for key, v in lps[i].part(*job.shown_logprobs(i)).items():
                    lp[key] += v
            choices.append({"index": i, "text": echo[i] + ("" if zero else t.text),
                            "finish_reason": "length" if zero else r, "logprobs": lp})
        return {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": choices,
                "usage": job.usage()}


HTTP_THREAD = "qwenlm-http"  # the name of serve_in_thread's thread


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", timeout: float = 60):
    """Run an app with uvicorn on a free port of `host` in a daemon thread; yields the base URL
    (benchmarks and tests; `qwen serve` runs uvicorn in the foreground)."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name=HTTP_THREAD)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


def create_app(model, tokenizer, opts: ServerOptions | None = None, engine: BatchEngine | None = None) -> FastAPI:
    """The FastAPI application (the engine thread starts with the app and stops with it)."""
    opts = opts or ServerOptions()
    server = Server(model, tokenizer, opts, engine)

    @asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        status = asyncio.create_task(report(server.engine, opts.status_every)) if opts.status_every > 0 else None
        yield
        if status is not None:
            status.cancel()
        server.engine.shutdown()

    app = FastAPI(title="qwenlm", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API for Qwen models (qwen serve)")
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        server.metrics.errors.labels(str(e.status)).inc()
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":  # loc is ("body", character offset)
            where = first.get("loc", ("body", "?"))[-1]
            reason = (first.get("ctx") or {}).get("error", "")
            server.metrics.errors.labels("400").inc()
            return error_response(400, f"the request body is not valid JSON (at character {where}"
                                       f"{': ' + reason if reason else ''})", "invalid_request_error")
        loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        if loc is None and first.get("type") in ("model_attributes_type", "dict_type"):
            first = {**first, "msg": "the request body must be a JSON object"}
        msg = f"{loc}: {first.get('msg')}" if loc else str(first.get("msg", "invalid request"))
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more problem(s))"
        server.metrics.errors.labels("400").inc()
        return error_response(400, msg, "invalid_request_error", loc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        server.metrics.errors.labels(str(e.status_code)).inc()
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        server.metrics.errors.labels("500").inc()
        return error_response(500, "internal server error (see the server log)", "server_error")

    app.add_middleware(Gate, api_key=opts.api_key, open_paths={"/health", "/", "/favicon.ico"},
                       metrics=server.metrics)
    if opts.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=opts.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(BodyLimit, limit=opts.max_body_bytes)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    def card() -> dict:
        return {"id": opts.served_model_name, "object": "model", "created": server.created, "owned_by": "qwenlm",
                "max_model_len": server.engine.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        """One model's card (the client's `models.retrieve`); a name the server does not serve is a 404."""
        if model != opts.served_model_name:
            raise APIError(404, f"The model '{model}' does not exist: this server serves "
                                f"'{opts.served_model_name}'.", param="model", code="model_not_found")
        return card()

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await server.chat(req, request)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await server.complete(req, request)

    @app.get("/metrics")
    async def metrics():
        body, ctype = server.metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        with open(os.path.join(STATIC, "index.html"), encoding="utf-8") as f:
            return HTMLResponse(f.read().replace("{{MODEL}}", opts.served_model_name))

    return app
