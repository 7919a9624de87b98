"""The fast inference engine (static KV cache, CUDA graphs, run-ahead decoding)."""

from .cache import StaticKVCache
from .engine import Engine, GenerationStats, get_engine

__all__ = ["Engine", "GenerationStats", "StaticKVCache", "get_engine"]
