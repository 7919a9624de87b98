"""Streaming detokenizer: turns token ids into text pieces without ever splitting a UTF-8 character.

A byte-level BPE token may end in the middle of a multi-byte character; the incremental UTF-8
decoder holds those bytes back until the character is complete (or invalid, then U+FFFD).
"""

from __future__ import annotations

import codecs


class StreamDecoder:
    """`put(token_id) -> str` yields only complete characters; `flush()` returns what is left."""

    def __init__(self, tokenizer, skip_special_tokens: bool = False, errors: str = "replace"):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._dec = codecs.getincrementaldecoder("utf-8")(errors=errors)

    def put(self, token_id: int) -> str:
        if self.tokenizer.is_special_id(token_id):
            if self.skip_special_tokens and self.tokenizer.is_skipped_id(token_id):
                return ""
            # a special token is whole text: first flush any dangling bytes
            return self._dec.decode(b"", final=True) + self.tokenizer.decode_bytes(token_id).decode()
        return self._dec.decode(self.tokenizer.decode_bytes(token_id))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)
