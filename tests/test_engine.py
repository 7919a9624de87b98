"""The engine against the reference loop: identical tokens on tiny fp32 models (greedy and
sampled, batched with left padding, NTK/LogN active, run-ahead syncing), and the KV cache size."""

import pytest
import torch

from helpers import random_prompts, tiny_model
from qwenlm import GenerationConfig
from qwenlm.engine import Engine
from qwenlm.errors import ContextLengthError, UserError
from qwenlm.generation import StopChecker, generate

GREEDY = GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=20, eos_token_id=None,
                          pad_token_id=0)
SAMPLED = GenerationConfig(do_sample=True, temperature=0.8, top_p=0.9, top_k=40, repetition_penalty=1.15,
                           max_new_tokens=20, seed=11, eos_token_id=None, pad_token_id=0)


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
