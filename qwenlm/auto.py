"""Loading a model: resolve the path, choose dtype and device, build, fill with weights.

`AutoModelForCausalLM` / `AutoTokenizer` mirror transformers' names so the original README's
snippets run with only the import changed; `load()` is the plain API for new code.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import torch

from .config import ModelConfig
from .generation.config import GenerationConfig
from .hub import resolve_model
from .models import QwenCausalLM, build_model
from .quant.gptq import GPTQConfig, finish_gptq, install_gptq_layers
from .tokenizer import QwenTokenizer
from .weights.loader import CheckpointError, checkpoint_files, checkpoint_names, load_weights

log = logging.getLogger("qwenlm")

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "float32": torch.float32, "fp32": torch.float32,
           "float": torch.float32}
# transformers-only arguments: accepted and ignored
_IGNORED = {"trust_remote_code", "resume_download", "revision", "low_cpu_mem_usage", "use_flash_attn",
            "attn_implementation", "cache_dir", "local_files_only", "token", "use_safetensors",
            "offload_folder", "max_memory", "use_cache_kernel"}
KV_CACHES = ("float", "int8")


def resolve_device(device_map: Any = None, device: str | None = None) -> torch.device:
    """'auto' (or None) -> cuda when available, else cpu; also 'cpu', 'cuda[:N]', {'': dev}."""
    choice = device if device is not None else device_map
    if isinstance(choice, dict):
        values = set(choice.values())
        if len(values) != 1:
            raise ValueError("a device_map spreading layers over several devices is not supported; "
                             "use device_map='auto', 'cpu' or 'cuda'")
        choice = values.pop()
    if isinstance(choice, int):
        choice = f"cuda:{choice}"
    if choice in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(choice)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available here: use --device cpu")
    return dev


def resolve_dtype(dtype: Any, device: torch.device, config: ModelConfig) -> torch.dtype:
    """'auto' follows the original (spec §2.8): a Qwen v1 bf16/fp16/fp32 flag if set, else bf16 on
    CUDA with bf16 support, fp16 on other CUDA (compute capability >= 7), fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        try:
            return _DTYPES[str(dtype).replace("torch.", "")]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}: use auto, bfloat16, float16 or float32") from None
    flags = [k for k, v in config.precision_flags.items() if v]
    if len(flags) > 1:
        raise ValueError(f"config.json sets more than one of bf16/fp16/fp32: {flags}")
    if flags:
        wanted = _DTYPES[flags[0]]
        if device.type == "cpu" and wanted == torch.float16:
            return torch.float32  # fp16 matmuls on CPU are slow and imprecise
        return wanted
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    return torch.float32


def auto_quantize(model: QwenCausalLM, dtype: Any, device: torch.device, gptq, from_gguf: bool = False) -> str | None:
    """What `quantize="auto"` means for this model here, on a CPU with the AVX2 kernel: the GGUF file's
    own blocks for a checkpoint converted from one that is still in place (`from_gguf`: its exact
    weights, ~1.25x the speed of 8-bit ones on the default model), else 8-bit weights (about 5x the
    speed of fp32 decoding, with the same greedy text on the default model); unless the caller chose a
    dtype, or a layer's width does not fit the kernel's 32-wide blocks. For a GPTQ checkpoint "int8" puts
    its float head (fp16 in the released ones: on a CPU an fp32 matrix, read whole every token, more
    bytes than all the 4-bit layers) into 8-bit blocks; its own layers stay as they are.
    Nothing on a GPU (bf16 is the fast path there)."""
    if device.type != "cpu" or dtype not in (None, "auto"):
        return None
    from torch import nn

    from .quant import q4

    if any(m.in_features % q4.BLOCK for m in model.modules() if isinstance(m, nn.Linear)) or not q4.available():
        return None
    return "gguf" if from_gguf and gptq is None else "int8"


def load_model(path: str, dtype: Any = "auto", device: Any = None, quantize: str | None = None,
               kv_cache: str | None = None) -> QwenCausalLM:
    """Build the model of a checkpoint directory and load its weights (strictly).
    `quantize="int4"`: 4-bit weight-only linear layers (CPU; ~4x fewer bytes per token than bf16);
    `"int8"`: 8-bit ones (CPU with AVX2; half the bytes of bf16, closer to the original weights);
    `"gguf"`: for a checkpoint converted from a GGUF file, that file's own 4/5/8-bit blocks (CPU with
    AVX2; quant/gguf_blocks.py);
    `"auto"` (the commands' default): `auto_quantize` decides; None or "none": the weights as stored.
    `kv_cache`: "int8" keeps the engines' KV cache in 8 bits, "float" in the model's dtype; None
    follows config.json's `use_cache_quantization` (the original's switch)."""
    if quantize not in (None, "none", "auto", "int4", "int8", "gguf"):
        raise ValueError(f"quantize must be 'int4', 'int8', 'gguf', 'auto' or None, not {quantize!r}")
    if kv_cache not in (None, "auto", *KV_CACHES):
        raise ValueError(f"kv_cache must be 'int8', 'float' or None, not {kv_cache!r}")
    quantize = None if quantize == "none" else quantize
    start = time.perf_counter()
    config = ModelConfig.from_pretrained(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, config)
    with torch.device("meta"):
        model = build_model(config, init=False)  # (the checkpoint's weights replace every parameter)
    files = checkpoint_files(path)
    gptq = GPTQConfig.from_checkpoint(path, config.raw)
    from .quant.gguf_blocks import recorded_source, source_of

    recorded, source = recorded_source(path), source_of(path)
    lean = bool(recorded and recorded.get("lean"))
    if lean and source is None:
        raise CheckpointError(
            f"{path} is a lean conversion of {recorded.get('path')}: its quantized "
            "weights are read from that file, which is missing or has changed since. Pass the .gguf "
            "file again (it is converted anew), or convert it with `qwen convert FILE OUT`.")
    if quantize == "auto":
        quantize = auto_quantize(model, dtype, dev, gptq, from_gguf=source is not None)
        if quantize:
            log.info("quantize auto: %s weights on this CPU (--quantize none keeps %s)", quantize, dt)
    if gptq is not None:
        if quantize == "gguf":
            raise ValueError("this checkpoint is already quantized (GPTQ): --quantize gguf does not apply "
                             "(int8 or int4 put its float head into blocks; none keeps it)")
        install_gptq_layers(model, gptq, checkpoint_names(files))
    extra, deferred, consume = (), frozenset(), None
    gptq_in_fp32 = gptq is not None and dt == torch.float32  # (finish_gptq: the CPU kernel computes in fp32)
    if (quantize in ("int4", "int8") or gptq_in_fp32) and dev.type == "cpu":
        from .quant.int4 import streaming_quantizer

        consume = streaming_quantizer(model, quantize)
        if consume is not None:
            dt = torch.float32  # what the quantized model computes in (quantize_model_int4/int8)
    if lean:  # the weights not in the checkpoint's files come from the GGUF file
        from .quant.gguf_blocks import file_embedding, file_tensors, file_weights

        deferred = frozenset(file_weights(model, source)) if quantize == "gguf" else frozenset()
        table = file_embedding(model, source, quantize) if dev.type == "cpu" else None  # (its rows stay in the file)
        stored = checkpoint_names(files)
        extra = file_tensors(source, [n for n in source["tensors"]
                                      if n not in stored and n not in deferred and n != table])
    load_weights(model, files, dt, dev, extra, deferred, consume)
    if gptq is not None:
        gptq_layers = finish_gptq(model, gptq, dt)
    if quantize == "int4":
        from .quant import quantize_model_int4

        quantize_model_int4(model)
    elif quantize == "int8":
        from .quant import quantize_model_int8

        quantize_model_int8(model)
    if gptq is not None:
        model.quantization = gptq_layers + (f"; head in {quantize[3:]} bits" if quantize else "")
    elif quantize == "gguf":
        from .quant.gguf_blocks import quantize_model_gguf

        if source is None:
            raise ValueError(f"--quantize gguf needs a checkpoint converted from a GGUF file that is still in "
                             f"place (a .gguf path, or the default model); {path} is not one")
        quantize_model_gguf(model, source)
    if deferred and any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        raise RuntimeError("a lean checkpoint's weights were left unfilled (a bug: please report it)")
    if kv_cache in (None, "auto"):
        kv_cache = "int8" if config.use_cache_quantization else "float"
    model.kv_cache = kv_cache
    model.generation_config = GenerationConfig.from_pretrained(path)
    model.name_or_path = path
    model.eval()
    if dev.type == "cpu":
        from .memory import reuse_freed_memory

        reuse_freed_memory()
    log.info("loaded %s (%s, %s on %s) in %.1fs", path, config.arch, dt, dev, time.perf_counter() - start)
    return model


def load(path: str | None = None, dtype: Any = "auto", device: Any = None, quantize: str | None = None,
         kv_cache: str | None = None) -> tuple[QwenCausalLM, QwenTokenizer]:
    """`model, tokenizer = qwenlm.load()` — the offline default model when `path` is None;
    otherwise a checkpoint directory, a .gguf file or a hub id."""
    local = resolve_model(path)
    return load_model(local, dtype, device, quantize, kv_cache), QwenTokenizer.from_pretrained(local)


class AutoModelForCausalLM:
    """transformers-compatible entry point: `AutoModelForCausalLM.from_pretrained(path, ...)`."""

    @staticmethod
    def from_pretrained(path: str | None = None, *args: Any, device_map: Any = None,
                        torch_dtype: Any = None, dtype: Any = None, bf16: bool = False, fp16: bool = False,
                        fp32: bool = False, device: str | None = None,
                        use_cache_quantization: bool | None = None, quantize: str | None = None,
                        **kwargs: Any) -> QwenCausalLM:
        """The weights as stored, like transformers (fp32 on a CPU); `quantize="auto"` loads what `qwen chat`
        runs on a CPU (quantized blocks: ~8x faster decoding with the default model), see `load_model`."""
        for k in _IGNORED & kwargs.keys():
            kwargs.pop(k)
        if kwargs:
            raise TypeError(f"unexpected argument(s): {', '.join(sorted(kwargs))}")
        flags = [name for name, on in (("bfloat16", bf16), ("float16", fp16), ("float32", fp32)) if on]
        if len(flags) > 1:
            raise ValueError("pass at most one of bf16=True, fp16=True, fp32=True")
        chosen = dtype if dtype is not None else torch_dtype
        if flags:
            chosen = flags[0]
        kv = None if use_cache_quantization is None else ("int8" if use_cache_quantization else "float")
        return load_model(resolve_model(path), chosen, device if device is not None else device_map, quantize,
                          kv_cache=kv)


class AutoTokenizer:
    """transformers-compatible entry point: `AutoTokenizer.from_pretrained(path, ...)`."""

    @staticmethod
    def from_pretrained(path: str | None = None, *args: Any, **kwargs: Any) -> QwenTokenizer:
        return QwenTokenizer.from_pretrained(resolve_model(path), **kwargs)
