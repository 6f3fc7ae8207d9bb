"""Selectors: nucleus over candidates, plain sampling, greedy; the row-wise selection per-context
policies use draws what the one-row selection draws."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import metactl
from metactl import Greedy, Nucleus, Sample
from metactl.selectors import TIE_ULPS, nucleus_support

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
    # fair ties: nothing dropped (with positive mass) is tied with the kept set's least member
    boundary = probs[kept].min()
    tolerance = TIE_ULPS * np.spacing(boundary)
    assert not np.any((probs[dropped] > 0) & (probs[dropped] >= boundary - tolerance))
    # minimal up to ties: without the members tied with the boundary it no longer reaches top_p
    untied = kept[probs[kept] > boundary + tolerance]
    if untied.size < kept.size:
        assert probs[untied].sum() < top_p + 1e-9


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
    probs = np.array([0.2, 0.5, 0.3])
    rng = np.random.default_rng(0)
    assert Nucleus(0.0).select(probs, rng) == (1, 1.0)
    assert Greedy().select(probs, rng) == (1, 1.0)


def test_top_p_zero_samples_fairly_among_tied_maxima() -> None:
    # ties at the top: top_p = 0 keeps every tied maximum (Greedy alone takes the first)
    probs = np.array([0.2, 0.3, 0.3, 0.2])
    assert nucleus_support(probs, 0.0).tolist() == [1, 2]
    rng = np.random.default_rng(0)
    picks = [Nucleus(0.0).select(probs, rng) for _ in range(4000)]
    assert {index for index, _ in picks} == {1, 2}
    assert {prob for _, prob in picks} == {0.5}
    assert abs(np.mean([index == 1 for index, _ in picks]) - 0.5) < 0.03
    assert Greedy().select(probs, rng) == (1, 1.0)  # Greedy stays deterministic: the first


def test_from_uniform_every_candidate_can_be_chosen() -> None:
    probs = np.full(10, 0.1)
    assert nucleus_support(probs, 0.7).tolist() == list(range(10))
    rng = np.random.default_rng(0)
    picks = np.array([Nucleus(0.7).select(probs, rng)[0] for _ in range(5000)])
    counts = np.bincount(picks, minlength=10)
    assert np.all(counts > 0)
    assert np.all(np.abs(counts / 5000 - 0.1) < 0.02)


def test_from_uniform_a_tampo_policy_reaches_the_high_temperatures() -> None:
    # the paper's policy from its uniform start: 1.3-1.5 are reachable too (a stable sort of the
    # tied probabilities would never keep them)
    firsts = {metactl.tampo(seed=seed).select().value for seed in range(200)}
    assert firsts == set(metactl.PAPER_TEMPERATURES)


def test_near_ties_within_a_few_ulps_are_kept_and_real_gaps_are_not() -> None:
    base = np.array([0.4, 0.2, 0.2, 0.2])
    near = base.copy()
    near[3] = 0.2 - 2 * np.spacing(0.2)  # two ulps below the boundary: tied
    assert sorted(nucleus_support(near, 0.5).tolist()) == [0, 1, 2, 3]
    far = base.copy()
    far[3] = 0.2 * (1 - 1e-9)  # a relative gap of 1e-9 is a real difference
    far /= far.sum()
    assert sorted(nucleus_support(far, 0.5).tolist()) == [0, 1, 2]
    beyond = base.copy()
    beyond[3] = 0.2 - (TIE_ULPS + 1) * np.spacing(0.2)
    assert sorted(nucleus_support(beyond, 0.5).tolist()) == [0, 1, 2]
    # the rule is relative: the same pattern at a tiny scale behaves alike
    tiny = near * 1e-200
    assert sorted(nucleus_support(tiny / tiny.sum(), 0.5).tolist()) == [0, 1, 2, 3]


def test_zero_probability_candidates_are_never_kept_even_when_tied() -> None:
    probs = np.array([0.5, 0.5, 0.0, 0.0])
    assert nucleus_support(probs, 1.0).tolist() == [0, 1]
    rng = np.random.default_rng(0)
    assert {Nucleus(1.0).select(probs, rng)[0] for _ in range(500)} == {0, 1}


def test_nucleus_draws_exactly_one_uniform_number_with_ties() -> None:
    rng, twin = np.random.default_rng(5), np.random.default_rng(5)
    Nucleus(0.7).select(np.full(10, 0.1), rng)
    twin.random()
    assert rng.bit_generator.state == twin.bit_generator.state


def test_sample_never_picks_zero_probability() -> None:
    probs = np.array([0.0, 0.5, 0.0, 0.5])
    rng = np.random.default_rng(0)
    picks = {Sample().select(probs, rng)[0] for _ in range(2000)}
    assert picks == {1, 3}


@pytest.mark.parametrize("top_p", [-0.1, 1.1, float("nan")])
def test_bad_top_p(top_p: float) -> None:
    with pytest.raises(ValueError, match="top_p"):
        Nucleus(top_p)


@settings(max_examples=200, deadline=None)
@given(
    raw=arrays(np.float64, (6, 5), elements=st.sampled_from([0.0, 0.0, 0.1, 0.2, 0.25, 0.5, 1.0])),
    top_p=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.9, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_vectorised_selectors_match_the_scalar_ones(
    raw: np.ndarray, top_p: float, seed: int
) -> None:
    raw[:, 0] += 1e-3  # every row has some mass
    probs = raw / raw.sum(axis=1, keepdims=True)

    def inverse_cdf(p: np.ndarray, u: float) -> int:
        cdf = np.cumsum(p)
        index = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
        return min(index, int(np.flatnonzero(p > 0)[-1]))

    def scalar(selector: object, row: np.ndarray, rng: np.random.Generator) -> tuple[int, float]:
        """The selection rule one row at a time, written out with nucleus_support."""
        if isinstance(selector, Greedy):
            return int(np.argmax(row)), 1.0
        if isinstance(selector, Sample):
            index = inverse_cdf(row, rng.random())
            return index, float(row[index] / row.sum())
        kept = nucleus_support(row, top_p)
        mass = row[kept] / row[kept].sum()
        u = rng.random()
        choice = inverse_cdf(mass, u) if kept.shape[0] > 1 else 0
        return int(kept[choice]), float(mass[choice])

    for selector in (Nucleus(top_p), Sample(), Greedy()):
        scalar_rng = np.random.default_rng(seed)
        expected = [scalar(selector, row, scalar_rng) for row in probs]
        vector_rng = np.random.default_rng(seed)
        index, prob = selector.select_rows(probs, vector_rng)
        assert [(int(i), float(p)) for i, p in zip(index, prob, strict=True)] == expected
        assert scalar_rng.bit_generator.state == vector_rng.bit_generator.state



@pytest.mark.parametrize("rows", [63, 64, 300])
@pytest.mark.parametrize("top_p", [0.0, 0.5, 0.7, 1.0])
def test_many_rows_select_as_one_row_at_a_time(rows: int, top_p: float) -> None:
    """From 64 rows on, the running sums are added one candidate vector at a time: the same
    bits as one row at a time (whose selection the test above checks), ties and zeros
    included, with the same draws."""
    rng = np.random.default_rng(rows)
    raw = rng.choice([0.0, 0.0, 0.1, 0.2, 0.25, 0.5, 1.0], size=(rows, 10))
    raw[::3] = rng.random((len(raw[::3]), 10))  # rows without ties too
    raw[:, 0] += 1e-3
    probs = raw / raw.sum(axis=1, keepdims=True)
    batch_rng, row_rng = np.random.default_rng(7), np.random.default_rng(7)
    index, prob = Nucleus(top_p).select_rows(probs, batch_rng)
    one = [Nucleus(top_p).select_rows(probs[i : i + 1], row_rng) for i in range(rows)]
    assert np.array_equal(index, np.concatenate([i for i, _ in one]))
    assert prob.tobytes() == np.concatenate([p for _, p in one]).tobytes()
    assert index.dtype == np.int64 and prob.dtype == np.float64


@pytest.mark.parametrize("k", [1, 2, 7, 8, 9, 10, 15, 16, 20])
def test_kept_totals_columns_equal_the_row_sums(k: int) -> None:
    """The vector sums over candidates give numpy's row sums of each kept prefix, bit for bit."""
    from metactl.selectors import _kept_totals, _kept_totals_columns

    rng = np.random.default_rng(k)
    for n in (1, 5, 200):
        scale = rng.choice([0.0, 1e-300, 1e-3, 1.0, 1e3], size=(n, k))
        ordered = -np.sort(-(rng.random((n, k)) * scale), axis=1)
        kept_size = rng.integers(1, k + 1, size=n)
        plain = _kept_totals(ordered, kept_size)
        fast = _kept_totals_columns(np.ascontiguousarray(ordered.T), kept_size)
        assert np.array_equal(plain, fast) and np.array_equal(np.signbit(plain), np.signbit(fast))
