"""`logprobs` through the unmodified official `openai` client: chat (`logprobs`, `top_logprobs`,
streaming too) and completions (`logprobs: k`, `echo`, and `max_tokens: 0` with echo, which is how
evaluation harnesses score a text), on conftest's tiny v1 chat model and server. Every value against
log-softmax of the reference forward's logits over the tokenizer's vocabulary; every token's text and
bytes against the tokenizer."""

import httpx
import pytest
import torch

from qwenlm.generation import StopChecker, generate
from qwenlm.serve.prompt import build_chat_prompt


def reference(model_tok, ids: list[int]) -> torch.Tensor:
    """Row j: log-probabilities of token j + 1, over the tokens the tokenizer has."""
    model, tok = model_tok
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :, :tok.id_limit].float()
    return torch.log_softmax(logits, -1)


def reference_reply(model_tok, ids, n, stops):
    model, tok = model_tok
    cfg = model.generation_config.update(do_sample=False, max_new_tokens=n)
    stop = StopChecker(cfg, stops, tok)
    out = generate(model, [ids], cfg, stop, vocab_limit=tok.id_limit)[0]
    return out, [t for t in out if t not in stop.ids]


MSGS = [{"role": "user", "content": "Name three colours."}]


def _check_chat_content(model_tok, content, ids, shown, k):
    tok = model_tok[1]
    ref = reference(model_tok, ids + shown)
    assert len(content) == len(shown) > 0
    for j, (c, t) in enumerate(zip(content, shown)):
        row = ref[len(ids) - 1 + j]
        assert bytes(c.bytes) == tok.decode_bytes(t)
        assert c.token == tok.decode_bytes(t).decode("utf-8", errors="replace")
        assert c.logprob == pytest.approx(row[t].item(), abs=2e-4)
        want = row.topk(k)
        assert [bytes(x.bytes) for x in c.top_logprobs] == [tok.decode_bytes(i) for i in want.indices.tolist()]
        assert [x.logprob for x in c.top_logprobs] == pytest.approx(want.values.tolist(), abs=2e-4)


def test_chat_logprobs_stream_and_not(client, model_tok):
    tok = model_tok[1]
    ids = build_chat_prompt(tok, MSGS, []).ids
    _, shown = reference_reply(model_tok, ids, 10, [tok.im_end_id, tok.im_start_id, tok.eod_id])
    r = client.chat.completions.create(model="tiny", messages=MSGS, temperature=0, max_tokens=10, logprobs=True,
                                       top_logprobs=3)
    _check_chat_content(model_tok, r.choices[0].logprobs.content, ids, shown, 3)
    assert r.choices[0].message.content == tok.decode(shown)
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, temperature=0, max_tokens=10,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [(c.token, c.logprob, [x.token for x in c.top_logprobs]) for c in streamed] == \
        [(c.token, c.logprob, [x.token for x in c.top_logprobs]) for c in r.choices[0].logprobs.content]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content
    plain = client.chat.completions.create(model="tiny", messages=MSGS, temperature=0, max_tokens=10)
    assert plain.choices[0].logprobs is None
    none_top = client.chat.completions.create(model="tiny", messages=MSGS, temperature=0, max_tokens=4,
                                              logprobs=True)
    assert all(c.top_logprobs == [] for c in none_top.choices[0].logprobs.content)


def test_completions_echo_scores_a_text_with_max_tokens_0(client, model_tok):
    """What lm-evaluation-harness's `local-completions` sends to score a continuation: the prompt's
    tokens, each one's log-probability (none for the first) and the likeliest token in its place."""
    tok = model_tok[1]
    text = "def add(a, b):\n    return a + b\n"
    ids = tok.encode(text)
    ref = reference(model_tok, ids)
    for prompt in (text, ids):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                      temperature=0)
        c = r.choices[0]
        assert c.text == text and c.finish_reason == "length" and r.usage.completion_tokens == 0
        lp = c.logprobs
        assert lp.tokens == [tok.decode([t]) for t in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx(ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist(),
                                                      abs=2e-4)
        assert [list(d) for d in lp.top_logprobs[1:]] == [[tok.decode([i])] for i in ref[:-1].argmax(-1).tolist()]
        assert [text[o:o + len(t)] for o, t in zip(lp.text_offset, lp.tokens)] == lp.tokens
    # offsets count characters, not bytes: a text with Chinese (a token may hold part of a character)
    text = "print('你好，世界')  # 问候\n"
    lp = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=0).choices[0].logprobs
    whole = [(o, t) for o, t in zip(lp.text_offset, lp.tokens) if "\ufffd" not in t]
    assert len(whole) >= 8 and any(ord(ch) > 127 for _, t in whole for ch in t)
    assert [text[o:o + len(t)] for o, t in whole] == [t for _, t in whole]
    # max_tokens 0 without echo: nothing at all
    r = client.completions.create(model="tiny", prompt=text, max_tokens=0, temperature=0)
    assert r.choices[0].text == "" and r.usage.completion_tokens == 0 and r.choices[0].logprobs is None


def test_completions_logprobs_of_generated_tokens_stream_and_not(client, model_tok):
    tok = model_tok[1]
    text = "The capital of France is"
    ids = tok.encode(text)
    out, shown = reference_reply(model_tok, ids, 6, [tok.eod_id])
    ref = reference(model_tok, ids + out)
    r = client.completions.create(model="tiny", prompt=text, max_tokens=6, temperature=0, logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    n = len(ids)
    assert lp.tokens == [tok.decode([t]) for t in ids + shown]
    assert lp.token_logprobs[n:] == pytest.approx([ref[n - 1 + j, t].item() for j, t in enumerate(shown)], abs=2e-4)
    assert [len(d) for d in lp.top_logprobs[1:]] == [2] * (len(ids) + len(shown) - 1)
    assert lp.text_offset[n] == len(text)  # the reply's tokens count on from the echoed prompt
    assert lp.text_offset == sorted(lp.text_offset)
    chunks = list(client.completions.create(model="tiny", prompt=text, max_tokens=6, temperature=0, logprobs=2,
                                            echo=True, stream=True))
    parts = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].logprobs]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for p in parts for x in getattr(p, key)] == getattr(lp, key), key
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    zero = list(client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=0,
                                          stream=True))
    got = [ch.choices[0] for ch in zero if ch.choices]
    assert "".join(c.text for c in got) == text and got[-1].finish_reason == "length"
    assert [x for c in got if c.logprobs for x in c.logprobs.token_logprobs] == lp.token_logprobs[:n]


@pytest.mark.parametrize("path,body,param", [
    ("chat/completions", {"messages": MSGS, "top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"messages": MSGS, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
])
def test_bad_logprob_settings_are_a_400(server, path, body, param):
    r = httpx.post(f"{server}/v1/{path}", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_the_stop_token_is_not_among_the_logprobs(client, model_tok):
    """A reply that ends on its stop token (forced here with logit_bias) lists no entry for it: it is
    not part of the text."""
    tok = model_tok[1]
    bias = {str(tok.im_end_id): 100}
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, logprobs=True, logit_bias=bias)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
    assert r.choices[0].message.content == "" and r.choices[0].logprobs.content == []
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, logprobs=True,
                                                 logit_bias=bias, stream=True))
    assert not [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    c = client.completions.create(model="tiny", prompt="x = 1", max_tokens=5, logprobs=1,
                                  logit_bias={str(tok.eod_id): 100}).choices[0]
    assert c.finish_reason == "stop" and c.text == "" and c.logprobs.tokens == []
