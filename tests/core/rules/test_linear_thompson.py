"""LinearThompson (``metactl.rules.linear_thompson``): features, so new prompts benefit
from old ones."""

from __future__ import annotations

import numpy as np
import pytest

import metactl


def _spread_env(
    values: np.ndarray, features: np.ndarray, rng: np.random.Generator, group: int
) -> np.ndarray:
    """Feature 1 prompts give mixed rewards only when sampled hot (T >= 1.2), feature 0
    prompts only when sampled cold (T <= 0.8); otherwise every rollout gets the same reward."""
    hot = features[:, 0] > 0.5
    mixed = np.where(hot, values >= 1.2 - 1e-9, values <= 0.8 + 1e-9)
    p = np.where(mixed, 0.5, np.where(hot, 0.0, 1.0))
    return (rng.random((values.shape[0], group)) < p[:, None]).astype(float).reshape(-1)


def test_linear_thompson_transfers_to_unseen_prompts() -> None:
    policy = metactl.linear_thompson(seed=0, feature_dim=1, noise_std=0.2)
    rng = np.random.default_rng(0)
    for step in range(40):
        keys = list(range(step * 32, (step + 1) * 32))  # every prompt is new
        features = (np.arange(32) % 2).astype(float)[:, None]
        batch = policy.select(contexts=keys, features=features)
        policy.update(batch, rewards=_spread_env(batch.values, features, rng, 8))
    probs = policy.context_probs([-1, -2], features=[[1.0], [0.0]])
    grid = policy.candidates
    assert probs[0][grid >= 1.2 - 1e-9].sum() > 0.8  # a new hot-type prompt: sampled hot
    assert probs[1][grid <= 0.8 + 1e-9].sum() > 0.8  # a new cold-type prompt: sampled cold
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    batch = policy.select(contexts=[-1, -2], features=[[1.0], [0.0]])
    assert batch.on_grid.all() and np.all((batch.probs >= 0) & (batch.probs <= 1))
    np.testing.assert_allclose(batch.probs, probs[[0, 1], batch.indices], atol=0.02)


def test_linear_thompson_running_pass_rate_is_a_feature() -> None:
    rule = metactl.LinearThompson()
    phi = rule.phi({"successes": np.array([0.0, 8.0]), "failures": np.array([0.0, 0.0])}, None)
    assert phi[0].tolist() == [1.0, 0.0, 0.0]  # unseen: pass rate 1/2
    assert phi[1].tolist() == pytest.approx([1.0, 0.4, 0.16])  # (8 + 1) / (8 + 2) - 1/2


@pytest.mark.parametrize("rows", [1, 3, 64, 65])
def test_all_win_probabilities_equal_one_candidate_at_a_time(rows: int) -> None:
    """Up to 64 contexts every candidate's quadrature runs in one pass: the same bits as
    ``_win_probability`` one candidate at a time (ties between candidates included)."""
    rule = metactl.LinearThompson()
    rng = np.random.default_rng(rows)
    for k in (2, 10):
        mean = rng.normal(size=(rows, k))
        std = np.abs(rng.normal(size=(rows, k))) + 1e-3
        mean[:, 1], std[:, 1] = mean[:, 0], std[:, 0]
        columns = [rule._win_probability(mean, std, np.full(rows, j)) for j in range(k)]
        expected = np.maximum(np.column_stack(columns), 0.0)
        expected /= expected.sum(axis=1, keepdims=True)
        assert rule._all_win_probabilities(mean, std).tobytes() == expected.tobytes()
