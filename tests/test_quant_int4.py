"""4-bit weight-only CPU layers: the kernel equals a plain matmul with the dequantized weight,
quantization error is bounded, and a quantized model still generates through the engine."""

import pytest
import torch
from torch import nn

from helpers import v1_config, v1_state_dict, write_checkpoint
from qwenlm import load_model
from qwenlm.quant.int4 import Int4Linear, quantize_rtn

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
                                reason="no int4 CPU kernel in this torch")


@pytest.mark.parametrize("group,out", [(32, 96), (128, 96), (32, 100)])
def test_int4_linear_equals_dequantized_matmul(group, out):
    torch.manual_seed(0)
    lin = nn.Linear(256, out, bias=True)
    q4 = Int4Linear(lin, group)
    weight = lin.weight.detach()
    padded = torch.cat((weight, weight.new_zeros(-out % 16, 256)))
    q, scale, lo = quantize_rtn(padded, group)
    w = q4.dequantize(q)
    x = torch.randn(3, 5, 256)
    want = x.to(torch.bfloat16).float() @ w.t() + lin.bias.detach()
    got = q4(x)
    assert got.shape == (3, 5, out)
    assert (got - want).abs().max() < 2e-2 * want.abs().max()
    # round-to-nearest: within half a step of the original weight ...
    rtn = ((q.view(len(padded), -1, group).float() * scale[..., None]) + lo[..., None]).view(len(padded), 256)[:out]
    step = scale[:out].repeat_interleave(group, dim=1)
    assert bool(((rtn - weight).abs() <= 0.5 * step * (1 + 1e-4)).all())
    # ... and the kernel's bf16 scales/zeros add at most bf16 rounding on top
    assert bool(((w - rtn).abs() <= (lo[:out].abs().repeat_interleave(group, dim=1) + 16 * step) / 128).all())


def test_group_must_divide_in_features():
    with pytest.raises(ValueError, match="multiple of the group size"):
        Int4Linear(nn.Linear(100, 8), 32)


def test_quantized_model_generates(tmp_path):
    cfg = v1_config(hidden=128, heads=4, mlp=128)
    path = write_checkpoint(str(tmp_path), cfg, v1_state_dict(cfg, seed=2, std=0.05))
    ref = load_model(path, dtype="bfloat16", device="cpu")
    q = load_model(path, device="cpu", quantize="int4")
    assert q.quantization in ("q4-avx2", "int4-g32") and not isinstance(q.lm_head, torch.nn.Linear)
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    a, b = ref(ids).logits.float(), q(ids).logits.float()
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.98
    out = q.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 17)
    with pytest.raises(ValueError, match="quantize must be"):
        load_model(path, quantize="int3")
