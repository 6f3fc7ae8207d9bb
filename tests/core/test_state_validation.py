"""States and updates that cannot silently lie.

``load_state_dict`` validates every field of every rule and either loads all of it or nothing;
updates never leave inf/NaN behind (overflow-safe math, or a ValueError with the policy
unchanged). Hypothesis fuzzes every rule's state dict and feeds extreme but finite feedback.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import metactl
from metactl import (
    EXP3,
    TAMPO,
    UCB1,
    EntropyTarget,
    Fixed,
    Hedge,
    MetaGradient,
    MetaPolicy,
    Schedule,
    ThompsonGaussian,
    sparsemax,
)
from metactl.rules import candidate_advantages, minmax_probs

CANDIDATES = [0.6, 0.9, 1.2, 1.5]
K = len(CANDIDATES)

RULE_FACTORIES: dict[str, Callable[[], metactl.Rule]] = {
    "TAMPO": TAMPO,
    "TAMPO-softmax": lambda: TAMPO(alpha=0.5, normalizer="softmax"),
    "Hedge": Hedge,
    "MetaGradient": MetaGradient,
    "MetaGradient-sampled": lambda: MetaGradient(estimator="sampled"),
    "EXP3": EXP3,
    "UCB1": UCB1,
    "ThompsonGaussian": lambda: ThompsonGaussian(mc_samples=64),
    "Fixed": lambda: Fixed(0.9),
    "Schedule": lambda: Schedule("cosine", 0.6, 1.5, 5),
    "EntropyTarget": lambda: EntropyTarget(2.0, initial=1.0),
}


def _policy(name: str, seed: int = 0) -> MetaPolicy:
    return MetaPolicy(CANDIDATES, RULE_FACTORIES[name](), seed=seed)


def _ordinary_feedback(policy: MetaPolicy, rng: np.random.Generator) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "loglik" in policy.requires:
        out["loglik"] = rng.normal(-1.0, 0.3, size=(6, K))
        out["advantages"] = rng.normal(size=6)
    if "reward" in policy.requires:
        out["reward"] = float(rng.uniform())
    if "entropy" in policy.requires:
        out["entropy"] = float(rng.uniform(0.5, 3.0))
        out["vocab_size"] = 1000
    return out


def _trained(name: str, steps: int = 3) -> MetaPolicy:
    policy = _policy(name)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        policy.update(policy.select(), **_ordinary_feedback(policy, rng))
    return policy


def _rejected(policy: MetaPolicy, state: dict[str, Any], match: str) -> None:
    """``state`` is refused with ValueError/TypeError naming ``match``, and nothing changed."""
    before = policy.state_dict()
    with pytest.raises((ValueError, TypeError), match=match):
        policy.load_state_dict(state)
    assert policy.state_dict() == before


def _with(state: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(state)
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


# --------------------------------------------------------------------------------------
# the states that could lie, one by one
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["UCB1", "ThompsonGaussian"])
@pytest.mark.parametrize(
    "counts",
    [[-1.0, 1.0, 1.0, 2.0], [0.5, 0.5, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [2.0**53, 1, 1, 1]],
    ids=["negative", "fractional", "not-summing-to-step", "beyond-2**53"],
)
def test_bandit_counts_must_be_nonnegative_integers_summing_to_the_step(name, counts) -> None:
    policy = _trained(name, steps=3)
    state = policy.state_dict()
    if counts[0] == 2.0**53:
        state = {**state, "step": 2**53 - 1}
    counts = [float(c) for c in counts]
    _rejected(policy, _with(state, ("rule_state", "counts"), counts), r"\['counts'\]")


def test_ucb1_with_negative_counts_is_refused_before_its_means_reach_inf() -> None:
    # were it accepted, one update later the means would hold inf (an unloadable state)
    policy = _policy("UCB1")
    state = _with(policy.state_dict(), ("rule_state", "counts"), [-1.0, 0.0, 0.0, 1.0])
    _rejected(policy, state, r"\['counts'\]")


@pytest.mark.parametrize("name,key", [("UCB1", "means"), ("ThompsonGaussian", "sums")])
def test_untried_candidates_hold_zero(name, key) -> None:
    policy = _policy(name)
    _rejected(policy, _with(policy.state_dict(), ("rule_state", key), [1.0, 0, 0, 0]), key)


@pytest.mark.parametrize("value", [-3.0, 0.0, 0.5, 1.6, 1e308])
def test_entropy_target_value_must_be_a_temperature_inside_the_candidate_range(value) -> None:
    policy = _policy("EntropyTarget")
    _rejected(policy, _with(policy.state_dict(), ("rule_state", "value"), value), "'value'")


def test_entropy_target_value_minus_three_never_reaches_select() -> None:
    policy = _policy("EntropyTarget")
    with pytest.raises(ValueError, match="candidate range"):
        policy.load_state_dict(_with(policy.state_dict(), ("rule_state", "value"), -3))
    assert policy.select().value == 1.0


@pytest.mark.parametrize(
    "name,key", [("EXP3", "log_weights"), ("Hedge", "logits"), ("MetaGradient", "logits")]
)
def test_stored_logits_have_maximum_zero(name, key) -> None:
    policy = _trained(name)
    state = policy.state_dict()
    shifted = [v + 1.0 for v in state["rule_state"][key]]
    _rejected(policy, _with(state, ("rule_state", key), shifted), key)


def test_huge_integers_in_the_rule_state_are_a_value_error_not_overflow() -> None:
    policy = _trained("MetaGradient-sampled")
    _rejected(policy, _with(policy.state_dict(), ("rule_state", "baseline"), 10**400), "baseline")
    _rejected(policy, _with(policy.state_dict(), ("step",), 2**53), "step")


def test_tampo_ema_beyond_the_float64_spread_gives_a_distribution() -> None:
    # Documented choice: min-max normalisation is overflow-safe, so this (finite) EMA is a
    # valid state, with the probabilities it stands for, instead of NaN.
    policy = metactl.tampo()
    ema = [1e308, -1e308, 0.0, 1e308, -1e308, 0.0, 0.0, 0.0, 0.0, 0.0]
    policy.load_state_dict(_with(policy.state_dict(), ("rule_state", "ema"), ema))
    probs = policy.probs
    assert np.all(np.isfinite(probs)) and probs.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(probs, minmax_probs(np.array(ema) / 2.0), rtol=0, atol=0)
    decision = policy.select()
    assert math.isfinite(decision.prob) and 0 < decision.prob <= 1
    assert decision.value in policy.candidates


def test_minmax_probs_is_bit_identical_when_the_spread_is_finite() -> None:
    ema = np.array([0.0125, 0.0, -0.0125, 0.3])
    scaled = (ema - ema.min()) / (ema.max() - ema.min())
    assert minmax_probs(ema).tolist() == (scaled / scaled.sum()).tolist()


@pytest.mark.parametrize(
    "path,value,exc",
    [
        (("state", "state"), 2**128, ValueError),
        (("state", "state"), -1, ValueError),
        (("state", "state"), 10**60, ValueError),
        (("state", "state"), 1.5, TypeError),
        (("state", "state"), "12", TypeError),
        (("state", "inc"), 2**130 + 1, ValueError),
        (("state", "inc"), 2, ValueError),
        (("state",), [1, 2], ValueError),
        (("has_uint32",), 2, ValueError),
        (("has_uint32",), True, TypeError),
        (("uinteger",), 2**32, ValueError),
        (("uinteger",), -(2**70), ValueError),
        (("bit_generator",), "MT19937", ValueError),
    ],
)
def test_tampered_rng_integers_raise_value_or_type_error(path, value, exc) -> None:
    policy = _trained("TAMPO")
    state = _with(policy.state_dict(), ("rng", *path), value)
    before = policy.state_dict()
    with pytest.raises(exc, match=r"state_dict\['rng'\]"):
        policy.load_state_dict(state)
    assert policy.state_dict() == before


def test_a_rejected_load_changes_nothing_even_when_only_the_last_field_is_bad() -> None:
    source = _trained("UCB1", steps=5)
    target = _policy("UCB1")
    state = _with(source.state_dict(), ("rng", "uinteger"), 2**40)  # all else is valid
    _rejected(target, state, "uinteger")
    assert target.step == 0


def test_sparsemax_is_shifted_by_the_row_maximum() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sparsemax(np.full(4, -1e16)).tolist() == [0.25] * 4
        rows = -1e14 + np.random.default_rng(0).uniform(0, 2, size=(50, 6))
        out = sparsemax(rows, axis=1)
        np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=0, atol=1e-12)
        # same result as on the shifted rows, which are ordinary numbers
        np.testing.assert_allclose(out, sparsemax(rows - rows.max(axis=1, keepdims=True), axis=1))
        assert sparsemax(np.array([1e308, -1e308, 5e307])).tolist() == [1.0, 0.0, 0.0]


def _sparsemax_unshifted(z: np.ndarray) -> np.ndarray:
    """The closed form without a shift, as metactl computed it before (rows of a 2-D array)."""
    z_sorted = -np.sort(-z, axis=-1)
    cumsum = np.cumsum(z_sorted, axis=-1)
    k = np.arange(1, z.shape[-1] + 1, dtype=np.float64)
    k_z = np.sum(1.0 + k * z_sorted > cumsum, axis=-1, keepdims=True)
    tau = (np.take_along_axis(cumsum, k_z - 1, axis=-1) - 1.0) / k_z
    return np.maximum(z - tau, 0.0)


def test_sparsemax_keeps_its_bits_on_ordinary_rows() -> None:
    # log-likelihoods as TAMPO sees them (length-normalised, or summed over a completion)
    rng = np.random.default_rng(0)
    for scale, center in ((0.3, -1.0), (3.0, -20.0), (30.0, -500.0)):
        rows = rng.normal(center, scale, size=(2000, 10))
        assert np.array_equal(sparsemax(rows, axis=1), _sparsemax_unshifted(rows))
    # around the magnitude from which rows are shifted, both sides are distributions
    rows = 1024.0 + rng.uniform(-2.0, 2.0, size=(500, 6))
    np.testing.assert_allclose(sparsemax(rows, axis=1).sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_candidate_advantages_do_not_overflow_in_the_batch_mean() -> None:
    loglik = np.zeros((4, 2))  # sparsemax weights 1/2 each
    advantages = np.array([1e288, 1.7e308, 1.7e308, 1.7e308])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        signal = candidate_advantages(loglik, advantages)
        policy = metactl.MetaPolicy([0.8, 1.2], TAMPO(alpha=0.5))
        probs = policy.update(policy.select(), loglik=loglik, advantages=advantages).probs
    expected = 0.5 * (1e288 / 4 + 3 * (1.7e308 / 4))
    np.testing.assert_allclose(signal, [expected, expected], rtol=1e-15)
    assert probs.tolist() == [0.5, 0.5]


def test_an_overflowing_update_raises_and_leaves_the_policy_unchanged() -> None:
    policy = _policy("ThompsonGaussian")  # noise_std 0.5: the posterior mean is 4 * sums / n
    state = policy.state_dict()
    state = _with(state, ("rule_state",), {"counts": [1.0] * K, "sums": [4e307] * K})
    policy.load_state_dict({**state, "step": K})
    decision = policy.select()
    before = policy.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="unchanged"):
            policy.update(decision, reward=1e308)  # sums 1.4e308: the mean overflows
    assert policy.state_dict() == before
    policy.update(decision, reward=1.0)  # the same decision still applies


def test_thompson_rejects_stds_whose_square_leaves_float64() -> None:
    for kwargs in ({"prior_std": 1e-170}, {"noise_std": 1e200}):
        with pytest.raises(ValueError, match="std"):
            ThompsonGaussian(**kwargs)


# --------------------------------------------------------------------------------------
# hypothesis: extreme but finite feedback
# --------------------------------------------------------------------------------------

extreme = st.one_of(
    st.floats(-1e300, 1e300, allow_nan=False, allow_infinity=False),
    st.sampled_from([1e300, -1e300, 1e288, -1e288, 1e150, -1e150, 0.0, 1e-300]),
)
# every rule that learns from feedback, with the TAMPO variants that change the update math
UPDATE_FACTORIES: dict[str, Callable[[], metactl.Rule]] = {
    **{n: f for n, f in RULE_FACTORIES.items() if n not in ("Fixed", "Schedule")},
    "TAMPO-std": lambda: TAMPO(alpha=0.5, standardize="std"),
    "TAMPO-max_abs": lambda: TAMPO(standardize="max_abs"),
    "TAMPO-tau": lambda: TAMPO(tau=0.01),
    "Hedge-softmax": lambda: Hedge(step_size=3.0, normalizer="softmax"),
}


@st.composite
def extreme_feedback(draw, requires: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "loglik" in requires:
        n = draw(st.integers(1, 5))
        out["loglik"] = draw(arrays(np.float64, (n, K), elements=extreme))
        out["advantages"] = draw(arrays(np.float64, (n,), elements=extreme))
    if "reward" in requires:
        out["reward"] = draw(st.one_of(extreme, st.floats(0.0, 1.0)))
    if "entropy" in requires:
        out["entropy"] = draw(st.one_of(st.floats(1e-300, 1e300), st.sampled_from([1e-300])))
        out["vocab_size"] = draw(st.integers(3, 10**12))
    return out


def _assert_valid(policy: MetaPolicy) -> None:
    state = policy.state_dict()
    json.dumps(state, allow_nan=False)  # finite everywhere
    probs = policy.probs
    assert np.all(np.isfinite(probs)) and np.all(probs >= 0)
    assert probs.sum() == pytest.approx(1.0, abs=1e-9)


@given(name=st.sampled_from(sorted(UPDATE_FACTORIES)), data=st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_extreme_updates_leave_a_finite_state_or_raise_with_nothing_changed(name, data) -> None:
    policy = MetaPolicy(CANDIDATES, UPDATE_FACTORIES[name](), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning either
        for _ in range(data.draw(st.integers(1, 6))):
            feedback = data.draw(extreme_feedback(policy.requires))
            decision = policy.select()
            before = policy.state_dict()
            try:
                info = policy.update(decision, **feedback)
            except ValueError:
                assert policy.state_dict() == before
                continue
            assert np.all(np.isfinite(info.probs))
            if info.candidate_advantages is not None:
                assert np.all(np.isfinite(info.candidate_advantages))
            _assert_valid(policy)


# --------------------------------------------------------------------------------------
# hypothesis: fuzzed state dicts
# --------------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**140), 2**140),
    st.sampled_from([10**400, -(10**400), 2**128, 2**128 - 1, 2**64, 2**32, 2**53, -1, 0, 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 0.5, -3.0, 1.0, 0.6, 1.5, 1e-320]),
    st.text(max_size=3),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a state dict a value can be replaced at (dict entries, list items)."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, inner in value.items():
            out += _paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            out += _paths(inner, (*prefix, index))
    return out


@st.composite
def fuzzed_states(draw, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with 0-3 entries replaced by arbitrary JSON-like values, near misses of their
    value or removed (0: the state as saved, which must load)."""
    out = copy.deepcopy(state)
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(_paths(out)))
        parent = out
        for key in path[:-1]:
            parent = parent[key]
        old = parent[path[-1]]
        how = draw(st.sampled_from(["delete", "replace", "perturb", "perturb", "perturb"]))
        if how == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif how == "perturb" and isinstance(old, (int, float)) and not isinstance(old, bool):
            # near misses of the real value: the cases most likely to slip through
            if isinstance(old, int):
                near = [-old, old - 1, old + 1, -old - 1, old * 2**64, old + 2**128]
            else:
                near = [-old, old + 0.5, old - 1.0, old + 1.0, old * 1e300, old * 2.0, old * 0.5]
            parent[path[-1]] = draw(st.sampled_from(near))
        else:
            parent[path[-1]] = draw(json_values)
    return out


def _assert_decision_valid(policy: MetaPolicy) -> None:
    decision = policy.select()
    assert math.isfinite(decision.prob) and 0 < decision.prob <= 1
    assert 0 <= decision.index < K
    low, high = min(CANDIDATES), max(CANDIDATES)
    assert decision.value in CANDIDATES or low <= decision.value <= high


@given(name=st.sampled_from(sorted(RULE_FACTORIES)), data=st.data())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzzed_state_dicts_load_fully_or_not_at_all(name, data) -> None:
    source = _trained(name, steps=data.draw(st.integers(0, 4)))
    state = data.draw(fuzzed_states(source.state_dict()))
    target = _policy(name, seed=7)
    before = target.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            target.load_state_dict(state)
        except (ValueError, TypeError):
            assert target.state_dict() == before
            return
        saved = json.dumps(target.state_dict(), allow_nan=False)
        again = _policy(name, seed=3)
        again.load_state_dict(json.loads(saved))
        assert json.dumps(again.state_dict(), allow_nan=False) == saved
        _assert_valid(target)
        _assert_decision_valid(target)
        _assert_decision_valid(again)
