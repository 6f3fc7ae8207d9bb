"""The counterfactual rule (``metactl.rules.counterfactual``) on hand-made and sampled
feedback: which way it moves, its score's invariances and properties, the ESS guard, bad feedback
and configuration, and its state."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import metactl
from metactl import Counterfactual, MetaPolicy
from metactl.likelihood import candidate_loglik
from metactl.rules import RULES
from metactl.rules.counterfactual import counterfactual_scores
from tests.core.helpers import snapshot

CANDIDATES = [0.8, 1.0, 1.2]

# one prompt, four completions sampled at T_s = 1.0: the first is the least likely at T_s and
# relatively more likely at 1.2 (lower-probability tokens); the other three at lower T
UP_LOGLIK = np.array(
    [[-30.0, -25.0, -24.5], [-20.0, -20.5, -21.0], [-20.0, -20.5, -21.0], [-20.0, -20.5, -21.0]]
)


def _policy(**kwargs: Any) -> MetaPolicy:
    return MetaPolicy(CANDIDATES, Counterfactual(**kwargs), seed=0)


def test_counterfactual_raises_t_when_the_rare_completions_succeed() -> None:
    policy = _policy(alpha=0.5)
    decision = policy.select()
    assert decision.value == 1.0  # initial
    info = policy.update(decision, loglik=UP_LOGLIK, rewards=np.array([1.0, 0, 0, 0]), group_size=4)
    scores = info.candidate_advantages
    assert scores is not None and scores[2] > scores[1] > scores[0]
    np.testing.assert_allclose(scores[1], 0.25 * 0.75)  # on-policy: p (1 - p) at p = 1/4
    assert policy.select().value == 1.2
    np.testing.assert_array_equal(policy.probs, [0.0, 0.0, 1.0])


def test_counterfactual_lowers_t_when_the_likely_completion_succeeds() -> None:
    # the success is the most likely completion at T_s, and relatively more so at 0.8
    rewards = np.array([1.0, 0, 0, 0])
    loglik = np.array(
        [[-19.5, -20.0, -21.5], [-21.5, -21.0, -20.5], [-21.5, -21.0, -20.5], [-21.5, -21.0, -20.5]]
    )
    policy = _policy(alpha=0.5)
    policy.update(policy.select(), loglik=loglik, rewards=rewards, group_size=4)
    assert policy.select().value == 0.8


def _toy_batch(
    rng: np.random.Generator, sampling_t: float, succeed: str, groups: int = 48, g: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Completions of 8 tokens sampled from softmax(z / T_s) with fixed logits; summed
    log-likelihoods under every candidate from ``candidate_loglik`` (mean x token count)."""
    length, logits_row = 8, np.array([3.0, 1.0, 0.0, -1.0, -2.0])
    n = groups * g
    p = np.exp(logits_row / sampling_t)
    p /= p.sum()
    tokens = rng.choice(logits_row.shape[0], size=(n, length), p=p)
    logits = np.broadcast_to(logits_row, (n, length, logits_row.shape[0])).copy()
    mask = np.ones((n, length), dtype=bool)
    mean = np.asarray(candidate_loglik(logits, tokens, mask, CANDIDATES))
    summed = mean * mask.sum(axis=1)[:, None]
    off_mode = (tokens != 0).sum(axis=1)
    # "rare" successes need three or more off-mode tokens; "sharp" ones none at all
    rewards = (off_mode >= 3) if succeed == "rare" else (off_mode == 0)
    return summed, rewards.astype(np.float64)


@pytest.mark.parametrize(("succeed", "expected"), [("rare", 1.2), ("sharp", 0.8)])
def test_counterfactual_on_a_sampled_toy_model(succeed: str, expected: float) -> None:
    # the true pass rates are below 1/2 at T_s = 1 (about .15 "rare", .22 "sharp"), and move
    # toward 1/2 at 1.2 ("rare") or at 0.8 ("sharp"): the expected signal p (1 - p) grows there
    rng = np.random.default_rng(0)
    policy = _policy(alpha=0.5)
    for _ in range(3):
        decision = policy.select()
        loglik, rewards = _toy_batch(rng, decision.value, succeed)
        policy.update(decision, loglik=loglik, rewards=rewards, group_size=8)
    assert policy.select().value == expected


def test_counterfactual_score_invariances() -> None:
    rng = np.random.default_rng(1)
    loglik = rng.normal(-20.0, 1.0, size=(12, 3))
    rewards = rng.integers(0, 2, size=12).astype(np.float64)
    base, trusted = counterfactual_scores(loglik, rewards, 4, 1)
    # a per-completion constant (e.g. a prompt-dependent offset) cancels in the weights
    shifted_rows = loglik + rng.normal(0.0, 5.0, size=(12, 1))
    np.testing.assert_allclose(counterfactual_scores(shifted_rows, rewards, 4, 1)[0], base)
    # permuting completions within each group, and permuting the groups
    within = np.concatenate([rng.permutation(4) + 4 * g for g in range(3)])
    np.testing.assert_allclose(
        counterfactual_scores(loglik[within], rewards[within], 4, 1)[0], base, rtol=1e-12
    )
    groups = np.concatenate([np.arange(4) + 4 * g for g in (2, 0, 1)])
    np.testing.assert_allclose(
        counterfactual_scores(loglik[groups], rewards[groups], 4, 1)[0], base, rtol=1e-12
    )
    # reward shift: unchanged; reward scale c: every score times c^2 (the argmax is unchanged)
    np.testing.assert_allclose(
        counterfactual_scores(loglik, rewards + 7.5, 4, 1)[0], base, rtol=1e-9, atol=1e-15
    )
    np.testing.assert_allclose(
        counterfactual_scores(loglik, rewards * 3.0, 4, 1)[0], 9.0 * base, rtol=1e-12
    )
    np.testing.assert_array_equal(counterfactual_scores(loglik, rewards * 3.0, 4, 1)[1], trusted)


def test_counterfactual_policy_is_invariant_to_reward_shift_and_scale() -> None:
    rng = np.random.default_rng(2)
    batches = [
        (rng.normal(-20.0, 1.0, size=(16, 3)), rng.integers(0, 2, size=16).astype(np.float64))
        for _ in range(6)
    ]
    choices = []
    for transform in (lambda r: r, lambda r: 10.0 * r - 3.0):
        policy = _policy(alpha=0.4, min_ess=0.25)
        values = []
        for loglik, rewards in batches:
            policy.update(policy.select(), loglik=loglik, rewards=transform(rewards), group_size=4)
            values.append(policy.select().value)
        choices.append(values)
    assert choices[0] == choices[1]


@pytest.mark.parametrize("outcome", [0.0, 1.0])
def test_counterfactual_all_solved_or_all_failed_gives_no_signal(outcome: float) -> None:
    policy = _policy(alpha=0.5)
    policy.update(policy.select(), loglik=UP_LOGLIK, rewards=np.array([1.0, 0, 0, 0]), group_size=4)
    before = np.array(policy.state_dict()["rule_state"]["score"])
    decision = policy.select()
    info = policy.update(
        decision, loglik=np.tile(UP_LOGLIK, (2, 1)), rewards=np.full(8, outcome), group_size=4
    )
    np.testing.assert_array_equal(info.candidate_advantages, np.zeros(3))
    np.testing.assert_array_equal(policy.state_dict()["rule_state"]["score"], 0.5 * before)
    assert policy.select().value == decision.value  # no evidence: no move


def test_counterfactual_all_failed_from_the_start_keeps_the_initial_temperature() -> None:
    policy = _policy(initial=0.8)
    for _ in range(3):
        policy.update(policy.select(), loglik=UP_LOGLIK, rewards=np.zeros(4), group_size=4)
    assert policy.select().value == 0.8
    np.testing.assert_array_equal(policy.state_dict()["rule_state"]["score"], np.zeros(3))


def test_ess_guard_falls_back_to_the_on_policy_value() -> None:
    # at candidate 2 one completion takes almost all the weight (ESS ~ 1 of G = 4)
    loglik = np.array(
        [[-20.0, -20.0, -5.0], [-20.0, -20.0, -25.0], [-20.0, -20.0, -25.0], [-20.0, -20.0, -25.0]]
    )
    rewards = np.array([1.0, 0.0, 0.0, 1.0])
    guarded, trusted = counterfactual_scores(loglik, rewards, 4, 1, min_ess=0.5)
    assert trusted.tolist() == [1, 1, 0]
    np.testing.assert_allclose(guarded, [0.25, 0.25, 0.25])  # candidate 2 -> on-policy value
    # with the guard at its loosest (ESS >= 1 always holds) the raw estimate shows: p ~ 1
    raw, trusted = counterfactual_scores(loglik, rewards, 4, 1, min_ess=0.25)
    assert trusted.tolist() == [1, 1, 1]
    assert raw[2] < 1e-5
    # guarded, every candidate ties with the current one: the rule stays
    policy = _policy(alpha=1.0, min_ess=0.5)
    policy.update(policy.select(), loglik=loglik, rewards=rewards, group_size=4)
    assert policy.select().value == 1.0  # 2 is untrusted, 0 ties with 1: stay


def test_ties_keep_the_current_candidate_or_move_to_the_nearest() -> None:
    from metactl.rules.counterfactual import _nearest_maximiser

    assert _nearest_maximiser(np.array([1.0, 1.0, 1.0, 0.0]), 1) == 1
    assert _nearest_maximiser(np.array([1.0, 0.0, 1.0, 1.0, 0.0]), 1) == 0  # equal distance: lower
    assert _nearest_maximiser(np.array([1.0, 0.0, 0.5, 1.0]), 2) == 3
    # rounding-level differences count as ties
    assert _nearest_maximiser(np.array([1.0, 1.0 - 1e-16, 0.0]), 1) == 1


def test_informative_objective_by_hand() -> None:
    scores, _ = counterfactual_scores(
        UP_LOGLIK, np.array([1.0, 0, 0, 0]), 4, 1, objective="informative"
    )
    np.testing.assert_allclose(scores[1], 1 - 0.25**4 - 0.75**4)
    assert scores[2] > scores[1] > scores[0]
    policy = _policy(objective="informative", alpha=0.5)
    policy.update(policy.select(), loglik=UP_LOGLIK, rewards=np.array([1.0, 0, 0, 0]), group_size=4)
    assert policy.select().value == 1.2
    decision = policy.select()
    before = snapshot(policy)
    with pytest.raises(ValueError, match="0 or 1"):
        policy.update(decision, loglik=UP_LOGLIK, rewards=np.array([0.5, 0, 0, 0]), group_size=4)
    assert snapshot(policy) == before


@pytest.mark.parametrize(
    ("feedback", "match"),
    [
        ({"loglik": UP_LOGLIK, "rewards": np.ones(4), "group_size": 3}, "group_size"),
        ({"loglik": UP_LOGLIK, "rewards": np.ones(4), "group_size": 1}, "group_size"),
        ({"loglik": UP_LOGLIK, "rewards": np.ones(4), "group_size": 2.0}, "group_size"),
        ({"loglik": UP_LOGLIK, "rewards": np.ones(3), "group_size": 4}, "rewards"),
        ({"loglik": UP_LOGLIK, "rewards": [1.0, 0, float("nan"), 0], "group_size": 4}, "rewards"),
        ({"loglik": UP_LOGLIK, "rewards": np.ones((4, 1)), "group_size": 4}, "rewards"),
        ({"loglik": UP_LOGLIK, "group_size": 4}, "rewards"),
        ({"loglik": UP_LOGLIK, "rewards": np.ones(4)}, "group_size"),
        ({"rewards": np.ones(4), "group_size": 4}, "loglik"),
        ({"loglik": UP_LOGLIK[:, :2], "rewards": np.ones(4), "group_size": 4}, "loglik"),
        (
            {
                "loglik": np.tile([[1.5e308, -1.5e308, 1.5e308]], (4, 1)),
                "rewards": np.array([1.0, 0, 0, 0]),
                "group_size": 4,
            },
            "loglik|overflow",
        ),
    ],
)
def test_counterfactual_bad_feedback_names_it_and_changes_nothing(
    feedback: dict[str, Any], match: str
) -> None:
    policy = _policy()
    policy.update(policy.select(), loglik=UP_LOGLIK, rewards=np.array([1.0, 0, 0, 0]), group_size=4)
    decision = policy.select()
    before = snapshot(policy)
    with pytest.raises((ValueError, TypeError), match=match):
        policy.update(decision, **feedback)
    assert snapshot(policy) == before


@pytest.mark.parametrize(
    ("kwargs", "name", "error"),
    [
        ({"alpha": 0.0}, "alpha", ValueError),
        ({"alpha": 1.5}, "alpha", ValueError),
        ({"min_ess": 0.0}, "min_ess", ValueError),
        ({"min_ess": float("nan")}, "min_ess", ValueError),
        ({"objective": "pass_rate"}, "objective", ValueError),
        ({"initial": float("inf")}, "initial", ValueError),
        ({"initial": "1.0"}, "initial", TypeError),
    ],
)
def test_counterfactual_bad_config_names_the_argument(
    kwargs: dict[str, Any], name: str, error: type[Exception]
) -> None:
    with pytest.raises(error, match=name):
        Counterfactual(**kwargs)


def test_counterfactual_initial_outside_the_grid() -> None:
    with pytest.raises(ValueError, match="initial"):
        MetaPolicy(CANDIDATES, Counterfactual(initial=1.5))


def test_counterfactual_declares_summed_likelihoods_and_its_feedback() -> None:
    rule = Counterfactual()
    assert rule.likelihood_normalization == "sum"
    assert rule.requires == ("loglik", "rewards", "group_size")
    assert RULES["Counterfactual"] is Counterfactual
    assert MetaPolicy(CANDIDATES, rule).selector == metactl.Greedy()


def _trained_counterfactual() -> MetaPolicy:
    rng = np.random.default_rng(3)
    policy = _policy(alpha=0.3, objective="informative")
    for _ in range(4):
        decision = policy.select()
        loglik, rewards = _toy_batch(rng, decision.value, "rare", groups=6)
        policy.update(decision, loglik=loglik, rewards=rewards, group_size=8)
    return policy


def test_counterfactual_state_round_trips_bit_identically() -> None:
    policy = _trained_counterfactual()
    state = json.loads(json.dumps(policy.state_dict()))
    clone = MetaPolicy.from_state_dict(state)
    assert json.dumps(clone.state_dict()) == json.dumps(policy.state_dict())
    rng = np.random.default_rng(9)
    loglik, rewards = _toy_batch(rng, policy.select().value, "rare", groups=6)
    a = policy.update(policy.select(), loglik=loglik, rewards=rewards, group_size=8)
    b = clone.update(clone.select(), loglik=loglik, rewards=rewards, group_size=8)
    assert a.probs.tobytes() == b.probs.tobytes()
    assert json.dumps(clone.state_dict()) == json.dumps(policy.state_dict())


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"current": 1.5}, "current"),
        ({"current": 3.0}, "current"),
        ({"current": -1.0}, "current"),
        ({"current": float("nan")}, "current"),
        ({"current": "1"}, "current"),
        ({"score": [0.1, -0.2, 0.0]}, "score"),
        ({"score": [0.1, 1.2, 0.0], "current": 1.0}, "score"),  # informative: in [0, 1]
        ({"score": [0.1, 0.2]}, "score"),
        ({"score": [0.1, float("inf"), 0.0]}, "score"),
        ({"score": [0.9, 0.2, 0.1], "current": 1.0}, "maximiser"),
    ],
)
def test_counterfactual_invalid_state_is_rejected_without_a_partial_load(
    edit: dict[str, Any], match: str
) -> None:
    policy = _trained_counterfactual()
    before = snapshot(policy)
    state = json.loads(before)
    state["rule_state"].update(edit)
    state["step"] = 0  # a valid change of another field, which must not be applied either
    with pytest.raises((ValueError, TypeError), match=match):
        policy.load_state_dict(state)
    assert snapshot(policy) == before
    missing = json.loads(before)
    del missing["rule_state"]["current"]
    with pytest.raises(ValueError, match="rule_state"):
        policy.load_state_dict(missing)
    assert snapshot(policy) == before


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    groups=st.integers(1, 5),
    group_size=st.integers(2, 6),
    sampling_index=st.integers(0, 2),
    spread=st.floats(0.0, 30.0),
    min_ess=st.floats(0.05, 1.0),
)
def test_counterfactual_score_properties(
    seed: int, groups: int, group_size: int, sampling_index: int, spread: float, min_ess: float
) -> None:
    rng = np.random.default_rng(seed)
    n = groups * group_size
    loglik = rng.normal(-50.0, 1.0, size=(n, 1)) + spread * rng.normal(size=(n, 3))
    rewards = rng.integers(0, 2, size=n).astype(np.float64)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        scores, trusted = counterfactual_scores(
            loglik, rewards, group_size, sampling_index, min_ess=min_ess
        )
    # on-policy: the mean of the groups' (population) reward variances, always trusted
    on_policy = rewards.reshape(groups, group_size).var(axis=1).mean()
    assert scores[sampling_index] == pytest.approx(on_policy, abs=1e-12)
    assert trusted[sampling_index] == groups
    assert np.all(scores >= 0) and np.all(scores <= 0.25 + 1e-12)  # p (1 - p) <= 1/4
    assert np.all((trusted >= 0) & (trusted <= groups))
    # a per-row constant cancels in the importance weights
    shifted = counterfactual_scores(
        loglik + rng.normal(0, 10, size=(n, 1)),
        rewards,
        group_size,
        sampling_index,
        min_ess=min_ess,
    )[0]
    np.testing.assert_allclose(shifted, scores, atol=1e-9)
