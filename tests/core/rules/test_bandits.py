"""Behaviour of every controller besides TAMPO: each learns (or follows) what it should."""

from __future__ import annotations

import math

import numpy as np
import pytest

import metactl
from metactl import (
    EXP3,
    UCB1,
    EntropyTarget,
    Fixed,
    Hedge,
    MetaGradient,
    MetaPolicy,
    Schedule,
    ThompsonGaussian,
)

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


def _bandit_run(rule, means: list[float], steps: int, seed: int = 0) -> MetaPolicy:
    rng = np.random.default_rng(seed)
    policy = MetaPolicy(CANDIDATES, rule, seed=seed)
    for _ in range(steps):
        decision = policy.select()
        reward = float(np.clip(rng.normal(means[decision.index], 0.1), 0, 1))
        policy.update(decision, reward=reward)
    return policy


@pytest.mark.parametrize(
    "rule",
    [EXP3(gamma=0.1), UCB1(), ThompsonGaussian(noise_std=0.1)],
    ids=lambda r: type(r).__name__,
)
def test_bandits_find_the_best_arm(rule) -> None:
    policy = _bandit_run(rule, [0.2, 0.3, 0.8, 0.4], steps=400)
    assert int(np.argmax(policy.probs)) == 2


def test_exp3_importance_weighting_by_hand() -> None:
    policy = MetaPolicy([1.0, 2.0], EXP3(gamma=0.5), seed=0)
    np.testing.assert_allclose(policy.probs, [0.5, 0.5])
    decision = policy.select()
    policy.update(decision, reward=1.0)
    # w_chosen += (gamma / K) * r / p = 0.25 * 1 / 0.5
    boosted = np.exp(0.5) / (np.exp(0.5) + 1.0)
    expected = np.full(2, 0.25) + 0.5 * np.where(
        np.arange(2) == decision.index, boosted, 1 - boosted
    )
    np.testing.assert_allclose(policy.probs, expected, rtol=1e-12)


def test_exp3_rejects_out_of_range_rewards() -> None:
    policy = MetaPolicy(CANDIDATES, EXP3(), seed=0)
    with pytest.raises(ValueError, match="reward_min"):
        policy.update(policy.select(), reward=1.5)
    with pytest.raises(ValueError, match="reward_max"):
        EXP3(reward_min=1.0, reward_max=1.0)


def test_ucb1_tries_each_arm_once_first() -> None:
    policy = MetaPolicy(CANDIDATES, UCB1(), seed=0)
    order = []
    for _ in range(len(CANDIDATES)):
        decision = policy.select()
        order.append(decision.index)
        policy.update(decision, reward=0.5)
    assert order == [0, 1, 2, 3]


def test_bandits_need_reward() -> None:
    policy = MetaPolicy(CANDIDATES, UCB1(), seed=0)
    with pytest.raises(ValueError, match="reward"):
        policy.update(policy.select(), loglik=np.zeros((2, 4)), advantages=np.zeros(2))


def test_fixed_always_chooses_its_value() -> None:
    policy = MetaPolicy(CANDIDATES, Fixed(1.2), seed=0)
    for _ in range(5):
        decision = policy.select()
        assert decision.value == 1.2 and decision.index == 2
        policy.update(decision)
    with pytest.raises(ValueError, match="not one of the candidates"):
        MetaPolicy(CANDIDATES, Fixed(1.0))


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("linear", [0.9, 1.05, 1.2, 1.35, 1.5, 1.5]),
        (
            "cosine",
            [
                0.9,
                0.9 + 0.6 * (1 - math.cos(math.pi / 4)) / 2,
                1.2,
                0.9 + 0.6 * (1 - math.cos(3 * math.pi / 4)) / 2,
                1.5,
                1.5,
            ],
        ),
    ],
)
def test_schedule_values(kind: str, expected: list[float]) -> None:
    policy = MetaPolicy(CANDIDATES, Schedule(kind, 0.9, 1.5, total_steps=5), seed=0)
    values = []
    for _ in range(6):
        decision = policy.select()
        values.append(decision.value)
        assert decision.index == int(np.argmin(np.abs(np.array(CANDIDATES) - decision.value)))
        policy.update(decision)
    np.testing.assert_allclose(values, expected, rtol=1e-12)


def test_schedule_validation() -> None:
    with pytest.raises(ValueError, match="kind"):
        Schedule("exponential", 0.9, 1.5, 10)
    with pytest.raises(ValueError, match="total_steps"):
        Schedule("linear", 0.9, 1.5, 0)
    with pytest.raises(ValueError, match="end"):
        MetaPolicy(CANDIDATES, Schedule("linear", 0.9, 2.0, 10))


def test_entropy_target_follows_the_e3_rule() -> None:
    policy = MetaPolicy(CANDIDATES, EntropyTarget(target_entropy=2.0, initial=0.9), seed=0)
    decision = policy.select()
    policy.update(decision, entropy=1.0, vocab_size=1000)
    expected = 0.9 * (1 + 0.9 * math.log(2.0) / (math.log(1000) + math.log(math.log(1000))))
    assert policy.select().value == pytest.approx(expected, rel=1e-12)
    # entropy above target cools down; the value stays inside the candidate range
    for _ in range(50):
        policy.update(policy.select(), entropy=20.0, vocab_size=1000)
    assert policy.select().value == pytest.approx(min(CANDIDATES))
    with pytest.raises(ValueError, match="entropy"):
        policy.update(policy.select(), entropy=0.0, vocab_size=1000)
    with pytest.raises(ValueError, match="vocab_size"):
        policy.update(policy.select(), entropy=1.0)
