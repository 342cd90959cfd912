"""The evaluation metrics of DESIGN §7, as pure functions of rollouts, correctness and wall time.

Correctness comes in as a problems × samples table of booleans (``correct[i][j]``: sample j of problem i),
rollouts as the engine returns them; nothing here decodes or verifies.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from npr.engine import Rollout
from npr.format import check

Correct = Sequence[Sequence[bool]]
"""``correct[i][j]``: whether sample j of problem i is right."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c correct out of n samples: 1 − C(n−c, k) / C(n, k).

    Computed as 1 − ∏_{i=n−c+1}^{n} (1 − k/i), which never forms the (huge) binomials.

    >>> pass_at_k(4, 1, 2)
    0.5
    >>> pass_at_k(8, 0, 8), pass_at_k(8, 1, 8)
    (0.0, 1.0)
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def _samples(correct: Correct) -> int:
    """The common number of samples per problem; a ragged or empty table is an error."""
    sizes = {len(row) for row in correct}
    if not correct or sizes == {0}:
        raise ValueError("no samples to score")
    if len(sizes) > 1:
        raise ValueError(f"every problem needs the same number of samples, got sizes {sorted(sizes)}")
    return sizes.pop()


def mean_pass_at_k(correct: Correct, k: int) -> float:
    """pass@k averaged over problems."""
    n = _samples(correct)
    return statistics.fmean(pass_at_k(n, sum(row), k) for row in correct)


def avg_at_k(correct: Correct) -> float:
    """Mean accuracy over all samples of all problems (the paper's avg@k; equals pass@1)."""
    _samples(correct)
    return statistics.fmean(statistics.fmean(row) for row in correct)


def best_at_k(correct: Correct) -> float:
    """Share of problems with at least one correct sample (pass@k at k = n)."""
    _samples(correct)
    return statistics.fmean(any(row) for row in correct)


def report_ks(n: int) -> list[int]:
    """The k of pass@k worth reporting for n samples: powers of two below n, then n.

    >>> report_ks(8), report_ks(6), report_ks(1)
    ([1, 2, 4, 8], [1, 2, 4, 6], [1])
    """
    ks = [1 << i for i in range(n.bit_length()) if 1 << i < n]
    return [*ks, n]


def _require(rollouts: Sequence[Rollout]) -> None:
    if not rollouts:
        raise ValueError("no rollouts to measure")


def format_valid(text: str) -> bool:
    """Whether a response follows the grammar with no penalty at all."""
    return check(text).penalty == 0.0


def format_valid_rate(rollouts: Sequence[Rollout]) -> float:
    """Share of responses with a zero format penalty."""
    _require(rollouts)
    return statistics.fmean(format_valid(r.text) for r in rollouts)


def parallel_rate(rollouts: Sequence[Rollout]) -> float:
    """Share of responses with at least one real fork."""
    _require(rollouts)
    return statistics.fmean(r.is_parallel for r in rollouts)


def branches_per_fork(rollouts: Sequence[Rollout]) -> float:
    """Mean fork width over all forks; 0.0 when nothing forked."""
    forks = sum(r.stats.forks for r in rollouts)
    return sum(r.stats.branches for r in rollouts) / forks if forks else 0.0


def total_tokens(rollouts: Sequence[Rollout]) -> int:
    """Every generated token of every branch of every response."""
    return sum(r.stats.total_tokens for r in rollouts)


def critical_path_tokens(rollouts: Sequence[Rollout]) -> int:
    """Sum of the responses' sequential depths (the positions they use)."""
    return sum(r.stats.critical_path_tokens for r in rollouts)


def ideal_speedup(rollouts: Sequence[Rollout]) -> float:
    """Total over critical-path tokens: the speedup of a decoder whose steps cost the same at any width."""
    path = critical_path_tokens(rollouts)
    return total_tokens(rollouts) / path if path else 1.0


def tokens_per_second(rollouts: Sequence[Rollout], wall_time: float) -> float:
    """All generated tokens over the wall time of the run that produced them."""
    if wall_time <= 0:
        raise ValueError(f"wall_time must be > 0 seconds, got {wall_time}")
    return total_tokens(rollouts) / wall_time


def problem_latencies(rollouts: Sequence[Rollout]) -> list[float]:
    """Per problem (by ``Rollout.index``, ascending): the mean wall time of its samples, in seconds.

    A sample's wall time runs from its admission to its last token, so queueing before admission is not
    counted; the time it shares a batch with other requests is.
    """
    _require(rollouts)
    by_problem: dict[int, list[float]] = defaultdict(list)
    for r in rollouts:
        by_problem[r.index].append(r.stats.wall_time)
    return [statistics.fmean(by_problem[i]) for i in sorted(by_problem)]


@dataclass
class RunMetrics:
    """Everything DESIGN §7 measures about one run (one mode over one dataset)."""

    mode: str
    problems: int
    k: int  # samples per problem
    avg_at_k: float
    pass_at: dict[int, float]  # k → mean pass@k, for k in report_ks(self.k)
    best_at_k: float
    format_valid_rate: float
    parallel_rate: float
    branches_per_fork: float
    total_tokens: int
    critical_path_tokens: int
    ideal_speedup: float
    wall_time_s: float
    tps: float
    latency_s: float  # mean over problems of problem_latencies
    latency_median_s: float
    finish_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return self.problems * self.k

    @property
    def pass_at_k(self) -> float:
        return self.pass_at[self.k]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunMetrics:
        """Read back :meth:`to_dict` output after a JSON round trip (pass@k keys become strings there)."""
        return cls(**{**d, "pass_at": {int(k): v for k, v in d["pass_at"].items()}})


def run_metrics(rollouts: Sequence[Rollout], correct: Correct, wall_time: float) -> RunMetrics:
    """All metrics of one run; ``correct`` follows the problem-major order of ``rollouts``."""
    n = _samples(correct)
    if len(rollouts) != len(correct) * n:
        raise ValueError(f"{len(rollouts)} rollouts for {len(correct)} problems × {n} samples")
    modes = {r.mode for r in rollouts}
    if len(modes) != 1:
        raise ValueError(f"one run has one mode, got {sorted(modes)}")
    latencies = problem_latencies(rollouts)
    return RunMetrics(
        mode=modes.pop(),
        problems=len(correct),
        k=n,
        avg_at_k=avg_at_k(correct),
        pass_at={k: mean_pass_at_k(correct, k) for k in report_ks(n)},
        best_at_k=best_at_k(correct),
        format_valid_rate=format_valid_rate(rollouts),
        parallel_rate=parallel_rate(rollouts),
        branches_per_fork=branches_per_fork(rollouts),
        total_tokens=total_tokens(rollouts),
        critical_path_tokens=critical_path_tokens(rollouts),
        ideal_speedup=ideal_speedup(rollouts),
        wall_time_s=wall_time,
        tps=tokens_per_second(rollouts, wall_time),
        latency_s=statistics.fmean(latencies),
        latency_median_s=statistics.median(latencies),
        finish_reasons=dict(Counter(r.finish_reason.value for r in rollouts)),
    )


@dataclass(frozen=True)
class Speedup:
    """A run against a sequential baseline of the same model, settings and problems (> 1: the run is faster)."""

    tps: float  # run TPS / baseline TPS
    latency: float  # baseline latency / run latency

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def speedup(run: RunMetrics, baseline: RunMetrics) -> Speedup:
    """Measured speedups of ``run`` over ``baseline`` (both from the same process and hardware)."""
    if run.latency_s <= 0 or baseline.tps <= 0:
        raise ValueError(
            f"speedup needs a positive run latency and baseline TPS, got {run.latency_s} s, {baseline.tps} tok/s"
        )
    return Speedup(tps=run.tps / baseline.tps, latency=baseline.latency_s / run.latency_s)
