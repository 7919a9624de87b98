"""The 8-bit KV cache: the quantizer's error bound, the engines against the reference loop whose
cache holds the same quantized values (concatenated, not written by index), the fused 4-bit CPU kernel against the per-op path, closeness to
the float cache (and closer than the original's per-chunk truncating scheme), memory, and the
switches (config.json's use_cache_quantization, load(kv_cache=...), from_pretrained)."""

import json
import os

import pytest
import torch

from helpers import (assert_same_tokens_but_near_ties, drain_batch_engine, generate_with_logits, random_prompts,
                     tiny_model, v1_config, v1_state_dict, write_checkpoint)
from qwenlm import GenerationConfig, load_model
from qwenlm.engine import Engine
from qwenlm.engine.batch import BatchEngine
from qwenlm.engine.cache import KVStore
from qwenlm.generation import generate
from qwenlm.models.layers import KVCache
from qwenlm.quant import q4
from qwenlm.quant.kv import dequantize_kv, fake_quantize_original, quantize_kv

GREEDY = GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=20, eos_token_id=None,
                          pad_token_id=0)
SAMPLED = GenerationConfig(do_sample=True, temperature=0.8, top_p=0.9, top_k=40, repetition_penalty=1.15,
                           max_new_tokens=20, seed=3, eos_token_id=None, pad_token_id=0)
avx2 = pytest.mark.skipif(not {"avx2", "fma", "f16c"} <= q4._cpu_flags(), reason="needs AVX2/FMA/F16C")


def test_quantizer_error_is_half_a_step_per_token_and_head():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 50, 64, generator=g) * torch.rand(3, 4, 50, 1, generator=g) * 20  # very different ranges
    x[0, 0, 0] = 7.5  # a constant vector
    q, s, lo = quantize_kv(x)
    assert q.dtype == torch.uint8 and s.shape == lo.shape == x.shape[:-1] and s.dtype == torch.float16
    back = dequantize_kv(q, s, lo, torch.float32)
    rng = (x.amax(-1) - x.amin(-1))[..., None]
    # half a step of 1/255 of each vector's own range, plus fp16 rounding of scale and low
    bound = rng / 255 * 0.5 * 1.01 + x.abs().amax(-1, keepdim=True) * 2 ** -10
    assert ((back - x).abs() <= bound).all()
    assert torch.equal(back[0, 0, 0], torch.full((64,), 7.5))
    assert (q.amin(-1) == 0).float().mean() > 0.99 and (q.amax(-1) == 255).float().mean() > 0.95  # full range used


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("budget", [1, 1 << 30])
def test_swap_rows_exchanges_the_filled_slots_of_two_rows(int8, budget, monkeypatch):
    """KVStore.swap_rows (a finished stream parked, the last row moved into its place): row a's first
    na slots go to row b and row b's first nb to row a in every layer and tensor, whatever number of
    layers is moved at a time (budget 1 byte: one at a time); every other slot and row stays."""
    monkeypatch.setattr(KVStore, "SWAP_BYTES", {"cpu": budget})
    g = torch.Generator().manual_seed(int8 + 2)
    kv = KVStore(5, 4, 2, 12, 8, torch.float32, "cpu", int8=int8)
    for t in kv.tensors:
        t.copy_(torch.randint(0, 250, t.shape, generator=g).to(t.dtype))
    a, b, na, nb = 1, 3, 7, 4
    before = [t.clone() for t in kv.tensors]
    kv.swap_rows(a, b, na, nb)
    for i, (t, old) in enumerate(zip(kv.tensors, before)):
        want = old.clone()
        if i < 2 or (int8 and i < 6):  # per slot: keys, values (codes) and their scales
            want[:, a, :, :nb] = old[:, b, :, :nb]
            want[:, b, :, :na] = old[:, a, :, :na]
        elif int8:  # the key centers: per row
            want[:, [a, b]] = old[:, [b, a]]
        assert torch.equal(t, want), i


def test_store_sizes():
    kv = KVStore(2, 3, 4, 16, 64, torch.bfloat16, "cpu", int8=True)
    centers = 2 * 3 * 4 * 64 * 4  # one fp32 key center per layer, row and head
    assert kv.nbytes == 2 * 2 * 3 * 4 * 16 * (64 + 4) + centers
    assert kv.nbytes == KVStore.bytes_per_token(2, 4, 64, torch.bfloat16, True) * 3 * 16 + centers
    plain = KVStore.bytes_per_token(2, 4, 128, torch.bfloat16, False)
    assert plain / KVStore.bytes_per_token(2, 4, 128, torch.bfloat16, True) > 1.9  # about twice the tokens


@pytest.fixture(scope="module", params=["v1", "qwen2"])
def model(request, tmp_path_factory):
    m = tiny_model(request.param, str(tmp_path_factory.mktemp(request.param)))
    yield m
    m.kv_cache = "float"


def _reference(model, prompts, cfg):
    model.kv_cache = "int8"
    try:
        assert model.new_cache().int8
        return generate(model, prompts, cfg)
    finally:
        model.kv_cache = "float"


def _int8_cache(model):
    return KVCache(len(model.blocks), int8=True)


@pytest.mark.parametrize("cfg", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_engine_equals_reference_with_quantized_cache(model, cfg):
    prompts = random_prompts(3, 12, 30)  # v1: NTK and LogN active past 16 tokens
    model.kv_cache = "int8"
    try:
        eng = Engine(model, bucket=8)
        got = eng.generate(prompts, cfg)
        assert eng._state is None or eng._state["cache"].int8
        c = model.config
        assert eng.last_kv_bytes == (KVStore.bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, model.dtype,
                                                             True) * 3 * 56 + c.num_layers * 3 * c.num_kv_heads * c.head_dim * 4)
    finally:
        model.kv_cache = "float"
    assert got == _reference(model, prompts, cfg)


def test_engine_step_logits_equal_reference_with_quantized_cache(model):
    """Tokens could agree with the float cache too; the logits tell the caches apart."""
    prompt = random_prompts(30)[0]
    model.kv_cache = "int8"
    try:
        eng = Engine(model)
        st = eng._adopt(eng._setup([prompt], GREEDY, 64))
        got = []
        with torch.inference_mode():
            eng._prefill(st)
            for t in range(6):
                st["tok"].fill_(11 + t)
                st["pos"].add_(1)
                st["slot"].fill_(30 + t)
                got.append(eng._decode(st, 31 + t)[0])
    finally:
        model.kv_cache = "float"
    got = torch.stack(got)
    want = _decode_logits(model, prompt, lambda: _int8_cache(model))
    exact = _decode_logits(model, prompt, lambda: KVCache(len(model.blocks)))
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    assert (got - exact).abs().max() > 1e-3 * exact.abs().max()


def test_batch_engine_equals_reference_with_quantized_cache(model):
    prompts = random_prompts(5, 17, 9, 26)
    model.kv_cache = "int8"
    try:
        eng = BatchEngine(model, max_num_seqs=2, max_model_len=64)  # 4 sequences, 2 rows: rows move
        assert eng.kv.int8
        outs = drain_batch_engine(eng, prompts, GREEDY)
    finally:
        model.kv_cache = "float"
    ref = _reference(model, prompts, GREEDY)  # a padded batch: key centers leave the padding out
    assert outs == ref


def _original_scheme_cache(model):
    """The original's use_cache_quantization (spec §2.7): one scale per (row, head, chunk), truncation."""

    class Original(KVCache):
        def update(self, i, k, v):
            return super().update(i, fake_quantize_original(k), fake_quantize_original(v))

    return Original(len(model.blocks))


def _decode_logits(model, prompt, new_cache, steps=6):
    """Teacher-forced: the prompt's prefill, then `steps` fixed tokens, logits of each step."""
    cache = new_cache()
    out = []
    with torch.inference_mode():
        r = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True)
        for t in range(steps):
            r = model(torch.tensor([[11 + t]]), past_key_values=r.past_key_values, use_cache=True)
            out.append(r.logits[0, -1])
    return torch.stack(out)


def test_int8_cache_is_close_to_float_and_closer_than_the_original_scheme(model):
    prompt = random_prompts(40)[0]
    exact = _decode_logits(model, prompt, lambda: KVCache(len(model.blocks)))
    ours = _decode_logits(model, prompt, lambda: _int8_cache(model))
    orig = _decode_logits(model, prompt, lambda: _original_scheme_cache(model))
    spread = exact.std()
    err_ours, err_orig = (ours - exact).abs().max(), (orig - exact).abs().max()
    assert err_ours < 0.05 * spread, (err_ours, spread)
    assert err_ours < err_orig / 2, (err_ours, err_orig)
    assert (ours.argmax(-1) == exact.argmax(-1)).all()


@avx2
@pytest.mark.parametrize("kind", ["v1", "qwen2"])
def test_fused_kernel_with_int8_cache_equals_per_op_path(kind, tmp_path):
    m = tiny_model(kind, str(tmp_path), "int4", hidden=128, heads=4, mlp=160)
    m.kv_cache = "int8"
    fused, plain = Engine(m), Engine(m)
    plain._packs = []
    prompts = random_prompts(3, 12, 30)
    st = fused._adopt(fused._setup(prompts, GREEDY, 64))
    fused._prefill(st)
    w = st["w"]
    for step in range(3):
        st["tok"].fill_(7 + step)
        st["pos"].add_(1) if step else None
        st["slot"].fill_(w + step)
        with torch.inference_mode():
            want = plain._decode(st, w + step + 1)
            cache = st["cache"]
            codes = cache.k[:, :, :, w + step].clone(), cache.k_scale[:, :, :, w + step].clone()
            got = fused._decode(st, w + step + 1)
        assert fused._packs and cache.int8
        # the kernel writes the same codes and scales as the torch quantizer (a rare rounding tie aside)
        diff = (cache.k[:, :, :, w + step].int() - codes[0].int()).abs()
        assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99
        assert torch.allclose(cache.k_scale[:, :, :, w + step].float(), codes[1].float(), rtol=2e-3)
        assert (got - want).abs().max() < 2e-3 * want.abs().max()
    got, got_logits = generate_with_logits(fused, prompts, GREEDY)
    want, want_logits = generate_with_logits(plain, prompts, GREEDY)
    assert_same_tokens_but_near_ties(got, want, got_logits, want_logits)


def test_switches(tmp_path):
    cfg = v1_config(use_cache_quantization=True)
    path = write_checkpoint(str(tmp_path / "m"), cfg, v1_state_dict(cfg))
    assert load_model(path, "float32", "cpu").kv_cache == "int8"  # config.json, like the original
    assert load_model(path, "float32", "cpu", kv_cache="float").kv_cache == "float"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(v1_config(), f)
    assert load_model(path, "float32", "cpu").kv_cache == "float"
    from qwenlm import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", fp32=True, use_cache_quantization=True)
    assert m.kv_cache == "int8"
    with pytest.raises(ValueError, match="kv_cache"):
        load_model(path, "float32", "cpu", kv_cache="int4")
