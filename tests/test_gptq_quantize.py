"""The GPTQ algorithm and `qwen quantize`: error compensation beats plain rounding on the layer's
own inputs, the written tensors decode to the weights it reports, act-order groups are complete,
and a quantized checkpoint loads back (qwenlm's loader) and generates."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import v1_config, v1_state_dict, write_checkpoint
from qwenlm import load_model
from qwenlm.quant.gptq import GPTQLinear
from qwenlm.quant.gptq_quantize import _group_params, gptq_quantize_weight


def _inputs(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)  # correlated input features
    return torch.randn(n, k, generator=g) @ mix


def _rtn(w, bits, gs, sym=True):
    out = torch.empty_like(w)
    for c in range(0, w.shape[1], gs):
        s, z = _group_params(w[:, c:c + gs], bits, sym=sym)
        q = torch.clamp(torch.round(w[:, c:c + gs] / s[:, None]) + z[:, None], 0, 2**bits - 1)
        out[:, c:c + gs] = s[:, None] * (q - z[:, None])
    return out


def _decode(r, n, k, bits, gs):
    lay = GPTQLinear(k, n, bits, gs, bias=False)
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        setattr(lay, name, r[name])
    return lay.weight()


@pytest.mark.parametrize("bits,gs,act_order,sym", [(4, 32, False, True), (4, 32, True, True), (8, 64, False, True),
                                                  (4, -1, False, True), (4, 32, False, False)])
def test_gptq_beats_rounding_on_its_inputs(bits, gs, act_order, sym):
    n, k = 48, 128
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    w[:4] = w[:4].abs()  # rows that are all positive: an asymmetric zero of 0, which the format cannot store
    x = _inputs(512, k)
    H = 2 * x.t() @ x / x.shape[0]
    r = gptq_quantize_weight(w, H, bits, gs, act_order, sym=sym)
    q = r["dequantized"]
    assert torch.allclose(_decode(r, n, k, bits, gs), q, atol=1e-6)  # the tensors mean what it reports
    err_gptq = ((w - q) @ x.t()).pow(2).sum()
    err_rtn = ((w - _rtn(w, bits, gs if gs > 0 else k, sym)) @ x.t()).pow(2).sum()
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)
    g = r["g_idx"].long()
    assert torch.bincount(g).tolist() == [gs if gs > 0 else k] * (k // (gs if gs > 0 else k))
    if act_order:
        assert bool((g[1:] < g[:-1]).any())  # groups follow the Hessian order, not the column order


def test_quantize_command_round_trip(tmp_path):
    cfg = v1_config(hidden=64, heads=4, layers=2, mlp=64)
    src = write_checkpoint(str(tmp_path / "src"), cfg, v1_state_dict(cfg, seed=2),
                           {"chat_format": "chatml", "eos_token_id": 151643})
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(str(i % 97) for i in range(4000)))
    out = str(tmp_path / "int4")
    # the tiny model has no tokenizer of its own: give it the byte-level one of a real model
    from qwenlm.tokenizer.vocab import write_tiktoken_file
    write_tiktoken_file({bytes([i]): i for i in range(256)}, os.path.join(src, "qwen.tiktoken"))
    with open(os.path.join(src, "gguf_source.json"), "w") as f:  # as if converted from a GGUF since gone
        json.dump({"path": str(tmp_path / "gone.gguf"), "size": 1, "mtime_ns": 1, "arch": "qwen", "lean": False,
                   "tensors": {}}, f)
    r = subprocess.run([sys.executable, "-m", "qwenlm", "quantize", src, out, "--bits", "4", "--group-size", "32",
                        "--calib", str(calib), "--samples", "8", "--seq-len", "64", "--device", "cpu"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    qc = json.load(open(os.path.join(out, "quantize_config.json")))
    assert qc["bits"] == 4 and qc["group_size"] == 32
    assert json.load(open(os.path.join(out, "config.json")))["quantization_config"]["quant_method"] == "gptq"
    assert os.path.isfile(os.path.join(out, "qwen.tiktoken"))
    assert not os.path.exists(os.path.join(out, "gguf_source.json"))  # its weights are not that file's blocks
    model = load_model(out, dtype="float32", device="cpu")
    ref = load_model(src, dtype="float32", device="cpu")
    rtn = load_model(src, dtype="float32", device="cpu")  # the same layers rounded without GPTQ
    for _, lin in rtn.block_linears():
        lin.weight.data = _rtn(lin.weight.data, 4, 32)
    from qwenlm import QwenTokenizer
    ids = torch.tensor([QwenTokenizer.from_pretrained(src).encode(calib.read_text())[:128]])
    with torch.inference_mode():
        want = ref(ids).logits
        err = {name: ((m(ids).logits - want).norm() / want.norm()).item() for name, m in (("gptq", model), ("rtn", rtn))}
    assert err["gptq"] < err["rtn"] and err["gptq"] < 0.5, err  # 4-bit: close, and closer than rounding
    # errors a user can fix: one line, exit 2
    bad = subprocess.run([sys.executable, "-m", "qwenlm", "quantize", src, str(tmp_path / "x"), "--calib",
                          str(tmp_path / "nope.txt")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "calibration data not found" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "qwenlm", "quantize", src, out, "--calib", str(calib)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not an empty directory" in bad.stderr
