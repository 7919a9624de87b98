"""Randomized schedules against the reference loop, on fp32 models (where the paths compute alike):
- the serving engine: conversations whose next turns arrive at random steps, random batch sizes,
  prefill chunks and prefix-cache thresholds, aborts; every sequence that finishes gets the
  reference's tokens for its prompt;
- the chat engine that keeps its last cache (`reuse_prefix`): random next turns, regenerations,
  histories cut short or replaced, batches, bucket and chunk sizes.
A fixed seed per case keeps it reproducible; a failure prints the case to replay."""

import random

import pytest
import torch

from helpers import greedy_config, sampled_config, tiny_model
from qwenlm.engine import Engine
from qwenlm.engine.batch import BatchEngine, Sequence
from qwenlm.generation import StopChecker, generate

GREEDY = greedy_config(8)
SAMPLED = sampled_config(8, seed=0)


@pytest.fixture(scope="module", params=["v1", "qwen2"])
def model(request, tmp_path_factory):
    return tiny_model(request.param, str(tmp_path_factory.mktemp(request.param)))


def _schedule(model, rng: random.Random) -> tuple[dict, list[dict]]:
    """Run one random schedule; (the engine's settings, the records of its requests)."""
    settings = {"max_num_seqs": rng.randint(1, 5), "prefill_chunk": rng.choice([0, 4, 8, 16]),
                "prefix_min": rng.choice([1, 4, 8]), "gpu_like": rng.random() < 0.5}
    # gpu_like: the GPU's way on this CPU (rows padded to fixed shapes, prompts and rests read together)
    eng = BatchEngine(model, max_num_seqs=settings["max_num_seqs"], max_model_len=96, prefix_cache=True,
                      prefill_chunk=settings["prefill_chunk"], fixed_shapes=settings["gpu_like"],
                      batch_prefill=settings["gpu_like"], bucket=16)
    eng.prefix_min = settings["prefix_min"]
    history = [[rng.randrange(1000) for _ in range(rng.randint(1, 20))] for _ in range(rng.randint(1, 4))]
    arrivals = sorted((rng.randint(0, 30), rng.randrange(len(history))) for _ in range(rng.randint(3, 10)))
    records, step = [], 0
    while arrivals or not eng.idle:
        while arrivals and arrivals[0][0] <= step:
            _, c = arrivals.pop(0)
            base = history[c] if len(history[c]) <= 60 else history[c][:rng.randint(1, 30)]
            prompt = (base + [rng.randrange(1000) for _ in range(rng.randint(0, 12))]) or [5]
            cfg = GREEDY if rng.random() < 0.6 else SAMPLED.update(seed=rng.randint(0, 99))
            rec = {"conversation": c, "prompt": prompt, "cfg": cfg.update(max_new_tokens=rng.randint(1, 8)),
                   "tokens": [], "reason": None}

            def emit(tok, reason, rec=rec):
                if tok is not None:
                    rec["tokens"].append(tok)
                if reason is not None:
                    rec["reason"] = reason
                    if reason in ("stop", "length"):  # the conversation's next turn continues this one
                        history[rec["conversation"]] = rec["prompt"] + rec["tokens"]
            rec["seq"] = Sequence(prompt=prompt, cfg=rec["cfg"], stop=StopChecker(rec["cfg"]), emit=emit)
            records.append(rec)
            eng.submit(rec["seq"])
        running = [r["seq"] for r in records if r["reason"] is None]
        if running and rng.random() < 0.04:
            eng.abort(rng.choice(running))
        with torch.inference_mode():
            eng.step(eng.take_waiting())
        step += 1
        assert step < 2000, "the engine stopped making progress"
    settings["reused"] = eng.stats["prompt_tokens_reused"]
    return settings, records


@pytest.mark.parametrize("seed", range(10))
def test_random_schedules_give_every_request_its_solo_tokens(model, seed):
    settings, records = _schedule(model, random.Random(seed))
    for r in records:
        assert r["reason"] in ("length", "abort")
        if r["reason"] == "abort":
            continue
        assert r["tokens"] == generate(model, [r["prompt"]], r["cfg"])[0], (
            f"seed {seed}, {settings}: a prompt of {len(r['prompt'])} tokens, {r['seq'].reused} of them reused")


def test_the_random_schedules_exercise_the_prefix_cache_and_chunks(model):
    """The seeds above are not idle: together they reuse parked rows, read prompts in chunks, abort."""
    seen = [_schedule(model, random.Random(seed)) for seed in range(10)]
    assert sum(s["reused"] for s, _ in seen) > 100
    assert any(s["prefill_chunk"] and s["reused"] for s, _ in seen)
    assert any(s["gpu_like"] and s["reused"] for s, _ in seen) and any(not s["gpu_like"] for s, _ in seen)
    assert any(r["reason"] == "abort" for _, recs in seen for r in recs)


def _turns(model, rng: random.Random) -> tuple[dict, list[tuple]]:
    """One chat engine, a random conversation; (its settings, (prompts, settings, tokens) per turn)."""
    settings = {"bucket": rng.choice([8, 16, 256]), "prefill_chunk": rng.choice([None, 4, 8, 16])}
    eng = Engine(model, reuse_prefix=True, **settings)
    reused, real = [], eng._reusable  # (counted for the test below)
    eng._reusable = lambda prompts: reused.append(real(prompts)) or reused[-1]
    turns, last = [], None
    for _ in range(rng.randint(2, 8)):
        r = rng.random()
        if last is None or r < 0.15:  # a new conversation
            prompt = [rng.randrange(1000) for _ in range(rng.randint(1, 20))]
        elif r < 0.3:  # the history cut short (an edited message)
            prompt = last[:rng.randint(1, len(last))]
        elif r < 0.4:  # the same prompt again (regenerate)
            prompt = list(last)
        else:  # the next turn
            prompt = last + [rng.randrange(1000) for _ in range(rng.randint(1, 15))]
        prompt = prompt[:80]
        cfg = (GREEDY if rng.random() < 0.6 else SAMPLED.update(seed=rng.randint(0, 99))).update(
            max_new_tokens=rng.randint(1, 8))
        prompts = [prompt, prompt[:max(1, len(prompt) // 2)]] if rng.random() < 0.1 else [prompt]
        got = eng.generate(prompts, cfg)
        turns.append((prompts, cfg, got))
        last = prompt + got[0]
    settings["reused"] = sum(reused)
    return settings, turns


@pytest.mark.parametrize("seed", range(4))
def test_random_chat_turns_give_the_reference_tokens(model, seed):
    settings, turns = _turns(model, random.Random(seed))
    for i, (prompts, cfg, got) in enumerate(turns):
        assert got == generate(model, prompts, cfg), f"seed {seed}, {settings}: turn {i}"


def test_the_random_chat_turns_reuse_the_kept_cache(model):
    assert sum(_turns(model, random.Random(seed))[0]["reused"] for seed in range(4)) > 50
