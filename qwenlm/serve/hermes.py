"""Tools in the format Qwen2.5 models were trained on ("Hermes" style, what their chat template writes):
the function signatures as JSON lines inside <tools></tools> in the system turn, each call the model
makes as a JSON object {"name": ..., "arguments": {...}} inside <tool_call></tool_call> (several calls
in one reply are parallel tool calls), and tool results as <tool_response></tool_response> blocks in a
user turn. Qwen v1 and Qwen1.5 have no such template and keep the original's ReAct format
(prompt.py); `tool_format` decides which a tokenizer gets.

The prompt is the one the model's own chat template renders (tests/test_serve_hermes.py checks it
against the template, rendered with jinja2), with three differences on purpose:
* a tool call's `arguments`, a JSON string in OpenAI messages, is written as the JSON object it holds
  (the template writes the string, quoted, which is not what the model itself writes);
* without a system message, the system text is the server's usual default (prompt.DEFAULT_SYSTEM);
* only the server's own tags are special tokens: message text never becomes one.

Small models do not always write the tags: a reply that is nothing but such a JSON object (or a list
of them), bare or in a ```json fence, and names one of the tools, is read as the call(s) too.
"""

from __future__ import annotations

import json
import re

from ..generation.generate import split_on_stop
from .prompt import DEFAULT_SYSTEM, ChatPrompt, PromptError, ToolCall, _known_name, _text

TOOLS_HEAD = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
              "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
              "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
              "<args-json-object>}\n</tool_call>")
OPEN, CLOSE = "<tool_call>", "</tool_call>"


def has_tags(tokenizer) -> bool:
    """Whether the vocabulary has <tool_call> and </tool_call> as tokens (Qwen2/2.5), as this format needs."""
    return {OPEN, CLOSE} <= set(getattr(tokenizer, "special_tokens", {}))


def tool_format(tokenizer) -> str:
    """"hermes" when the tokenizer's chat template writes <tool_call> blocks and the vocabulary has the
    tags as tokens (Qwen2/2.5), else "react" (Qwen v1, Qwen1.5, anything without such a template)."""
    template = (getattr(getattr(tokenizer, "vocab", None), "config", None) or {}).get("chat_template") or ""
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = " ".join(t.get("template", "") for t in template if isinstance(t, dict))
    return "hermes" if OPEN in str(template) and has_tags(tokenizer) else "react"


def uses_tools(messages: list[dict]) -> bool:
    """Whether the conversation already holds tool calls or results (written in the tool format even
    when this request offers no tools)."""
    return any(m.get("tool_calls") or m.get("function_call") or m["role"] in ("tool", "function")
               for m in messages)


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)  # the template's tojson: no sorting, no escaping


def _arguments(args) -> str:
    """A call's arguments as the model writes them: the JSON object, not a string holding it."""
    if isinstance(args, str):
        try:
            return _json(json.loads(args))
        except ValueError:
            return _json(args)
    return _json(args if args is not None else {})


class _Ids:
    """Token ids built as a tokenizer reads a rendered template: the text between two tags is encoded
    as one piece (message text never becomes a special token), each of the server's tags is its token."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.pending: list[str] = []
        self.tags = {OPEN: tokenizer.special_tokens[OPEN], CLOSE: tokenizer.special_tokens[CLOSE],
                     "<|im_start|>": tokenizer.im_start_id, "<|im_end|>": tokenizer.im_end_id}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in self.tags) + ")")

    def text(self, s: str) -> "_Ids":
        self.pending.append(s)
        return self

    def markup(self, s: str) -> "_Ids":
        """The server's own text, whose tags are tokens."""
        for part in self._split.split(s):
            if part in self.tags:
                self.done()
                self.ids.append(self.tags[part])
            else:
                self.text(part)
        return self

    def done(self) -> list[int]:
        text, self.pending = "".join(self.pending), []
        if text:
            self.ids += self.tok.encode(text, allowed_special=set())
        return self.ids


def forced_prefix(forced: tuple[str | None] | None) -> str:
    """The start of a reply that makes the model call a tool ("" when the choice is free; `forced`: what
    prompt.forced_call_name gives): a named function is written up to its arguments; "required" with
    several tools up to the name (the model picks one)."""
    if forced is None:
        return ""
    name = forced[0]
    if name is None:
        return OPEN + '\n{"name": "'
    return OPEN + '\n{"name": ' + _json(name) + ', "arguments": '


def build_prompt(tokenizer, messages: list[dict], specs: list[dict]) -> ChatPrompt:
    """Token ids for `messages`, ending with an open assistant turn, in the model's tool format."""
    if not messages:
        raise PromptError("messages must not be empty", "messages")
    if not any(m["role"] == "user" for m in messages):
        raise PromptError("Expecting at least one user message.", "messages")
    out = _Ids(tokenizer)
    first_system = messages[0]["role"] in ("system", "developer")
    system = _text(messages[0].get("content"), "system message") if first_system else DEFAULT_SYSTEM
    out.markup("<|im_start|>").text("system\n" + system)
    if specs:
        out.markup(TOOLS_HEAD)
        for f in specs:
            out.text("\n" + _json({"type": "function", "function": f}))
        out.markup(TOOLS_TAIL)
    out.markup("<|im_end|>").text("\n")
    for i, m in enumerate(messages):
        role = m["role"]
        if i == 0 and first_system:
            continue
        if role in ("system", "developer", "user"):
            text = _text(m.get("content"), f"{role} message")
            out.markup("<|im_start|>").text(("system" if role == "developer" else role) + "\n" + text)
            out.markup("<|im_end|>").text("\n")
        elif role == "assistant":
            text = _text(m.get("content"), "assistant message")
            calls = [c["function"] for c in (m.get("tool_calls") or []) if c.get("function")]
            if m.get("function_call"):
                calls.append(m["function_call"])
            out.markup("<|im_start|>").text("assistant")
            if text or not calls:  # (the template writes a newline before the text only if there is text or no call)
                out.text("\n" + text)
            for c in calls:
                out.text("\n").markup(OPEN).text('\n{"name": ' + _json(c.get("name", "")) + ', "arguments": '
                                                 + _arguments(c.get("arguments")) + "}\n").markup(CLOSE)
            out.markup("<|im_end|>").text("\n")
        elif role in ("tool", "function"):
            if i == 0 or messages[i - 1]["role"] not in ("tool", "function"):
                if i == 0 or messages[i - 1]["role"] != "assistant":
                    raise PromptError(f"Expecting role assistant before role {role}.", "messages")
                out.markup("<|im_start|>").text("user")
            result = _text(m.get("content"), f"{role} message")
            out.text("\n<tool_response>\n" + result + "\n</tool_response>")
            if i == len(messages) - 1 or messages[i + 1]["role"] not in ("tool", "function"):
                out.markup("<|im_end|>").text("\n")
        else:
            raise PromptError(f"Incorrect role {role}.", "messages")
    out.markup("<|im_start|>").text("assistant\n")
    return ChatPrompt(ids=out.done(), stop=[])


_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.S)


def _unfence(s: str) -> str:
    s = s.strip()
    m = _FENCE.match(s)
    return m.group(1).strip() if m else s


def _call(obj, names: list[str] | None) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    name = _known_name(obj["name"], names)
    if name is None:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the object as a string: keep it if it is JSON
        try:
            args = json.loads(args)
        except ValueError:
            args = {"input": args}
    return ToolCall(name=name, arguments=_json(args))


def _objects(body: str) -> list | None:
    """The JSON object(s) of a call's text: one value (an object or a list of them), or one object per
    line (some models write parallel calls so); None if it is neither."""
    body = _unfence(body)
    try:
        value = json.loads(body)
        return value if isinstance(value, list) else [value]
    except ValueError:
        pass
    lines = [line for line in body.splitlines() if line.strip()]
    if len(lines) < 2:
        return None
    try:
        return [json.loads(line) for line in lines]
    except ValueError:
        return None


def parse(text: str, names: list[str] | None = None) -> list[ToolCall] | str:
    """A reply -> its tool calls (the first carries the text before them as `content`), or the text
    itself when it calls nothing it may call."""
    if OPEN in text:
        head, _, rest = text.partition(OPEN)
        calls = []
        for block in rest.split(OPEN):
            found = [_call(o, names) for o in _objects(block.split(CLOSE)[0]) or []]
            calls += [c for c in found if c is not None]
        if not calls:
            return text
        calls[0].content = head.strip()
        return calls
    calls = [_call(o, names) for o in _objects(text) or []]
    if not calls or any(c is None for c in calls):
        return text
    return calls


def _may_start_call(s: str) -> bool:
    """Whether a reply that begins with `s` may still turn out to be a bare JSON call: blank so far,
    { or [, or a ``` fence with no language or json whose first line is blank or { or [."""
    s = s.lstrip()
    if not s or s[0] in "{[":
        return True
    if not "```".startswith(s[:3]):
        return False
    lang, newline, rest = s[3:].partition("\n")
    if not newline:
        return "json".startswith(lang.strip().lower())
    rest = rest.lstrip()
    return lang.strip().lower() in ("", "json") and (not rest or rest[0] in "{[")


class Stream:
    """Streaming with tools: text streams as it comes, less a tail that may be the start of <tool_call>;
    from <tool_call> on, the rest is held for `finish`. A reply that starts like a bare JSON call
    (`_may_start_call`) is held back whole: it may be one."""

    def __init__(self, names: list[str] | None = None):
        self.names = names
        self.buf = ""
        self.sent = 0  # characters of buf already streamed

    def put(self, delta: str) -> str:
        self.buf += delta
        tag = self.buf.find(OPEN, self.sent)
        if tag >= 0:
            end = tag
        elif self.sent == 0 and _may_start_call(self.buf):
            end = 0
        else:  # all but a tail that may begin the tag (held as a stop string's start is)
            end = len(self.buf) - len(split_on_stop(self.buf[self.sent:], [OPEN])[0])
        end = max(end, self.sent)
        out, self.sent = self.buf[self.sent:end], end
        return out

    def finish(self) -> list[ToolCall] | str:
        """At the end: the calls (their `content` only what was not streamed), or the text not streamed yet."""
        parsed = parse(self.buf, self.names)
        if isinstance(parsed, str):
            return self.buf[self.sent:]
        head = self.buf.split(OPEN)[0] if OPEN in self.buf else ""
        parsed[0].content = head[self.sent:].strip() if len(head) > self.sent else ""
        return parsed


def encode_markup(tokenizer, s: str) -> list[int]:
    """Token ids of the server's own text `s` (a forced call's start), its tags as tokens."""
    return _Ids(tokenizer).markup(s).done()
