"""PTGS (``metactl.rules.ptgs``), the rule of the research note: its tempering rule and
pivot ramp by hand, hand-computed draws, easy prompts cool and hard prompts heat, values in range,
and the settings and candidates it needs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import metactl
from metactl import PTGS, MetaPolicy


def test_ptgs_tempering_rule_by_hand() -> None:
    rule = PTGS(tau=1.5, t_ref=1.2)
    pivot = 0.25
    p_hat = np.array([0.0, 0.125, 0.25, 0.625, 1.0])
    # h = (p~ - p^) / p~ below the pivot, (p~ - p^) / (1 - p~) above it
    expected = 1.2 * 1.5 ** np.array([1.0, 0.5, 0.0, -0.5, -1.0])
    np.testing.assert_allclose(rule.temperature(p_hat, pivot), expected, rtol=1e-15)
    assert rule.temperature(np.array([0.25]), pivot)[0] == 1.2
    low, high = rule.bounds
    assert (low, high) == (1.2 / 1.5, 1.2 * 1.5)
    assert rule.temperature(np.array([0.0, 1.0]), pivot).tolist() == [high, low]


def test_ptgs_pivot_ramp_is_geometric() -> None:
    rule = PTGS(total_steps=100)
    assert rule.pivot(0) == 0.25
    assert rule.pivot(50) == pytest.approx(0.25 * 2**0.5, rel=1e-15)
    assert rule.pivot(100) == pytest.approx(0.5, rel=1e-15)
    assert rule.pivot(250) == rule.pivot(100)  # u stays 1 after total_steps
    assert all(rule.pivot(s) < rule.pivot(s + 1) for s in range(100))
    assert PTGS().pivot(0) == PTGS().pivot(10**6) == 0.25  # total_steps=None: no ramp


def test_ptgs_hand_computed_draws() -> None:
    tau, gamma, t_ref = 1.4, 0.9, 1.1
    policy = metactl.ptgs(seed=7, tau=tau, gamma=gamma, t_ref=t_ref, total_steps=4)
    replica = np.random.Generator(np.random.PCG64(7))

    def expected(s: list[float], f: list[float], step: int) -> np.ndarray:
        pivot = 0.25 * (0.5 / 0.25) ** (step / 4)
        out = []
        for s_x, f_x in zip(s, f, strict=True):
            p_hat = replica.beta(2 * pivot + s_x, 2 * (1 - pivot) + f_x)
            h = (pivot - p_hat) / pivot if p_hat <= pivot else (pivot - p_hat) / (1 - pivot)
            out.append(t_ref * tau**h)
        return np.array(out)

    batch = policy.select(contexts=["a", "b", 3])
    np.testing.assert_allclose(batch.values, expected([0, 0, 0], [0, 0, 0], 0), rtol=1e-14)
    # G = 4: a succeeds 4 / 4, b 1 / 4, 3 fails every rollout
    policy.update(batch, rewards=[1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    batch = policy.select(contexts=["a", "b", "new", 3])
    np.testing.assert_allclose(batch.values, expected([4, 1, 0, 0], [0, 3, 0, 4], 1), rtol=1e-14)
    # second update: a gets 2 / 4 more, b 4 / 4, new 0 / 4, 3 1 / 4
    policy.update(batch, rewards=[1, 1, 0, 0] + [1] * 4 + [0] * 4 + [1, 0, 0, 0])
    s = [gamma * 4 + 2, gamma * 1 + 4, 0.0, gamma * 0 + 1]
    f = [gamma * 0 + 2, gamma * 3 + 0, 4.0, gamma * 4 + 3]
    batch = policy.select(contexts=["a", "b", "new", 3])
    np.testing.assert_allclose(batch.values, expected(s, f, 2), rtol=1e-14)
    rows = policy.state_dict()["contexts"]["rows"]
    keys = policy.state_dict()["contexts"]["keys"]
    by_key = dict(zip(keys, zip(rows["successes"], rows["failures"], strict=True), strict=True))
    for key, s_x, f_x in zip(["a", "b", "new", 3], s, f, strict=True):
        assert by_key[key] == pytest.approx((s_x, f_x), rel=1e-15)
    # the global context pools every row: 5 / 12 then 7 / 16 successes
    state = policy.state_dict()["rule_state"]
    assert state["successes"] == pytest.approx(gamma * 5 + 7, rel=1e-15)
    assert state["failures"] == pytest.approx(gamma * 7 + 9, rel=1e-15)


def test_ptgs_easy_prompts_cool_hard_prompts_heat() -> None:
    policy = metactl.ptgs(seed=0)
    for _ in range(10):  # G = 8: "easy" always succeeds, "hard" always fails, "mid" 2 / 8
        batch = policy.select(contexts=["easy", "hard", "mid"])
        policy.update(batch, rewards=[1.0] * 8 + [0.0] * 8 + [1.0] * 2 + [0.0] * 6)
    draws = np.array([policy.select(contexts=["easy", "hard", "mid"]).values for _ in range(300)])
    easy, hard, mid = draws.T
    assert np.all(easy < 1.0) and np.mean(easy) < 0.75  # near t_ref / tau
    assert np.all(hard > 1.0) and np.mean(hard) > 1.35  # near tau t_ref
    assert 0.85 < np.median(mid) < 1.15  # a pass rate at the pivot: about t_ref
    probs = policy.context_probs(["easy", "hard"])
    grid = policy.candidates
    assert probs[0] @ grid < 0.8 and probs[1] @ grid > 1.3


def test_ptgs_decision_prob_is_the_cell_probability() -> None:
    policy = metactl.ptgs(seed=3)
    policy.update(policy.select(contexts=[0, 1]), rewards=[1, 1, 0, 0, 0, 1])
    batch = policy.select(contexts=[0, 1, 2])
    table = policy.context_probs([0, 1, 2])
    np.testing.assert_allclose(table.sum(axis=1), 1.0, atol=1e-12)
    assert not batch.on_grid.any()
    np.testing.assert_allclose(batch.probs, table[np.arange(3), batch.indices], rtol=1e-12)
    nearest = np.argmin(np.abs(batch.values[:, None] - policy.candidates[None, :]), axis=1)
    assert batch.indices.tolist() == nearest.tolist()
    # empirical frequencies of the nearest candidate match the cell probabilities
    indices = np.array([policy.select(contexts=[0, 1, 2]).indices for _ in range(4000)])
    for row in range(3):
        freq = np.bincount(indices[:, row], minlength=policy.candidates.shape[0]) / 4000
        assert np.max(np.abs(freq - table[row])) < 0.04


@settings(max_examples=80, deadline=None)
@given(
    tau=st.floats(1.01, 3.0),
    t_ref=st.floats(0.1, 5.0),
    pivot=st.floats(0.01, 0.99),
    p_hat=arrays(np.float64, 20, elements=st.floats(0.0, 1.0)),
)
def test_ptgs_temperatures_stay_in_range(
    tau: float, t_ref: float, pivot: float, p_hat: np.ndarray
) -> None:
    rule = PTGS(tau=tau, t_ref=t_ref)
    temps = rule.temperature(p_hat, pivot)
    low, high = rule.bounds
    assert np.all((temps >= low) & (temps <= high))
    order = np.argsort(p_hat, kind="stable")
    assert np.all(np.diff(temps[order]) <= 1e-12 * high)  # non-increasing in p^


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    tau=st.floats(1.05, 2.0),
    rewards=arrays(np.float64, 24, elements=st.floats(0.0, 1.0)),
)
def test_ptgs_policy_values_in_range(seed: int, tau: float, rewards: np.ndarray) -> None:
    policy = metactl.ptgs(seed=seed, tau=tau, t_ref=0.9, total_steps=3)
    low, high = policy.rule.bounds
    for _ in range(4):
        batch = policy.select(contexts=[1, 2, 3, 1])
        assert np.all((batch.values >= low) & (batch.values <= high))
        policy.update(batch, rewards=rewards[:16])  # G = 4, fractional rewards allowed


def test_ptgs_needs_positive_candidates_and_valid_settings() -> None:
    with pytest.raises(ValueError, match="temperatures > 0"):
        MetaPolicy([-1.0, 1.0], PTGS(), hyperparameter="generic")
    for kwargs, match in [
        ({"tau": 1.0}, "tau must be > 1"),
        ({"gamma": 0.0}, "gamma"),
        ({"pivot_start": 1.0}, "pivot_start"),
        ({"pivot_end": 0.0}, "pivot_end"),
        ({"total_steps": 0}, "total_steps"),
        ({"max_contexts": 0}, "max_contexts"),
        ({"t_ref": -1.0}, "t_ref"),
    ]:
        with pytest.raises(ValueError, match=match):
            PTGS(**kwargs)
    with pytest.raises(TypeError, match="total_steps"):
        PTGS(total_steps=1.5)  # type: ignore[arg-type]
