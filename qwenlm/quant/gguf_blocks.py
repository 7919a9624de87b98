"""A GGUF file's own quantized blocks on the CPU kernel (`quantize="gguf"`), instead of quantizing its
dequantized weights a second time.

The kernel's blocks (q4.py) are 32 weights w = d * q + m with fp16 d and m, and codes of 4 bits (0..15),
5 bits (0..31) or 8 bits (signed). llama.cpp's formats map onto them:
- Q8_0 (w = d * q, q signed 8-bit): 8-bit blocks, exactly.
- Q5_0 (w = d * (q - 16), q 5-bit): 5-bit blocks with m = -16 d, exactly (8-bit ones where a row has
  an odd number of blocks: the kernel's 5-bit blocks go in pairs).
- Q4_K (super-blocks of 256: w = d * sc_j * q - dmin * m_j for each sub-block j of 32, with 6-bit sc_j and
  m_j): 4-bit blocks with d * sc_j and -dmin * m_j rounded to fp16 (a relative error below 2^-11 on
  each block's scale and offset; the codes are the file's).
- anything else (Q6_K, Q5_K, F16, ...): its dequantized weights, quantized to 8 bits (what
  `quantize="int8"` does to every layer).
Layers that the fused decode step multiplies as one (q/k/v, gate/up) must share a width: the narrower
ones are widened, which loses nothing (4-bit codes fit in 5, both fit in 8).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections import Counter
from typing import Iterator

import numpy as np
import torch
from torch import nn

from . import q4
from .int4 import cast_all_but_blocks

log = logging.getLogger("qwenlm")
SOURCE_FILE = "gguf_source.json"  # in a converted checkpoint: the GGUF it came from


def record_source(checkpoint_dir: str, gguf_path: str, reader=None, lean: bool = False) -> None:
    """Note in a converted checkpoint which GGUF file it came from (path and size) and where each
    tensor's blocks are in it (reading a GGUF's header with the `gguf` package takes ~12 s for a
    150k-token vocabulary: too slow for every start). `lean`: the checkpoint holds only the file's
    float tensors; the others are read from the file at load (`file_tensors`)."""
    from ..weights.gguf import checkpoint_name, gguf_metadata, open_gguf

    reader = reader or open_gguf(gguf_path)
    arch = gguf_metadata(reader)["arch"]
    tensors = {checkpoint_name(arch, t.name): [t.tensor_type.name, [int(x) for x in t.shape],
                                               int(t.data_offset), int(t.n_bytes)] for t in reader.tensors}
    st = os.stat(gguf_path)
    with open(os.path.join(checkpoint_dir, SOURCE_FILE), "w", encoding="utf-8") as f:
        json.dump({"path": os.path.abspath(gguf_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                   "arch": arch, "lean": lean, "tensors": tensors}, f)


def recorded_source(checkpoint_dir: str) -> dict | None:
    """What `record_source` noted, whether or not the GGUF file is still there."""
    try:
        with open(os.path.join(checkpoint_dir, SOURCE_FILE), encoding="utf-8") as f:
            src = json.load(f)
        return src if isinstance(src, dict) and isinstance(src.get("tensors"), dict) else None
    except (OSError, ValueError):
        return None


def source_of(checkpoint_dir: str) -> dict | None:
    """What `record_source` noted, if the GGUF file is still there, unchanged (size and time)."""
    src = recorded_source(checkpoint_dir)
    try:
        st = os.stat(src["path"])
        return src if (st.st_size, st.st_mtime_ns) == (int(src["size"]), int(src["mtime_ns"])) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def dequantize_rows(raw: np.ndarray, type_name: str) -> np.ndarray:
    """Rows of a quantized GGUF tensor (R, row bytes) -> float32 (R, row weights), as the `gguf` package
    dequantizes them; when the CPU kernel is there, Q4_K and Q6_K (most of a K-quant file) in one C++
    pass (~10x the package's numpy code), Q5_0 and Q8_0 through the kernel's own blocks: bit for bit
    the same values."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if type_name in ("Q5_0", "Q8_0") and raw.shape[-1] % _BLOCK_BYTES[type_name] == 0 and q4.available():
        # the kernel's own blocks hold these exactly (w = d * q + m: every term exact in float32)
        rows = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, raw.shape[-1])
        k = raw.shape[-1] // _BLOCK_BYTES[type_name] * 32
        codes, d, m, _ = gguf_blocks(type_name, (k, rows.shape[0]), rows)
        return q4._extension().dequantize(codes, d, m).numpy().reshape(*raw.shape[:-1], k)
    size = _K_QUANT_BYTES.get(type_name)
    if size and raw.shape[-1] % size == 0 and q4.available():
        nb = raw.shape[-1] // size
        with warnings.catch_warnings():  # (a read-only memory map: only read)
            warnings.simplefilter("ignore", UserWarning)
            rows = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, nb * size))
        fn = getattr(q4._extension(), "dequantize_" + type_name.lower())
        return fn(rows, nb).numpy().reshape(*raw.shape[:-1], nb * 256)
    return dequantize(raw, GGMLQuantizationType[type_name])


_K_QUANT_BYTES = {"Q6_K": 210, "Q4_K": 144}  # bytes per 256 weights of the types dequantized in C++
_BLOCK_BYTES = {"Q5_0": 22, "Q8_0": 34}  # bytes per 32 weights


def file_tensors(source: dict, names) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, float32 tensor) for each of `names`, dequantized from the GGUF file (the values a full
    conversion stores)."""
    from ..weights.gguf import dequantize_bytes

    data = np.memmap(source["path"], dtype=np.uint8, mode="r")
    for name in names:
        type_name, shape, offset, nbytes = source["tensors"][name]
        yield name, torch.from_numpy(dequantize_bytes(np.asarray(data[offset:offset + nbytes]), type_name, shape))


def _weight_of(mod: nn.Module, entry: str, source: dict) -> torch.Tensor:
    """A linear layer's float weight: loaded, or (a lean checkpoint's, left out of the load) dequantized
    from the file's tensor `entry` now, so that one layer at a time is ever in float."""
    if not mod.weight.is_meta:
        return mod.weight.detach()
    return next(file_tensors(source, [entry]))[1]


def _fits(mod: nn.Module, t) -> bool:
    """Whether a GGUF tensor entry (type, shape, offset, bytes) is the weight of `mod` (an nn.Linear)."""
    return t is not None and list(t[1]) == [mod.in_features, mod.out_features]


def _block_entry(mod: nn.Module, t) -> bool:
    """Whether a GGUF tensor entry gives `mod` its blocks as they are (`gguf_blocks` maps its type),
    rather than 8 bits from the dequantized weight."""
    return _fits(mod, t) and t[0] in _DECODERS


def _linear_entries(model: nn.Module, source: dict) -> dict[str, tuple[nn.Module, str | None]]:
    """Each nn.Linear of the model by name, with the name of its weight's GGUF entry (or None): a
    tied head's is the embedding table's."""
    tensors = source["tensors"]
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            entry = name + ".weight"
            if entry not in tensors and name == "lm_head" and getattr(model.config, "tie_word_embeddings", False):
                entry = _embedding_name(source["arch"])
            out[name] = (mod, entry if entry in tensors else None)
    return out


def file_weights(model: nn.Module, source: dict) -> set[str]:
    """The linear weights that `quantize_model_gguf` reads from the file itself: a lean checkpoint's
    loading leaves them out. Those with blocks it maps are never dequantized; the others are, one
    layer at a time, on their way to 8 bits (a 7B file's Q6_K layers would take ~6 GB in fp32 at once)."""
    return {name + ".weight" for name, (mod, e) in _linear_entries(model, source).items()
            if e == name + ".weight" and _fits(mod, source["tensors"][e])}


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian fp16 values from (..., 2) bytes, as float16."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0]


# Each decoder: raw bytes (N, row bytes) -> the kernel's code bytes (see q4.py), d and m (N, K/32), width
def _q8_0(raw: np.ndarray, n: int, k: int):
    b = raw.reshape(n, k // 32, 34)  # fp16 d, 32 signed codes
    d = _f16(b[..., 0:2])
    return np.ascontiguousarray(b[..., 2:]).view(np.int8), d, np.zeros_like(d), 8


def _q5_0(raw: np.ndarray, n: int, k: int):
    if (k // 32) % 2 == 0:  # the kernel's 5-bit blocks go in pairs: one C++ pass (pack_q5_words in torch)
        with warnings.catch_warnings():  # (a read-only memory map: only read)
            warnings.simplefilter("ignore", UserWarning)
            rows = torch.from_numpy(raw.reshape(n, -1))
        codes, d = q4._extension().repack_q5_0(rows, k // 32)
        return codes.numpy(), d.numpy(), (d.float() * -16).half().numpy(), 5
    b = raw.reshape(n, k // 32, 22)  # fp16 d, the fifth bits' 32-bit word, 16 bytes of low nibbles
    d = _f16(b[..., 0:2])
    m = (d.astype(np.float32) * -16).astype(np.float16)
    nibbles = torch.from_numpy(np.ascontiguousarray(b[..., 6:22]))
    qh = torch.from_numpy(np.ascontiguousarray(b[..., 2:6]))
    fifth = ((qh[..., :, None] >> torch.arange(8, dtype=torch.uint8)) & 1).flatten(-2)  # (N, K/32, 32)
    codes = torch.cat((nibbles & 0x0F, nibbles >> 4), -1) | (fifth << 4)
    return codes.to(torch.int8).numpy(), d, m, 8


def _q4_k(raw: np.ndarray, n: int, k: int):
    b = raw.reshape(n, k // 256, 144)
    d = _f16(b[..., 0:2]).astype(np.float32)[..., None]  # (n, k/256, 1)
    dmin = _f16(b[..., 2:4]).astype(np.float32)[..., None]
    s = b[..., 4:16].astype(np.int32)  # 12 bytes: eight 6-bit scales and eight 6-bit minimums
    sc = np.concatenate((s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)), axis=-1)
    mn = np.concatenate((s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)), axis=-1)
    qs = b[..., 16:].reshape(n, k // 256, 4, 32)  # 4 chunks of 64 weights: low nibbles, then high
    codes = np.stack((qs & 0x0F, qs >> 4), axis=3).reshape(n, k // 32, 32)  # one 0..15 code per weight
    scale = (d * sc).reshape(n, k // 32).astype(np.float16)
    offset = (-dmin * mn).reshape(n, k // 32).astype(np.float16)
    return q4.pack_q4(torch.from_numpy(codes)).numpy(), scale, offset, 4


_DECODERS = {"Q8_0": _q8_0, "Q5_0": _q5_0, "Q4_K": _q4_k}


def gguf_blocks(type_name: str, shape, raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """A 2-D GGUF tensor's blocks (its type's name, its GGUF shape (K, N), its bytes) as the kernel's
    code bytes (see q4.py), d and m (N, K/32) fp16 and the code width (4, 5 or 8); None for a type
    with no exact (or near-exact) mapping."""
    fn = _DECODERS.get(type_name)
    if fn is None:
        return None
    k, n = (int(x) for x in shape[:2])
    codes, d, m, bits = fn(np.asarray(raw, dtype=np.uint8), n, k)
    return torch.from_numpy(codes), torch.from_numpy(np.ascontiguousarray(d)), \
        torch.from_numpy(np.ascontiguousarray(m)), bits


def widen(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Code bytes of any width -> the same codes at width `bits` (no narrower than theirs; 5 bits
    becomes 8 where the blocks cannot pair up)."""
    if q4.code_bits(codes) == bits:
        return codes
    q = q4.unpack_codes(codes)
    if bits == 5 and q.shape[1] % 2 == 0:
        return q4.pack_q5(q)
    return q.to(torch.int8).contiguous()


def quantize_model_gguf(model: nn.Module, source: dict) -> nn.Module:
    """Replace every nn.Linear by a Q4Linear holding the blocks of the GGUF file that `source` (from
    `source_of`) describes (see the module doc)."""
    if model.device.type != "cpu" or not q4.available():
        raise ValueError("the GGUF file's blocks run on the CPU kernel (AVX2/FMA/F16C), unavailable here")
    data = np.memmap(source["path"], dtype=np.uint8, mode="r")
    cast_all_but_blocks(model, torch.float32)
    made: dict[str, tuple] = {}
    kinds = Counter()
    for name, (mod, entry) in _linear_entries(model, source).items():
        t, got = source["tensors"].get(entry), None
        if _block_entry(mod, t):
            type_name, shape, offset, nbytes = t
            got = gguf_blocks(type_name, shape, data[offset:offset + nbytes].reshape(mod.out_features, -1))
        if got is None:  # no exact mapping: 8 bits from the dequantized weight
            codes, d, m = q4.quantize_q8(_weight_of(mod, entry, source))
            got = (codes, d, m, 8)
            kinds["re-quantized to 8 bits" + ("" if t is None else f" ({t[0]})")] += 1
        else:
            kinds[t[0]] += 1
        made[name] = got
    # the layers that are multiplied as one share the widest code width
    names = {mod: name for name, mod in model.named_modules()}
    for block in model.blocks:
        p = block.parts() if hasattr(block, "parts") else None
        for group in ([] if p is None else (p["qkv"], [p["gate"], p["up"]])):
            members = [names[lay] for lay in group if names.get(lay) in made]
            widest = max((made[n][3] for n in members), default=4)
            for n in members:
                codes, d, m, _ = made[n]
                made[n] = (codes, d, m, widest)
    for name, (codes, d, m, bits) in made.items():
        mod = model.get_submodule(name)
        bias = None if mod.bias is None else mod.bias.detach()
        model.replace_module(name, q4.Q4Linear(codes=widen(codes, bits), d=d.half(), m=m.half(), bias=bias))
    model.quantization = "gguf-blocks"
    log.info("the GGUF file's own blocks: %s", ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())))
    return model


class FileEmbedding(nn.Module):
    """An embedding table left in a GGUF file's own blocks (memory-mapped: only the rows looked up
    are ever read), each looked-up row dequantized as the conversion dequantizes the whole table
    (`dequantize_rows`: the same fp32 values). A lean checkpoint's table on a CPU: dequantized at load
    it took 2.3 GiB for a 7B file, and time at every start."""

    def __init__(self, source: dict, entry: str):
        super().__init__()
        type_name, shape, offset, nbytes = source["tensors"][entry]
        rows = int(shape[1])
        data = np.memmap(source["path"], dtype=np.uint8, mode="r", offset=offset, shape=(nbytes,))
        with warnings.catch_warnings():  # (a read-only memory map: only read)
            warnings.simplefilter("ignore", UserWarning)
            self.register_buffer("blocks", torch.from_numpy(data).view(rows, nbytes // rows), persistent=False)
        self.type_name, self.num_embeddings, self.embedding_dim = type_name, rows, int(shape[0])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.blocks.index_select(0, ids.reshape(-1).to(self.blocks.device))
        out = dequantize_rows(rows.numpy(), self.type_name)
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.type_name} blocks in the GGUF file"


def file_embedding(model: nn.Module, source: dict, quantize: str | None) -> str | None:
    """For a lean checkpoint loaded onto the CPU kernel (`quantize` gguf, int4 or int8): put a
    FileEmbedding in place of the model's table when the file holds it in blocks, and return the
    table's name (which the load then leaves out); None where the table is loaded as before: a float
    table, or a tied head that needs it in float (int4/int8 quantize the head from it)."""
    entry = _embedding_name(source["arch"])
    t = source["tensors"].get(entry)
    if quantize not in ("gguf", "int4", "int8") or not q4.available() or t is None or t[0] in ("F32", "F16"):
        return None
    tied = getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" not in source["tensors"]
    if tied and quantize != "gguf":  # (gguf: the head takes the table's entry, as blocks or in 8 bits)
        return None
    if [int(x) for x in t[1]] != [model.embed.embedding_dim, model.embed.num_embeddings]:
        return None  # (the load reports the wrong shape)
    model.replace_module(entry[:-len(".weight")], FileEmbedding(source, entry))  # (the entry: the model's name)
    return entry


def _embedding_name(arch: str) -> str:
    return "model.embed_tokens.weight" if arch == "qwen2" else "transformer.wte.weight"
