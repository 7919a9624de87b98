"""Checkpoint loading: sharded/single safetensors and .bin, strict key report, damaged files,
dtype/device choice, the default model's part verification and model resolution errors."""

import hashlib
import json
import os

import pytest
import torch

from helpers import v1_config, v1_state_dict, write_checkpoint
from qwenlm import AutoModelForCausalLM, load_model
from qwenlm.auto import resolve_dtype
from qwenlm.config import ModelConfig
from qwenlm.hub import ModelNotFoundError, assemble_parts, resolve_model
from qwenlm.weights.loader import CheckpointError

CFG = v1_config()
SD = v1_state_dict(CFG, seed=11)
IDS = torch.tensor([[1, 5, 7, 300]])


@pytest.fixture(scope="module")
def reference_logits(tmp_path_factory):
    path = write_checkpoint(str(tmp_path_factory.mktemp("ref")), CFG, SD)
    return load_model(path, dtype="float32", device="cpu")(IDS).logits


def test_sharded_safetensors(tmp_path, reference_logits):
    path = write_checkpoint(str(tmp_path), CFG, SD, shards=3)
    assert torch.equal(load_model(path, dtype="float32", device="cpu")(IDS).logits, reference_logits)


def test_bin_single_and_sharded(tmp_path, reference_logits):
    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text(json.dumps(CFG))
    torch.save(SD, single / "pytorch_model.bin")
    assert torch.equal(load_model(str(single), dtype="float32", device="cpu")(IDS).logits, reference_logits)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps(CFG))
    names = sorted(SD)
    half = len(names) // 2
    torch.save({k: SD[k] for k in names[:half]}, sharded / "pytorch_model-00001-of-00002.bin")
    torch.save({k: SD[k] for k in names[half:]}, sharded / "pytorch_model-00002-of-00002.bin")
    wm = {k: "pytorch_model-00001-of-00002.bin" for k in names[:half]}
    wm.update({k: "pytorch_model-00002-of-00002.bin" for k in names[half:]})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    assert torch.equal(load_model(str(sharded), dtype="float32", device="cpu")(IDS).logits, reference_logits)


def test_missing_shard(tmp_path):
    path = write_checkpoint(str(tmp_path), CFG, SD, shards=3)
    os.remove(os.path.join(path, "model-00002-of-00003.safetensors"))
    with pytest.raises(CheckpointError, match="missing.*model-00002-of-00003"):
        load_model(path)


def test_corrupt_shard(tmp_path):
    path = write_checkpoint(str(tmp_path), CFG, SD, shards=2)
    shard = os.path.join(path, "model-00001-of-00002.safetensors")
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_model(path)


def test_strict_report_lists_every_problem(tmp_path):
    sd = dict(SD)
    sd.pop("transformer.h.1.mlp.w1.weight")
    sd.pop("lm_head.weight")
    sd["transformer.h.0.attn.extra.weight"] = torch.zeros(2)
    sd["transformer.h.0.mlp.w2.weight"] = torch.zeros(3, 3)
    sd["transformer.h.0.attn.rotary_emb.inv_freq"] = torch.zeros(8)  # harmless original buffer
    path = write_checkpoint(str(tmp_path), CFG, sd)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = str(e.value)
    assert "2 missing: lm_head.weight, transformer.h.1.mlp.w1.weight" in msg
    assert "1 unexpected: transformer.h.0.attn.extra.weight" in msg
    assert "transformer.h.0.mlp.w2.weight: checkpoint (3, 3) vs model (96, 64)" in msg
    assert "inv_freq" not in msg


def test_weights_are_not_copied_twice(tmp_path):
    """Loading keeps no second copy: every parameter is its own storage, none left on meta."""
    path = write_checkpoint(str(tmp_path), CFG, SD)
    model = load_model(path, dtype="float32", device="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in SD.values())


def test_dtypes_and_precision_flags(tmp_path):
    path = write_checkpoint(str(tmp_path), CFG, SD)
    assert AutoModelForCausalLM.from_pretrained(path, bf16=True, device_map="cpu").dtype == torch.bfloat16
    assert AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float16, device_map="cpu").dtype == torch.float16
    assert AutoModelForCausalLM.from_pretrained(path, torch_dtype="auto", device_map="cpu",
                                                trust_remote_code=True).dtype == torch.float32
    cfg = ModelConfig.from_hf_dict(v1_config(bf16=True))
    assert resolve_dtype("auto", torch.device("cpu"), cfg) == torch.bfloat16
    with pytest.raises(ValueError, match="at most one"):
        AutoModelForCausalLM.from_pretrained(path, bf16=True, fp16=True)
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(path, dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model(path, device="cuda")


def test_unsupported_configs(tmp_path):
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        ModelConfig.from_hf_dict({"model_type": "llama"})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_resolve_model_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="Hugging Face Hub"):
        resolve_model("Qwen/Qwen-7B-Chat-does-not-exist")
    with pytest.raises(ModelNotFoundError, match="no model at"):
        resolve_model(str(tmp_path / "nowhere"))


def test_assemble_parts_verifies(tmp_path):
    parts = []
    for i, data in enumerate([b"abc" * 100, b"defg" * 50]):
        p = tmp_path / f"part{i}.bin"
        p.write_bytes(data)
        parts.append(str(p))
    good = hashlib.sha256(b"abc" * 100 + b"defg" * 50).hexdigest()
    out = assemble_parts(parts, str(tmp_path / "m.gguf"), 500, good, progress=False)
    assert open(out, "rb").read() == b"abc" * 100 + b"defg" * 50
    with pytest.raises(ValueError, match="sha256"):
        assemble_parts(parts, str(tmp_path / "m2.gguf"), 500, "0" * 64, progress=False)
    assert not os.path.exists(tmp_path / "m2.gguf") and not os.path.exists(tmp_path / "m2.gguf.part")
    with pytest.raises(ValueError, match="add up to 500"):
        assemble_parts(parts, str(tmp_path / "m3.gguf"), 501, good, progress=False)
    os.remove(parts[1])
    with pytest.raises(ModelNotFoundError, match="missing"):
        assemble_parts(parts, str(tmp_path / "m4.gguf"), 500, good, progress=False)
