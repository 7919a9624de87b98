"""Log-probabilities (OpenAI's `logprobs`): the serving engine's, for generated tokens and for prompt
tokens (echo), against log-softmax of the reference forward's logits over the whole sequence: on
every way the engine reads prompts (together, one at a time in chunks, the GPU's fixed shapes) and
with conversations parked in the prefix cache."""

import pytest
import torch

from helpers import greedy_config, random_prompts, sampled_config, tiny_model
from qwenlm.engine.engine import prompt_alpha
from qwenlm.engine.batch import BatchEngine, Sequence
from qwenlm.generation import StopChecker
from qwenlm.quant import q4


@pytest.fixture(scope="module", params=["v1", "qwen2"])
def model(request, tmp_path_factory):
    return tiny_model(request.param, str(tmp_path_factory.mktemp(request.param)))


def reference(model, ids: list[int]) -> torch.Tensor:
    """log-softmax of the reference forward's logits: row j is the distribution of token j + 1."""
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=model.device)).logits[0].float()
    return torch.log_softmax(logits, -1).cpu()


def _run(eng, jobs):
    """jobs: [(prompt, cfg, logprobs, prompt_logprobs)] submitted together -> their Sequences, run to the end."""
    seqs = []
    for prompt, cfg, k, pk in jobs:
        seqs.append(Sequence(prompt=prompt, cfg=cfg, stop=StopChecker(cfg), emit=lambda t, r: None,
                             logprobs=k, prompt_logprobs=pk))
        eng.submit(seqs[-1])
    while not eng.idle:
        with torch.inference_mode():
            eng.step(eng.take_waiting())
    return seqs


def _check(model, seq, k, pk):
    n = len(seq.prompt)
    # The reference reads the whole sequence at once, with the NTK alpha of its full length; the engine
    # keeps the alpha of the prompt for the keys it caches (the original's rule): the two compare only
    # where both alphas are the same (a prompt under seq_length whose reply crosses it does not)
    assert prompt_alpha(model, n) == prompt_alpha(model, n + len(seq.generated)), "pick other lengths"
    ref = reference(model, seq.prompt + seq.generated)
    assert len(seq.token_logprobs) == len(seq.generated) > 0
    for j, (tok, (lp, top)) in enumerate(zip(seq.generated, seq.token_logprobs)):
        row = ref[n - 1 + j]
        assert lp == pytest.approx(row[tok].item(), abs=2e-4)
        want = row.topk(k)
        assert [t for t, _ in top] == want.indices.tolist()
        assert [v for _, v in top] == pytest.approx(want.values.tolist(), abs=2e-4)
    if pk is None:
        assert seq.prompt_token_logprobs == []
        return
    assert len(seq.prompt_token_logprobs) == n - 1  # the first prompt token has none
    got = torch.tensor([lp for lp, _ in seq.prompt_token_logprobs])
    want = ref[torch.arange(n - 1), torch.tensor(seq.prompt[1:])]
    assert torch.allclose(got, want, atol=2e-4)
    for j, (_, top) in enumerate(seq.prompt_token_logprobs):
        assert [t for t, _ in top] == ref[j].topk(pk).indices.tolist()


@pytest.mark.parametrize("way", ["together", "chunks", "gpu_like"])
def test_logprobs_equal_the_reference(model, way):
    """Greedy and sampled rows, with and without log-probabilities, prompts of different lengths
    read together (padded), in chunks of 8 (a long prompt among short ones), or the GPU's way."""
    if way == "gpu_like":
        eng = BatchEngine(model, max_num_seqs=4, max_model_len=96, fixed_shapes=True, batch_prefill=True,
                          prefill_chunk=0, bucket=16)
    elif way == "chunks":
        eng = BatchEngine(model, max_num_seqs=4, max_model_len=96, prefill_chunk=8)
    else:
        eng = BatchEngine(model, max_num_seqs=4, max_model_len=96, batch_prefill=True, prefill_chunk=0)
    p = random_prompts(21, 6, 13, 9)
    jobs = [(p[0], greedy_config(6), 3, 2), (p[1], sampled_config(7, seed=1), 0, None),
            (p[2], greedy_config(5), None, None), (p[3], sampled_config(4, seed=2), 5, 0)]
    seqs = _run(eng, jobs)
    for s, (_, _, k, pk) in zip(seqs, jobs):
        if k is None:
            assert s.token_logprobs == [] and s.prompt_token_logprobs == []
        else:
            _check(model, s, k, pk)


def test_a_prompt_whose_logprobs_are_asked_is_read_whole_despite_a_parked_row(model):
    """A conversation parks its row; the same prompt again with prompt log-probabilities asked for
    reads every token (nothing reused) and gets each one's; without them, it reuses the row."""
    eng = BatchEngine(model, max_num_seqs=3, max_model_len=96, prefix_cache=True, prefill_chunk=0)
    eng.prefix_min = 4
    prompt = random_prompts(17)[0]  # (v1: every prompt here between 17 and 32 tokens shares one NTK alpha)
    first = _run(eng, [(prompt, greedy_config(4), None, None)])[0]
    again = _run(eng, [(prompt + first.generated + [7, 8, 9], greedy_config(3), 2, 2)])[0]
    assert again.reused == 0
    _check(model, again, 2, 2)
    third = _run(eng, [(again.prompt + again.generated + [5, 6], greedy_config(2), None, None)])[0]
    assert third.reused > 0


def test_logprobs_on_the_fused_4bit_path(tmp_path):
    """The fused 4-bit CPU decode step's logits give the log-probabilities too (against the same
    4-bit model's reference forward)."""
    if not {"avx2", "fma", "f16c"} <= q4._cpu_flags():
        pytest.skip("no AVX2 here")
    m = tiny_model("qwen2", str(tmp_path), "int4")
    eng = BatchEngine(m, max_num_seqs=2, max_model_len=64)
    p = random_prompts(17, 11)
    seqs = _run(eng, [(p[0], greedy_config(5), 2, 1), (p[1], greedy_config(6), 1, None)])
    for s, k, pk in zip(seqs, (2, 1), (1, None)):
        _check(m, s, k, pk)


def test_logprobs_leave_out_the_vocabulary_padding(model):
    """With a vocabulary limit (a tokenizer smaller than the model's embedding table, as Qwen's
    151,646 tokens in 151,936 rows), the distribution is over the tokens below it: it sums to one
    there, and no padding id is among the likeliest."""
    eng = BatchEngine(model, max_num_seqs=2, max_model_len=64, vocab_limit=700)
    prompt = [t % 700 for t in random_prompts(9)[0]]  # (the server takes no prompt token past the limit)
    seq = _run(eng, [(prompt, greedy_config(4), 20, 20)])[0]
    ref = reference(model, seq.prompt + seq.generated)[:, :700]
    ref = ref - ref.logsumexp(-1, keepdim=True)
    got = [lp for lp, _ in seq.prompt_token_logprobs + seq.token_logprobs]
    toks = seq.prompt[1:] + seq.generated
    assert got == pytest.approx(ref[torch.arange(len(toks)), torch.tensor(toks)].tolist(), abs=2e-4)
    assert all(t < 700 for _, top in seq.prompt_token_logprobs + seq.token_logprobs for t, _ in top)


@pytest.mark.parametrize("chunk", [0, 100])
def test_a_long_prompts_logprobs_over_several_head_slices(model, chunk):
    """300 prompt tokens: the head runs over slices of positions (and, read in chunks of 100, each
    chunk's last position predicts the next chunk's first token)."""
    eng = BatchEngine(model, max_num_seqs=2, max_model_len=320, prefill_chunk=chunk)
    seq = _run(eng, [(random_prompts(300)[0], greedy_config(2), 1, 1)])[0]
    _check(model, seq, 1, 1)
