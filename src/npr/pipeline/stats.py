"""Bootstrap intervals over problems: how far a rate, a speedup or a difference between models could move
if the same models met other problems of the same kind.

Problems are the unit that is resampled (a problem's k samples stay together); paired statistics resample
the same problems for both models, so what both get right or wrong cancels out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0


def _interval(stat: Callable[[np.ndarray], np.ndarray], n: int) -> tuple[float, float]:
    """The central LEVEL interval of `stat` over RESAMPLES resamples of n problem indices."""
    if n < 1:
        raise ValueError("a bootstrap interval needs at least one problem")
    picks = np.random.default_rng(SEED).integers(0, n, size=(RESAMPLES, n))
    values = stat(picks)
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Interval of the mean of per-problem values (e.g. each problem's share of right samples).

    >>> mean_ci([1.0] * 10)
    (1.0, 1.0)
    """
    x = np.asarray(values, dtype=float)
    return _interval(lambda idx: x[idx].mean(axis=1), len(x))


def diff_ci(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Paired interval of mean(a) − mean(b) over the same problems."""
    x, y = _paired(a, b)
    return _interval(lambda idx: x[idx].mean(axis=1) - y[idx].mean(axis=1), len(x))


def ratio_ci(num: Sequence[float], den: Sequence[float]) -> tuple[float, float]:
    """Paired interval of sum(num) / sum(den) over the same problems (a speedup: base time / model time)."""
    x, y = _paired(num, den)
    return _interval(lambda idx: x[idx].sum(axis=1) / y[idx].sum(axis=1), len(x))


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    if len(a) != len(b):
        raise ValueError(f"paired values need the same problems, got {len(a)} and {len(b)}")
    return np.asarray(a, dtype=float), np.asarray(b, dtype=float)
