"""Structured output: a reply held to a JSON schema (or to any JSON object) token by token, with
llguidance (the grammar engine vLLM and llama.cpp use) over the tokenizer's own tiktoken encoding.

At every step the sequence's `Constraint` says which tokens may come next (a bool row over the
vocabulary: the engine's sampler sets the others to -inf before it chooses) and is then told which
token came. Once the value is complete, only the end token may follow. Nothing is forced: the model
still picks among the allowed tokens with the request's own sampling settings.
"""

from __future__ import annotations

import json
import threading
import weakref

import numpy as np
import torch


class GrammarError(ValueError):
    """A response format or schema that cannot be used (the server answers 400)."""


def requested_schema(response_format: dict | None) -> tuple[bool, dict | None]:
    """OpenAI's `response_format` -> (held to JSON?, the schema; None: any JSON object)."""
    if response_format is None:
        return False, None
    if not isinstance(response_format, dict):
        raise GrammarError(f"response_format must be a dict such as {{'type': 'json_object'}}, not {response_format!r}")
    kind = response_format.get("type", "text")
    if kind == "text":
        return False, None
    if kind == "json_object":
        return True, None
    if kind != "json_schema":
        raise GrammarError(f"response_format type {kind!r}: expected text, json_object or json_schema")
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise GrammarError("response_format json_schema needs json_schema.schema, a JSON schema object")
    return True, schema


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def grammars_for(tokenizer, vocab_size: int, end_id: int) -> "Grammars":
    """The Grammars of a tokenizer (one per tokenizer, vocabulary size and end token: each reads the
    vocabulary once)."""
    if not available():
        raise GrammarError("structured output needs the llguidance package (pip install llguidance)")
    per = _CACHE.setdefault(tokenizer, {})
    key = (vocab_size, end_id)
    if key not in per:
        per[key] = Grammars(tokenizer, vocab_size, end_id)
    return per[key]


def hold(logits: torch.Tensor, constraints: list) -> None:
    """In each row of `logits` (B, V) whose constraint is not None, set what it does not allow next to
    -inf (one write for all of them)."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return
    allowed = torch.stack([constraints[i].allowed() for i in rows]).to(logits.device)  # (rows, V): V the model's
    idx = torch.tensor(rows, device=logits.device)
    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))


def advance(constraints: list, tokens: list[int]) -> None:
    """Tell each constraint (None: none) the token its row got."""
    for c, t in zip(constraints, tokens):
        if c is not None:
            c.advance(t)


def available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def _schema(schema: dict | None) -> dict:
    """The schema as given (None: any object), with oneOf read as anyOf (how pydantic writes unions: a
    value of one branch is a value of the union), unless the schema's own x-guidance says otherwise."""
    schema = {"type": "object"} if schema is None else schema
    if isinstance(schema, dict):
        schema = {**schema, "x-guidance": {"coerce_one_of": True, **(schema.get("x-guidance") or {})}}
    return schema


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

        return self._matcher(lambda: llguidance.LLMatcher.grammar_from_json_schema(_schema(schema)))

    def regex(self, pattern: str) -> "Constraint":
        """A constraint to text that the regular expression matches whole (Rust regex syntax)."""
        import llguidance

        return self._matcher(lambda: llguidance.LLMatcher.grammar_from_regex(pattern), "regular expression")

    def one_of(self, texts: list[str]) -> "Constraint":
        """A constraint to exactly one of `texts`."""
        import llguidance

        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise GrammarError("the choices must be a list of non-empty strings")
        lark = "start: " + " | ".join(json.dumps(t) for t in texts)
        return self._matcher(lambda: llguidance.LLMatcher.grammar_from_lark(lark), "choice")

    def choice(self, options: list[tuple[str, dict | None, str]]) -> "Constraint":
        """A constraint to one of `options`, each (text before, JSON schema of a value, text after): a
        tool call whose start the server wrote, the model writing the rest (which tool, if several, and
        arguments valid for that tool's parameters)."""
        import llguidance

        rules = ["start: " + " | ".join(f"o{k}" for k in range(len(options)))]
        for k, (before, schema, after) in enumerate(options):
            parts = [json.dumps(t) for t in (before,) if t] + [f"v{k}"] + [json.dumps(t) for t in (after,) if t]
            rules.append(f"o{k}: " + " ".join(parts))
            rules.append(f"v{k}: %json " + json.dumps(_schema(schema)))
        return self._matcher(lambda: llguidance.LLMatcher.grammar_from_lark("\n".join(rules)))

    def _matcher(self, make_grammar, what: str = "JSON schema") -> "Constraint":
        import llguidance

        try:
            matcher = llguidance.LLMatcher(self._tokenizer(), make_grammar())
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # (a panic in the Rust library is a BaseException: still the input's fault)
            raise GrammarError(f"the {what} is not usable: {e}") from None
        if matcher.is_error():
            raise GrammarError(f"the {what} is not usable: {matcher.get_error()}")
        return Constraint(matcher, self.vocab_size, self.end_id)


class Constraint:
    """One sequence's place in its grammar."""

    def __init__(self, matcher, vocab_size: int, end_id: int):
        self.matcher, self.vocab_size, self.end_id = matcher, vocab_size, end_id
        self._allowed: torch.Tensor | None = None  # the next step's, once computed

    def allowed(self) -> torch.Tensor:
        """(vocab_size,) bool: the tokens that may come next. If the grammar is stuck (it should not
        be), only the end token: the reply ends instead of going on unconstrained. The first call of a
        grammar can take long (its lexer is built then; llguidance releases the GIL meanwhile): the
        server makes it before the sequence joins the batch (serve/app.py)."""
        if self._allowed is None:
            words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
            bits = np.unpackbits(words, bitorder="little")[:self.vocab_size].astype(bool)
            if self.matcher.is_error() or not bits.any():
                bits = np.zeros(self.vocab_size, dtype=bool)
                bits[self.end_id] = True
            self._allowed = torch.from_numpy(bits)
        return self._allowed

    def advance(self, token: int) -> None:
        self._allowed = None
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token)

    @property
    def complete(self) -> bool:
        """Whether what was generated so far is a whole value of the grammar."""
        return self.matcher.is_accepting() or self.matcher.is_stopped()
