"""GenerationConfig: decoding settings, read from generation_config.json and overridden per call."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class GenerationConfig:
    """Defaults are the final Qwen-Chat generation_config.json values (spec §4.5), except
    `temperature`, which the original never set (transformers' 1.0)."""

    max_new_tokens: int = 512
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 0.8
    top_k: int = 0  # 0 disables top-k
    repetition_penalty: float = 1.1
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the generated tokens
    eos_token_id: int | list[int] | None = 151643
    pad_token_id: int | None = 151643
    stop_words_ids: list[list[int]] | None = None  # token sequences that end generation
    stop: list[str] | None = None  # strings that end generation (cut from the text)
    seed: int | None = None
    logit_bias: dict[int, float] | None = None  # OpenAI's: added to these tokens' logits (-100 bans, 100 forces)
    chat_format: str = "chatml"
    max_window_size: int = 6144
    extra: dict = field(default_factory=dict)  # keys we keep but do not use

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationConfig":
        names = {f.name for f in fields(cls)} - {"extra"}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        cfg.extra = {k: v for k, v in d.items() if k not in names}
        cfg.validate()
        return cfg

    @classmethod
    def from_pretrained(cls, path: str) -> "GenerationConfig":
        p = os.path.join(path, "generation_config.json")
        if not os.path.isfile(p):
            return cls()
        with open(p, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def update(self, **kwargs: Any) -> "GenerationConfig":
        """A copy with `kwargs` applied (unknown keys raise); None values are ignored."""
        names = {f.name for f in fields(self)} - {"extra"}
        unknown = set(kwargs) - names
        if unknown:
            raise ValueError(f"unknown generation option(s): {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(sorted(names))})")
        new = copy.deepcopy(self)
        for k, v in kwargs.items():
            if v is not None:
                setattr(new, k, v)
        new.validate()
        return new

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, not {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), not {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, not {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be between -2 and 2, not {getattr(self, name)}")
        for k, v in (self.logit_bias or {}).items():
            if not isinstance(k, int) or k < 0 or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise ValueError(f"logit_bias maps token ids (integers >= 0) to numbers between -100 and 100, "
                                 f"not {k!r}: {v!r}")
        if self.chat_format not in ("chatml", "raw"):
            raise ValueError(f"chat_format must be 'chatml' or 'raw', not {self.chat_format!r}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d

    def save_pretrained(self, path: str) -> None:
        with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in self.to_dict().items() if v is not None}, f, indent=2)
