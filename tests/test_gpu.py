"""CUDA: bf16 on the GPU against the fp32 CPU reference (top-k agreement at the first greedy
divergence), padded batches and the auto dtype. Skipped without CUDA."""

import pytest
import torch

from helpers import tiny_hf_qwen2, v1_config, v1_state_dict, write_checkpoint
from qwenlm import GenerationConfig, load_model
from qwenlm.generation import generate

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GREEDY = GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=24, eos_token_id=None,
                          pad_token_id=0)


def _checkpoints(tmp_path):
    cfg = v1_config(seq_length=16, hidden=128, heads=4, layers=3)
    v1 = write_checkpoint(str(tmp_path / "v1"), cfg, v1_state_dict(cfg, seed=2, std=0.08))
    q2 = tiny_hf_qwen2(str(tmp_path / "q2"), hidden=128, heads=4, kv_heads=2, layers=3)
    return [v1, q2]


def test_auto_dtype_on_cuda(tmp_path):
    for path in _checkpoints(tmp_path):
        m = load_model(path, device="auto")
        assert m.device.type == "cuda" and m.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported()
                                                       else torch.float16)


def test_bf16_gpu_agrees_with_fp32_cpu(tmp_path):
    for path in _checkpoints(tmp_path):
        cpu = load_model(path, dtype="float32", device="cpu")
        gpu = load_model(path, dtype="bfloat16", device="cuda")
        prompt = torch.randint(0, 1000, (20,), generator=torch.Generator().manual_seed(1)).tolist()
        ref = generate(cpu, [prompt], GREEDY)[0]
        got = generate(gpu, [prompt], GREEDY)[0]
        n = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
        if n is None:
            continue
        logits = gpu(torch.tensor([prompt + ref[:n]], device="cuda")).logits[0, -1].float()
        assert ref[n] in torch.topk(logits, 5).indices.tolist()


def test_padded_batch_on_cuda(tmp_path):
    path = _checkpoints(tmp_path)[0]
    gpu = load_model(path, dtype="float32", device="cuda")
    prompts = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 21)]
    assert generate(gpu, prompts, GREEDY) == [generate(gpu, [p], GREEDY)[0] for p in prompts]


def test_cuda_graph_engine_equals_eager_and_reference(tmp_path):
    from qwenlm.engine import Engine

    for path in _checkpoints(tmp_path):
        m = load_model(path, dtype="float32", device="cuda")
        prompts = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
                   for n in (2, 9, 30)]
        cfg = GREEDY.update(max_new_tokens=40)
        graphs = Engine(m, cuda_graphs=True, bucket=16).generate(prompts, cfg)
        assert graphs == Engine(m, cuda_graphs=False, bucket=16).generate(prompts, cfg)
        assert graphs == generate(m, prompts, cfg)
        sampled = GREEDY.update(do_sample=True, top_p=0.9, temperature=0.8, seed=3, max_new_tokens=40)
        eng = Engine(m, cuda_graphs=True, bucket=16)
        assert eng.generate(prompts, sampled) == generate(m, prompts, sampled)
        other = [p[::-1] for p in prompts]  # same shapes: replays the graphs captured above
        assert eng.generate(other, cfg) == generate(m, other, cfg)


def test_continuous_batching_on_cuda_fp32(tmp_path):
    """The serving engine on CUDA (fp32, so token-exact), with and without CUDA graphs: staggered
    sequences get their solo tokens."""
    from qwenlm.engine.batch import BatchEngine, Sequence
    from qwenlm.generation import StopChecker

    for path, graphs in [(p, g) for p in _checkpoints(tmp_path) for g in (True, False)]:
        model = load_model(path, dtype="float32", device="cuda")
        eng = BatchEngine(model, max_num_seqs=3, max_model_len=128, cuda_graphs=graphs, bucket=16)
        assert eng.cuda_graphs == graphs
        prompts = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
                   for n in (5, 21, 9, 30)]
        outs = [[] for _ in prompts]
        seqs = [Sequence(p, GREEDY, StopChecker(GREEDY), emit=lambda t, r, o=o: t is not None and o.append(t))
                for p, o in zip(prompts, outs)]
        with torch.inference_mode():
            eng.step(seqs[:2])
            eng.step(seqs[2:3])
            while eng.active:
                eng.step([seqs[3]] if len(eng.active) < 3 and seqs[3].row < 0 and not seqs[3].generated else [])
        for p, o in zip(prompts, outs):
            assert o == generate(model, [p], GREEDY)[0]
        if graphs:  # one graph per (rows, slot bucket, LogN) shape met, replayed for the other steps
            assert 1 < eng.stats["graphs"] < eng.stats["steps"]


def test_sampler_on_cuda_keeps_the_reference_distribution():
    """The GPU sampler (full sort for top-p, no host waits) keeps the reference filters' tokens and
    probabilities, and the engines fuse the projections there by default."""
    from qwenlm.generation.sampling import token_distribution, top_k_filter, top_p_filter

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 151936, generator=g) * 3
    for top_k, top_p in ((0, 0.8), (20, 0.8), (40, 1.0), (0, 1.0)):
        cfg = GenerationConfig(do_sample=True, temperature=0.7, top_k=top_k, top_p=top_p)
        ids, probs = token_distribution(logits.cuda(), cfg)
        full = probs if ids is None else torch.zeros_like(logits.cuda()).scatter_(1, ids, probs)
        want = top_p_filter(top_k_filter(logits / 0.7, top_k), top_p).softmax(-1)
        torch.testing.assert_close(full.cpu(), want, rtol=1e-4, atol=1e-6)


def test_engines_fuse_projections_on_cuda(tmp_path):
    from qwenlm.engine import Engine

    for path in _checkpoints(tmp_path):
        m = load_model(path, device="cuda", dtype="float32")
        prompts = [[5, 9, 11, 3], [7, 2]]
        want = generate(m, prompts, GREEDY)  # before fusing: the separate layers
        eng = Engine(m)
        assert m.blocks[0].mlp.__dict__["_fused"].intact()
        assert eng.generate(prompts, GREEDY) == want


def test_residual_adds_fused_into_norms_on_cuda(tmp_path, monkeypatch):
    """On CUDA the blocks' residual adds run inside the next norm's compiled kernel by default: fp32
    logits as the unfused blocks give, and the same greedy tokens through the engine."""
    from qwenlm.engine import Engine
    from qwenlm.models import layers

    for path in _checkpoints(tmp_path):
        m = load_model(path, device="cuda", dtype="float32")
        ids = torch.tensor([[5, 9, 11, 3, 8, 1]], device="cuda")
        prompts = [[5, 9, 11, 3], [7, 2]]
        monkeypatch.setenv("QWENLM_FUSE_NORM", "0")
        with torch.inference_mode():
            want = m(ids).logits
        want_tokens = generate(m, prompts, GREEDY)
        monkeypatch.delenv("QWENLM_FUSE_NORM")
        assert layers.residual_fusion(ids.float())
        with torch.inference_mode():
            torch.testing.assert_close(m(ids).logits, want, rtol=1e-4, atol=1e-4)
        assert Engine(m).generate(prompts, GREEDY) == want_tokens


def _served_like_the_reference(eng, model, prompts, cfg) -> list[list[int]]:
    """`prompts` submitted together to the batch engine `eng` and run to the end: each one's tokens
    are the reference loop's for it alone. Returns them."""
    from qwenlm.engine.batch import Sequence
    from qwenlm.generation import StopChecker

    outs = [[] for _ in prompts]
    seqs = [Sequence(p, cfg, StopChecker(cfg), emit=lambda t, r, o=o: t is not None and o.append(t))
            for p, o in zip(prompts, outs)]
    with torch.inference_mode():
        eng.step(seqs)
        while not eng.idle:
            eng.step(eng.take_waiting())
    for p, o in zip(prompts, outs):
        assert o == generate(model, [p], cfg)[0]
    return outs


def _next_turns(model, **engine_kw) -> None:
    """Two conversations, then three unrelated prompts (a parked row becomes a padding row), then
    both next turns together: every request gets the reference's tokens, the next turns from their
    parked rows. (Its logic is checked on CPU by test_batch_engine's GPU-like tests.)"""
    from qwenlm.engine.batch import BatchEngine

    eng = BatchEngine(model, max_num_seqs=4, max_model_len=128, bucket=16, **engine_kw)
    assert eng.prefix_cache and eng.batch_prefill
    eng.prefix_min = 4
    g = torch.Generator().manual_seed(5)

    def run(prompts, cfg):
        return _served_like_the_reference(eng, model, prompts, cfg)

    first = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (20, 22)]
    replies = run(first, GREEDY.update(max_new_tokens=4))
    run([[999] + torch.randint(0, 1000, (n,), generator=g).tolist() for n in (6, 7, 9)], GREEDY)
    reused = eng.stats["prompt_tokens_reused"]
    run([p + r + [7, 8, 9] for p, r in zip(first, replies)], GREEDY)
    assert eng.stats["prompt_tokens_reused"] > reused


def test_prefix_cache_on_cuda_with_graphs(tmp_path):
    """The serving engine's GPU defaults (CUDA graphs, prompts read together) with the prefix cache."""
    for path in _checkpoints(tmp_path):
        model = load_model(path, dtype="float32", device="cuda")
        _next_turns(model)


def test_logprobs_on_cuda_with_graphs(tmp_path):
    """Log-probabilities of prompt and generated tokens from the GPU defaults' steps (CUDA graphs,
    prompts read together), fp32, against the reference forward (tests/test_logprobs.py's check)."""
    from helpers import greedy_config, sampled_config
    from qwenlm.engine.batch import BatchEngine
    from test_logprobs import _check, _run

    for path in _checkpoints(tmp_path):
        model = load_model(path, dtype="float32", device="cuda")
        eng = BatchEngine(model, max_num_seqs=4, max_model_len=128, bucket=16)
        assert eng.cuda_graphs
        prompts = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
                   for n in (7, 19, 12)]
        jobs = [(prompts[0], greedy_config(9), 3, 2), (prompts[1], sampled_config(6, seed=1), 1, None),
                (prompts[2], greedy_config(4), 0, 4)]  # 12 + 4 tokens: NTK stays off (seq_length 16)
        for seq, (_, _, k, pk) in zip(_run(eng, jobs), jobs):
            _check(model, seq, k, pk)


def test_warm_up_on_cuda_captures_each_row_count_before_the_first_request(tmp_path):
    """After the server's warm-up, requests within the first slot bucket replay graphs captured
    then (none is captured during them) and get the reference's tokens."""
    from qwenlm.engine.batch import BatchEngine

    cfg = GREEDY.update(max_new_tokens=4)
    for path in _checkpoints(tmp_path):
        model = load_model(path, dtype="float32", device="cuda")
        eng = BatchEngine(model, max_num_seqs=4, max_model_len=128, bucket=16)
        eng.warm_up()
        captured = eng.stats["graphs"]
        assert captured >= 3  # 1, 2 and 4 rows
        _served_like_the_reference(eng, model, [[5, 9, 11, 3, 8], [7, 2, 6], [4, 4, 1, 9, 2, 7]], cfg)
        assert eng.stats["graphs"] == captured


def test_decode_steps_run_ahead_on_cuda_without_waiting_for_the_device(tmp_path):
    """The serving engine's CUDA default runs each decode step one ahead of the host's work on the
    tokens: a steady step (no request joining or leaving before it) queues its work without a host
    synchronization (torch's sync debug mode raises on one, such as a plain copy from a Python list),
    and every request gets the tokens the engine gives without running ahead (greedy, penalised and
    sampled rows; rows ending by an end token, their budget and the context; float and 8-bit caches)."""
    from qwenlm.engine.batch import BatchEngine, Sequence
    from qwenlm.generation import StopChecker

    sampled = GenerationConfig(do_sample=True, temperature=0.8, top_p=0.9, top_k=40, repetition_penalty=1.1,
                               max_new_tokens=30, seed=3, eos_token_id=None, pad_token_id=0)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 9, 12, 7)]
    for path, kv_cache in [(p, kv) for p in _checkpoints(tmp_path) for kv in ("float", "int8")]:
        model = load_model(path, dtype="float32", device="cuda", kv_cache=kv_cache)
        solo = generate(model, [prompts[0]], GREEDY)[0]
        cfgs = [GREEDY.update(eos_token_id=next(t for t in solo[6:] if t not in solo[:6])),
                GREEDY.update(repetition_penalty=1.2, max_new_tokens=17), sampled, GREEDY.update(max_new_tokens=60)]

        def run(eng, checked: bool):
            outs = [{"tokens": [], "reason": None} for _ in prompts]

            def emit(t, r, o):
                if t is not None:
                    o["tokens"].append(t)
                o["reason"] = r or o["reason"]
            seqs = [Sequence(p, c, StopChecker(c), emit=lambda t, r, o=o: emit(t, r, o))
                    for p, c, o in zip(prompts, cfgs, outs)]
            steady = 0
            with torch.inference_mode():
                eng.step(seqs)
                while not eng.idle:
                    if checked and eng._ahead is not None:
                        torch.cuda.set_sync_debug_mode("error")
                        try:
                            eng.step()
                        finally:
                            torch.cuda.set_sync_debug_mode(0)
                        steady += 1
                    else:
                        eng.step()
            return outs, steady

        ahead = BatchEngine(model, max_num_seqs=4, max_model_len=64, bucket=16)
        assert ahead.pipeline and ahead.cuda_graphs
        first, _ = run(ahead, False)  # (every graph captured: capturing one waits for the device)
        again, steady = run(ahead, True)
        plain, _ = run(BatchEngine(model, max_num_seqs=4, max_model_len=64, bucket=16, pipeline=False), False)
        assert first == again == plain
        assert [o["reason"] for o in plain] == ["stop", "length", "length", "length"]
        assert steady > 20 and ahead._ahead is None
