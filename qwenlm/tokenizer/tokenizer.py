"""The Qwen tokenizer: byte-level BPE on tiktoken, with the original's special-token rules.

Owns encoding/decoding, special tokens, padding and the HF-style `__call__`. Does not own the
chat template (`chatml.py`) or file formats (`vocab.py`).
"""

from __future__ import annotations

import os
import unicodedata
from typing import Any, Iterable, Sequence

import numpy as np
import tiktoken

from .vocab import PAT_STR, Vocab, read_directory

_IGNORED_KWARGS = {"trust_remote_code", "use_fast", "revision", "resume_download", "cache_dir",
                   "local_files_only", "token", "model_max_length", "truncation_side"}


class BatchEncoding(dict):
    """dict with attribute access and `.to(device)`, like transformers' BatchEncoding."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device) -> "BatchEncoding":
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


def _as_id_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


class QwenTokenizer:
    """Tokenizer for Qwen v1 (`qwen.tiktoken`) and Qwen1.5/2/2.5 (byte-level BPE files, GGUF)."""

    def __init__(self, vocab: Vocab, errors: str = "replace", padding_side: str = "right",
                 pad_token: str | None = None, eos_token: str | None = None, **kwargs: Any):
        self.vocab = vocab
        self.errors = errors
        self.mergeable_ranks = vocab.ranks
        self.special_tokens = dict(vocab.specials)
        self.family = vocab.family
        self._build()
        self.padding_side = "right"
        self.set_padding_side(padding_side)
        self._pad_token = self._eos_token = None
        cfg = vocab.config
        self.pad_token = pad_token if pad_token is not None else _token_text(cfg.get("pad_token"))
        self.eos_token = eos_token if eos_token is not None else _token_text(cfg.get("eos_token"))
        self.model_max_length = int(kwargs.get("model_max_length", cfg.get("model_max_length", 32768)))

    def _build(self) -> None:
        n = max(list(self.mergeable_ranks.values()) + list(self.special_tokens.values())) + 1
        self._enc = tiktoken.Encoding(
            "Qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self._valid = np.zeros(n, dtype=bool)
        self._valid[list(self.mergeable_ranks.values())] = True
        self._valid[list(self.special_tokens.values())] = True
        self._special_ids = np.zeros(n, dtype=bool)
        self._special_ids[list(self.special_tokens.values())] = True
        self._skipped_ids = self._special_ids.copy()  # what skip_special_tokens drops: not the plain ones
        self._skipped_ids[[self.special_tokens[t] for t in self.vocab.plain if t in self.special_tokens]] = False
        self.decoder: dict[int, bytes | str] = {v: k for k, v in self.mergeable_ranks.items()}
        self.decoder.update({v: k for k, v in self.special_tokens.items()})
        self.eod_id = self.special_tokens["<|endoftext|>"]
        self.im_start_id = self.special_tokens["<|im_start|>"]
        self.im_end_id = self.special_tokens["<|im_end|>"]

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> "QwenTokenizer":
        """Load from a checkpoint directory, a `.gguf` file, or (via `qwenlm.hub`) a model id."""
        for k in _IGNORED_KWARGS & kwargs.keys():
            kwargs.pop(k)
        if os.path.isfile(path) and path.endswith(".gguf"):
            from ..weights.gguf import read_gguf_vocab

            return cls(read_gguf_vocab(path), **kwargs)
        if not os.path.isdir(path):
            from ..hub import resolve_model

            path = resolve_model(path)
        return cls(read_directory(path), **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        for k in ("_enc", "_valid", "_special_ids", "_skipped_ids", "decoder"):
            state.pop(k)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._build()

    # ---- special tokens ---------------------------------------------------------------------
    def _check_special(self, token: str | None) -> str | None:
        if token is None:
            return None
        if token not in self.special_tokens:
            raise ValueError(
                f"{token!r} is not a special token of this tokenizer; adding regular or unknown "
                f"tokens is not supported (known: <|endoftext|>, <|im_start|>, <|im_end|>, ...)"
            )
        return token

    @property
    def pad_token(self) -> str | None:
        return self._pad_token

    @pad_token.setter
    def pad_token(self, token: str | None) -> None:
        self._pad_token = self._check_special(token)

    @property
    def eos_token(self) -> str | None:
        return self._eos_token

    @eos_token.setter
    def eos_token(self, token: str | None) -> None:
        self._eos_token = self._check_special(token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self._pad_token is None else self.special_tokens[self._pad_token]

    @property
    def eos_token_id(self) -> int | None:
        return None if self._eos_token is None else self.special_tokens[self._eos_token]

    def set_padding_side(self, side: str) -> None:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {side!r}")
        self.padding_side = side

    def __len__(self) -> int:
        return int(self._valid.sum())

    @property
    def id_limit(self) -> int:
        """One past the largest valid id: logits at or beyond it are never sampled."""
        return len(self._valid)

    @property
    def vocab_size(self) -> int:
        return len(self)

    def get_vocab(self) -> dict[bytes, int]:
        return dict(self.mergeable_ranks)

    # ---- encoding -----------------------------------------------------------------------
    def encode(self, text: str, allowed_special: str | set = "all",
               disallowed_special: str | Iterable = (), **kwargs: Any) -> list[int]:
        """Token ids of `text` (NFC-normalised). Special-token text is parsed as specials unless
        `allowed_special=set()`; `disallowed_special` makes such text raise ValueError."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        text = unicodedata.normalize("NFC", text)
        if not isinstance(disallowed_special, str):
            disallowed_special = set(disallowed_special)
        return self._enc.encode(text, allowed_special=allowed_special,
                                disallowed_special=disallowed_special)

    def tokenize(self, text: str, allowed_special: str | set = "all",
                 disallowed_special: str | Iterable = (), **kwargs: Any) -> list[bytes | str]:
        """Surface forms: `bytes` for BPE tokens, `str` for special tokens."""
        return [self.decoder[i] for i in self.encode(text, allowed_special, disallowed_special)]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, (bytes, str)):
            return self.special_tokens.get(tokens) if isinstance(tokens, str) else self.mergeable_ranks.get(tokens)
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        single = isinstance(ids, int)
        ids = self._check_ids(_as_id_list(ids))
        toks = [self.decoder[i] for i in ids]
        return toks[0] if single else toks

    def convert_tokens_to_string(self, tokens: Sequence[bytes | str]) -> str:
        out, buf = [], b""
        for t in tokens:
            if isinstance(t, bytes):
                buf += t
            else:
                out.append(buf.decode("utf-8", errors=self.errors))
                buf = b""
                out.append(t)
        out.append(buf.decode("utf-8", errors=self.errors))
        return "".join(out)

    # ---- decoding -----------------------------------------------------------------------
    def _check_ids(self, ids: list[int]) -> list[int]:
        if ids:
            arr = np.asarray(ids)
            bad = (arr < 0) | (arr >= len(self._valid))
            bad[~bad] = ~self._valid[arr[~bad]]
            if bad.any():
                raise ValueError(
                    f"token id {int(arr[bad][0])} is not in the vocabulary (valid ids: 0..{len(self._valid) - 1}"
                    f" except unused slots; the tokenizer has {len(self)} tokens)"
                )
        return ids

    def is_special_id(self, token_id: int) -> bool:
        return 0 <= token_id < len(self._special_ids) and bool(self._special_ids[token_id])

    def is_skipped_id(self, token_id: int) -> bool:
        """Whether decoding with skip_special_tokens drops this id: a control token, not an added token
        that is text (tokenizer_config.json "special": false, e.g. <tool_call>), as in transformers."""
        return 0 <= token_id < len(self._skipped_ids) and bool(self._skipped_ids[token_id])

    def decode(self, token_ids, skip_special_tokens: bool = False, errors: str | None = None,
               **kwargs: Any) -> str:
        """Text of `token_ids`; an id outside the vocabulary raises ValueError."""
        ids = self._check_ids(_as_id_list(token_ids))
        if skip_special_tokens:
            ids = [i for i in ids if not self._skipped_ids[i]]
        return self._enc.decode(ids, errors=errors or self.errors)

    def decode_bytes(self, token_id: int) -> bytes:
        tok = self.decoder.get(token_id)
        if tok is None:
            self._check_ids([token_id])
        return tok.encode("utf-8") if isinstance(tok, str) else tok

    def batch_decode(self, sequences, **kwargs: Any) -> list[str]:
        return [self.decode(s, **kwargs) for s in sequences]

    # ---- HF-style call --------------------------------------------------------------------
    def __call__(self, text: str | list[str], padding: bool | str = False, truncation: bool = False,
                 max_length: int | None = None, return_tensors: str | None = None,
                 return_attention_mask: bool = True, return_token_type_ids: bool = True,
                 allowed_special: str | set = "all", disallowed_special: str | Iterable = (),
                 **kwargs: Any) -> BatchEncoding:
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        rows = [self.encode(t, allowed_special, disallowed_special) for t in texts]
        if truncation and max_length is not None:
            rows = [r[:max_length] for r in rows]
        if padding is True or padding == "longest":
            width = max((len(r) for r in rows), default=0)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            width = max_length
        elif padding in (False, "do_not_pad"):
            width = None
        else:
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', not {padding!r}")
        masks = [[1] * len(r) for r in rows]
        if width is not None and any(len(r) < width for r in rows):
            if self.pad_token_id is None:
                raise ValueError(
                    "asked to pad but the tokenizer has no pad token: pass pad_token='<|endoftext|>' "
                    "(or another special token) to from_pretrained, or set tokenizer.pad_token"
                )
            rows, masks = zip(*(self._pad(r, m, width) for r, m in zip(rows, masks)))
        out = BatchEncoding(input_ids=list(rows))
        if return_token_type_ids:
            out["token_type_ids"] = [[0] * len(r) for r in rows]
        if return_attention_mask:
            out["attention_mask"] = list(masks)
        if return_tensors == "pt":
            import torch

            if width is None and len({len(r) for r in rows}) > 1:
                raise ValueError("sequences of different lengths need padding=True to become a tensor")
            out = BatchEncoding({k: torch.tensor(v, dtype=torch.long) for k, v in out.items()})
        elif return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r} is not supported (use 'pt' or None)")
        elif single:
            out = BatchEncoding({k: v[0] for k, v in out.items()})
        return out

    def _pad(self, row: list[int], mask: list[int], width: int) -> tuple[list[int], list[int]]:
        n = width - len(row)
        pad, zeros = [self.pad_token_id] * n, [0] * n
        if self.padding_side == "left":
            return pad + row, zeros + mask
        return row + pad, mask + zeros


def _token_text(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok
