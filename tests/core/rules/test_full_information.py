"""The full-information rules besides TAMPO (``metactl.rules.full_information``: Hedge,
MetaGradient), next to TAMPO: each moves to the rewarded candidate, and one step of each by hand."""

from __future__ import annotations

import numpy as np
import pytest

import metactl
from metactl import Hedge, MetaGradient, MetaPolicy

CANDIDATES = [0.6, 0.9, 1.2, 1.5]


def _likelihood_batch(rng: np.random.Generator, good: int, n: int = 16) -> dict:
    """Positive-advantage trajectories are most likely under candidate ``good``; negative ones
    under the others."""
    advantages = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    loglik = rng.normal(-2.0, 0.05, size=(n, len(CANDIDATES)))
    for i, a in enumerate(advantages):
        favoured = good if a > 0 else (good + 1 + i % (len(CANDIDATES) - 1)) % len(CANDIDATES)
        loglik[i, favoured] += 1.0
    return {"loglik": loglik, "advantages": advantages}


@pytest.mark.parametrize(
    "rule",
    [metactl.TAMPO(alpha=0.1), Hedge(), MetaGradient(), MetaGradient(estimator="sampled")],
    ids=lambda r: repr(r),
)
def test_full_information_rules_move_to_the_rewarded_candidate(rule) -> None:
    rng = np.random.default_rng(0)
    policy = MetaPolicy(CANDIDATES, rule, seed=0)
    start = policy.probs[2]
    for _ in range(60):
        policy.update(policy.select(), **_likelihood_batch(rng, good=2))
    assert policy.probs[2] > start
    assert int(np.argmax(policy.probs)) == 2


def test_hedge_is_exponentiated_gradient() -> None:
    policy = MetaPolicy([1.0, 2.0], Hedge(step_size=2.0), seed=0)
    # one trajectory, sparsemax of [-1, -1.5] = [.75, .25], A = 1 -> a = [.75, .25]
    info = policy.update(policy.select(), loglik=[[-1.0, -1.5]], advantages=[1.0])
    np.testing.assert_allclose(info.candidate_advantages, [0.75, 0.25])
    expected = np.exp([1.5, 0.5]) / np.exp([1.5, 0.5]).sum()
    np.testing.assert_allclose(policy.probs, expected, rtol=1e-12)


def test_metagradient_expected_gradient_by_hand() -> None:
    policy = MetaPolicy([1.0, 2.0], MetaGradient(lr=2.0), seed=0)
    # pi = [.5, .5], a = [.75, .25], grad = pi * (a - pi.a) = [.125, -.125]; logits += 2 * grad
    policy.update(policy.select(), loglik=[[-1.0, -1.5]], advantages=[1.0])
    expected = np.exp([0.25, -0.25]) / np.exp([0.25, -0.25]).sum()
    np.testing.assert_allclose(policy.probs, expected, rtol=1e-12)
