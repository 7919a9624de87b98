"""Qwen1.5 / Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`) with the checkpoint's own module names.

Separate q/k/v projections with bias, grouped-query attention, optional tied embeddings,
plain rotary embedding with `rope_theta`.
"""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .base import QwenCausalLM
from .layers import ForwardContext, PreNormBlock, RMSNorm, attend, fuse, linears, silu_mul


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, cfg.num_heads * cfg.head_dim, bias=True)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * cfg.head_dim, bias=True)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * cfg.head_dim, bias=True)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, h, bias=False)

    FUSE = ("q_proj", "k_proj", "v_proj")

    def forward(self, x, ctx: ForwardContext, layer: int):
        b, t, _ = x.shape
        q, k, v = linears(self, self.FUSE, x)
        q = q.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return self.o_proj(attend(q, k, v, ctx, layer))


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    FUSE = ("gate_proj", "up_proj")

    def forward(self, x):
        gate, up = linears(self, self.FUSE, x)
        return self.down_proj(silu_mul(gate, up))


class Qwen2DecoderLayer(PreNormBlock):
    ROLES = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = Qwen2Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = Qwen2MLP(cfg)

    def parts(self) -> dict:
        """The block's pieces by role, for fused kernels (see quant/q4.py: pack_blocks)."""
        a, m = self.self_attn, self.mlp
        return {"ln1": self.input_layernorm, "qkv": [a.q_proj, a.k_proj, a.v_proj], "o": a.o_proj,
                "ln2": self.post_attention_layernorm, "gate": m.gate_proj, "up": m.up_proj, "down": m.down_proj}

    def fuse(self) -> int:
        """Fuse q/k/v into one matmul and gate/up into another; how many groups got fused."""
        return int(fuse(self.self_attn, self.self_attn.FUSE)) + int(fuse(self.mlp, self.mlp.FUSE))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)


class Qwen2ForCausalLM(QwenCausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, use_dynamic_ntk=False, use_logn_attn=False)
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def embed(self):
        return self.model.embed_tokens

    @property
    def blocks(self):
        return self.model.layers

    @property
    def final_norm(self):
        return self.model.norm
