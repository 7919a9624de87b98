"""Tools through the official `openai` client, streaming and not, OpenAI `tools` and legacy
`functions`. The model is replaced by a script (an engine whose logits spell a fixed ReAct reply),
so that what is tested — prompt, stop at "Observation:", parsing, SSE tool-call chunks, the
client's view — does not depend on what a random or tiny model happens to say."""

import json
import re

import openai
import pytest

from helpers import ScriptedEngine, running_server
from qwenlm import load
from qwenlm.serve import ServerOptions, create_app

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = ('Thought: I need the weather of Paris.\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
        'Observation: (the model making things up)')
ANSWER = "Thought: I now know the final answer\nFinal Answer: It is sunny in Paris, 21 °C."
Q = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def setup(v1_chat_dir):
    model, tok = load(v1_chat_dir, dtype="float32", device="cpu")
    eng = ScriptedEngine(model, max_num_seqs=4, max_model_len=2048, vocab_limit=tok.id_limit,
                         prefill_chunk=0, prefix_cache=False)  # (every prompt through the scripted _prefill)
    eng.end_id = tok.im_end_id
    app = create_app(model, tok, ServerOptions(served_model_name="tiny", max_model_len=2048), engine=eng)
    with running_server(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0), tok


def _script(tok, text):
    ScriptedEngine.script = tok.encode(text)
    ScriptedEngine.prompts = []


def test_tool_call(setup):
    client, tok = setup
    _script(tok, CALL)
    r = client.chat.completions.create(model="tiny", messages=Q, tools=TOOLS, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "I need the weather of Paris."
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    prompt = tok.decode(ScriptedEngine.prompts[0])
    assert "get_weather: Call this tool to interact with the get_weather API." in prompt
    assert prompt.endswith("Question: What's the weather in Paris?<|im_end|>\n<|im_start|>assistant\n")


def test_tool_call_streaming(setup):
    client, tok = setup
    _script(tok, CALL)
    chunks = list(client.chat.completions.create(model="tiny", messages=Q, tools=TOOLS, temperature=0, stream=True))
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert content == "I need the weather of Paris."  # no ReAct scaffolding leaks out
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_final_answer_after_tool_result(setup):
    client, tok = setup
    _script(tok, ANSWER)
    msgs = Q + [{"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny", "celsius": 21}'}]
    r = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, temperature=0)
    assert r.choices[0].message.content == "It is sunny in Paris, 21 °C." and r.choices[0].finish_reason == "stop"
    assert tok.decode(ScriptedEngine.prompts[0]).endswith(
        'Observation: {"sky": "sunny", "celsius": 21}\nThought:')
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, temperature=0,
                                                 stream=True))
    deltas = [ch.choices[0].delta.content for ch in chunks if ch.choices[0].delta.content]
    assert "".join(deltas) == "It is sunny in Paris, 21 °C." and len(deltas) > 1  # streamed, not in one piece


# a forced call's rest is held to the tool's parameters (test_structured.py): what the script writes past
# the arguments cannot be written, and the reply ends there
ARGS_ONLY = ' {"city": "Paris"} and then the model making things up'


@pytest.mark.parametrize("script,choice", [(CALL, {}), (ARGS_ONLY, {"function_call": {"name": "get_weather"}})],
                         ids=["auto", "forced"])
def test_legacy_functions(setup, script, choice):
    client, tok = setup
    _script(tok, script)
    r = client.chat.completions.create(model="tiny", messages=Q, functions=[TOOLS[0]["function"]], temperature=0,
                                       **choice)
    c = r.choices[0]
    assert c.finish_reason == "function_call" and c.message.function_call.name == "get_weather"
    assert json.loads(c.message.function_call.arguments) == {"city": "Paris"}


def test_tool_choice_none_means_plain_chat(setup):
    client, tok = setup
    _script(tok, "Hello there.")
    r = client.chat.completions.create(model="tiny", messages=Q, tools=TOOLS, tool_choice="none", temperature=0)
    assert r.choices[0].message.content == "Hello there." and not r.choices[0].message.tool_calls
    assert "get_weather" not in tok.decode(ScriptedEngine.prompts[0])


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streaming"])
@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"],
                         ids=["named", "required"])
def test_forced_tool_choice(setup, choice, stream):
    """A named function (or "required" with one tool) is written into the reply up to its arguments:
    the model writes only those, and the answer is that call, with no content of the server's."""
    client, tok = setup
    _script(tok, ARGS_ONLY)
    args = dict(model="tiny", messages=Q, tools=TOOLS, tool_choice=choice, temperature=0)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **args))
        calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        name, arguments = calls[0].function.name, calls[0].function.arguments
    else:
        m = client.chat.completions.create(**args).choices[0]
        content, finish = m.message.content, [m.finish_reason]
        name, arguments = m.message.tool_calls[0].function.name, m.message.tool_calls[0].function.arguments
    assert name == "get_weather" and json.loads(arguments) == {"city": "Paris"}
    assert finish == ["tool_calls"] and not content
    prompt = tok.decode(ScriptedEngine.prompts[0])
    assert prompt.endswith("<|im_start|>assistant\nThought: I need to call get_weather.\nAction: get_weather\n"
                           "Action Input:")


def test_required_with_several_tools_lets_the_model_name_one(setup):
    client, tok = setup
    _script(tok, ' get_time\nAction Input: {"zone": "CET"} and more')
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    r = client.chat.completions.create(model="tiny", messages=Q, tools=TOOLS + [clock], tool_choice="required",
                                       temperature=0)
    call = r.choices[0].message.tool_calls[0].function
    assert call.name == "get_time" and json.loads(call.arguments) == {"zone": "CET"}
    assert tok.decode(ScriptedEngine.prompts[0]).endswith("Thought: I need to use a tool.\nAction:")


@pytest.mark.parametrize("args,message", [
    (dict(tool_choice={"type": "function", "function": {"name": "nope"}}, tools=TOOLS),
     "names the function 'nope', which is not among the tools (get_weather)"),
    (dict(tool_choice={"type": "function", "function": 5}, tools=TOOLS), "names the function None"),
    (dict(tool_choice="required"), "tool_choice asks for a function call, but no tools are given"),
    (dict(function_call={"name": "get_weather"}), "function_call asks for a function call, but no tools"),
])
def test_bad_tool_choice_is_a_400(setup, args, message):
    client, tok = setup
    with pytest.raises(openai.BadRequestError, match=re.escape(message)) as e:
        client.chat.completions.create(model="tiny", messages=Q, **args)
    assert e.value.body["param"] == ("function_call" if "function_call" in args else "tool_choice")
