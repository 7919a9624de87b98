"""The math shared by every Qwen architecture: RMSNorm, rotary embedding with dynamic NTK, LogN
query scaling, the attention call, the KV cache and the per-forward context.

Nothing here reads a config flag at run time: the architecture files decide what to pass.

Deliberate choices about the original's quirks (spec §7), documented in docs/behaviour.md:
* positions come from the attention mask (pad tokens take no position), so a left-padded row
  computes exactly what it computes alone — the original used the index in the padded batch;
* the dynamic-NTK alpha is chosen at prefill from each row's true length and kept for the rest
  of the generation, as the original does (the cached keys were rotated with it);
* LogN is computed from its formula, so there is no 32,767-position limit.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("qwenlm")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # normalise in fp32, cast back *before* the gain, like both originals
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _rotary_qk(q, k, cos, sin, logn):
    """NeoX-style (rotate-half) rotary on q/k (B, H, T, D) in fp32, then LogN on q."""
    def rot(x):
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return xf * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]
    qf = rot(q)
    if logn is not None:
        qf = qf * logn[:, None, :, None]
    return qf.to(q.dtype), rot(k).to(k.dtype)


class _Fused:
    """The elementwise ops above, fused by torch.compile on CUDA (one kernel each instead of
    five to ten), eager elsewhere. QWENLM_COMPILE=0 turns fusion off."""

    def __init__(self):
        self._compiled: dict[str, object] = {}
        self.enabled = os.environ.get("QWENLM_COMPILE", "1") != "0"

    def get(self, name: str, fn, x: torch.Tensor):
        if not (x.is_cuda and self.enabled):
            return fn
        if name not in self._compiled:
            import torch._dynamo

            # one variant per dtype/eps/LogN-on-off: a process running several models needs more
            # than the default 8 (past the limit torch falls back to eager, never fails)
            for knob in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
            try:
                self._compiled[name] = torch.compile(fn, dynamic=True)
                log.info("fused %s with torch.compile", name)
            except Exception as e:  # no triton / compiler: say so once, run eager
                log.warning("torch.compile unavailable (%s): running %s unfused", e, name)
                self._compiled[name] = fn
        return self._compiled[name]


FUSED = _Fused()


def rms_norm(x, weight, eps):
    return FUSED.get("rms_norm", _rms_norm, x)(x, weight, eps)


def silu_mul(gate, up):
    return FUSED.get("silu_mul", _silu_mul, gate)(gate, up)


def rotary_qk(q, k, cos, sin, logn):
    return FUSED.get("rotary_qk", _rotary_qk, q)(q, k, cos, sin, logn)


def _add_rms_norm(h: torch.Tensor, add: torch.Tensor, weight: torch.Tensor, eps: float):
    h = h + add
    return h, _rms_norm(h, weight, eps)


def add_rms_norm(h: torch.Tensor, add: torch.Tensor | None, norm: "RMSNorm",
                 fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + add, norm(h + add)): a block's residual add and the next norm, with `fused` (residual_fusion)
    one kernel on CUDA instead of two (`add` None: (h, norm(h)))."""
    if add is None:
        return h, norm(h)
    if not fused:
        h = h + add
        return h, norm(h)
    return FUSED.get("add_rms_norm", _add_rms_norm, h)(h, add, norm.weight, norm.eps)


def residual_fusion(x: torch.Tensor) -> bool:
    """Whether the blocks run with each residual add fused into the next norm (models/base.py:
    run_blocks): on CUDA; QWENLM_FUSE_NORM=0 never, =1 on any device (for tests: on a CPU the
    same operations run one by one)."""
    mode = os.environ.get("QWENLM_FUSE_NORM", "")
    return mode == "1" or (mode != "0" and x.is_cuda and FUSED.enabled)


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gemv: bool) -> torch.Tensor:
    """F.linear, or with `gemv` for one row (batch-1 decoding) the Triton kernel (kernels/gemv.py);
    F.linear whenever gradients are wanted."""
    if gemv and x.numel() == x.shape[-1] and not (torch.is_grad_enabled() and weight.requires_grad):
        from ..kernels.gemv import gemv as one_row

        return one_row(x.reshape(1, -1), weight, bias).reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class GemvLinear(nn.Linear):
    """An nn.Linear (same parameters, names and state_dict) whose one-row products go through the
    Triton kernel: the engines turn the float layers of a model into these with QWENLM_GEMV=1
    (engine.py: gemv_projections)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.weight, self.bias, True)


class FusedLinears:
    """Linear layers of one module that read the same input (gate and up; q, k and v), with their
    weights (and biases) stored as row slices of one matrix, so that one matmul computes them all:
    on a GPU at batch 1 that is one launch and one longer read instead of two or three short ones.

    The layers stay ordinary nn.Linear modules (state_dict, names and memory unchanged: their
    parameters are views). The fusion holds only while each is still the module's attribute and
    still a view at its place: moving, re-assigning or quantizing a layer ends it, and the layers are
    called one by one again; so does a forward pass that computes gradients (fine-tuning)."""

    def __init__(self, module: nn.Module, names: tuple[str, ...]):
        layers = [getattr(module, n) for n in names]
        has_bias = {layer.bias is not None for layer in layers}
        if not all(type(layer) in (nn.Linear, GemvLinear) for layer in layers) or len(has_bias) != 1 or \
                len({(layer.weight.dtype, layer.weight.device, layer.in_features) for layer in layers}) != 1:
            raise ValueError(f"cannot fuse {names}: not plain linear layers of one dtype, device and input")
        self.module, self.names, self.layers = module, names, layers
        self.gemv = False  # one-row products through the Triton kernel (GemvLinear)
        self.sizes = [layer.out_features for layer in layers]
        with torch.no_grad():
            self.weight = torch.cat([layer.weight.detach() for layer in layers])
            self.bias = torch.cat([layer.bias.detach() for layer in layers]) if has_bias == {True} else None
        start = 0
        for layer, n in zip(layers, self.sizes):
            grad = layer.weight.requires_grad
            layer.weight = nn.Parameter(self.weight[start:start + n], requires_grad=grad)
            if self.bias is not None:
                layer.bias = nn.Parameter(self.bias[start:start + n], requires_grad=layer.bias.requires_grad)
            start += n

    def __deepcopy__(self, memo):
        return None  # a copied module's parameters are copies, not views: its layers run one by one

    def intact(self) -> bool:
        step = self.weight.stride(0) * self.weight.element_size()
        start, base = 0, self.weight.data_ptr()
        for name, layer, n in zip(self.names, self.layers, self.sizes):
            if getattr(self.module, name) is not layer or layer.weight.data_ptr() != base + start * step or (
                    self.bias is not None and layer.bias.data_ptr() !=
                    self.bias.data_ptr() + start * self.bias.element_size()):
                return False
            start += n
        return True

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        # the fused matrix is not a parameter: when gradients are wanted, go through the layers
        training = torch.is_grad_enabled() and any(layer.weight.requires_grad for layer in self.layers)
        if training or not self.intact():
            return [getattr(self.module, n)(x) for n in self.names]
        return list(project(x, self.weight, self.bias, self.gemv).split(self.sizes, dim=-1))


def linears(module: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of `module`'s linear layers `names` on `x`: one matmul if they are fused."""
    fused = module.__dict__.get("_fused")
    if fused is not None and fused.names == names:
        return fused(x)
    return [getattr(module, n)(x) for n in names]


def fuse(module: nn.Module, names: tuple[str, ...]) -> bool:
    """Fuse `module`'s linear layers `names` (see FusedLinears); False where they cannot be."""
    fused = module.__dict__.get("_fused")
    if fused is not None and fused.intact():
        return True
    try:
        module.__dict__["_fused"] = FusedLinears(module, names)
    except ValueError:
        gptq = [type(getattr(module, n)).__name__ == "GPTQTritonLinear" for n in names]
        if not all(gptq):
            return False
        from ..kernels.gptq import FusedGPTQ  # packed GPTQ layers on the GPU kernel: the same, packed

        try:
            module.__dict__["_fused"] = FusedGPTQ(module, names)
        except ValueError:
            return False
    return True


class PreNormBlock(nn.Module):
    """A decoder block: h + attention(norm(h)), then + mlp(norm(h)). Subclasses name their modules in
    ROLES: (first norm, attention, second norm, MLP)."""

    ROLES: tuple[str, str, str, str]

    def forward(self, h, ctx: ForwardContext, layer: int):
        h, out = self.residual_step(h, None, ctx, layer, residual_fusion(h))
        return h + out

    def residual_step(self, h, add, ctx: ForwardContext, layer: int, fused: bool):
        """(h + add + attention, the MLP's output not yet added): with `fused`, the adds in the norms."""
        ln1, attn, ln2, mlp = (getattr(self, n) for n in self.ROLES)
        h, x = add_rms_norm(h, add, ln1, fused)
        h, x = add_rms_norm(h, attn(x, ctx, layer), ln2, fused)
        return h, mlp(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def ntk_alpha(length: int, seq_length: int) -> float:
    """Qwen's dynamic-NTK alpha: 2**ceil(log2(L/S) + 1) - 1, at least 1."""
    context_value = math.log(length / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def logn_scale(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """LogN factor for the query at 0-based position p: log_S(p+1) beyond S, else 1."""
    p1 = (positions + 1).double()
    return torch.where(p1 > seq_length, torch.log(p1) / math.log(seq_length), torch.ones_like(p1)).float()


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, base: float,
                   alphas: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, T, D) in fp32 for integer positions (B, T); `alphas` (B,) scale the base."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    if alphas is None:
        inv_freq = (1.0 / base ** exponent).expand(positions.shape[0], -1)  # (B, D/2)
    else:
        bases = base * alphas.double() ** (head_dim / (head_dim - 2))
        inv_freq = torch.stack([1.0 / float(b) ** exponent for b in bases.tolist()])
    freqs = positions.float()[..., None] * inv_freq[:, None, :]  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class KVCache:
    """Per-layer keys/values (B, H_kv, S, D), grown by concatenation: the simple reference cache.

    `int8=True` keeps the values an 8-bit cache would give back (quant/kv.py: centered keys), with the
    engines' semantics: the first chunk attends to its own exact keys/values, later chunks to stored ones."""

    def __init__(self, num_layers: int, int8: bool = False):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.ntk_alphas: torch.Tensor | None = None  # frozen at prefill
        self.int8 = int8
        self.key_centers: list[torch.Tensor | None] = [None] * num_layers
        self.chunk_mask: torch.Tensor | None = None  # (B, T) the current chunk's real tokens

    @property
    def seq_len(self) -> int:
        return 0 if self.layers[0] is None else self.layers[0][0].shape[2]

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        exact = (k, v)
        first = self.layers[i] is None
        if self.int8:
            from ..quant.kv import fake_quantize, key_center

            if first:
                self.key_centers[i] = key_center(k, self.chunk_mask)
            k = fake_quantize(k.float() - self.key_centers[i][:, :, None]).to(v.dtype)
            v = fake_quantize(v)
        if not first:
            k = torch.cat((self.layers[i][0], k), dim=2)
            v = torch.cat((self.layers[i][1], v), dim=2)
        self.layers[i] = (k, v)
        return exact if first else (k, v)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (used when finished sequences leave the batch)."""
        self.layers = [None if kv is None else (kv[0][rows], kv[1][rows]) for kv in self.layers]
        self.key_centers = [None if c is None else c[rows] for c in self.key_centers]
        if self.ntk_alphas is not None:
            self.ntk_alphas = self.ntk_alphas[rows]


@dataclass
class ForwardContext:
    """What every attention layer of one forward call shares."""

    cos: torch.Tensor  # (B, T, D) fp32
    sin: torch.Tensor
    logn: torch.Tensor | None  # (B, T) fp32, or None when inactive
    mask: torch.Tensor | None  # (B, 1, T, S) bool, True = may attend; None = plain causal
    cache: KVCache | None
    # a one-token step's cache write + attention in one object (`attend(layer, q, k, v)`, engines on
    # GPU: engine/cache.py KernelAttention); None: write through `cache`, attend with SDPA
    decode: object | None = None


def attention_mask_4d(key_valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, S) validity of keys -> (B, 1, T, S) causal mask for the last T queries."""
    s = key_valid.shape[1]
    q_pos = torch.arange(s - q_len, s, device=key_valid.device)[:, None]
    causal = torch.arange(s, device=key_valid.device)[None, :] <= q_pos  # (T, S)
    mask = causal[None] & key_valid[:, None, :].bool()
    # a padding query sees no valid key; let it see itself so softmax stays finite (its output is unused)
    mask |= (torch.arange(s, device=key_valid.device)[None, :] == q_pos)[None]
    return mask[:, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext,
           layer: int) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, H_kv, T, D) -> (B, T, H*D): rotary, LogN, cache, SDPA."""
    if ctx.decode is not None and ctx.decode.rotates:  # rotary and the cache write in its kernel
        out = ctx.decode.attend_rotating(layer, q, k, v, ctx.cos, ctx.sin, ctx.logn)  # (B, H, 1, D)
        b, h, t, d = out.shape
        return out.transpose(1, 2).reshape(b, t, h * d)
    q, k = rotary_qk(q, k, ctx.cos, ctx.sin, ctx.logn)
    if ctx.decode is not None:
        out = ctx.decode.attend(layer, q, k, v)  # (B, H, 1, D)
        b, h, t, d = out.shape
        return out.transpose(1, 2).reshape(b, t, h * d)
    if ctx.cache is not None:
        k, v = ctx.cache.update(layer, k, v)
    gqa = k.shape[1] != q.shape[1]  # grouped-query attention: SDPA shares kv heads, no copies
    if ctx.mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, enable_gqa=gqa)
    b, h, t, d = out.shape
    return out.transpose(1, 2).reshape(b, t, h * d)
