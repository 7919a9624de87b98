"""GPTQ checkpoints in the original Int4/Int8 layout, built by hand here: pack/unpack round trips,
the stored-zero-minus-one convention, group indices with and without act-order, and whole models
(Qwen v1 names with quantize_config.json, Qwen2 names with config.json's quantization_config) that
load and compute what the dequantized weights compute."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import tiny_hf_qwen2, v1_config, v1_state_dict, write_checkpoint
from qwenlm import load_model
from qwenlm.quant import gptq, q4

AVX2 = {"avx2", "fma", "f16c"} <= q4._cpu_flags()


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (64, 24), generator=g)
    packed = gptq.pack_rows(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 24)
    assert torch.equal(gptq.unpack_rows(packed, bits), q.int())
    z = torch.randint(0, 2**bits, (3, 24), generator=g)
    pz = gptq.pack_cols(z, bits)
    assert pz.shape == (3, 24 * bits // 32) and torch.equal(gptq.unpack_cols(pz, bits), z.int())


def test_packing_layout_matches_the_spec():
    # 4 bits: qweight row 0 holds input rows 0..7 of column n, row k at bit offset 4k, LSB first
    q = torch.zeros(8, 2, dtype=torch.int64)
    q[:, 0] = torch.arange(8)
    q[:, 1] = 15
    packed = gptq.pack_rows(q, 4)
    assert packed[0, 0].item() == 0x76543210 and packed[0, 1].item() == -1  # 0xFFFFFFFF as int32
    # symmetric 4-bit zero 8 is stored as 7 in every nibble: 0x77777777
    assert gptq.pack_cols(torch.full((1, 8), 7), 4)[0, 0].item() == 0x77777777


def _quantize(w: torch.Tensor, bits: int, gs: int, act_order: bool, seed: int):
    """RTN quantization of an (N, K) weight into the GPTQ tensors, and the (N, K) weight they mean."""
    n, k = w.shape
    groups = k // gs
    if act_order:  # groups over a random column order, like GPTQ with desc_act
        order = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[order] = torch.arange(k, dtype=torch.int32) // gs
    else:
        g_idx = torch.arange(k, dtype=torch.int32) // gs
    wt = w.t().double()  # (K, N)
    qmax = 2**bits - 1
    scales = torch.zeros(groups, n, dtype=torch.float16)
    zeros = torch.zeros(groups, n, dtype=torch.int64)
    for gi in range(groups):
        rows = wt[g_idx == gi]
        lo, hi = rows.min(0).values.clamp(max=0), rows.max(0).values.clamp(min=0)
        s = ((hi - lo) / qmax).clamp(min=1e-8)
        scales[gi] = s.half()
        zeros[gi] = torch.round(-lo / scales[gi].double()).clamp(0, qmax).long()
    s_k, z_k = scales.double()[g_idx.long()], zeros[g_idx.long()]
    q = torch.round(wt / s_k + z_k).clamp(0, qmax).long()
    w_deq = ((q - z_k).double() * s_k).t().float()  # the weight the tensors encode, computed here
    tensors = {"qweight": gptq.pack_rows(q, bits), "qzeros": gptq.pack_cols(zeros - 1, bits),
               "scales": scales, "g_idx": g_idx}
    return tensors, w_deq


def _gptq_checkpoint(src: str, dst: str, targets: list[str], bits: int, gs: int, act_order: bool,
                     in_config: bool, bias_everywhere: bool):
    """dst: the GPTQ twin of checkpoint src; also dst + '-ref': the dense model of the same values."""
    sd = load_file(os.path.join(src, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    out, ref = {}, {}
    for name, t in sd.items():
        layer = name[:-len(".weight")]
        if name.endswith(".weight") and any(layer.endswith(x) for x in targets):
            tensors, w = _quantize(t, bits, gs, act_order, seed=len(out))
            out.update({f"{layer}.{k}": v for k, v in tensors.items()})
            ref[name] = w
            if bias_everywhere and f"{layer}.bias" not in sd:
                out[f"{layer}.bias"] = torch.zeros(t.shape[0], dtype=torch.float16)  # AutoGPTQ's extra bias
        else:
            out[name] = t
            ref[name] = t
    qc = {"bits": bits, "group_size": gs, "damp_percent": 0.01, "desc_act": act_order, "static_groups": False,
          "sym": False, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model"}
    if in_config:
        cfg = {**cfg, "quantization_config": {**qc, "quant_method": "gptq"}}
    write_checkpoint(dst, cfg, out)
    if not in_config:
        with open(os.path.join(dst, "quantize_config.json"), "w") as f:
            json.dump(qc, f)
    write_checkpoint(dst + "-ref", json.load(open(os.path.join(src, "config.json"))), ref)
    return dst, dst + "-ref"


V1_TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"]
Q2_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("gptq_src")
    cfg = v1_config(hidden=64, heads=4, layers=2, mlp=64)
    v1 = write_checkpoint(str(d / "v1"), cfg, v1_state_dict(cfg, seed=5))
    q2 = tiny_hf_qwen2(str(d / "q2"), hidden=64, heads=4, kv_heads=2, mlp=128)
    return {"v1": (v1, V1_TARGETS), "qwen2": (q2, Q2_TARGETS)}


def _logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


CASES = [("v1", 4, 32, False, False), ("v1", 8, 32, True, False), ("qwen2", 4, 32, True, True),
         ("qwen2", 8, 64, False, True), ("v1", 4, 32, True, True)]


@pytest.mark.parametrize("arch,bits,gs,act_order,in_config", CASES)
def test_gptq_checkpoint_loads_and_matches(sources, tmp_path, monkeypatch, arch, bits, gs, act_order, in_config):
    src, targets = sources[arch]
    path, ref_path = _gptq_checkpoint(src, str(tmp_path / "gptq"), targets, bits, gs, act_order, in_config,
                                      bias_everywhere=True)
    model = load_model(path, dtype="float32", device="cpu")
    ref = load_model(ref_path, dtype="float32", device="cpu")
    assert model.quantization.startswith(f"gptq-{bits}bit")
    ids = list(range(5, 40, 3))
    got, want = _logits(model, ids), _logits(ref, ids)
    if AVX2:  # on the AVX2 kernel: the layers hold the same weights...
        lin = [m for m in model.modules() if isinstance(m, q4.Q4Linear)]
        assert len(lin) == len(targets) * 2
        for name, m in model.named_modules():
            if isinstance(m, q4.Q4Linear):
                w_ref = dict(ref.named_modules())[name].weight
                w = q4.dequantize_q4(m.codes, m.d, m.m)
                if m.perm is not None:
                    w = w[:, torch.argsort(m.perm)]
                assert (w - w_ref).abs().max() <= 2e-3 * w_ref.abs().max()  # fp16 rounding of the offsets
        # ...the many-row path multiplies by exactly those weights (fp16 offsets: ~0.1% of the logits)...
        monkeypatch.setattr(q4, "_GEMV_MAX_ROWS", 0)
        exact = _logits(model, ids)
        assert (exact - want).abs().max() < 5e-3 * want.abs().max()
        # ...and the few-row (decode) path rounds activations to int8 blocks on the way: about 1% per
        # layer (test_quant_q4 holds the kernel to that arithmetic exactly), which this tiny random
        # model compounds to 2-4% of its logit scale
        assert (got - want).abs().max() < 5e-2 * want.abs().max()
    else:  # dequantized at load: the same arithmetic as the dense model
        assert (got - want).abs().max() < 1e-4 * want.abs().max()


@pytest.mark.skipif(not AVX2, reason="needs AVX2/FMA/F16C")
def test_gptq_checkpoint_with_fp16_tensors_keeps_its_table_as_stored(sources, tmp_path):
    """The released Int4/Int8 checkpoints keep their float tensors in fp16: on a CPU (which computes in
    fp32) the embedding table stays fp16 and memory-mapped, and the model computes what the dense one
    does."""
    from qwenlm.quant.int4 import StoredEmbedding

    src, targets = sources["qwen2"]
    half = str(tmp_path / "half")
    os.makedirs(half)
    for name in os.listdir(src):
        data = open(os.path.join(src, name), "rb").read()
        open(os.path.join(half, name), "wb").write(data)
    f = os.path.join(half, "model.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(f).items()}, f)
    path, ref_path = _gptq_checkpoint(half, str(tmp_path / "gptq"), targets, 4, 32, False, True, False)
    model = load_model(path, device="cpu")
    ref = load_model(ref_path, dtype="float32", device="cpu")
    assert isinstance(model.embed, StoredEmbedding) and model.embed.weight.dtype == torch.float16
    assert model.dtype == torch.float32 and model.quantization.startswith("gptq-4bit")
    ids = list(range(5, 40, 3))
    with torch.inference_mode():
        assert torch.equal(model.embed(torch.tensor([ids])), ref.embed(torch.tensor([ids])))
    got, want = _logits(model, ids), _logits(ref, ids)
    assert (got - want).abs().max() < 5e-2 * want.abs().max()  # (the decode path's int8 activations)


def test_gptq_and_quantize_flag_conflict(sources, tmp_path):
    src, targets = sources["v1"]
    path, _ = _gptq_checkpoint(src, str(tmp_path / "g"), targets, 4, 32, False, True, False)
    with pytest.raises(ValueError, match="already quantized"):
        load_model(path, dtype="float32", device="cpu", quantize="gguf")


@pytest.mark.skipif(not AVX2, reason="needs AVX2/FMA/F16C")
@pytest.mark.parametrize("arch", ["v1", "qwen2"])
def test_gptq_head_in_8_bit_blocks_on_a_cpu(sources, tmp_path, arch):
    """`--quantize int8` (what `auto` picks on a CPU) on a GPTQ checkpoint: its float head goes into the
    8-bit blocks `quantize_q8` makes of it; the GPTQ layers are untouched; `none` keeps the head."""
    from qwenlm.auto import auto_quantize

    src, targets = sources[arch]
    path, ref_path = _gptq_checkpoint(src, str(tmp_path / "g"), targets, 4, 32, False, True, False)
    plain = load_model(path, dtype="float32", device="cpu", quantize="none")
    model = load_model(path, device="cpu", quantize="auto")
    ref = load_model(ref_path, dtype="float32", device="cpu")
    assert auto_quantize(plain, "auto", torch.device("cpu"), object()) == "int8"
    assert isinstance(plain.lm_head, torch.nn.Linear) and plain.quantization == model.quantization.split(";")[0]
    assert model.quantization.endswith("; head in 8 bits")
    from qwenlm.commands.info import describe  # `qwen info` says so

    assert describe(path)["cpu_weights"] == "its GPTQ 4-bit layers, the head in 8-bit blocks (int8)"
    head = model.lm_head
    assert isinstance(head, q4.Q4Linear) and head.bits == 8
    codes, d, _ = q4.quantize_q8(ref.lm_head.weight)
    assert torch.equal(head.codes, codes) and torch.equal(head.d, d)
    for (name, a), (_, b) in zip(model.named_modules(), plain.named_modules()):
        if isinstance(b, q4.Q4Linear):  # the GPTQ layers
            assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("codes", "d", "m")), name
    ids = list(range(5, 40, 3))
    got, want = _logits(model, ids), _logits(ref, ids)
    assert (got - want).abs().max() < 5e-2 * want.abs().max()


def test_missing_qweight_is_a_clear_error(sources, tmp_path):
    src, targets = sources["v1"]
    path, _ = _gptq_checkpoint(src, str(tmp_path / "g"), targets, 4, 32, False, True, False)
    sd = load_file(os.path.join(path, "model.safetensors"))
    del sd["transformer.h.0.attn.c_proj.scales"]
    save_file(sd, os.path.join(path, "model.safetensors"))
    with pytest.raises(Exception, match="missing.*transformer.h.0.attn.c_proj.scales"):
        load_model(path, dtype="float32", device="cpu")


@pytest.mark.skipif(not AVX2, reason="needs AVX2/FMA/F16C")
def test_gptq_model_uses_the_fused_decode_step(sources, tmp_path):
    from qwenlm import GenerationConfig
    from qwenlm.engine import Engine
    from qwenlm.generation import generate

    src, targets = sources["v1"]
    path, _ = _gptq_checkpoint(src, str(tmp_path / "g"), targets, 4, 32, False, False, bias_everywhere=True)
    model = load_model(path, dtype="float32", device="cpu")
    assert q4.pack_blocks(model) is not None  # zero biases dropped, no permutation: the fused path applies
    cfg = GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=10, eos_token_id=None)
    assert len(Engine(model).generate([[5, 6, 7]], cfg)[0]) == 10
    assert Engine(model).generate([[5, 6, 7]], cfg) == generate(model, [[5, 6, 7]], cfg)
