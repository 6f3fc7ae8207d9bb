"""Inputs the core refuses with an error naming the argument, rather than compute garbage or
crashed: knobs a rule cannot drive, numbers beyond what float64 holds, features that overflow,
state that no history can produce, copies that share an identity."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest

import metactl
from metactl.knobs import KnobGrid


@pytest.mark.parametrize(
    ("rule", "knob"),
    [
        (metactl.PTGS(), "top_p"),
        (metactl.PTGS(), "min_p"),
        (metactl.EntropyTarget(2.0, initial=0.05), "min_p"),
        (metactl.EntropySchedule(2.0, 1.0, 10, initial=0.05), "min_p"),
        (metactl.Uncertainty(base=0.05, gain=0.1, clip=1.0), "min_p"),
        (metactl.EntropyTarget(2.0, initial=0.7), "top_p"),
    ],
)
def test_temperature_rules_refuse_other_knobs(rule: metactl.Rule, knob: str) -> None:
    candidates = [0.02, 0.05, 0.08] if knob == "min_p" else [0.5, 0.7, 0.9, 1.0]
    with pytest.raises(ValueError, match=f"{rule.name} drives temperature only"):
        metactl.MetaPolicy(candidates, rule, hyperparameter=knob)


def test_temperature_rules_still_drive_the_temperature() -> None:
    policy = metactl.MetaPolicy(metactl.ptgs_candidates(), metactl.PTGS())
    assert policy.spec.knobs == ("temperature",)
    assert metactl.MetaPolicy([0.5, 1.0, 1.5], metactl.Uncertainty()).select().value == 1.0


@pytest.mark.parametrize("candidates", [[2**70, 5], [5, 2**53 + 1], [1, 2**53]])
def test_top_k_beyond_float64_integers_is_refused(candidates: list[int]) -> None:
    with pytest.raises(ValueError, match="below 2\\*\\*53"):
        metactl.tampo(candidates, hyperparameter="top_k")


def test_largest_exact_top_k_is_kept_exactly() -> None:
    policy = metactl.tampo([5, 2**53 - 1], hyperparameter="top_k")
    assert policy.candidates.tolist() == [5, 2**53 - 1]


@pytest.mark.parametrize("value", [5e-324, 1e-300, 1e-7, 2e6, 1e308])
def test_temperatures_outside_the_sampler_range_are_refused(value: float) -> None:
    with pytest.raises(ValueError, match="within the sampler's temperatures"):
        metactl.tampo([value, 1.0])


def test_candidate_counts_are_bounded() -> None:
    with pytest.raises(ValueError, match=r"more than (the )?10000"):
        metactl.grid(temperature=list(np.linspace(0.1, 2.0, 1000)), top_p=list(
            np.linspace(0.05, 1.0, 20)))
    with pytest.raises(ValueError, match=r"more than (the )?10000"):
        metactl.MetaPolicy(np.linspace(0.5, 1.5, 10_001), metactl.TAMPO())
    assert len(metactl.grid(temperature=[0.5, 1.0], top_p=[0.9, 1.0])) == 4


def test_ptgs_refuses_grids_outside_its_range_and_absurd_ranges() -> None:
    with pytest.raises(ValueError, match="must lie in that range"):
        metactl.ptgs([0.1, 0.2])
    with pytest.raises(ValueError, match="must lie inside"):
        metactl.ptgs_candidates(tau=1e300)
    with pytest.raises(ValueError, match="must lie inside"):
        metactl.PTGS(t_ref=1e-7)
    assert metactl.ptgs().num_candidates == 11


def test_linear_thompson_refuses_features_that_overflow_and_draws_nothing() -> None:
    policy = metactl.linear_thompson(seed=0, feature_dim=1)
    before = json.dumps(policy.state_dict(), sort_keys=True)
    with pytest.raises(ValueError, match="features: the candidates' scores overflow"):
        policy.select(contexts=[1, 2], features=[[1e155], [0.5]])
    with pytest.raises(ValueError, match="features: the candidates' scores overflow"):
        policy.context_probs([1], features=[[1e200]])
    assert json.dumps(policy.state_dict(), sort_keys=True) == before
    batch = policy.select(contexts=[1, 2], features=[[3.0], [0.5]])
    assert np.all(np.isfinite(batch.probs))


def test_linear_thompson_feature_dim_is_bounded() -> None:
    with pytest.raises(ValueError, match="feature_dim must be < 257"):
        metactl.linear_thompson(feature_dim=10**6)
    assert metactl.linear_thompson(feature_dim=256).rule.dim == 259


def _linear_thompson_state() -> tuple[metactl.MetaPolicy, dict]:
    policy = metactl.linear_thompson(seed=0)
    batch = policy.select(contexts=[1, 2])
    policy.update(batch, rewards=[1, 0, 1, 1])
    return policy, json.loads(json.dumps(policy.state_dict()))


def test_linear_thompson_state_below_the_prior_is_refused() -> None:
    policy, state = _linear_thompson_state()
    k, d = policy.num_candidates, policy.rule.dim
    state["rule_state"]["precision"] = np.tile(1e-300 * np.eye(d), (k, 1, 1)).ravel().tolist()
    with pytest.raises(ValueError, match="falls below the prior"):
        policy.load_state_dict(state)


def test_linear_thompson_moments_without_data_are_refused() -> None:
    policy, state = _linear_thompson_state()
    fresh = metactl.linear_thompson(seed=0)
    fresh_state = json.loads(json.dumps(fresh.state_dict()))
    fresh_state["rule_state"]["moment"] = [1e308] * len(fresh_state["rule_state"]["moment"])
    with pytest.raises(ValueError, match="no data explains"):
        fresh.load_state_dict(fresh_state)
    policy.load_state_dict(state)  # a real state still loads


def _linear_thompson_data(phis: list[list[float]], spreads: list[float]) -> dict:
    """A state whose candidate 0 saw these phi rows with these reward spreads (noise_std 0.5)."""
    policy, state = _linear_thompson_state()
    k, d = policy.num_candidates, policy.rule.dim
    precision = np.tile(np.eye(d), (k, 1, 1))
    moment = np.zeros((k, d))
    for phi, y in zip(np.array(phis), spreads, strict=True):
        precision[0] += np.outer(phi, phi) / 0.25
        moment[0] += phi * y / 0.25
    state["rule_state"]["precision"] = precision.ravel().tolist()
    state["rule_state"]["moment"] = moment.ravel().tolist()
    return state


def test_linear_thompson_state_from_nearly_parallel_phi_loads() -> None:
    # two contexts whose pass rates differ by 1e-5: the data matrix has an eigenvalue of about
    # 1e-10, and the moment along it is about 1e-5, as real data makes it
    c = 1e-5
    state = _linear_thompson_data([[1.0, 0.0, 0.0], [1.0, c, c * c]], [0.0, 0.5])
    policy = metactl.linear_thompson(seed=0)
    policy.load_state_dict(state)
    assert json.loads(json.dumps(policy.state_dict())) == state


def test_linear_thompson_moment_beyond_the_data_is_refused() -> None:
    # the same phi, but a moment along the barely touched direction that no y in [0, 1/2] makes
    c = 1e-5
    state = _linear_thompson_data([[1.0, 0.0, 0.0], [1.0, c, c * c]], [0.0, 0.5])
    moment = np.array(state["rule_state"]["moment"])
    moment[1] += 1e-2
    state["rule_state"]["moment"] = moment.tolist()
    with pytest.raises(ValueError, match="no data explains"):
        metactl.linear_thompson(seed=0).load_state_dict(state)


def test_numpy_string_keys_are_stored_as_plain_strings() -> None:
    policy = metactl.ptgs(seed=0)
    batch = policy.select(contexts=np.array(["a", "b"]))
    policy.update(batch, rewards=[1, 0, 1, 1])
    single = policy.select(contexts=[np.str_("c")])
    policy.update(single, rewards=[1, 1])
    keys = policy.state_dict()["contexts"]["keys"]
    assert keys == ["a", "b", "c"] and all(type(k) is str for k in keys)


@pytest.mark.parametrize("copier", [copy.copy, copy.deepcopy])
def test_a_copied_policy_has_its_own_identity(copier) -> None:
    policy = metactl.tampo(seed=0)
    twin = copier(policy)
    with pytest.raises(ValueError, match="another MetaPolicy"):
        policy.update(twin.select(), loglik=np.zeros((2, 10)), advantages=[1.0, -1.0])
    with pytest.raises(ValueError, match="another MetaPolicy"):
        twin.update(policy.select(), loglik=np.zeros((2, 10)), advantages=[1.0, -1.0])
    twin.update(twin.select(), loglik=np.zeros((2, 10)), advantages=[1.0, -1.0])
    assert (policy.step, twin.step) == (0, 1)


@pytest.mark.parametrize("index", [1.5, True, "1", np.float64(1.0)])
def test_a_decision_with_a_non_integer_index_is_refused(index: object) -> None:
    policy = metactl.tampo(seed=0)
    forged = dataclasses.replace(policy.select(), index=index)
    with pytest.raises(TypeError, match=r"decision\.index must be an int"):
        policy.update(forged, loglik=np.zeros((2, 10)), advantages=[1.0, -1.0])
    assert policy.step == 0


@pytest.mark.parametrize(
    ("state", "exc"),
    [
        ({"version": True, "knobs": ["temperature"], "candidates": [[0.5], [1.0]]}, ValueError),
        ({"version": 1.0, "knobs": ["temperature"], "candidates": [[0.5], [1.0]]}, ValueError),
        ({"version": 1, "knobs": ["top_k"], "candidates": [[50.0], [20]]}, TypeError),
    ],
)
def test_grid_state_with_wrong_types_is_refused(state: dict, exc: type) -> None:
    with pytest.raises(exc):
        KnobGrid.from_state(state)


@pytest.mark.parametrize("value", [np.array(True), np.bool_(False), True])
def test_boolean_knob_values_are_refused_even_wrapped_in_an_array(value: object) -> None:
    with pytest.raises(TypeError, match="got bool"):
        metactl.knobs.check_knob("temperature", value)


def test_boolean_torch_scalars_are_refused() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="got bool"):
        metactl.knobs.check_knob("top_p", torch.tensor(True))
    assert metactl.knobs.check_knob("top_k", torch.tensor(5)) == 5

