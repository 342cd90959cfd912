"""Metrics: pass@k against brute force, and every rollout metric on hand-built rollouts with known totals."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import pytest

from npr.engine import FinishReason, Rollout, RolloutStats
from npr.eval.metrics import (
    RunMetrics,
    avg_at_k,
    best_at_k,
    branches_per_fork,
    critical_path_tokens,
    format_valid_rate,
    ideal_speedup,
    mean_pass_at_k,
    parallel_rate,
    pass_at_k,
    problem_latencies,
    run_metrics,
    speedup,
    tokens_per_second,
    total_tokens,
)

VALID = (
    "<guideline><plan>1: add 2 and 3</plan><plan>2: check the sum</plan></guideline>"
    "<step>1: 2 + 3 gives 5</step><step>2: 5 - 3 gives 2, fine</step>"
    "<takeaway>The sum is 5.</takeaway>So \\boxed{5}"
)
PLAIN = "2 + 3 = 5, so \\boxed{5}"  # no block: a format penalty


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """The share of k-subsets of n samples (c of them correct) holding at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_enumeration_of_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_stays_exact_where_binomials_are_huge():
    n, c, k = 2000, 7, 300  # C(2000, 300) has ~400 digits: a float ratio of binomials overflows
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)


@pytest.mark.parametrize(
    ("n", "c", "k", "word"),
    [(4, 5, 1, "c <= n"), (4, -1, 1, "c <= n"), (4, 1, 0, "k <= n"), (4, 1, 5, "k <= n")],
)
def test_pass_at_k_rejects_impossible_counts(n, c, k, word):
    with pytest.raises(ValueError, match=word):
        pass_at_k(n, c, k)


# problem 0: 1 of 4 right; problem 1: none; problem 2: all
TABLE = [[True, False, False, False], [False] * 4, [True] * 4]


def test_accuracy_metrics_by_hand():
    assert avg_at_k(TABLE) == pytest.approx((0.25 + 0 + 1) / 3)
    assert mean_pass_at_k(TABLE, 1) == pytest.approx(avg_at_k(TABLE))  # pass@1 is avg@k
    # pass@2 of problem 0: 1 - C(3,2)/C(4,2) = 1/2
    assert mean_pass_at_k(TABLE, 2) == pytest.approx((0.5 + 0 + 1) / 3)
    assert best_at_k(TABLE) == pytest.approx(2 / 3)
    assert mean_pass_at_k(TABLE, 4) == best_at_k(TABLE)


@pytest.mark.parametrize(
    ("table", "word"),
    [([], "no samples"), ([[], []], "no samples"), ([[True], [True, False]], "same number")],
)
def test_accuracy_metrics_reject_empty_or_ragged_tables(table, word):
    with pytest.raises(ValueError, match=word):
        avg_at_k(table)


def rollout(index, sample, text, total, path, forks=0, branches=0, wall=1.0, finish=FinishReason.STOP):
    stats = RolloutStats(
        total_tokens=total, critical_path_tokens=path, forks=forks, branches=branches, wall_time=wall
    )
    return Rollout(index, sample, [1, 2], [], [], [], [], text, finish, stats=stats)


# 2 problems × 2 samples; totals 100 tokens, critical paths 66, 3 forks with 7 branches
ROLLOUTS = [
    rollout(0, 0, VALID, total=30, path=20, forks=1, branches=3, wall=2.0),
    rollout(0, 1, PLAIN, total=10, path=10, wall=1.0),
    rollout(1, 0, VALID, total=40, path=16, forks=2, branches=4, wall=3.0),
    rollout(1, 1, PLAIN, total=20, path=20, wall=1.0, finish=FinishReason.LENGTH),
]


def test_rollout_metrics_by_hand():
    assert total_tokens(ROLLOUTS) == 100
    assert critical_path_tokens(ROLLOUTS) == 66
    assert ideal_speedup(ROLLOUTS) == pytest.approx(100 / 66)
    assert parallel_rate(ROLLOUTS) == 0.5
    assert branches_per_fork(ROLLOUTS) == pytest.approx(7 / 3)
    assert format_valid_rate(ROLLOUTS) == 0.5
    assert tokens_per_second(ROLLOUTS, 4.0) == 25.0
    assert problem_latencies(ROLLOUTS) == [1.5, 2.0]


def test_rollout_metrics_without_forks_or_tokens():
    empty = [rollout(0, 0, "", total=0, path=0)]
    assert branches_per_fork(empty) == 0.0
    assert ideal_speedup(empty) == 1.0  # nothing generated: no speedup either way
    with pytest.raises(ValueError, match="wall_time"):
        tokens_per_second(empty, 0.0)
    with pytest.raises(ValueError, match="no rollouts"):
        parallel_rate([])


def test_run_metrics_gathers_everything():
    correct = [[True, False], [False, False]]
    m = run_metrics(ROLLOUTS, correct, wall_time=4.0)
    assert (m.mode, m.problems, m.k, m.samples) == ("parallel", 2, 2, 4)
    assert m.avg_at_k == 0.25
    assert m.pass_at == {1: 0.25, 2: 0.5}
    assert m.pass_at_k == m.best_at_k == 0.5
    assert (m.total_tokens, m.critical_path_tokens, m.tps) == (100, 66, 25.0)
    assert (m.latency_s, m.latency_median_s) == (1.75, 1.75)
    assert m.finish_reasons == {"stop": 3, "length": 1}
    assert RunMetrics.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_run_metrics_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="4 rollouts for 1 problems"):
        run_metrics(ROLLOUTS, [[True, False]], wall_time=1.0)
    mixed = [*ROLLOUTS[:3], rollout(1, 1, PLAIN, total=1, path=1)]
    mixed[3].mode = "sequential"
    with pytest.raises(ValueError, match="one mode"):
        run_metrics(mixed, [[True, True], [True, True]], wall_time=1.0)


def test_speedup_is_tps_ratio_and_inverse_latency_ratio():
    correct = [[True, False], [False, False]]
    run = run_metrics(ROLLOUTS, correct, wall_time=2.0)  # 50 tok/s, latency 1.75 s
    base = run_metrics(ROLLOUTS, correct, wall_time=5.0)  # 20 tok/s
    base.latency_s = 3.5
    s = speedup(run, base)
    assert (s.tps, s.latency) == (pytest.approx(2.5), pytest.approx(2.0))
