"""The reference generation loop: token ids in, token ids out, one step at a time.

Kept simple on purpose: it is the oracle that faster engines must match token for token.
Layers: `generate_steps` (ids per step, batched, left-padded) -> `generate` (a tensor like
transformers' `generate`) and `stream_text` (text deltas that never split a character and never
show a stop string).
"""

from __future__ import annotations

import random
from typing import Iterator, Sequence

import torch

from ..tokenizer.stream import StreamDecoder
from .config import GenerationConfig
from .grammar import advance, hold
from .sampling import next_tokens


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def prompts_from_tensor(input_ids, attention_mask=None) -> list[list[int]]:
    """Rows of a (B, T) tensor or nested list, dropping masked (padding) positions."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        rows = input_ids.tolist()
    else:
        rows = [list(input_ids)] if input_ids and isinstance(input_ids[0], int) else [list(r) for r in input_ids]
    if attention_mask is not None:
        masks = attention_mask.tolist() if isinstance(attention_mask, torch.Tensor) else attention_mask
        if masks and isinstance(masks[0], int):
            masks = [masks]
        rows = [[t for t, m in zip(r, mk) if m] for r, mk in zip(rows, masks)]
    return rows


class StopChecker:
    """Decides when a row is done: stop token ids, stop token sequences, stop strings."""

    def __init__(self, cfg: GenerationConfig, extra_stop_ids: Sequence[int] = (), tokenizer=None):
        self.ids = set(cfg.eos_ids()) | set(extra_stop_ids)
        self.sequences = [list(s) for s in (cfg.stop_words_ids or []) if s]
        self.strings = [s.encode("utf-8") for s in (cfg.stop or []) if s]
        if self.strings and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.tokenizer = tokenizer

    def done(self, generated: list[int]) -> bool:
        last = generated[-1]
        if last in self.ids:
            return True
        for seq in self.sequences:
            if generated[-len(seq):] == seq:
                return True
        if self.strings:
            # every token is >= 1 byte, so the last len(s)+1 tokens hold any match ending now
            n = max(len(s) for s in self.strings) + 1
            tail = b"".join(self.tokenizer.decode_bytes(t) for t in generated[-n:])
            return any(s in tail for s in self.strings)
        return False


def record_step(tokens: list[int], generated: list[list[int]], finished: list[bool],
                stop: StopChecker) -> list[int | None]:
    """Append one step's tokens to the unfinished rows and mark rows that stop now;
    returns the step as yielded (None for rows that had already finished)."""
    step: list[int | None] = []
    for i, t in enumerate(tokens):
        if finished[i]:
            step.append(None)
            continue
        generated[i].append(t)
        step.append(t)
        finished[i] = stop.done(generated[i])
    return step


def make_generator(seed: int | None, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else random.randrange(2**63))
    return g


@torch.inference_mode()
def generate_steps(model, prompts: Sequence[Sequence[int]], cfg: GenerationConfig,
                   stop: StopChecker | None = None, vocab_limit: int | None = None,
                   constraints: list | None = None) -> Iterator[list[int | None]]:
    """Yield, per decoding step, each row's new token (None once that row has finished).
    `constraints`: each row's grammar (generation/grammar.py; None: free), told every token."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    stop = stop or StopChecker(cfg)
    device = model.device
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids, mask = left_pad(prompts, pad, device)
    b = len(prompts)
    vocab = model.config.vocab_size
    seen = torch.zeros((b, vocab), dtype=torch.bool, device=device)
    if cfg.repetition_penalty != 1.0:
        seen.scatter_(1, ids, mask.bool())
    generator = make_generator(cfg.seed, device)
    generated: list[list[int]] = [[] for _ in range(b)]
    finished = [False] * b
    out = model(ids, attention_mask=mask, use_cache=True)
    for _ in range(cfg.max_new_tokens):
        logits = out.logits[:, -1].float()
        if vocab_limit is not None and vocab_limit < vocab:
            logits[:, vocab_limit:] = float("-inf")
        if constraints is not None:
            hold(logits, constraints)
        tokens = next_tokens(logits, seen, cfg, generator).tolist()
        if constraints is not None:
            advance(constraints, tokens)
        step = record_step(tokens, generated, finished, stop)
        yield step
        if all(finished):
            return
        nxt = torch.tensor([t if t is not None else pad for t in step], device=device)
        seen[torch.arange(b, device=device), nxt] = True
        mask = torch.cat((mask, torch.ones((b, 1), dtype=mask.dtype, device=device)), dim=1)
        out = model(nxt[:, None], attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)


def collect(steps: Iterator[list[int | None]], n_rows: int) -> list[list[int]]:
    """Per-step tokens -> each row's token list."""
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    for step in steps:
        for i, t in enumerate(step):
            if t is not None:
                rows[i].append(t)
    return rows


def generate(model, prompts: Sequence[Sequence[int]], cfg: GenerationConfig,
             stop: StopChecker | None = None, vocab_limit: int | None = None,
             constraints: list | None = None) -> list[list[int]]:
    """New token ids of each row (stop token included, like transformers)."""
    return collect(generate_steps(model, prompts, cfg, stop, vocab_limit, constraints), len(prompts))


class TextAssembler:
    """Token ids -> text deltas of one completion: never splits a character; a control/stop token
    ends the text; a stop string is cut off and never shown, even in part (text that might start
    one is held back until it cannot)."""

    def __init__(self, tokenizer, end_ids, stop_strings=(), skip_special_tokens: bool = True):
        self.end_ids = set(end_ids)
        self.strings = [s for s in stop_strings if s]
        self.dec = StreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
        self.pending = ""
        self.done = False
        self.text = ""  # everything emitted so far

    def put(self, token: int) -> str:
        """The text that is now safe to show (possibly ""); sets `done` at an end token/stop string."""
        if self.done:
            return ""
        if token in self.end_ids:
            return self.finish()
        self.pending += self.dec.put(token)
        self.pending, emit, hit = split_on_stop(self.pending, self.strings)
        if hit:
            self.done = True
        self.text += emit
        return emit

    def finish(self) -> str:
        """The held-back rest, once generation has ended."""
        if self.done:
            return ""
        self.done = True
        self.pending += self.dec.flush()
        _, emit, _ = split_on_stop(self.pending, self.strings, final=True)
        self.pending = ""
        self.text += emit
        return emit


def stream_text(model, tokenizer, prompt: Sequence[int], cfg: GenerationConfig,
                extra_stop_ids: Sequence[int] = (), skip_special_tokens: bool = True,
                on_token=None, steps_fn=None, constraint=None) -> Iterator[str]:
    """Text deltas of one completion (see TextAssembler).
    `steps_fn(prompts, cfg, stop, vocab_limit)` produces the tokens (default: the engine);
    `constraint` holds the reply to a grammar (generation/grammar.py)."""
    if steps_fn is None:
        from ..engine import get_engine

        steps_fn = get_engine(model).generate_steps
    stop = StopChecker(cfg, extra_stop_ids, tokenizer)
    text = TextAssembler(tokenizer, stop.ids, cfg.stop or [], skip_special_tokens)
    held = {} if constraint is None else {"constraints": [constraint]}
    for step in steps_fn([prompt], cfg, stop, vocab_limit=tokenizer.id_limit, **held):
        t = step[0]
        if t is None:
            break
        if on_token is not None:
            on_token(t)
        emit = text.put(t)
        if emit:
            yield emit
        if text.done:
            return
    emit = text.finish()
    if emit:
        yield emit


def split_on_stop(text: str, strings: list[str], final: bool = False) -> tuple[str, str, bool]:
    """-> (kept back, safe to emit, stop string found)."""
    if not strings:
        return "", text, False
    cut = min((i for i in (text.find(s) for s in strings) if i >= 0), default=-1)
    if cut >= 0:
        return "", text[:cut], True
    if final:
        return "", text, False
    hold = 0
    for s in strings:  # longest suffix of text that is a prefix of a stop string
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return text[len(text) - hold:], text[:len(text) - hold], False
