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

    def ids(self, values: list[int]) -> torch.Tensor:
        """`values` as a long tensor on the device. On a GPU through pinned memory without waiting:
        a plain copy from a Python list would wait for the work already queued (a decode step run
        ahead, BatchEngine.pipeline)."""
        t = torch.tensor(values, dtype=torch.long)
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def choose(self, seqs, logits: torch.Tensor) -> list[int]:
        """The next token of each of `seqs` (engine Sequences; row i of `logits` is seqs[i]'s)."""
        constraints = [s.constraint for s in seqs]
        chosen = self.pick(seqs, logits).tolist()  # (one transfer for all the rows)
        advance(constraints, chosen)
        return chosen

    def pick(self, seqs, logits: torch.Tensor) -> torch.Tensor:
        """`choose`'s tokens as a tensor on the device (B,), queued without waiting for the device when
        no row has a grammar (which needs the tokens before it) or OpenAI penalties (which count
        them), and none a logit bias. Grammars are not told the tokens: `choose` does that."""
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits[:, self.vocab_limit:] = float("-inf")
        for i, s in enumerate(seqs):  # each row's own bias, before anything reads the logits
            if s.cfg.logit_bias:
                apply_logit_bias(logits[i:i + 1], s.cfg.logit_bias)
        hold(logits, [s.constraint for s in seqs])  # structured output: what a row's grammar forbids is out
        n = len(seqs)
        greedy = [i for i, s in enumerate(seqs) if s.plain_greedy]
        if len(greedy) == n:
            return logits.argmax(-1)
        parts = []  # (rows, their tokens)
        if greedy:
            parts.append((greedy, logits[self.ids(greedy)].argmax(-1)))
        # the other rows in groups of equal settings, each group in one call, each row with a uniform
        # number from its own generator (so it picks what it would alone)
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(seqs):
            if not s.plain_greedy:
                c = s.cfg
                groups.setdefault((c.greedy, c.temperature, c.top_p, c.top_k, c.repetition_penalty), []).append(i)
        for rows in groups.values():
            cfg = seqs[rows[0]].cfg
            everyone = len(rows) == n and all(s.row == i for i, s in enumerate(seqs))
            part = logits if len(rows) == n else logits[self.ids(rows)]  # (no copy in the common case)
            for j, i in enumerate(rows):  # OpenAI's penalties: only the rows that ask (each its own)
                c = seqs[i].cfg
                if seqs[i].counts and (c.presence_penalty or c.frequency_penalty):
                    part[j:j + 1] = apply_presence_frequency(part[j:j + 1], seqs[i].counts, c.presence_penalty,
                                                             c.frequency_penalty)
            seen = cache_rows = None
            if cfg.repetition_penalty != 1.0:
                cache_rows = self.ids([seqs[i].row for i in rows])
                matrix = self._matrix(logits.shape[-1])
                seen = matrix[:n] if everyone else matrix[cache_rows]
            u = None if cfg.greedy else torch.cat([uniforms(1, seqs[i].generator, self.device) for i in rows])
            tokens = choose(part, seen, cfg, u)
            if cache_rows is not None:  # the rows have now seen their new tokens
                self.seen[cache_rows, tokens] = True
            parts.append((rows, tokens))
        if len(parts) == 1:
            return parts[0][1]  # (one group of every row, in order)
        out = torch.empty(n, dtype=torch.long, device=logits.device)
        for rows, tokens in parts:
            out[self.ids(rows)] = tokens
        return out
