"""Fused projections (models/layers.py: FusedLinears): gate/up (and Qwen2's q/k/v) multiplied as one
matrix whose row slices are the layers' own weights. The GPU engines turn it on; here it is held to
an unfused copy of the same model, and to the reference loop through both engines."""

import copy

import pytest
import torch
from helpers import drain_batch_engine, random_prompts, tiny_model
from torch import nn

from qwenlm import GenerationConfig
from qwenlm.engine import Engine
from qwenlm.engine.batch import BatchEngine
from qwenlm.generation import generate
from qwenlm.models.layers import FusedLinears

GREEDY = GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=12, eos_token_id=None,
                          pad_token_id=0)


@pytest.fixture(scope="module", params=["v1", "qwen2"])
def pair(request, tmp_path_factory):
    """(unfused model, fused copy)."""
    plain = tiny_model(request.param, str(tmp_path_factory.mktemp(request.param)))
    fused = copy.deepcopy(plain)
    groups = fused.fuse_projections()
    assert groups == len(plain.blocks) * (1 if request.param == "v1" else 2)
    return plain, fused


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


def test_fused_model_computes_the_same(pair):
    plain, fused = pair
    ids = torch.tensor([random_prompts(17)[0]])
    torch.testing.assert_close(_logits(fused, ids), _logits(plain, ids), rtol=1e-5, atol=1e-5)


def test_parameters_are_views_into_one_matrix(pair):
    plain, fused = pair
    assert fused.state_dict().keys() == plain.state_dict().keys()
    for (name, a), b in zip(fused.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    mlp = fused.blocks[0].mlp
    group = mlp.__dict__["_fused"]
    gate, up = (getattr(mlp, n) for n in group.names)
    assert gate.weight.untyped_storage().data_ptr() == up.weight.untyped_storage().data_ptr() == \
        group.weight.untyped_storage().data_ptr()  # no second copy of the weights
    assert group.intact()
    # same parameter memory as the unfused model
    size = sum(p.numel() for p in fused.parameters())
    assert size == sum(p.numel() for p in plain.parameters())


def test_a_replaced_layer_ends_the_fusion(pair):
    """Re-assigning one of the layers (as quantization does) must not leave the fused matrix in use."""
    plain, fused = copy.deepcopy(pair[0]), copy.deepcopy(pair[0])
    fused.fuse_projections()
    names = fused.blocks[1].mlp.__dict__["_fused"].names
    new = nn.Linear(plain.config.hidden_size, plain.config.intermediate_size, bias=False)
    torch.nn.init.normal_(new.weight, std=0.2)
    for m in (plain, fused):
        setattr(m.blocks[1].mlp, names[0], copy.deepcopy(new))
    assert not fused.blocks[1].mlp.__dict__["_fused"].intact()
    ids = torch.tensor([random_prompts(9)[0]])
    torch.testing.assert_close(_logits(fused, ids), _logits(plain, ids), rtol=1e-5, atol=1e-5)
    # writing new values into a layer in place keeps the fusion (the views share its memory)
    with torch.no_grad():
        for m in (plain, fused):
            m.blocks[0].mlp.get_parameter(f"{names[1]}.weight").mul_(1.5)
    assert fused.blocks[0].mlp.__dict__["_fused"].intact()
    torch.testing.assert_close(_logits(fused, ids), _logits(plain, ids), rtol=1e-5, atol=1e-5)


def test_moving_or_copying_the_model_ends_the_fusion(pair):
    copied = copy.deepcopy(pair[1])  # deepcopy clones each parameter: the views become copies
    assert copied.blocks[0].mlp.__dict__["_fused"] is None  # and the fused matrix is not copied along
    ids = torch.tensor([random_prompts(7)[0]])
    torch.testing.assert_close(_logits(copied, ids), _logits(pair[0], ids), rtol=1e-5, atol=1e-5)
    plain, fused = copy.deepcopy(pair[0]).to(torch.float64), copy.deepcopy(pair[0])
    fused.fuse_projections()
    fused.to(torch.float64)
    assert not fused.blocks[0].mlp.__dict__["_fused"].intact()
    torch.testing.assert_close(_logits(fused, ids), _logits(plain, ids))
    assert fused.fuse_projections() > 0  # fusing again re-establishes it at the new dtype
    assert fused.blocks[0].mlp.__dict__["_fused"].intact()
    torch.testing.assert_close(_logits(fused, ids), _logits(plain, ids))


def test_gradients_reach_the_layers(pair):
    """Fine-tuning a fused model: the layers' own weights get the gradients the unfused model gives."""
    plain, fused = copy.deepcopy(pair[0]), copy.deepcopy(pair[0])
    fused.fuse_projections()
    ids = torch.tensor([random_prompts(8)[0]])
    grads = []
    for m in (plain, fused):
        mlp = m.blocks[0].mlp
        layers = [getattr(mlp, n) for n in type(mlp).FUSE]
        for layer in layers:
            layer.weight.requires_grad_(True)
        m(ids, labels=ids).loss.backward()
        grads.append([layer.weight.grad for layer in layers])
    assert fused.blocks[0].mlp.__dict__["_fused"].intact()
    for got, want in zip(grads[1], grads[0]):
        assert got is not None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_only_plain_matching_layers_fuse():
    a, b = nn.Linear(8, 4), nn.Linear(8, 4, bias=False)
    holder = nn.Module()
    holder.a, holder.b = a, b
    with pytest.raises(ValueError):
        FusedLinears(holder, ("a", "b"))  # one with bias, one without
    holder.b = nn.Linear(6, 4)
    with pytest.raises(ValueError):
        FusedLinears(holder, ("a", "b"))  # different inputs


def test_engines_with_fusion_equal_the_reference(pair, monkeypatch):
    """QWENLM_FUSE=1 makes the engines fuse on a CPU too (on a GPU they do by default)."""
    plain, _ = pair
    model = copy.deepcopy(plain)
    monkeypatch.setenv("QWENLM_FUSE", "1")
    prompts = random_prompts(3, 11, 20)
    want = generate(plain, prompts, GREEDY)
    assert Engine(model, bucket=8).generate(prompts, GREEDY) == want
    assert model.blocks[0].mlp.__dict__["_fused"].intact()
    assert drain_batch_engine(BatchEngine(model, max_num_seqs=2, max_model_len=64), prompts, GREEDY) == want


def test_engines_do_not_fuse_on_cpu_by_default(pair, monkeypatch):
    monkeypatch.delenv("QWENLM_FUSE", raising=False)
    model = copy.deepcopy(pair[0])
    Engine(model)
    assert "_fused" not in model.blocks[0].mlp.__dict__


def test_residual_adds_fused_into_the_norms_compute_the_same(pair, monkeypatch):
    """QWENLM_FUSE_NORM=1 (on a GPU: the default) runs the blocks with each residual add done by the next
    norm (the last block's by the final norm): the same operations in another grouping, so on a CPU,
    where they run one by one, the same logits bit for bit, and the engines still equal the reference."""
    from qwenlm.models import layers

    plain, _ = pair
    ids = torch.tensor([random_prompts(13)[0], random_prompts(13)[0][::-1]])
    monkeypatch.setenv("QWENLM_FUSE_NORM", "0")
    want = _logits(plain, ids)
    prompts = random_prompts(3, 11, 20)
    want_tokens = generate(plain, prompts, GREEDY)
    steps = []
    monkeypatch.setenv("QWENLM_FUSE_NORM", "1")
    real = layers._add_rms_norm
    monkeypatch.setattr(layers, "_add_rms_norm", lambda *a: (steps.append(1), real(*a))[1])
    assert torch.equal(_logits(plain, ids), want)
    assert len(steps) == 2 * len(plain.blocks)  # each block's two adds, through the fused function
    assert Engine(plain, bucket=8).generate(prompts, GREEDY) == want_tokens
    assert drain_batch_engine(BatchEngine(plain, max_num_seqs=2, max_model_len=64), prompts, GREEDY) == want_tokens


def test_residual_fusion_is_on_for_cuda_tensors_only_by_default(monkeypatch):
    from qwenlm.models.layers import FUSED, residual_fusion

    monkeypatch.delenv("QWENLM_FUSE_NORM", raising=False)
    cpu = torch.zeros(2)
    assert not residual_fusion(cpu)
    monkeypatch.setenv("QWENLM_FUSE_NORM", "1")
    assert residual_fusion(cpu)
    if torch.cuda.is_available():
        monkeypatch.setenv("QWENLM_FUSE_NORM", "0")
        assert not residual_fusion(cpu.cuda())
        monkeypatch.delenv("QWENLM_FUSE_NORM")
        assert residual_fusion(cpu.cuda()) == FUSED.enabled
