"""The real offline default model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF): answers, the
original quickstart, and logits against transformers loading the very same GGUF."""

import os
import re
import subprocess
import sys

import pytest
import torch

from qwenlm import AutoModelForCausalLM, AutoTokenizer
from qwenlm.hub import DEFAULT_MODEL, cache_dir
from qwenlm.quant import q4
from qwenlm.tokenizer import make_context

pytestmark = pytest.mark.slow
PARIS = "What is the capital of France? Answer in one word."


@pytest.fixture(scope="module")
def quickstart(default_dir):
    tokenizer = AutoTokenizer.from_pretrained(default_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(default_dir, device_map="auto", trust_remote_code=True).eval()
    return model, tokenizer


def test_paris(quickstart):
    model, tokenizer = quickstart
    response, _ = model.chat(tokenizer, PARIS, history=None, do_sample=False)
    assert response.strip().rstrip(".") == "Paris"


def test_chinese_reply_and_second_turn(quickstart):
    model, tokenizer = quickstart
    response, history = model.chat(tokenizer, "你好", history=None, do_sample=False)
    assert re.search(r"[\u4e00-\u9fff]", response), response
    response2, history = model.chat(tokenizer, "What did I just say? Answer briefly.", history=history,
                                    do_sample=False, max_new_tokens=48)
    assert len(history) == 2 and history[0] == ("你好", response) and response2


def test_second_turn_reads_only_the_new_message(quickstart):
    """The engine keeps the conversation's cache on a CPU: a real reply encodes back to the tokens that
    were generated, so the next turn reads only `<|im_end|>` and the new message."""
    from qwenlm.engine import get_engine

    model, tokenizer = quickstart
    eng = get_engine(model)
    reads = []
    prefill = eng._prefill
    eng._prefill = lambda st: reads.append((st["w"], st["w"] - st["keep"])) or prefill(st)
    try:
        eng.release()
        _, history = model.chat(tokenizer, "Write a Python function that adds two numbers.", history=None,
                                do_sample=False, max_new_tokens=64)
        question = "Now make it subtract."
        reply, _ = model.chat(tokenizer, question, history=history, do_sample=False, max_new_tokens=24)
        eng.release()
        assert model.chat(tokenizer, question, history=history, do_sample=False, max_new_tokens=24)[0] == reply
    finally:
        del eng._prefill
    (w1, _), (w2, new2), (w3, new3) = reads
    end = len(tokenizer.encode(f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
                               allowed_special="all"))
    assert new2 <= end + 1 and new3 == w3 == w2  # (+1: the reply's last token, never fed back)


def test_sampled_chat_is_reproducible(quickstart):
    model, tokenizer = quickstart
    a = model.chat(tokenizer, "Name a color.", seed=7, max_new_tokens=16)[0]
    assert a == model.chat(tokenizer, "Name a color.", seed=7, max_new_tokens=16)[0]


def test_logits_match_transformers_on_the_same_gguf(quickstart):
    transformers = pytest.importorskip("transformers")
    model, tokenizer = quickstart
    gguf_dir = os.path.join(cache_dir(), "gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=DEFAULT_MODEL["name"] + ".gguf", dtype=torch.float32).eval()
    _, ids = make_context(tokenizer, PARIS, system="You are a helpful assistant.")
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = hf(x).logits
    got = model(x).logits
    assert (got - ref).abs().max() < 1e-3
    assert torch.equal(got[0].argmax(-1), ref[0].argmax(-1))


def test_cli_generate_uses_the_default_model():
    r = subprocess.run([sys.executable, "-m", "qwenlm", "generate", "--greedy", PARIS],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().rstrip(".") == "Paris"


def test_loading_is_memory_mapped(default_dir):
    """Peak memory while loading and running the default model stays well under twice the weights."""
    # VmHWM is per address space (reset by exec); ru_maxrss would include the pytest parent's peak
    code = ("import re, torch; from qwenlm import load_model; m = load_model(%r); "
            "m(torch.tensor([[1, 2, 3]])); "
            "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024)"
            % default_dir)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    weights = sum(os.path.getsize(os.path.join(default_dir, f)) for f in os.listdir(default_dir)
                  if f.endswith(".safetensors"))
    assert int(r.stdout.strip()) < 1.5 * weights


def test_int4_cpu_path_still_answers(default_dir):
    from qwenlm import load

    model, tokenizer = load(default_dir, device="cpu", quantize="int4")
    assert model.quantization in ("q4-avx2", "int4-g32")
    assert model.chat(tokenizer, PARIS, do_sample=False)[0].strip().rstrip(".") == "Paris"
    assert re.search(r"[\u4e00-\u9fff]", model.chat(tokenizer, "你好", do_sample=False)[0])
    model.kv_cache = "int8"  # the fused 4-bit step with 8-bit keys/values: the answers stay right
    assert model.chat(tokenizer, PARIS, do_sample=False)[0].strip().rstrip(".") == "Paris"
    assert re.search(r"[\u4e00-\u9fff]", model.chat(tokenizer, "你好", do_sample=False)[0])


@pytest.mark.skipif(not {"avx2", "fma", "f16c"} <= q4._cpu_flags(), reason="needs AVX2/FMA/F16C")
def test_int8_cpu_path_answers_like_fp32(default_dir):
    """8-bit blocks (half a step of 1/127 of each block's largest weight): the greedy reply of the
    fused 8-bit step stays the fp32 model's for a whole sentence."""
    from qwenlm import load

    model, tokenizer = load(default_dir, device="cpu", quantize="int8")
    assert model.quantization == "q8-avx2" and model.lm_head.bits == 8
    assert model.chat(tokenizer, PARIS, do_sample=False)[0].strip().rstrip(".") == "Paris"
    question = "In one sentence: what does a Python list comprehension do?"
    got = model.chat(tokenizer, question, do_sample=False, max_new_tokens=24)[0]
    fp32, _ = load(default_dir, device="cpu", dtype="float32")
    assert got == fp32.chat(tokenizer, question, do_sample=False, max_new_tokens=24)[0]


@pytest.mark.skipif(not {"avx2", "fma", "f16c"} <= q4._cpu_flags(), reason="needs AVX2/FMA/F16C")
def test_gguf_blocks_are_the_files_and_answer_like_fp32(default_dir):
    """The default on a CPU (`quantize="auto"`): the GGUF file's own blocks. Q5_0 and Q8_0 layers hold
    exactly the converted fp32 weights (gguf's own dequantization), Q4_K layers within the fp16
    rounding of their block scales and offsets (2^-11 relative), Q6_K layers 8 bits; the greedy reply
    stays the fp32 model's for a whole sentence."""
    from qwenlm import load, load_model
    from qwenlm.quant.gguf_blocks import source_of

    model, tokenizer = load(default_dir, device="cpu", quantize="auto")
    assert model.quantization == "gguf-blocks"
    fp32 = load_model(default_dir, "float32", "cpu")
    want = fp32.state_dict()
    types = {k: v[0] for k, v in source_of(default_dir)["tensors"].items()}
    seen = set()
    for name, lin in model.named_modules():
        if not isinstance(lin, q4.Q4Linear):
            continue
        kind = types[name + ".weight"]
        w, ref = q4.dequantize_q4(lin.codes, lin.d, lin.m), want[name + ".weight"]
        if kind in ("Q5_0", "Q8_0"):
            assert torch.equal(w, ref), name
        elif kind == "Q4_K":
            assert lin.bits == 4
            bound = (15 * lin.d.float().abs() + lin.m.float().abs()) * 2.0 ** -11 + 1e-7  # (N, K/32)
            assert bool(((w - ref).abs().view_as(lin.d.float()[..., None].expand(-1, -1, 32))
                         <= bound[..., None]).all()), name
        else:
            assert kind == "Q6_K" and lin.bits == 8, name
        seen.add(kind)
    assert seen == {"Q5_0", "Q8_0", "Q4_K", "Q6_K"}
    assert model.blocks[0].mlp.gate_proj.bits == 5 and model.lm_head.bits == 8
    question = "In one sentence: what does a Python list comprehension do?"
    got = model.chat(tokenizer, question, do_sample=False, max_new_tokens=24)[0]
    assert got == fp32.chat(tokenizer, question, do_sample=False, max_new_tokens=24)[0]


def test_header_reader_reads_the_default_models_file_as_the_gguf_package_does(default_dir):
    """The 151,936-token vocabulary, merges, chat template and 291 tensors, value for value."""
    from helpers import same_as_the_gguf_package

    same_as_the_gguf_package(os.path.join(cache_dir(), "gguf", DEFAULT_MODEL["name"] + ".gguf"))


@pytest.mark.skipif(not {"avx2", "fma", "f16c"} <= q4._cpu_flags(), reason="needs AVX2/FMA/F16C")
def test_from_pretrained_takes_the_quantize_choice(default_dir, quickstart):
    """The quickstart's loader keeps the weights as stored, like transformers; `quantize="auto"` loads
    what `qwen chat` runs on a CPU, and it answers the same."""
    model, tokenizer = quickstart
    assert not hasattr(model, "quantization") and model.dtype == torch.float32
    fast = AutoModelForCausalLM.from_pretrained(default_dir, device_map="auto", trust_remote_code=True,
                                                quantize="auto").eval()
    assert fast.quantization == "gguf-blocks"
    assert fast.chat(tokenizer, PARIS, do_sample=False)[0] == model.chat(tokenizer, PARIS, do_sample=False)[0]
