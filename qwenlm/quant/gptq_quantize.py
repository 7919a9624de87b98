"""The GPTQ algorithm (Frantar et al., 2022) and `qwen quantize`'s pipeline.

For each decoder block in turn: run the calibration activations through it, accumulate for each of its
linear layers the Hessian H = 2/n * X^T X of that layer's inputs, quantize the layer's weight column by
column, compensating each column's rounding error on the not-yet-quantized columns through the inverse
Hessian (Cholesky form, dampened by 1% of its mean diagonal, processed in blocks of 128 columns), then
run the activations through the quantized block to feed the next one. Only one block's activations
and Hessians are in memory at a time.

Output: the original Qwen Int4/Int8 checkpoint layout (gptq.py), which AutoGPTQ and vLLM also read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil

import torch
from torch import nn

from .gptq import pack_cols, pack_rows

log = logging.getLogger("qwenlm")


def _group_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for the columns w (N, c), asymmetric min/max or symmetric."""
    qmax = 2**bits - 1
    lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
    if sym:
        amax = torch.maximum(lo.abs(), hi)
        scale = (2 * amax / qmax).clamp(min=1e-8)
        zero = torch.full_like(scale, (qmax + 1) / 2)
    else:
        scale = ((hi - lo) / qmax).clamp(min=1e-8)
        # the format stores zero - 1 in `bits` bits, so a zero of 0 cannot be written: use 1 (the grid
        # then reaches down to -scale and up to (qmax - 1) * scale)
        scale = torch.where(lo == 0, (hi / (qmax - 1)).clamp(min=1e-8), scale)
        zero = torch.round(-lo / scale).clamp(min=1)
    # the checkpoint stores scales in fp16: use the rounded value for the codes too
    scale = scale.half().float()
    return scale, zero


def gptq_quantize_weight(w: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, act_order: bool = False,
                         damp: float = 0.01, sym: bool = True, block: int = 128) -> dict[str, torch.Tensor]:
    """Quantize one (N, K) weight given the (K, K) Hessian of its inputs.
    Returns the GPTQ tensors (qweight, qzeros, scales, g_idx) and "dequantized" (N, K)."""
    W = w.detach().float().clone()
    n, k = W.shape
    H = H.float().clone()
    gs = group_size if group_size > 0 else k
    qmax = 2**bits - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    Q = torch.zeros_like(W)
    codes = torch.zeros(n, k, dtype=torch.int64)
    groups = math.ceil(k / gs)
    scales = torch.zeros(groups, n)
    zeros = torch.zeros(groups, n)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        W1 = W[:, b0:b1].clone()
        Err = torch.zeros_like(W1)
        Hb = Hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % gs == 0:  # a new group: its parameters from the current (error-updated) weights
                g = col // gs
                cols = torch.cat((W1[:, i:], W[:, b1:]), dim=1)[:, :gs]
                scales[g], zeros[g] = _group_params(cols, bits, sym)
            g = col // gs
            s, z = scales[g], zeros[g]
            wcol = W1[:, i]
            q = torch.clamp(torch.round(wcol / s) + z, 0, qmax)
            codes[:, col] = q.long()
            Q[:, col] = s * (q - z)
            err = (wcol - Q[:, col]) / Hb[i, i]
            W1[:, i:] -= err[:, None] * Hb[i, i:][None, :]
            Err[:, i] = err
        W[:, b1:] -= Err @ Hinv[b0:b1, b1:]
    g_idx = torch.arange(k, dtype=torch.int32) // gs
    if perm is not None:  # back to the original column order; groups stay those of the permuted order
        inv = torch.argsort(perm)
        codes, Q = codes[:, inv], Q[:, inv]
        g_idx = g_idx[inv]
    zeros_i = zeros.long().clamp(0, qmax)
    return {"qweight": pack_rows(codes.t(), bits), "qzeros": pack_cols(zeros_i - 1, bits),
            "scales": scales.half(), "g_idx": g_idx, "dequantized": Q}


# ---- calibration data ---------------------------------------------------------------------------
def calibration_tokens(tokenizer, sources: list[str], n_samples: int, seq_len: int) -> torch.Tensor:
    """(n_samples, seq_len) token windows from fine-tuning JSON files (the original's format: a list
    of {"conversations": [{"from": "user"|"assistant"|"system", "value": ...}]}), text files, or
    directories of text files (read in sorted order)."""
    texts: list[str] = []
    for src in sources:
        paths = [src]
        if os.path.isdir(src):
            paths = sorted(os.path.join(r, f) for r, _, fs in os.walk(src) for f in fs)
        elif not os.path.isfile(src):
            raise FileNotFoundError(f"calibration data not found: {src}")
        for p in paths:
            texts.extend(_read_calibration_file(p))
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer.encode(t, allowed_special="all"))
        ids.append(tokenizer.eod_id)
        if len(ids) >= n_samples * seq_len:
            break
    if len(ids) < seq_len:
        raise ValueError(f"the calibration data has {len(ids)} tokens; at least --seq-len ({seq_len}) are needed")
    usable = min(n_samples, len(ids) // seq_len)
    if usable < n_samples:
        log.warning("calibration data gives %d windows of %d tokens (asked for %d)", usable, seq_len, n_samples)
    return torch.tensor(ids[:usable * seq_len]).view(usable, seq_len)


def _read_calibration_file(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        return []  # binary files inside a directory are skipped
    if path.endswith(".json") or path.endswith(".jsonl"):
        try:
            items = json.loads(text) if path.endswith(".json") else [json.loads(x) for x in text.splitlines() if x.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None
        out = []
        for item in items if isinstance(items, list) else [items]:
            conv = item.get("conversations") if isinstance(item, dict) else None
            if not conv:
                raise ValueError(f"{path}: expected a list of {{\"conversations\": [...]}} items")
            turns = [f"<|im_start|>{'assistant' if t.get('from') == 'assistant' else t.get('from', 'user')}\n"
                     f"{t.get('value', '')}<|im_end|>" for t in conv]
            if conv[0].get("from") != "system":
                turns.insert(0, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
            out.append("\n".join(turns))
        return out
    return [text]


# ---- the pipeline ---------------------------------------------------------------------------------
@torch.no_grad()
def quantize_model(model, tokens: torch.Tensor, bits: int, group_size: int, act_order: bool,
                   damp: float = 0.01, batch: int = 4, progress=None, sym: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """GPTQ every target linear layer of `model` (fp32, CPU or GPU), block by block. Returns the
    tensors to save per layer name; the model's weights are left quantized-dequantized."""
    dev = model.device
    n, t = tokens.shape
    ctx = model._context(None, None, batch, t, None, dev)
    h = torch.cat([model.embed(tokens[i:i + batch].to(dev)).float() for i in range(0, n, batch)])
    targets = model.block_linears()
    result: dict[str, dict[str, torch.Tensor]] = {}
    for bi, block in enumerate(model.blocks):
        inside = {id(m) for m in block.modules()}
        layers = {name: m for name, m in targets if id(m) in inside}
        hess = {name: torch.zeros(m.in_features, m.in_features, device=dev) for name, m in layers.items()}
        count = {name: 0 for name in layers}

        def hook(name):
            def fn(mod, args, out):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                c = count[name]
                hess[name].mul_(c / (c + x.shape[0])).add_(x.t() @ x, alpha=2 / (c + x.shape[0]))
                count[name] = c + x.shape[0]
            return fn
        handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
        for i in range(0, n, batch):
            block(h[i:i + batch], _ctx_for(ctx, h[i:i + batch].shape[0]), bi)
        for hd in handles:
            hd.remove()
        for name, m in layers.items():
            r = gptq_quantize_weight(m.weight.data.cpu(), hess[name].cpu(), bits, group_size, act_order, damp, sym)
            m.weight.data.copy_(r.pop("dequantized").to(m.weight.dtype))
            if m.bias is not None:
                r["bias"] = m.bias.detach().half().cpu()
            result[name] = r
        for i in range(0, n, batch):  # the quantized block's outputs feed the next block
            h[i:i + batch] = block(h[i:i + batch], _ctx_for(ctx, h[i:i + batch].shape[0]), bi)
        if progress:
            progress(bi + 1, len(model.blocks))
    return result


def _ctx_for(ctx, b: int):
    from ..models.layers import ForwardContext

    return ForwardContext(cos=ctx.cos[:b], sin=ctx.sin[:b], logn=None if ctx.logn is None else ctx.logn[:b],
                          mask=None, cache=None)


def save_gptq_checkpoint(src: str, out: str, model, tensors: dict[str, dict[str, torch.Tensor]], bits: int,
                         group_size: int, act_order: bool, damp: float, sym: bool = True) -> None:
    """Write `out` in the original layout: quantized layers as GPTQ tensors, the rest in fp16."""
    from safetensors.torch import save_file

    state = {}
    quantized = {f"{name}.weight" for name in tensors} | {f"{name}.bias" for name in tensors}
    for name, p in model.state_dict().items():
        if name in quantized or (name == "lm_head.weight" and model.config.tie_word_embeddings):
            continue
        state[name] = p.detach().half().cpu().contiguous()
    for name, r in tensors.items():
        for k, v in r.items():
            state[f"{name}.{k}"] = v.contiguous()
    os.makedirs(out, exist_ok=True)
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    qc = {"bits": bits, "group_size": group_size, "damp_percent": damp, "desc_act": act_order,
          "static_groups": False, "sym": sym, "true_sequential": False, "model_name_or_path": None,
          "model_file_base_name": "model"}
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {**qc, "quant_method": "gptq"}
    cfg.pop("torch_dtype", None)
    cfg["torch_dtype"] = "float16"
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out, "quantize_config.json"), "w", encoding="utf-8") as f:
        json.dump(qc, f, indent=2)
    from .gguf_blocks import SOURCE_FILE

    for name in os.listdir(src):  # tokenizer and generation files travel with the weights (not the
        # note of a GGUF the source was converted from: these weights are not that file's blocks)
        if name.endswith((".json", ".tiktoken", ".txt", ".model")) and name not in (
                "config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", "quantize_config.json",
                SOURCE_FILE):
            shutil.copy(os.path.join(src, name), os.path.join(out, name))


def nll(model, tokens: torch.Tensor, batch: int = 4) -> tuple[float, int]:
    """Summed negative log-likelihood and token count of next-token prediction over (n, t) windows."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, tokens.shape[0], batch):
            x = tokens[i:i + batch].to(model.device)
            logits = model(x).logits.float()
            total += nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(),
                                                 reduction="sum").item()
            count += x[:, 1:].numel()
    return total, count
