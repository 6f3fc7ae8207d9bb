"""The temperature mixtures (``metactl.rules.mixture``: Mixture, Spread): systematic dealing,
the importance-weighted update by hand, both signals, learning the best candidate, state round
trips and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

import metactl
from metactl import MetaPolicy, Mixture, Spread
from metactl.rules.mixture import deal, group_signal

CANDIDATES = [0.6, 0.9, 1.2, 1.5]


@pytest.mark.parametrize("n", [1, 3, 7, 16, 61])
def test_deal_gives_each_candidate_floor_or_ceil_of_its_share(n: int) -> None:
    rng = np.random.Generator(np.random.PCG64(n))
    probs = np.array([0.05, 0.35, 0.4, 0.2])
    for _ in range(50):
        counts = np.bincount(deal(probs, n, rng), minlength=4)
        assert counts.sum() == n
        assert np.all(counts >= np.floor(n * probs)) and np.all(counts <= np.ceil(n * probs))


def test_deal_gives_each_group_its_propensity() -> None:
    """After the permutation, group i is candidate k with probability p_k (whatever i)."""
    rng = np.random.Generator(np.random.PCG64(0))
    probs = np.array([0.1, 0.6, 0.3])
    draws = np.array([deal(probs, 5, rng) for _ in range(20_000)])  # (draws, groups)
    for group in range(5):
        share = np.bincount(draws[:, group], minlength=3) / draws.shape[0]
        np.testing.assert_allclose(share, probs, atol=0.015)


def test_group_signal_by_hand() -> None:
    rewards = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [1.0, 1.0, 0.0]])
    assert group_signal(rewards, "mixed").tolist() == [1.0, 0.0, 0.0, 1.0]
    np.testing.assert_allclose(group_signal(rewards, "pass_rate"), [2 / 3, 0.0, 0.5, 2 / 3])
    # 4 p (1 - p): 8/9 for 2 of 3, 0 when settled, 1 at an even split
    np.testing.assert_allclose(group_signal(rewards, "variance"), [8 / 9, 0.0, 1.0, 8 / 9])
    one_failure = np.array([[1.0] * 7 + [0.0]])
    np.testing.assert_allclose(group_signal(one_failure, "variance"), [4 * 7 / 64])


def _rewards_for(values: np.ndarray, mixed_at: float, group: int = 2) -> np.ndarray:
    """G rows per decision: mixed (1, 0, ...) where the value is ``mixed_at``, else all 1."""
    rows = np.ones((values.size, group))
    rows[values == mixed_at, 1] = 0.0
    return rows.ravel()


def test_mixture_update_by_hand() -> None:
    policy = MetaPolicy([1.0, 2.0], Mixture(floor=0.5, step_size=1.0), seed=0)
    np.testing.assert_allclose(policy.probs, [0.5, 0.5])
    decisions = policy.select(contexts=[10, 11, 12, 13])
    assert sorted(decisions.values.tolist()) == [1.0, 1.0, 2.0, 2.0]  # dealt evenly
    np.testing.assert_array_equal(decisions.probs, [0.5] * 4)
    info = policy.update(decisions, rewards=_rewards_for(decisions.values, 2.0))
    # r_k = sum of the signal of k's groups / (n p_k): r_1.0 = 0, r_2.0 = 2 / (4 * 0.5) = 1
    np.testing.assert_array_equal(info.candidate_advantages, [0.0, 1.0])
    hot = np.exp(1.0) / (1.0 + np.exp(1.0))
    np.testing.assert_allclose(policy.probs, [0.25 + 0.5 * (1 - hot), 0.25 + 0.5 * hot])
    assert policy.state_dict()["rule_state"]["log_weights"] == [-1.0, 0.0]


def test_mixture_pass_rate_signal_by_hand() -> None:
    policy = MetaPolicy([1.0, 2.0], Mixture(floor=1.0, step_size=0.5, signal="pass_rate"))
    decisions = policy.select(contexts=["a", "b"])
    rewards = np.where(decisions.values[:, None] == 1.0, [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0])
    info = policy.update(decisions, rewards=rewards.ravel())
    # one group each, p = 0.5: r = pass rate / (2 * 0.5) = 0.25 and 0.75
    np.testing.assert_allclose(info.candidate_advantages, [0.25, 0.75])
    np.testing.assert_allclose(policy.probs, [0.5, 0.5])  # floor = 1: always uniform


def test_mixture_variance_signal_by_hand() -> None:
    policy = MetaPolicy([1.0, 2.0], Mixture(floor=1.0, signal="variance"))
    decisions = policy.select(contexts=["a", "b"])
    # 1.0's group splits evenly (signal 1); 2.0's has one failure in 4 (signal 3/4)
    rewards = np.where(decisions.values[:, None] == 1.0, [1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0])
    info = policy.update(decisions, rewards=rewards.ravel())
    np.testing.assert_allclose(info.candidate_advantages, [1.0, 0.75])  # / (n p) = / 1


def test_mixture_relative_step_by_hand() -> None:
    # the same batch with and without relative: the estimates divided by the mean signal
    absolute = MetaPolicy([1.0, 2.0], Mixture(floor=0.5), seed=0)
    relative = MetaPolicy([1.0, 2.0], Mixture(floor=0.5, relative=True), seed=0)
    decisions = absolute.select(contexts=[10, 11, 12, 13])
    same = relative.select(contexts=[10, 11, 12, 13])
    assert same.values.tolist() == decisions.values.tolist()
    rewards = _rewards_for(decisions.values, 2.0)  # 2 of 4 groups mixed: mean signal 1/2
    np.testing.assert_array_equal(absolute.update(decisions, rewards=rewards)
                                  .candidate_advantages, [0.0, 1.0])  # fmt: skip
    info = relative.update(same, rewards=rewards)
    np.testing.assert_array_equal(info.candidate_advantages, [0.0, 2.0])
    assert relative.state_dict()["rule_state"]["log_weights"] == [-2.0, 0.0]
    settled = relative.select(contexts=[1, 2])  # no group mixed: no step at all
    before = relative.state_dict()["rule_state"]["log_weights"]
    relative.update(settled, rewards=np.ones(4))
    assert relative.state_dict()["rule_state"]["log_weights"] == before


def test_mixture_relative_is_only_in_the_config_when_set() -> None:
    assert "relative" not in Mixture().config()
    assert Mixture(relative=True).config()["relative"] is True
    state = metactl.mixture(seed=0).state_dict()
    assert metactl.MetaPolicy.from_state_dict(state).rule == Mixture()


def test_mixture_learns_the_candidate_whose_groups_are_mixed() -> None:
    rng = np.random.default_rng(0)
    pass_rate = np.array([0.02, 0.15, 0.5, 0.97])  # 1.2 keeps the most groups mixed
    policy = MetaPolicy(CANDIDATES, Mixture(), seed=0)
    for _ in range(60):
        decisions = policy.select(contexts=list(range(32)))
        p = pass_rate[decisions.indices][:, None]
        rewards = (rng.random((32, 8)) < p).astype(float)
        policy.update(decisions, rewards=rewards.ravel())
    assert int(np.argmax(policy.probs)) == 2
    assert policy.probs.min() >= 0.1 / 4  # the floor


def test_mixture_refuses_bad_feedback_and_changes_nothing() -> None:
    policy = MetaPolicy(CANDIDATES, Mixture(signal="pass_rate"), seed=0)
    decisions = policy.select(contexts=[1, 2])
    before = policy.state_dict()
    with pytest.raises(ValueError, match=r"rewards must lie in \[0, 1\]"):
        policy.update(decisions, rewards=np.array([1.0, 2.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        policy.update(decisions, rewards=np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="needs feedback"):
        policy.update(decisions, reward=1.0)
    assert policy.state_dict() == before
    policy.update(decisions, rewards=np.array([1.0, 0.0, 0.0, 0.0]))  # still accepted
    assert policy.step == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"floor": 0.0}, "floor"),
        ({"floor": 1.5}, "floor"),
        ({"step_size": 0.0}, "step_size"),
        ({"step_size": float("nan")}, "step_size"),
        ({"signal": "entropy"}, "signal"),
    ],
)
def test_mixture_config_is_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Mixture(**kwargs)
    with pytest.raises(TypeError, match="relative must be a bool"):
        Mixture(relative=1)  # type: ignore[arg-type]


def test_spread_deals_evenly_and_learns_nothing() -> None:
    policy = metactl.spread(CANDIDATES, seed=3)
    assert policy.requires == () and policy.spec.per_context
    for step in range(3):
        decisions = policy.select(contexts=list(range(10)))
        counts = np.bincount(decisions.indices, minlength=4)
        assert sorted(counts.tolist()) == [2, 2, 3, 3]
        np.testing.assert_array_equal(decisions.probs, [0.25] * 10)
        info = policy.update(decisions)
        assert info.step == step
    np.testing.assert_array_equal(policy.probs, [0.25] * 4)


def test_mixtures_decide_per_context_without_storing_contexts() -> None:
    policy = metactl.mixture(CANDIDATES, seed=0)
    assert policy.contextual and policy.spec.per_context
    decisions = policy.select(contexts=["x", "x", "y"])  # a repeated key gets its own draw
    assert decisions.values.size == 3
    policy.update(decisions, rewards=np.tile([1.0, 0.0], 3))
    assert policy.num_contexts == 0 and "contexts" not in policy.state_dict()
    assert policy.select().value in CANDIDATES  # the global decision: one draw from p
    with pytest.raises(ValueError, match=r"per-context rule.*joint"):
        MetaPolicy(metactl.grid(temperature=[0.7, 1.0], top_p=[0.9, 1.0]), Mixture(),
                   hyperparameter="joint")  # fmt: skip
    with pytest.raises(ValueError, match="draws its own values"):
        MetaPolicy(CANDIDATES, Mixture(), metactl.Nucleus(0.7))


@pytest.mark.parametrize(
    "rule",
    [Mixture(), Mixture(signal="pass_rate"), Mixture(signal="variance", relative=True), Spread()],
    ids=["mixed", "pass_rate", "variance-relative", "spread"],
)
def test_state_round_trip_continues_bit_identically(rule: Mixture | Spread) -> None:
    rng = np.random.default_rng(0)
    policy = MetaPolicy(metactl.PAPER_TEMPERATURES, rule, seed=5)

    def step(p: MetaPolicy, rewards: np.ndarray) -> tuple:
        decisions = p.select(contexts=list(range(12)))
        info = p.update(decisions, rewards=rewards) if rule.requires else p.update(decisions)
        return decisions.values.tolist(), info.probs.tolist()

    for _ in range(4):
        step(policy, (rng.random(48) < 0.5).astype(float))
    saved = json.loads(json.dumps(policy.state_dict()))
    restored = MetaPolicy.from_state_dict(saved)
    for _ in range(5):
        rewards = (rng.random(48) < 0.5).astype(float)
        assert step(policy, rewards) == step(restored, rewards)


def test_spread_then_deals_uniformly_before_after_and_plays_then_from_it() -> None:
    policy = MetaPolicy(CANDIDATES, Spread(then=1.2, after=2), seed=3)
    plain = MetaPolicy(CANDIDATES, Spread(), seed=3)
    for step in range(5):
        decisions = policy.select(contexts=list(range(8)))
        if step < 2:  # the uniform mixture, draw for draw the plain Spread's
            same = plain.select(contexts=list(range(8)))
            np.testing.assert_array_equal(decisions.values, same.values)
            np.testing.assert_array_equal(decisions.probs, [0.25] * 8)
            plain.update(same)
        else:  # every group at 1.2, propensity 1
            assert decisions.values.tolist() == [1.2] * 8
            assert decisions.indices.tolist() == [2] * 8
            np.testing.assert_array_equal(decisions.probs, [1.0] * 8)
            np.testing.assert_array_equal(policy.probs, [0.0, 0.0, 1.0, 0.0])
        policy.update(decisions)
    # after=0: never the mixture; the switch survives a state round trip
    assert MetaPolicy(CANDIDATES, Spread(then=0.6, after=0)).select(
        contexts=[0, 1]).values.tolist() == [0.6, 0.6]
    restored = MetaPolicy.from_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert restored.select(contexts=[0, 1, 2]).values.tolist() == [1.2] * 3


def test_spread_without_then_keeps_the_plain_state_dict() -> None:
    state = metactl.spread(CANDIDATES, seed=0).state_dict()
    assert state["rule"] == {"type": "Spread", "config": {}} and state["rule_state"] == {}
    assert MetaPolicy(CANDIDATES, Spread(then=1.2, after=4)).state_dict()["rule"] == {
        "type": "Spread", "config": {"then": 1.2, "after": 4}}
    # a state of the switching rule is not a plain Spread's, and the other way round
    with pytest.raises(ValueError):
        MetaPolicy(CANDIDATES, Spread()).load_state_dict(
            MetaPolicy(CANDIDATES, Spread(then=1.2, after=4)).state_dict())


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"then": 1.2}, ValueError, "together"),
        ({"after": 3}, ValueError, "together"),
        ({"then": float("nan"), "after": 3}, ValueError, "then"),
        ({"then": 1.2, "after": -1}, ValueError, "after"),
        ({"then": 1.2, "after": 2.5}, TypeError, "after"),
    ],
)
def test_spread_then_config_is_validated(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        Spread(**kwargs)


def test_spread_then_must_be_a_candidate() -> None:
    with pytest.raises(ValueError, match=r"then=1\.0 is not one of the candidates"):
        MetaPolicy(CANDIDATES, Spread(then=1.0, after=2))
