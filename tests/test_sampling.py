"""The fast sampler (generation/sampling.py) draws from exactly the distribution of the reference
filters (`top_p_filter(top_k_filter(logits / T))`, themselves held to transformers' processors in
test_chat.py), whichever shortcut it takes, and its draw has the probabilities it is given."""

import pytest
import torch

from qwenlm.generation.config import GenerationConfig
from qwenlm.generation.sampling import (_CANDIDATES, _candidates, apply_repetition_penalty, choose, draw,
                                        next_tokens, token_distribution, top_k_filter, top_p_filter, uniforms)

V = 5000  # more than the CPU shortcut's candidates, so that top-p alone can take it or not


def _reference(logits, cfg):
    x = (logits / cfg.temperature).clamp(max=torch.finfo(logits.dtype).max)
    return top_p_filter(top_k_filter(x, cfg.top_k), cfg.top_p).softmax(-1)


def _full(ids, probs):
    return probs if ids is None else torch.zeros(probs.shape[0], V).scatter_(1, ids, probs)


def _logits(peaked: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, V, generator=g)
    if peaked:  # a few hundred plausible tokens, the rest far below (like a trained model's logits)
        x[:, torch.randperm(V, generator=g)[:300]] += 9
    return x


@pytest.mark.parametrize("peaked", [True, False], ids=["peaked", "flat"])
@pytest.mark.parametrize("top_k", [0, 1, 7, 50, V - 1, V, V + 10])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.8, 0.95, 1.0])
def test_same_distribution_as_the_reference_filters(peaked, top_k, top_p):
    cfg = GenerationConfig(do_sample=True, temperature=0.7, top_k=top_k, top_p=top_p)
    for seed in range(3):
        logits = _logits(peaked, seed)
        ids, probs = token_distribution(logits, cfg)
        torch.testing.assert_close(_full(ids, probs), _reference(logits, cfg), rtol=1e-5, atol=1e-7)


def test_both_top_p_branches_are_taken():
    """Top-p alone on a CPU: the nucleus among the top candidates when they hold it (peaked logits),
    the full sort when they do not (flat logits); both checked against the reference above."""
    cfg = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=0.8)
    vals, ids = _candidates(_logits(True, 0), cfg)
    assert vals.shape == ids.shape == (3, _CANDIDATES)
    vals, ids = _candidates(_logits(False, 0), cfg)
    assert vals.shape == ids.shape == (3, V)  # the full sort


def test_a_rows_token_does_not_depend_on_its_neighbours():
    """Rows sampled together (the server batches them) pick what each picks alone at the same uniform
    number, also when a neighbour makes the batch take the full sort instead of the candidates."""
    cfg = GenerationConfig(do_sample=True, temperature=0.9, top_k=0, top_p=0.9, repetition_penalty=1.0)
    peaked, flat = _logits(True, 7), _logits(False, 7)
    seen = torch.zeros(2, V, dtype=torch.bool)
    for i in range(50):
        u = uniforms(2, torch.Generator().manual_seed(i), "cpu")
        alone = choose(peaked[:1], seen[:1], cfg, u[:1])
        together = choose(torch.cat([peaked[:1], flat[:1]]), seen, cfg, u)
        assert together[0] == alone[0]


def test_draw_has_the_given_probabilities():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.5, 0.2, 0.0, 0.3], [0.0, 0.0, 1.0, 0.0]])
    n = 40000
    picks = torch.stack([draw(probs, uniforms(2, g, "cpu")) for _ in range(n)])  # (n, 2)
    freq = torch.bincount(picks[:, 0], minlength=4).float() / n
    torch.testing.assert_close(freq, probs[0], atol=0.01, rtol=0)  # ~5 standard deviations
    assert (picks[:, 1] == 2).all()
    # unnormalized rows are fine: the draw scales by the row's total
    picks = torch.stack([draw(probs * 7, uniforms(2, g, "cpu")) for _ in range(4000)])
    assert set(picks[:, 0].tolist()) == {0, 1, 3}


def test_seeded_sampling_repeats_and_stays_in_the_nucleus():
    logits = _logits(True, 3)
    cfg = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, top_p=0.8, repetition_penalty=1.1)
    seen = torch.zeros(3, V, dtype=torch.bool)
    allowed = _reference(apply_repetition_penalty(logits, seen, 1.1), cfg) > 0
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(5)
        runs.append(torch.stack([next_tokens(logits, seen, cfg, g) for _ in range(200)]))
    assert torch.equal(runs[0], runs[1])
    assert allowed.gather(1, runs[0].T).all()


def test_repetition_penalty_shortcut_equals_the_formula():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 300, generator=g) * 4
    seen = torch.rand(2, 300, generator=g) < 0.1
    want = torch.where(seen, torch.where(logits < 0, logits * 1.3, logits / 1.3), logits)
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.3), want)
    assert torch.equal(apply_repetition_penalty(logits, torch.zeros_like(seen), 1.3), logits)
