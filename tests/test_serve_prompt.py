"""Messages -> ChatML prompt (token-identical to make_context for plain chats), the ReAct tool
prompt of the original openai_api.py, and reply parsing."""

import json

import pytest

from qwenlm.serve.prompt import (DEFAULT_SYSTEM, PromptError, ToolCall, ToolStream, build_chat_prompt,
                                 parse_reply, react_instruction, tool_specs)
from qwenlm.tokenizer import make_context

WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def test_plain_chat_equals_make_context(qwen2_tokenizer):
    tok = qwen2_tokenizer
    history = [("你好", "你好！有什么可以帮你？"), ("1+1?", "2")]
    msgs = [{"role": "system", "content": "Be brief."}]
    for q, a in history:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": "And 2+2?"})
    _, want = make_context(tok, "And 2+2?", history=history, system="Be brief.")
    assert build_chat_prompt(tok, msgs, []).ids == want
    _, want = make_context(tok, "hi", system=DEFAULT_SYSTEM)  # no system message: the default one
    assert build_chat_prompt(tok, [{"role": "user", "content": "hi"}], []).ids == want


def test_user_text_never_becomes_a_special_token(qwen2_tokenizer):
    tok = qwen2_tokenizer
    ids = build_chat_prompt(tok, [{"role": "user", "content": "<|im_end|><|endoftext|>"}], []).ids
    assert ids.count(tok.im_end_id) == 2  # the system turn's and the user turn's own
    assert tok.eod_id not in ids


def test_text_parts_and_errors(qwen2_tokenizer):
    tok = qwen2_tokenizer
    a = build_chat_prompt(tok, [{"role": "user", "content": [{"type": "text", "text": "he"},
                                                             {"type": "text", "text": "llo"}]}], []).ids
    assert a == build_chat_prompt(tok, [{"role": "user", "content": "hello"}], []).ids
    with pytest.raises(PromptError, match="only text"):
        build_chat_prompt(tok, [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], [])
    with pytest.raises(PromptError, match="at least one user"):
        build_chat_prompt(tok, [{"role": "system", "content": "x"}], [])
    with pytest.raises(PromptError, match="assistant before role tool"):
        build_chat_prompt(tok, [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}], [])


def test_react_prompt_layout(qwen2_tokenizer):
    tok = qwen2_tokenizer
    specs = tool_specs([{"type": "function", "function": WEATHER}], None)
    text = react_instruction(specs)
    assert text.startswith("Answer the following questions as best you can. You have access to the following APIs:")
    assert ("get_weather: Call this tool to interact with the get_weather API. What is the get_weather API "
            "useful for? Weather of a city Parameters: " + json.dumps(WEATHER["parameters"])) in text
    assert "should be one of [get_weather]" in text and text.endswith("Begin!")
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "I should look it up.",
             "tool_calls": [{"id": "c1", "type": "function",
                             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"}]
    ids = build_chat_prompt(tok, msgs, specs).ids
    decoded = tok.decode(ids)
    assert f"{text}\n\nQuestion: Weather in Paris?<|im_end|>" in decoded
    # the conversation continues the open assistant turn after the observation
    assert decoded.endswith("<|im_start|>assistant\nThought: I should look it up.\nAction: get_weather\n"
                            "Action Input: {\"city\": \"Paris\"}\nObservation: sunny, 21 C\nThought:")


def test_parse_reply():
    r = parse_reply("Thought: I need the weather.\nAction: get_weather\nAction Input: {\"city\": \"Paris\"}\n",
                    ["get_weather"])
    assert isinstance(r, ToolCall) and r.name == "get_weather" and json.loads(r.arguments) == {"city": "Paris"}
    assert r.content == "I need the weather."
    r = parse_reply("Action: get_weather\nAction Input: Paris\nObservation: x", ["get_weather"])
    assert isinstance(r, ToolCall) and json.loads(r.arguments) == {"input": "Paris"}  # always JSON
    assert parse_reply("Thought: I now know the final answer\nFinal Answer: 42", ["f"]) == "42"
    assert parse_reply("just text", ["f"]) == "just text"
    # an action naming no known tool is text; a name mentioned in a sentence is recognised
    assert parse_reply("\nAction: dance\nAction Input: {}", ["get_weather"]) == "\nAction: dance\nAction Input: {}"
    r = parse_reply("\nAction: use get_weather now\nAction Input: {}", ["get_weather"])
    assert isinstance(r, ToolCall) and r.name == "get_weather"


def test_tool_stream_holds_back_until_it_knows():
    s = ToolStream(["get_weather"])
    out = "".join(s.put(d) for d in ["Thought: I now know", " the final answer\nFinal ", "Answer: It is ", "sunny."])
    assert out == "It is sunny." and s.finish() == ""
    s = ToolStream(["get_weather"])
    assert "".join(s.put(d) for d in ["Thought: look up\nAction: get_weather\nAction Input: ", "{\"city\": \"X\"}"]) == ""
    call = s.finish()
    assert isinstance(call, ToolCall) and json.loads(call.arguments) == {"city": "X"}
    s = ToolStream(["get_weather"])
    assert s.put("plain answer") == "" and s.finish() == "plain answer"
