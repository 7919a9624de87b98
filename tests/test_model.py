"""The model against transformers' Qwen2 on the same random weights, NTK/LogN against the
formulas and an independent long-input reference, and the "two paths must agree" checks."""

import math

import pytest
import torch

from helpers import tiny_hf_qwen2, v1_config, v1_state_dict, v1_to_qwen2, write_checkpoint
from qwenlm import GenerationConfig, load_model
from qwenlm.generation import generate
from qwenlm.models.layers import logn_scale, ntk_alpha

transformers = pytest.importorskip("transformers")
GREEDY = GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=12, eos_token_id=None,
                          pad_token_id=0)


def _ids(vocab, b, t, seed=0):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def _hf_greedy(hf, ids, n):
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("tie,kv_heads", [(False, 2), (True, 4), (False, 1)])
def test_qwen2_matches_transformers(tmp_path, tie, kv_heads):
    path = tiny_hf_qwen2(str(tmp_path), tie=tie, kv_heads=kv_heads)
    ours = load_model(path, dtype="float32", device="cpu")
    hf = transformers.Qwen2ForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    ids = _ids(1000, 2, 17)
    with torch.no_grad():
        ref = hf(ids).logits
    got = ours(ids).logits
    assert got.shape == (2, 17, 1000)
    assert (got - ref).abs().max() < 1e-4
    assert ref.std() > 1  # the weights are not trivially small
    assert generate(ours, [ids[0].tolist()], GREEDY)[0] == _hf_greedy(hf, ids[:1], 12)


def test_qwen_v1_matches_transformers_qwen2(tmp_path):
    """A v1 checkpoint (fused c_attn, w2 = gate) equals the same weights mapped onto Qwen2."""
    cfg = v1_config(seq_length=4096)
    sd = v1_state_dict(cfg)
    write_checkpoint(str(tmp_path / "v1"), cfg, sd)
    q2cfg, q2sd = v1_to_qwen2(cfg, sd)
    write_checkpoint(str(tmp_path / "q2"), q2cfg, q2sd)
    ours = load_model(str(tmp_path / "v1"), dtype="float32", device="cpu")
    hf = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "q2"), torch_dtype=torch.float32).eval()
    ids = _ids(1000, 2, 23, seed=1)
    with torch.no_grad():
        ref = hf(ids).logits
    assert (ours(ids).logits - ref).abs().max() < 1e-4
    assert generate(ours, [ids[1].tolist()], GREEDY)[0] == _hf_greedy(hf, ids[1:], 12)


@pytest.mark.parametrize("length,seq,alpha", [(1, 8192, 1), (8192, 8192, 1), (8193, 8192, 3),
                                              (16384, 8192, 3), (16385, 8192, 7), (32768, 8192, 7),
                                              (32769, 8192, 15), (65536, 8192, 15), (3000, 2048, 3)])
def test_ntk_alpha_formula(length, seq, alpha):
    assert ntk_alpha(length, seq) == alpha


def test_logn_formula():
    s = 8192
    pos = torch.tensor([[0, 8190, 8191, 8192, 16383, 40000]])
    got = logn_scale(pos, s)[0].tolist()
    want = [1, 1, 1, math.log(8193, s), math.log(16384, s), math.log(40001, s)]
    assert got == pytest.approx(want, rel=1e-6)
    assert logn_scale(torch.tensor([[100000]]), s).item() > 1  # no 32,767-entry table limit


def _reference_v1_forward(cfg, sd, ids):
    """Qwen v1's forward written directly from spec §2 (loops, no shared code), batch of one."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    d, S, L = h // heads, cfg["seq_length"], len(ids)
    eps = cfg["layer_norm_epsilon"]
    alpha = 1.0
    if L > S:
        alpha = max(2 ** math.ceil(math.log2(L / S) + 1) - 1, 1)
    base = cfg["rotary_emb_base"] * alpha ** (d / (d - 2))
    inv = [1.0 / base ** (2 * j / d) for j in range(d // 2)]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(x, p):  # x (heads, d) at position p
        ang = torch.tensor([p * f for f in inv], dtype=torch.float64).float()
        cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
        rot = torch.cat([-x[:, d // 2:], x[:, :d // 2]], dim=-1)
        return x * cos + rot * sin

    x = sd["transformer.wte.weight"][torch.tensor(ids)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        a = rms(x, sd[p + "ln_1.weight"]) @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k, v = a.split(h, dim=-1)
        q = torch.stack([rope(q[t].view(heads, d), t) for t in range(L)])  # (L, heads, d)
        k = torch.stack([rope(k[t].view(heads, d), t) for t in range(L)])
        v = v.view(L, heads, d)
        out = torch.zeros(L, heads, d)
        for t in range(L):
            qt = q[t] * (math.log(t + 1, S) if t + 1 > S else 1.0)
            for hh in range(heads):
                w = torch.softmax((k[:t + 1, hh] @ qt[hh]) / math.sqrt(d), dim=0)
                out[t, hh] = w @ v[:t + 1, hh]
        x = x + out.reshape(L, h) @ sd[p + "attn.c_proj.weight"].T
        m = rms(x, sd[p + "ln_2.weight"])
        g = torch.nn.functional.silu(m @ sd[p + "mlp.w2.weight"].T) * (m @ sd[p + "mlp.w1.weight"].T)
        x = x + g @ sd[p + "mlp.c_proj.weight"].T
    return rms(x, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("length", [8, 20, 40])
def test_long_input_ntk_and_logn_active(tmp_path, length):
    """seq_length 8: inputs of 20 and 40 tokens switch on dynamic NTK (alpha 3, 7) and LogN."""
    cfg = v1_config(seq_length=8, layers=2)
    sd = v1_state_dict(cfg, seed=5)
    write_checkpoint(str(tmp_path), cfg, sd)
    ours = load_model(str(tmp_path), dtype="float32", device="cpu")
    ids = _ids(1000, 1, length, seed=2)[0].tolist()
    ref = _reference_v1_forward(cfg, sd, ids)
    got = ours(torch.tensor([ids])).logits[0]
    assert (got - ref).abs().max() < 1e-3
    if length > 8:  # and the tricks really change the result
        ours.use_dynamic_ntk = ours.use_logn_attn = False
        assert (ours(torch.tensor([ids])).logits[0] - ref).abs().max() > 1e-2


@pytest.fixture(scope="module")
def v1_model(tmp_path_factory):
    cfg = v1_config(seq_length=16)
    path = write_checkpoint(str(tmp_path_factory.mktemp("v1m")), cfg, v1_state_dict(cfg, seed=9))
    return load_model(path, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def qwen2_model(tmp_path_factory):
    return load_model(tiny_hf_qwen2(str(tmp_path_factory.mktemp("q2m")), kv_heads=2), dtype="float32", device="cpu")


@pytest.mark.parametrize("which", ["v1_model", "qwen2_model"])
def test_cached_equals_uncached(request, which):
    model = request.getfixturevalue(which)
    ids = _ids(1000, 1, 14, seed=4)
    full = model(ids).logits
    out = model(ids[:, :6], use_cache=True)
    steps = [out.logits]
    for t in range(6, 14):
        out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4
    # and a multi-token chunk after a cached prefix
    out = model(ids[:, :5], use_cache=True)
    chunk = model(ids[:, 5:], past_key_values=out.past_key_values, use_cache=True).logits
    assert (chunk - full[:, 5:]).abs().max() < 1e-4


@pytest.mark.parametrize("which", ["v1_model", "qwen2_model"])
def test_left_padded_batch_equals_single(request, which):
    model = request.getfixturevalue(which)
    cfg = GREEDY.update(max_new_tokens=10)
    prompts = [_ids(1000, 1, n, seed=n)[0].tolist() for n in (3, 11, 7)]
    batched = generate(model, prompts, cfg)
    singles = [generate(model, [p], cfg)[0] for p in prompts]
    assert batched == singles
    assert len({tuple(r) for r in batched}) == 3


def test_batch_rows_stop_independently(qwen2_model):
    prompts = [_ids(1000, 1, n, seed=n)[0].tolist() for n in (4, 9)]
    free = generate(qwen2_model, prompts, GREEDY)
    stop_tok = free[0][2]  # row 0 stops at its 3rd token; row 1 runs on unless it meets it
    cfg = GREEDY.update(eos_token_id=stop_tok)
    rows = generate(qwen2_model, prompts, cfg)
    assert rows[0] == free[0][:3]
    expect1 = free[1][:free[1].index(stop_tok) + 1] if stop_tok in free[1] else free[1]
    assert rows[1] == expect1


def test_stream_equals_non_stream(qwen2_model):
    from qwenlm.generation import generate_steps

    cfg = GenerationConfig(do_sample=True, temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=1.2,
                           max_new_tokens=15, seed=123, eos_token_id=None, pad_token_id=0)
    prompt = _ids(1000, 1, 5)[0].tolist()
    streamed = [s[0] for s in generate_steps(qwen2_model, [prompt], cfg)]
    assert streamed == generate(qwen2_model, [prompt], cfg)[0]
    assert generate(qwen2_model, [prompt], cfg.update(seed=124))[0] != streamed  # the seed matters


def test_hf_style_generate_and_output(qwen2_model):
    ids = _ids(1000, 2, 6)
    out = qwen2_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=4, repetition_penalty=1.0, eos_token_id=None)
    assert out.shape == (2, 10) and torch.equal(out[:, :6], ids)
    # transformers' max_length counts the prompt: 10 here is the same as 4 new tokens
    same = qwen2_model.generate(ids, do_sample=False, max_length=10, repetition_penalty=1.0, eos_token_id=None)
    assert torch.equal(same, out)
    with pytest.raises(ValueError, match="the prompt is 6 tokens"):
        qwen2_model.generate(ids, max_length=6)
    res = qwen2_model(ids)
    assert res.logits.shape == (2, 6, 1000) and res[0] is res.logits


def test_padded_batch_logits_with_ntk_and_logn(v1_model):
    """Rows of 5 and 24 tokens (seq_length 16): per-row NTK alpha (1 and 3), LogN on the long row
    only; each row's logits equal the row run alone (pads take no position)."""
    from qwenlm.generation.generate import left_pad

    prompts = [_ids(1000, 1, 5, seed=7)[0].tolist(), _ids(1000, 1, 24, seed=8)[0].tolist()]
    ids, mask = left_pad(prompts, 0, "cpu")
    batched = v1_model(ids, attention_mask=mask).logits
    for i, p in enumerate(prompts):
        alone = v1_model(torch.tensor([p])).logits[0]
        assert (batched[i, -len(p):] - alone).abs().max() < 1e-4


def test_hf_generate_streamer_return_dict_and_what_it_refuses(v1_chat_dir, capsys):
    """transformers' TextStreamer prints the reply as it is generated (before, the streamer was
    ignored and nothing was printed); return_dict_in_generate gives `.sequences`; beam search and
    per-step scores are clear errors, not a silent difference."""
    from qwenlm import load

    model, tok = load(v1_chat_dir, dtype="float32", device="cpu")
    ids = torch.tensor([tok.encode("def fib(n):")])
    kw = dict(do_sample=False, max_new_tokens=6, repetition_penalty=1.0, eos_token_id=None)
    plain = model.generate(ids, **kw)

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    rec = Recorder()
    assert torch.equal(model.generate(ids, streamer=rec, **kw), plain)
    assert rec.puts == [ids.tolist()] + [[t] for t in plain[0, ids.shape[1]:].tolist()] and rec.ended
    model.generate(ids, streamer=transformers.TextStreamer(tok, skip_prompt=True), **kw)
    assert capsys.readouterr().out == tok.decode(plain[0, ids.shape[1]:].tolist()) + "\n"
    out = model.generate(ids, return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences, plain) and out["sequences"] is out.sequences and out.scores is None
    with pytest.raises(ValueError, match="beam search"):
        model.generate(ids, num_beams=4, **kw)
    with pytest.raises(ValueError, match="beam search"):
        model.chat(tok, "hi", num_beams=2)
    assert model.chat(tok, "hi", num_beams=1, max_new_tokens=2)[0] is not None
    with pytest.raises(ValueError, match="output_scores"):
        model.generate(ids, return_dict_in_generate=True, output_scores=True, **kw)
    with pytest.raises(ValueError, match="logits_processor"):
        model.generate(ids, logits_processor=[lambda i, s: s], **kw)
    with pytest.raises(ValueError, match="one prompt at a time"):
        model.generate(torch.cat([ids, ids]), streamer=rec, **kw)
