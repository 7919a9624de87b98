"""Qwen v1 (`QWenLMHeadModel`) with the checkpoint's own module names.

Fused `c_attn` with bias, `w2` is the SiLU gate and `w1` the up projection, untied head,
full multi-head attention, dynamic NTK and LogN beyond `seq_length`.
"""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .base import QwenCausalLM
from .layers import ForwardContext, PreNormBlock, RMSNorm, attend, fuse, linears, silu_mul


class QWenAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        proj = cfg.num_heads * cfg.head_dim
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * proj, bias=True)
        self.c_proj = nn.Linear(proj, cfg.hidden_size, bias=False)

    def forward(self, x, ctx: ForwardContext, layer: int):
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.c_proj(attend(q, k, v, ctx, layer))  # q/k/v: (B, H, T, D)


class QWenMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)  # gate (SiLU)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    FUSE = ("w2", "w1")

    def forward(self, x):
        gate, up = linears(self, self.FUSE, x)
        return self.c_proj(silu_mul(gate, up))


class QWenBlock(PreNormBlock):
    ROLES = ("ln_1", "attn", "ln_2", "mlp")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = QWenAttention(cfg)
        self.ln_2 = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = QWenMLP(cfg)

    def parts(self) -> dict:
        """The block's pieces by role, for fused kernels (see quant/q4.py: pack_blocks)."""
        a, m = self.attn, self.mlp
        return {"ln1": self.ln_1, "qkv": [a.c_attn], "o": a.c_proj, "ln2": self.ln_2,
                "gate": m.w2, "up": m.w1, "down": m.c_proj}

    def fuse(self) -> int:
        """Fuse gate and up into one matmul (c_attn is one already); how many groups got fused."""
        return int(fuse(self.mlp, self.mlp.FUSE))


class QWenModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.h = nn.ModuleList(QWenBlock(cfg) for _ in range(cfg.num_layers))
        self.ln_f = RMSNorm(cfg.hidden_size, cfg.rms_eps)


class QWenLMHeadModel(QwenCausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, use_dynamic_ntk=cfg.use_dynamic_ntk, use_logn_attn=cfg.use_logn_attn)
        self.transformer = QWenModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def embed(self):
        return self.transformer.wte

    @property
    def blocks(self):
        return self.transformer.h

    @property
    def final_norm(self):
        return self.transformer.ln_f
