"""The batched sampler: top-k/top-p keep the right tokens, draws follow the distribution, rows stay
independent of their batch, and the branch repetition penalty lowers seen tokens only."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from npr.engine.params import SamplingParams
from npr.engine.sampling import sample_tokens


def _draws(logits: list[float], params: SamplingParams, n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    row = torch.tensor([logits])
    return [sample_tokens(row, [params], [g], [None])[0] for _ in range(n)]


def _logits(probs: list[float]) -> list[float]:
    return [math.log(p) for p in probs]


def test_top_p_keeps_the_prefix_that_crosses_the_mass():
    probs = [0.5, 0.3, 0.2]
    assert set(_draws(_logits(probs), SamplingParams(top_p=0.5), 200)) == {0}
    assert set(_draws(_logits(probs), SamplingParams(top_p=0.6), 400)) == {0, 1}
    assert set(_draws(_logits(probs), SamplingParams(top_p=1.0), 400)) == {0, 1, 2}


def test_top_k_applies_before_top_p():
    probs = [0.4, 0.35, 0.25]
    # top-k 2 renormalises to 0.53/0.47, so top-p 0.5 keeps token 0 only
    assert set(_draws(_logits(probs), SamplingParams(top_k=2, top_p=0.5), 200)) == {0}
    assert set(_draws(_logits(probs), SamplingParams(top_k=2), 400)) == {0, 1}


def test_draws_follow_the_distribution_and_temperature():
    probs = [0.6, 0.3, 0.1]
    n = 4000
    counts = torch.bincount(torch.tensor(_draws(_logits(probs), SamplingParams(), n)), minlength=3)
    assert torch.allclose(counts / n, torch.tensor(probs), atol=0.03)
    hot = torch.tensor(probs) ** 0.5
    hot = hot / hot.sum()
    counts = torch.bincount(
        torch.tensor(_draws(_logits(probs), SamplingParams(temperature=2.0), n)), minlength=3
    )
    assert torch.allclose(counts / n, hot, atol=0.03)


def test_greedy_takes_the_argmax_after_the_penalty():
    g = torch.Generator().manual_seed(0)
    row = torch.tensor([[2.0, 1.99, 0.0]])
    assert sample_tokens(row, [SamplingParams(temperature=0)], [g], [None]) == [0]
    penalised = SamplingParams(temperature=0, branch_repetition_penalty=1.1)
    assert sample_tokens(row, [penalised], [g], [[0, 0]]) == [1]


def test_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens_only():
    params = SamplingParams(temperature=0, branch_repetition_penalty=2.0)
    g = torch.Generator().manual_seed(0)
    # token 0 (-1.0 -> -2.0) falls below token 1 (-1.5); token 2 unseen stays lowest
    assert sample_tokens(torch.tensor([[-1.0, -1.5, -3.0]]), [params], [g], [[0]]) == [1]
    # positive: 3.0 -> 1.5 falls below the unseen 2.0
    assert sample_tokens(torch.tensor([[3.0, 2.0, 0.0]]), [params], [g], [[0]]) == [1]


def test_a_row_gets_the_same_token_alone_or_in_any_batch():
    torch.manual_seed(1)
    logits = torch.randn(5, 50)
    params = [SamplingParams(top_p=0.9), SamplingParams(temperature=0.7), SamplingParams(top_k=5)] * 2
    alone = [
        sample_tokens(logits[i : i + 1], [params[i]], [torch.Generator().manual_seed(i)], [None])[0]
        for i in range(5)
    ]
    gens = [torch.Generator().manual_seed(i) for i in range(5)]
    assert sample_tokens(logits, params[:5], gens, [None] * 5) == alone


def test_no_rows_no_tokens():
    assert sample_tokens(torch.empty(0, 7), [], [], []) == []


@settings(max_examples=60, deadline=None)
@given(
    logits=st.lists(st.floats(-8, 8), min_size=2, max_size=12, unique=True),
    top_p=st.floats(0.05, 1.0),
    top_k=st.integers(0, 12),
    seed=st.integers(0, 2**16),
)
def test_the_token_is_always_one_top_k_and_top_p_keep(logits, top_p, top_k, seed):
    row = torch.tensor(logits)
    params = SamplingParams(top_p=top_p, top_k=top_k)
    (token,) = sample_tokens(row[None], [params], [torch.Generator().manual_seed(seed)], [None])
    ranked = torch.sort(row, descending=True).indices.tolist()
    kept = ranked[: top_k or len(logits)]
    probs = torch.softmax(row[kept], -1)
    before = torch.cumsum(probs, -1) - probs
    kept = [t for t, b in zip(kept, before.tolist(), strict=True) if b < top_p + 1e-6]
    assert token in kept
