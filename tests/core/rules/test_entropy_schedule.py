"""The entropy-schedule controller (``metactl.rules.entropy_schedule``) on hand-made
feedback: targets that follow the schedule, the E3 rule at the scheduled target, its state and its
bad inputs."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from metactl import EntropySchedule, EntropyTarget, MetaPolicy
from metactl.rules import RULES
from tests.core.helpers import snapshot


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
    before = snapshot(policy)
    for bad in (-3.0, 0.0, 1.6, 0.4):
        tampered = json.loads(before)
        tampered["rule_state"]["value"] = bad
        with pytest.raises(ValueError, match="value"):
            policy.load_state_dict(tampered)
        assert snapshot(policy) == before


def test_entropy_schedule_bad_feedback_changes_nothing() -> None:
    policy = MetaPolicy([0.5, 1.0, 1.5], EntropySchedule(2.0, 0.5, 4))
    decision = policy.select()
    before = snapshot(policy)
    for feedback, match in (
        ({"entropy": 0.0, "vocab_size": 1000}, "entropy"),
        ({"entropy": float("nan"), "vocab_size": 1000}, "entropy"),
        ({"entropy": 1.0, "vocab_size": 2}, "vocab_size"),
        ({"entropy": 1.0}, "vocab_size"),
    ):
        with pytest.raises(ValueError, match=match):
            policy.update(decision, **feedback)
        assert snapshot(policy) == before


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
