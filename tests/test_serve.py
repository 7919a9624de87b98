"""`qwen serve` through the unmodified official `openai` client and raw HTTP: chat (plain,
streaming, n, usage, finish reasons), completions, the OpenAI error schema, limits, auth,
metrics, the chat page, client disconnects. A tiny random Qwen v1 chat model with the real
tokenizer; every generated text is checked against the reference generation loop."""

import concurrent.futures
import logging
import os
import re
import shutil
import time

import httpx
import openai
import pytest

from helpers import running_server, v1_config, v1_state_dict, write_checkpoint
from qwenlm import load
from qwenlm.generation import StopChecker, generate
from qwenlm.serve import ServerOptions, create_app
from qwenlm.serve.prompt import build_chat_prompt


def _expected(model_tok, ids, n, **kw):
    """Reference loop text for a greedy request (the model's own generation_config otherwise)."""
    model, tok = model_tok
    cfg = model.generation_config.update(do_sample=False, max_new_tokens=n, **kw)
    stop = StopChecker(cfg, [tok.im_end_id, tok.im_start_id, tok.eod_id], tok)
    out = generate(model, [ids], cfg, stop, vocab_limit=tok.id_limit)[0]
    finish = "stop" if stop.done(out) else "length"
    reply = out[:-1] if finish == "stop" else out
    return tok.decode(reply), finish, len(out)


MSGS = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "你好"}]


def test_models(client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    card = client.models.retrieve("tiny")
    assert card.id == "tiny" and card.object == "model" and card.model_dump()["max_model_len"] > 0
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("Qwen/Qwen-7B-Chat")  # (a name with a slash is one path parameter)
    assert e.value.body["code"] == "model_not_found" and "'tiny'" in e.value.body["message"]


def test_chat_equals_reference(client, model_tok):
    r = client.chat.completions.create(model="tiny", messages=MSGS, temperature=0, max_tokens=12)
    ids = build_chat_prompt(model_tok[1], MSGS, []).ids
    text, finish, n = _expected(model_tok, ids, 12)
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == n
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


@pytest.mark.parametrize("ahead", ["0", "1"], ids=["plain", "ahead"])
def test_long_prompts_are_read_in_chunks_between_the_steps_of_other_streams(model_tok, ahead, monkeypatch):
    """`prefill_chunk`: a long prompt is read a chunk per engine step while another request streams;
    both replies are still the reference's. Also with the decode steps run one ahead (the GPU's
    default, QWENLM_PIPELINE=1 here)."""
    model, tok = model_tok
    monkeypatch.setenv("QWENLM_PIPELINE", ahead)
    app = create_app(model, tok, ServerOptions(served_model_name="tiny", max_model_len=256, max_num_seqs=2,
                                               prefill_chunk=8))
    engine = app.state.server.engine
    assert engine.prefill_chunk == 8 and engine.pipeline == (ahead == "1")
    long = [MSGS[0], {"role": "user", "content": "请把下面的话翻译成英文：" + "今天天气很好，我们去公园散步吧。" * 6}]
    with running_server(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            jobs = [pool.submit(c.chat.completions.create, model="tiny", messages=m, temperature=0, max_tokens=24)
                    for m in (MSGS, long)]
            replies = [j.result().choices[0].message.content for j in jobs]
    for msgs, reply in zip((MSGS, long), replies):
        ids = build_chat_prompt(tok, msgs, []).ids
        assert reply == _expected(model_tok, ids, 24)[0]
    lengths = [len(build_chat_prompt(tok, m, []).ids) for m in (MSGS, long)]
    assert lengths[1] > 64 and engine.stats["prompt_chunks"] == sum(-(-n // 8) for n in lengths)
    assert (engine.stats["steps_ahead"] > 0) == (ahead == "1")


def _two_turns(url: str):
    """A conversation's first turn (greedy, 8 tokens) and its next (12): (first, turn 2's messages, reply)."""
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    first = c.chat.completions.create(model="tiny", messages=MSGS, temperature=0, max_tokens=8)
    turn2 = MSGS + [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "再说一遍"}]
    return first, turn2, c.chat.completions.create(model="tiny", messages=turn2, temperature=0, max_tokens=12)


@pytest.mark.parametrize("ahead", ["0", "1"], ids=["plain", "ahead"])
def test_a_conversations_next_turn_reuses_its_parked_row(model_tok, ahead, monkeypatch):
    """The prefix cache through the API: turn 2 of a conversation (turn 1's messages, its reply and a
    new message) reads only what follows the part it shares with turn 1's tokens; the reply is the
    reference's; /metrics counts the reused tokens. Also with the decode steps run one ahead."""
    model, tok = model_tok
    monkeypatch.setenv("QWENLM_PIPELINE", ahead)
    app = create_app(model, tok, ServerOptions(served_model_name="tiny", max_model_len=256, max_num_seqs=2))
    engine = app.state.server.engine
    assert engine.prefix_cache and engine.pipeline == (ahead == "1")  # (the CPU defaults: on, off)
    engine.prefix_min = 8
    with running_server(app) as url:
        first, turn2, reply = _two_turns(url)
        metrics = httpx.get(url + "/metrics").text
    ids1 = build_chat_prompt(tok, MSGS, []).ids
    ids2 = build_chat_prompt(tok, turn2, []).ids
    assert reply.choices[0].message.content == _expected(model_tok, ids2, 12)[0]
    # turn 1's prompt at least (this random model's reply text seldom encodes back to its tokens)
    shared = next((i for i, (a, b) in enumerate(zip(ids1, ids2)) if a != b), len(ids1))
    assert shared == len(ids1) and engine.stats["prompt_tokens_reused"] >= shared
    assert f"qwenlm_prompt_tokens_reused {float(engine.stats['prompt_tokens_reused'])}" in metrics
    # and in the usage, as OpenAI reports its prompt caching
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert reply.usage.prompt_tokens_details.cached_tokens == engine.stats["prompt_tokens_reused"]


def test_status_lines_add_up_to_what_the_requests_used(model_tok, caplog):
    """The status lines (`qwen serve --status-every`) count, between them, every prompt token read or
    taken from the prefix cache and every token generated, as the responses' usage reports them; an
    idle server writes none."""
    model, tok = model_tok
    app = create_app(model, tok, ServerOptions(served_model_name="tiny", max_model_len=256, max_num_seqs=2,
                                               status_every=0.1))
    app.state.server.engine.prefix_min = 8
    line = re.compile(r"running (\d+) · waiting (\d+) · finished (\d+) · prompt tokens (\d+) \([\d.]+/s"
                      r"(?:; (\d+) more from the prefix cache)?\) · generated tokens (\d+) \([\d.]+/s\)")
    caplog.set_level(logging.INFO, logger="qwenlm.serve.status")
    with running_server(app) as url:
        first, turn2, reply = _two_turns(url)
        time.sleep(0.5)  # the last busy interval's line
        lines = [r.getMessage() for r in caplog.records if r.name == "qwenlm.serve.status"]
        time.sleep(0.5)
        assert len([r for r in caplog.records if r.name == "qwenlm.serve.status"]) == len(lines)  # idle: quiet
    got = [line.fullmatch(x) for x in lines]
    assert lines and all(got), lines
    total = lambda k: sum(int(m[k] or 0) for m in got)  # noqa: E731
    assert total(3) == 2  # requests finished
    assert total(5) == reply.usage.prompt_tokens_details.cached_tokens > 0
    assert total(4) + total(5) == first.usage.prompt_tokens + reply.usage.prompt_tokens
    assert total(6) == first.usage.completion_tokens + reply.usage.completion_tokens
    assert got[-1][1] == "0" and got[-1][2] == "0"


def test_cached_tokens_count_each_prompt_once(model_tok):
    """Two choices of one prompt: the second copies the first's slots, which the request read itself
    (none cached). Asked again: each choice takes one of the two parked rows, and the usage counts
    the prompt's cached tokens once (as its prompt_tokens do)."""
    model, tok = model_tok
    app = create_app(model, tok, ServerOptions(served_model_name="tiny", max_model_len=256, max_num_seqs=2))
    app.state.server.engine.prefix_min = 8
    with running_server(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        kw = dict(model="tiny", messages=MSGS, temperature=0.7, max_tokens=4, n=2)
        assert c.chat.completions.create(**kw).usage.prompt_tokens_details.cached_tokens == 0
        again = c.chat.completions.create(**kw).usage
    n = len(build_chat_prompt(tok, MSGS, []).ids)
    assert again.prompt_tokens == n and again.prompt_tokens_details.cached_tokens == n - 1
    assert app.state.server.engine.stats["prompt_tokens_reused"] == (n - 1) + 2 * (n - 1)


def test_stream_equals_non_stream(client):
    kw = dict(model="tiny", messages=MSGS, temperature=0, max_tokens=16)
    full = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_sampling_is_seeded_and_n_choices_differ(client):
    kw = dict(model="tiny", messages=MSGS, temperature=1.0, top_p=0.95, max_tokens=10, seed=7, n=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    ta = [c.message.content for c in a.choices]
    assert ta == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and len(set(ta)) > 1


def test_stop_string_is_cut(client, model_tok):
    full = client.chat.completions.create(model="tiny", messages=MSGS, temperature=0, max_tokens=16)
    text = full.choices[0].message.content
    stop = text[4:7]
    r = client.chat.completions.create(model="tiny", messages=MSGS, temperature=0, max_tokens=16, stop=[stop])
    assert r.choices[0].message.content == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"
    s = client.chat.completions.create(model="tiny", messages=MSGS, temperature=0, max_tokens=16, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in s) == text[:text.find(stop)]


def test_completions(client, model_tok):
    model, tok = model_tok
    r = client.completions.create(model="tiny", prompt="def fib(n):", max_tokens=8, temperature=0,
                                  extra_body={"repetition_penalty": 1.0})
    ids = tok.encode("def fib(n):")
    cfg = model.generation_config.update(do_sample=False, max_new_tokens=8, repetition_penalty=1.0)
    out = generate(model, [ids], cfg, StopChecker(cfg, [tok.eod_id]), vocab_limit=tok.id_limit)[0]
    assert r.choices[0].text == tok.decode([t for t in out if t != tok.eod_id])
    e = client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0, echo=True)
    assert e.choices[0].text.startswith("def fib(n):")
    two = client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=3, temperature=0)
    assert [c.index for c in two.choices] == [0, 1]
    chunks = list(client.completions.create(model="tiny", prompt="def fib(n):", max_tokens=8, temperature=0,
                                            stream=True, extra_body={"repetition_penalty": 1.0}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


def test_errors_follow_the_openai_schema(client, server, model_tok):
    long = [{"role": "user", "content": "x " * 400}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=long)
    msg = e.value.body["message"]
    n = len(build_chat_prompt(model_tok[1], long, []).ids)
    assert "context length is 256 tokens" in msg and f"prompt has {n} tokens" in msg  # both lengths
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="max_tokens is 1000"):
        client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=MSGS, temperature=5)
    with pytest.raises(openai.BadRequestError, match="at least one user"):
        client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "x"}])
    r = httpx.post(server + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["message"].startswith("the request body is not valid JSON (at character 1")
    r = httpx.post(server + "/v1/chat/completions", json=[1, 2])
    assert r.status_code == 400 and r.json()["error"]["message"] == "the request body must be a JSON object"
    r = httpx.get(server + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.post(server + "/v1/completions", content=b"x" * (9 * 1024 * 1024))
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.post(server + "/v1/completions", json={"prompt": [999999999], "max_tokens": 2})
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]


def test_health_metrics_and_page(server, client):
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    client.chat.completions.create(model="tiny", messages=MSGS, temperature=0, max_tokens=2)
    m = httpx.get(server + "/metrics").text
    assert "qwenlm_generation_tokens_total" in m and "qwenlm_queue_length" in m
    assert 'qwenlm_requests_total{route="/v1/chat/completions",status="200"}' in m
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "qwenlm chat" in page.text and "tiny" in page.text


def test_api_key(model_tok):
    model, tok = model_tok
    app = create_app(model, tok, ServerOptions(served_model_name="tiny", api_key="s3cret", max_model_len=64,
                                               max_num_seqs=1))
    with running_server(app) as url:
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/").status_code == 200  # the page itself holds nothing; it asks for the key
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(url + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2).choices


def test_queue_full_is_429_and_disconnect_frees_the_slot(model_tok):
    model, tok = model_tok
    app = create_app(model, tok, ServerOptions(served_model_name="tiny", max_model_len=4096, max_num_seqs=1,
                                               max_queue=1))
    eng = app.state.server.engine
    body = {"messages": MSGS, "max_tokens": 3000, "temperature": 0, "stream": True, "ignore_eos": True}
    with running_server(app) as url:
        with httpx.Client(timeout=30) as c1, httpx.Client(timeout=30) as c2:
            with c1.stream("POST", url + "/v1/chat/completions", json=body) as s1:
                lines = s1.iter_lines()  # keep a reference: a dropped iterator closes the connection
                next(lines)  # running
                with c2.stream("POST", url + "/v1/chat/completions", json=body) as s2:
                    deadline = time.time() + 10
                    while eng.queue_length < 1 and time.time() < deadline:
                        time.sleep(0.02)
                    assert eng.queue_length == 1 and eng.running == 1
                    r = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
                    assert r.status_code == 429 and r.headers["retry-after"] == "1"
                    assert r.json()["error"]["type"] == "rate_limit_error"
                    s2.close()
                s1.close()  # both clients go away mid-generation
        deadline = time.time() + 15
        while (eng.running or eng.queue_length) and time.time() < deadline:
            time.sleep(0.05)
        assert eng.running == 0 and eng.queue_length == 0
        assert eng.stats["finished_abort"] >= 1
        assert httpx.get(url + "/health").status_code == 200



def test_a_client_gone_before_its_whole_reply_frees_the_slot(model_tok):
    """Non-streaming: the reply is not sent until the end, so only the watch on the connection can see
    the client go; its sequence must be aborted then, not run to its token budget."""
    model, tok = model_tok
    app = create_app(model, tok, ServerOptions(served_model_name="tiny", max_model_len=4096, max_num_seqs=1))
    eng = app.state.server.engine
    body = {"messages": MSGS, "max_tokens": 4000, "temperature": 0, "ignore_eos": True}
    with running_server(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=1.0))
        deadline = time.time() + 15
        while eng.running and time.time() < deadline:
            time.sleep(0.05)
        assert eng.running == 0 and eng.stats["finished_abort"] == 1
        assert eng.stats["finished_length"] == 0
        r = httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_a_model_smaller_than_its_tokenizer_refuses_ids_it_cannot_embed(tmp_path, v1_tokenizer_dir):
    """A checkpoint whose vocabulary is smaller than its tokenizer's (a mismatched tokenizer): ids the
    model has no embedding for are a 400 naming the id, for raw ids and for chat prompts (whose
    special tokens are beyond it), and the server keeps serving."""
    d = str(tmp_path / "small_vocab")
    cfg = v1_config(vocab=1000, hidden=32, layers=1, heads=2, mlp=48)
    write_checkpoint(d, cfg, v1_state_dict(cfg, seed=1), {"chat_format": "chatml", "eos_token_id": 151643})
    shutil.copy(os.path.join(v1_tokenizer_dir, "qwen.tiktoken"), d)
    model, tok = load(d, dtype="float32", device="cpu")
    app = create_app(model, tok, ServerOptions(served_model_name="tiny", max_model_len=128))
    with running_server(app) as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": [5, 1000], "max_tokens": 2})
        assert r.status_code == 400 and "token id 1000 is outside the vocabulary (0..999)" in r.text
        r = httpx.post(url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 2}, timeout=60)
        assert r.status_code == 400, r.text
        assert "outside this model's vocabulary (0..999)" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={"prompt": [5, 999, 7], "max_tokens": 2,
                                                      "ignore_eos": True}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2

def test_int8_kv_cache_server(v1_chat_dir):
    """`--kv-cache int8`: the engine keeps 8-bit slots (and says so in /metrics), and a greedy reply
    equals the reference loop's, whose cache then holds the same quantized values."""
    model, tok = load(v1_chat_dir, dtype="float32", device="cpu", kv_cache="int8")
    app = create_app(model, tok, ServerOptions(served_model_name="tiny", max_model_len=128, max_num_seqs=2))
    eng = app.state.server.engine
    c = model.config
    # 2 slots x 128 positions of keys and values: one byte per element plus fp16 scale and low per head;
    # and one fp32 key center per slot, layer and head
    assert eng.kv.int8 and eng.kv_bytes == (2 * c.num_layers * c.num_kv_heads * (c.head_dim + 4) * 2 * 128
                                            + c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4)
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=MSGS, temperature=0, max_tokens=12)
        assert f"qwenlm_kv_cache_bytes {float(eng.kv_bytes)}" in httpx.get(url + "/metrics").text
    ids = build_chat_prompt(tok, MSGS, []).ids
    assert model.new_cache().int8
    text, finish, _ = _expected((model, tok), ids, 12)
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == finish


# ---- what the streams write: chunk patterns and several tokens per write ----------------------------

AWKWARD = ['plain', '', 'a "quoted" {braced} {0} %s \\ back\\slash', 'new\nline\ttab\r', '\x00\x1f ctrl',
           '你好 🙂', '</script>', 'data: [DONE]\n\n']


@pytest.mark.parametrize("name", ["tiny", 'we{ir}d "name" \\ {0}'])
def test_chunk_patterns_write_what_json_dumps_writes(name):
    """Streams fill a pattern per token instead of encoding each chunk; the events must be what
    encoding the whole chunk gives, for any text, finish reason and model name (braces included,
    which str.format would otherwise take as fields)."""
    import json

    from qwenlm.serve.jobs import INDEX, REASON, TEXT, json_str, reason_json, sse, sse_format

    def obj(i, text, reason):
        return {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": name,
                "choices": [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}]}

    fmt = sse_format(obj(INDEX, TEXT, REASON))
    for i, text in enumerate(AWKWARD):
        for reason in (None, "stop", "length"):
            got = fmt.format(i, json_str(text), reason_json(reason))
            assert got == sse(obj(i, text, reason))
            assert got.startswith("data: ") and got.endswith("\n\n")
            assert json.loads(got[6:]) == obj(i, text, reason)


def test_chat_stream_with_an_awkward_model_name(model_tok):
    model, tok = model_tok
    name = 'qw{en} "7B" \\ {1}'
    app = create_app(model, tok, ServerOptions(served_model_name=name, max_model_len=256, max_num_seqs=2))
    with running_server(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        kw = dict(model=name, messages=MSGS, temperature=0, max_tokens=12, n=2)
        full = c.chat.completions.create(**kw)
        chunks = list(c.chat.completions.create(stream=True, **kw))
        assert {ch.model for ch in chunks} == {name}
        for i in range(2):
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices[0].index == i)
            assert text == full.choices[i].message.content
        p = c.completions.create(model=name, prompt=[5, 6, 7], max_tokens=6, temperature=0, stream=True)
        assert {ch.model for ch in p} == {name}


def test_batches_hand_over_everything_that_has_arrived(model_tok):
    """A server that falls behind the engine finds several tokens queued: they come out as one batch
    (one write), in order; an engine error after a token still hands that token over first, then
    raises; the end of every choice ends the batches."""
    import asyncio

    from qwenlm.serve.http import APIError
    from qwenlm.serve.jobs import Job

    model, tok = model_tok
    server = create_app(model, tok, ServerOptions(max_model_len=64)).state.server
    cfg = model.generation_config.update(do_sample=False, max_new_tokens=4)

    class Request:
        async def is_disconnected(self):
            return False

    async def run(items):
        job = Job(server, [[1, 2, 3]] * 2, [cfg, cfg], [], Request())
        for it in items:
            job.queue.put_nowait(it)
        got = []
        try:
            async for batch in job.batches():
                got.append(batch)
                if len(got) == 1:  # more arrives while the first batch is being written
                    job.queue.put_nowait((1, 9, "length"))
        except APIError as e:
            got.append(e.status)
        return got, job

    got, job = asyncio.run(run([(0, 5, None), (1, 6, None), (0, 7, "stop")]))
    assert got == [[(0, 5, None), (1, 6, None), (0, 7, "stop")], [(1, 9, "length")]]
    assert job.first_token_at is not None
    got, _ = asyncio.run(run([(0, 5, None), (0, None, "error"), (1, 6, None)]))
    assert got == [[(0, 5, None)], 500]


def test_logit_bias(client, model_tok):
    """+100 makes a token the only choice (greedy and sampled, each row its own bias); -100 bans the
    token greedy decoding picks otherwise. The library's chat takes the same setting."""
    model, tok = model_tok
    x = tok.encode(" hello")[0]
    for extra in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=4,
                                      logit_bias={str(x): 100}, **extra)
        assert r.choices[0].text == tok.decode([x] * 4) and r.usage.completion_tokens == 4
    free = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=1, temperature=0)
    first = tok.encode(free.choices[0].text)[0]
    banned = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=1, temperature=0,
                                       logit_bias={str(first): -100})
    assert banned.choices[0].text != free.choices[0].text
    reply, _ = model.chat(tok, "hi", do_sample=False, max_new_tokens=3, logit_bias={x: 100})
    assert reply == tok.decode([x] * 3).strip()


@pytest.mark.parametrize("extra,param", [
    ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"999999999": 1}}, "logit_bias"),
    ({"response_format": {"type": "yaml"}}, "response_format"), ({"best_of": 3}, "best_of"),
])
def test_unsupported_or_bad_settings_are_a_400(server, extra, param):
    r = httpx.post(server + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_the_server_warms_its_engine_up_on_a_gpu_or_when_asked(model_tok, monkeypatch):
    """ServerOptions.warm_up: None warms up on a GPU only (here: not), True anywhere, before the
    engine's loop starts; `qwen serve --no-warm-up` passes False."""
    from qwenlm.commands.serve import add_parser
    from qwenlm.engine.batch import BatchEngine
    from qwenlm.serve.app import Server, ServerOptions

    model, tok = model_tok
    calls = []
    real = BatchEngine.warm_up
    monkeypatch.setattr(BatchEngine, "warm_up", lambda self: (calls.append(self), real(self))[1])
    assert Server(model, tok, ServerOptions(max_model_len=64, max_num_seqs=2)).warm_up_seconds is None
    assert calls == []
    server = Server(model, tok, ServerOptions(max_model_len=64, max_num_seqs=2, warm_up=True))
    assert calls == [server.engine] and server.warm_up_seconds >= 0 and server.engine.idle
    import argparse

    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    assert sub.choices["serve"].parse_args(["--no-warm-up"]).warm_up is False
    assert sub.choices["serve"].parse_args([]).warm_up is None
