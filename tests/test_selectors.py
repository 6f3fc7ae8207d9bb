"""Selectors: nucleus over candidates, plain sampling, greedy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from metactl import Greedy, Nucleus, Sample
from metactl.selectors import nucleus_support

probabilities = (
    arrays(np.float64, st.integers(2, 12), elements=st.floats(0, 1))
    .filter(lambda p: p.sum() > 1e-6)
    .map(lambda p: p / p.sum())
)


@given(probs=probabilities, top_p=st.floats(0, 1))
@settings(max_examples=300, deadline=None)
def test_nucleus_keeps_the_smallest_set_reaching_top_p(probs: np.ndarray, top_p: float) -> None:
    kept = nucleus_support(probs, top_p)
    mass = probs[kept].sum()
    assert mass >= top_p - 1e-9
    # the kept set holds the most probable candidates
    dropped = np.setdiff1d(np.arange(probs.shape[0]), kept)
    if dropped.size:
        assert probs[kept].min() >= probs[dropped].max()
    # minimal: without its least probable member the set no longer reaches top_p
    if kept.size > 1:
        assert mass - probs[kept[-1]] < top_p + 1e-9


@given(probs=probabilities, seed=st.integers(0, 2**32 - 1), top_p=st.floats(0, 1))
@settings(max_examples=200, deadline=None)
def test_selected_index_lies_in_the_nucleus(probs: np.ndarray, seed: int, top_p: float) -> None:
    index, prob = Nucleus(top_p).select(probs, np.random.default_rng(seed))
    assert index in nucleus_support(probs, top_p)
    kept = nucleus_support(probs, top_p)
    assert np.isclose(prob, probs[index] / probs[kept].sum())


def test_nucleus_frequencies_match_the_renormalised_mass() -> None:
    probs = np.array([0.1, 0.5, 0.3, 0.1])
    rng = np.random.default_rng(0)
    picks = np.array([Nucleus(0.7).select(probs, rng)[0] for _ in range(20000)])
    assert set(np.unique(picks)) == {1, 2}
    assert abs(np.mean(picks == 1) - 0.625) < 0.015


def test_top_p_zero_is_argmax_and_greedy_matches() -> None:
    probs = np.array([0.2, 0.3, 0.3, 0.2])
    rng = np.random.default_rng(0)
    assert Nucleus(0.0).select(probs, rng) == (1, 1.0)  # ties: first
    assert Greedy().select(probs, rng) == (1, 1.0)


def test_sample_never_picks_zero_probability() -> None:
    probs = np.array([0.0, 0.5, 0.0, 0.5])
    rng = np.random.default_rng(0)
    picks = {Sample().select(probs, rng)[0] for _ in range(2000)}
    assert picks == {1, 3}


@pytest.mark.parametrize("top_p", [-0.1, 1.1, float("nan")])
def test_bad_top_p(top_p: float) -> None:
    with pytest.raises(ValueError, match="top_p"):
        Nucleus(top_p)
