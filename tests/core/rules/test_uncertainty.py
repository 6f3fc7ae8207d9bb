"""The outcome-uncertainty (AGPO-style) controller (``metactl.rules.uncertainty``) on
hand-made feedback: the uncertainty by hand, heating and cooling, its bounds, its state and its bad
inputs."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

import metactl
from metactl import MetaPolicy, Uncertainty
from metactl.rules import RULES
from metactl.rules.uncertainty import outcome_uncertainty
from tests.core.helpers import snapshot

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
    before = snapshot(policy)
    with pytest.raises(ValueError, match=match):
        policy.update(decision, **feedback)
    assert snapshot(policy) == before


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
    before = snapshot(policy)
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
        assert snapshot(policy) == before
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
