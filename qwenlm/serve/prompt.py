"""OpenAI chat messages -> a ChatML prompt, with tools through the original's ReAct format
(spec §6.4), and a model reply -> content or a tool call.

Differences from the original `openai_api.py`, on purpose:
* any sequence of system/user/assistant/tool turns is accepted (not only strict pairs), and a
  system message anywhere is kept in place;
* OpenAI `tools`/`tool_calls`/`tool` messages are handled like the legacy `functions`/
  `function_call`/`function` ones, and work with streaming;
* a conversation that ends with a tool result continues the open assistant turn after
  "Observation: …\\nThought:", as the original's text-completion mode does;
* role names and contents are encoded as plain text: user text never becomes a special token.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

TOOL_DESC = ("{name_for_model}: Call this tool to interact with the {name_for_human} API. What is the "
             "{name_for_human} API useful for? {description_for_model} Parameters: {parameters}")

REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tools_text}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tools_name_text}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""

DEFAULT_SYSTEM = "You are a helpful assistant."


class PromptError(ValueError):
    """A request whose messages cannot be turned into a prompt (answered with 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _text(content, where: str) -> str:
    """Message content: a string, None, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        part = part if isinstance(part, dict) else part.model_dump()
        if part.get("type") != "text":
            raise PromptError(f"{where}: only text content is supported, not {part.get('type')!r}", "messages")
        parts.append(part.get("text") or "")
    return "".join(parts)


def tool_specs(tools: list[dict] | None, functions: list[dict] | None) -> list[dict]:
    """The function definitions of `tools` (OpenAI) or `functions` (legacy), as plain dicts."""
    specs = []
    for t in tools or []:
        if t.get("type", "function") != "function" or not isinstance(t.get("function"), dict):
            raise PromptError("only tools of type 'function' are supported", "tools")
        specs.append(t["function"])
    specs.extend(functions or [])
    for f in specs:
        if not (f.get("name") or f.get("name_for_model")):
            raise PromptError("every function needs a name", "tools")
    return specs


def react_instruction(specs: list[dict]) -> str:
    descs, names = [], []
    for f in specs:
        name = f.get("name_for_model", f.get("name", ""))
        human = f.get("name_for_human", f.get("name", ""))
        descs.append(TOOL_DESC.format(
            name_for_model=name, name_for_human=human,
            description_for_model=f.get("description_for_model", f.get("description", "")),
            parameters=json.dumps(f.get("parameters", {}), ensure_ascii=False)))
        names.append(name)
    return REACT_INSTRUCTION.format(tools_text="\n\n".join(descs), tools_name_text=", ".join(names))


def _assistant_text(msg: dict, tools_on: bool) -> str:
    content = _text(msg.get("content"), "assistant message").strip("\n").rstrip()
    calls = [c["function"] for c in (msg.get("tool_calls") or []) if c.get("function")]
    if msg.get("function_call"):
        calls.append(msg["function_call"])
    if calls:
        thought = content if content.startswith("Thought: ") else f"Thought: {content}" if content else "Thought:"
        parts = [thought]
        for c in calls:
            args = c.get("arguments", "")
            args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
            parts.append(f"Action: {c.get('name', '')}\nAction Input: {args}")
        return "\n".join(parts)
    if tools_on:
        return f"Thought: I now know the final answer.\nFinal Answer: {content}"
    return content


@dataclass
class ChatPrompt:
    ids: list[int]
    open_thought: bool = False  # the prompt ends inside the assistant's turn, after "Thought:"
    stop: list[str] | None = None  # stop strings the format needs (ReAct: "Observation:", written by the tool)


def forced_call_name(tool_choice, function_call, specs: list[dict]) -> tuple[str | None] | None:
    """Which call `tool_choice` (OpenAI) or `function_call` (legacy) forces: None when the choice is
    free, (name,) for a named function or "required" with one tool, (None,) for "required" with several
    (the model names one). Raises PromptError for a choice that names no given tool."""
    choice = tool_choice if tool_choice not in (None, "auto", "none") else function_call
    if choice in (None, "auto", "none"):
        return None
    param = "tool_choice" if tool_choice not in (None, "auto", "none") else "function_call"
    if not specs:
        raise PromptError(f"{param} asks for a function call, but no tools are given", param)
    names = [f.get("name_for_model", f.get("name")) for f in specs]
    if choice == "required":
        return (names[0] if len(names) == 1 else None,)
    if isinstance(choice, dict):
        fn = choice.get("function") if "function" in choice else choice
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or name not in names:
            raise PromptError(f"{param} names the function {name!r}, which is not among the tools "
                              f"({', '.join(names)})", param)
        return (name,)
    raise PromptError(f"{param} must be 'none', 'auto', 'required' or a function, not {choice!r}", param)


def forced_call_prefix(forced: tuple[str | None] | None, open_thought: bool) -> str:
    """The start of the assistant's ReAct reply that makes it call a tool, or "" when the choice is
    free (`forced`: what forced_call_name gives). A named function (`tool_choice={"type": "function",
    "function": {"name": N}}`, legacy `function_call={"name": N}`, or "required" with one tool) is
    written up to its arguments, so the model only writes those; "required" with several tools is
    written up to "Action:", so the model names one (the ReAct format has no way to make it name a
    valid one)."""
    if forced is None:
        return ""
    name = forced[0]
    thought = "" if open_thought else "Thought:"
    if name is None:
        return f"{thought} I need to use a tool.\nAction:"
    return f"{thought} I need to call {name}.\nAction: {name}\nAction Input:"


def build_chat_prompt(tokenizer, messages: list[dict], specs: list[dict]) -> ChatPrompt:
    """ChatML token ids for `messages` (dicts with role/content/...), ending with an open
    assistant turn. With tools, the ReAct instruction is put before the last user message."""
    if not messages:
        raise PromptError("messages must not be empty", "messages")
    tools_on = bool(specs)
    turns: list[list] = []  # [role, text, open]; tool results extend the assistant turn before them
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    if last_user < 0:
        raise PromptError("Expecting at least one user message.", "messages")
    for i, m in enumerate(messages):
        role = m["role"]
        if role in ("system", "developer"):
            turns.append(["system", _text(m.get("content"), "system message").strip("\n").rstrip()])
        elif role == "user":
            text = _text(m.get("content"), "user message").strip("\n").rstrip()
            if tools_on and i == last_user:
                text = f"{react_instruction(specs)}\n\nQuestion: {text}"
            turns.append(["user", text])
        elif role == "assistant":
            text = _assistant_text(m, tools_on)
            if turns and turns[-1][0] == "assistant":
                turns[-1][1] += "\n" + text
            else:
                turns.append(["assistant", text])
        elif role in ("tool", "function"):
            if not turns or turns[-1][0] != "assistant":
                raise PromptError(f"Expecting role assistant before role {role}.", "messages")
            result = _text(m.get("content"), f"{role} message").strip("\n").rstrip()
            turns[-1][1] += f"\nObservation: {result}"
        else:
            raise PromptError(f"Incorrect role {role}.", "messages")
    continue_assistant = messages[-1]["role"] in ("tool", "function")
    if continue_assistant:
        turns[-1][1] += "\nThought:"
    if not turns or turns[0][0] != "system":
        turns.insert(0, ["system", DEFAULT_SYSTEM])
    start, end, nl = [tokenizer.im_start_id], [tokenizer.im_end_id], tokenizer.encode("\n")
    ids: list[int] = []
    for k, (role, text) in enumerate(turns):
        if k:
            ids += nl
        ids += start + tokenizer.encode(role, allowed_special=set()) + nl + tokenizer.encode(text, allowed_special=set())
        if not (continue_assistant and k == len(turns) - 1):
            ids += end
    if not continue_assistant:
        ids += nl + start + tokenizer.encode("assistant") + nl
    return ChatPrompt(ids=ids, open_thought=continue_assistant, stop=["Observation:"] if tools_on else [])


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    content: str = ""  # the text before the call (ReAct: the thought)

    def openai(self) -> dict:
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def _json_arguments(raw: str) -> str:
    """Arguments as JSON text: kept if they parse, else wrapped as {"input": raw}."""
    try:
        json.loads(raw)
        return raw
    except ValueError:
        return json.dumps({"input": raw}, ensure_ascii=False)


def _known_name(name: str, names: list[str] | None) -> str | None:
    """The tool the model meant: an exact name, else the one name mentioned in what it wrote."""
    if not names or name in names:
        return name
    mentioned = [n for n in names if n in name]
    return max(mentioned, key=len) if mentioned else None


def parse_reply(text: str, names: list[str] | None = None) -> ToolCall | str:
    """A ReAct reply -> ToolCall, or the final answer text (the original's `parse_response`).
    With `names`, an action that names none of the tools is not a tool call: the text is returned."""
    t = "\n" + text if text.startswith("Action:") else text
    i, j = t.find("\nAction:"), t.find("\nAction Input:")
    k = t.find("\nObservation:")
    if 0 <= i < j:
        if k < j:
            t, k = t + "\nObservation:", len(t)
        name = _known_name(t[i + len("\nAction:"):j].strip(), names)
        args = t[j + len("\nAction Input:"):k].strip()
        if name is None:
            return text
        thought = t[:i]
        z = thought.find("Thought: ")
        thought = thought[z + len("Thought: "):] if z >= 0 else thought
        return ToolCall(name=name, arguments=_json_arguments(args), content=thought.strip())
    z = t.rfind("Final Answer: ")
    if z >= 0:
        return t[z + len("Final Answer: "):]
    return text


class ToolStream:
    """Streaming with tools: text before "Final Answer: " is held back (it may turn out to be a
    tool call); once the final answer starts, its text streams as it comes."""

    MARK = "Final Answer: "

    def __init__(self, names: list[str] | None = None):
        self.names = names
        self.buf = ""
        self.streaming = False

    def put(self, delta: str) -> str:
        if self.streaming:
            return delta
        self.buf += delta
        if "Action:" in self.buf:
            return ""
        z = self.buf.find(self.MARK)
        if z < 0:
            return ""
        self.streaming = True
        return self.buf[z + len(self.MARK):]

    def finish(self) -> ToolCall | str:
        """At the end: the tool call, or the part of the answer not streamed yet."""
        if self.streaming:
            return ""
        return parse_reply(self.buf, self.names)
