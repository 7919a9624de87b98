"""Structured output: a reply held to a JSON schema (or to any JSON object) token by token, with
llguidance (the grammar engine vLLM and llama.cpp use) over the tokenizer's own tiktoken encoding.

At every step the sequence's `Constraint` says which tokens may come next (a bool row over the
vocabulary: the engine's sampler sets the others to -inf before it chooses) and is then told which
token came. Once the value is complete, only the end token may follow. Nothing is forced: the model
still picks among the allowed tokens with the request's own sampling settings.
"""

from __future__ import annotations

import threading

import numpy as np
import torch


class GrammarError(ValueError):
    """A schema the grammar engine rejects (answered with 400)."""


def available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


class Grammars:
    """Constraints over one tokenizer. Reading the vocabulary into llguidance takes about a second, so
    it happens once, at the first request that needs it."""

    def __init__(self, tokenizer, vocab_size: int, end_id: int):
        self.tokenizer, self.vocab_size, self.end_id = tokenizer, vocab_size, end_id
        self._lltok = None
        self._lock = threading.Lock()

    def _tokenizer(self):
        with self._lock:
            if self._lltok is None:
                from llguidance.tiktoken import lltokenizer_from_encoding

                self._lltok = lltokenizer_from_encoding(self.tokenizer._enc, n_vocab=self.vocab_size,
                                                        eos_token=self.end_id)
            return self._lltok

    def json(self, schema: dict | None = None) -> "Constraint":
        """A constraint to one JSON value of `schema` (None: any JSON object)."""
        import llguidance

        try:  # oneOf read as anyOf (pydantic's unions): a value of one branch is a value of the union
            grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"} if schema is None else schema,
                                                                    defaults={"coerce_one_of": True})
            matcher = llguidance.LLMatcher(self._tokenizer(), grammar)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # (a panic in the Rust library is a BaseException: still the schema's fault)
            raise GrammarError(f"the JSON schema is not usable: {e}") from None
        if matcher.is_error():
            raise GrammarError(f"the JSON schema is not usable: {matcher.get_error()}")
        return Constraint(matcher, self.vocab_size, self.end_id)


class Constraint:
    """One sequence's place in its grammar."""

    def __init__(self, matcher, vocab_size: int, end_id: int):
        self.matcher, self.vocab_size, self.end_id = matcher, vocab_size, end_id

    def allowed(self) -> torch.Tensor:
        """(vocab_size,) bool: the tokens that may come next. If the grammar is stuck (it should not
        be), only the end token: the reply ends instead of going on unconstrained."""
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        bits = np.unpackbits(words, bitorder="little")[:self.vocab_size].astype(bool)
        if self.matcher.is_error() or not bits.any():
            bits = np.zeros(self.vocab_size, dtype=bool)
            bits[self.end_id] = True
        return torch.from_numpy(bits)

    def advance(self, token: int) -> None:
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token)

    @property
    def complete(self) -> bool:
        """Whether what was generated so far is a whole value of the grammar."""
        return self.matcher.is_accepting() or self.matcher.is_stopped()
