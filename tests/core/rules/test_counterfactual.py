"""New rules for the real objective (issue 9, point 4): the counterfactual rule and the
entropy-schedule controller, on hand-made feedback."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import metactl
from metactl import Counterfactual, EntropySchedule, EntropyTarget, MetaPolicy, Uncertainty
from metactl.likelihood import candidate_loglik
from metactl.rules import RULES
from metactl.rules.counterfactual import counterfactual_scores
from metactl.rules.uncertainty import outcome_uncertainty

CANDIDATES = [0.8, 1.0, 1.2]

# one prompt, four completions sampled at T_s = 1.0: the first is the least likely at T_s and
# relatively more likely at 1.2 (lower-probability tokens); the other three at lower T
UP_LOGLIK = np.array(
    [[-30.0, -25.0, -24.5], [-20.0, -20.5, -21.0], [-20.0, -20.5, -21.0], [-20.0, -20.5, -21.0]]
)


def _snapshot(policy: MetaPolicy) -> str:
    return json.dumps(policy.state_dict(), sort_keys=True)


def _policy(**kwargs: Any) -> MetaPolicy:
    return MetaPolicy(CANDIDATES, Counterfactual(**kwargs), seed=0)


# -- the counterfactual rule -------------------------------------------------------------------


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
    before = _snapshot(policy)
    with pytest.raises(ValueError, match="0 or 1"):
        policy.update(decision, loglik=UP_LOGLIK, rewards=np.array([0.5, 0, 0, 0]), group_size=4)
    assert _snapshot(policy) == before


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
    before = _snapshot(policy)
    with pytest.raises((ValueError, TypeError), match=match):
        policy.update(decision, **feedback)
    assert _snapshot(policy) == before


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
    before = _snapshot(policy)
    state = json.loads(before)
    state["rule_state"].update(edit)
    state["step"] = 0  # a valid change of another field, which must not be applied either
    with pytest.raises((ValueError, TypeError), match=match):
        policy.load_state_dict(state)
    assert _snapshot(policy) == before
    missing = json.loads(before)
    del missing["rule_state"]["current"]
    with pytest.raises(ValueError, match="rule_state"):
        policy.load_state_dict(missing)
    assert _snapshot(policy) == before


# -- the entropy-schedule controller -----------------------------------------------------------


def _e3(t: float, target: float, entropy: float, vocab: int) -> float:
    return t * (
        1.0 + t * math.log(target / entropy) / (math.log(vocab) + math.log(math.log(vocab)))
    )


def test_entropy_schedule_targets_follow_the_schedule() -> None:
    linear = EntropySchedule(2.0, 0.5, 4)
    assert [linear.target_at(t) for t in range(6)] == [2.0, 1.5, 1.0, 0.5, 0.5, 0.5]
    cosine = EntropySchedule(2.0, 0.5, 3, kind="cosine")
    np.testing.assert_allclose([cosine.target_at(t) for t in range(3)], [2.0, 1.25, 0.5])
    # total_steps = 1: the start for the first step, the end from then on (as Schedule does)
    one = EntropySchedule(1.0, 3.0, 1)
    assert [one.target_at(t) for t in range(3)] == [1.0, 3.0, 3.0]


def test_entropy_schedule_applies_the_e3_rule_with_the_scheduled_target() -> None:
    # the same batch entropy (1.0) is below the early targets (heat) and above the late (cool)
    rule = EntropySchedule(2.0, 0.5, 4, initial=1.0)
    policy = MetaPolicy([0.5, 1.0, 1.5], rule)
    expected, values = 1.0, []
    for step in range(5):
        decision = policy.select()
        assert decision.value == pytest.approx(expected, rel=1e-15)
        values.append(decision.value)
        policy.update(decision, entropy=1.0, vocab_size=1000)
        expected = min(max(_e3(expected, rule.target_at(step), 1.0, 1000), 0.5), 1.5)
    # heated while H*(t) > 1, unchanged at H*(2) = 1, cooled once H*(t) < 1
    assert values[1] > values[0] and values[2] > values[1]
    assert values[3] == values[2] and values[4] < values[3]


def test_constant_entropy_schedule_is_entropy_target_bit_for_bit() -> None:
    scheduled = MetaPolicy([0.5, 1.0, 1.5], EntropySchedule(1.3, 1.3, 10, initial=0.9))
    target = MetaPolicy([0.5, 1.0, 1.5], EntropyTarget(1.3, initial=0.9))
    rng = np.random.default_rng(0)
    for _ in range(8):
        entropy = float(rng.uniform(0.5, 2.5))
        a, b = scheduled.select(), target.select()
        assert (a.value, a.index, a.prob) == (b.value, b.index, b.prob)
        scheduled.update(a, entropy=entropy, vocab_size=500)
        target.update(b, entropy=entropy, vocab_size=500)
    assert scheduled.state_dict()["rule_state"] == target.state_dict()["rule_state"]


def test_entropy_schedule_state_round_trip_and_invalid_states() -> None:
    policy = MetaPolicy([0.5, 1.0, 1.5], EntropySchedule(2.0, 0.5, 4))
    for entropy in (1.0, 0.7, 1.8):
        policy.update(policy.select(), entropy=entropy, vocab_size=1000)
    state = json.loads(json.dumps(policy.state_dict()))
    clone = MetaPolicy.from_state_dict(state)
    assert json.dumps(clone.state_dict()) == json.dumps(policy.state_dict())
    assert clone.select().value == policy.select().value
    before = _snapshot(policy)
    for bad in (-3.0, 0.0, 1.6, 0.4):
        tampered = json.loads(before)
        tampered["rule_state"]["value"] = bad
        with pytest.raises(ValueError, match="value"):
            policy.load_state_dict(tampered)
        assert _snapshot(policy) == before


def test_entropy_schedule_bad_feedback_changes_nothing() -> None:
    policy = MetaPolicy([0.5, 1.0, 1.5], EntropySchedule(2.0, 0.5, 4))
    decision = policy.select()
    before = _snapshot(policy)
    for feedback, match in (
        ({"entropy": 0.0, "vocab_size": 1000}, "entropy"),
        ({"entropy": float("nan"), "vocab_size": 1000}, "entropy"),
        ({"entropy": 1.0, "vocab_size": 2}, "vocab_size"),
        ({"entropy": 1.0}, "vocab_size"),
    ):
        with pytest.raises(ValueError, match=match):
            policy.update(decision, **feedback)
        assert _snapshot(policy) == before


@pytest.mark.parametrize(
    ("args", "kwargs", "name", "error"),
    [
        ((0.0, 1.0, 5), {}, "start_entropy", ValueError),
        ((1.0, -1.0, 5), {}, "end_entropy", ValueError),
        ((float("nan"), 1.0, 5), {}, "start_entropy", ValueError),
        ((1.0, 1.0, 0), {}, "total_steps", ValueError),
        ((1.0, 1.0, 2.5), {}, "total_steps", TypeError),
        ((1.0, 1.0, 5), {"kind": "step"}, "kind", ValueError),
        ((1.0, 1.0, 5), {"initial": 0.0}, "initial", ValueError),
    ],
)
def test_entropy_schedule_bad_config_names_the_argument(
    args: tuple[Any, ...], kwargs: dict[str, Any], name: str, error: type[Exception]
) -> None:
    with pytest.raises(error, match=name):
        EntropySchedule(*args, **kwargs)


def test_entropy_schedule_initial_outside_the_grid_and_registry() -> None:
    with pytest.raises(ValueError, match="initial"):
        MetaPolicy([0.5, 1.0, 1.5], EntropySchedule(1.0, 2.0, 5, initial=2.0))
    assert RULES["EntropySchedule"] is EntropySchedule
    assert EntropySchedule(1.0, 2.0, 5).requires == ("entropy", "vocab_size")


# -- the uncertainty (AGPO-style) controller -----------------------------------------------------

SPLIT = np.array([1.0, 0.0, 1.0, 0.0])  # every group of 2 split: u = 1
HALF = np.array([1.0, 0.0, 1.0, 1.0])  # one split group, one all-pass: u = 0.5
AGREE = np.array([1.0, 1.0, 0.0, 0.0])  # all-pass and all-fail: u = 0


def _uncertainty_run(rule: Uncertainty, batches: list[np.ndarray]) -> tuple[MetaPolicy, list]:
    policy = MetaPolicy([0.5, 1.0, 2.0], rule)
    values = []
    for rewards in batches:
        decision = policy.select()
        values.append(decision.value)
        policy.update(decision, rewards=rewards, group_size=2)
    values.append(policy.select().value)
    return policy, values


def test_outcome_uncertainty_by_hand() -> None:
    assert outcome_uncertainty(SPLIT, 2) == 1.0
    assert outcome_uncertainty(HALF, 2) == 0.5
    assert outcome_uncertainty(AGREE, 2) == 0.0
    # graded rewards: 4 Var of [0.2, 0.6] = 4 * 0.04
    assert outcome_uncertainty(np.array([0.2, 0.6]), 2) == pytest.approx(0.16)
    # permutations within and of groups change nothing
    assert outcome_uncertainty(np.array([1.0, 1.0, 1.0, 0.0]), 2) == 0.5


def test_uncertainty_heats_when_outcomes_collapse_and_cools_when_they_split() -> None:
    rule = Uncertainty(base=1.0, gain=0.2, beta=0.5, clip=2.0)
    _, values = _uncertainty_run(rule, [HALF, HALF, AGREE])
    # step 0 initialises the baseline (T stays at base); step 1 has u = b: no move
    assert values[:3] == [1.0, 1.0, 1.0]
    # step 2: c = 0 - 0.5, s = 0.5 * 0 + 0.5 * 0.5 = 0.25, z = -2 -> T = exp(0.4)
    assert values[3] == pytest.approx(math.exp(0.4), rel=1e-15)
    _, values = _uncertainty_run(rule, [HALF, HALF, SPLIT])
    assert values[3] == pytest.approx(math.exp(-0.4), rel=1e-15)
    # a smaller deviation from a wider running spread: z = c / s inside the clip
    _, values = _uncertainty_run(rule, [HALF, AGREE, HALF])
    # step 1: c = -0.5, s = 0.25, z = -2; b = 0.25. step 2: c = 0.25, s = 0.25, z = 1
    assert values[2] == pytest.approx(math.exp(0.4), rel=1e-15)
    assert values[3] == pytest.approx(math.exp(-0.2), rel=1e-15)


def test_uncertainty_saturates_exactly_on_its_bounds() -> None:
    rule = Uncertainty(base=1.0, gain=0.3, beta=0.1, clip=1.5)
    _, values = _uncertainty_run(rule, [SPLIT, AGREE])
    assert values[-1] == rule.bounds()[1]
    _, values = _uncertainty_run(rule, [AGREE, SPLIT])
    assert values[-1] == rule.bounds()[0]


def test_uncertainty_bounds_must_fit_the_grid() -> None:
    with pytest.raises(ValueError, match="candidate range"):
        MetaPolicy([0.8, 1.0, 1.2], Uncertainty(gain=0.2, clip=2.0))
    with pytest.raises(ValueError, match="too large"):
        Uncertainty(gain=400.0, clip=2.0)


@pytest.mark.parametrize(
    ("feedback", "match"),
    [
        ({"rewards": np.array([1.5, 0.0, 1.0, 0.0]), "group_size": 2}, r"\[0, 1\]"),
        ({"rewards": np.array([-0.5, 0.0, 1.0, 0.0]), "group_size": 2}, r"\[0, 1\]"),
        ({"rewards": SPLIT, "group_size": 3}, "group_size"),
        ({"rewards": SPLIT, "group_size": 1}, "group_size"),
        ({"rewards": SPLIT}, "group_size"),
        ({"group_size": 2}, "rewards"),
    ],
)
def test_uncertainty_bad_feedback_changes_nothing(feedback: dict[str, Any], match: str) -> None:
    policy, _ = _uncertainty_run(Uncertainty(gain=0.2), [HALF, AGREE])
    decision = policy.select()
    before = _snapshot(policy)
    with pytest.raises(ValueError, match=match):
        policy.update(decision, **feedback)
    assert _snapshot(policy) == before


def test_uncertainty_state_round_trip_and_invalid_states() -> None:
    rule = Uncertainty(gain=0.2, beta=0.3)
    policy, _ = _uncertainty_run(rule, [HALF, AGREE, SPLIT, HALF])
    state = json.loads(json.dumps(policy.state_dict()))
    clone = MetaPolicy.from_state_dict(state)
    assert json.dumps(clone.state_dict()) == json.dumps(policy.state_dict())
    a = policy.update(policy.select(), rewards=AGREE, group_size=2)
    b = clone.update(clone.select(), rewards=AGREE, group_size=2)
    assert a.probs.tobytes() == b.probs.tobytes()
    assert clone.select().value == policy.select().value
    before = _snapshot(policy)
    for edit, match in (
        ({"baseline": 1.5}, "baseline"),
        ({"deviation": -0.1}, "deviation"),
        ({"value": 3.0}, "value"),
        ({"value": -1.0}, "value"),
        ({"value": 0.5}, "value"),  # below base * exp(-gain * clip) = 0.67
    ):
        tampered = json.loads(before)
        tampered["rule_state"].update(edit)
        with pytest.raises(ValueError, match=match):
            policy.load_state_dict(tampered)
        assert _snapshot(policy) == before
    fresh = MetaPolicy([0.5, 1.0, 2.0], rule)
    initial = json.loads(json.dumps(fresh.state_dict()))
    initial["rule_state"]["baseline"] = 0.5  # a baseline before any update cannot be
    with pytest.raises(ValueError, match="initial"):
        fresh.load_state_dict(initial)


@pytest.mark.parametrize(
    ("kwargs", "name", "error"),
    [
        ({"base": 0.0}, "base", ValueError),
        ({"gain": -0.1}, "gain", ValueError),
        ({"gain": float("nan")}, "gain", ValueError),
        ({"beta": 0.0}, "beta", ValueError),
        ({"beta": 1.1}, "beta", ValueError),
        ({"clip": 0.0}, "clip", ValueError),
        ({"clip": "2"}, "clip", TypeError),
    ],
)
def test_uncertainty_bad_config_names_the_argument(
    kwargs: dict[str, Any], name: str, error: type[Exception]
) -> None:
    with pytest.raises(error, match=name):
        Uncertainty(**kwargs)


def test_uncertainty_registry_and_feedback() -> None:
    assert RULES["Uncertainty"] is Uncertainty
    assert Uncertainty().requires == ("rewards", "group_size")
    assert MetaPolicy([0.5, 1.0, 2.0], Uncertainty()).selector == metactl.Greedy()


@pytest.mark.parametrize(
    "module",
    [
        "metactl.rules.counterfactual",
        "metactl.rules.entropy_schedule",
        "metactl.rules.uncertainty",
        "metactl.rules.tampo",
        "metactl.selectors",
    ],
)
def test_docstring_examples_run(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


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
