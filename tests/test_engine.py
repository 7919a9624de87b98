"""The engine against the reference loop: identical tokens on tiny fp32 models (greedy and
sampled, batched with left padding, NTK/LogN active, run-ahead syncing), and the KV cache size."""

import pytest
import torch

from helpers import tiny_hf_qwen2, v1_config, v1_state_dict, write_checkpoint
from qwenlm import GenerationConfig, load_model
from qwenlm.engine import Engine
from qwenlm.generation import StopChecker, generate

GREEDY = GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=20, eos_token_id=None,
                          pad_token_id=0)
SAMPLED = GenerationConfig(do_sample=True, temperature=0.8, top_p=0.9, top_k=40, repetition_penalty=1.15,
                           max_new_tokens=20, seed=11, eos_token_id=None, pad_token_id=0)


@pytest.fixture(scope="module", params=["v1", "qwen2"])
def model(request, tmp_path_factory):
    d = str(tmp_path_factory.mktemp(request.param))
    if request.param == "v1":  # seq_length 16: NTK and LogN switch on for the longer prompts
        cfg = v1_config(seq_length=16)
        return load_model(write_checkpoint(d, cfg, v1_state_dict(cfg, seed=4)), dtype="float32", device="cpu")
    return load_model(tiny_hf_qwen2(d, kv_heads=2), dtype="float32", device="cpu")


def _prompts(*lengths):
    return [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]


@pytest.mark.parametrize("cfg", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("lengths", [(5,), (3, 12, 30), (20,)])
def test_engine_equals_reference(model, cfg, lengths):
    prompts = _prompts(*lengths)
    eng = Engine(model, bucket=8)  # small buckets: decoding crosses several KV-length buckets
    assert eng.generate(prompts, cfg) == generate(model, prompts, cfg)
    assert eng.generate(prompts, cfg, sync_every=7) == generate(model, prompts, cfg)  # run-ahead


def test_rows_stop_on_their_own(model):
    prompts = _prompts(4, 9, 15)
    free = generate(model, prompts, GREEDY)
    cfg = GREEDY.update(eos_token_id=free[1][3])
    stop = StopChecker(cfg)
    assert Engine(model, bucket=8).generate(prompts, cfg, stop, sync_every=5) == generate(model, prompts, cfg, stop)


def test_cache_sized_to_the_request(model):
    eng = Engine(model, bucket=16)
    eng.generate(_prompts(10, 3), GREEDY.update(max_new_tokens=7))
    c = model.config
    assert eng.last_max_len == 32  # 10 + 7 slots, rounded up to whole 16-slot buckets
    assert eng.last_kv_bytes == 2 * c.num_layers * 2 * c.num_kv_heads * 32 * c.head_dim * 4


def test_engine_reuses_buffers_across_generations(model):
    """Same shapes: the second generation reuses the cache and buffers (and on GPU the captured
    graphs); stale values from the first must not leak into it."""
    eng = Engine(model, bucket=8, keep_state=True)
    a, b = _prompts(6, 13), [p[::-1] for p in _prompts(13, 6)]
    eng.generate(a, SAMPLED)
    state = eng._state
    assert eng.generate(b, GREEDY) == generate(model, b, GREEDY)
    assert eng._state is state
    assert eng.generate(_prompts(3), GREEDY) == generate(model, _prompts(3), GREEDY)  # new shape
    assert eng._state is not state


def test_cache_freed_after_generation_on_cpu(model):
    eng = Engine(model, bucket=8)
    steps = eng.generate_steps(_prompts(5), GREEDY)
    next(steps)
    assert eng._state is not None  # the cache lives while generating...
    steps.close()
    assert eng._state is None  # ...and is released when the generation ends, even early
    eng.generate(_prompts(5), GREEDY)
    assert eng._state is None
