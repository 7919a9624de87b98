"""The fast inference engine (static KV cache, CUDA graphs, run-ahead decoding)."""

from .cache import StaticKVCache
from .engine import Engine, get_engine

__all__ = ["Engine", "StaticKVCache", "get_engine"]
