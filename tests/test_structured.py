"""Structured output (`response_format` json_object / json_schema, generation/grammar.py): the grammar
allows exactly the tokens that keep the reply a prefix of a value of the schema, and a tiny random
model, which left alone writes anything, writes valid values through the server; checked here by
parsing and by the schema's rules written out by hand."""

import json
import re

import openai
import pytest

from qwenlm.generation.grammar import GrammarError, Grammars

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["unit", "n", "ok"],
          "properties": {"unit": {"enum": ["celsius", "fahrenheit"]},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "ok": {"type": "boolean"}},
          "x-guidance": {"whitespace_flexible": False}}  # (a random model would otherwise write spaces forever)


def _valid(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"unit", "n", "ok"} and value["unit"] in ("celsius", "fahrenheit")
            and type(value["n"]) is int and 0 <= value["n"] <= 99 and type(value["ok"]) is bool)


def test_the_grammar_allows_a_valid_value_token_by_token_and_nothing_after(qwen2_tokenizer):
    tok = qwen2_tokenizer
    g = Grammars(tok, 151936, tok.im_end_id)
    c = g.json(SCHEMA)
    ids = tok.encode('{"unit":"celsius","n":42,"ok":true}')
    for k, t in enumerate(ids):
        allowed = c.allowed()
        assert allowed.shape == (151936,) and allowed[t], tok.decode(ids[:k + 1])
        assert not c.complete
        c.advance(t)
    assert c.complete
    assert c.allowed().nonzero().flatten().tolist() == [tok.im_end_id]
    # what would break the value is never allowed
    c = g.json(SCHEMA)
    first = c.allowed()
    for text in ("[", " x", "}", '"', "```"):
        assert not first[tok.encode(text)[0]], text
    for t in tok.encode('{"unit":"'):
        c.advance(t)
    allowed = c.allowed()
    assert allowed[tok.encode("c")[0]] and allowed[tok.encode("f")[0]]
    assert not allowed[tok.encode("k")[0]] and not allowed[tok.im_end_id]


def test_any_object_and_bad_schemas(qwen2_tokenizer):
    tok = qwen2_tokenizer
    g = Grammars(tok, 151936, tok.im_end_id)
    c = g.json(None)
    assert c.allowed()[tok.encode("{")[0]] and not c.allowed()[tok.encode("[")[0]]
    with pytest.raises(GrammarError, match="Invalid type: objekt"):
        g.json({"type": "objekt"})
    with pytest.raises(GrammarError, match="/nope"):
        g.json({"type": "object", "properties": {"a": {"$ref": "#/nope"}}})
    with pytest.raises(GrammarError, match="Unsatisfiable"):
        g.json({"allOf": [{"type": "integer"}, {"type": "string"}]})
    c = g.json({"oneOf": [{"type": "integer"}, {"enum": ["x"]}]})  # (pydantic writes unions this way)
    assert c.allowed()[tok.encode("7")[0]] and c.allowed()[tok.encode('"')[0]] and not c.allowed()[tok.encode("{")[0]]


def _ask(client, **kw):
    kw.setdefault("max_tokens", 120)
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather as JSON"}],
                                          **kw)


def test_a_random_model_writes_schema_values_through_the_server(client):
    free = _ask(client, temperature=0).choices[0].message.content
    with pytest.raises(ValueError):
        json.loads(free)  # the control: unconstrained, this model writes no JSON at all
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}}
    r = _ask(client, temperature=0, response_format=fmt)
    assert r.choices[0].finish_reason == "stop" and _valid(json.loads(r.choices[0].message.content))
    r = _ask(client, temperature=1.0, seed=5, n=3, response_format=fmt)  # sampled, each choice its own grammar
    values = [json.loads(ch.message.content) for ch in r.choices]
    assert all(_valid(v) for v in values) and all(ch.finish_reason == "stop" for ch in r.choices)
    chunks = [c for c in _ask(client, temperature=0, response_format=fmt, stream=True) if c.choices]
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) > 3 and _valid(json.loads("".join(pieces)))
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_json_object_mode(client):
    r = _ask(client, temperature=0, response_format={"type": "json_object"}, max_tokens=200)
    if r.choices[0].finish_reason == "stop":  # a random model may write one long string: then it is cut
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("fmt,message", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}},
     "the JSON schema is not usable: Invalid type: objekt"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs json_schema.schema"),
    ({"type": "yaml"}, "response_format type 'yaml': expected text, json_object or json_schema"),
])
def test_bad_formats_are_a_400(client, fmt, message):
    with pytest.raises(openai.BadRequestError, match=message) as e:
        _ask(client, response_format=fmt)
    assert e.value.body["param"] == "response_format"


def test_formats_with_tools_are_a_400(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError, match="held to a format or may call a tool"):
        _ask(client, response_format={"type": "json_object"}, tools=tools, max_tokens=8)
    assert _ask(client, response_format={"type": "json_object"}, tools=tools, tool_choice="none", max_tokens=4)


def test_vllm_guided_decoding_and_completions(client):
    """vLLM's guided_json / guided_regex / guided_choice (extra_body), in chat and in completions (where
    the reply ends with <|endoftext|>), and response_format in completions too."""
    r = _ask(client, temperature=1.0, seed=2, n=3, extra_body={"guided_regex": "[0-9]{3}-[0-9]{4}"})
    assert all(re.fullmatch("[0-9]{3}-[0-9]{4}", c.message.content) for c in r.choices)
    r = _ask(client, temperature=1.0, seed=2, n=4, extra_body={"guided_choice": ["sunny", "rain", "snow (heavy)"]})
    assert {c.message.content for c in r.choices} <= {"sunny", "rain", "snow (heavy)"}
    assert all(c.finish_reason == "stop" for c in r.choices)
    r = _ask(client, temperature=0, extra_body={"guided_json": json.dumps(SCHEMA)})
    assert _valid(json.loads(r.choices[0].message.content))
    for body in ({"guided_json": SCHEMA}, {"response_format": {"type": "json_schema",
                                                               "json_schema": {"name": "w", "schema": SCHEMA}}}):
        r = client.completions.create(model="tiny", prompt="The weather as JSON:", max_tokens=80, temperature=0,
                                      extra_body=body)
        assert r.choices[0].finish_reason == "stop" and _valid(json.loads(r.choices[0].text))
    r = client.completions.create(model="tiny", prompt=["a", "bb"], n=2, max_tokens=20, temperature=1.0, seed=1,
                                  extra_body={"guided_choice": ["yes", "no"]})
    assert len(r.choices) == 4 and {c.text for c in r.choices} <= {"yes", "no"}


@pytest.mark.parametrize("body,param,message", [
    ({"guided_regex": "((("}, "guided_regex", "the regular expression is not usable"),
    ({"guided_choice": []}, "guided_choice", "the choices must be a list of non-empty strings"),
    ({"guided_json": "{not json"}, "guided_json", "guided_json is not JSON"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex", "guided_regex, guided_choice: one at a time"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex",
     "guided_regex, response_format: one at a time"),
])
def test_bad_guides_are_a_400(client, body, param, message):
    with pytest.raises(openai.BadRequestError, match=re.escape(message)) as e:
        _ask(client, extra_body=body)
    assert e.value.body["param"] == param

WEATHER = {"name": "get_weather", "parameters": SCHEMA}
CLOCK = {"name": "get_time", "parameters": {"type": "object", "additionalProperties": False,
                                            "properties": {"24h": {"type": "boolean"}}, "required": ["24h"],
                                            "x-guidance": {"whitespace_flexible": False}}}
TOOLS = [{"type": "function", "function": f} for f in (WEATHER, CLOCK)]


@pytest.fixture(scope="module", params=["react", "hermes"])
def tool_client(request, model_tok, qwen2_tokenizer):
    """The tiny random model behind the v1 tokenizer (ReAct) and behind the Qwen2.5 one (<tool_call>)."""
    from helpers import running_server
    from qwenlm.serve import ServerOptions, create_app

    model, v1_tok = model_tok
    tok = v1_tok if request.param == "react" else qwen2_tokenizer
    app = create_app(model, tok, ServerOptions(served_model_name="tiny", max_model_len=1024, max_num_seqs=4))
    assert app.state.server.tool_format == request.param
    with running_server(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streaming"])
def test_a_forced_call_has_arguments_valid_for_the_tool(tool_client, stream):
    """tool_choice naming a tool, or "required" with several: the rest of the call is held to the tools'
    parameter schemas, so even a random model's call names a tool and has valid arguments."""
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS, max_tokens=100,
               temperature=1.0, seed=1)
    free = tool_client.chat.completions.create(**ask).choices[0]
    assert free.finish_reason != "tool_calls"  # the control: left alone, this model calls nothing
    for choice, n in (({"type": "function", "function": {"name": "get_weather"}}, 3), ("required", 4)):
        if stream:
            chunks = [c for c in tool_client.chat.completions.create(stream=True, tool_choice=choice, n=n, **ask)
                      if c.choices]
            calls = {}
            for c in chunks:
                for tc in c.choices[0].delta.tool_calls or []:
                    calls[c.choices[0].index] = tc.function
            calls = [calls[i] for i in range(n)]
        else:
            r = tool_client.chat.completions.create(tool_choice=choice, n=n, **ask)
            assert all(c.finish_reason == "tool_calls" for c in r.choices)
            calls = [c.message.tool_calls[0].function for c in r.choices]
        for call in calls:
            args = json.loads(call.arguments)
            if choice == "required":
                assert call.name in ("get_weather", "get_time")
            else:
                assert call.name == "get_weather"
            assert _valid(args) if call.name == "get_weather" else (set(args) == {"24h"} and type(args["24h"]) is bool)


@pytest.mark.parametrize("fmt,start", [("react", " "), ("hermes", "")])
def test_a_named_call_is_held_to_that_tools_parameters(model_tok, qwen2_tokenizer, fmt, start):
    from qwenlm.serve import ServerOptions
    from qwenlm.serve.app import Server

    model, v1_tok = model_tok
    tok = v1_tok if fmt == "react" else qwen2_tokenizer
    server = Server(model, tok, ServerOptions(max_model_len=256, max_num_seqs=1))
    (c,) = server._forced_arguments(fmt, ("get_time",), [WEATHER, CLOCK], 1)
    for t in tok.encode(start + '{"'):
        assert c.allowed()[t]
        c.advance(t)
    assert c.allowed()[tok.encode("24")[0]] and not c.allowed()[tok.encode("unit")[0]]
    (c,) = server._forced_arguments(fmt, (None,), [WEATHER, CLOCK], 1)  # "required": the model names one
    before = " get_time\nAction Input: " if fmt == "react" else 'get_time", "arguments": '
    for t in tok.encode(before + '{"'):
        assert c.allowed()[t], tok.decode([t])
        c.advance(t)
    assert c.allowed()[tok.encode("24")[0]] and not c.allowed()[tok.encode("unit")[0]]


def test_held_and_free_requests_in_one_batch_each_get_what_they_get_alone(client):
    """Rows held to a grammar and free rows decode together (the sampler masks only the held rows, by
    their place in the batch): every reply equals the same request served alone."""
    from concurrent.futures import ThreadPoolExecutor

    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}}
    asks = [dict(response_format=fmt), {}, dict(response_format={"type": "json_object"}, max_tokens=60),
            dict(response_format=fmt, temperature=1.0, seed=9), dict(max_tokens=30), dict(response_format=fmt)]
    asks = [{"temperature": 0, "max_tokens": 80, **a} for a in asks]
    prompts = [f"Weather report number {k}" for k in range(len(asks))]

    def run(k):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompts[k]}],
                                           **asks[k])
        return r.choices[0].message.content, r.choices[0].finish_reason

    alone = [run(k) for k in range(len(asks))]
    with ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(run, range(len(asks))))
    assert together == alone
    for (text, reason), a in zip(alone, asks):
        if a.get("response_format") == fmt:
            assert reason == "stop" and _valid(json.loads(text))


RF = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}}


def test_model_chat_and_chat_stream_take_response_format(model_tok):
    model, tok = model_tok
    free, _ = model.chat(tok, "Weather as JSON", history=None, do_sample=False, max_new_tokens=60)
    with pytest.raises(ValueError):
        json.loads(free)  # the control
    reply, history = model.chat(tok, "Weather as JSON", history=None, do_sample=False, max_new_tokens=60,
                                response_format=RF)
    assert _valid(json.loads(reply)) and history == [("Weather as JSON", reply)]
    *_, last = model.chat_stream(tok, "Weather as JSON", history=None, do_sample=True, seed=4, max_new_tokens=60,
                                 response_format=RF)
    assert _valid(json.loads(last))
    with pytest.raises(ValueError, match="expected text, json_object or json_schema"):
        model.chat(tok, "x", response_format={"type": "xml"})


def test_the_engine_and_the_reference_loop_agree_under_a_grammar(model_tok):
    """The reference loop (generation/generate.py) is the engine's oracle: held to the same grammar,
    the same greedy tokens, for rows of different lengths, one of them free."""
    from helpers import greedy_config
    from qwenlm.engine.engine import Engine
    from qwenlm.generation.generate import generate
    from qwenlm.generation.grammar import grammars_for

    model, tok = model_tok
    g = grammars_for(tok, model.config.vocab_size, tok.im_end_id)
    prompts = [tok.encode("Weather in Paris as JSON"), tok.encode("x")]
    cfg = greedy_config(40)
    want = generate(model, prompts, cfg, constraints=[g.json(SCHEMA), None])
    got = Engine(model).generate(prompts, cfg, constraints=[g.json(SCHEMA), None])
    assert got == want
    text = tok.decode([t for t in got[0] if t != tok.im_end_id])
    assert _valid(json.loads(text))


def test_qwen_generate_json_schema(tmp_path, v1_chat_dir):
    import subprocess
    import sys

    schema = tmp_path / "weather.json"
    schema.write_text(json.dumps(SCHEMA))
    r = subprocess.run([sys.executable, "-m", "qwenlm", "generate", "-m", v1_chat_dir, "--json-schema", str(schema),
                        "--greedy", "--max-new-tokens", "60", "Weather as JSON"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert _valid(json.loads(r.stdout))
    (tmp_path / "list.json").write_text("[1]")
    for path, message in ((tmp_path / "none.json", "No such file or directory"),
                          (tmp_path / "list.json", "a JSON schema is an object, not list")):
        r = subprocess.run([sys.executable, "-m", "qwenlm", "generate", "-m", "/no/such/model", "--json-schema",
                            str(path), "x"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_a_grammar_too_slow_to_prepare_is_a_400_and_stalls_nobody(client, monkeypatch):
    """A choice of one 100,000-character string takes seconds to build a lexer for: the request is
    refused after the time budget, and a request already streaming keeps streaming meanwhile (the
    grammar is prepared off the event loop and the engine, with the interpreter free)."""
    import threading
    import time

    from qwenlm.serve.app import Server

    monkeypatch.setattr(Server, "GRAMMAR_SECONDS", 0.3)
    gaps, done = [], threading.Event()

    def stream():
        last = time.perf_counter()
        for _ in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=200, stream=True, extra_body={"ignore_eos": True}):
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        done.set()

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.3)
    started = time.perf_counter()
    with pytest.raises(openai.BadRequestError, match="takes too long to prepare") as e:
        _ask(client, extra_body={"guided_choice": ["a" * 100_000]})
    assert time.perf_counter() - started < 3
    assert e.value.status_code == 400
    t.join(60)
    assert done.is_set() and max(gaps[1:]) < 1.0  # no step waited for the grammar
