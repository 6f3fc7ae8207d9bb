"""The bandit rules (``metactl.rules.bandits``: EXP3, UCB1, ThompsonGaussian): each finds
the best arm, EXP3's importance weighting by hand, UCB1's first round, and the reward they need."""

from __future__ import annotations

import numpy as np
import pytest

from metactl import EXP3, UCB1, MetaPolicy, ThompsonGaussian

CANDIDATES = [0.6, 0.9, 1.2, 1.5]


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
