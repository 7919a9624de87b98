"""Model architectures and the registry that picks one from a config."""

from torch import nn

from ..config import ModelConfig
from .base import CausalLMOutput, QwenCausalLM
from .qwen import QWenLMHeadModel
from .qwen2 import Qwen2ForCausalLM

ARCHITECTURES = {"qwen": QWenLMHeadModel, "qwen2": Qwen2ForCausalLM}


def build_model(config: ModelConfig, init: bool = True) -> QwenCausalLM:
    """The model of `config`. `init=False` skips the layers' random initialisation: for a model built on
    the meta device whose weights come next (drawing them there is no work, but the first such draw
    imports a good part of torch, ~1.6 s of every start-up)."""
    if init:
        return ARCHITECTURES[config.arch](config)
    classes = (nn.Linear, nn.Embedding)
    saved = [cls.__dict__["reset_parameters"] for cls in classes]
    try:
        for cls in classes:
            cls.reset_parameters = _no_init
        return ARCHITECTURES[config.arch](config)
    finally:
        for cls, f in zip(classes, saved):
            cls.reset_parameters = f


def _no_init(self) -> None:
    pass


__all__ = ["ARCHITECTURES", "build_model", "CausalLMOutput", "QwenCausalLM",
           "QWenLMHeadModel", "Qwen2ForCausalLM"]
