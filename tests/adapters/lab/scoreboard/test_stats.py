"""The scoreboard's statistics on synthetic numbers computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from metactl.adapters.lab.scoreboard.stats import (
    mean_ci,
    normalised_regret,
    paired_bootstrap_regret,
    paired_difference,
)

# 2 seeds x 3 fixed arms: means 0.9 (best), 0.1 (worst), 0.5
FIXED = np.array([[1.0, 0.0, 0.6], [0.8, 0.2, 0.4]])


def test_normalised_regret_by_hand() -> None:
    # (0.9 - 0.6) / (0.9 - 0.1)
    assert normalised_regret([0.5, 0.7], FIXED) == pytest.approx(0.375)
    # the best fixed arm itself has regret 0, the worst 1
    assert normalised_regret(FIXED[:, 0], FIXED) == 0.0
    assert normalised_regret(FIXED[:, 1], FIXED) == 1.0
    # better than the best: negative; (0.9 - 1.0) / 0.8
    assert normalised_regret([1.0, 1.0], FIXED) == pytest.approx(-0.125)
    # worse than the worst: above 1; (0.9 - 0.0) / 0.8
    assert normalised_regret([0.0, 0.0], FIXED) == pytest.approx(1.125)


def test_regret_is_undefined_when_every_fixed_arm_ties() -> None:
    assert math.isnan(normalised_regret([0.3, 0.4], [[0.5, 0.5], [0.2, 0.2]]))


def test_paired_bootstrap_interval_by_hand() -> None:
    # With 2 seeds the resamples are (0,0), (0,1), (1,0), (1,1):
    #   (0,0): fixed means (1.0, 0.0, 0.6), method 0.5 -> (1.0 - 0.5) / 1.0 = 0.5
    #   (1,1): fixed means (0.8, 0.2, 0.4), method 0.7 -> (0.8 - 0.7) / 0.6 = 1/6
    #   mixed: the full-sample value 0.375 (probability 1/2)
    # so the 2.5% and 97.5% percentiles are exactly 1/6 and 0.5.
    result = paired_bootstrap_regret([0.5, 0.7], FIXED, resamples=4000, seed=1)
    assert result["regret"] == pytest.approx(0.375)
    assert result["low"] == pytest.approx(1 / 6)
    assert result["high"] == pytest.approx(0.5)
    assert result["undefined_resamples"] == 0
    assert result["seeds"] == 2


def test_bootstrap_pairs_seeds_and_repicks_the_best_arm() -> None:
    # Arm 0 is best on seed 0, arm 1 on seed 1; the method equals the better arm on every seed,
    # so on every paired resample it is at least as good as that resample's best arm:
    # regret <= 0 everywhere. Full sample: arm means 0.5 and 0.4, method 0.9 -> -0.4 / 0.1 = -4.
    # Resamples (0,0) and (1,1) pick a different best arm each and give exactly 0.
    fixed = np.array([[1.0, 0.0], [0.0, 0.8]])
    result = paired_bootstrap_regret([1.0, 0.8], fixed, resamples=4000)
    assert result["regret"] == pytest.approx(-4.0)
    assert result["high"] == pytest.approx(0.0) and result["low"] == pytest.approx(-4.0)


def test_bootstrap_counts_undefined_resamples() -> None:
    # seed 0: both arms 0.5 (tie); seed 1: arms differ. Resample (0,0) has no regret.
    fixed = np.array([[0.5, 0.5], [1.0, 0.0]])
    result = paired_bootstrap_regret([0.5, 0.5], fixed, resamples=4000, seed=0)
    assert result["regret"] == pytest.approx((0.75 - 0.5) / 0.5)
    assert 700 < result["undefined_resamples"] < 1300  # about a quarter of 4000
    assert result["low"] == pytest.approx(0.5) and result["high"] == pytest.approx(0.5)


def test_single_seed_has_no_interval() -> None:
    result = paired_bootstrap_regret([0.5], [[1.0, 0.0]])
    assert result["regret"] == 0.5
    assert math.isnan(result["low"]) and math.isnan(result["high"])


def test_paired_difference_by_hand() -> None:
    r = paired_difference([0.6, 0.7, 0.8, 0.9], [0.5, 0.7, 0.6, 0.6])
    # differences 0.1, 0, 0.2, 0.3: mean 0.15, sd sqrt(0.05/3)
    assert r["mean"] == pytest.approx(0.15)
    assert r["half_width"] == pytest.approx(3.182446 * math.sqrt(0.05 / 3) / 2, rel=1e-5)
    assert (r["wins"], r["ties"], r["losses"]) == (3, 1, 0)
    assert 0 < r["t_p"] < 0.2 and 0 < r["wilcoxon_p"] <= 0.25
    same = paired_difference([0.1, 0.2], [0.1, 0.2])
    assert same["wilcoxon_p"] == 1.0 and same["t_p"] == 1.0 and same["ties"] == 2
    constant = paired_difference([0.2, 0.3, 0.4], [0.1, 0.2, 0.3])
    assert math.isnan(constant["t_p"])  # no spread: the t-test is undefined, not "p = 0"
    assert constant["wilcoxon_p"] == pytest.approx(0.25)  # exact: 2 / 2^3


def test_mean_ci_by_hand() -> None:
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert math.isnan(mean_ci([4.0])[1])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: normalised_regret([], [[1.0, 0.0]]), "method must be a non-empty 1-D"),
        (lambda: normalised_regret([0.5, np.nan], FIXED), "method must be finite"),
        (lambda: normalised_regret([0.5], FIXED), "fixed must have shape"),
        (lambda: normalised_regret([0.5, 0.5], [[1.0], [0.0]]), "fixed must have shape"),
        (lambda: normalised_regret([0.5, 0.5], [[1.0, np.inf], [0.0, 1.0]]),
         "fixed must be finite"),
        (lambda: paired_bootstrap_regret([0.5, 0.7], FIXED, resamples=0), "resamples"),
        (lambda: paired_bootstrap_regret([0.5, 0.7], FIXED, level=1.0), "level"),
        (lambda: paired_bootstrap_regret([0.5, 0.7], FIXED, seed=-1), "seed"),
        (lambda: paired_difference([0.5, 0.7], [0.5]), "same shape"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("suffix", [".stats", ".suite", ".signal_record"])
def test_docstring_examples(suffix: str) -> None:
    import doctest
    import importlib

    module = importlib.import_module("metactl.adapters.lab.scoreboard" + suffix)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
