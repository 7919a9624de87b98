"""The fused CPU decode step (one kernel call per block; 4- and 8-bit weights) against the per-op path on the same
quantized model: same logits to float rounding, same tokens, with GQA + biases (Qwen2), full
attention with dynamic NTK and LogN active (v1), left-padded batches and sampling."""

import pytest
import torch

from helpers import assert_same_tokens_but_near_ties, generate_with_logits, random_prompts, tiny_model
from qwenlm import GenerationConfig
from qwenlm.engine import Engine
from qwenlm.quant import q4

pytestmark = pytest.mark.skipif(not {"avx2", "fma", "f16c"} <= q4._cpu_flags(), reason="needs AVX2/FMA/F16C")

GREEDY = GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=24, eos_token_id=None,
                          pad_token_id=0)
SAMPLED = GenerationConfig(do_sample=True, temperature=0.8, top_p=0.9, top_k=40, repetition_penalty=1.15,
                           max_new_tokens=24, seed=5, eos_token_id=None, pad_token_id=0)


@pytest.fixture(scope="module", params=["v1-int4", "qwen2-int4", "v1-int8", "qwen2-int8"])
def model(request, tmp_path_factory):
    # qwen2: head_dim 32, GQA 2:1
    kind, quant = request.param.split("-")
    return tiny_model(kind, str(tmp_path_factory.mktemp(request.param)), quant, hidden=128, heads=4, mlp=160)


def _engines(model):
    fused, plain = Engine(model), Engine(model)
    plain._packs = []  # per-op path
    return fused, plain


def test_model_is_eligible(model):
    assert model.quantization in ("q4-avx2", "q8-avx2")
    packs = q4.pack_blocks(model)
    assert packs is not None and len(packs) == len(model.blocks)


@pytest.mark.parametrize("lengths", [(5,), (3, 12, 30)])
def test_fused_step_logits_equal_per_op_step(model, lengths):
    fused, plain = _engines(model)
    st = fused._adopt(fused._setup(random_prompts(*lengths), GREEDY, 64))
    fused._prefill(st)
    w = st["w"]
    for step in range(3):  # a few steps, each feeding the same token to both paths
        st["tok"].fill_(7 + step)
        st["pos"].add_(1) if step else None
        st["slot"].fill_(w + step)
        with torch.inference_mode():
            want = plain._decode(st, w + step + 1)
            got = fused._decode(st, w + step + 1)
        assert fused._packs, "the fused path was not taken"
        assert (got - want).abs().max() < 2e-3 * want.abs().max()


def test_fused_tokens_equal_per_op_tokens(model):
    """The same greedy tokens, but for a near-tie that the paths' float rounding flips (the rows then
    go their own ways)."""
    fused, plain = _engines(model)
    prompts = random_prompts(4, 17, 9)
    got, got_logits = generate_with_logits(fused, prompts, GREEDY)
    want, want_logits = generate_with_logits(plain, prompts, GREEDY)
    assert fused._packs and not plain._packs
    assert_same_tokens_but_near_ties(got, want, got_logits, want_logits)


def test_fused_sampling_is_seeded(model):
    # the two paths differ by float rounding (their attention sums in another order), which may flip
    # a sampled token at a top-p boundary; so sampling is checked for reproducibility, not equality
    fused, _ = _engines(model)
    prompts = random_prompts(4, 17, 9)
    a = fused.generate(prompts, SAMPLED)
    assert a == fused.generate(prompts, SAMPLED) and a != fused.generate(prompts, GREEDY)


def test_disabled_by_environment(model, monkeypatch):
    monkeypatch.setenv("QWENLM_FUSED_DECODE", "0")
    assert q4.pack_blocks(model) is None
