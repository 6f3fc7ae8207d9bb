"""TAMPO variants: standardised steps, a scale inside sparsemax, summed
likelihoods. The paper's defaults must stay bit-identical."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import metactl
from metactl import TAMPO, MetaPolicy, candidate_advantages, sparsemax
from metactl.rules.tampo import standardized_signal

CANDIDATES = [0.8, 1.0, 1.2]


def _one_hot_rows(indices: list[int], k: int = 3) -> np.ndarray:
    """Log-likelihood rows whose sparsemax is exactly the one-hot of ``indices``."""
    rows = np.full((len(indices), k), -5.0)
    rows[np.arange(len(indices)), indices] = -1.0
    return rows


def _run(rule: TAMPO, steps: list[tuple[np.ndarray, np.ndarray]]) -> MetaPolicy:
    policy = MetaPolicy(CANDIDATES, rule, seed=0)
    for loglik, advantages in steps:
        policy.update(policy.select(), loglik=loglik, advantages=advantages)
    return policy


def _random_steps(seed: int, count: int = 12) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(-1.0, 0.3, size=(6, 3)), rng.normal(size=6) * rng.choice([0.01, 1.0, 50.0]))
        for _ in range(count)
    ]


def test_paper_defaults_are_bit_identical_and_keep_their_config() -> None:
    steps = _random_steps(0)
    paper = _run(TAMPO(), steps)
    spelled = _run(TAMPO(standardize="none", tau=1.0, likelihood_normalization="mean"), steps)
    assert paper.state_dict()["rule_state"] == spelled.state_dict()["rule_state"]
    assert paper.probs.tobytes() == spelled.probs.tobytes()
    assert TAMPO().config() == {"alpha": 0.05, "normalizer": "sparsemax"}
    assert metactl.tampo().state_dict()["rule"] == {
        "type": "TAMPO",
        "config": {"alpha": 0.05, "normalizer": "sparsemax"},
    }
    loglik, advantages = steps[0]
    np.testing.assert_array_equal(
        candidate_advantages(loglik, advantages, tau=1.0), candidate_advantages(loglik, advantages)
    )


def test_std_standardisation_lets_ten_small_steps_outvote_one_large_step() -> None:
    # ten low-signal steps favour candidate 0 (|a| = 0.005), one high-signal step (as sampled at
    # a high T) favours candidate 2 with a signal 100 times larger
    small = (_one_hot_rows([0, 2]), np.array([0.01, -0.01]))
    large = (_one_hot_rows([0, 2]), np.array([-1.0, 1.0]))
    steps = [small] * 10 + [large]
    paper = _run(TAMPO(alpha=0.1), steps)
    standardised = _run(TAMPO(alpha=0.1, standardize="std"), steps)
    assert int(np.argmax(paper.probs)) == 2  # the raw EMA follows the single loud step
    assert int(np.argmax(standardised.probs)) == 0  # each step counts once: the ten win
    # hand computation: every small step's scaled signal is u = [1, 0, -1] / std([1, 0, -1])
    u = np.array([1.0, 0.0, -1.0]) / math.sqrt(2 / 3)
    ema = np.zeros(3)
    for sign in [1.0] * 10 + [-1.0]:
        ema = 0.9 * ema + 0.1 * sign * u
    np.testing.assert_allclose(standardised.state_dict()["rule_state"]["ema"], ema, rtol=1e-12)


def test_standardised_step_weight_does_not_depend_on_the_signal_scale() -> None:
    base = [(_one_hot_rows([0, 1, 2]), np.array([0.3, -0.1, -0.2]))]
    for how in ("std", "max_abs"):
        one = _run(TAMPO(alpha=0.5, standardize=how), base)
        loud = _run(TAMPO(alpha=0.5, standardize=how), [(base[0][0], base[0][1] * 1e6)])
        np.testing.assert_allclose(
            one.state_dict()["rule_state"]["ema"],
            loud.state_dict()["rule_state"]["ema"],
            rtol=1e-12,
        )


def test_max_abs_standardisation_hand_case() -> None:
    # a = mean([1,0,0]*0.4, [0,1,0]*(-0.2), [0,0,1]*0) = [0.4, -0.2, 0] / 3; / max|a| -> [1, -.5, 0]
    policy = _run(
        TAMPO(alpha=0.5, standardize="max_abs"),
        [(_one_hot_rows([0, 1, 2]), np.array([0.4, -0.2, 0.0]))],
    )
    np.testing.assert_allclose(policy.state_dict()["rule_state"]["ema"], [0.5, -0.25, 0.0])
    # min-max of [.5, -.25, 0]: [1, 0, 1/3] -> renormalised [.75, 0, .25]
    np.testing.assert_allclose(policy.probs, [0.75, 0.0, 0.25], rtol=1e-12)


def test_zero_spread_step_leaves_the_ema_unchanged() -> None:
    first = (_one_hot_rows([0, 2]), np.array([1.0, -1.0]))
    zero_advantages = (_one_hot_rows([0, 2]), np.zeros(2))
    flat_rows = (np.full((2, 3), -1.0), np.array([1.0, 1.0]))  # lhat uniform: a constant
    for how in ("std", "max_abs"):
        before = _run(TAMPO(alpha=0.3, standardize=how), [first]).state_dict()["rule_state"]
        after = _run(TAMPO(alpha=0.3, standardize=how), [first, zero_advantages])
        assert after.state_dict()["rule_state"] == before
    # a constant a_k has no spread for "std" (skipped) but a magnitude for "max_abs" (applied)
    before = _run(TAMPO(alpha=0.3, standardize="std"), [first]).state_dict()["rule_state"]
    assert (
        _run(TAMPO(alpha=0.3, standardize="std"), [first, flat_rows]).state_dict()["rule_state"]
        == before
    )
    applied = _run(TAMPO(alpha=0.3, standardize="max_abs"), [first, flat_rows])
    np.testing.assert_allclose(
        applied.state_dict()["rule_state"]["ema"], 0.7 * np.array([0.3, 0.0, -0.3]) + 0.3
    )
    # the paper decays the EMA on a zero step instead
    paper = _run(TAMPO(alpha=0.3), [first, zero_advantages]).state_dict()["rule_state"]["ema"]
    np.testing.assert_allclose(paper, 0.7 * np.array([0.15, 0.0, -0.15]))


def test_standardized_signal_helper() -> None:
    np.testing.assert_allclose(
        standardized_signal(np.array([1.0, 0.0, -1.0]), "std"),
        np.array([1.0, 0.0, -1.0]) / math.sqrt(2 / 3),
    )
    huge = np.array([1e300, -1e300, 0.0])  # the variance would overflow without prescaling
    np.testing.assert_allclose(standardized_signal(huge, "std"), huge / (1e300 * math.sqrt(2 / 3)))
    assert standardized_signal(np.full(3, 2.5), "std") is None
    assert standardized_signal(np.zeros(3), "max_abs") is None
    with pytest.raises(ValueError, match="how"):
        standardized_signal(np.ones(3), "l2")


def test_small_tau_concentrates_each_trajectory_on_its_likelihood_optimal_candidate() -> None:
    # close likelihoods: sparsemax at tau = 1 keeps every candidate (full support)
    loglik = np.array([[-1.00, -0.95, -1.05], [-1.10, -1.00, -0.90], [-0.90, -1.00, -1.02]])
    advantages = np.array([1.0, -2.0, 0.5])
    assert np.all(sparsemax(loglik, axis=1) > 0)
    t_star = np.argmax(loglik, axis=1)  # [1, 2, 0]
    one_hot = np.zeros((3, 3))
    one_hot[np.arange(3), t_star] = 1.0
    expected = np.mean(one_hot * advantages[:, None], axis=0)
    np.testing.assert_allclose(candidate_advantages(loglik, advantages, tau=1e-3), expected)
    policy = _run(TAMPO(alpha=1.0, tau=1e-3), [(loglik, advantages)])
    np.testing.assert_allclose(policy.state_dict()["rule_state"]["ema"], expected)
    # tau < 1 sharpens: the weights at tau = 0.1 are closer to one-hot than at tau = 1
    distance = [np.abs(sparsemax(loglik / tau, axis=1) - one_hot).sum() for tau in (1.0, 0.1, 0.01)]
    assert distance[0] > distance[1] > distance[2] == 0.0
    # a large tau flattens every row to uniform: a_k = mean(A) / K for every k
    np.testing.assert_allclose(
        candidate_advantages(loglik, advantages, tau=1e6),
        np.full(3, advantages.mean() / 3),
        rtol=1e-5,
    )
    # the softmax normaliser takes the same scale
    np.testing.assert_allclose(
        candidate_advantages(loglik, advantages, "softmax", tau=1e-4), expected, atol=1e-12
    )


def test_tau_overflow_is_an_error_and_changes_nothing() -> None:
    policy = _run(TAMPO(tau=1e-300), [])
    decision = policy.select()
    before = json.dumps(policy.state_dict())
    with pytest.raises(ValueError, match="tau"):
        policy.update(decision, loglik=np.full((2, 3), -1e10), advantages=np.ones(2))
    assert json.dumps(policy.state_dict()) == before
    with pytest.raises(ValueError, match="tau"):
        candidate_advantages(np.full((1, 3), -1.0), np.ones(1), tau=0.0)


def test_summed_likelihoods_are_declared_and_use_the_same_math() -> None:
    rule = TAMPO(likelihood_normalization="sum")
    assert rule.likelihood_normalization == "sum"
    assert TAMPO().likelihood_normalization == "mean"
    steps = _random_steps(3, count=4)
    summed = _run(rule, steps)
    mean = _run(TAMPO(), steps)
    assert summed.state_dict()["rule_state"] == mean.state_dict()["rule_state"]
    assert summed.state_dict()["rule"]["config"]["likelihood_normalization"] == "sum"
    # summed rows (mean x length) are far more spread: sparsemax becomes sparse
    mean_rows = np.array([[-1.00, -0.95, -1.05, -1.2]])
    assert np.count_nonzero(sparsemax(mean_rows, axis=1)) == 4
    assert np.count_nonzero(sparsemax(mean_rows * 200, axis=1)) == 1


@pytest.mark.parametrize(
    ("kwargs", "name", "error"),
    [
        ({"standardize": "zscore"}, "standardize", ValueError),
        ({"standardize": 1}, "standardize", TypeError),
        ({"tau": 0.0}, "tau", ValueError),
        ({"tau": -1.0}, "tau", ValueError),
        ({"tau": float("nan")}, "tau", ValueError),
        ({"tau": float("inf")}, "tau", ValueError),
        ({"tau": "1"}, "tau", TypeError),
        ({"likelihood_normalization": "length"}, "likelihood_normalization", ValueError),
        ({"likelihood_normalization": None}, "likelihood_normalization", TypeError),
    ],
)
def test_bad_variant_options_name_the_argument(
    kwargs: dict[str, object], name: str, error: type[Exception]
) -> None:
    with pytest.raises(error, match=name):
        TAMPO(**kwargs)  # type: ignore[arg-type]


def test_variant_state_round_trips_through_json() -> None:
    rule = TAMPO(alpha=0.2, standardize="std", tau=0.5, likelihood_normalization="sum")
    policy = _run(rule, _random_steps(5, count=5))
    state = json.loads(json.dumps(policy.state_dict()))
    clone = MetaPolicy.from_state_dict(state)
    assert clone.rule == rule
    assert clone.state_dict() == policy.state_dict()
    loglik, advantages = _random_steps(6, count=1)[0]
    d1, d2 = policy.select(), clone.select()
    assert (d1.index, d1.prob) == (d2.index, d2.prob)
    np.testing.assert_array_equal(
        policy.update(d1, loglik=loglik, advantages=advantages).probs,
        clone.update(d2, loglik=loglik, advantages=advantages).probs,
    )
    # a policy with other variant settings refuses the state
    with pytest.raises(ValueError, match="rule"):
        MetaPolicy(CANDIDATES, TAMPO(alpha=0.2, standardize="std", tau=0.5)).load_state_dict(state)
