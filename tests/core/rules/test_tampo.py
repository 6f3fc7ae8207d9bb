"""The TAMPO rule against hand-computed updates (spec/tampo.md, steps 4-7)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import metactl
from metactl import TAMPO, MetaPolicy, candidate_advantages, minmax_probs, sparsemax


def _policy(alpha: float, normalizer: str = "sparsemax", k: int = 3) -> MetaPolicy:
    candidates = [0.8, 1.0, 1.2, 1.4][:k]
    return MetaPolicy(candidates, TAMPO(alpha=alpha, normalizer=normalizer), seed=0)


def _step(policy: MetaPolicy, loglik, advantages) -> np.ndarray:
    decision = policy.select()
    return policy.update(decision, loglik=np.array(loglik), advantages=np.array(advantages)).probs


def test_sparsemax_hand_cases() -> None:
    # sorted [-1, -1, -3]: support {1, 2}, tau = (-2 - 1) / 2 = -1.5 -> ties split evenly
    np.testing.assert_allclose(sparsemax(np.array([-1.0, -1.0, -3.0])), [0.5, 0.5, 0.0])
    # support {1, 2}, tau = (-2.5 - 1) / 2 = -1.75
    np.testing.assert_allclose(sparsemax(np.array([-1.0, -1.5, -2.0])), [0.75, 0.25, 0.0])
    # all within 1/K of each other: full support, tau = (sum - 1) / K
    np.testing.assert_allclose(sparsemax(np.array([0.1, 0.0, -0.1])), [13 / 30, 1 / 3, 7 / 30])
    # one dominant entry: one-hot
    np.testing.assert_allclose(sparsemax(np.array([5.0, 0.0, 0.0])), [1.0, 0.0, 0.0])


def test_worked_example_two_steps_with_sparsemax_ties() -> None:
    """alpha = 0.05, K = 3.

    Step 1: lhat = [.5, .5, 0] (A = +1) and [0, .5, .5] (A = -1) -> a = [.25, 0, -.25];
            Abar = [.0125, 0, -.0125] -> min-max [1, .5, 0] -> pi = [2/3, 1/3, 0].
    Step 2: lhat = [.75, .25, 0] (A = +2) -> a = [1.5, .5, 0];
            Abar = .95 * [.0125, 0, -.0125] + .05 * [1.5, .5, 0] = [.086875, .025, -.011875]
            -> min-max [1, .036875 / .09875, 0] -> pi = [98750, 36875, 0] / 135625.
    """
    policy = _policy(alpha=0.05)
    probs = _step(policy, [[-1.0, -1.0, -3.0], [-2.0, -0.5, -0.5]], [1.0, -1.0])
    np.testing.assert_allclose(probs, [2 / 3, 1 / 3, 0.0], rtol=1e-12)
    np.testing.assert_allclose(policy.state_dict()["rule_state"]["ema"], [0.0125, 0.0, -0.0125])
    probs = _step(policy, [[-1.0, -1.5, -2.0]], [2.0])
    np.testing.assert_allclose(
        policy.state_dict()["rule_state"]["ema"], [0.086875, 0.025, -0.011875], rtol=1e-12
    )
    np.testing.assert_allclose(probs, [98750 / 135625, 36875 / 135625, 0.0], rtol=1e-12)


def test_worked_example_full_support() -> None:
    """alpha = 0.5. Row 1 sparsemax: tau = -4/3 -> [1/3, 13/30, 7/30];
    row 2: tau = -4.1/3 -> [1/15, 11/30, 17/30]; A = [1, -1] -> a = [2/15, 1/30, -1/6];
    min-max -> [1, 2/3, 0] -> pi = [0.6, 0.4, 0]."""
    policy = _policy(alpha=0.5)
    probs = _step(policy, [[-1.0, -0.9, -1.1], [-1.3, -1.0, -0.8]], [1.0, -1.0])
    np.testing.assert_allclose(probs, [0.6, 0.4, 0.0], rtol=1e-12)
    a = candidate_advantages(
        np.array([[-1.0, -0.9, -1.1], [-1.3, -1.0, -0.8]]), np.array([1, -1.0])
    )
    np.testing.assert_allclose(a, [2 / 15, 1 / 30, -1 / 6], rtol=1e-12)


def test_worked_example_softmax_normalizer() -> None:
    """softmax([0, ln 2, ln 5]) = [1, 2, 5] / 8; alpha = 1 -> Abar = a = [1, 2, 5] / 8;
    min-max -> [0, 1/4, 1] -> pi = [0, .2, .8]."""
    policy = _policy(alpha=1.0, normalizer="softmax")
    probs = _step(policy, [[0.0, math.log(2.0), math.log(5.0)]], [1.0])
    np.testing.assert_allclose(probs, [0.0, 0.2, 0.8], rtol=1e-12)


def test_degenerate_ema_is_uniform() -> None:
    policy = _policy(alpha=0.05, k=4)
    np.testing.assert_array_equal(policy.probs, np.full(4, 0.25))  # before any update
    # all advantages zero on the first step: Abar stays 0 -> uniform
    probs = _step(policy, [[-1.0, -2.0, -3.0, -4.0]] * 2, [0.0, 0.0])
    np.testing.assert_array_equal(probs, np.full(4, 0.25))
    # identical likelihoods under every candidate: every a_k equal -> still uniform
    probs = _step(policy, [[-1.0] * 4, [-2.0] * 4], [1.0, 0.5])
    np.testing.assert_allclose(probs, np.full(4, 0.25), rtol=1e-12)


def test_zero_advantages_leave_the_policy_unchanged() -> None:
    policy = _policy(alpha=0.05)
    before = _step(policy, [[-1.0, -1.0, -3.0], [-2.0, -0.5, -0.5]], [1.0, -1.0])
    after = _step(policy, [[-1.0, -2.0, -3.0]], [0.0])
    np.testing.assert_allclose(after, before, rtol=1e-12, atol=0)
    assert policy.step == 2


def test_minmax_gives_worst_candidate_zero() -> None:
    probs = minmax_probs(np.array([0.3, -0.2, 0.1, 0.0]))
    assert probs[1] == 0.0
    np.testing.assert_allclose(probs.sum(), 1.0)
    np.testing.assert_allclose(probs, np.array([0.5, 0.0, 0.3, 0.2]) / 1.0)


def test_minmax_is_scale_invariant() -> None:
    ema = np.array([3.0, -1.0, 0.5])
    np.testing.assert_allclose(minmax_probs(ema), minmax_probs(ema * 1e-30), rtol=1e-12)
    np.testing.assert_allclose(minmax_probs(ema), minmax_probs(ema + 0.0), rtol=0)


def test_paper_defaults() -> None:
    policy = metactl.tampo()
    assert policy.candidates.tolist() == [0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
    assert policy.rule == TAMPO(alpha=0.05, normalizer="sparsemax")
    assert policy.selector == metactl.Nucleus(top_p=0.7)
    assert policy.requires == ("loglik", "advantages")


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5, float("nan")])
def test_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        TAMPO(alpha=alpha)


def test_bad_normalizer() -> None:
    with pytest.raises(ValueError, match="normalizer"):
        TAMPO(normalizer="entmax")
