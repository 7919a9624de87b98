"""GGUF import: synthetic qwen2 and qwen GGUFs written with the `gguf` package, converted by
`qwen convert`, compared with the weights they came from; damaged files give one clear error."""

import json
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize

from helpers import same_as_the_gguf_package, v1_config, v1_state_dict, write_checkpoint
from qwenlm import QwenTokenizer, load_model
from qwenlm.cli import main
from qwenlm.tokenizer.vocab import byte_encoder
from qwenlm.weights.convert import convert_gguf
from qwenlm.weights.gguf import GGUFError
from qwenlm.weights.loader import CheckpointError

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
H, FF, LAYERS, HEADS, KV = 64, 96, 2, 4, 2


def _vocab():
    enc = byte_encoder()
    tokens = [enc[b] for b in range(256)] + ["Ġt", "he", "Ġthe"] + SPECIALS
    types = [1] * 259 + [3, 3, 3]
    merges = ["Ġ t", "h e", "Ġt he"]
    return tokens, types, merges


def _write_gguf(path, arch, tensors: dict[str, np.ndarray], quant: dict[str, Q], extra=None):
    w = GGUFWriter(path, arch)
    w.add_block_count(LAYERS)
    w.add_context_length(4096)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FF if arch == "qwen2" else 2 * FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV if arch == "qwen2" else HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    tokens, types, merges = _vocab()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(259)
    w.add_eos_token_id(261)
    w.add_pad_token_id(259)
    w.add_chat_template("{{ chatml }}")
    for key, (value, vtype) in (extra or {}).items():  # more metadata: (value, GGUFValueType)
        if key == "general.alignment":
            w.add_custom_alignment(value)
        elif isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, vtype)
    for name, arr in tensors.items():
        qt = quant.get(name, Q.F32)
        if qt == Q.F32:
            w.add_tensor(name, arr.astype(np.float32))
        else:
            w.add_tensor(name, quantize(arr.astype(np.float32), qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _qwen2_tensors(seed=0):
    g = np.random.default_rng(seed)
    V = 272  # embedding rows beyond the 262 tokens are padding, as in real checkpoints
    r = lambda *s: (g.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    t = {"token_embd.weight": r(V, H), "output_norm.weight": 1 + r(H), "output.weight": r(V, H)}
    for i in range(LAYERS):
        b = f"blk.{i}."
        t.update({b + "attn_norm.weight": 1 + r(H), b + "ffn_norm.weight": 1 + r(H),
                  b + "attn_q.weight": r(H, H), b + "attn_q.bias": r(H),
                  b + "attn_k.weight": r(KV * 16, H), b + "attn_k.bias": r(KV * 16),
                  b + "attn_v.weight": r(KV * 16, H), b + "attn_v.bias": r(KV * 16),
                  b + "attn_output.weight": r(H, H), b + "ffn_gate.weight": r(FF, H),
                  b + "ffn_up.weight": r(FF, H), b + "ffn_down.weight": r(H, FF)})
    return t


QUANT = {"token_embd.weight": Q.Q8_0, "output.weight": Q.F16, "blk.0.attn_q.weight": Q.Q4_0,
         "blk.0.ffn_gate.weight": Q.Q5_0, "blk.1.ffn_up.weight": Q.BF16, "blk.1.attn_output.weight": Q.Q8_0}


def test_convert_qwen2_gguf(tmp_path):
    tensors = _qwen2_tensors()
    src = _write_gguf(str(tmp_path / "m.gguf"), "qwen2", tensors, QUANT)
    out = str(tmp_path / "out")
    assert main(["convert", src, out, "--no-progress"]) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "qwen2" and cfg["num_key_value_heads"] == KV and cfg["intermediate_size"] == FF
    model = load_model(out, dtype="float32", device="cpu")
    sd = model.state_dict()
    names = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
             "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
             "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
             "blk.1.ffn_up.weight": "model.layers.1.mlp.up_proj.weight",
             "blk.1.attn_output.weight": "model.layers.1.self_attn.o_proj.weight",
             "blk.1.attn_k.bias": "model.layers.1.self_attn.k_proj.bias"}
    for g, ours in names.items():
        want = tensors[g]
        if g in QUANT and QUANT[g] != Q.F32:
            want = dequantize(quantize(want, QUANT[g]), QUANT[g]).reshape(want.shape)
        np.testing.assert_array_equal(sd[ours].numpy(), want)
    tok = QwenTokenizer.from_pretrained(out)
    assert tok.encode(" the") == [258] and tok.encode("<|im_end|>") == [261] and len(tok) == 262
    assert tok.eos_token == "<|im_end|>"
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert gen["chat_format"] == "chatml"
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 272)


def test_convert_qwen_v1_gguf_matches_checkpoint(tmp_path):
    """A `qwen`-architecture GGUF (fused qkv, ffn_gate = w2) converts back to the v1 layout."""
    cfg = v1_config(vocab=265, hidden=H, layers=LAYERS, heads=HEADS, mlp=FF)
    sd = v1_state_dict(cfg, seed=1)
    write_checkpoint(str(tmp_path / "v1"), cfg, sd)
    t = {"token_embd.weight": sd["transformer.wte.weight"], "output_norm.weight": sd["transformer.ln_f.weight"],
         "output.weight": sd["lm_head.weight"]}
    for i in range(LAYERS):
        p, b = f"transformer.h.{i}.", f"blk.{i}."
        t.update({b + "attn_norm.weight": sd[p + "ln_1.weight"], b + "ffn_norm.weight": sd[p + "ln_2.weight"],
                  b + "attn_qkv.weight": sd[p + "attn.c_attn.weight"], b + "attn_qkv.bias": sd[p + "attn.c_attn.bias"],
                  b + "attn_output.weight": sd[p + "attn.c_proj.weight"], b + "ffn_up.weight": sd[p + "mlp.w1.weight"],
                  b + "ffn_gate.weight": sd[p + "mlp.w2.weight"], b + "ffn_down.weight": sd[p + "mlp.c_proj.weight"]})
    src = _write_gguf(str(tmp_path / "v1.gguf"), "qwen", {k: v.numpy() for k, v in t.items()}, {})
    out = convert_gguf(src, str(tmp_path / "out"), progress=False)
    assert os.path.isfile(os.path.join(out, "qwen.tiktoken"))
    a = load_model(out, dtype="float32", device="cpu")
    b = load_model(str(tmp_path / "v1"), dtype="float32", device="cpu")
    ids = torch.tensor([[5, 9, 200, 17, 3]])
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_truncated_gguf_is_one_clear_error(tmp_path):
    src = _write_gguf(str(tmp_path / "m.gguf"), "qwen2", _qwen2_tensors(), QUANT)
    data = open(src, "rb").read()
    cut = str(tmp_path / "cut.gguf")
    open(cut, "wb").write(data[: len(data) - 1000])
    with pytest.raises(GGUFError, match="truncated|damaged"):
        convert_gguf(cut, str(tmp_path / "o1"), progress=False)
    head = str(tmp_path / "head.gguf")
    open(head, "wb").write(data[:300])
    with pytest.raises(GGUFError, match="truncated|damaged"):
        convert_gguf(head, str(tmp_path / "o2"), progress=False)
    assert not os.path.exists(tmp_path / "o1") and not os.path.exists(tmp_path / "o2")


def test_not_a_gguf_and_wrong_arch(tmp_path, capsys):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(GGUFError, match="not a GGUF"):
        convert_gguf(str(bad), str(tmp_path / "o"), progress=False)
    llama = _write_gguf(str(tmp_path / "l.gguf"), "llama", {"token_embd.weight": np.zeros((272, H), np.float32)}, {})
    assert main(["convert", llama, str(tmp_path / "o3"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "'llama' is not supported" in err and "Traceback" not in err


# ---- quantize="gguf": the file's own blocks on the CPU kernel ---------------------------------------

BLOCKS = {"blk.0.attn_q.weight": Q.Q5_0, "blk.0.attn_k.weight": Q.Q5_0, "blk.0.attn_v.weight": Q.Q8_0,
          "blk.0.ffn_gate.weight": Q.Q5_0, "blk.0.ffn_up.weight": Q.Q5_0, "blk.0.ffn_down.weight": Q.Q5_0,
          "blk.0.attn_output.weight": Q.Q4_0, "blk.1.ffn_gate.weight": Q.Q8_0, "blk.1.ffn_up.weight": Q.Q5_0,
          "output.weight": Q.Q8_0}


@pytest.mark.skipif(not __import__("qwenlm.quant.q4", fromlist=["q4"]).available(), reason="needs the AVX2 kernel")
def test_gguf_blocks_are_the_files_weights(tmp_path):
    """Q5_0 and Q8_0 layers hold exactly the converted checkpoint's weights (which are gguf's own
    dequantization of the file); a type with no mapping (Q4_0) and float layers get 8 bits; layers
    multiplied as one share the widest width; the model answers like the float one; a moved GGUF
    file turns `auto` back to int8 and `gguf` into a clear error."""
    from qwenlm.quant import q4

    src = _write_gguf(str(tmp_path / "m.gguf"), "qwen2", _qwen2_tensors(seed=3), BLOCKS)
    out = str(tmp_path / "out")
    assert main(["convert", src, out, "--no-progress"]) == 0
    ref = load_model(out, dtype="float32", device="cpu", quantize="none")
    model = load_model(out, device="cpu", quantize="auto")
    assert model.quantization == "gguf-blocks"
    from qwenlm.commands.info import describe

    info = describe(out)  # `qwen info` says so without loading
    assert info["gguf_source"] == os.path.abspath(src) and "(gguf)" in info["cpu_weights"]
    want = ref.state_dict()
    b0, b1 = model.blocks[0], model.blocks[1]
    exact = {"model.layers.0.self_attn.q_proj": b0.self_attn.q_proj, "model.layers.0.self_attn.v_proj": b0.self_attn.v_proj,
             "model.layers.0.mlp.gate_proj": b0.mlp.gate_proj, "model.layers.0.mlp.down_proj": b0.mlp.down_proj,
             "model.layers.1.mlp.gate_proj": b1.mlp.gate_proj, "model.layers.1.mlp.up_proj": b1.mlp.up_proj,
             "lm_head": model.lm_head}
    for name, lin in exact.items():
        assert isinstance(lin, q4.Q4Linear), name
        assert torch.equal(q4.dequantize_q4(lin.codes, lin.d, lin.m), want[name + ".weight"]), name
    # q/k/v: Q5_0 + Q5_0 + Q8_0 -> all 8 bits; gate/up Q5_0 -> 5 bits (64 inputs: one pair of blocks);
    # down has 96 inputs (3 blocks, no pairs) -> 8 bits; blk.1 gate Q8_0 + up Q5_0 -> 8 bits
    assert [lin.bits for lin in (b0.self_attn.q_proj, b0.self_attn.k_proj, b0.self_attn.v_proj)] == [8, 8, 8]
    assert (b0.mlp.gate_proj.bits, b0.mlp.up_proj.bits, b0.mlp.down_proj.bits) == (5, 5, 8)
    assert (b1.mlp.gate_proj.bits, b1.mlp.up_proj.bits) == (8, 8)
    assert b0.self_attn.o_proj.bits == 8 and b1.self_attn.q_proj.bits == 8  # Q4_0 and F32: re-quantized
    x = torch.tensor([[1, 5, 9, 200, 7]])
    a, b = ref(x).logits, model(x).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()  # (8-bit activations and re-quantized layers)
    os.rename(src, str(tmp_path / "moved.gguf"))
    assert load_model(out, device="cpu", quantize="auto").quantization == "q8-avx2"
    assert describe(out)["gguf_source"] is None and "(int8)" in describe(out)["cpu_weights"]
    with pytest.raises(ValueError, match="converted from a GGUF file that is still in place"):
        load_model(out, device="cpu", quantize="gguf")


@pytest.mark.skipif(not __import__("qwenlm.quant.q4", fromlist=["q4"]).available(), reason="needs the AVX2 kernel")
def test_gguf_blocks_of_a_tied_head_and_a_changed_file(tmp_path):
    """No output.weight in the file (a tied head): the head takes the embedding's blocks. A GGUF file
    rewritten after the conversion is not used for blocks."""
    from qwenlm.quant import q4

    tensors = _qwen2_tensors(seed=4)
    del tensors["output.weight"]
    src = _write_gguf(str(tmp_path / "t.gguf"), "qwen2", tensors, {"token_embd.weight": Q.Q8_0})
    out = str(tmp_path / "out")
    assert main(["convert", src, out, "--no-progress"]) == 0
    model = load_model(out, device="cpu", quantize="gguf")
    assert model.config.tie_word_embeddings and model.lm_head.bits == 8
    emb = load_model(out, dtype="float32", device="cpu").state_dict()["model.embed_tokens.weight"]
    assert torch.equal(q4.dequantize_q4(model.lm_head.codes, model.lm_head.d, model.lm_head.m), emb)
    os.utime(src, ns=(0, 0))  # the file changed since (its time)
    assert load_model(out, device="cpu", quantize="auto").quantization == "q8-avx2"


# ---- lean conversion: a large GGUF's quantized tensors stay in the file ----------------------------

LEAN = {**BLOCKS, "token_embd.weight": Q.Q5_0}  # (the embedding quantized too, as in the default model)

def test_lean_conversion_reads_the_files_tensors_as_the_full_one_stores_them(tmp_path):
    """A lean checkpoint holds only the file's float tensors; loaded in float, every weight equals the
    full conversion's (gguf's own dequantization, read from the file at load)."""
    src = _write_gguf(str(tmp_path / "m.gguf"), "qwen2", _qwen2_tensors(seed=3), LEAN)
    full, lean = str(tmp_path / "full"), str(tmp_path / "lean")
    convert_gguf(src, full, progress=False)
    convert_gguf(src, lean, progress=False, lean=True)
    from safetensors import safe_open

    with safe_open(os.path.join(lean, "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    assert "model.layers.0.input_layernorm.weight" in stored and "model.layers.1.self_attn.q_proj.weight" in stored
    assert not stored & {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"}
    want = load_model(full, dtype="float32", device="cpu", quantize="none").state_dict()
    got = load_model(lean, dtype="float32", device="cpu", quantize="none").state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert load_model(lean, dtype="bfloat16", device="cpu").state_dict()["lm_head.weight"].dtype == torch.bfloat16


@pytest.mark.skipif(not __import__("qwenlm.quant.q4", fromlist=["q4"]).available(), reason="needs the AVX2 kernel")
def test_lean_conversion_on_the_cpu_kernel_never_dequantizes_the_blocks(tmp_path, monkeypatch):
    """With the file's blocks (the CPU default), a lean checkpoint gives the full one's model exactly,
    and the layers that take the file's blocks are never dequantized; the file gone, one clear error."""
    from qwenlm.quant import gguf_blocks, q4

    src = _write_gguf(str(tmp_path / "m.gguf"), "qwen2", _qwen2_tensors(seed=3), LEAN)
    full, lean = str(tmp_path / "full"), str(tmp_path / "lean")
    convert_gguf(src, full, progress=False)
    convert_gguf(src, lean, progress=False, lean=True)
    read, deferred = [], []
    real = gguf_blocks.file_tensors
    monkeypatch.setattr(gguf_blocks, "file_tensors", lambda source, names: real(source, read.extend(names) or names))
    from qwenlm import auto

    real_load = auto.load_weights
    monkeypatch.setattr(auto, "load_weights", lambda *a: deferred.extend(a[5]) or real_load(*a))  # a[5]: deferred
    model = load_model(lean, device="cpu", quantize="auto")
    ref = load_model(full, device="cpu", quantize="auto")
    assert model.quantization == ref.quantization == "gguf-blocks"
    from qwenlm.commands.info import describe

    assert describe(lean)["weights_in_gguf"] and not describe(full)["weights_in_gguf"]
    assert "model.layers.0.self_attn.q_proj.weight" not in read and "lm_head.weight" not in read
    assert "model.layers.0.self_attn.o_proj.weight" in read  # Q4_0: 8 bits
    # the table stays in the file's blocks: never dequantized whole, its looked-up rows are the full one's
    assert "model.embed_tokens.weight" not in read and isinstance(model.embed, gguf_blocks.FileEmbedding)
    ids = torch.arange(272)[torch.randperm(272, generator=torch.Generator().manual_seed(0))].view(4, 68)
    assert torch.equal(model.embed(ids), ref.embed(ids))
    # ... read one at a time on the way to 8 bits, not all of them in float during the load
    assert {"model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.q_proj.weight"} <= set(deferred)
    assert "model.embed_tokens.weight" not in deferred
    for (name, a), (_, b) in zip(model.named_modules(), ref.named_modules()):
        if isinstance(a, q4.Q4Linear):
            assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("codes", "d", "m")), name
    x = torch.tensor([[1, 5, 9, 200, 7]])
    assert torch.equal(model(x).logits, ref(x).logits)
    os.rename(src, str(tmp_path / "moved.gguf"))
    assert main(["generate", "--model", lean, "hi"]) == 2  # one error line, no traceback
    with pytest.raises(CheckpointError, match="lean conversion of .*m.gguf"):
        load_model(lean, device="cpu")


def _lean_and_full(tmp_path, tensors, quant):
    src = _write_gguf(str(tmp_path / "m.gguf"), "qwen2", tensors, quant)
    full, lean = str(tmp_path / "full"), str(tmp_path / "lean")
    convert_gguf(src, full, progress=False)
    convert_gguf(src, lean, progress=False, lean=True)
    return full, lean


def _same_blocks_and_logits(model, ref):
    from qwenlm.quant import q4

    assert model.quantization == ref.quantization
    mods = dict(ref.named_modules())
    for name, a in model.named_modules():
        if isinstance(a, q4.Q4Linear):
            assert all(torch.equal(getattr(a, k), getattr(mods[name], k)) for k in ("codes", "d", "m")), name
    x = torch.tensor([[1, 5, 9, 200, 7, 271, 0]])
    with torch.inference_mode():
        assert torch.equal(model(x).logits, ref(x).logits)


@pytest.mark.skipif(not __import__("qwenlm.quant.q4", fromlist=["q4"]).available(), reason="needs the AVX2 kernel")
@pytest.mark.parametrize("table", [Q.Q8_0, Q.Q4_0], ids=lambda q: q.name)
def test_a_lean_tied_head_takes_the_tables_entry(tmp_path, table):
    """No output.weight (a tied head) and the table left in the file: the head takes the table's
    blocks (Q8_0) or 8 bits of its dequantized weight (Q4_0: no exact blocks), as the full one's does."""
    from qwenlm.quant.gguf_blocks import FileEmbedding

    tensors = _qwen2_tensors(seed=5)
    del tensors["output.weight"]
    full, lean = _lean_and_full(tmp_path, tensors, {**BLOCKS, "token_embd.weight": table})
    model, ref = load_model(lean, device="cpu", quantize="gguf"), load_model(full, device="cpu", quantize="gguf")
    assert model.config.tie_word_embeddings and isinstance(model.embed, FileEmbedding)
    assert model.lm_head.bits == 8
    _same_blocks_and_logits(model, ref)


@pytest.mark.skipif(not __import__("qwenlm.quant.q4", fromlist=["q4"]).available(), reason="needs the AVX2 kernel")
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_a_lean_checkpoint_is_quantized_as_it_is_read(tmp_path, monkeypatch, quantize, tied):
    """`--quantize int4|int8` on a lean checkpoint (a large GGUF): each layer is dequantized from the
    file and quantized one at a time (never the whole model in fp32: ~30 GB for 7B), and gives the full
    conversion's model block for block; the table stays in the file unless a tied head needs it."""
    from qwenlm.quant.gguf_blocks import FileEmbedding
    from qwenlm.weights import loader

    tensors = _qwen2_tensors(seed=6)
    if tied:
        del tensors["output.weight"]
    full, lean = _lean_and_full(tmp_path, tensors, LEAN)
    ref = load_model(full, device="cpu", quantize=quantize)
    assigned = []
    real_assign = loader._assign
    monkeypatch.setattr(loader, "_assign", lambda m, name, t, p: (assigned.append(name), real_assign(m, name, t, p)))
    model = load_model(lean, device="cpu", quantize=quantize)
    assert not [n for n in assigned if n.endswith("_proj.weight") or n == "lm_head.weight"]
    assert isinstance(model.embed, FileEmbedding) != tied
    _same_blocks_and_logits(model, ref)


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_0", "Q4_0", "BF16", "Q4_K", "Q6_K"])
def test_a_table_left_in_the_file_looks_up_the_rows_the_gguf_package_dequantizes(tmp_path, kind):
    from gguf import GGMLQuantizationType

    from qwenlm.quant.gguf_blocks import FileEmbedding

    rng = np.random.default_rng(7)
    rows, width = 40, 512
    if kind in ("Q4_K", "Q6_K"):  # (the gguf package cannot quantize these: random blocks, sane scales)
        size = {"Q4_K": 144, "Q6_K": 210}[kind]
        raw = rng.integers(0, 256, (rows, width // 256, size), dtype=np.uint8)
        for at in ([0, 2] if kind == "Q4_K" else [208]):
            raw[..., at:at + 2] = (rng.standard_normal(raw.shape[:2]) * 0.01).astype(np.float16)[..., None].view(np.uint8)
        raw = raw.reshape(rows, -1)
    else:
        raw = quantize(rng.standard_normal((rows, width)).astype(np.float32), GGMLQuantizationType[kind])
    path = tmp_path / "table.bin"
    pad = 96  # (the table starts inside the file)
    path.write_bytes(b"\0" * pad + raw.tobytes())
    source = {"path": str(path), "tensors": {"t": [kind, [width, rows], pad, raw.nbytes]}}
    table = FileEmbedding(source, "t")
    want = torch.from_numpy(dequantize(raw, GGMLQuantizationType[kind]).astype(np.float32))
    ids = torch.tensor([[3, 0, 39, 3], [17, 18, 5, 1]])
    got = table(ids)
    assert got.dtype == torch.float32 and got.shape == (2, 4, width)
    assert torch.equal(got, want[ids])
    assert torch.equal(table(torch.arange(rows)), want)


def test_a_large_gguf_is_converted_lean_into_the_cache(tmp_path, monkeypatch):
    """A .gguf path is converted once into the cache: in full below LEAN_ABOVE fp32 bytes, lean above."""
    from qwenlm import hub
    from qwenlm.weights import convert

    monkeypatch.setenv("QWENLM_HOME", str(tmp_path / "home"))
    src = _write_gguf(str(tmp_path / "m.gguf"), "qwen2", _qwen2_tensors(seed=3), LEAN)
    assert not json.load(open(os.path.join(hub.resolve_model(src), "gguf_source.json")))["lean"]
    monkeypatch.setattr(convert, "LEAN_ABOVE", 1000)
    os.utime(src, ns=(1, 1))  # another version of the file: converted anew
    out = hub.resolve_model(src)
    assert json.load(open(os.path.join(out, "gguf_source.json")))["lean"]
    assert load_model(out, dtype="float32", device="cpu", quantize="none").lm_head.weight.shape == (272, H)


# ---- the header reader -----------------------------------------------------------------------------

def test_header_reader_reads_what_the_gguf_package_reads(tmp_path):
    """Every value type, arrays of each, strings with any UTF-8, float and quantized tensors; an
    alignment other than 32."""
    from gguf import GGUFValueType as V

    extra = {"t.u8": (7, V.UINT8), "t.i8": (-7, V.INT8), "t.u16": (65000, V.UINT16), "t.i16": (-300, V.INT16),
             "t.u32": (4_000_000_000, V.UINT32), "t.i32": (-5, V.INT32), "t.f32": (0.1, V.FLOAT32),
             "t.bool": (True, V.BOOL), "t.str": ("héllo 你好 🌍", V.STRING), "t.u64": (2**63, V.UINT64),
             "t.i64": (-(2**40), V.INT64), "t.f64": (0.1, V.FLOAT64),
             "t.ints": ([1, -2, 3], V.ARRAY), "t.floats": ([0.5, 1.25], V.ARRAY), "t.bools": ([True, False], V.ARRAY),
             "t.strs": (["a", "", "你好"], V.ARRAY), "t.empty": ([], V.ARRAY)}
    same_as_the_gguf_package(_write_gguf(str(tmp_path / "m.gguf"), "qwen2", _qwen2_tensors(), LEAN, extra=extra))
    same_as_the_gguf_package(_write_gguf(str(tmp_path / "a.gguf"), "qwen2", _qwen2_tensors(), QUANT,
                                          extra={"general.alignment": (64, V.UINT32)}))


def test_header_reader_refuses_what_it_cannot_read(tmp_path):
    from qwenlm.weights.gguf_reader import GGUFHeaderError, HeaderReader

    data = open(_write_gguf(str(tmp_path / "m.gguf"), "qwen2", _qwen2_tensors(), QUANT), "rb").read()
    for name, blob in {"v1": data[:4] + (1).to_bytes(4, "little") + data[8:], "cut": data[:2000],
                       "type": data[:4] + (3).to_bytes(4, "little") + data[8:24] + (1).to_bytes(8, "little")
                       + (3).to_bytes(8, "little") + b"abc" + (99).to_bytes(4, "little")}.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(blob)
        with pytest.raises(GGUFHeaderError):
            HeaderReader(str(path))
