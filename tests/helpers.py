"""Tiny random checkpoints written in the original layouts, for tests (no network)."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from qwenlm.engine.batch import BatchEngine
from qwenlm.generation.generate import make_generator
from qwenlm.weights.mapping import qwen_v1_to_qwen2


def v1_config(vocab=1000, hidden=64, layers=2, heads=4, mlp=96, seq_length=4096, **kw) -> dict:
    cfg = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "vocab_size": vocab,
           "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
           "kv_channels": hidden // heads, "intermediate_size": 2 * mlp, "rotary_pct": 1.0,
           "rotary_emb_base": 10000, "layer_norm_epsilon": 1e-6, "seq_length": seq_length,
           "max_position_embeddings": 32768, "use_dynamic_ntk": True, "use_logn_attn": True,
           "no_bias": True, "tie_word_embeddings": False, "bf16": False, "fp16": False, "fp32": False}
    cfg.update(kw)
    return cfg


def v1_state_dict(cfg: dict, seed: int = 0, std: float = 0.15) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, v, m = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"] // 2

    def r(*shape, s=std):
        return torch.randn(*shape, generator=g) * s

    sd = {"transformer.wte.weight": r(v, h, s=1.0), "transformer.ln_f.weight": 1 + r(h, s=0.1),
          "lm_head.weight": r(v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        sd.update({p + "ln_1.weight": 1 + r(h, s=0.1), p + "ln_2.weight": 1 + r(h, s=0.1),
                   p + "attn.c_attn.weight": r(3 * h, h), p + "attn.c_attn.bias": r(3 * h),
                   p + "attn.c_proj.weight": r(h, h), p + "mlp.w1.weight": r(m, h),
                   p + "mlp.w2.weight": r(m, h), p + "mlp.c_proj.weight": r(h, m)})
    return sd


def write_checkpoint(path: str, config: dict, state: dict[str, torch.Tensor],
                     generation_config: dict | None = None, shards: int = 1) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    if generation_config is not None:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(generation_config, f)
    names = sorted(state)
    if shards == 1:
        save_file({k: state[k].contiguous() for k in names}, os.path.join(path, "model.safetensors"))
        return path
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in part}, os.path.join(path, fname))
        weight_map.update({k: fname for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


def v1_to_qwen2(cfg: dict, sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """The same network in transformers' Qwen2 names (valid while NTK/LogN are inactive)."""
    h = cfg["hidden_size"]
    q2cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": cfg["vocab_size"],
             "hidden_size": h, "intermediate_size": cfg["intermediate_size"] // 2,
             "num_hidden_layers": cfg["num_hidden_layers"], "num_attention_heads": cfg["num_attention_heads"],
             "num_key_value_heads": cfg["num_attention_heads"], "rms_norm_eps": cfg["layer_norm_epsilon"],
             "rope_theta": float(cfg["rotary_emb_base"]), "max_position_embeddings": 32768,
             "tie_word_embeddings": False, "hidden_act": "silu"}
    out = qwen_v1_to_qwen2(sd, h, cfg["num_hidden_layers"])
    return q2cfg, out


def tiny_hf_qwen2(path: str, vocab=1000, hidden=64, layers=2, heads=4, kv_heads=2, mlp=96,
                  tie=False, seed=0) -> str:
    """A random transformers Qwen2ForCausalLM saved with save_pretrained."""
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
                                   num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=kv_heads, tie_word_embeddings=tie,
                                   max_position_embeddings=4096, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # larger than the 0.02 init, so that logits actually differ between tokens
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return path


def running_server(app):
    """Run an ASGI app on a free loopback port in a thread; a context manager yielding the base URL."""
    from qwenlm.serve import serve_in_thread

    return serve_in_thread(app)


def tiny_model(kind: str, path: str, quantize: str | None = None, **qwen2_kw):
    """A tiny fp32 model: "v1" (seq_length 16, so NTK and LogN switch on for longer prompts) or
    "qwen2" (GQA 2:1 by default), optionally quantized."""
    from qwenlm import load_model

    if kind == "v1":
        cfg = v1_config(seq_length=16)
        path = write_checkpoint(path, cfg, v1_state_dict(cfg, seed=4))
    else:
        path = tiny_hf_qwen2(path, **{"kv_heads": 2, **qwen2_kw})
    return load_model(path, dtype="float32", device="cpu", quantize=quantize)


def greedy_config(max_new_tokens: int):
    """Greedy decoding with no penalty and no end token: every request runs its full length."""
    from qwenlm import GenerationConfig

    return GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
                            eos_token_id=None, pad_token_id=0)


def sampled_config(max_new_tokens: int, seed: int):
    """Sampling with every filter on (temperature, top-p, top-k, repetition penalty), no end token."""
    from qwenlm import GenerationConfig

    return GenerationConfig(do_sample=True, temperature=0.8, top_p=0.9, top_k=40, repetition_penalty=1.15,
                            max_new_tokens=max_new_tokens, seed=seed, eos_token_id=None, pad_token_id=0)


def random_prompts(*lengths: int) -> list[list[int]]:
    """Reproducible random prompts (ids < 1000) of the given lengths."""
    return [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]



def drain_batch_engine(eng, prompts: list[list[int]], cfg) -> list[list[int]]:
    """Submit every prompt to a BatchEngine, step it (admitting as rows free up) until all finish;
    each prompt's generated tokens."""
    from qwenlm.engine.batch import Sequence
    from qwenlm.generation import StopChecker

    outs: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        eng.submit(Sequence(p, cfg, StopChecker(cfg), lambda t, r, i=i: outs.setdefault(i, []).append(t)))
    while not eng.idle:
        with torch.inference_mode():
            eng.step(eng.take_waiting())
    return [outs[i] for i in range(len(prompts))]


def generate_with_logits(eng, prompts: list[list[int]], cfg) -> tuple[list[list[int]], list[torch.Tensor]]:
    """`eng.generate` (an Engine), also returning the logits (B, V) that chose each step's tokens."""
    steps: list[torch.Tensor] = []
    prefill, decode = eng._prefill, eng._decode_step

    def record(fn):
        def wrapped(*a):
            out = fn(*a)
            steps.append(out.detach().float().clone())
            return out
        return wrapped

    eng._prefill, eng._decode_step = record(prefill), record(decode)
    try:
        return eng.generate(prompts, cfg), steps
    finally:
        del eng._prefill, eng._decode_step


def assert_same_tokens_but_near_ties(got, want, got_logits, want_logits, rel: float = 2e-2) -> None:
    """Greedy tokens of two CPU-kernel paths that compute the same logits up to float rounding: equal,
    or, where a row first differs, each path's pick is within `rel` of the largest logit of the other's
    pick in both paths' logits (a near-tie; after it the rows go their own ways). Why `rel` is 2%: both
    paths round activations to int8 per block of 32, and a float-rounding difference can flip one
    element's rounding (a step of 1/127 of its block's largest value); on these tiny models that moves
    the logits by up to ~2% at the steps where it happens (measured 4.6e-3 to 1.8e-2; 3e-7 at the
    others). A path that computes wrong logits fails this."""
    assert len(got) == len(want)
    for r, (g, w) in enumerate(zip(got, want)):
        k = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), None)
        if k is None:
            assert len(g) == len(w)
            continue
        lg, lw = got_logits[k][r], want_logits[k][r]
        tol = rel * lw.abs().max()
        assert lw[w[k]] - lw[g[k]] <= tol and lg[g[k]] - lg[w[k]] <= tol, (
            f"row {r} step {k}: tokens {g[k]} / {w[k]} are not a near-tie")


def same_as_the_gguf_package(path: str) -> None:
    """qwenlm's GGUF header reader gives what the `gguf` package's GGUFReader gives for `path`."""
    import numpy as np
    from gguf import GGUFReader

    from qwenlm.weights.gguf_reader import HeaderReader

    theirs, ours = GGUFReader(path), HeaderReader(path)
    assert [k for k in theirs.fields if not k.startswith("GGUF.")] == list(ours.fields)  # (GGUF.*: their own)
    for key, field in ours.fields.items():
        want = theirs.fields[key].contents()
        assert repr(field.contents()) == repr(want), key  # (repr: 1 and 1.0, 1 and True differ)
    assert len(theirs.tensors) == len(ours.tensors)
    for a, b in zip(theirs.tensors, ours.tensors):
        assert (a.name, a.tensor_type, list(a.shape)) == (b.name, b.tensor_type, list(b.shape))
        assert (int(a.n_elements), int(a.n_bytes), int(a.data_offset)) == (b.n_elements, b.n_bytes, b.data_offset)
        assert a.data.dtype == b.data.dtype and np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name


class ScriptedEngine(BatchEngine):
    """Every sequence 'generates' the token ids of `self.script`, then <|im_end|>."""

    script: list[int] = []
    prompts: list[list[int]] = []

    def _logits(self, seqs):
        out = torch.full((len(seqs), self.cfg.vocab_size), -1e9)
        for i, s in enumerate(seqs):
            k = len(s.generated)
            out[i, self.script[k] if k < len(self.script) else self.end_id] = 0.0
        return out

    def _prefill(self, seqs):
        for seq in seqs:
            ScriptedEngine.prompts.append(list(seq.prompt))
            seq.row, seq.cached = len(self.active), len(seq.prompt)
            seq.generator = make_generator(seq.cfg.seed, self.device)
            self.active.append(seq)
        self._sample(seqs, self._logits(seqs))

    def _decode(self):
        seqs = list(self.active)
        for s in seqs:
            s.cached += 1
        self._sample(seqs, self._logits(seqs))
