"""`--quantize int4|int8` on a CPU quantizes each linear layer as the load reads it (one layer's float
weight in memory at a time, not the whole model in fp32) and keeps a 16-bit embedding table as stored.
The model that comes out is the one the whole-model path makes: load in fp32, then quantize every
layer (`quantize_model_int4/int8`) - block for block, and logit for logit."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import tiny_hf_qwen2, v1_config, v1_state_dict, write_checkpoint
from qwenlm import load_model
from qwenlm.quant import q4, quantize_model_int4, quantize_model_int8
from qwenlm.quant.int4 import StoredEmbedding
from qwenlm.weights import loader

pytestmark = pytest.mark.skipif(not q4.available(), reason="needs the AVX2/FMA/F16C CPU kernel")


def _to_bf16(path: str) -> str:
    f = os.path.join(path, "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, f)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("qload")
    cfg = v1_config(hidden=64, heads=4, layers=2, mlp=64)
    return {
        "v1-bf16": _to_bf16(write_checkpoint(str(d / "v1"), cfg, v1_state_dict(cfg, seed=3))),
        "qwen2-bf16-tied": _to_bf16(tiny_hf_qwen2(str(d / "q2t"), hidden=64, heads=4, kv_heads=2, mlp=128,
                                                  tie=True)),
        "qwen2-fp32": tiny_hf_qwen2(str(d / "q2"), hidden=64, heads=4, kv_heads=2, mlp=128),
    }


def _linear_weights(model) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("kind", ["v1-bf16", "qwen2-bf16-tied", "qwen2-fp32"])
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_layers_quantized_as_read_equal_the_whole_model_path(checkpoints, kind, quantize, monkeypatch):
    path = checkpoints[kind]
    whole = load_model(path, dtype="float32", device="cpu", quantize=None)
    linears = _linear_weights(whole)
    (quantize_model_int8 if quantize == "int8" else quantize_model_int4)(whole)

    assigned = []
    real_assign = loader._assign
    monkeypatch.setattr(loader, "_assign", lambda m, name, t, p: (assigned.append(name), real_assign(m, name, t, p)))
    model = load_model(path, device="cpu", quantize=quantize)
    # no linear weight the checkpoint holds went into the model as a float tensor
    assert linears & set(assigned) == set()
    assert model.quantization == whole.quantization and model.dtype == torch.float32

    got, want = model.state_dict(), whole.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name].to(want[name].dtype), want[name]), name
    if kind.endswith("bf16") or kind.endswith("bf16-tied"):
        assert isinstance(model.embed, StoredEmbedding) and model.embed.weight.dtype == torch.bfloat16
    else:  # an fp32 table is used as stored anyway (memory-mapped)
        assert isinstance(model.embed, torch.nn.Embedding)
    ids = torch.tensor([[1, 5, 9, 200, 7, 3, 999, 42]])
    with torch.inference_mode():
        assert model.embed(ids).dtype == torch.float32
        assert torch.equal(model(ids).logits, whole(ids).logits)


def test_casting_keeps_a_tied_head_shared(checkpoints):
    from qwenlm.quant.int4 import cast_all_but_blocks

    model = load_model(checkpoints["qwen2-bf16-tied"], dtype="float32", device="cpu")
    assert model.lm_head.weight is model.embed.weight
    cast_all_but_blocks(model, torch.bfloat16)  # (what the aten int4 path does where the kernel is missing)
    assert model.lm_head.weight is model.embed.weight and model.embed.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
