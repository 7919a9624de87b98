"""4-bit weight-only linear layers for fast CPU decoding.

Decoding on a CPU is bound by the bytes of weights read per token; 4-bit weights read 4x less than
bf16. Weights are quantized round-to-nearest, asymmetric, per group of `group_size` input columns
(the scheme of llama.cpp's Q4_1 and of torch's int4 CPU kernel), and multiplied with
`aten._weight_int4pack_mm_for_cpu`. `dequantize()` gives the exact weight the kernel uses, so a
test can hold the kernel to a plain matmul.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("qwenlm")


def quantize_rtn(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> q (N, K) int32 in [0, 15], scale and min (N, K/group) fp32."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
    w = weight.float().view(n, k // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = ((w - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
    return q.view(n, k), scale, lo


class Int4Linear(nn.Module):
    """y = x @ dequant(W).T + b with W stored as packed 4-bit groups (CPU kernel)."""

    def __init__(self, linear: nn.Linear, group_size: int = 32):
        super().__init__()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        weight = linear.weight.detach()
        self.padded = -self.out_features % 16  # the kernel packs rows in tiles of 16
        if self.padded:
            weight = torch.cat((weight, weight.new_zeros(self.padded, self.in_features)))
        q, scale, lo = quantize_rtn(weight, group_size)
        # the kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale
        zeros = lo + 8 * scale
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
        self.register_buffer("scales_and_zeros",
                             torch.stack([scale.t(), zeros.t()], dim=-1).contiguous().to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).to(torch.bfloat16), self.packed, self.group_size,
            self.scales_and_zeros)
        if self.padded:
            y = y[:, :self.out_features]
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """The (N, K) weight the kernel multiplies by, from the codes `q` of `quantize_rtn`
        (for a padded layer: of the weight with its zero rows)."""
        sz = self.scales_and_zeros.float()  # (K/g, N, 2)
        scale, zero = sz[..., 0].t(), sz[..., 1].t()  # (N, K/g)
        g = self.group_size
        rows = self.out_features + self.padded
        w = (q.view(rows, -1, g).float() - 8) * scale[..., None] + zero[..., None]
        return w.view(rows, self.in_features)[:self.out_features]


def quantize_model_int4(model: nn.Module, group_size: int = 32) -> nn.Module:
    """Replace every nn.Linear (lm_head included) by a 4-bit layer: Q4Linear (AVX2 kernel, fp32
    activations) where the CPU allows, else Int4Linear (aten kernel, bf16 activations)."""
    if model.device.type != "cpu":
        raise ValueError("4-bit weight-only layers run on CPU only (use bf16 on GPU)")
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise ValueError("this PyTorch has no int4 CPU kernel (needs torch >= 2.6)")
    from . import q4

    use_q4 = q4.available()  # the AVX2 kernel reads ~3x faster than aten's int4 kernel
    # Q4 takes fp32 activations (no casts around every layer; fp32 attention is fast on CPUs);
    # aten's int4 kernel wants bf16
    cast_all_but_blocks(model, torch.float32 if use_q4 else torch.bfloat16)
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    for name, mod in targets:
        model.replace_module(name, q4.Q4Linear(mod) if use_q4 else Int4Linear(mod, group_size))
    # a tied embedding keeps its bf16 table: only the head's copy is quantized
    model.quantization = "q4-avx2" if use_q4 else f"int4-g{group_size}"
    log.info("quantized %d linear layers to 4 bits (%s)", len(targets), model.quantization)
    return model


def quantize_model_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear (lm_head included) by 8-bit blocks of 32 (symmetric, fp16 scale) on the
    AVX2 kernel: half the bytes of bf16 per token, weights within half a step of 1/127 of each block's
    largest value."""
    from . import q4

    if model.device.type != "cpu":
        raise ValueError("8-bit weight-only layers run on CPU only (use bf16 on GPU)")
    if not q4.available():
        raise ValueError("8-bit weight-only layers need the AVX2/FMA/F16C CPU kernel, unavailable here")
    cast_all_but_blocks(model, torch.float32)
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    for name, mod in targets:
        model.replace_module(name, q4.Q4Linear(mod, bits=8))
    model.quantization = "q8-avx2"
    log.info("quantized %d linear layers to 8 bits", len(targets))
    return model


class StoredEmbedding(nn.Module):
    """An embedding table kept as the checkpoint stores it (16-bit, memory-mapped: only the rows looked
    up are ever read), its rows cast to the dtype the model computes in. A quantized CPU model computes
    in fp32, and the table's fp32 copy was the largest thing it held (a 7B model: 2.3 GiB); the cast rows
    are the very values that copy held."""

    def __init__(self, table: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", table)  # (the checkpoint's name: `...embed_tokens.weight`)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight).to(self.dtype)


def cast_all_but_blocks(model: nn.Module, dtype: torch.dtype) -> None:
    """`model.to(dtype)`, except the blocks of layers quantized already (their fp16 scales stay) and
    a table kept as stored."""
    from .q4 import Q4Linear

    done: dict[int, torch.Tensor] = {}  # a tensor shared by two modules (a tied head) stays shared
    for mod in model.modules():
        if isinstance(mod, (Q4Linear, StoredEmbedding)):
            continue
        for name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if t.is_floating_point() and t.dtype != dtype:
                if id(t) not in done:
                    done[id(t)] = nn.Parameter(t.to(dtype), requires_grad=False) if isinstance(t, nn.Parameter) \
                        else t.to(dtype)
                if isinstance(t, nn.Parameter):
                    setattr(mod, name, done[id(t)])
                else:
                    mod.register_buffer(name, done[id(t)])


def streaming_quantizer(model: nn.Module, quantize: str | None):
    """For `load_weights(consume=...)` of a model that will compute in fp32 on a CPU with the AVX2
    kernel: a 16-bit embedding table stays as stored (StoredEmbedding); and with `quantize` "int4" or
    "int8", each linear layer's weight is put into 4- or 8-bit blocks as it is read from the
    checkpoint, so that the load holds one layer's float weight at a time instead of the whole model in
    fp32 (a 1.8B bf16 checkpoint: 9.0 GiB at the peak before, BENCHMARKS.md). The blocks are the ones
    `quantize_model_int4/int8` would make from the same weight; layers the checkpoint does not hold (a
    tied head) are left to them. (`quantize=None`: a GPTQ checkpoint's table; its layers are GPTQ's.)"""
    from . import q4

    if quantize not in (None, "int4", "int8") or not q4.available():
        return None
    bits = 8 if quantize == "int8" else 4
    layers = {} if quantize is None else {
        f"{name}.weight": name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    embedding = next(f"{name}.weight" for name, mod in model.named_modules() if mod is model.embed)

    def consume(name: str, weight: torch.Tensor) -> bool:
        if name == embedding and weight.dtype in (torch.bfloat16, torch.float16):
            model.replace_module(name[:-len(".weight")], StoredEmbedding(weight, torch.float32))
            return True
        layer = layers.pop(name, None)
        if layer is None or weight.shape[1] % q4.BLOCK:
            return False
        old = model.get_submodule(layer)
        codes, d, m = q4.quantize_q8(weight) if bits == 8 else q4.quantize_q4(weight)[:3]
        bias = old.bias if old.bias is not None and not old.bias.is_meta else None  # (read before its weight)
        model.replace_module(layer, q4.Q4Linear(codes=codes, d=d, m=m, bias=bias))
        return True
    return consume
