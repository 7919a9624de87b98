"""Sampling, stop conditions, the reference generation loop and the chat functions."""

from .api import chat, chat_stream, hf_generate
from .config import GenerationConfig
from .generate import StopChecker, generate, generate_steps, stream_text

__all__ = ["GenerationConfig", "StopChecker", "generate", "generate_steps", "stream_text",
           "chat", "chat_stream", "hf_generate"]
