"""`--quantize auto`, the commands' default: on a CPU when nothing else was asked for, the GGUF file's
own blocks for a model converted from one (the default model), else 8-bit weights; the weights as
stored otherwise."""

import pytest
import torch

from qwenlm import load_model
from qwenlm.auto import auto_quantize
from qwenlm.quant import q4

KERNEL = q4.available()


@pytest.mark.skipif(not KERNEL, reason="needs the AVX2/FMA/F16C CPU kernel")
def test_default_model_gets_its_gguf_blocks_on_cpu(default_dir):
    model = load_model(default_dir, device="cpu", quantize="auto")
    assert model.quantization == "gguf-blocks"
    assert isinstance(model.blocks[0].mlp.down_proj, q4.Q4Linear) and model.blocks[0].mlp.gate_proj.bits == 5


def test_explicit_choices_win(default_dir):
    cpu = torch.device("cpu")
    model = load_model(default_dir, device="cpu", quantize="none")
    assert not hasattr(model, "quantization") and model.dtype == torch.float32
    # a dtype asked for, a GPU: the weights as stored; a GPTQ checkpoint: its float head in 8 bits
    assert auto_quantize(model, "float32", cpu, None) is None
    assert auto_quantize(model, "auto", cpu, object()) == ("int8" if KERNEL else None)
    assert auto_quantize(model, "auto", torch.device("cuda"), None) is None
    assert auto_quantize(model, "auto", cpu, None) == ("int8" if KERNEL else None)
    assert auto_quantize(model, "auto", cpu, None, from_gguf=True) == ("gguf" if KERNEL else None)
    assert auto_quantize(model, "bfloat16", cpu, None, from_gguf=True) is None


def test_layers_the_kernel_cannot_hold_stay_float(v1_chat_dir):
    model = load_model(v1_chat_dir, device="cpu", quantize="auto")  # an MLP 48 wide: not 32-wide blocks
    assert not hasattr(model, "quantization")


def test_bad_value_is_a_clear_error(v1_chat_dir):
    with pytest.raises(ValueError, match="quantize must be"):
        load_model(v1_chat_dir, quantize="int3")
