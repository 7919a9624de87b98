"""Qwen v1 weights under Qwen2 names: the same network (while NTK/LogN are inactive), used to run
transformers' Qwen2ForCausalLM on a v1 checkpoint for side-by-side checks and benchmarks."""

from __future__ import annotations


def qwen_v1_to_qwen2(sd: dict, hidden_size: int, num_layers: int) -> dict:
    """Split the fused `c_attn` into q/k/v (views, no copies); `w2` is the gate, `w1` the up."""
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"], "model.norm.weight": sd["transformer.ln_f.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(num_layers):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        wq, wk, wv = sd[p + "attn.c_attn.weight"].split(hidden_size)
        bq, bk, bv = sd[p + "attn.c_attn.bias"].split(hidden_size)
        out.update({q + "input_layernorm.weight": sd[p + "ln_1.weight"],
                    q + "post_attention_layernorm.weight": sd[p + "ln_2.weight"],
                    q + "self_attn.q_proj.weight": wq, q + "self_attn.k_proj.weight": wk,
                    q + "self_attn.v_proj.weight": wv, q + "self_attn.q_proj.bias": bq,
                    q + "self_attn.k_proj.bias": bk, q + "self_attn.v_proj.bias": bv,
                    q + "self_attn.o_proj.weight": sd[p + "attn.c_proj.weight"],
                    q + "mlp.gate_proj.weight": sd[p + "mlp.w2.weight"],
                    q + "mlp.up_proj.weight": sd[p + "mlp.w1.weight"],
                    q + "mlp.down_proj.weight": sd[p + "mlp.c_proj.weight"]})
    return out
