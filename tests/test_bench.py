"""`qwen bench` on a tiny checkpoint: the report's fields, and the transformers twin (same
weights, shared storage) producing exactly our greedy tokens in fp32."""

import json
import os

import pytest

from helpers import tiny_hf_qwen2, v1_config, v1_state_dict, write_checkpoint
from qwenlm.cli import main
from qwenlm.quant import q4


@pytest.mark.parametrize("arch", ["qwen", "qwen2"])
def test_bench_json_and_hf_twin(tmp_path, capsys, arch):
    pytest.importorskip("transformers")
    if arch == "qwen":
        cfg = v1_config(vocab=151936, hidden=64, layers=2, heads=4, mlp=96)
        path = write_checkpoint(str(tmp_path), cfg, v1_state_dict(cfg, seed=1))
    else:
        path = tiny_hf_qwen2(str(tmp_path), vocab=151936)
    assert main(["bench", "--model", path, "--device", "cpu", "--dtype", "float32", "--gen", "24",
                 "--prefill", "32", "--compare", "hf", "--hf-tokens", "24", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    d = res["decode"][0]
    assert d["tokens"] == 24 and d["tokens_per_s"] > 0 and d["kv_cache_bytes"] > 0
    assert res["prefill"]["tokens"] == 32 and res["prefill"]["ms"] > 0
    assert res["hf"]["tokens"] == 24 and res["hf"]["agree_tokens"] == 24


@pytest.mark.skipif(not q4.available(), reason="needs the AVX2/FMA/F16C CPU kernel")
def test_bench_loads_a_checkpoint_as_qwen_chat_does(tmp_path, capsys):
    """--quantize auto (the default) measures what `qwen chat` loads; none, the weights as stored;
    random --shape weights stay as they are made."""
    path = tiny_hf_qwen2(str(tmp_path), hidden=64, heads=4, kv_heads=2, mlp=128)

    def dtype(*args):
        assert main(["bench", *args, "--device", "cpu", "--gen", "4", "--prefill", "0", "--json"]) == 0
        return json.loads(capsys.readouterr().out)["dtype"]
    assert dtype("--model", path) == "q8-avx2"
    assert dtype("--model", path, "--quantize", "none") == dtype("--model", path, "--dtype", "float32") == "float32"
    assert dtype("--shape", "tiny") == "float32"


def test_bench_bad_arguments(capsys):
    assert main(["bench", "--shape", "7B", "--gen", "lots", "--device", "cpu"]) == 2
    assert "--gen must be" in capsys.readouterr().err
    assert main(["bench", "--shape", "tiny", "--quantize", "gguf", "--device", "cpu"]) == 2
    assert "--quantize gguf takes a model converted from a GGUF file" in capsys.readouterr().err


def test_bench_serve_json(v1_chat_dir):
    """(With the decode steps run one ahead, the GPU's default: QWENLM_PIPELINE=1.)"""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "qwenlm", "bench", "-m", v1_chat_dir, "--serve", "1,10",
                        "--serve-tokens", "6", "--prompt-len", "5", "--json"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "QWENLM_PIPELINE": "1"})
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["serve"]
    assert [x["concurrency"] for x in rows] == [1, 10]
    assert [x["tokens"] for x in rows] == [6, 60]  # ignore_eos: every request gives all its tokens
    assert [x["solo_requests"] for x in rows] == [1, 8]  # one at a time: at most 8 of them
    assert [x["solo_tokens"] for x in rows] == [6, 48]
    # each one run ahead; at most 5 decode steps a request (the first token is the prompt read's), and
    # 1 for the level's warm-up request (2 tokens)
    assert [x["engine_steps"] for x in rows] == [x["engine_steps_ahead"] for x in rows]
    assert rows[0]["engine_steps"] == 1 + 5 + 5  # (one at a time: nothing shared)
    assert 1 + 5 * 8 < rows[1]["engine_steps"] <= 1 + 5 * (10 + 8)
    if sys.platform.startswith("linux"):  # each thread's CPU clock: both threads did work for every token
        for x in rows:
            assert 0 < x["http_server_cpu_us_per_token"] < 1e6 and 0 < x["engine_cpu_us_per_token"] < 1e6
    # the first of 6 tokens arrives before the last (the clients run in a process of their own)
    assert all(x["tokens_per_s"] > 0 and 0 < x["ttft_p50_s"] < x["latency_p50_s"] for x in rows)


def test_bench_serve_turns_json(v1_chat_dir, capsys):
    """Conversations of 3 turns, served with the prefix cache and without: each turn's prompt grows by
    a reply's worth and a message; with the cache each next turn reuses its last prompt, without it
    nothing; every reply has all its tokens."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "qwenlm", "bench", "-m", v1_chat_dir, "--serve", "2",
                        "--serve-turns", "3", "--serve-tokens", "4", "--prompt-len", "40", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["serve_turns"]
    assert [(x["conversations"], x["prefix_cache"]) for x in rows] == [(2, True), (2, False)]
    for x in rows:
        assert [t["prompt_tokens"] for t in x["by_turn"]] == [40, 84, 128]
        assert x["tokens"] == 2 * 3 * 4 and x["tokens_per_s"] > 0
        assert all(0 < t["ttft_p50_s"] <= t["ttft_p90_s"] for t in x["by_turn"])
    assert [x["prompt_tokens_reused"] for x in rows] == [2 * (40 + 84), 0]
    assert main(["bench", "-m", v1_chat_dir, "--serve", "2", "--serve-turns", "1"]) == 2
    assert "--serve-turns must be at least 2" in capsys.readouterr().err


def test_bench_kv_table(v1_chat_dir, capsys):
    """Both caches per cell, sizes following each layout, peaks measured (CPU: the process's resident
    high-water mark, which holds the cache). The peak saving itself is measured on the real model in
    BENCHMARKS.md: on a 2-layer model the per-op path's one-layer dequantized copy is half the cache."""
    assert main(["bench", "-m", v1_chat_dir, "--device", "cpu", "--dtype", "float32", "--kv-table",
                 "--kv-batches", "1,64", "--kv-lengths", "4096", "--kv-table-length", "2048", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["kv_table"]
    assert [(r["batch"], r["length"]) for r in rows] == [(1, 2048), (64, 2048), (1, 4096)]
    from qwenlm import load_model

    c = load_model(v1_chat_dir, "float32", "cpu").config
    for r in rows:
        tokens = r["batch"] * r["length"]
        assert r["float"]["kv_cache_bytes"] == 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4 * tokens
        assert r["int8"]["kv_cache_bytes"] == 2 * c.num_layers * c.num_kv_heads * (c.head_dim + 4) * tokens
        assert r["float"]["kv_cache"] == "float" and r["int8"]["kv_cache"] == "int8"
        for kind in ("float", "int8"):
            peak = r[kind]["peak_memory_bytes"]
            assert peak is None or peak > r[kind]["kv_cache_bytes"]


def test_bench_decode_with_int8_kv(v1_chat_dir, capsys):
    assert main(["bench", "-m", v1_chat_dir, "--device", "cpu", "--dtype", "float32", "--gen", "8",
                 "--prefill", "0", "--kv-cache", "int8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kv_cache"] == "int8" and res["decode"][0]["tokens"] == 8


def test_bench_sampled_decode(v1_chat_dir, capsys):
    """--sample decodes with the checkpoint's own generation_config (what chat uses), and says so."""
    gen = json.load(open(f"{v1_chat_dir}/generation_config.json"))
    assert main(["bench", "-m", v1_chat_dir, "--device", "cpu", "--dtype", "float32", "--gen", "8",
                 "--prefill", "0", "--sample", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["decode"][0]
    assert d["tokens"] == 8
    for key in ("top_p", "top_k", "repetition_penalty", "temperature"):
        if key in gen:
            assert d["sampling"][key] == gen[key], key
    assert main(["bench", "-m", v1_chat_dir, "--device", "cpu", "--dtype", "float32", "--gen", "8",
                 "--prefill", "0", "--sample"]) == 0
    assert "decoding sampled with temperature" in capsys.readouterr().out


def test_bench_gptq_arguments(capsys, monkeypatch):
    monkeypatch.setenv("QWENLM_TRITON", "0")
    from qwenlm import kernels

    kernels.triton_available.cache_clear()
    try:
        assert main(["bench", "--quantize", "gptq4", "--device", "cpu"]) == 2
        assert "applies to --shape" in capsys.readouterr().err
        assert main(["bench", "--shape", "7B", "--quantize-head", "--device", "cpu"]) == 2
        assert "goes with --quantize gptq4" in capsys.readouterr().err
        # checked before any weights are built
        assert main(["bench", "--shape", "72B", "--quantize", "gptq8", "--device", "cpu"]) == 2
        assert "needs a CUDA GPU and triton" in capsys.readouterr().err
    finally:
        kernels.triton_available.cache_clear()


def test_gpu_session_script_commands_parse():
    """benchmarks/gpu_session.sh runs `qwen bench` on the GPU machine, whose time is scarce: every
    command line in it must at least be one that `qwen bench` accepts."""
    import os
    import re
    import shlex
    import subprocess

    from qwenlm.cli import build_parser

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_session.sh")
    text = re.sub(r"\\\n\s*", " ", open(path).read())  # continued lines joined, as bash reads them
    lines = [m.group(1) for m in re.finditer(r"^\s*(?:\w+=\S+ )*bench [\w.]+ (.*?)(?: ;;)?$", text, re.M)]
    assert len(lines) >= 14
    parser = build_parser()
    for line in lines:
        args = parser.parse_args(["bench", *shlex.split(line), "--json"])
        assert args.func.__module__ == "qwenlm.commands.bench", line
    # every step the script names is one it runs, and a wrong name stops it before it runs anything
    steps = re.search(r"case \"\$s\" in ([\w|]+)\)", text).group(1).split("|")
    for s in steps:
        assert re.search(rf"^\s+{s}\)", text, re.M), s
    done = subprocess.run(["bash", path, "tests", "nonsense"], capture_output=True, text=True,
                          env={**os.environ, "OUT": "/nonexistent/out"}, timeout=60)
    assert done.returncode == 2 and "unknown step nonsense" in done.stderr and not done.stdout


def test_bench_tiny_shape(capsys):
    """`--shape tiny` (what measures the overhead around the model) is a real Qwen v1 model: in fp32
    our engine and transformers give the same greedy tokens on its random weights."""
    pytest.importorskip("transformers")
    assert main(["bench", "--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--gen", "24",
                 "--prefill", "32", "--compare", "hf", "--hf-tokens", "24", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["decode"][0]["tokens"] == 24 and res["hf"]["agree_tokens"] == 24


def test_profile_step_script_dry_run(tmp_path):
    """benchmarks/profile_step.py (the GPU session's `profile` step) on the CPU: the step's time and
    its operators by self time, which add up to what the profiler saw."""
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "profile_step.py")
    out = subprocess.run([sys.executable, script, "--shape", "tiny", "--rows", "4", "--context", "16", "--steps",
                          "3", "--top", "500", "--json", str(tmp_path / "p.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tiny, 4 rows at ~16 tokens, cpu" in out.stdout
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["rows"] == 4 and res["step_ms"] > 0 and res["kernels"]
    assert any("mm" in k["name"] for k in res["kernels"])
    assert sum(k["us_per_step"] for k in res["kernels"]) == pytest.approx(res["profiled_us_per_step"], rel=1e-6)


def test_gpu_results_picks_the_setting_with_least_total_time(capsys, tmp_path):
    """benchmarks/gpu_results.py (reads a GPU session's files): of the settings timed on every case, the
    least total time wins, not the best single case; a setting missing a case is not a candidate; and
    the stored H100 run of 2026-11-24 reads back with its numbers against the targets."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import gpu_results

    def row(case, cfg, us, default=False):
        return {"case": case, "config": cfg, "us": us, "default": default}

    rows = [row(1, {"a": 1}, 10.0, True), row(2, {"a": 1}, 10.0, True),
            row(1, {"a": 2}, 4.0), row(2, {"a": 2}, 17.0),  # best on case 1, worst in total
            row(1, {"a": 3}, 9.0), row(2, {"a": 3}, 9.0),
            row(1, {"a": 4}, 1.0)]  # case 2 not timed (failed)
    pick = gpu_results.best_setting(rows, lambda r: r["case"], {1, 2})
    assert pick["best"] == {"a": 3} and pick["best_total"] == 18.0
    assert pick["default"] == {"a": 1} and pick["default_total"] == 20.0
    assert gpu_results.best_setting(rows, lambda r: r["case"], {3}) is None

    stored = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "h100_2026-11-24")
    assert gpu_results.main([stored]) == 0
    out = capsys.readouterr().out
    with open(os.path.join(stored, "bench_7b.json")) as f:
        tok = json.load(f)["decode"][0]["tokens_per_s"]
    assert f"7B bf16 batch-1 tok/s: {tok:.2f} (target >= 175) NOT met" in out
    assert "serve_7b: 64 streams 3623.9 tok/s" in out and "7B Int4 (head 8-bit) / bf16: 0.30" in out
    assert gpu_results.main([os.path.join(stored, "nonexistent")]) == 2

    # decode_ab.py's file: its side-by-side numbers take the place of the per-process ones
    def ab_row(variant, tps, vs, gib, **kw):
        return {"variant": variant, "about": "...", "tokens_per_s": tps, "rounds": [tps], "vs_base": vs,
                "weight_gib": gib, **kw}

    d = tmp_path / "run"
    d.mkdir()
    (d / "decode_ab_7b.json").write_text(json.dumps({"shape": "7B", "tokens": 2048, "stopped": None, "summary": [
        ab_row("base", 180.0, 1.0, 14.38, roofline_fraction=0.8), ab_row("gemv", 171.0, 0.95, 14.38,
                                                                         greedy_equal=["base", 40]),
        ab_row("gptq4h8", 369.0, 2.05, 5.2)]}))
    (d / "gptq_bf16.json").write_text(json.dumps({"dtype": "bfloat16", "weight_bytes": 1, "kv_cache": "float",
                                                  "decode": [{"tokens": 2048, "tokens_per_s": 100.0,
                                                              "peak_memory_bytes": 1}]}))
    (d / "gptq_int4_head8.json").write_text((d / "gptq_bf16.json").read_text().replace("100.0", "50.0"))
    assert gpu_results.main([str(d)]) == 0
    out = capsys.readouterr().out
    assert out.count("7B Int4 (head 8-bit) / bf16") == 1  # the side-by-side ratio, not 50/100 from two processes
    assert "gemv: 171.0 tok/s, 0.950x base, weights 14.38 GiB; greedy = base's for 40" in out
    assert "7B bf16 batch-1 tok/s: 180.00 (target >= 175) met" in out
    assert "7B Int4 (head 8-bit) / bf16: 2.05 (target >= 2.0) met" in out
    assert "7B Int4 (head 8-bit) weights GiB: 5.20 (target <= 5.0) NOT met" in out


def test_decode_ab_times_each_variant_under_its_own_settings(tmp_path, monkeypatch, capsys):
    """benchmarks/decode_ab.py (the GPU session's `ab` step: every variant in one process) on the CPU,
    kernels interpreted: each variant's engine runs what the variant names and nothing of the one before
    (the float one-row kernel only in `gemv`, the unfused rotary only in `norotary`, the 8-bit cache only
    in `kv8`), variants on the same weights give the same greedy tokens, and a run stopped part way
    writes what it timed."""
    import os
    import signal
    import sys

    import torch

    pytest.importorskip("triton")
    if torch.cuda.is_available():  # Triton's interpreter is on only where no GPU is (conftest.py)
        pytest.skip("checks its wiring on the CPU; on a GPU the script itself runs (gpu_session.sh ab)")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import decode_ab

    from qwenlm import kernels
    from qwenlm.kernels import gemv as gemv_module
    from qwenlm.kernels import gptq as gptq_module

    monkeypatch.setenv("QWENLM_TRITON", "interpret")
    monkeypatch.setenv("QWENLM_FUSE_ROTARY", "1")  # (the default: set back after `norotary`)
    kernels.triton_available.cache_clear()
    monkeypatch.setitem(gemv_module.GEMV, "programs", 1)  # the interpreter runs each program in Python
    monkeypatch.setitem(gemv_module.GEMV, "max_block_n", 64)
    monkeypatch.setitem(gptq_module.GEMV, "min_k_blocks", 1)  # K splits even on the tiny shape's layers
    reduces, running = [], [None]  # the variant running at each launch of the second ("reduce") kernel
    real, real_time = gptq_module._gptq_reduce, decode_ab.Run.time_one
    monkeypatch.setattr(gptq_module, "_gptq_reduce", type("Spy", (), {
        "__getitem__": lambda self, grid: (reduces.append(running[0]), real[grid])[1]})())

    def time_one(self, name, v):
        running[0] = name
        return real_time(self, name, v)

    monkeypatch.setattr(decode_ab.Run, "time_one", time_one)
    out = tmp_path / "ab.json"
    names = ["base", "gemv", "norotary", "kv8"]
    try:
        assert decode_ab.main(["--shape", "tiny", "--device", "cpu", "--tokens", "4", "--rounds", "2",
                               "--variants", ",".join(names), "--json", str(out)]) == 0
        rows = {r["variant"]: r for r in json.loads(out.read_text())["summary"]}
        # the GPTQ kernel is slow in the interpreter: two tokens, with the float baseline first;
        # a variant that fails (here: its weights cannot be made) is reported, and the others still run
        from qwenlm.commands import bench as bench_command

        real_gptq = bench_command._random_gptq

        attempts = []

        def gptq_or_fail(model, bits, head, notes):
            if bits == 8:
                attempts.append(bits)
                raise RuntimeError("no 8-bit kernel today")
            return real_gptq(model, bits, head, notes)

        monkeypatch.setattr(bench_command, "_random_gptq", gptq_or_fail)
        assert decode_ab.main(["--shape", "tiny", "--device", "cpu", "--tokens", "2", "--rounds", "2",
                               "--variants", "base,gptq8,gptq4h8,gptq4h8-fixup", "--json", str(out)]) == 1
        assert attempts == [8]  # not tried again in the second round
    finally:
        kernels.triton_available.cache_clear()
    assert os.environ.get("QWENLM_GEMV") is None and os.environ["QWENLM_FUSE_ROTARY"] == "1"
    assert gptq_module.GEMV["split"] == "reduce" and set(reduces) == {"gptq4h8"}  # none under "fixup"
    res = json.loads(out.read_text())
    gptq = {r["variant"]: r for r in res["summary"]}
    assert res["failed"] == {"gptq8": "RuntimeError: no 8-bit kernel today"}
    assert list(rows) == names and list(gptq) == ["base", "gptq4h8", "gptq4h8-fixup"] and res["stopped"] is None
    assert all(len(r["rounds"]) == 2 and r["tokens_per_s"] > 0 for r in rows.values())
    assert rows["gemv"]["gemv_layers"] > 0
    assert all(rows[n]["gemv_layers"] == 0 for n in names if n != "gemv")  # the class set back after gemv
    assert [n for n in rows if not rows[n]["fused_rotary"]] == ["norotary"]
    assert [n for n in rows if rows[n]["kv_int8"]] == ["kv8"]
    assert all(r["kernel_attention"] for r in rows.values())
    for n in ("gemv", "norotary", "kv8"):
        assert rows[n]["greedy_equal"][0] == "base"
    assert rows["gemv"]["greedy_equal"][1] == 4 and rows["norotary"]["greedy_equal"][1] == 4
    assert gptq["gptq4h8"]["weight_gib"] < gptq["base"]["weight_gib"] / 3 and gptq["gptq4h8"]["vs_base"] > 0
    assert "greedy_equal" not in gptq["gptq4h8"]  # other weights than base's: nothing to compare
    assert gptq["gptq4h8-fixup"]["greedy_equal"] == ["gptq4h8", 2]
    printed = capsys.readouterr().out
    assert "gptq8 failed: RuntimeError: no 8-bit kernel today" in printed

    # stopped after two timings: both written, and the exit status says so
    done = []

    def stopping(self, name, v):
        if len(done) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        done.append(name)
        return real_time(self, name, v)

    monkeypatch.setattr(decode_ab.Run, "time_one", stopping)
    try:
        assert decode_ab.main(["--shape", "tiny", "--device", "cpu", "--tokens", "2", "--variants",
                               "base,norotary,kv8", "--json", str(out)]) == 1
    finally:
        kernels.triton_available.cache_clear()
    res = json.loads(out.read_text())
    assert res["stopped"] == "SIGTERM" and [r["variant"] for r in res["summary"]] == ["base", "norotary"]
    with pytest.raises(SystemExit):
        decode_ab.main(["--variants", "base,nonsense"])
    assert "unknown variant(s) nonsense" in capsys.readouterr().err
