"""The original chat API: quickstart with only the import changed, history handling, stop
words, raw-format error, history trimming; sampling semantics against transformers."""

import pytest
import torch

from qwenlm import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from qwenlm.generation.generate import StopChecker, split_on_stop
from qwenlm.generation.sampling import apply_repetition_penalty, top_k_filter, top_p_filter
from qwenlm.tokenizer import make_context


@pytest.fixture(scope="module")
def v1_chat(v1_chat_dir):
    tok = AutoTokenizer.from_pretrained(v1_chat_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(v1_chat_dir, device_map="auto", trust_remote_code=True).eval()
    return model, tok


def test_quickstart_on_a_qwen_v1_checkpoint(v1_chat):
    model, tokenizer = v1_chat
    response, history = model.chat(tokenizer, "你好", history=None, max_new_tokens=8)
    assert isinstance(response, str) and history == [("你好", response)]
    response2, history2 = model.chat(tokenizer, "给我讲一个故事", history=history, max_new_tokens=8)
    assert history2 == [("你好", response), ("给我讲一个故事", response2)]
    assert history == [("你好", response)]  # the caller's history is not modified


def test_next_turn_reads_only_what_is_new_on_a_cpu(v1_chat):
    """On a CPU the model's engine keeps the last conversation's cache: the next turn reads its new
    message (and the end of the last reply), not the whole conversation again; the reply is the one a
    fresh read gives."""
    from qwenlm.engine import get_engine

    model, tok = v1_chat
    eng = get_engine(model)
    assert eng.reuse_prefix  # (the test machine is a CPU)
    reads = []
    prefill = eng._prefill
    eng._prefill = lambda st: reads.append((st["w"], st["w"] - st["keep"])) or prefill(st)
    try:
        kw = dict(do_sample=False, max_new_tokens=12)
        eng.release()
        _, history = model.chat(tok, "你好", history=None, **kw)
        reply, _ = model.chat(tok, "给我讲一个故事", history=history, **kw)
        eng.release()  # nothing kept: read whole
        assert model.chat(tok, "给我讲一个故事", history=history, **kw)[0] == reply
    finally:
        del eng._prefill
    (w1, _), (w2, new2), (w3, new3) = reads
    assert w2 == w3 and new3 == w3  # the same prompt, read whole the second time
    # the first turn's prompt is kept; its reply too where the reply's text encodes to the same tokens
    # (this random model's replies seldom do: test_default_model.py has a real one)
    assert w2 - new2 >= w1


def test_chat_equals_chat_stream(v1_chat):
    model, tok = v1_chat
    kw = dict(do_sample=False, max_new_tokens=10)
    response, _ = model.chat(tok, "Hello", history=[("a", "b")], **kw)
    streamed = list(model.chat_stream(tok, "Hello", history=[("a", "b")], **kw))
    assert streamed[-1].strip() == response
    assert all(b.startswith(a) for a, b in zip(streamed, streamed[1:]))  # cumulative, like the original
    sampled = model.chat(tok, "Hello", seed=5, max_new_tokens=10)[0]
    assert model.chat(tok, "Hello", seed=5, max_new_tokens=10)[0] == sampled


def test_generation_kwargs_override_per_call(v1_chat):
    model, tok = v1_chat
    before = model.generation_config.to_dict()
    response, _ = model.chat(tok, "Hi", max_new_tokens=2, do_sample=False, repetition_penalty=1.0)
    assert len(tok.encode(response)) <= 3
    assert model.generation_config.to_dict() == before
    with pytest.raises(ValueError, match="unknown generation option"):
        model.chat(tok, "Hi", max_new_tokenz=2)
    with pytest.raises(ValueError, match="top_p"):
        model.chat(tok, "Hi", top_p=0)


def test_stop_words_ids_list_is_not_mutated(v1_chat):
    model, tok = v1_chat
    stops = [[tok.encode("Observation:")[0]]]
    model.chat(tok, "Hi", stop_words_ids=stops, max_new_tokens=2)
    assert stops == [[tok.encode("Observation:")[0]]]


def test_raw_format_refuses_chat(v1_chat):
    model, tok = v1_chat
    raw = model.generation_config.update(chat_format="raw")
    with pytest.raises(ValueError, match="pretrained \\(base\\) model"):
        model.chat(tok, "Hi", generation_config=raw)


def test_history_trimming_newest_first(v1_tokenizer):
    """A history turn is kept while len(system) + len(kept turns) < max_window_size (the query
    is not counted); the first turn that does not fit is dropped with everything older."""
    tok = v1_tokenizer
    history = [("first question " * 20, "first answer " * 20), ("second", "answer two"), ("third", "three")]
    ctx = {k: make_context(tok, "now?", history=history[3 - k:], system="sys")[1] for k in range(4)}
    system_len = len([tok.im_start_id] + tok.encode("system") + tok.encode("\n") + tok.encode("sys")
                     + [tok.im_end_id])
    hist_len = {k: len(ctx[k]) - len(ctx[0]) for k in range(4)}
    assert hist_len[3] > hist_len[2] > hist_len[1] > 0
    for k in (1, 2, 3):
        fits = system_len + hist_len[k] + 1
        assert make_context(tok, "now?", history=history, system="sys", max_window_size=fits)[1] == ctx[k]
        assert make_context(tok, "now?", history=history, system="sys", max_window_size=fits - 1)[1] == ctx[k - 1]
    # an older turn that would fit is still dropped once a newer one did not (the original's rule)
    hist = [("a", "b"), ("long " * 50, "x"), ("c", "d")]
    _, got = make_context(tok, "q", history=hist, system="", max_window_size=40)
    assert got == make_context(tok, "q", history=hist[2:], system="")[1]


def test_max_window_size_kwarg_reaches_chat(v1_chat, monkeypatch):
    model, tok = v1_chat
    seen = {}
    import qwenlm.generation.api as chat_mod

    real = chat_mod.make_context

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(chat_mod, "make_context", spy)
    model.chat(tok, "Hi", history=[("a", "b")], max_window_size=77, max_new_tokens=1)
    assert seen["max_window_size"] == 77


def test_sampling_matches_transformers_processors():
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    ids = torch.randint(0, 50, (3, 7), generator=g)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    ref = transformers.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), ref)
    ref = transformers.TopKLogitsWarper(5)(ids, logits.clone())
    assert torch.equal(top_k_filter(logits, 5), ref)
    for p in (0.1, 0.5, 0.8, 0.95):
        ref = transformers.TopPLogitsWarper(p)(ids, logits.clone())
        assert torch.equal(top_p_filter(logits, p), ref)


def test_stop_checker_and_stop_strings(v1_tokenizer):
    cfg = GenerationConfig(eos_token_id=[7], stop_words_ids=[[1, 2, 3]], stop=["Observation:"])
    chk = StopChecker(cfg, [9], v1_tokenizer)
    assert chk.done([5, 7]) and chk.done([9]) and chk.done([0, 1, 2, 3])
    assert not chk.done([1, 2]) and not chk.done([3, 2, 1])
    ids = v1_tokenizer.encode("Thought: x\nObservation: y")
    done_at = next(i for i in range(1, len(ids) + 1) if chk.done(ids[:i]))
    assert "Observation:" in v1_tokenizer.decode(ids[:done_at])
    assert "Observation:" not in v1_tokenizer.decode(ids[:done_at - 1])
    # streaming: text that may start a stop string is held back, the stop string never shown
    assert split_on_stop("hello Obs", ["Observation:"]) == ("Obs", "hello ", False)
    assert split_on_stop("hello Observation: z", ["Observation:"]) == ("", "hello ", True)
    assert split_on_stop("hello O", ["Observation:"], final=True) == ("", "hello O", False)


def test_sampling_survives_overflowing_settings():
    # a repetition penalty near 0 divides the seen tokens' logits into +inf; sampling must still
    # return a token (the overflowing ones), not fail on a NaN distribution
    from qwenlm.generation.sampling import next_tokens

    logits = torch.tensor([[2.0, 1.0, 3.0, -1.0]])
    seen = torch.tensor([[True, False, False, False]])
    cfg = GenerationConfig(do_sample=True, temperature=1.0, top_p=0.9, top_k=0, repetition_penalty=1e-300, seed=1)
    g = torch.Generator().manual_seed(0)
    assert next_tokens(logits, seen, cfg, g).tolist() == [0]
    cfg = cfg.update(repetition_penalty=1.0, temperature=1e-38)
    assert next_tokens(logits, seen, cfg, g).tolist() == [2]
