"""OpenAI's `logprobs` objects from the engine's entries (`Sequence.token_logprobs`: a token's
log-probability and the k likeliest (id, log-probability)): the chat form (`content`: token, logprob,
UTF-8 bytes, top_logprobs) and the legacy completions form (parallel lists of tokens, logprobs, top
dicts and character offsets into the choice's text)."""

from __future__ import annotations

import codecs


class TokenText:
    """A token id's text (its bytes read as UTF-8, a partial character replaced) and its bytes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        got = self.cache.get(token)
        if got is None:
            raw = self.tokenizer.decode_bytes(token)
            got = self.cache[token] = (raw.decode("utf-8", errors="replace"), list(raw))
        return got


def chat_content(text: TokenText, tokens: list[int], entries: list) -> list[dict]:
    """The chat form's `content` list for `tokens` and their entries."""
    out = []
    for t, (lp, top) in zip(tokens, entries):
        s, raw = text(t)
        out.append({"token": s, "logprob": lp, "bytes": raw,
                    "top_logprobs": [{"token": text(i)[0], "logprob": v, "bytes": text(i)[1]} for i, v in top]})
    return out


class CompletionLogprobs:
    """The completions form, a part at a time (a stream's chunks): `text_offset` counts the characters
    of the choice's text before each token, from `start` (the echoed prompt's tokens come first)."""

    def __init__(self, text: TokenText, start: int = 0):
        self.text, self.offset = text, start
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def part(self, tokens: list[int], entries: list) -> dict:
        """`entries[i]` None: a token with no log-probability (the first of a prompt)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, e in zip(tokens, entries):
            s, raw = self.text(t)
            out["tokens"].append(s)
            out["text_offset"].append(self.offset)
            self.offset += len(self.decoder.decode(bytes(raw)))
            out["token_logprobs"].append(None if e is None else e[0])
            out["top_logprobs"].append(None if e is None else {self.text(i)[0]: v for i, v in e[1]})
        return out
