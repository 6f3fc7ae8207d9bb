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
