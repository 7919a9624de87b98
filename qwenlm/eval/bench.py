"""Speed and memory benchmarks with the original's protocol (README "Inference Performance"):
decode N tokens from 1 context token, and encode (prefill) 2048 tokens; tokens/s, time to first
token, peak memory and the fraction of the memory-bandwidth roofline.

Runs on a checkpoint or on random weights of the real Qwen v1 shapes; `compare_hf` runs
transformers' Qwen2ForCausalLM on the same weights in the same process.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ..config import ModelConfig
from ..engine import Engine
from ..engine.cache import KVStore
from ..generation.config import GenerationConfig
from ..memory import free_bytes, proc_bytes
from ..models import build_model

# Qwen v1 shapes (spec §1.1); config values as in config.json (intermediate_size is 2x the MLP width)
SHAPES = {
    "1.8B": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=11008,
                 vocab_size=151936, seq_length=8192, rotary_emb_base=10000),
    "7B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=22016,
               vocab_size=151936, seq_length=8192, rotary_emb_base=10000),
    "14B": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, intermediate_size=27392,
                vocab_size=152064, seq_length=2048, rotary_emb_base=10000),
    "72B": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, intermediate_size=49152,
                vocab_size=152064, seq_length=32768, rotary_emb_base=1000000, use_dynamic_ntk=False,
                use_logn_attn=False),
    # not a released model: two small layers and a small vocabulary, so that the model costs next to
    # nothing and what is measured is the rest (serving, scheduling, sampling, launching)
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                 vocab_size=1000, seq_length=8192, rotary_emb_base=10000),
}
# peak memory bandwidth, bytes/s, by device name
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def shape_config(shape: str, layers: int | None = None) -> ModelConfig:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: choose one of {', '.join(SHAPES)}")
    d = {"model_type": "qwen", "kv_channels": 128, "max_position_embeddings": 32768, **SHAPES[shape]}
    if layers is not None:
        d["num_hidden_layers"] = layers
    return ModelConfig.from_hf_dict(d)


def random_model(config: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A model of `config` with random weights, made directly on the device."""
    with torch.device("meta"):
        model = build_model(config, init=False).to(dtype)  # (drawn below, on the device)
    model.to_empty(device=device)  # allocates once, in `dtype`
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".ln_" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
    model.tie_weights()
    model.requires_grad_(False)
    return model.eval()


@dataclass
class BenchResult:
    device: str
    dtype: str
    model: str
    layers: str
    weight_bytes: int
    decode: list[dict] = field(default_factory=list)
    prefill: dict | None = None
    hf: dict | None = None
    notes: list[str] = field(default_factory=list)
    kv_cache: str = "float"

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or on CPU the process's resident high-water
    mark (Linux resets VmHWM when "5" is written to /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak(device: torch.device) -> int | None:
    """Peak bytes since `_reset_peak`: allocated GPU memory, or the process's resident memory on CPU
    (weights, KV cache, activations and the Python process itself); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return proc_bytes("/proc/self/status", "VmHWM")


def _bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((bw for k, bw in BANDWIDTH.items() if k in name), None)


def weight_bytes(model) -> int:
    """Bytes of every weight the model holds (quantized layers keep theirs in buffers)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def streamed_weight_bytes(model) -> int:
    """Bytes read per decode step: every weight except the embedding table (one row is read)."""
    table = {id(t) for t in [*model.embed.parameters(), *model.embed.buffers()]}
    tensors = [*model.parameters(), *model.buffers()]  # quantized layers keep their weights in buffers
    tied_head = model.config.tie_word_embeddings and not hasattr(model, "quantization")
    return sum(t.numel() * t.element_size() for t in tensors if id(t) not in table) + (
        sum(t.numel() * t.element_size() for t in model.embed.parameters()) if tied_head else 0)


def decode_bytes_per_step(engine: Engine, n_tokens: int, batch: int = 1, context: int = 1) -> float:
    """What one step of the engine's last generation (`n_tokens` from `context` tokens per row) read
    on average: the streamed weights, and the keys/values of the slot buckets its steps attended over."""
    model, c = engine.model, engine.model.config
    kv_per_slot = KVStore.bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, model.dtype,
                                          model.kv_int8) * batch
    b = engine.bucket
    kv_read = sum(min(b * math.ceil((context + s + 1) / b), engine.last_max_len) for s in range(n_tokens))
    return streamed_weight_bytes(model) + kv_per_slot * kv_read / n_tokens


def bench_decode(engine: Engine, n_tokens: int, batch: int = 1, context: int = 1, sample: bool = False) -> dict:
    """Generate `n_tokens` (no early stop) from `context` random tokens per row: greedy, or with
    `sample` drawn with the model's own sampling settings (generation_config.json: what chat uses)."""
    model, dev = engine.model, engine.device
    vocab = min(model.config.vocab_size, 151643)
    prompts = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(0)).tolist()
    if sample:
        cfg = model.generation_config.update(do_sample=True, max_new_tokens=n_tokens, eos_token_id=None,
                                             pad_token_id=0, stop_words_ids=None, stop=None, seed=0)
    else:
        cfg = GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=n_tokens,
                               eos_token_id=None, pad_token_id=0)
    # time to first token: prefill + one sampled token (also warms the prefill path)
    engine.generate(prompts, cfg.update(max_new_tokens=1))
    _sync(dev)
    t0 = time.perf_counter()
    engine.generate(prompts, cfg.update(max_new_tokens=1))
    _sync(dev)
    ttft = time.perf_counter() - t0
    if engine.cuda_graphs:  # capture every bucket's graph once, outside the timed run
        engine.generate(prompts, cfg, sync_every=n_tokens)
    _reset_peak(dev)
    _sync(dev)
    t0 = time.perf_counter()
    out = engine.generate(prompts, cfg, sync_every=n_tokens)
    _sync(dev)
    dt = time.perf_counter() - t0
    assert all(len(r) == n_tokens for r in out)
    bytes_per_step = decode_bytes_per_step(engine, n_tokens, batch, context)
    res = {"tokens": n_tokens, "batch": batch, "seconds": dt, "tokens_per_s": batch * n_tokens / dt,
           "steps_per_s": n_tokens / dt, "ttft_ms": 1000 * ttft, "peak_memory_bytes": _peak(dev),
           "kv_cache_bytes": engine.last_kv_bytes, "bytes_per_step": bytes_per_step}
    if sample:
        res["sampling"] = {k: getattr(cfg, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty")}
    bw = _bandwidth(dev)
    if bw:
        res["roofline_fraction"] = bytes_per_step * (n_tokens / dt) / bw
        res["roofline_tokens_per_s"] = bw / bytes_per_step * batch
    return res


def bench_prefill(engine: Engine, n_tokens: int = 2048, repeats: int = 3) -> dict:
    dev = engine.device
    vocab = min(engine.cfg.vocab_size, 151643)  # ordinary tokens the model has
    ids = torch.randint(0, vocab, (1, n_tokens), generator=torch.Generator().manual_seed(1)).tolist()
    cfg = GenerationConfig(do_sample=False, max_new_tokens=0, eos_token_id=None, pad_token_id=0)
    st = engine._setup(ids, cfg, n_tokens)
    engine._prefill(st)  # warm-up
    _reset_peak(dev)
    _sync(dev)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine._prefill(st)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    dt = min(times)
    return {"tokens": n_tokens, "seconds": dt, "tokens_per_s": n_tokens / dt, "ms": 1000 * dt,
            "peak_memory_bytes": _peak(dev)}


def bench_kv_memory(engine: Engine, batch: int, length: int, steps: int = 2) -> dict:
    """Peak memory of generating up to `length` tokens in `batch` rows, the KV cache kept as
    `engine.model.kv_cache` says: the cache sized for `length`, every slot attended to, the last
    `steps` decode steps run (where a generation peaks; the slots' values do not change the memory).
    Like the original's KV-cache table, from a 1-token context."""
    model, dev = engine.model, engine.device
    c = model.config
    need = KVStore.bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, model.dtype,
                                   model.kv_int8) * batch * length
    res = {"batch": batch, "length": length, "kv_cache": model.kv_cache, "kv_cache_bytes": need}
    free = free_bytes(dev)
    engine.release()
    if free is not None and need > 0.9 * free:
        res["peak_memory_bytes"] = None
        res["out_of_memory"] = True
        return res
    cfg = GenerationConfig(do_sample=False, max_new_tokens=length - 1, eos_token_id=None, pad_token_id=0)
    _sync(dev)
    _reset_peak(dev)
    try:
        with torch.inference_mode():
            st = engine._adopt(engine._setup([[1]] * batch, cfg, length))
            engine._prefill(st)
            st["valid"].fill_(True)
            for s in range(steps):
                slot = length - steps + s
                st["slot"].fill_(slot)
                st["pos"].fill_(slot)
                engine._decode(st, length)
        _sync(dev)
        res["peak_memory_bytes"] = _peak(dev)
    except torch.cuda.OutOfMemoryError:
        res["peak_memory_bytes"] = None
        res["out_of_memory"] = True
    finally:
        engine.release()
    return res


def kv_table(engine: Engine, batches: list[int], lengths: list[int], batch_length: int = 1024,
             progress=None) -> list[dict]:
    """The original README's KV-cache table: batch sizes at `batch_length` tokens, then lengths at
    batch 1, each with the float and the int8 cache."""
    model = engine.model
    before = model.kv_cache
    cells = [(b, batch_length) for b in batches] + [(1, n) for n in lengths]
    rows = []
    try:
        for b, n in cells:
            row = {"batch": b, "length": n}
            for kind in ("float", "int8"):
                model.kv_cache = kind
                if progress:
                    progress(f"KV cache {kind}: batch {b}, {n} tokens...")
                row[kind] = r = bench_kv_memory(engine, b, n)
                if progress:
                    peak = r["peak_memory_bytes"]
                    progress("  -> " + ("out of memory" if peak is None else f"peak {peak / 2**30:.2f} GiB"))
            rows.append(row)
    finally:
        model.kv_cache = before
    return rows


def hf_twin(model):
    """transformers' Qwen2ForCausalLM holding the same weights (shared storage, no copies)."""
    import transformers

    c = model.config
    hcfg = transformers.Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        rms_norm_eps=c.rms_eps, rope_theta=c.rope_theta, max_position_embeddings=32768,
        tie_word_embeddings=c.tie_word_embeddings, torch_dtype=model.dtype)
    with torch.device("meta"):
        hf = transformers.Qwen2ForCausalLM(hcfg)
    sd = model.state_dict()
    if c.arch == "qwen":
        from ..weights.mapping import qwen_v1_to_qwen2

        sd = qwen_v1_to_qwen2(sd, c.hidden_size, c.num_layers)
    hf.load_state_dict(sd, strict=not c.tie_word_embeddings, assign=True)
    if c.tie_word_embeddings:
        hf.tie_weights()
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    hf.model.rotary_emb = Qwen2RotaryEmbedding(config=hcfg).to(model.device)  # its buffers were on meta
    return hf.eval()


def bench_hf(model, n_tokens: int, engine: Engine | None = None, context: int = 1) -> dict:
    """transformers' generate on the same weights; with `engine`, also how many greedy tokens agree."""
    hf = hf_twin(model)
    dev = model.device
    vocab = min(model.config.vocab_size, 151643)
    ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(0)).to(dev)
    kw = dict(do_sample=False, max_new_tokens=n_tokens, min_new_tokens=n_tokens, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(ids, attention_mask=torch.ones_like(ids), **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        _reset_peak(dev)
        _sync(dev)
        t0 = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        _sync(dev)
        dt = time.perf_counter() - t0
    n = out.shape[1] - context
    res = {"tokens": n, "seconds": dt, "tokens_per_s": n / dt, "peak_memory_bytes": _peak(dev)}
    if engine is not None:
        theirs = out[0, context:].tolist()
        cfg = GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=n, eos_token_id=None)
        ours = engine.generate(ids.tolist(), cfg)[0]
        res["agree_tokens"] = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), n)
    return res
