"""ModelConfig: the architecture of a checkpoint, read from its config.json.

One dataclass for Qwen v1 (`model_type: "qwen"`) and Qwen1.5/2/2.5 (`model_type: "qwen2"`).
Runtime choices (dtype, device) are not model config and live in the loader.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field


@dataclass
class ModelConfig:
    arch: str  # "qwen" (QWenLMHeadModel) or "qwen2" (Qwen2ForCausalLM)
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the real MLP width (Qwen v1 configs store twice this)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    # Qwen v1 long-context tricks, active only beyond `seq_length` (the training length)
    seq_length: int = 8192
    use_dynamic_ntk: bool = False
    use_logn_attn: bool = False
    torch_dtype: str | None = None  # what the checkpoint says it was saved in
    precision_flags: dict = field(default_factory=dict)  # Qwen v1 bf16/fp16/fp32 switches
    use_cache_quantization: bool = False  # Qwen v1: keep the KV cache in 8 bits
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type == "qwen" or "QWenLMHeadModel" in archs:
            return cls._from_qwen_v1(d)
        if model_type in ("qwen2", "qwen2_5") or "Qwen2ForCausalLM" in archs:
            return cls._from_qwen2(d)
        raise ValueError(
            f"unsupported model_type {model_type!r} (architectures {archs}): qwenlm runs Qwen v1 "
            "('qwen') and Qwen1.5/2/2.5 ('qwen2') checkpoints"
        )

    @classmethod
    def _from_qwen_v1(cls, d: dict) -> "ModelConfig":
        # the Aug-2023 upload used GPT-style key names
        hidden = d.get("hidden_size", d.get("n_embd"))
        heads = d.get("num_attention_heads", d.get("n_head"))
        if d.get("rotary_pct", 1.0) != 1.0:
            raise ValueError("Qwen v1 configs with rotary_pct != 1.0 are not supported")
        if d.get("visual"):
            raise ValueError("Qwen-VL checkpoints (config has 'visual') are not supported")
        kv_channels = d.get("kv_channels", hidden // heads)
        if kv_channels * heads != hidden:
            raise ValueError(f"kv_channels*heads ({kv_channels}*{heads}) must equal hidden_size ({hidden})")
        return cls(
            arch="qwen",
            vocab_size=d.get("vocab_size", d.get("padded_vocab_size", 151936)),
            hidden_size=hidden,
            intermediate_size=d.get("intermediate_size", d.get("ffn_hidden_size", 22016)) // 2,
            num_layers=d.get("num_hidden_layers", d.get("n_layer")),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=kv_channels,
            rms_eps=d.get("layer_norm_epsilon", 1e-6),
            rope_theta=float(d.get("rotary_emb_base", 10000)),
            max_position_embeddings=d.get("max_position_embeddings", d.get("n_positions", 8192)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            seq_length=d.get("seq_length", 8192),
            use_dynamic_ntk=bool(d.get("use_dynamic_ntk", True)),
            use_logn_attn=bool(d.get("use_logn_attn", True)),
            torch_dtype=d.get("torch_dtype"),
            precision_flags={k: bool(d.get(k, False)) for k in ("bf16", "fp16", "fp32")},
            use_cache_quantization=bool(d.get("use_cache_quantization", False)),
            raw=d,
        )

    @classmethod
    def _from_qwen2(cls, d: dict) -> "ModelConfig":
        scaling = d.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ValueError(f"rope_scaling {scaling} is not supported yet; remove it from config.json "
                             "to run with the plain rotary embedding")
        heads = d["num_attention_heads"]
        return cls(
            arch="qwen2",
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            seq_length=d.get("max_position_embeddings", 32768),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            use_cache_quantization=bool(d.get("use_cache_quantization", False)),
            raw=d,
        )

    @classmethod
    def from_pretrained(cls, path: str) -> "ModelConfig":
        cfg = os.path.join(path, "config.json")
        if not os.path.isfile(cfg):
            raise FileNotFoundError(f"{path} has no config.json: is it a model checkpoint directory?")
        with open(cfg, encoding="utf-8") as f:
            try:
                return cls.from_hf_dict(json.load(f))
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg} is not valid JSON: {e}") from e

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_kv_heads * self.head_dim
        attn = h * h + 2 * h * kv + h + 2 * kv + h * h
        per_layer = attn + 3 * h * i + 2 * h
        heads = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + heads + h

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("raw")
        return d
