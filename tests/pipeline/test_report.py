"""The report's statistics: intervals that cover what they should, significance only for real differences,
and latency warnings when the machine was busy or the repeats disagree."""

import pytest

from npr.pipeline.latency import HIGH_SPREAD, Latency
from npr.pipeline.report import comparisons, markdown, summarize
from npr.pipeline.stats import diff_ci, mean_ci, ratio_ci

MODELS = ("seed", "npr_zero", "npr_beta", "sr_beta", "sr", "npr")


def test_the_mean_s_interval_holds_the_mean_and_narrows_with_more_problems():
    few, many = [1.0, 0.0] * 10, [1.0, 0.0] * 200
    (lo_few, hi_few), (lo_many, hi_many) = mean_ci(few), mean_ci(many)
    assert lo_few < 0.5 < hi_few and lo_many < 0.5 < hi_many
    assert hi_many - lo_many < (hi_few - lo_few) / 3
    assert mean_ci([0.5] * 7) == (0.5, 0.5)


def test_a_paired_difference_is_significant_only_when_it_is_real():
    base = [1.0, 0.0, 1.0, 0.5] * 25
    better = [1.0, 1.0, 1.0, 0.5] * 25  # right on every problem base gets right, and more
    low, _ = diff_ci(better, base)
    assert low > 0
    low, high = diff_ci(base[::-1], base)  # same values, other problems: no paired effect claimed
    assert low < 0 < high
    with pytest.raises(ValueError, match="same problems"):
        diff_ci([1.0], [1.0, 0.0])


def test_a_speedup_interval_is_the_ratio_of_summed_times():
    base, model = [2.0, 4.0, 6.0], [1.0, 2.0, 3.0]
    assert ratio_ci(base, model) == (2.0, 2.0)
    low, high = ratio_ci([2.0, 2.0, 2.0, 2.0], [1.0, 2.0, 1.0, 2.0])
    assert 1.0 <= low < 4 / 3 < high <= 2.0


def _latency(spread: float, load: float) -> Latency:
    tries = {"s": {m: [[1.0, 1.0 + spread, 1.0]] * 4 for m in MODELS}}
    return Latency(tries, [load])


def test_latency_warns_on_high_load_or_wide_spread_and_only_then(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert _latency(0.05, 1.0).warning() is None
    assert "load average reached 5.0 on 2 cores" in (_latency(0.05, 5.0).warning() or "")
    assert "differed by up to" in (_latency(2 * HIGH_SPREAD, 1.0).warning() or "")
    assert _latency(0.1, 0).spread("s", "npr") == pytest.approx(0.1)


def _result(right: list[float], tps: float = 100.0) -> dict:
    metrics = {
        "format_valid_rate": 1.0,
        "parallel_rate": 0.0,
        "branches_per_fork": 0.0,
        "tps": tps,
        "latency_s": 1.0,
        "total_tokens": 400,
        "critical_path_tokens": 200,
        "ideal_speedup": 2.0,
        "problems": len(right),
        "k": 1,
    }
    return {"summary": {"metrics": metrics}, "accuracy": right, "intermediates_correct": right}


def test_the_summary_has_every_column_with_its_interval_and_the_tested_pairs():
    results = {"s": {m: _result([1.0, 0.0, 1.0, 1.0]) for m in MODELS}}
    results["s"]["npr"] = _result([1.0, 1.0, 1.0, 1.0])
    report = summarize(results, _latency(0.05, 0.5), repeats=3)
    npr = report["splits"]["s"]["npr"]
    for name in ("accuracy", "intermediates_correct", "speedup_latency"):
        low, high = npr[f"{name}_ci"]
        assert low <= npr[name] <= high
    assert npr["accuracy"] == 1.0 and report["splits"]["s"]["seed"]["speedup_latency"] == 1.0
    tested = {(c["a"], c["b"]) for c in comparisons(results)}
    assert {("npr", "npr_beta"), ("npr", "sr"), ("npr_beta", "sr_beta")} <= tested
    text = markdown(report, k=1, problems=4)
    assert "### s" in text and "NPR − NPR-Beta = +0.250" in text and "not significant" in text
