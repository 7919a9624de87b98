"""The AVX2 kernel: equal (to float rounding) to the same arithmetic written in Python — int8
activation blocks, 4-bit (or signed 8-bit) weight blocks with fp16 scale/offset — and the prefill
path equal to the decode path."""

import types

import pytest
import torch
from torch import nn

from qwenlm.quant import q4

pytestmark = pytest.mark.skipif(not {"avx2", "fma", "f16c"} <= q4._cpu_flags(), reason="needs AVX2/FMA/F16C")


def test_kernel_builds_here():
    assert q4.available()  # a silent fallback would hide a broken build


def _five_bit_codes(codes: torch.Tensor) -> torch.Tensor:
    """(N, K/64, 40) 5-bit pairs -> codes (N, K/32, 32), code by code: block t of a pair has its low
    bits in nibbles (bytes 16t + j % 16, low nibble for j < 16), and its fifth bit of code j in byte
    32 + j % 8, bit j // 8 (+ 4 for the first block)."""
    n, pairs, _ = codes.shape
    out = torch.zeros(n, pairs, 2, 32, dtype=torch.long)
    c = codes.long()
    for t in range(2):
        for j in range(32):
            low = (c[..., 16 * t + j % 16] >> (4 * (j // 16))) & 0x0F
            fifth = (c[..., 32 + j % 8] >> (j // 8 + (4 if t == 0 else 0))) & 1
            out[:, :, t, j] = low | (fifth << 4)
    return out.view(n, 2 * pairs, 32)


def _reference(x: torch.Tensor, lin: q4.Q4Linear) -> torch.Tensor:
    """sum over blocks of d*s*sum(q*xq) + m*s*sum(xq), in float64, from the layer's own buffers."""
    k = x.shape[1]
    xb = x.double().view(x.shape[0], k // 32, 32)
    s = xb.abs().amax(-1) / 127
    xq = torch.where(s[..., None] > 0, torch.round(xb / s[..., None].clamp(min=1e-300)), torch.zeros_like(xb))
    if lin.codes.dtype == torch.int8:
        q = lin.codes.double()
    elif lin.codes.shape[-1] == 16:
        q = torch.cat((lin.codes & 0x0F, lin.codes >> 4), dim=-1).double()  # (N, K/32, 32)
    else:
        q = _five_bit_codes(lin.codes).double()
    dots = torch.einsum("rbj,nbj->rnb", xq, q)
    return (dots * lin.d.double()[None] * s[:, None, :]).sum(-1) + (
        lin.m.double()[None] * (s * xq.sum(-1))[:, None, :]).sum(-1)


@pytest.mark.parametrize("n,k,rows", [(96, 256, 1), (100, 896, 3), (4864, 896, 1), (33, 64, 2), (70, 128, 9), (64, 896, 64)])
@pytest.mark.parametrize("bits", [4, 5, 8])
def test_kernel_equals_python_arithmetic(n, k, rows, bits):
    torch.manual_seed(n)
    if bits == 5:  # (5-bit blocks come from GGUF files, not from quantizing here)
        d = (torch.rand(n, k // 32) * 0.02 + 1e-3).half()
        lin = q4.Q4Linear(codes=q4.pack_q5(torch.randint(0, 32, (n, k // 32, 32))), d=d, m=(-16 * d.float()).half())
    else:
        lin = q4.Q4Linear(nn.Linear(k, n, bias=False), bits=bits)
    assert lin.bits == bits
    x = torch.randn(rows, k) * 3
    got = q4._extension().q4_gemv(x, lin.codes, lin.d, lin.m).double()  # (the layer sends > 40 rows elsewhere)
    want = _reference(x, lin)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(bits):
    """The kernel takes rows two at a time: each row's output must be bit for bit what it is alone (the
    serving engine's batched decode steps give a request the same tokens alone or in a crowd)."""
    torch.manual_seed(bits)
    n, k = 70, 896  # 28 blocks: the 8-block loop and a tail
    if bits == 5:
        d = (torch.rand(n, k // 32) * 0.02 + 1e-3).half()
        lin = q4.Q4Linear(codes=q4.pack_q5(torch.randint(0, 32, (n, k // 32, 32))), d=d, m=(-16 * d.float()).half())
    else:
        lin = q4.Q4Linear(nn.Linear(k, n, bias=False), bits=bits)
    x = torch.randn(7, k) * 3
    gemv = q4._extension().q4_gemv
    alone = torch.cat([gemv(x[i:i + 1].contiguous(), lin.codes, lin.d, lin.m) for i in range(7)])
    for rows in range(2, 8):
        assert torch.equal(gemv(x[:rows].contiguous(), lin.codes, lin.d, lin.m), alone[:rows])
    assert torch.equal(gemv(x[3:].contiguous(), lin.codes, lin.d, lin.m), alone[3:])  # other partners


def test_quantization_error_bound():
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    codes, d, m, q = q4.quantize_q4(w)
    w2 = q4.dequantize_q4(codes, d, m)
    step = d.float().repeat_interleave(32, dim=1)
    assert bool(((w2 - w).abs() <= 0.5 * step + 1e-3 * step.max()).all())
    assert torch.equal(torch.cat((codes & 0x0F, codes >> 4), -1), q)


def test_8bit_extreme_codes_do_not_saturate():
    """Codes -128 and 127 against activations at +-127: the widest pair sums of the 8-bit dot."""
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-128, 128, (6, 8, 32), generator=g, dtype=torch.int8)
    codes[0], codes[1] = -128, 127
    codes[2, :, ::2], codes[2, :, 1::2] = -128, 127
    lin = q4.Q4Linear(codes=codes, d=torch.full((6, 8), 0.01).half(), m=torch.full((6, 8), 0.25).half())
    x = torch.full((3, 256), 5.0)
    x[1] = -5.0
    x[2, ::2], x[2, 1::2] = -5.0, 5.0
    got, want = lin(x).double(), _reference(x, lin)
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    assert torch.allclose(got, x.double() @ q4.dequantize_q4(codes, lin.d, lin.m).double().t(), rtol=1e-5)


def test_8bit_quantization_error_bound():
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    codes, d, m = q4.quantize_q8(w)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127 and not m.any()
    step = d.float().repeat_interleave(32, dim=1)
    assert bool(((q4.dequantize_q4(codes, d, m) - w).abs() <= 0.5 * step + 1e-3 * step.max()).all())



def test_8bit_quantizer_kernel_equals_its_torch_reference():
    """The one-pass C++ quantizer gives exactly the codes and scales of `_q8_rows` (round half to even,
    fp16 scales), also for blocks of zeros, ties at .5, tiny and huge values and more than one chunk;
    and bf16 weights are taken as their float values."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1030, 96, generator=g) * torch.logspace(-6, 3, 1030)[:, None]  # > 2 chunks of 512 rows
    w[0] = 0.0
    # amax 15.875 gives d = 1/8 exactly, so (k + 1/2) / 8 lands on a tie at k + 1/2: half to even
    w[1, :32] = torch.cat([torch.tensor([15.875]), (torch.arange(31) - 15 + 0.5) * 0.125])
    w[2, 32:64] = 1e-30
    w[3, :] = 65504.0 * torch.linspace(-1, 1, 96)
    assert q4.available()
    for weight in (w, w.bfloat16()):
        codes, d, m = q4.quantize_q8(weight)
        ref_codes, ref_d = q4._by_rows(q4._q8_rows, weight, 32)
        assert codes.dtype == torch.int8 and d.dtype == torch.float16 and not m.any()
        assert torch.equal(codes, ref_codes) and torch.equal(d, ref_d)
    assert codes[1, 0, 1:].tolist() == [round(k + 0.5) for k in range(-15, 16)]  # Python rounds half to even

@pytest.mark.parametrize("bits", [4, 5, 8])
def test_prefill_path_equals_decode_path(bits):
    torch.manual_seed(2)
    lin = q4.Q4Linear(nn.Linear(256, 64, bias=True), bits=8 if bits == 8 else 4)
    if bits == 5:  # the same layer's weights as 5-bit pairs (codes 0..31 around a shifted offset)
        d = (torch.rand(64, 8) * 0.01 + 1e-3).half()
        lin = q4.Q4Linear(codes=q4.pack_q5(torch.randint(0, 32, (64, 8, 32))), d=d, m=(-16 * d.float()).half(),
                          bias=lin.bias.detach())
    assert lin.bits == bits
    x = torch.randn(150, 256)  # > _GEMV_MAX_ROWS rows: the dequantize + matmul path
    big = lin(x)
    small = torch.cat([lin(x[i:i + 1]) for i in range(0, 150)])
    # the decode path also rounds activations to int8: about 1% of the output scale
    assert (big - small).abs().max() < 2e-2 * big.abs().max()


def test_large_layer_multiplied_in_slices(monkeypatch):
    """A layer above _TILE_ABOVE weights (the output head) is dequantized a slice of rows at a time;
    each slice's product is the whole layer's, column for column, and a ragged last slice is kept."""
    torch.manual_seed(4)
    lin = q4.Q4Linear(nn.Linear(256, 200, bias=True), bits=4)
    x = torch.randn(100, 256)  # > _GEMV_MAX_ROWS: the dequantize path
    whole = lin(x)
    reference = x @ q4.dequantize_q4(lin.codes, lin.d, lin.m).t() + lin.bias
    assert torch.allclose(whole, reference, rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(q4, "_TILE_ABOVE", 256 * 100)
    monkeypatch.setattr(q4, "_TILE", 256 * 64)  # slices of 64 rows: 64, 64, 64, 8
    calls = []
    real = q4._extension().dequantize
    monkeypatch.setattr(q4, "_extension", lambda: types.SimpleNamespace(
        dequantize=lambda c, d, m: calls.append(c.shape[0]) or real(c, d, m)))
    sliced = lin(x)
    assert calls == [64, 64, 64, 8]
    assert torch.allclose(sliced, whole, rtol=1e-5, atol=1e-5)


def test_5bit_blocks_layout():
    """pack_q5 lays out pairs of blocks as the kernel reads them (csrc/q4_gemv.cpp, pair_dot), the
    same as _five_bit_codes above reads them; unpack_codes reverses it; in_features counts 64 per pair."""
    g = torch.Generator().manual_seed(5)
    q = torch.randint(0, 32, (7, 4, 32), generator=g)
    packed = q4.pack_q5(q)
    assert packed.shape == (7, 2, 40) and packed.dtype == torch.uint8
    assert torch.equal(_five_bit_codes(packed), q)
    assert torch.equal(q4.unpack_codes(packed).long(), q)
    lin = q4.Q4Linear(codes=packed, d=torch.ones(7, 4).half(), m=torch.zeros(7, 4).half())
    assert lin.bits == 5 and lin.in_features == 128
    with pytest.raises(ValueError, match="multiple of 64"):
        q4.pack_q5(q[:, :3])
    with pytest.raises(ValueError, match="4 or 8 bits"):
        q4.Q4Linear(nn.Linear(64, 8), bits=5)


def test_q5_0_repack_kernel_equals_its_torch_reference():
    """The C++ pass that turns llama.cpp Q5_0 rows into 5-bit pairs gives pack_q5_words' bytes (and
    the rows' fp16 scales), on random blocks."""
    g = torch.Generator().manual_seed(9)
    n, nb = 5, 6
    raw = torch.randint(0, 256, (n, nb, 22), generator=g, dtype=torch.uint8)
    codes, d = q4._extension().repack_q5_0(raw.view(n, -1).contiguous(), nb)
    assert torch.equal(codes, q4.pack_q5_words(raw[..., 6:22], raw[..., 2:6]))
    assert torch.equal(d.view(torch.uint8).view(n, nb, 2), raw[..., 0:2])


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_dequantize_kernel_equals_its_torch_reference(bits):
    """The one-pass C++ dequantization (the long-prompt path) gives dequantize_q4's weights."""
    g = torch.Generator().manual_seed(bits)
    n, nb = 9, 6
    d = (torch.rand(n, nb, generator=g) * 0.05).half()
    m = (torch.randn(n, nb, generator=g) * 0.1).half()
    if bits == 8:
        codes = torch.randint(-128, 128, (n, nb, 32), generator=g, dtype=torch.int8)
    else:
        q = torch.randint(0, 1 << bits, (n, nb, 32), generator=g)
        codes = q4.pack_q5(q) if bits == 5 else q4.pack_q4(q)
    got = q4._extension().dequantize(codes, d, m)
    torch.testing.assert_close(got, q4.dequantize_q4(codes, d, m), rtol=1e-6, atol=1e-9)


@pytest.mark.skipif(not q4.available(), reason="needs the AVX2 kernel")
@pytest.mark.parametrize("kind, size, scales", [("Q6_K", 210, [208]), ("Q4_K", 144, [0, 2])])
def test_k_quant_rows_dequantize_as_the_gguf_package_does(kind, size, scales):
    """The C++ passes give gguf's own dequantization bit for bit: random blocks (any codes, scales
    and minimums; finite fp16 scales of either sign), several rows."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from qwenlm.quant.gguf_blocks import dequantize_rows

    rng = np.random.default_rng(6)
    raw = rng.integers(0, 256, (5, 3, size), dtype=np.uint8)
    for at in scales:
        raw[..., at:at + 2] = (rng.standard_normal((5, 3)) * 0.01).astype(np.float16)[..., None].view(np.uint8)
    raw = raw.reshape(5, 3 * size)
    want = dequantize(raw, GGMLQuantizationType[kind])
    got = getattr(q4._extension(), "dequantize_" + kind.lower())(torch.from_numpy(raw), 3).numpy()
    assert got.shape == want.shape == (5, 768) and got.dtype == np.float32
    assert np.array_equal(got, want)
    assert np.array_equal(dequantize_rows(raw, kind), want)  # what the GGUF paths call
    assert np.array_equal(dequantize_rows(raw[:2], kind), want[:2])


@pytest.mark.skipif(not q4.available(), reason="needs the AVX2 kernel")
@pytest.mark.parametrize("kind, blocks", [("Q5_0", 4), ("Q5_0", 3), ("Q8_0", 3)])
def test_q5_0_and_q8_0_rows_dequantize_as_the_gguf_package_does(kind, blocks, monkeypatch):
    """Through the kernel's blocks (5-bit pairs, or 8 bits for an odd block count): gguf's values."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from qwenlm.quant.gguf_blocks import dequantize_rows

    size = {"Q5_0": 22, "Q8_0": 34}[kind]
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, (6, blocks, size), dtype=np.uint8)
    raw[..., 0:2] = (rng.standard_normal((6, blocks)) * 0.01).astype(np.float16)[..., None].view(np.uint8)
    raw = raw.reshape(6, blocks * size)
    want = dequantize(raw, GGMLQuantizationType[kind])
    import gguf.quants

    monkeypatch.setattr(gguf.quants, "dequantize", None)  # (not the package's code: the kernel's)
    got = dequantize_rows(raw, kind)
    assert got.shape == want.shape == (6, 32 * blocks) and got.dtype == np.float32
    assert np.array_equal(got, want)
