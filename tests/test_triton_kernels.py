"""The Triton kernels (qwenlm/kernels): GPTQ dequantize-and-multiply and decode attention over the
float and 8-bit KV store, against plain torch arithmetic, then inside the engines and a loaded GPTQ
checkpoint. On a GPU they run compiled; elsewhere in Triton's interpreter (QWENLM_TRITON=interpret),
which checks the arithmetic, not the speed. Skipped when Triton is not installed (CI installs it:
QWENLM_REQUIRE_TRITON=1 turns the skip into a failure)."""

import copy
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import drain_batch_engine, random_prompts, tiny_model

from qwenlm import GenerationConfig, load_model
from qwenlm.engine import Engine
from qwenlm.engine.batch import BatchEngine
from qwenlm.engine.cache import KVStore
from qwenlm.generation import generate
from qwenlm.quant import gptq, q4

HAVE_TRITON = importlib.util.find_spec("triton") is not None
if not HAVE_TRITON and os.environ.get("QWENLM_REQUIRE_TRITON") == "1":
    raise RuntimeError("QWENLM_REQUIRE_TRITON=1 but triton is not installed")
pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="needs triton (pip install triton)")
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
GREEDY = GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=12, eos_token_id=None,
                          pad_token_id=0)


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    """Kernels on for this test: compiled on a GPU, interpreted elsewhere."""
    from qwenlm import kernels

    if not CUDA:
        monkeypatch.setenv("QWENLM_TRITON", "interpret")
    kernels.triton_available.cache_clear()
    assert kernels.usable_on(torch.device(DEV))
    yield
    kernels.triton_available.cache_clear()
    kernels._checked.clear()


def _gptq_tensors(k, n, bits, group, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (k, n), generator=g)
    scales = (torch.rand(k // group, n, generator=g) * 0.02 + 1e-3).half()
    zeros = torch.randint(1, 2**bits, (k // group, n), generator=g).half()
    w = (q.float() - zeros.float().repeat_interleave(group, 0)) * scales.float().repeat_interleave(group, 0)
    return gptq.pack_rows(q, bits), scales, zeros, w  # w: (K, N), computed here without the kernel


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m,k,n,group", [(1, 512, 96, 128), (3, 256, 64, 64), (20, 256, 80, 128), (70, 128, 64, 32),
                                         (1, 2752, 64, 32)])  # K split 10 ways, the last split past K
@pytest.mark.parametrize("split", ["reduce", "atomic", "fixup"])
@pytest.mark.parametrize("magic", [True, False])
def test_gptq_matmul_equals_dequantized_matmul(bits, m, k, n, group, split, magic):
    """Every path; the one-row kernel (up to 4 rows) with codes made floats through 2**23's bits or converted."""
    from qwenlm.kernels.gptq import _GEMV_ROWS, gptq_matmul

    if not magic and m > _GEMV_ROWS:
        pytest.skip("the conversion choice is the one-row kernel's")

    qweight, scales, zeros, w = _gptq_tensors(k, n, bits, group, seed=m + bits)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n))
    # the interpreter multiplies bf16 tiles as raw integers, so bf16 through tl.dot is checked on GPU only
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA or m <= 4 else [])
    for dt in dtypes:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dt)
        args = (x.to(DEV), qweight.to(DEV), scales.to(DEV), zeros.to(DEV), bits, group)
        y = gptq_matmul(*args, config={"split": split, "magic": magic}).cpu()
        assert y.dtype == dt and y.shape == (m, n)
        want = x.float() @ w
        tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dt]
        assert (y.float() - want).abs().max() <= tol * want.abs().max(), dt
        yb = gptq_matmul(*args, config={"split": split, "magic": magic}, bias=bias.to(DEV, dt)).cpu()
        want = want + bias.to(dt).float()
        assert (yb.float() - want).abs().max() <= tol * want.abs().max(), (dt, "bias")


def test_gptq_fixup_split_is_one_launch_and_leaves_its_workspace_clean(monkeypatch):
    """"fixup": the K splits add into a kept workspace and the last one of each column block finishes,
    so one kernel and nothing else runs, the workspace and counters are zero again afterwards, and
    calls one after another (different inputs, a bias, then none) each get their own product."""
    from qwenlm.kernels import gptq as gptq_kernels
    from qwenlm.kernels.gptq import _GEMV_ROWS, _WORKSPACES, gptq_matmul

    k, n, bits, group = 1024, 200, 4, 32
    qweight, scales, zeros, w = _gptq_tensors(k, n, bits, group, seed=3)
    q = (qweight.to(DEV), scales.to(DEV), zeros.to(DEV), bits, group)
    launched = []
    for name in ("_gptq_gemv", "_gptq_reduce"):
        real = getattr(gptq_kernels, name)
        monkeypatch.setattr(gptq_kernels, name, type("Spy", (), {
            "__getitem__": lambda self, grid, real=real, name=name: (launched.append((name, grid)), real[grid])[1]})())
    config = {"split": "fixup", "block_n": 64, "block_k": 32, "min_k_blocks": 2}
    bias = torch.randn(n, generator=torch.Generator().manual_seed(0))
    for m, b in ((1, None), (3, bias), (1, bias), (_GEMV_ROWS, None)):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEV)
        launched.clear()
        y = gptq_matmul(x, *q, config=config, bias=None if b is None else b.to(DEV)).cpu()
        assert [name for name, _ in launched] == ["_gptq_gemv"] and launched[0][1][1] > 1  # split, one launch
        want = x.cpu() @ w + (0 if b is None else b)
        assert (y - want).abs().max() <= 1e-5 * want.abs().max()
    for ws, cnt in _WORKSPACES.values():
        assert not ws.any() and not cnt.any()


@pytest.mark.parametrize("bits,group", [(4, 128), (8, 32)])
def test_gptq_matmul_of_many_rows_dequantizes_once_in_column_slices(bits, group, monkeypatch):
    """From 256 rows the weight is written out (exactly: codes, zeros and scales are small) and the BLAS
    multiplies; in slices of columns (here 128 wide, the last one short), the bias added once."""
    from qwenlm.kernels import gptq as gptq_kernels
    from qwenlm.kernels.gptq import dequantize, gptq_matmul

    k, n = 256, 200
    qweight, scales, zeros, w = _gptq_tensors(k, n, bits, group, seed=bits)
    q = (qweight.to(DEV), scales.to(DEV), zeros.to(DEV))
    assert torch.equal(dequantize(*q, bits, group, torch.float32).cpu(), w)
    assert torch.equal(dequantize(*q, bits, group, torch.float32, slice(128, 200)).cpu(), w[:, 128:])
    monkeypatch.setattr(gptq_kernels, "_DENSE_SLICE", k * 128)
    calls = []
    real = gptq_kernels._gptq_dequant
    monkeypatch.setattr(gptq_kernels, "_gptq_dequant", type("Spy", (), {
        "__getitem__": lambda self, grid: (calls.append(grid), real[grid])[1]})())
    bias = torch.randn(n, generator=torch.Generator().manual_seed(1))
    for m, dt, tol in ((300, torch.float32, 1e-5), (256, torch.float16, 4e-3)):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dt)
        calls.clear()
        y = gptq_matmul(x.to(DEV), *q, bits, group, bias=bias.to(DEV, dt)).cpu()
        assert len(calls) == 2 and y.dtype == dt and y.shape == (m, n)
        want = x.float() @ w + bias.to(dt).float()
        assert (y.float() - want).abs().max() <= tol * want.abs().max(), dt
    calls.clear()
    gptq_matmul(x[:255].to(DEV), *q, bits, group)  # fewer rows: the tiles, no weight written out
    assert calls == []


def test_gptq_layer_with_act_order_equals_its_weight():
    """A layer as a checkpoint stores it (act-order group indices, packed zeros - 1, a bias)."""
    from qwenlm.kernels.gptq import GPTQTritonLinear

    k, n, group, bits = 256, 64, 64, 4
    g = torch.Generator().manual_seed(0)
    layer = gptq.GPTQLinear(k, n, bits, group, bias=True)
    q = torch.randint(0, 16, (k, n), generator=g)
    zeros = torch.randint(0, 16, (k // group, n), generator=g)
    order = torch.randperm(k, generator=g)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = torch.arange(k, dtype=torch.int32) // group
    layer.qweight.copy_(gptq.pack_rows(q, bits))
    layer.qzeros.copy_(gptq.pack_cols(zeros - 1, bits))
    layer.scales.copy_((torch.rand(k // group, n, generator=g) * 0.05 + 1e-3).half())
    layer.g_idx.copy_(g_idx)
    layer.bias.data.copy_(torch.randn(n, generator=g))
    fast = GPTQTritonLinear.from_gptq(layer)
    assert fast.perm is not None and fast.group == group
    assert torch.equal(fast.weight(), layer.weight())  # same values, original input order
    assert fast.nbytes < k * n  # packed: half a byte per weight plus the group tensors
    x = torch.randn(2, 3, k, generator=g)
    got = fast.to(DEV)(x.to(DEV)).cpu()
    want = layer(x)
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize("b,h,hk,s,d,length", [(2, 4, 4, 300, 64, 300), (3, 14, 2, 100, 64, 90),
                                               (1, 2, 1, 1000, 128, 1000)])
def test_decode_attention_equals_sdpa(int8, b, h, hk, s, d, length):
    from qwenlm.kernels.attention import decode_attention

    g = torch.Generator().manual_seed(b * h)
    kv = KVStore(1, b + 1, hk, s, d, torch.float32, DEV, int8=int8)
    k = torch.randn(b + 1, hk, s, d, generator=g) + 3 * torch.randn(1, hk, 1, d, generator=g)  # an offset
    v = torch.randn(b + 1, hk, s, d, generator=g)
    kv.store(0, k.to(DEV), v.to(DEV), lambda dst, x: dst.copy_(x), first=True)
    start = torch.randint(0, 10, (b,), generator=g, dtype=torch.int32)
    end = torch.randint(length // 2, length + 1, (b,), generator=g, dtype=torch.int32)
    q = torch.randn(b, h, d, generator=g)
    layer = tuple(t[0, :b] for t in kv.tensors[:6]) if int8 else (kv.k[0, :b], kv.v[0, :b]) + (kv.k_scale[0],) * 4
    out = decode_attention(q.to(DEV), layer, start.to(DEV), end.to(DEV), length).cpu()
    # reference: what the cache gives back (centered keys plus their center), SDPA over [start, end)
    kk, vv = (t.cpu().float() for t in kv.load(0, lambda t: t[:b]))
    if int8:
        kk = kk + kv.k_center[0, :b, :, None].cpu()
    slots = torch.arange(s)
    mask = (slots[None] >= start[:, None]) & (slots[None] < end[:, None])
    want = F.scaled_dot_product_attention(q[:, :, None], kk, vv, attn_mask=mask[:, None, None],
                                          enable_gqa=h != hk)[:, :, 0]
    assert (out - want).abs().max() < 1e-4


@pytest.mark.parametrize("h,hk,logn", [(4, 4, True), (6, 2, False)])
def test_rotary_store_equals_rotary_then_the_cache_write(h, hk, logn):
    """kernels/rotary.py: q/k/v as views of one projection's output (as the models make them), rows
    at their own slots: the query rotated and LogN-scaled, the key rotated and the value copied into
    the cache, exactly where and as the unfused ops put them; nothing else in the cache changes."""
    from qwenlm.kernels.rotary import rotary_store
    from qwenlm.models.layers import _rotary_qk, rotary_cos_sin

    g = torch.Generator().manual_seed(h)
    b, d, s = 3, 64, 40
    for dt in (torch.float32, torch.bfloat16):
        qkv = torch.randn(b, 1, (h + 2 * hk) * d, generator=g).to(dt)
        q = qkv[..., :h * d].view(b, 1, h, d).transpose(1, 2)
        k = qkv[..., h * d:(h + hk) * d].view(b, 1, hk, d).transpose(1, 2)
        v = qkv[..., (h + hk) * d:].view(b, 1, hk, d).transpose(1, 2)
        slots = torch.tensor([5, 0, 39])
        cos, sin = rotary_cos_sin(slots[:, None], d, 10000.0)
        scale = torch.rand(b, 1, generator=g) + 1 if logn else None
        kc, vc = (torch.randn(b + 1, hk, s, d, generator=g).to(dt) for _ in range(2))
        want_q, want_k = _rotary_qk(q, k, cos, sin, scale)
        want_kc, want_vc = kc.clone(), vc.clone()
        want_kc[torch.arange(b), :, slots] = want_k[:, :, 0]
        want_vc[torch.arange(b), :, slots] = v[:, :, 0]
        got_kc, got_vc = kc.to(DEV), vc.to(DEV)
        out = rotary_store(q.to(DEV), k.to(DEV), v.to(DEV), cos.to(DEV), sin.to(DEV),
                           None if scale is None else scale.to(DEV), got_kc, got_vc, slots.to(DEV))
        tol = 1e-6 if dt == torch.float32 else 1e-2
        torch.testing.assert_close(out.cpu(), want_q[:, :, 0], rtol=tol, atol=tol)
        torch.testing.assert_close(got_kc.cpu(), want_kc, rtol=tol, atol=tol)
        assert torch.equal(got_vc.cpu(), want_vc)


@pytest.mark.parametrize("h,hk,logn", [(4, 4, True), (6, 2, False)])
def test_rotary_store_into_an_8bit_cache_equals_the_unfused_quantization(h, hk, logn):
    """kernels/rotary.py with an 8-bit cache: the key rotated, less its row's center, and the value
    quantized exactly as KVStore.store does it (quant/kv.py: the same codes, scales and minimums), at
    each row's slot; a constant vector (scale 0) and ties of the rounding included; nothing else changes.
    bf16 exactly only compiled: Triton's interpreter casts fp32 to bf16 by truncation, not rounding."""
    from qwenlm.engine.cache import KVStore
    from qwenlm.kernels.rotary import rotary_store
    from qwenlm.models.layers import _rotary_qk, rotary_cos_sin

    g = torch.Generator().manual_seed(h + 10)
    b, d, s = 3, 64, 40
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        qkv = torch.randn(b, 1, (h + 2 * hk) * d, generator=g).to(dt)
        q = qkv[..., :h * d].view(b, 1, h, d).transpose(1, 2)
        k = qkv[..., h * d:(h + hk) * d].view(b, 1, hk, d).transpose(1, 2)
        v = qkv[..., (h + hk) * d:].view(b, 1, hk, d).transpose(1, 2)
        v[1, 0] = 0.75  # a constant vector: scale 0, every code 0
        v[2, -1, 0, :4] = torch.tensor([0.0, 2.55, 1.275, 0.635])  # (x - low) / scale at halves: ties
        slots = torch.tensor([5, 0, 39])
        cos, sin = rotary_cos_sin(slots[:, None], d, 10000.0)
        scale = torch.rand(b, 1, generator=g) + 1 if logn else None
        want_q, want_k = _rotary_qk(q, k, cos, sin, scale)
        got, want = (KVStore(2, b + 1, hk, s, d, dt, "cpu", int8=True) for _ in range(2))
        for t in range(len(got.tensors)):  # whatever the caches held before; key centers of a real size
            x = got.tensors[t]
            fill = torch.randint(0, 256, x.shape, generator=g) if x.dtype == torch.uint8 else \
                torch.randn(x.shape, generator=g) * 0.5
            got.tensors[t].copy_(fill)
            want.tensors[t].copy_(fill)
        if dt == torch.float32:  # a minimum that fp16 rounds up past half a step (codes below 0 clamped),
            v[0, 0, 0] = 100.04 + torch.linspace(0, 0.5, d)  # and one it rounds down (above 255)
            v[0, -1, 0] = 100.02 + torch.linspace(0, 0.5, d)
        rows = torch.arange(b)

        def put(dst, x):
            dst[rows, :, slots] = x[:, :, 0]

        want.store(1, want_k, v, put, rows=slice(0, b))
        dev_kv = KVStore(2, b + 1, hk, s, d, dt, DEV, int8=True)
        for t, src in zip(dev_kv.tensors, got.tensors):
            t.copy_(src)
        layer = dev_kv.kernel_layer(1, b)
        out = rotary_store(q.to(DEV), k.to(DEV), v.to(DEV), cos.to(DEV), sin.to(DEV),
                           None if scale is None else scale.to(DEV), layer[0], layer[1], slots.to(DEV),
                           int8=layer[2:7])
        tol = 1e-6 if dt == torch.float32 else 1e-2
        torch.testing.assert_close(out.cpu(), want_q[:, :, 0], rtol=tol, atol=tol)
        if dt == torch.bfloat16 and DEV == "cpu":  # the interpreter's bf16 key: within one code's step
            written = lambda t: t[1, rows, :, slots]  # noqa: E731  (row, head[, D]) at each row's slot
            for i, step in ((0, written(want.k_scale)), (1, written(want.v_scale))):
                a, w = (kv.load(1, lambda t: t.cpu())[i][rows, :, slots].float() for kv in (dev_kv, want))
                assert ((a - w).abs() <= 1.01 * step.float()[..., None] + 2e-2 * w.abs()).all()
            assert torch.equal(dev_kv.v.cpu(), want.v)
            for a, w in zip(dev_kv.tensors[:-1], want.tensors[:-1]):  # nothing else written
                a = a.cpu().clone()
                a[1, rows, :, slots] = w[1, rows, :, slots]
                assert torch.equal(a, w)
            continue
        for name, a, w in zip(("k", "v", "k_scale", "k_low", "v_scale", "v_low", "k_center"),
                              dev_kv.tensors, want.tensors):
            assert torch.equal(a.cpu(), w), (dt, name)
        assert (want.v_scale[1, 1, 0, 0] == 0).item() and not want.v[1, 1, 0, 0].any()


def test_decode_attention_with_one_range_is_one_launch(monkeypatch):
    """Many rows or few slots (one range per row and head): the first kernel writes the output and the
    merge is not launched; more ranges: the merge adds them (both equal SDPA: the test above)."""
    from qwenlm.kernels import attention

    merges = []
    real = attention._decode_merge
    monkeypatch.setattr(attention, "_decode_merge", type("Spy", (), {
        "__getitem__": lambda self, grid: (merges.append(grid), real[grid])[1]})())
    kv = KVStore(1, 2, 2, 512, 64, torch.float32, DEV)
    kv.store(0, torch.randn(2, 2, 512, 64).to(DEV), torch.randn(2, 2, 512, 64).to(DEV),
             lambda dst, x: dst.copy_(x), first=True)
    q = torch.randn(2, 4, 64).to(DEV)
    start, end = torch.zeros(2, dtype=torch.int32).to(DEV), torch.full((2,), 512, dtype=torch.int32).to(DEV)
    layer = (kv.k[0], kv.v[0]) + (kv.k_scale[0],) * 4
    for config, want_merges in (({"programs": 8}, 0), ({"programs": 64, "min_blocks": 1}, 1)):
        merges.clear()
        out = attention.decode_attention(q, layer, start, end, 512, config=config)
        assert len(merges) == want_merges, config
        ref = F.scaled_dot_product_attention(q[:, :, None], kv.k[0].repeat_interleave(2, 1),
                                             kv.v[0].repeat_interleave(2, 1))[:, :, 0]
        assert (out - ref).abs().max() < 1e-4


@pytest.fixture(scope="module", params=["v1", "qwen2"])
def model(request, tmp_path_factory):
    m = tiny_model(request.param, str(tmp_path_factory.mktemp(request.param)))
    m.to(DEV)
    yield m
    m.kv_cache = "float"


@pytest.mark.parametrize("kv_cache", ["float", "int8"])
def test_engines_with_kernel_attention_equal_the_reference(model, kv_cache, monkeypatch):
    """Both engines' decode steps through the attention kernel, the rotary embedding and the cache write
    (8-bit: the quantization too) in the fused kernel (kernels/rotary.py)."""
    from qwenlm.kernels import rotary

    fused = []
    real = rotary._rotary_store
    monkeypatch.setattr(rotary, "_rotary_store", type("Spy", (), {
        "__getitem__": lambda self, grid: (fused.append(grid), real[grid])[1]})())
    prompts = random_prompts(3, 12, 30)  # a padded batch; v1: NTK and LogN past 16 tokens
    model.kv_cache = kv_cache
    try:
        from qwenlm.engine.cache import kernel_attention_on

        assert kernel_attention_on(model.device, model.dtype, kv_cache == "int8", model.config.head_dim)
        eng = Engine(model, cuda_graphs=False, bucket=8)
        got = eng.generate(prompts, GREEDY)
        batch_engine = BatchEngine(model, max_num_seqs=2, max_model_len=64)  # rows move as sequences leave
        assert batch_engine._kernel_attention
        batch = drain_batch_engine(batch_engine, prompts, GREEDY)
        want = generate(model, prompts, GREEDY)  # the reference loop, SDPA, same cache format
    finally:
        model.kv_cache = "float"
    assert got == want and batch == want
    assert fused


@pytest.mark.parametrize("pipeline", [False, True], ids=["plain", "ahead"])
def test_padding_rows_of_a_fixed_shape_step_read_one_slot(model, pipeline, monkeypatch):
    """Rows padded to a power of two (and, run ahead, rows that the step in flight ends) attend to one
    slot through the kernel instead of every slot of the step's bucket; the real rows get the
    reference's tokens."""
    from qwenlm.kernels import attention

    ends = []
    real = attention.decode_attention
    monkeypatch.setattr(attention, "decode_attention",
                        lambda q, layer, start, end, length, **kw: (ends.append((end.tolist(), length)),
                                                                    real(q, layer, start, end, length, **kw))[1])
    prompts = random_prompts(3, 12, 9)
    cfgs = [GREEDY.update(max_new_tokens=n) for n in (12, 5, 8)]
    # (no CUDA graphs: the spy reads each step's ranges, which a captured step would not let it do)
    eng = BatchEngine(model, max_num_seqs=4, max_model_len=48, fixed_shapes=True, cuda_graphs=False, bucket=16,
                      pipeline=pipeline)
    assert eng._kernel_attention and eng.static_shapes
    outs: dict[int, list[int]] = {}
    from qwenlm.engine.batch import Sequence
    from qwenlm.generation import StopChecker

    seqs = [Sequence(p, c, StopChecker(c), lambda t, r, i=i: outs.setdefault(i, []).append(t))
            for i, (p, c) in enumerate(zip(prompts, cfgs))]
    with torch.inference_mode():
        eng.step(seqs)
        while not eng.idle:
            eng.step()
    assert [outs[i] for i in range(3)] == [generate(model, [p], c)[0] for p, c in zip(prompts, cfgs)]
    steps = ends[::len(model.blocks)]  # (every layer of a step reads the same ranges)
    assert steps and all(len(e) in (1, 2, 4) for e, _ in steps)
    padded = [x for e, length in steps for x in e if x == 1]
    assert padded and all(1 < x <= length for e, length in steps for x in e if x != 1)
    if pipeline:  # a row that the step in flight ends by its budget is a padding row of the next
        assert eng.stats["steps_ahead"] and any(e[:2].count(1) for e, _ in steps if len(e) == 4)


@pytest.mark.parametrize("n,k", [(96, 1024), (37, 200), (5, 64), (300, 1536)])
@pytest.mark.parametrize("config", [{}, {"max_block_n": 32, "block_k": 256, "min_block_n": 8}])
def test_gemv_equals_the_plain_product(n, k, config):
    """One row times a float weight (kernels/gemv.py): K tiled evenly or not, a ragged last block of
    rows, with and without a bias, each float dtype; its output has x's dtype."""
    from qwenlm.kernels.gemv import gemv

    g = torch.Generator().manual_seed(n + k)
    w, x, b = torch.randn(n, k, generator=g), torch.randn(1, k, generator=g), torch.randn(n, generator=g)
    for dt, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        want = x.to(dt).float() @ w.to(dt).float().t()
        y = gemv(x.to(DEV, dt), w.to(DEV, dt), config=config).cpu()
        assert y.dtype == dt and y.shape == (1, n)
        assert (y.float() - want).abs().max() <= tol * want.abs().max(), dt
        yb = gemv(x.to(DEV, dt), w.to(DEV, dt), b.to(DEV, dt), config=config).cpu().float()
        assert (yb - want - b.to(dt).float()).abs().max() <= tol * want.abs().max(), (dt, "bias")
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.zeros(2, k, device=DEV), w.to(DEV))


def test_engines_with_the_gemv_kernel_equal_the_reference(model, monkeypatch):
    """QWENLM_GEMV=1: the engines send one-row products of the float layers and the head through the
    kernel (the layers' class changes, nothing else), and generate the reference's tokens."""
    from qwenlm.kernels import gemv as gemv_module
    from qwenlm.models.layers import GemvLinear

    prompts = random_prompts(3, 12, 30)
    want = generate(model, prompts, GREEDY)
    single = generate(model, prompts[:1], GREEDY)
    m = copy.deepcopy(model)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    calls = []
    real = gemv_module._gemv
    monkeypatch.setattr(gemv_module, "_gemv", type("Spy", (), {
        "__getitem__": lambda self, grid: (calls.append(grid), real[grid])[1]})())
    monkeypatch.setenv("QWENLM_GEMV", "1")
    monkeypatch.setenv("QWENLM_FUSE", "1")  # gate/up as one matrix (as on a GPU): through the kernel too
    if not CUDA:  # few programs: the interpreter runs each one in Python
        monkeypatch.setitem(gemv_module.GEMV, "max_block_n", 64)
        monkeypatch.setitem(gemv_module.GEMV, "programs", 1)
    eng = Engine(m, cuda_graphs=False, bucket=8)
    assert type(m.lm_head) is GemvLinear and m.state_dict().keys() == state.keys()
    fused = m.blocks[0].mlp.__dict__["_fused"]
    assert fused.gemv
    n = len(calls)
    with torch.inference_mode():
        fused(torch.randn(1, 1, fused.weight.shape[1], device=DEV))
    assert len(calls) == n + 1  # the fused gate/up matrix: one launch
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    assert eng.generate(prompts[:1], GREEDY) == single  # one row: decoding through the kernel
    per_step = len(calls)
    assert per_step > 0
    assert eng.generate(prompts, GREEDY) == want  # three rows: cuBLAS (F.linear)
    assert len(calls) == per_step
    assert drain_batch_engine(BatchEngine(m, max_num_seqs=2, max_model_len=64), prompts, GREEDY) == want
    # gradients: the plain product, so training through the layer works
    layer, n = m.lm_head, len(calls)
    layer.weight.requires_grad_(True)
    x = torch.randn(1, layer.in_features, device=DEV, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None and len(calls) == n
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.weight.t())  # no gradients wanted: the kernel
    assert len(calls) == n + 1
    # and back (benchmarks/decode_ab.py times both on one model): plain layers, nothing through the kernel
    layer.weight.requires_grad_(False)
    assert m.use_gemv(False) == 0 and not fused.gemv and type(m.lm_head) is torch.nn.Linear
    monkeypatch.delenv("QWENLM_GEMV")
    n = len(calls)
    assert Engine(m, cuda_graphs=False, bucket=8).generate(prompts[:1], GREEDY) == single
    assert len(calls) == n


def test_gptq_layers_sharing_an_input_are_fused_into_one_launch(model, monkeypatch):
    """GPTQ kernel layers that read one input (v1: gate/up; Qwen2: q/k/v and gate/up) are fused as the
    float ones are (kernels/gptq.py FusedGPTQ): column slices of one packed matrix, the layers' buffers
    views into it (no new memory), one launch per group; the engine's tokens equal the unfused
    model's, and moving a layer's buffers ends the fusion."""
    from qwenlm.kernels import gptq as gptq_kernels
    from qwenlm.kernels.gptq import FusedGPTQ, GPTQTritonLinear

    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, lin in list(m.block_linears()):
            m.replace_module(name, GPTQTritonLinear.from_linear(lin, 4, group=32))
    prompts, short = random_prompts(3, 12), GenerationConfig(do_sample=False, repetition_penalty=1.0,
                                                             max_new_tokens=5, eos_token_id=None, pad_token_id=0)
    monkeypatch.setenv("QWENLM_FUSE", "0")
    want = Engine(copy.deepcopy(m), cuda_graphs=False, bucket=8).generate(prompts, short)
    buffers = sum(b.numel() * b.element_size() for b in m.buffers())
    monkeypatch.setenv("QWENLM_FUSE", "1")
    eng = Engine(m, cuda_graphs=False, bucket=8)
    mlp = m.blocks[0].mlp
    fused = mlp.__dict__["_fused"]
    assert type(fused) is FusedGPTQ and fused.intact()
    assert sum(b.numel() * b.element_size() for b in m.buffers()) == buffers  # views, not copies
    calls = []
    real = gptq_kernels._gptq_gemv
    monkeypatch.setattr(gptq_kernels, "_gptq_gemv", type("Spy", (), {
        "__getitem__": lambda self, grid: (calls.append(grid), real[grid])[1]})())
    x = torch.randn(1, 1, fused.layers[0].in_features, device=DEV)
    with torch.inference_mode():
        together = fused(x)
        apart = [layer(x) for layer in fused.layers]
    assert len(calls) == 1 + len(fused.layers)  # one launch for the group, then one per layer
    for a, b in zip(together, apart):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert eng.generate(prompts, short) == want
    layer = fused.layers[0]
    layer.qweight = layer.qweight.clone()  # no longer a view at its place: the layers run one by one
    assert not fused.intact()
    calls.clear()
    with torch.inference_mode():
        fused(x)
    assert len(calls) == len(fused.layers)


@pytest.fixture(scope="module")
def gptq_pair(tmp_path_factory):
    from helpers import v1_config, v1_state_dict, write_checkpoint
    from test_gptq import V1_TARGETS, _gptq_checkpoint

    d = tmp_path_factory.mktemp("gptq_triton")
    cfg = v1_config(hidden=64, heads=4, layers=2, mlp=64)
    src = write_checkpoint(str(d / "src"), cfg, v1_state_dict(cfg, seed=5))
    return {bits: _gptq_checkpoint(src, str(d / f"g{bits}"), V1_TARGETS, bits, 32, True, False, True)
            for bits in (4, 8)}


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_checkpoint_runs_on_the_kernel(gptq_pair, monkeypatch, bits):
    from qwenlm.kernels.gptq import GPTQTritonLinear

    monkeypatch.setattr(q4, "available", lambda: False)  # on CPU, 4 bits would take the AVX2 kernel
    path, ref_path = gptq_pair[bits]
    model = load_model(path, dtype="float32", device=DEV)
    ref = load_model(ref_path, dtype="float32", device=DEV)
    assert model.quantization == f"gptq-{bits}bit-g32 on the Triton kernel"
    assert sum(isinstance(m, GPTQTritonLinear) for m in model.modules()) == 10
    ids = torch.tensor([list(range(5, 40, 3))], device=DEV)
    with torch.inference_mode():
        got, want = model(ids).logits.float(), ref(ids).logits.float()
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    prompts = random_prompts(4, 9)
    assert Engine(model, cuda_graphs=False).generate(prompts, GREEDY) == generate(ref, prompts, GREEDY)


@pytest.mark.parametrize("bits", [4, 8])
def test_round_to_nearest_layer_is_within_half_a_step(bits):
    from qwenlm.kernels.gptq import GPTQTritonLinear

    lin = torch.nn.Linear(256, 48, bias=False)
    torch.nn.init.normal_(lin.weight, 0, 0.02, generator=torch.Generator().manual_seed(bits))
    fast = GPTQTritonLinear.from_linear(lin, bits, group=64)
    w = fast.weight()
    step = fast.scales.float().repeat_interleave(64, 0).t()  # (N, K)
    assert ((w - lin.weight).abs() <= step / 2 * 1.001).all()
    assert (w - lin.weight).abs().max() > 0  # really quantized
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0))
    got = fast.to(DEV)(x.to(DEV)).cpu()
    assert (got - x @ w.t()).abs().max() <= 1e-5 * got.abs().max()


def test_bench_random_gptq_model_generates_like_the_reference(tmp_path):
    """`qwen bench --shape … --quantize gptq4 --quantize-head` on a tiny model: every decoder linear and
    the head on the kernel, fewer bytes streamed per token, the engine still equal to the reference loop."""
    from helpers import v1_config, v1_state_dict, write_checkpoint

    from qwenlm.commands.bench import _random_gptq
    from qwenlm.eval.bench import streamed_weight_bytes
    from qwenlm.kernels.gptq import GPTQTritonLinear

    cfg = v1_config(hidden=128, mlp=256, heads=4, seq_length=16)  # dimensions that groups of 128 divide
    model = load_model(write_checkpoint(str(tmp_path), cfg, v1_state_dict(cfg, seed=3)), dtype="float32", device=DEV)
    before = streamed_weight_bytes(model)
    notes = []
    _random_gptq(model, 4, True, notes)
    assert isinstance(model.lm_head, GPTQTritonLinear) and model.lm_head.bits == 8
    assert sum(isinstance(m, GPTQTritonLinear) for m in model.modules()) == 2 * 5 + 1
    assert streamed_weight_bytes(model) < before / 3 and "LM head in 8 bits" in notes[0]
    prompts = random_prompts(5, 11)
    assert Engine(model, cuda_graphs=False).generate(prompts, GREEDY) == generate(model, prompts, GREEDY)


def test_a_kernel_that_fails_its_check_is_not_used(monkeypatch, caplog, tmp_path):
    """A Triton or driver the kernel does not suit: one warning, and the torch path still answers."""
    from qwenlm import kernels
    from qwenlm.kernels import attention

    def broken(*a, **k):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(attention, "self_check", broken)
    kernels._checked.clear()
    with caplog.at_level("WARNING", logger="qwenlm"):
        assert not kernels.kernel_works("attention", DEV, torch.float32, int8=False, head_dim=16)
    assert "PassManager::run failed" in caplog.text and "using the torch path" in caplog.text
    model = tiny_model("qwen2", str(tmp_path)).to(DEV)
    eng = BatchEngine(model, max_num_seqs=2, max_model_len=64)
    assert not eng._kernel_attention
    prompts = random_prompts(4, 9)
    assert Engine(model, cuda_graphs=False).generate(prompts, GREEDY) == generate(model, prompts, GREEDY)
    monkeypatch.setattr(attention, "self_check", lambda *a, **k: "max error 0.5 against plain attention")
    kernels._checked.clear()
    assert not kernels.kernel_works("attention", DEV, torch.float32, int8=True, head_dim=16)
    assert kernels.kernel_works("gptq", DEV, torch.float32, bits=4, group=32)  # the other kernel is unaffected


def test_a_fused_rotary_kernel_that_fails_its_check_is_not_used(monkeypatch, caplog, tmp_path):
    """The rotary-and-cache-write kernel is checked on the device like the others: its check catches a
    wrong cache write, and where it fails, decode steps keep the attention kernel with the unfused
    rotary and cache writes, and the same tokens."""
    from qwenlm import kernels
    from qwenlm.kernels import rotary

    real = rotary.rotary_store
    for dt in (torch.float32, torch.bfloat16):
        assert rotary.self_check(torch.device(DEV), dt, 64) is None

    def off_by_one_slot(q, k, v, cos, sin, logn, kc, vc, slots, int8=None):
        return real(q, k, v, cos, sin, logn, kc, vc, (slots + 1) % kc.shape[2], int8)  # (in bounds: raw pointers)

    monkeypatch.setattr(rotary, "rotary_store", off_by_one_slot)
    for int8 in (False, True):
        assert "key cache" in rotary.self_check(torch.device(DEV), torch.float32, 64, int8=int8)
    kernels._checked.clear()
    try:
        with caplog.at_level("WARNING", logger="qwenlm"):
            assert not kernels.kernel_works("rotary", DEV, torch.float32, head_dim=16)
        assert "Triton rotary kernel off" in caplog.text
        model = tiny_model("v1", str(tmp_path)).to(DEV)
        eng = BatchEngine(model, max_num_seqs=2, max_model_len=64)
        assert eng._kernel_attention
        prompts = random_prompts(3, 9)
        calls = []
        monkeypatch.setattr(rotary, "rotary_store", lambda *a, **kw: calls.append(1) or off_by_one_slot(*a, **kw))
        want = generate(model, prompts, GREEDY)
        assert drain_batch_engine(eng, prompts, GREEDY) == want and not calls
        assert Engine(model, cuda_graphs=False, bucket=8).generate(prompts, GREEDY) == want and not calls
    finally:
        kernels._checked.clear()


def test_kernel_sweep_script_runs_its_settings(tmp_path):
    """benchmarks/kernel_sweep.py (run on the GPU machine, whose time is scarce) in its dry run: every
    launch setting it would time is checked against plain torch arithmetic in the interpreter."""
    if torch.cuda.is_available():  # there the sweep itself runs compiled (gpu_session.sh sweep); and the
        # interpreter of the GPU image's older Triton (3.6) fails on numpy 2.5 scalars in the 1-row kernel
        pytest.skip("the dry run is for machines without a GPU")
    import json
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "kernel_sweep.py")
    out = subprocess.run([sys.executable, script, "--dry-run", "--quick", "--json", str(tmp_path / "s.json")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = json.loads((tmp_path / "s.json").read_text())
    assert {r["kernel"] for r in rows} == {"gptq_gemv", "decode_attention", "gemv"}
    assert all("us" in r and "error" not in r for r in rows)
    assert sum(r["default"] for r in rows) == 7  # the defaults are among the settings of each case
    settings = {"gptq_gemv": {"block_n", "split", "magic"}, "gemv": {"max_block_n", "block_k"},
                "decode_attention": {"block_s", "programs"}}
    assert all(settings[r["kernel"]] <= r["config"].keys() for r in rows)  # each kernel's own settings
    assert any(not r["config"]["magic"] for r in rows if r["kernel"] == "gptq_gemv")
