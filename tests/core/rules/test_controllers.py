"""The controllers (``metactl.rules.controllers``: Fixed, Schedule, EntropyTarget): each
follows what it should."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metactl import EntropyTarget, Fixed, MetaPolicy, Schedule

CANDIDATES = [0.6, 0.9, 1.2, 1.5]


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


def test_step_schedule_switches_once_at_total_steps() -> None:
    policy = MetaPolicy(CANDIDATES, Schedule("step", 1.5, 0.9, total_steps=3), seed=0)
    values, indices = [], []
    for _ in range(6):
        decision = policy.select()
        values.append(decision.value)
        indices.append(decision.index)
        np.testing.assert_array_equal(policy.probs, np.eye(4)[indices[-1]])
        policy.update(decision)
    assert values == [1.5, 1.5, 1.5, 0.9, 0.9, 0.9]  # exactly the given values, no ramp
    assert indices == [3, 3, 3, 1, 1, 1]
    # total_steps=1: only step 0 at start; a state round trip keeps the switch step
    restored = MetaPolicy.from_state_dict(policy.state_dict())
    assert restored.select().value == 0.9
    assert MetaPolicy(CANDIDATES, Schedule("step", 1.5, 0.9, 1)).select().value == 1.5


def test_schedule_validation() -> None:
    with pytest.raises(ValueError, match="kind"):
        Schedule("exponential", 0.9, 1.5, 10)
    with pytest.raises(ValueError, match="total_steps"):
        Schedule("linear", 0.9, 1.5, 0)
    with pytest.raises(ValueError, match="end"):
        MetaPolicy(CANDIDATES, Schedule("linear", 0.9, 2.0, 10))
    with pytest.raises(ValueError, match="start"):
        MetaPolicy(CANDIDATES, Schedule("step", 0.5, 1.2, 10))
    with pytest.raises(TypeError, match="total_steps"):
        Schedule("step", 1.0, 1.2, 2.5)  # type: ignore[arg-type]


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


def _e3_step(t: float, target: float, entropy: float, vocab: int) -> float:
    return t * (1 + t * math.log(target / entropy) / (math.log(vocab) + math.log(math.log(vocab))))


def test_calibrated_entropy_target_follows_e3_reference_code() -> None:
    """E3's code with ``target_entropy=None``: T stays at its start for ``init_steps`` batches,
    H* is their mean entropy, then the usual update (here times ``target_ratio``)."""
    rule = EntropyTarget(None, initial=1.0, calibration_steps=3, target_ratio=0.9)
    policy = MetaPolicy([0.5, 1.0, 2.0], rule)
    entropies = [2.0, 1.0, 1.5, 1.2, 1.1]
    values = []
    for entropy in entropies:
        values.append(policy.select().value)
        policy.update(policy.select(), entropy=entropy, vocab_size=100)
    target = 0.9 * (2.0 + 1.0 + 1.5) / 3
    t1 = _e3_step(1.0, target, 1.2, 100)
    assert values[:4] == [1.0, 1.0, 1.0, 1.0]
    assert values[4] == pytest.approx(t1, rel=1e-15)
    assert policy.select().value == pytest.approx(_e3_step(t1, target, 1.1, 100), rel=1e-15)
    assert policy.state_dict()["rule_state"]["target"] == pytest.approx(target, rel=1e-15)


def test_calibrated_entropy_target_state_round_trip_and_checks() -> None:
    policy = MetaPolicy([0.5, 1.0, 2.0], EntropyTarget(calibration_steps=2))
    policy.update(policy.select(), entropy=1.0, vocab_size=50)
    saved = policy.state_dict()
    restored = MetaPolicy.from_state_dict(saved)
    for entropy in (0.5, 0.7, 0.9):
        assert policy.select().value == restored.select().value
        policy.update(policy.select(), entropy=entropy, vocab_size=50)
        restored.update(restored.select(), entropy=entropy, vocab_size=50)
    bad = {**saved, "rule_state": {**saved["rule_state"], "target": 1.0}}
    with pytest.raises(ValueError, match="calibration"):
        policy.load_state_dict(bad)  # a target before calibration ended


def test_entropy_target_config_validation() -> None:
    with pytest.raises(ValueError, match="target_entropy=None"):
        EntropyTarget(0.5, calibration_steps=2)
    with pytest.raises(ValueError, match="calibration_steps"):
        EntropyTarget(calibration_steps=0)
    with pytest.raises(ValueError, match="target_ratio"):
        EntropyTarget(target_ratio=0.0)
    # an absolute target keeps its state dict form (older checkpoints load)
    assert EntropyTarget(0.5).config() == {"target_entropy": 0.5, "initial": 1.0}
