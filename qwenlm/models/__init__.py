"""Model architectures and the registry that picks one from a config."""

from ..config import ModelConfig
from .base import CausalLMOutput, QwenCausalLM
from .qwen import QWenLMHeadModel
from .qwen2 import Qwen2ForCausalLM

ARCHITECTURES = {"qwen": QWenLMHeadModel, "qwen2": Qwen2ForCausalLM}


def build_model(config: ModelConfig) -> QwenCausalLM:
    return ARCHITECTURES[config.arch](config)


__all__ = ["ARCHITECTURES", "build_model", "CausalLMOutput", "QwenCausalLM",
           "QWenLMHeadModel", "Qwen2ForCausalLM"]
