"""Continuous batching against the reference loop: every sequence gets the tokens it gets alone,
whatever joins or leaves the batch around it (staggered arrivals, different lengths, stops, token
budgets, per-request sampling), on fp32 models (per-op path) and 4-bit models (fused CPU path)."""

import threading
import time

import pytest
import torch

from helpers import drain_batch_engine, greedy_config, random_prompts, sampled_config, tiny_model
from qwenlm.engine.batch import BadToken, BatchEngine, QueueFull, Sequence
from qwenlm.generation import StopChecker, generate
from qwenlm.quant import q4

GREEDY = greedy_config(12)
SAMPLED = sampled_config(12, seed=3)

KINDS = ["v1", "qwen2"] + (["qwen2-int4"] if {"avx2", "fma", "f16c"} <= q4._cpu_flags() else [])


@pytest.fixture(scope="module", params=KINDS)
def model(request, tmp_path_factory):
    kind, _, quant = request.param.partition("-")
    return tiny_model(kind, str(tmp_path_factory.mktemp(request.param)), quant or None)


def _seq(prompt, cfg, out):
    def emit(tok, reason):
        if tok is not None:
            out["tokens"].append(tok)
        if reason is not None:
            out["reason"] = reason
    return Sequence(prompt=prompt, cfg=cfg, stop=StopChecker(cfg), emit=emit)


def _run(eng, arrivals):
    """arrivals: {step index: [(prompt, cfg), ...]} (submitted; admitted as slots free up) -> outputs
    in arrival order."""
    outs, pending = [], dict(arrivals)
    step = 0
    while pending or not eng.idle:
        for prompt, cfg in pending.pop(step, []):
            out = {"tokens": [], "reason": None}
            outs.append(out)
            eng.submit(_seq(prompt, cfg, out))
        with torch.inference_mode():
            eng.step(eng.take_waiting())
        step += 1
    return outs


@pytest.mark.parametrize("cfg", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_each_sequence_gets_its_solo_tokens(model, cfg):
    prompts = random_prompts(5, 20, 9, 31, 3)
    budgets = [12, 4, 9, 12, 7]
    arrivals = {0: [(prompts[0], cfg.update(max_new_tokens=budgets[0])),
                    (prompts[1], cfg.update(max_new_tokens=budgets[1]))],
                2: [(prompts[2], cfg.update(max_new_tokens=budgets[2]))],
                3: [(prompts[3], cfg.update(max_new_tokens=budgets[3])),
                    (prompts[4], cfg.update(max_new_tokens=budgets[4]))]}
    eng = BatchEngine(model, max_num_seqs=3, max_model_len=64)  # 5 sequences, 3 rows: some wait
    outs = []
    # more arrivals than rows: queue them through the engine's own admission
    for step_new in [arrivals[0], arrivals[2], arrivals[3]]:
        for prompt, c in step_new:
            out = {"tokens": [], "reason": None}
            outs.append(out)
            eng.submit(_seq(prompt, c, out))
        for _ in range(2):
            with torch.inference_mode():
                eng.step(eng.take_waiting())
    while not eng.idle:
        with torch.inference_mode():
            eng.step(eng.take_waiting())
    for p, b, out in zip(prompts, budgets, outs):
        want = generate(model, [p], cfg.update(max_new_tokens=b))[0]
        assert out["tokens"] == want
        assert out["reason"] == "length"


def test_stop_token_and_context_limit(model):
    p = random_prompts(6)[0]
    solo = generate(model, [p], GREEDY)[0]
    stop_at = solo[4]
    cfg = GREEDY.update(eos_token_id=stop_at)
    outs = _run(BatchEngine(model, max_num_seqs=2, max_model_len=64), {0: [(p, cfg), (p, GREEDY)]})
    k = solo.index(stop_at)
    assert outs[0] == {"tokens": solo[:k + 1], "reason": "stop"}
    assert outs[1] == {"tokens": solo, "reason": "length"}
    # a context of 10 positions: 6 prompt tokens leave room for 4 new ones
    outs = _run(BatchEngine(model, max_num_seqs=1, max_model_len=10), {0: [(p, GREEDY)]})
    assert outs[0] == {"tokens": solo[:4], "reason": "length"}


def test_abort_frees_the_row_and_others_continue(model):
    p1, p2 = random_prompts(7, 13)
    eng = BatchEngine(model, max_num_seqs=2, max_model_len=64)
    o1, o2 = {"tokens": [], "reason": None}, {"tokens": [], "reason": None}
    s1, s2 = _seq(p1, GREEDY, o1), _seq(p2, GREEDY, o2)
    with torch.inference_mode():
        eng.step([s1, s2])
        eng.step()
        eng.abort(s1)
        eng.step()
        assert o1["reason"] == "abort" and len(eng.active) == 1 and s2.row == 0
        while eng.active:
            eng.step()
    assert o2["tokens"] == generate(model, [p2], GREEDY)[0]
    assert len(o1["tokens"]) == 3  # prefill + 2 decode steps, nothing after the abort


def test_queue_full_and_too_long_prompt(model):
    eng = BatchEngine(model, max_num_seqs=1, max_model_len=16, max_queue=2)
    out = {"tokens": [], "reason": None}
    for _ in range(2):
        eng.submit(_seq([1, 2], GREEDY, out))
    with pytest.raises(QueueFull):
        eng.submit(_seq([1, 2], GREEDY, out))
    with pytest.raises(ValueError, match="16 tokens"):
        eng.submit(_seq(list(range(16)), GREEDY, out))
    vocab = model.config.vocab_size
    for bad in (vocab, -1):  # no embedding: refused at the door, not a failed step for every row
        with pytest.raises(BadToken, match=f"token id {bad} is outside this model's vocabulary"):
            eng.submit(_seq([1, bad, 2], GREEDY, out))
    assert len(eng.waiting) == 2


@pytest.mark.parametrize("pipeline", [False, True], ids=["plain", "ahead"])
def test_threaded_loop_serves_concurrent_submissions(model, pipeline):
    eng = BatchEngine(model, max_num_seqs=4, max_model_len=64, pipeline=pipeline).start()
    try:
        prompts = random_prompts(*range(3, 13))
        outs, done = [], []
        for p in prompts:
            out = {"tokens": [], "reason": None}
            ev = threading.Event()
            outs.append(out)
            done.append(ev)

            def emit(tok, reason, out=out, ev=ev):
                if tok is not None:
                    out["tokens"].append(tok)
                if reason is not None:
                    out["reason"] = reason
                    ev.set()
            eng.submit(Sequence(prompt=p, cfg=GREEDY, stop=StopChecker(GREEDY), emit=emit))
        assert all(ev.wait(60) for ev in done)
    finally:
        eng.shutdown()
    for p, out in zip(prompts, outs):
        assert out["tokens"] == generate(model, [p], GREEDY)[0]


@pytest.mark.parametrize("kv_cache", ["float", "int8"])
def test_fixed_shape_steps_equal_the_reference(model, kv_cache):
    """The shapes a CUDA graph replays (rows padded to a power of two, slots to a bucket), run here
    without capturing: padding rows and bucket slots change nothing (graphs themselves: test_gpu.py)."""
    if q4.pack_blocks(model):
        pytest.skip("the fused 4-bit CPU step has no fixed-shape variant")
    prompts = random_prompts(5, 20, 9, 31)
    arrivals = {0: [(p, GREEDY) for p in prompts[:3]], 2: [(prompts[3], GREEDY)]}
    model.kv_cache = kv_cache
    try:
        eng = BatchEngine(model, max_num_seqs=4, max_model_len=64, fixed_shapes=True, bucket=16)
        assert eng.static_shapes and not eng.cuda_graphs
        outs = _run(eng, arrivals)
        want = [generate(model, [p], GREEDY)[0] for p in prompts]
    finally:
        model.kv_cache = "float"
    assert [o["tokens"] for o in outs] == want


@pytest.mark.parametrize("kv_cache", ["float", "int8"])
def test_prompts_prefilled_together_get_their_solo_tokens(model, kv_cache):
    """Several arrivals in one step share one right-padded prefill (the GPU default): each row still
    computes what it computes alone (its own positions, NTK alpha, key center; padding unseen), also
    when the token budget splits the arrivals into several prefills."""
    if q4.pack_blocks(model):
        pytest.skip("the fused 4-bit CPU path prefills one prompt at a time")
    prompts = random_prompts(5, 20, 9, 31, 3)  # v1: 20 and 31 tokens switch NTK and LogN on
    cfgs = [GREEDY, SAMPLED.update(seed=5), GREEDY.update(max_new_tokens=1), GREEDY, SAMPLED]
    model.kv_cache = kv_cache
    try:
        eng = BatchEngine(model, max_num_seqs=5, max_model_len=64, batch_prefill=True, max_prefill_tokens=100)
        outs = _run(eng, {0: list(zip(prompts[:4], cfgs[:4])), 1: [(prompts[4], cfgs[4])]})
        want = [generate(model, [p], c)[0] for p, c in zip(prompts, cfgs)]
    finally:
        model.kv_cache = "float"
    assert eng.stats["prefills"] == 3  # 5+20+9 padded to 3x20 = 60 tokens; 31 alone; then the late one
    assert [o["tokens"] for o in outs] == want
    assert outs[2]["reason"] == "length" and len(outs[2]["tokens"]) == 1  # finished at prefill, rows moved


def test_padded_prefill_keeps_padding_out_of_the_key_centers(model):
    if q4.pack_blocks(model):
        pytest.skip("the fused 4-bit CPU path prefills one prompt at a time")
    prompts = random_prompts(5, 20)
    model.kv_cache = "int8"
    try:
        centers = []
        for together in (True, False):
            eng = BatchEngine(model, max_num_seqs=2, max_model_len=64, batch_prefill=together)
            with torch.inference_mode():
                eng.step([_seq(p, GREEDY, {"tokens": [], "reason": None}) for p in prompts])
            assert eng.stats["prefills"] == (1 if together else 2)
            centers.append(eng.kv.k_center.clone())
    finally:
        model.kv_cache = "float"
    assert torch.allclose(centers[0], centers[1], atol=1e-5, rtol=1e-5)


def test_a_step_that_cannot_be_captured_runs_without_graphs(model, caplog):
    """Graph capture failing (here: no CUDA at all) costs one warning, not the requests."""
    if q4.pack_blocks(model):
        pytest.skip("the fused 4-bit CPU step is never captured")
    prompts = random_prompts(5, 9)
    eng = BatchEngine(model, max_num_seqs=2, max_model_len=64, cuda_graphs=True, bucket=16)
    assert eng.cuda_graphs and eng.static_shapes
    with caplog.at_level("WARNING", logger="qwenlm"):
        outs = _run(eng, {0: [(p, GREEDY) for p in prompts]})
    assert "CUDA graph capture failed" in caplog.text and not eng.cuda_graphs
    assert [o["tokens"] for o in outs] == [generate(model, [p], GREEDY)[0] for p in prompts]


def _penalised_greedy(model, prompt, n, presence, frequency, repetition):
    """Oracle for the penalties: the model's own forward with its KV cache, one token at a time;
    OpenAI's first (logit -= presence * [count > 0] + frequency * count, over the generated tokens),
    then the repetition penalty over prompt and generated tokens; then argmax."""
    out, cache, x = [], None, torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(n):
            res = model(x, past_key_values=cache, use_cache=True)
            cache, logits = res.past_key_values, res.logits[0, -1].float()
            for t in set(out):
                logits[t] -= presence + frequency * out.count(t)
            for t in set(prompt) | set(out):
                logits[t] = logits[t] * repetition if logits[t] < 0 else logits[t] / repetition
            out.append(int(logits.argmax()))
            x = torch.tensor([[out[-1]]])
    return out


def test_presence_and_frequency_penalties_apply_to_their_own_row(model):
    """Two greedy rows with the same sampling settings are chosen in one call: only the row that asks
    for OpenAI's penalties gets them."""
    prompt = random_prompts(6)[0]  # one prompt for both: a row given its neighbour's penalties shows at once
    plain = GREEDY.update(repetition_penalty=1.01)  # not plain greedy: both rows take the sampling call
    # negative presence (allowed: -2..2) pulls the text back to its own tokens, so it surely changes
    penalised = plain.update(presence_penalty=-2.0, frequency_penalty=0.5)
    eng = BatchEngine(model, max_num_seqs=2, max_model_len=64)
    outs = _run(eng, {0: [(prompt, penalised), (prompt, plain)]})
    want0 = _penalised_greedy(model, prompt, 12, -2.0, 0.5, 1.01)
    want1 = _penalised_greedy(model, prompt, 12, 0.0, 0.0, 1.01)
    assert want1 == generate(model, [prompt], plain)[0]
    assert want0 != want1  # the penalties change this text
    assert outs[0]["tokens"] == want0
    assert outs[1]["tokens"] == want1


def test_rows_with_different_settings_get_their_solo_tokens(model):
    """Greedy rows with and without a repetition penalty and sampled rows, in one batch, joining and
    leaving at different steps (rows move when one leaves): the penalised rows' records of the tokens
    they have seen must follow them."""
    prompts = random_prompts(5, 20, 9, 31, 3, 14)
    cfgs = [GREEDY.update(repetition_penalty=1.3, max_new_tokens=4), SAMPLED.update(max_new_tokens=12),
            GREEDY.update(max_new_tokens=7), GREEDY.update(repetition_penalty=1.3, max_new_tokens=12),
            SAMPLED.update(seed=11, max_new_tokens=3), GREEDY.update(repetition_penalty=1.2, max_new_tokens=10)]
    eng = BatchEngine(model, max_num_seqs=5, max_model_len=64)  # (at most 5 run at once below)
    outs = _run(eng, {0: [(prompts[0], cfgs[0]), (prompts[1], cfgs[1]), (prompts[2], cfgs[2])],
                      2: [(prompts[3], cfgs[3])], 5: [(prompts[4], cfgs[4]), (prompts[5], cfgs[5])]})
    for p, c, out in zip(prompts, cfgs, outs):
        assert out["tokens"] == generate(model, [p], c)[0]


def test_a_decode_step_issues_as_many_tensor_operations_for_many_rows_as_for_few(model):
    """On a GPU every tensor operation is a launch the step waits for: what the step does per row
    (recording each row's new token for the repetition penalty, say) must be one operation for all
    rows, not one per row."""
    from torch.profiler import ProfilerActivity, profile

    cfg = GREEDY.update(repetition_penalty=1.1, max_new_tokens=40)

    def ops(rows):
        eng = BatchEngine(model, max_num_seqs=rows, max_model_len=64)
        for p in random_prompts(*range(5, 5 + rows)):
            eng.submit(_seq(p, cfg, {"tokens": [], "reason": None}))
        with torch.inference_mode():
            eng.step([eng.waiting.popleft() for _ in range(rows)])
            eng.step([])
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                eng.step([])
        return sum(1 for e in prof.events() if e.name.startswith("aten::")
                   and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))

    assert ops(2) == ops(8)


# ---- prompts read in chunks between decode steps (the CPU default) --------------------------------

@pytest.mark.parametrize("cfg", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_long_prompts_read_in_chunks_get_their_solo_tokens(model, cfg):
    """Long prompts (over `prefill_chunk`) are read a chunk per step in the top row, one at a time,
    while short ones join and the running rows decode; then they move next to the running rows. Each
    still gets its solo tokens (v1: 30 and 41 tokens are past seq_length 16, NTK and LogN on)."""
    prompts = random_prompts(30, 5, 41, 9, 6, 17)
    budgets = [12, 10, 6, 12, 3, 8]
    cfgs = [cfg.update(max_new_tokens=b) for b in budgets]
    eng = BatchEngine(model, max_num_seqs=4, max_model_len=64, prefill_chunk=8)
    outs = _run(eng, {0: [(prompts[0], cfgs[0]), (prompts[1], cfgs[1]), (prompts[2], cfgs[2])],
                      1: [(prompts[3], cfgs[3]), (prompts[4], cfgs[4])], 9: [(prompts[5], cfgs[5])]})
    assert eng.stats["prompt_chunks"] == 4 + 6 + 2 + 3  # 30, 41, 9 and 17 tokens, 8 at a time
    for p, c, out in zip(prompts, cfgs, outs):
        assert out["tokens"] == generate(model, [p], c)[0]
        assert out["reason"] == "length"


def test_running_rows_decode_between_the_chunks_of_a_long_prompt(model):
    """What chunking is for: a stream that is running gets a token at every step while a long prompt
    is read, instead of waiting for the whole prompt."""
    short, long = random_prompts(5, 40)
    eng = BatchEngine(model, max_num_seqs=3, max_model_len=64, prefill_chunk=8)
    o_short, o_long = {"tokens": [], "reason": None}, {"tokens": [], "reason": None}
    s_long = _seq(long, GREEDY.update(max_new_tokens=3), o_long)
    with torch.inference_mode():
        eng.step([_seq(short, GREEDY.update(max_new_tokens=30), o_short)])
        eng.step([s_long])
        for i in range(1, 5):  # chunks 1-4 of 5: the long one waits in the top row, the short one decodes
            assert s_long.row == 2 and s_long.cached == 8 * i and not o_long["tokens"]
            assert len(o_short["tokens"]) == 2 + i  # (its first token at its prefill, one per step)
            eng.step()
        assert s_long.row == 1 and eng.active == [eng.active[0], s_long]  # read: moved down, joined
        assert len(o_long["tokens"]) == 2 and len(o_short["tokens"]) == 7
        while not eng.idle:
            eng.step()
    assert o_long["tokens"] == generate(model, [long], GREEDY.update(max_new_tokens=3))[0]
    assert o_short["tokens"] == generate(model, [short], GREEDY.update(max_new_tokens=30))[0]


def test_short_prompts_share_a_step_up_to_the_chunk_and_take_turns_with_a_long_one(model):
    prompts = random_prompts(20, 3, 4, 5, 6)  # one long, then 3+4 fit a chunk of 8, 5+6 do not
    eng = BatchEngine(model, max_num_seqs=5, max_model_len=64, prefill_chunk=8)
    seqs = [_seq(p, GREEDY, {"tokens": [], "reason": None}) for p in prompts]
    with torch.inference_mode():
        eng.step(seqs)  # the shorts go first: 3 + 4 tokens
        assert [s.row for s in eng.active] == [0, 1] and seqs[0].cached == 0
        eng.step()  # the long one's turn
        assert seqs[0].cached == 8 and len(eng.active) == 2
        eng.step()  # 5 (6 would pass the chunk)
        assert [s.prompt for s in eng.active] == prompts[1:4]
        eng.step()
        assert seqs[0].cached == 16
        eng.step()
        eng.step()
        assert [s.prompt for s in eng.active] == prompts[1:5] + prompts[:1]


def test_aborting_a_prompt_being_read_frees_its_slot(model):
    p_long, p_next, p_short = random_prompts(30, 26, 7)
    eng = BatchEngine(model, max_num_seqs=2, max_model_len=64, prefill_chunk=8)
    outs = [{"tokens": [], "reason": None} for _ in range(3)]
    s_long, s_next, s_short = (_seq(p, GREEDY, o) for p, o in zip((p_long, p_next, p_short), outs))
    for s in (s_long, s_next, s_short):
        eng.submit(s)
    with torch.inference_mode():
        eng.step(eng.take_waiting())  # two slots: the long one and the next; the short one waits
        assert s_long.cached == 8 and eng.waiting[0] is s_short
        eng.abort(s_long)
        eng.step(eng.take_waiting())  # the slot goes to the short one; the next long one starts over
        assert outs[0] == {"tokens": [], "reason": "abort"} and eng.stats["finished_abort"] == 1
        while not eng.idle:
            eng.step(eng.take_waiting())
    assert outs[1]["tokens"] == generate(model, [p_next], GREEDY)[0]
    assert outs[2]["tokens"] == generate(model, [p_short], GREEDY)[0]


def test_fixed_shape_steps_leave_the_prompt_being_read_alone(model):
    """Padding rows of a fixed-shape step (the top row among them, while a long prompt is read there)
    write only a slot that no sequence fills."""
    if q4.pack_blocks(model):
        pytest.skip("the fused 4-bit CPU step has no fixed-shape variant")
    prompts = random_prompts(5, 9, 6, 30)
    eng = BatchEngine(model, max_num_seqs=4, max_model_len=64, fixed_shapes=True, bucket=16, prefill_chunk=8)
    outs = _run(eng, {0: [(p, GREEDY) for p in prompts]})  # 3 rows decode (padded to 4) while 30 is read
    assert [o["tokens"] for o in outs] == [generate(model, [p], GREEDY)[0] for p in prompts]


def test_int8_cache_chunks_read_like_the_single_engine(model):
    """With an 8-bit cache later chunks attend to the codes of earlier ones: the same arithmetic as
    the single-sequence Engine's chunked prefill."""
    from qwenlm.engine import Engine

    prompts = random_prompts(30, 5, 21)
    model.kv_cache = "int8"
    try:
        outs = _run(BatchEngine(model, max_num_seqs=3, max_model_len=64, prefill_chunk=8),
                    {0: [(p, GREEDY) for p in prompts]})
        want = [Engine(model, bucket=8, prefill_chunk=8).generate([p], GREEDY)[0] for p in prompts]
    finally:
        model.kv_cache = "float"
    assert [o["tokens"] for o in outs] == want


# ---- prefix cache: a finished sequence's row is parked; a prompt that starts with its tokens takes it --

def _parking(model, **kw):
    eng = BatchEngine(model, max_model_len=96, prefix_cache=True, **kw)
    eng.prefix_min = 4
    return eng


def test_next_turn_takes_the_parked_row_and_reads_the_rest(model):
    """Turn 2's prompt is turn 1's prompt, its reply and a new message: it reads the reply's last token
    and the message only, and generates the reference's tokens (v1: 20 and 28 tokens share an alpha)."""
    p1, extra = random_prompts(20, 4)
    cfg = GREEDY.update(max_new_tokens=4)
    eng = _parking(model, max_num_seqs=2)
    r1 = _run(eng, {0: [(p1, cfg)]})[0]["tokens"]
    p2 = p1 + r1 + extra
    r2 = _run(eng, {0: [(p2, GREEDY)]})[0]["tokens"]
    assert r1 == generate(model, [p1], cfg)[0] and r2 == generate(model, [p2], GREEDY)[0]
    assert eng.stats["prompt_tokens_reused"] == 20 + 3  # all but the reply's last token


def test_two_conversations_keep_their_rows(model):
    """Two conversations finish side by side; their next turns arrive one after the other and each
    finds its own parked row (the second after the first has swapped rows with it)."""
    (a1, b1), extra = random_prompts(20, 18), random_prompts(3)[0]
    cfg = GREEDY.update(max_new_tokens=4)
    eng = _parking(model, max_num_seqs=3)
    ra, rb = (o["tokens"] for o in _run(eng, {0: [(a1, cfg), (b1, cfg)]}))
    assert list(eng._parked) == [1, 0]  # a finished first: it swapped with b, the last row
    a2, b2 = a1 + ra + extra, b1 + rb + extra
    outs = _run(eng, {0: [(a2, GREEDY)], 2: [(b2, GREEDY)]})  # a's row 1 swaps with b's row 0
    assert [o["tokens"] for o in outs] == [generate(model, [p], GREEDY)[0] for p in (a2, b2)]
    assert eng.stats["prompt_tokens_reused"] == (18 + 3) + (20 + 3)


def test_a_row_written_by_another_prompt_moves_its_parked_sequence_out_of_the_way(model):
    p1, other, extra = random_prompts(20, 9, 4)
    cfg = GREEDY.update(max_new_tokens=4)
    eng = _parking(model, max_num_seqs=3)
    r1 = _run(eng, {0: [(p1, cfg)]})[0]["tokens"]
    assert list(eng._parked) == [0]
    _run(eng, {0: [([7] + other, GREEDY)]})  # nothing in common: it is read into row 0
    assert list(eng._parked) == [1, 0]  # p1's row moved to row 1 first, then the newcomer was parked
    p2 = p1 + r1 + extra
    assert _run(eng, {0: [(p2, GREEDY)]})[0]["tokens"] == generate(model, [p2], GREEDY)[0]
    assert eng.stats["prompt_tokens_reused"] == 23


def test_a_long_rest_is_read_in_chunks_from_the_parked_row(model):
    p1, extra = random_prompts(17, 11)
    cfg = GREEDY.update(max_new_tokens=4)
    eng = _parking(model, max_num_seqs=2, prefill_chunk=8)
    r1 = _run(eng, {0: [(p1, cfg)]})[0]["tokens"]
    chunks = eng.stats["prompt_chunks"]
    p2 = p1 + r1 + extra  # 32 tokens (v1: the alpha of 17), 12 to read: 2 chunks from slot 20, in the top row
    assert _run(eng, {0: [(p2, GREEDY)]})[0]["tokens"] == generate(model, [p2], GREEDY)[0]
    assert eng.stats["prompt_tokens_reused"] == 20 and eng.stats["prompt_chunks"] - chunks == 2


def test_a_prompt_read_in_the_top_row_moves_a_parked_row_out_of_the_way_before_taking_its_place(model):
    """A long prompt is read in the top row, then moves next to the running rows: where a conversation
    is parked. That conversation moves to a free row first (found by a randomized run: it was moved
    after being overwritten, and its next turn read the long prompt's keys)."""
    p1, long, extra = random_prompts(6, 20, 3)
    cfg = GREEDY.update(max_new_tokens=4)
    eng = _parking(model, max_num_seqs=3, prefill_chunk=8)
    r1 = _run(eng, {0: [(p1, cfg)]})[0]["tokens"]
    assert list(eng._parked) == [0]
    _run(eng, {0: [([p1[0] + 1] + long, cfg)]})  # nothing in common: read in chunks in row 2, then row 0
    assert eng._parked[1]["tokens"] == p1 + r1[:-1]  # p1's conversation, moved to row 1
    p2 = p1 + r1 + extra
    assert _run(eng, {0: [(p2, GREEDY)]})[0]["tokens"] == generate(model, [p2], GREEDY)[0]
    assert eng.stats["prompt_tokens_reused"] == 6 + 3


def test_parking_is_on_by_default_and_can_be_turned_off(model):
    assert BatchEngine(model, max_num_seqs=2, max_model_len=64).prefix_cache
    assert not BatchEngine(model, max_num_seqs=2, max_model_len=64, prefix_cache=False).prefix_cache


def _gpu_like(model, **kw):
    """The GPU's way (rows padded to fixed shapes, prompts read together and whole), on this CPU."""
    if q4.pack_blocks(model):
        pytest.skip("the fused 4-bit CPU path has neither fixed-shape steps nor batched prefills")
    return _parking(model, fixed_shapes=True, batch_prefill=True, prefill_chunk=0, bucket=16, **kw)


def _both_ways(model, kv_cache, scenario):
    """`scenario(engine)` on the GPU's path and on the plain one (rows not padded, prompts and rests
    read one at a time): the same tokens, which with a float cache are the reference's. (An 8-bit
    cache's claimed rests attend to the prefix's codes, where the reference reads its exact values.)"""
    model.kv_cache = kv_cache
    try:
        gpu = _gpu_like(model, max_num_seqs=4)
        got = scenario(gpu)
        want = scenario(_parking(model, max_num_seqs=4, prefill_chunk=0))
        ref = [generate(model, [p], c)[0] for p, c, _ in got]
    finally:
        model.kv_cache = "float"
    assert [t for _, _, t in got] == [t for _, _, t in want]
    if kv_cache == "float":
        assert [t for _, _, t in got] == ref
    return gpu


@pytest.mark.parametrize("kv_cache", ["float", "int8"])
def test_padding_rows_of_fixed_shape_steps_leave_parked_rows_alone(model, kv_cache):
    """Three rows decode padded to four: the padding row is where a conversation is parked (its
    slot 0 used to be overwritten at every step). Its next turn still gets its tokens."""
    (a1, b1), others, extra = random_prompts(20, 18), random_prompts(6, 7, 9), random_prompts(3)[0]
    cfg = GREEDY.update(max_new_tokens=4)

    def scenario(eng):
        ra, rb = (o["tokens"] for o in _run(eng, {0: [(a1, cfg), (b1, cfg)]}))
        _run(eng, {0: [([999] + p, GREEDY) for p in others]})  # rows 0-2: a parked conversation moves to row 3
        assert 3 in eng._parked and eng.stats["max_batch"] == 3
        moved = eng._parked[3]["tokens"]
        nxt = moved + (ra if moved == a1 + ra[:-1] else rb)[-1:] + extra
        reused = eng.stats["prompt_tokens_reused"]
        got = _run(eng, {0: [(nxt, GREEDY)]})[0]["tokens"]
        assert eng.stats["prompt_tokens_reused"] - reused == len(moved)
        return [(nxt, GREEDY, got)]

    assert _both_ways(model, kv_cache, scenario).stats["steps"]


@pytest.mark.parametrize("kv_cache", ["float", "int8"])
def test_next_turns_arriving_together_read_their_rests_in_one_pass(model, kv_cache):
    """On the GPU's path the rests of claimed prompts (different lengths, different reused prefixes)
    are read in one right-padded forward pass, next to a new prompt read whole."""
    (a1, b1), new = random_prompts(20, 22), random_prompts(11)[0]  # (v1: 20 to 32 tokens share an NTK alpha)
    cfg = GREEDY.update(max_new_tokens=4)

    def scenario(eng):
        ra, rb = (o["tokens"] for o in _run(eng, {0: [(a1, cfg), (b1, cfg)]}))
        a2, b2 = a1 + ra + random_prompts(5)[0], b1 + rb + random_prompts(2)[0]
        eng.stats["prefills"] = 0
        arrivals = [(b2, SAMPLED), (a2, GREEDY), ([999] + new, GREEDY)]
        outs = _run(eng, {0: arrivals})
        assert eng.stats["prompt_tokens_reused"] == (20 + 3) + (22 + 3)
        return [(p, c, o["tokens"]) for (p, c), o in zip(arrivals, outs)]

    eng = _both_ways(model, kv_cache, scenario)
    assert eng.stats["prefills"] == 2  # the two rests together, then the new prompt


def test_a_prompt_with_another_ntk_alpha_reads_whole(model):
    """Qwen v1 past seq_length rotates keys with an alpha chosen from the prompt's length: 10 and 18
    tokens have different alphas, so the parked keys cannot serve (Qwen2 has no such alpha)."""
    p1, extra = random_prompts(10, 4)
    cfg = GREEDY.update(max_new_tokens=4)
    eng = _parking(model, max_num_seqs=2)
    p2 = p1 + _run(eng, {0: [(p1, cfg)]})[0]["tokens"] + extra
    assert _run(eng, {0: [(p2, GREEDY)]})[0]["tokens"] == generate(model, [p2], GREEDY)[0]
    assert eng.stats["prompt_tokens_reused"] == (0 if model.use_dynamic_ntk else 13)


def test_the_same_prompt_again_reads_its_last_token(model):
    """Regenerate: the parked row holds the whole prompt and more; the last prompt token is read again
    for its logits, sampled anew (another seed)."""
    p = random_prompts(12)[0]
    eng = _parking(model, max_num_seqs=2)
    cfgs = [SAMPLED.update(seed=1), SAMPLED.update(seed=2)]
    outs = [_run(eng, {0: [(p, c)]})[0]["tokens"] for c in cfgs]
    assert outs == [generate(model, [p], c)[0] for c in cfgs]
    assert eng.stats["prompt_tokens_reused"] == 11


SYSTEM = random_prompts(24)[0]  # a system prompt shared by requests (v1: prompts of 17-32 tokens share an alpha)


@pytest.mark.parametrize("kv_cache", ["float", "int8"])
def test_a_running_sequence_lends_the_prompt_start_it_shares(model, kv_cache):
    """A request arriving while another with the same 24-token system prompt runs copies those slots
    from its row and reads only its own message; both get the reference's tokens (int8: the plain
    path's), and the lender goes on undisturbed."""
    a, b = SYSTEM + [1, 2, 3], SYSTEM + [4, 5, 6, 7, 8]

    def scenario(eng):
        arrivals = {0: [(a, GREEDY.update(max_new_tokens=6))], 2: [(b, SAMPLED.update(max_new_tokens=4))]}
        outs = _run(eng, arrivals)
        assert eng.stats["prompt_tokens_reused"] == 24
        return [(p, c, o["tokens"]) for (p, c), o in zip([arrivals[0][0], arrivals[2][0]], outs)]

    _plain_or_both_ways(model, kv_cache, scenario)
    off = BatchEngine(model, max_model_len=96, max_num_seqs=4, prefix_cache=False)
    off.prefix_min = 4
    _run(off, {0: [(a, GREEDY)], 2: [(b, GREEDY)]})
    assert off.stats["prompt_tokens_reused"] == 0  # --no-prefix-cache: nothing is lent either


@pytest.mark.parametrize("kv_cache", ["float", "int8"])
def test_alike_prompts_arriving_together_read_one_and_copy_it(model, kv_cache):
    """The n choices of one request (three alike prompts, each its own seed) and a fourth with the
    same system prompt: one is read, the other three wait a step and copy its slots (all but the last
    prompt token for the alike ones, the system prompt for the fourth)."""
    p, q = SYSTEM + [9, 8, 7, 6], SYSTEM + [1, 1]
    arrivals = [(p, SAMPLED.update(seed=s)) for s in (1, 2, 3)] + [(q, GREEDY)]

    def scenario(eng):
        outs = _run(eng, {0: arrivals})
        assert eng.stats["prompt_tokens_reused"] == 2 * (len(p) - 1) + 24
        assert eng.stats["prompt_tokens"] == 3 * len(p) + len(q)  # (counted whole, read or copied)
        return [(pr, c, o["tokens"]) for (pr, c), o in zip(arrivals, outs)]

    eng = _plain_or_both_ways(model, kv_cache, scenario)
    outs = [t for _, _, t in scenario(_parking(model, max_num_seqs=4, prefill_chunk=0))]
    assert outs[0] != outs[1] != outs[2]  # (their own seeds)
    if eng.batch_prefill:
        assert eng.stats["prefills"] == 2  # the first prompt; then the three rests together


def _plain_or_both_ways(model, kv_cache, scenario):
    """`_both_ways`, or on the fused 4-bit CPU path (no GPU way there) the plain path against each
    request served alone with the prefix cache off. (There, reading a prompt in the engine and in the
    reference loop may differ in the last bits, which flips a near-tie of one of these prompts.) With
    an 8-bit cache a borrower's rest is quantized around the lender's key centers, so only the first
    request, which borrows nothing, is held to that; the GPU way checks 8-bit borrowers on the other models."""
    if not q4.pack_blocks(model):
        return _both_ways(model, kv_cache, scenario)
    model.kv_cache = kv_cache
    try:
        eng = _parking(model, max_num_seqs=4)
        got = scenario(eng)
        alone = [_run(BatchEngine(model, max_model_len=96, prefix_cache=False), {0: [(p, c)]})[0]["tokens"]
                 for p, c, _ in got]
    finally:
        model.kv_cache = "float"
    assert [t for _, _, t in got][:1 if kv_cache == "int8" else None] == alone[:1 if kv_cache == "int8" else None]
    return eng


@pytest.mark.parametrize("kv_cache", ["float", "int8"])
def test_a_borrower_lends_nothing_before_its_rest_is_read(model, kv_cache):
    """Two requests arrive together while a third with their system prompt runs: the first borrows the
    system prompt and joins, its own message not read yet; the second, which shares that message too,
    must borrow from the runner (24 slots), not the first's unread slots."""
    lender, b1 = SYSTEM + [1, 1], SYSTEM + [5, 5, 5, 5, 5]
    b2 = b1 + [6]

    def scenario(eng):
        arrivals = {0: [(lender, GREEDY.update(max_new_tokens=8))], 2: [(b1, GREEDY), (b2, GREEDY)]}
        outs = _run(eng, arrivals)
        assert eng.stats["prompt_tokens_reused"] == 2 * 24
        return [(p, c, o["tokens"]) for (p, c), o in zip(arrivals[0] + arrivals[2], outs)]

    _plain_or_both_ways(model, kv_cache, scenario)


@pytest.mark.parametrize("pipeline", [False, True], ids=["plain", "ahead"])
def test_warm_up_runs_every_padded_row_count_and_leaves_no_trace(model, pipeline):
    """The GPU server's warm-up, at the GPU's fixed shapes: each padded row count up to max_num_seqs
    decodes (several prompts read together, two positions each); afterwards nothing is parked,
    the counters are as before, and requests get the tokens a fresh engine gives."""
    kw = dict(max_num_seqs=6, max_model_len=64, fixed_shapes=True, batch_prefill=True, prefix_cache=True,
              prefill_chunk=0, bucket=16, pipeline=pipeline)
    eng = BatchEngine(model, **kw)
    if eng._packs:
        pytest.skip("the fused CPU path has no fixed shapes")
    rows, reads = [], []
    step = eng._fixed_shape_step
    eng._fixed_shape_step = lambda n, *a: (rows.append(n), step(n, *a))[1]
    real_step = eng.step
    eng.step = lambda new=(): (reads.append(len(new)), real_step(new))[1]
    assert eng.warm_up() >= 0
    assert sorted(set(rows)) == [1, 2, 4, 6] and max(reads) == 6
    assert eng.idle and not eng._parked and not eng.stats
    del eng._fixed_shape_step, eng.step
    prompts = random_prompts(9, 14, 5)
    arrivals = {0: [(p, GREEDY) for p in prompts]}
    assert _run(eng, arrivals) == _run(BatchEngine(model, **kw), arrivals)
    eng.start()
    try:
        with pytest.raises(RuntimeError, match="idle engine that is not running"):
            eng.warm_up()
    finally:
        eng.shutdown()


# ---- decode steps run one ahead (the GPU's default, BatchEngine.pipeline) ----------------------------
def _ahead_or_not(model, scenario, **kw):
    """`scenario(engine)` on an engine whose decode steps run one ahead and on one whose do not: the
    same outputs. Returns the first engine (it must have run ahead)."""
    ahead = BatchEngine(model, pipeline=True, **kw)
    if ahead._packs:
        pytest.skip("the fused 4-bit CPU path does not run ahead")
    got = scenario(ahead)
    want = scenario(BatchEngine(model, pipeline=False, **kw))
    assert got == want
    assert ahead.stats["steps_ahead"] > 0 and ahead._ahead is None
    return ahead, got


def _stopping(model, prompt, at, cfg=GREEDY):
    """`cfg` with an end token that `prompt`'s greedy reply meets at its token `at` (not before)."""
    solo = generate(model, [prompt], cfg)[0]
    stop = next(t for t in solo[at:] if t not in solo[:at])
    return cfg.update(eos_token_id=stop)


@pytest.mark.parametrize("shapes", [dict(prefill_chunk=8), dict(fixed_shapes=True, bucket=16)],
                         ids=["plain", "fixed-shapes"])
def test_steps_run_ahead_give_every_sequence_its_tokens(model, shapes):
    """Rows that stop at a token (mid-batch: the step run ahead had them for nothing, and a later row
    moves into their place while its own step is in flight), rows that end by their budget or the
    context (padding rows of the step ahead, while other rows go on), sampled rows, a repetition
    penalty, and arrivals that make the engine hand out the step in flight first (on the plain path
    the last is a long prompt, read in chunks over several steps)."""
    prompts = random_prompts(5, 11, 8, 14, 3, 15)
    arrivals = {0: [(prompts[0], _stopping(model, prompts[0], 3)),
                    (prompts[1], GREEDY.update(max_new_tokens=5)),
                    (prompts[2], SAMPLED.update(max_new_tokens=20)),
                    (prompts[3], GREEDY.update(max_new_tokens=40))],  # ends by the context (48)
                4: [(prompts[4], _stopping(model, prompts[4], 6, GREEDY.update(repetition_penalty=1.2)))],
                9: [(prompts[5], GREEDY.update(max_new_tokens=60))]}  # ends by the context after [3]
    eng, outs = _ahead_or_not(model, lambda e: _run(e, arrivals), max_num_seqs=4, max_model_len=48,
                              prefix_cache=False, **shapes)
    assert eng.stats["finished_stop"] == 2 and eng.stats["finished_length"] == 4
    assert [o["reason"] for o in outs] == ["stop", "length", "length", "length", "stop", "length"]
    assert eng.stats["generation_tokens"] == sum(len(o["tokens"]) for o in outs)


def test_a_row_that_stops_while_a_step_runs_ahead_parks_what_it_holds(model):
    """With the prefix cache on, a row that stops mid-batch is swapped with the last row, whose step
    in flight has written one more slot than its tokens handed out: the next turns of both
    conversations, reading only their rests from the parked rows, get the reference's tokens."""
    p1, p2 = random_prompts(6, 10)
    c1 = _stopping(model, p1, 4)
    c2 = GREEDY.update(max_new_tokens=9)

    def scenario(eng):
        eng.prefix_min = 4
        first = _run(eng, {0: [(p1, c1), (p2, c2)]})
        again = [p1 + first[0]["tokens"] + [7, 8, 9], p2 + first[1]["tokens"] + [5, 6]]
        second = _run(eng, {0: [(again[0], GREEDY), (again[1], GREEDY)]})
        return first, second, eng.stats["prompt_tokens_reused"], again

    _, (first, second, reused, again) = _ahead_or_not(model, scenario, max_num_seqs=3, max_model_len=64,
                                                      prefix_cache=True)
    assert first[0]["reason"] == "stop" and reused > 0
    assert [o["tokens"] for o in second] == [generate(model, [p], GREEDY)[0] for p in again]


def test_an_abort_waits_for_the_step_in_flight_and_the_others_go_on(model):
    p1, p2 = random_prompts(7, 13)
    eng = BatchEngine(model, max_num_seqs=2, max_model_len=64, pipeline=True)
    if eng._packs:
        pytest.skip("the fused 4-bit CPU path does not run ahead")
    o1, o2 = {"tokens": [], "reason": None}, {"tokens": [], "reason": None}
    s1, s2 = _seq(p1, GREEDY, o1), _seq(p2, GREEDY, o2)
    with torch.inference_mode():
        eng.step([s1, s2])
        eng.step()
        eng.step()
        assert eng._ahead is not None and len(o1["tokens"]) == 3  # (the prefill's and two steps'; one in flight)
        eng.abort(s1)
        eng.step()
        assert o1["reason"] == "abort" and len(eng.active) == 1 and s2.row == 0
        while not eng.idle:
            eng.step()
    assert o2["tokens"] == generate(model, [p2], GREEDY)[0]
    assert o1["tokens"] == generate(model, [p1], GREEDY)[0][:4]  # the step in flight's token, then nothing


def test_rows_that_need_their_tokens_on_the_host_do_not_run_ahead(model):
    """Log-probabilities, OpenAI's penalties and a logit bias need each token before the next step:
    while such a row runs, no step runs ahead; the outputs are the same."""
    p1, p2 = random_prompts(5, 9)
    for cfg in (GREEDY.update(presence_penalty=0.5), GREEDY.update(logit_bias={3: 5.0})):
        eng = BatchEngine(model, max_num_seqs=2, max_model_len=64, pipeline=True)
        if eng._packs:
            pytest.skip("the fused 4-bit CPU path does not run ahead")
        out = _run(eng, {0: [(p1, cfg), (p2, GREEDY)]})
        assert eng.stats["steps_ahead"] == 0
        assert out == _run(BatchEngine(model, max_num_seqs=2, max_model_len=64), {0: [(p1, cfg), (p2, GREEDY)]})


@pytest.mark.parametrize("limit", ["budget", "context", "stop"])
def test_a_step_run_ahead_is_not_queued_for_a_row_it_would_end(model, limit):
    """A row that the step in flight ends by its budget or the context is known to end: the engine runs
    as many steps as the plain one (one fewer than tokens, the prefill's being the first). An end
    token cannot be known: one step more, whose token is dropped, and nothing is left in flight."""
    p = random_prompts(6)[0]
    cfg = {"budget": GREEDY.update(max_new_tokens=7), "context": GREEDY.update(max_new_tokens=50),
           "stop": _stopping(model, p, 6)}[limit]
    eng, outs = _ahead_or_not(model, lambda e: _run(e, {0: [(p, cfg)]}), max_num_seqs=2,
                              max_model_len=13 if limit == "context" else 64)
    n = len(outs[0]["tokens"])
    assert outs[0]["reason"] == ("stop" if limit == "stop" else "length") and n >= 7
    assert eng.stats["steps"] == eng.stats["steps_ahead"] == (n if limit == "stop" else n - 1)


def test_a_warm_up_that_fails_to_run_ahead_turns_running_ahead_off(model, caplog):
    """If a step run ahead fails during the warm-up (on a device where something of it does not work),
    the log says so, the engine runs its steps one after the other, and requests get their tokens."""
    eng = BatchEngine(model, max_num_seqs=4, max_model_len=64, fixed_shapes=True, bucket=16, pipeline=True)
    if eng._packs:
        pytest.skip("the fused 4-bit CPU path does not run ahead")

    def broken(step=None):
        raise RuntimeError("no pinned memory here")
    eng._land = broken
    with caplog.at_level("WARNING", logger="qwenlm"):
        eng.warm_up()
    assert not eng.pipeline and eng.idle and eng._ahead is None and not eng.stats["steps_ahead"]
    assert "cannot run ahead on this device (RuntimeError: no pinned memory here)" in caplog.text
    del eng._land
    prompts = random_prompts(4, 9)
    assert drain_batch_engine(eng, prompts, GREEDY) == [generate(model, [p], GREEDY)[0] for p in prompts]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("way", ["gpu-like", "cpu-like"])
def test_random_traffic_gets_the_same_outputs_run_ahead_or_not(model, way, seed):
    """Random traffic: arrivals over 30 steps (more than the rows: some wait), prompts that share
    starts (rows lend them, twins wait for one another), greedy, penalised and sampled rows, rows
    that need their tokens each step, end tokens taken from the prompt's own greedy reply, budgets
    and the context, aborts. Every request gets the same tokens and finish reason either way."""
    import random

    rng = random.Random(seed)
    base = random_prompts(24)[0]
    arrivals: dict[int, list] = {}
    aborts: dict[int, list[int]] = {}
    k = 0
    for step in range(30):
        for _ in range(rng.choice([0, 0, 1, 1, 2])):
            # (at most 16 tokens: v1's longer prompts get another NTK alpha, and such rows do not run ahead)
            start = base[:rng.randrange(5, 11)] if rng.random() < 0.4 else []
            prompt = start + [rng.randrange(1000) for _ in range(rng.randrange(1, 7))]
            cfg = rng.choice([GREEDY, GREEDY, GREEDY.update(repetition_penalty=1.2),
                              SAMPLED.update(seed=rng.randrange(99)), GREEDY.update(presence_penalty=0.4)])
            cfg = cfg.update(max_new_tokens=rng.randrange(1, 30))
            if rng.random() < 0.35:
                reply = generate(model, [prompt], cfg.update(max_new_tokens=12))[0]
                cfg = cfg.update(eos_token_id=rng.choice(reply))
            arrivals.setdefault(step, []).append((prompt, cfg))
            if rng.random() < 0.15:
                aborts.setdefault(step + rng.randrange(1, 8), []).append(k)
            k += 1

    def run(eng):
        eng.prefix_min = 4
        outs, seqs, step = [], [], 0
        pending = dict(arrivals)
        while pending or not eng.idle:
            for prompt, cfg in pending.pop(step, []):
                outs.append({"tokens": [], "reason": None})
                seqs.append(_seq(prompt, cfg, outs[-1]))
                eng.submit(seqs[-1])
            for i in aborts.get(step, []):
                if i < len(seqs) and seqs[i].finish_reason is None:
                    eng.abort(seqs[i])
            with torch.inference_mode():
                eng.step(eng.take_waiting())
            step += 1
        return outs

    kw = dict(max_num_seqs=4, max_model_len=48, prefix_cache=True)
    kw.update(fixed_shapes=True, batch_prefill=True, prefill_chunk=0, bucket=16) if way == "gpu-like" else \
        kw.update(prefill_chunk=8)
    eng, outs = _ahead_or_not(model, run, **kw)
    reasons = {o["reason"] for o in outs}
    assert {"stop", "length"} <= reasons and len(outs) > 12


@pytest.mark.parametrize("pipeline", [False, True], ids=["plain", "ahead"])
def test_a_failed_step_fails_its_requests_and_the_loop_serves_the_next(model, pipeline):
    """A step that raises (a bug) fails the requests it held with "error", forgets every row (none is
    left running, being read, parked or in flight), and the loop goes on serving."""
    eng = BatchEngine(model, max_num_seqs=2, max_model_len=64, pipeline=pipeline)
    real, calls = eng._decode, []

    def decode():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a bug")
        real()
    eng._decode = decode
    done = [threading.Event() for _ in range(2)]
    outs = [{"tokens": [], "reason": None} for _ in range(2)]

    def submit(i, prompt):
        def emit(tok, reason):
            if tok is not None:
                outs[i]["tokens"].append(tok)
            if reason is not None:
                outs[i]["reason"] = reason
                done[i].set()
        eng.submit(Sequence(prompt=prompt, cfg=GREEDY, stop=StopChecker(GREEDY), emit=emit))

    p1, p2 = random_prompts(6, 8)
    eng.start()
    try:
        submit(0, p1)
        assert done[0].wait(60) and outs[0]["reason"] == "error"
        deadline = time.monotonic() + 10  # (the loop forgets the rows just after it fails the requests)
        while (eng.active or eng._ahead is not None) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not eng.active and not eng.admitted and not eng._parked and eng._ahead is None
        submit(1, p2)
        assert done[1].wait(60)
    finally:
        eng.shutdown()
    assert outs[1] == {"tokens": generate(model, [p2], GREEDY)[0], "reason": "length"}
