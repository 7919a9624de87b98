"""qwenlm: run, chat with and convert Qwen (v1) and Qwen2-family models.

Public API:
    from qwenlm import AutoModelForCausalLM, AutoTokenizer   # the original README's names
    model, tokenizer = qwenlm.load()                         # plain API (default model)
    response, history = model.chat(tokenizer, "你好", history=None)
"""

from .auto import AutoModelForCausalLM, AutoTokenizer, load, load_model
from .config import ModelConfig
from .generation import GenerationConfig, chat, chat_stream
from .tokenizer import QwenTokenizer

__version__ = "0.1.0"

__all__ = ["AutoModelForCausalLM", "AutoTokenizer", "load", "load_model", "ModelConfig",
           "GenerationConfig", "QwenTokenizer", "chat", "chat_stream", "__version__"]
