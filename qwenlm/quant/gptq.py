"""GPTQ checkpoints in the format of the original Qwen-*-Chat-Int4/-Int8 releases (AutoGPTQ's
"cuda-old" packing, spec §5), read without auto-gptq or optimum.

Per quantized linear layer (in_features K, out_features N, b bits, group size g):
  qweight int32 (K*b/32, N): row r holds input rows k = r*(32/b) + j at bit offset b*j (LSB first)
  qzeros  int32 (ceil(K/g), N*b/32): column c holds output columns n = c*(32/b) + j; stored = zero - 1
  scales  fp16  (ceil(K/g), N);  g_idx int32 (K): the group of input row k (k // g unless desc_act)
  W[k, n] = scales[g_idx[k], n] * (q[k, n] - (stored_zero[g_idx[k], n] + 1))

On a CPU, layers become `Q4Linear` blocks of the same values (a GPTQ group of 128 is four blocks of
32; 4 bits: d = scale and m = -scale * zero; 8 bits: signed codes), so they run on the AVX2 kernel; act-order
(desc_act) checkpoints permute the input columns so that groups are contiguous. On a GPU, 4- and
8-bit layers stay packed and run on a Triton kernel (kernels/gptq.py). Without either kernel
(no AVX2, no Triton) layers are dequantized to the model's dtype once at load.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger("qwenlm")


@dataclass
class GPTQConfig:
    bits: int
    group_size: int
    desc_act: bool = False
    sym: bool = True

    @classmethod
    def from_checkpoint(cls, path: str, raw_config: dict) -> "GPTQConfig | None":
        """From config.json's `quantization_config` (quant_method gptq) or quantize_config.json."""
        q = raw_config.get("quantization_config")
        if q is not None and str(q.get("quant_method", "gptq")).lower() != "gptq":
            raise ValueError(f"quantization method {q.get('quant_method')!r} is not supported (GPTQ is)")
        if q is None:
            p = os.path.join(path, "quantize_config.json")
            if not os.path.isfile(p):
                return None
            with open(p, encoding="utf-8") as f:
                q = json.load(f)
        cfg = cls(bits=int(q.get("bits", 4)), group_size=int(q.get("group_size", 128)),
                  desc_act=bool(q.get("desc_act", False)), sym=bool(q.get("sym", True)))
        if cfg.bits not in (4, 8):
            raise ValueError(f"GPTQ with {cfg.bits} bits is not supported (4 and 8 are)")
        if cfg.group_size == -1:
            cfg.group_size = 0  # one group per column: resolved per layer
        return cfg


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> the int32 with the same bits."""
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(K, N) codes -> qweight (K*bits/32, N)."""
    per = 32 // bits
    k, n = q.shape
    if k % per:
        raise ValueError(f"in_features {k} is not a multiple of {per}")
    q = (q.to(torch.int64) & ((1 << bits) - 1)).view(k // per, per, n)
    shifts = (torch.arange(per, dtype=torch.int64, device=q.device) * bits)[None, :, None]
    return _to_int32((q << shifts).sum(1))


def unpack_rows(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight (K*bits/32, N) -> (K, N) codes as int32."""
    per = 32 // bits
    shifts = (torch.arange(per, dtype=torch.int32, device=qweight.device) * bits)[None, :, None]
    q = (qweight[:, None, :] >> shifts) & ((1 << bits) - 1)
    return q.reshape(-1, qweight.shape[1])


def pack_cols(z: torch.Tensor, bits: int) -> torch.Tensor:
    """(G, N) values -> (G, N*bits/32), packing output columns."""
    per = 32 // bits
    g, n = z.shape
    if n % per:
        raise ValueError(f"out_features {n} is not a multiple of {per}")
    z = (z.to(torch.int64) & ((1 << bits) - 1)).view(g, n // per, per)
    shifts = (torch.arange(per, dtype=torch.int64, device=z.device) * bits)[None, None, :]
    return _to_int32((z << shifts).sum(-1))


def unpack_cols(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    shifts = (torch.arange(per, dtype=torch.int32, device=qzeros.device) * bits)[None, None, :]
    z = (qzeros[:, :, None] >> shifts) & ((1 << bits) - 1)
    return z.reshape(qzeros.shape[0], -1)


class GPTQLinear(nn.Module):
    """A GPTQ layer as stored; `weight()` dequantizes it to (N, K) like nn.Linear's weight."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        g = group_size if group_size > 0 else in_features
        groups = -(-in_features // g)
        self.register_buffer("qweight", torch.empty(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.empty(groups, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32))
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, N) codes and (G, N) real zeros (stored + 1)."""
        return unpack_rows(self.qweight, self.bits), unpack_cols(self.qzeros, self.bits) + 1

    def grouped_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(K, N) codes, (G, N) real zeros and (K,) groups with the input rows sorted by group, and the
        permutation that sorted them (act-order checkpoints; None when they already were), so that
        every group is a contiguous run of rows for the kernels."""
        q, zeros = self.codes()
        g = self.g_idx.long()
        perm = None
        if bool((g[1:] < g[:-1]).any()):
            perm = torch.argsort(g, stable=True)
            q, g = q[perm], g[perm]
        return q, zeros, g, perm

    def weight(self, dtype=torch.float32) -> torch.Tensor:
        q, zeros = self.codes()
        g = self.g_idx.long()
        w = (q.float() - zeros.float()[g]) * self.scales.float()[g]  # (K, N)
        return w.t().to(dtype).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # reference path; loading replaces these layers
        y = x @ self.weight(x.dtype).t()
        return y if self.bias is None else y + self.bias.to(y.dtype)


def install_gptq_layers(model, cfg: GPTQConfig, names_in_checkpoint: set[str]) -> int:
    """Replace the target nn.Linear layers of a (meta) model by GPTQLinear, with a bias wherever
    the checkpoint has one (AutoGPTQ stores one for every layer, often zeros)."""
    n = 0
    for name, lin in model.block_linears():
        if f"{name}.qweight" not in names_in_checkpoint:
            continue
        model.replace_module(name, GPTQLinear(lin.in_features, lin.out_features, cfg.bits, cfg.group_size,
                                              bias=f"{name}.bias" in names_in_checkpoint))
        n += 1
    if n == 0:
        raise ValueError("the config says GPTQ, but the checkpoint has no `.qweight` tensors for the decoder layers")
    return n


def gptq_to_q4(layer: GPTQLinear):
    """A GPTQ layer -> Q4Linear blocks with the same values (scales and offsets to fp16 rounding):
    4 bits: codes q, d = scale, m = -scale * zero; 8 bits: signed codes q - 128, d = scale,
    m = scale * (128 - zero)."""
    from .q4 import BLOCK, Q4Linear, pack_q4

    q, zeros, g, perm = layer.grouped_codes()  # (K, N), (G, N), (K,)
    k, n = q.shape
    if k % BLOCK:
        raise ValueError(f"in_features {k} is not a multiple of {BLOCK}")
    blocks = g.view(k // BLOCK, BLOCK)
    if not bool((blocks == blocks[:, :1]).all()):
        raise ValueError("a 32-column block spans two GPTQ groups")
    bg = blocks[:, 0]  # group of each block
    scale = layer.scales.float()[bg].t()  # (N, K/32)
    zero = zeros.float()[bg].t()
    qt = q.t().contiguous().view(n, k // BLOCK, BLOCK)  # (N, K/32, 32)
    if layer.bits == 8:
        codes, m = (qt - 128).to(torch.int8).contiguous(), scale * (128 - zero)
    else:
        codes, m = pack_q4(qt), -scale * zero
    return Q4Linear(codes=codes, d=scale.half().contiguous(), m=m.half().contiguous(),
                    bias=None if layer.bias is None else layer.bias.detach(), perm=perm)


def _triton_group(model, cfg: GPTQConfig) -> int | None:
    """The group size the GPU kernel will see (a whole column when the checkpoint has no groups), or
    None when it cannot take it (a multiple of 32 dividing every layer's input size)."""
    sizes = {mod.in_features for mod in model.modules() if isinstance(mod, GPTQLinear)}
    group = cfg.group_size or None
    if group is None:
        return min(sizes) if len(sizes) == 1 and min(sizes) % 32 == 0 else None
    return group if group % 32 == 0 and all(k % group == 0 for k in sizes) else None


def finish_gptq(model, cfg: GPTQConfig, dtype: torch.dtype) -> str:
    """After loading: make the GPTQ layers fast on this device. Returns a short description."""
    from . import q4

    from ..kernels import kernel_works

    use_q4 = model.device.type == "cpu" and q4.available()
    group = None if use_q4 else _triton_group(model, cfg)
    use_triton = group is not None and kernel_works("gptq", model.device, dtype, bits=cfg.bits, group=group)
    for mod in model.modules():  # AutoGPTQ's extra all-zero biases: drop them (they cost a kernel each)
        if isinstance(mod, GPTQLinear) and mod.bias is not None and not bool(mod.bias.any()):
            mod.bias = None
    if use_q4:  # the Q4 kernel takes fp32 activations (before: Q4 keeps fp16 scales; a stored table stays)
        from .int4 import cast_all_but_blocks

        cast_all_but_blocks(model, torch.float32)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, GPTQLinear):
            continue
        if use_q4:
            new = gptq_to_q4(mod)
        elif use_triton:
            from ..kernels.gptq import GPTQTritonLinear

            new = GPTQTritonLinear.from_gptq(mod)
        else:
            new = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            new.weight = nn.Parameter(mod.weight(dtype), requires_grad=False)
            if mod.bias is not None:
                new.bias = nn.Parameter(mod.bias.detach().to(dtype), requires_grad=False)
        model.replace_module(name, new)
    if use_q4:
        return f"gptq-{cfg.bits}bit-g{cfg.group_size} on the AVX2 CPU kernel"
    if use_triton:
        return f"gptq-{cfg.bits}bit-g{cfg.group_size} on the Triton kernel"
    why = "no working Triton kernel" if model.device.type != "cpu" else "the AVX2 CPU kernel is unavailable here"
    log.warning("GPTQ %d-bit layers dequantized to %s at load (%s)", cfg.bits, str(dtype).replace("torch.", ""), why)
    return f"gptq-{cfg.bits}bit-g{cfg.group_size} dequantized"
