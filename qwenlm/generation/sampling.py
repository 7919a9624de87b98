"""Next-token selection with transformers' semantics: repetition penalty, then temperature,
top-k and top-p, then greedy argmax or a multinomial draw."""

from __future__ import annotations

import torch

from .config import GenerationConfig


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool: tokens already in the row (prompt and generated)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(logits: torch.Tensor, counts: dict[int, int], presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI's penalties on one row (1, V): logit -= presence * [count > 0] + frequency * count,
    counting the generated tokens only."""
    if not counts or (presence == 0 and frequency == 0):
        return logits
    ids = torch.tensor(list(counts), device=logits.device)
    n = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
    logits = logits.clone()
    logits[0, ids] -= presence + frequency * n
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    if p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove = cum <= (1 - p)
    remove[..., -1] = False  # always keep the most likely token
    return logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))


def next_tokens(logits: torch.Tensor, seen: torch.Tensor, cfg: GenerationConfig,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) fp32 -> chosen ids (B,)."""
    logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    # extreme settings (a penalty near 0, a temperature near 0) can overflow to +inf: keep such
    # tokens the most likely ones instead of turning the distribution into NaN
    logits = logits.clamp(max=torch.finfo(logits.dtype).max)
    logits = top_p_filter(top_k_filter(logits, cfg.top_k), cfg.top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
