"""The engine against the reference loop: identical tokens on tiny fp32 models (greedy and
sampled, batched with left padding, NTK/LogN active, run-ahead syncing), and the KV cache size."""

import pytest
import torch

from helpers import greedy_config, random_prompts, sampled_config, tiny_model
from qwenlm.engine import Engine
from qwenlm.engine.engine import prompt_alpha
from qwenlm.errors import ContextLengthError, UserError
from qwenlm.generation import StopChecker, generate

GREEDY = greedy_config(20)
SAMPLED = sampled_config(20, seed=11)


@pytest.fixture(scope="module", params=["v1", "qwen2"])
def model(request, tmp_path_factory):
    return tiny_model(request.param, str(tmp_path_factory.mktemp(request.param)))


@pytest.mark.parametrize("cfg", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("lengths", [(5,), (3, 12, 30), (20,)])
def test_engine_equals_reference(model, cfg, lengths):
    prompts = random_prompts(*lengths)
    eng = Engine(model, bucket=8)  # small buckets: decoding crosses several KV-length buckets
    assert eng.generate(prompts, cfg) == generate(model, prompts, cfg)
    assert eng.generate(prompts, cfg, sync_every=7) == generate(model, prompts, cfg)  # run-ahead


def test_rows_stop_on_their_own(model):
    prompts = random_prompts(4, 9, 15)
    free = generate(model, prompts, GREEDY)
    cfg = GREEDY.update(eos_token_id=free[1][3])
    stop = StopChecker(cfg)
    assert Engine(model, bucket=8).generate(prompts, cfg, stop, sync_every=5) == generate(model, prompts, cfg, stop)


def test_cache_sized_to_the_request(model):
    eng = Engine(model, bucket=16)
    eng.generate(random_prompts(10, 3), GREEDY.update(max_new_tokens=7))
    c = model.config
    assert eng.last_max_len == 32  # 10 + 7 slots, rounded up to whole 16-slot buckets
    assert eng.last_kv_bytes == 2 * c.num_layers * 2 * c.num_kv_heads * 32 * c.head_dim * 4


def test_engine_reuses_buffers_across_generations(model):
    """Same shapes: the second generation reuses the cache and buffers (and on GPU the captured
    graphs); stale values from the first must not leak into it."""
    eng = Engine(model, bucket=8, keep_state=True)
    a, b = random_prompts(6, 13), [p[::-1] for p in random_prompts(13, 6)]
    eng.generate(a, SAMPLED)
    state = eng._state
    assert eng.generate(b, GREEDY) == generate(model, b, GREEDY)
    assert eng._state is state
    assert eng.generate(random_prompts(3), GREEDY) == generate(model, random_prompts(3), GREEDY)  # new shape
    assert eng._state is not state


def test_cache_freed_after_generation_on_cpu(model):
    eng = Engine(model, bucket=8)
    steps = eng.generate_steps(random_prompts(5), GREEDY)
    next(steps)
    assert eng._state is not None  # the cache lives while generating...
    steps.close()
    assert eng._state is None  # ...and is released when the generation ends, even early
    eng.generate(random_prompts(5), GREEDY)
    assert eng._state is None


def test_context_window(model, monkeypatch):
    """A prompt that fills the model's window is a clear error; a reply stops where the window ends."""
    if model.config.arch == "qwen":
        assert model.context_window == 32768  # dynamic NTK: the original's LogN table bounds it
        monkeypatch.setattr(model, "use_dynamic_ntk", False)
        limit = model.config.seq_length  # without NTK: the trained length (16 here)
    else:
        monkeypatch.setattr(model.config, "max_position_embeddings", 24)
        limit = 24
    assert model.context_window == limit
    eng = Engine(model, bucket=8)
    with pytest.raises(ContextLengthError, match=f"the prompt is {limit} tokens, and the model reads at most {limit}"):
        eng.generate(random_prompts(limit), GREEDY)
    with pytest.raises(UserError):  # also a ValueError, for library callers
        eng.generate(random_prompts(3, limit + 4), GREEDY)
    prompts = random_prompts(limit - 5, 3)
    out = eng.generate(prompts, GREEDY)  # 20 new tokens asked for; the longest prompt leaves room for 5
    assert [len(o) for o in out] == [5, 5]
    assert out == generate(model, prompts, GREEDY.update(max_new_tokens=5))


@pytest.mark.parametrize("cfg", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("length", [20, 30])  # v1: past its seq_length of 16, so NTK and LogN are on
def test_chunked_prefill_equals_reference(model, cfg, length):
    """A long prompt read 8 tokens at a time (as a CPU reads long prompts, 512 at a time) generates
    what the one-pass reference does, and reports each chunk."""
    prompts = random_prompts(length)
    eng = Engine(model, bucket=8, prefill_chunk=8)
    seen = []
    eng.on_prefill = lambda done, total: seen.append((done, total))
    assert eng.generate(prompts, cfg) == generate(model, prompts, cfg)
    assert seen == [(d, length) for d in (*range(8, length, 8), length)]


def test_chunked_prefill_cache_equals_one_pass(model):
    """The keys/values that chunks leave in the cache are the one-pass prefill's."""
    prompts = random_prompts(27)
    cfg = GREEDY.update(max_new_tokens=1)
    caches = []
    for chunk in (8, 10_000):
        eng = Engine(model, bucket=8, prefill_chunk=chunk, keep_state=True)
        eng.generate(prompts, cfg)
        caches.append(eng._state["cache"])
    for a, b in zip(caches[0].tensors, caches[1].tensors):
        torch.testing.assert_close(a[..., :27, :], b[..., :27, :], rtol=1e-5, atol=1e-5)


# ---- a next prompt that starts with the last one's tokens (a chat's next turn) ----------------------

def _reading(eng):
    """Count the prompt tokens each generation reads (the model's forward passes before decoding)."""
    counts = []
    prefill = eng._prefill

    def spy(st):
        counts.append(st["w"] - st["keep"])
        return prefill(st)
    eng._prefill = spy
    return counts


@pytest.mark.parametrize("cfg", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_next_turn_reads_only_its_new_tokens(model, cfg):
    """Turn 2's prompt is turn 1's prompt, its reply and a new message: only the reply's last token and
    the message are read, the cache grows (small buckets) by a copy, and the tokens are the
    reference's. The reply's last token was never fed back, so it is read again."""
    eng = Engine(model, bucket=8, reuse_prefix=True)
    reads = _reading(eng)
    p1 = random_prompts(9)[0]
    r1 = eng.generate([p1], cfg)[0]
    assert r1 == generate(model, [p1], cfg)[0]
    p2 = p1 + r1 + random_prompts(6)[0]
    r2 = eng.generate([p2], cfg)[0]
    assert r2 == generate(model, [p2], cfg)[0]
    p3 = p2 + r2 + random_prompts(4)[0]
    r3 = eng.generate([p3], cfg)[0]
    assert r3 == generate(model, [p3], cfg)[0]
    if model.use_dynamic_ntk:  # v1, seq_length 16: 35 tokens take a new NTK alpha (keys rotate with it),
        assert prompt_alpha(model, 9) == 1.0 != prompt_alpha(model, 35) == prompt_alpha(model, 59)  # (59 keeps it)
        assert reads == [9, 35, 1 + 4]
    else:
        assert reads == [9, 1 + 6, 1 + 4]


def test_a_prompt_that_differs_reuses_the_common_part_only(model):
    eng = Engine(model, bucket=8, reuse_prefix=True)
    reads = _reading(eng)
    p1 = random_prompts(14)[0]
    eng.generate([p1], GREEDY.update(max_new_tokens=3))
    p2 = p1[:10] + [7, 8, 9]  # the history was edited after token 10
    assert eng.generate([p2], GREEDY) == generate(model, [p2], GREEDY)
    p3 = list(p2)  # the same prompt again (regenerate): all but its last token are in the cache
    assert eng.generate([p3], GREEDY) == generate(model, [p3], GREEDY)
    assert reads == [14, 3, 1]


def test_an_interrupted_prompt_is_not_read_again(model):
    """A long prompt interrupted after its first chunks (Ctrl-C in a chat): asking again reads only
    the rest."""
    eng = Engine(model, bucket=8, prefill_chunk=8, reuse_prefix=True)
    p = random_prompts(30)[0]
    seen = []

    def stop_after_two(done, total):
        seen.append(done)
        if done == 16:
            raise KeyboardInterrupt
    eng.on_prefill = stop_after_two
    with pytest.raises(KeyboardInterrupt):
        eng.generate([p], GREEDY)
    eng.on_prefill = lambda done, total: seen.append((done, total))
    assert eng.generate([p], GREEDY) == generate(model, [p], GREEDY)
    assert seen == [8, 16, (8, 14), (14, 14)]  # then the 14 tokens after the first 16


def test_no_reuse_across_batches_or_cache_formats(model):
    eng = Engine(model, bucket=8, reuse_prefix=True)
    reads = _reading(eng)
    p = random_prompts(12)[0]
    eng.generate([p], GREEDY.update(max_new_tokens=2))
    eng.generate([p, p[:5]], GREEDY.update(max_new_tokens=2))  # a batch: read whole, nothing kept
    assert eng._kept is None
    eng.generate([p], GREEDY.update(max_new_tokens=2))
    model.kv_cache = "int8"  # another cache format: the kept keys cannot serve
    try:
        eng.generate([p + [1, 2]], GREEDY.update(max_new_tokens=2))
    finally:
        model.kv_cache = "float"
    assert reads == [12, 12, 12, 14]


def test_the_cache_is_freed_unless_kept_for_reuse(model):
    assert Engine(model).reuse_prefix is False
    eng = Engine(model, bucket=8)
    eng.generate(random_prompts(5), GREEDY)
    assert eng._state is None  # freed after the generation, the default
    eng = Engine(model, bucket=8, reuse_prefix=True)
    eng.generate(random_prompts(5), GREEDY)
    assert eng._state is not None and eng._kept["tokens"][:5] == random_prompts(5)[0]
    eng.release()
    assert eng._state is None and eng._kept is None


def test_int8_cache_next_turn_reads_like_a_chunked_prompt(model):
    """With 8-bit keys/values the new tokens attend to the codes of the kept ones: what a prompt read in
    chunks (here one of 20 tokens, then 8) computes. The kept codes, scales and key centers are copied
    into the larger cache the second turn needs."""
    p1, extra = random_prompts(20, 8)
    model.kv_cache = "int8"
    try:
        eng = Engine(model, bucket=8, reuse_prefix=True)
        reads = _reading(eng)
        eng.generate([p1], GREEDY.update(max_new_tokens=1))  # 24 slots: 20 filled
        got = eng.generate([p1 + extra], GREEDY)  # 48 slots: a copy
        want = Engine(model, bucket=8, prefill_chunk=20).generate([p1 + extra], GREEDY)
    finally:
        model.kv_cache = "float"
    assert reads == [20, 8] and eng.last_max_len == 48
    assert got == want


def test_new_weights_invalidate_the_kept_cache(model):
    """Keys/values computed with other weights must not serve: after an in-place update of a parameter
    (an optimizer step, load_state_dict) the next prompt is read whole."""
    eng = Engine(model, bucket=8, reuse_prefix=True)
    reads = _reading(eng)
    p = random_prompts(12)[0]
    eng.generate([p], GREEDY.update(max_new_tokens=2))
    eng.generate([p + [5]], GREEDY.update(max_new_tokens=2))
    weight = next(model.parameters())
    with torch.no_grad():
        weight.mul_(1.0)  # (same values, but an update all the same)
    eng.generate([p + [5, 6]], GREEDY.update(max_new_tokens=2))
    assert reads == [12, 1, 14]
