"""Tokenizer, ChatML template and streaming detokenizer."""

from .chatml import make_context, stop_words_ids
from .stream import StreamDecoder
from .tokenizer import BatchEncoding, QwenTokenizer

__all__ = ["QwenTokenizer", "BatchEncoding", "StreamDecoder", "make_context", "stop_words_ids"]
