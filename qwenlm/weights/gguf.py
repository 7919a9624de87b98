"""GGUF import: read a `qwen2` or `qwen` GGUF (its header with gguf_reader.py, its tensors with the `gguf`
package) into a checkpoint directory.

Owns: validating the file, mapping llama.cpp tensor names back to the checkpoints' own names,
dequantising (Q4_K, Q5_K, Q6_K, Q8_0, Q5_0, Q4_0, F16, BF16, F32, ... whatever `gguf` can read),
and writing config.json, generation_config.json, tokenizer files and safetensors shards.
"""

from __future__ import annotations

import os
import re

import numpy as np

from ..tokenizer.vocab import Vocab, vocab_from_gguf_tokens

# llama.cpp block names -> checkpoint names, per architecture. Qwen/Qwen2 use NeoX rotary, so
# llama.cpp's converter leaves q/k unpermuted and the weights map back one to one.
_BLOCK_NAMES = {
    "qwen2": {
        "attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
        "attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
        "attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
        "attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
        "attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
        "attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
        "attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
        "attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
        "ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
        "ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
        "ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
        "ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    },
    "qwen": {
        "attn_norm.weight": "transformer.h.{i}.ln_1.weight",
        "attn_qkv.weight": "transformer.h.{i}.attn.c_attn.weight",
        "attn_qkv.bias": "transformer.h.{i}.attn.c_attn.bias",
        "attn_output.weight": "transformer.h.{i}.attn.c_proj.weight",
        "ffn_norm.weight": "transformer.h.{i}.ln_2.weight",
        "ffn_up.weight": "transformer.h.{i}.mlp.w1.weight",
        "ffn_gate.weight": "transformer.h.{i}.mlp.w2.weight",
        "ffn_down.weight": "transformer.h.{i}.mlp.c_proj.weight",
    },
}
_TOP_NAMES = {
    "qwen2": {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"},
    "qwen": {"token_embd.weight": "transformer.wte.weight", "output_norm.weight": "transformer.ln_f.weight",
             "output.weight": "lm_head.weight"},
}
_BLK = re.compile(r"blk\.(\d+)\.(.+)")


class GGUFError(ValueError):
    """A GGUF file that cannot be read or is not a Qwen model."""


def open_gguf(path: str):
    """The file's header (gguf_reader.HeaderReader: fields and tensor table)."""
    from .gguf_reader import HeaderReader

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file (bad magic bytes)")
    try:
        return HeaderReader(path)
    except Exception as e:  # a damaged header
        raise GGUFError(f"{path} is damaged or truncated and cannot be read ({type(e).__name__}: {e})") from e


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_gguf_vocab(path_or_reader) -> Vocab:
    reader = open_gguf(path_or_reader) if isinstance(path_or_reader, str) else path_or_reader
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    if tokens is None or types is None:
        raise GGUFError("the GGUF file has no tokenizer.ggml.tokens / token_type vocabulary")
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise GGUFError("only byte-level BPE ('gpt2') GGUF vocabularies are supported")
    vocab = vocab_from_gguf_tokens(tokens, types)
    template = _field(reader, "tokenizer.chat_template")
    if template:  # (the tool format is read from it: serve/hermes.py)
        vocab.config = {"chat_template": template}
    return vocab


def gguf_metadata(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in _BLOCK_NAMES:
        raise GGUFError(f"GGUF architecture {arch!r} is not supported (expected 'qwen2' or 'qwen')")

    def get(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    return {
        "arch": arch,
        "name": _field(reader, "general.name", ""),
        "n_layer": int(get("block_count")),
        "n_ctx": int(get("context_length", 32768)),
        "n_embd": int(get("embedding_length")),
        "n_ff": int(get("feed_forward_length")),
        "n_head": int(get("attention.head_count")),
        "n_head_kv": int(get("attention.head_count_kv", get("attention.head_count"))),
        "rope_base": float(get("rope.freq_base", 10000.0)),
        "rms_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "bos": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad": _field(reader, "tokenizer.ggml.padding_token_id"),
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }


def checkpoint_name(arch: str, gguf_name: str) -> str:
    top = _TOP_NAMES[arch].get(gguf_name)
    if top:
        return top
    m = _BLK.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES[arch]:
        return _BLOCK_NAMES[arch][m.group(2)].format(i=int(m.group(1)))
    raise GGUFError(f"unexpected tensor {gguf_name!r} in a {arch!r} GGUF")


def dequantize_tensor(t) -> np.ndarray:
    """Float32 array in the checkpoint's (out, in) layout. GGUF shapes are listed innermost first."""
    try:
        return dequantize_bytes(np.asarray(t.data).reshape(-1).view(np.uint8), t.tensor_type.name, t.shape)
    except NotImplementedError as e:
        raise GGUFError(f"tensor {t.name}: GGUF type {t.tensor_type.name} cannot be dequantised") from e


def dequantize_bytes(raw: np.ndarray, type_name: str, gguf_shape) -> np.ndarray:
    """A tensor's bytes in the file (uint8) -> float32 in the checkpoint's layout (the GGUF shape
    reversed): float types as they are, quantized ones row by row (quant/gguf_blocks.dequantize_rows)."""
    from ..quant.gguf_blocks import dequantize_rows

    shape = tuple(int(d) for d in reversed(gguf_shape))
    if type_name == "F32":
        arr = raw.view(np.float32).copy()  # a copy: the memory map is read-only
    elif type_name == "F16":
        arr = raw.view(np.float16).astype(np.float32)
    else:
        arr = dequantize_rows(raw.reshape(int(np.prod(shape[:-1], dtype=np.int64)), -1), type_name)
    return np.ascontiguousarray(arr.reshape(shape), dtype=np.float32)
