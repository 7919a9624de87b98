"""`qwen convert MODEL.gguf OUT_DIR`: a GGUF file -> a checkpoint directory our loader reads.

Writes safetensors shards (+ index), config.json, generation_config.json and tokenizer files
(vocab.json + merges.txt + tokenizer_config.json; also qwen.tiktoken for Qwen v1).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..quant import q4
from ..quant.gguf_blocks import record_source
from ..tokenizer.vocab import write_tiktoken_file
from .gguf import GGUFError, _field, checkpoint_name, dequantize_tensor, gguf_metadata, open_gguf, read_gguf_vocab

_SHARD_BYTES = 2 << 30
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_complete(reader, path: str) -> None:
    size = os.path.getsize(path)
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or len(t.data) == 0 and t.n_elements:
            raise GGUFError(f"{path} is truncated: tensor {t.name} ends at byte {end} but the file "
                            f"has {size} bytes")


def _hf_config(meta: dict, shapes: dict[str, tuple], dtype: str) -> dict:
    arch = meta["arch"]
    if arch == "qwen2":
        vocab = shapes["model.embed_tokens.weight"][0]
        return {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "hidden_size": meta["n_embd"], "intermediate_size": meta["n_ff"],
            "num_hidden_layers": meta["n_layer"], "num_attention_heads": meta["n_head"],
            "num_key_value_heads": meta["n_head_kv"], "rms_norm_eps": meta["rms_eps"],
            "rope_theta": meta["rope_base"], "max_position_embeddings": meta["n_ctx"],
            "vocab_size": vocab, "tie_word_embeddings": "lm_head.weight" not in shapes,
            "hidden_act": "silu", "use_sliding_window": False, "sliding_window": meta["n_ctx"],
            "max_window_layers": meta["n_layer"], "attention_dropout": 0.0,
            "bos_token_id": meta["bos"], "eos_token_id": meta["eos"], "torch_dtype": dtype,
        }
    vocab = shapes["transformer.wte.weight"][0]
    mlp_width = shapes["transformer.h.0.mlp.w1.weight"][0]
    return {
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
        "hidden_size": meta["n_embd"], "intermediate_size": 2 * mlp_width,
        "num_hidden_layers": meta["n_layer"], "num_attention_heads": meta["n_head"],
        "kv_channels": meta["n_embd"] // meta["n_head"], "rotary_pct": 1.0,
        "rotary_emb_base": meta["rope_base"], "layer_norm_epsilon": meta["rms_eps"],
        "max_position_embeddings": meta["n_ctx"],
        # the training length is not in a GGUF; the released 1.8B/7B used 8192
        "seq_length": min(meta["n_ctx"], 8192), "use_dynamic_ntk": True, "use_logn_attn": True,
        "vocab_size": vocab, "tie_word_embeddings": False, "no_bias": True, "torch_dtype": dtype,
    }


def _generation_config(meta: dict) -> dict:
    eod = meta["pad"] if meta["pad"] is not None else meta["bos"]
    if meta["arch"] == "qwen":
        return {"chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643,
                "max_window_size": 6144, "max_new_tokens": 512, "do_sample": True, "top_k": 0,
                "top_p": 0.8, "repetition_penalty": 1.1}
    if not meta["chat_template"]:
        return {"chat_format": "raw", "eos_token_id": eod, "pad_token_id": eod, "max_new_tokens": 512,
                "do_sample": True, "top_k": 0, "top_p": 0.8}
    # Qwen2.5-Instruct's published sampling defaults
    return {"chat_format": "chatml", "eos_token_id": sorted({meta["eos"], eod}, reverse=True),
            "pad_token_id": eod, "max_window_size": 6144, "max_new_tokens": 512, "do_sample": True,
            "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


def _write_tokenizer(reader, meta: dict, out: str) -> None:
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = _field(reader, "tokenizer.ggml.merges") or []
    vocab = read_gguf_vocab(reader)
    normal = {tok: i for i, (tok, typ) in enumerate(zip(tokens, types)) if typ == 1}
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(normal, f, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(m + "\n" for m in merges)
    if meta["arch"] == "qwen":
        write_tiktoken_file(vocab.ranks, os.path.join(out, "qwen.tiktoken"))
    specials = {str(i): {"content": tok, "special": types[i] == 3, "lstrip": False, "rstrip": False,
                         "normalized": False, "single_word": False} for tok, i in vocab.specials.items()}
    name = lambda i: tokens[i] if i is not None and i < len(tokens) else None  # noqa: E731
    cfg = {"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": specials,
           "model_max_length": meta["n_ctx"], "errors": "replace", "clean_up_tokenization_spaces": False,
           "bos_token": None, "eos_token": name(meta["eos"]), "pad_token": name(meta["pad"]),
           "unk_token": None, "split_special_tokens": False}
    if meta["chat_template"]:
        cfg["chat_template"] = meta["chat_template"]
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2)


LEAN_ABOVE = 4 << 30  # lean="auto": a lean checkpoint when the full one would be larger (fp32 bytes)


def convert_gguf(path: str, out_dir: str, dtype: str = "float32", progress: bool = True,
                 lean: bool | str = False) -> str:
    """Convert a `qwen2`/`qwen` GGUF into a checkpoint directory; returns `out_dir`.

    `lean=True` writes only the file's float tensors (norms, biases); the loader reads the others
    from the GGUF file, which must stay in place: on a CPU the file's blocks are used as they are,
    elsewhere each is dequantized at load. For a 7B file that saves ~30 GB of fp32 on disk and minutes
    of conversion. `lean="auto"`: lean when the full checkpoint would exceed LEAN_ABOVE bytes.
    Writes into a temporary sibling directory and renames it at the end, so an interrupted
    conversion never leaves a half-written checkpoint behind."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, not {dtype!r}")
    reader = open_gguf(path)
    meta = gguf_metadata(reader)
    _check_complete(reader, path)
    if lean == "auto":
        lean = sum(int(t.n_elements) for t in reader.tensors) * 4 > LEAN_ABOVE
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"output directory {out_dir} exists and is not empty")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        shapes = _write_weights(reader, meta["arch"], tmp, _DTYPES[dtype], progress, bool(lean))
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(_hf_config(meta, shapes, dtype), f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(_generation_config(meta), f, indent=2)
        _write_tokenizer(reader, meta, tmp)
        record_source(tmp, path, reader, lean=bool(lean))
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_weights(reader, arch: str, out: str, dtype: torch.dtype, progress: bool,
                   lean: bool = False) -> dict[str, tuple]:
    from gguf import GGMLQuantizationType

    if lean:  # the float tensors only, in one file; the shapes of all
        small = {checkpoint_name(arch, t.name): torch.from_numpy(dequantize_tensor(t)).to(dtype)
                 for t in reader.tensors
                 if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16)}
        save_file(small, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        return {checkpoint_name(arch, t.name): tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    shapes: dict[str, tuple] = {}
    shard: dict[str, torch.Tensor] = {}
    files: list[list[str]] = []
    size = 0

    def flush():
        nonlocal shard, size
        if shard:
            files.append(list(shard))
            save_file(shard, os.path.join(out, f"shard-{len(files):05d}.safetensors"), metadata={"format": "pt"})
            shard, size = {}, 0

    if any(t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) for t in reader.tensors):
        q4.available()  # build the CPU kernel that dequantizes (once, ~10 s) before the bar starts
    bar = tqdm(total=sum(int(t.n_elements) for t in reader.tensors), desc="converting", unit="weight",
               unit_scale=True, disable=not progress)
    for t in reader.tensors:  # (the bar counts weights: one tensor, the embedding, is a quarter of them)
        name = checkpoint_name(arch, t.name)
        tensor = torch.from_numpy(dequantize_tensor(t)).to(dtype)
        bar.update(int(t.n_elements))
        shapes[name] = tuple(tensor.shape)
        nbytes = tensor.numel() * tensor.element_size()
        if size + nbytes > _SHARD_BYTES:
            flush()
        shard[name] = tensor
        size += nbytes
    bar.close()
    flush()
    n = len(files)
    weight_map = {}
    for i, names in enumerate(files, 1):
        final = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(out, f"shard-{i:05d}.safetensors"), os.path.join(out, final))
        weight_map.update({k: final for k in names})
    if n > 1:
        total = sum(os.path.getsize(os.path.join(out, f)) for f in set(weight_map.values()))
        with open(os.path.join(out, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return shapes
