"""Pure statistics of the scoreboard: normalised regret, paired bootstrap CIs, paired tests.

Every function takes per-seed values that are *paired*: row ``i`` of every array is the same seed
(the same task set, sampler seed and meta-policy seed) for every arm.

Normalised regret of a method against the grid of fixed temperatures::

    R = (mean(best fixed) - mean(method)) / (mean(best fixed) - mean(worst fixed))

with "best" and "worst" the fixed arms of highest and lowest mean over the seeds. ``R = 0`` matches
the best fixed arm, ``R = 1`` is as bad as the worst, ``R < 0`` beats the best. Its confidence
interval is a percentile bootstrap over seeds: each resample draws seed indices with replacement,
the *same* indices for every arm (paired), and recomputes the whole statistic, best and worst arm
included (so the interval also carries the uncertainty of which fixed arm is best).

Example
-------
>>> import numpy as np
>>> fixed = np.array([[1.0, 0.0, 0.6], [0.8, 0.2, 0.4]])  # 2 seeds x 3 fixed arms
>>> round(normalised_regret(np.array([0.5, 0.7]), fixed), 6)   # (0.9 - 0.6) / (0.9 - 0.1)
0.375
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "mean_ci",
    "normalised_regret",
    "paired_bootstrap_regret",
    "paired_difference",
]


def _as_1d(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {array.tolist()}")
    return array


def _as_fixed(fixed: Any, n_seeds: int) -> np.ndarray:
    array = np.asarray(fixed, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] != n_seeds or array.shape[1] < 2:
        raise ValueError(
            f"fixed must have shape (seeds={n_seeds}, arms >= 2), got {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError("fixed must be finite")
    return array


def _check_level(level: float) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float)):
        raise TypeError(f"level must be a float, got {type(level).__name__}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    return float(level)


def mean_ci(values: Any, level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the Student-t confidence interval of the mean (NaN for one value).

    >>> m, h = mean_ci([1.0, 2.0, 3.0])
    >>> round(m, 3), round(h, 3)
    (2.0, 2.484)
    """
    from scipy import stats

    array = _as_1d(values, "values")
    level = _check_level(level)
    n = array.shape[0]
    if n < 2:
        return float(array.mean()), float("nan")
    sem = array.std(ddof=1) / math.sqrt(n)
    return float(array.mean()), float(stats.t.ppf(0.5 + level / 2, n - 1) * sem)


def _regret_from_means(method_mean: np.ndarray, fixed_means: np.ndarray) -> np.ndarray:
    """Vectorised regret over leading axes: ``method_mean (...)``, ``fixed_means (..., arms)``.

    NaN where every fixed arm has the same mean (the regret is undefined there)."""
    best = fixed_means.max(axis=-1)
    worst = fixed_means.min(axis=-1)
    span = best - worst
    with np.errstate(divide="ignore", invalid="ignore"):
        regret = (best - method_mean) / span
    return np.where(span > 0, regret, np.nan)


def normalised_regret(method: Any, fixed: Any) -> float:
    """Normalised regret of ``method (seeds,)`` against ``fixed (seeds, arms)``; NaN if undefined.

    Undefined (NaN) when every fixed arm has the same mean: then no temperature matters and no
    regret can be normalised.

    >>> normalised_regret([0.9, 0.9], [[0.9, 0.1], [0.9, 0.1]])
    0.0
    >>> normalised_regret([0.5, 0.5], [[0.5, 0.5], [0.5, 0.5]])
    nan
    """
    method_values = _as_1d(method, "method")
    fixed_values = _as_fixed(fixed, method_values.shape[0])
    return float(_regret_from_means(method_values.mean(), fixed_values.mean(axis=0)))


def paired_bootstrap_regret(
    method: Any,
    fixed: Any,
    *,
    resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Normalised regret with a paired percentile-bootstrap confidence interval over seeds.

    Returns ``{"regret", "low", "high", "resamples", "undefined_resamples", "level"}``. Resamples
    whose fixed arms all tie have no regret; they are counted in ``undefined_resamples`` and left
    out of the percentiles (the count says how many). With a single seed there is nothing to
    resample: ``low`` and ``high`` are NaN.

    >>> r = paired_bootstrap_regret([0.5, 0.7], [[1.0, 0.0, 0.6], [0.8, 0.2, 0.4]])
    >>> round(r["regret"], 6), round(r["low"], 4), r["high"]
    (0.375, 0.1667, 0.5)
    """
    method_values = _as_1d(method, "method")
    fixed_values = _as_fixed(fixed, method_values.shape[0])
    level = _check_level(level)
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be an int >= 1, got {resamples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    estimate = normalised_regret(method_values, fixed_values)
    n = method_values.shape[0]
    result: dict[str, Any] = {
        "regret": estimate,
        "low": float("nan"),
        "high": float("nan"),
        "resamples": resamples,
        "undefined_resamples": 0,
        "level": level,
        "seeds": n,
    }
    if n < 2:
        return result
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size=(resamples, n))
    # (resamples, arms) and (resamples,): the same seed indices for every arm (paired)
    fixed_means = fixed_values[index].mean(axis=1)
    method_means = method_values[index].mean(axis=1)
    regrets = _regret_from_means(method_means, fixed_means)
    defined = regrets[np.isfinite(regrets)]
    result["undefined_resamples"] = int(resamples - defined.shape[0])
    if defined.shape[0]:
        tail = (1.0 - level) / 2
        low, high = np.quantile(defined, [tail, 1.0 - tail])
        result["low"], result["high"] = float(low), float(high)
    return result


def paired_difference(method: Any, baseline: Any, level: float = 0.95) -> dict[str, Any]:
    """Paired comparison of ``method - baseline`` over seeds.

    Returns the mean difference with its Student-t half-width, the two-sided Wilcoxon
    signed-rank p-value (the primary test; 1.0 when every difference is 0), the paired t-test
    p-value beside it (NaN when the differences have no spread beyond float rounding), and
    wins/ties/losses by seed.

    >>> r = paired_difference([0.6, 0.7, 0.8], [0.5, 0.7, 0.6])
    >>> round(r["mean"], 3), r["wins"], r["ties"], r["losses"]
    (0.1, 2, 1, 0)
    """
    from scipy import stats

    a = _as_1d(method, "method")
    b = _as_1d(baseline, "baseline")
    if a.shape != b.shape:
        raise ValueError(f"method and baseline must have the same shape, got {a.shape}, {b.shape}")
    diff = a - b
    mean, half = mean_ci(diff, level)
    result: dict[str, Any] = {
        "mean": mean,
        "half_width": half,
        "wins": int((diff > 0).sum()),
        "ties": int((diff == 0).sum()),
        "losses": int((diff < 0).sum()),
        "wilcoxon_p": float("nan"),
        "t_p": float("nan"),
        "seeds": int(diff.shape[0]),
    }
    if diff.shape[0] < 2:
        return result
    if np.all(diff == 0):
        result["wilcoxon_p"] = 1.0
        result["t_p"] = 1.0
        return result
    result["wilcoxon_p"] = float(stats.wilcoxon(diff).pvalue)
    # differences equal up to float rounding (0.2 - 0.1 vs 0.3 - 0.2) have no spread: the
    # t statistic would be a huge number made of rounding errors, so the t-test is undefined
    if np.ptp(diff) > 1e-12 * max(1.0, float(np.abs(diff).max())):
        result["t_p"] = float(stats.ttest_1samp(diff, 0.0).pvalue)
    return result
