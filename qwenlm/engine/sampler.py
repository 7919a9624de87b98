"""Choosing the next token of every row of a batch (the serving engine's steps): each row with its own
settings, logit bias, penalties and random generator, so that it picks what it would alone; rows with
equal settings in one call. Which tokens each row has seen, for the repetition penalty, is one
(rows, vocab) matrix indexed by cache row, made when a sequence first needs it."""

from __future__ import annotations

import torch

from ..generation.grammar import advance, hold
from ..generation.sampling import apply_logit_bias, apply_presence_frequency, choose, uniforms


class RowSampler:
    def __init__(self, rows: int, device, vocab_limit: int | None = None):
        self.rows, self.device, self.vocab_limit = rows, device, vocab_limit
        self.seen: torch.Tensor | None = None  # (rows, vocab) bool

    def _matrix(self, vocab: int) -> torch.Tensor:
        if self.seen is None:
            self.seen = torch.zeros(self.rows, vocab, dtype=torch.bool, device=self.device)
        return self.seen

    def see_prompt(self, row: int, prompt: list[int], vocab: int) -> None:
        """Row `row` starts a sequence: it has seen exactly its prompt's tokens."""
        seen = self._matrix(vocab)
        seen[row] = False
        seen[row, torch.tensor(prompt, device=self.device)] = True

    def move(self, src: int, dst: int) -> None:
        """The sequence in row `src` moves to row `dst`."""
        if self.seen is not None:
            self.seen[dst] = self.seen[src]

    def choose(self, seqs, logits: torch.Tensor) -> list[int]:
        """The next token of each of `seqs` (engine Sequences; row i of `logits` is seqs[i]'s)."""
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits[:, self.vocab_limit:] = float("-inf")
        for i, s in enumerate(seqs):  # each row's own bias, before anything reads the logits
            if s.cfg.logit_bias:
                apply_logit_bias(logits[i:i + 1], s.cfg.logit_bias)
        constraints = [s.constraint for s in seqs]
        hold(logits, constraints)  # structured output: what a row's grammar does not allow cannot be chosen
        chosen: list[int | None] = [None] * len(seqs)
        greedy = [i for i, s in enumerate(seqs) if s.plain_greedy]
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(-1).tolist()):
                chosen[i] = t
        # the other rows in groups of equal settings, each group in one call, each row with a uniform
        # number from its own generator (so it picks what it would alone); one transfer for all
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(seqs):
            if chosen[i] is None:
                c = s.cfg
                groups.setdefault((c.greedy, c.temperature, c.top_p, c.top_k, c.repetition_penalty), []).append(i)
        picked = []
        dev = logits.device
        for rows in groups.values():
            cfg = seqs[rows[0]].cfg
            everyone = len(rows) == len(seqs) and all(s.row == i for i, s in enumerate(seqs))
            part = logits if everyone else logits[rows]  # (no copy in the common case: one group)
            for j, i in enumerate(rows):  # OpenAI's penalties: only the rows that ask (each its own)
                c = seqs[i].cfg
                if seqs[i].counts and (c.presence_penalty or c.frequency_penalty):
                    part[j:j + 1] = apply_presence_frequency(part[j:j + 1], seqs[i].counts, c.presence_penalty,
                                                             c.frequency_penalty)
            seen = cache_rows = None
            if cfg.repetition_penalty != 1.0:
                cache_rows = torch.tensor([seqs[i].row for i in rows], device=dev)
                matrix = self._matrix(logits.shape[-1])
                seen = matrix[:len(seqs)] if everyone else matrix[cache_rows]
            u = None if cfg.greedy else torch.cat([uniforms(1, seqs[i].generator, self.device) for i in rows])
            tokens = choose(part, seen, cfg, u)
            if cache_rows is not None:  # the rows have now seen their new tokens
                self.seen[cache_rows, tokens] = True
            picked.append((rows, tokens))
        if picked:
            flat = torch.cat([t for _, t in picked]).tolist()
            for i, t in zip([i for rows, _ in picked for i in rows], flat):
                chosen[i] = t
        advance(constraints, chosen)
        return chosen
