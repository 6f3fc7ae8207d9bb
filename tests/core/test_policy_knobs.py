"""MetaPolicy over any sampler knob (temperature, top_p, top_k, min_p) or a joint grid: the
settings each decision names, the rules a joint grid accepts, validation and state round trips."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import metactl
from metactl import (
    EXP3,
    PTGS,
    TAMPO,
    UCB1,
    ContextualTAMPO,
    Counterfactual,
    EntropySchedule,
    EntropyTarget,
    Fixed,
    Hedge,
    LinearThompson,
    MetaGradient,
    MetaPolicy,
    Mixture,
    Nucleus,
    Schedule,
    Spread,
    ThompsonGaussian,
    Uncertainty,
)
from metactl.rules import RULES


def _feedback(policy: MetaPolicy, rng: np.random.Generator, n: int = 8) -> dict[str, Any]:
    """Random feedback for every name the policy's rule requires."""
    k = policy.num_candidates
    out: dict[str, Any] = {}
    for name in policy.requires:
        if name == "loglik":
            out[name] = rng.normal(-1.0, 0.3, size=(n, k))
        elif name == "advantages":
            out[name] = rng.normal(size=n)
        elif name == "reward":
            out[name] = float(rng.uniform())
        else:  # pragma: no cover - the joint rules need no other feedback
            raise AssertionError(name)
    return out


def _run(policy: MetaPolicy, steps: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    chosen = []
    for _ in range(steps):
        decision = policy.select()
        chosen.append(decision.index)
        policy.update(decision, **_feedback(policy, rng))
    return chosen


# -- one knob -------------------------------------------------------------------------------
def test_top_k_policy_settings_are_ints() -> None:
    policy = MetaPolicy([1, 20, 50], EXP3(), hyperparameter="top_k", seed=3)
    assert policy.knobs == ("top_k",)
    assert policy.family == "top_k"
    assert policy.candidates.dtype == np.int64  # what candidate_loglik's top_k family takes
    assert policy.candidates.tolist() == [1, 20, 50]
    assert all(type(v) is int for v in policy.candidates.tolist())
    assert policy.setting(2) == {"top_k": 50}
    assert type(policy.setting(2)["top_k"]) is int
    decision = policy.select()
    assert isinstance(decision.value, float)
    assert decision.setting == {"top_k": int(policy.candidates[decision.index])}
    assert type(decision.setting["top_k"]) is int
    assert decision.knobs == ("top_k",)
    assert policy.state_dict()["candidates"] == [1, 20, 50]
    assert all(type(v) is int for v in policy.state_dict()["candidates"])


@pytest.mark.parametrize(
    ("hyperparameter", "candidates"),
    [("temperature", [0.7, 1.0, 1.3]), ("top_p", [0.8, 0.95, 1.0]), ("min_p", [0.0, 0.05, 0.1])],
)
def test_one_knob_settings(hyperparameter: str, candidates: list[float]) -> None:
    policy = MetaPolicy(candidates, TAMPO(), Nucleus(0.7), hyperparameter=hyperparameter)
    assert policy.knobs == (hyperparameter,)
    assert policy.family == hyperparameter
    assert [policy.setting(i) for i in range(3)] == [{hyperparameter: v} for v in candidates]
    decision = policy.select()
    assert decision.setting == {hyperparameter: candidates[decision.index]}
    assert decision.value == candidates[decision.index]
    hash(decision)  # one-knob decisions stay hashable
    assert f"knobs=['{hyperparameter}']" in repr(policy)


def test_generic_policy_sets_no_knob() -> None:
    policy = MetaPolicy([-1.0, 2.0], TAMPO(), hyperparameter="generic")
    assert policy.knobs == ()
    with pytest.raises(ValueError, match="generic"):
        policy.setting(0)
    with pytest.raises(ValueError, match="generic"):
        _ = policy.family
    decision = policy.select()
    with pytest.raises(ValueError, match="generic"):
        _ = decision.setting


def test_per_context_decisions_name_their_knob() -> None:
    policy = MetaPolicy([0.8, 0.9, 1.0], ContextualTAMPO(), Nucleus(0.7), hyperparameter="top_p")
    batch = policy.select(contexts=[3, 5, 3])
    assert batch.knobs == ("top_p",)
    assert batch.settings == [{"top_p": v} for v in batch.values.tolist()]
    assert batch[1].setting == {"top_p": float(batch.values[1])}
    generic = MetaPolicy([-1.0, 2.0], ContextualTAMPO(), Nucleus(0.7), hyperparameter="generic")
    with pytest.raises(ValueError, match="generic"):
        _ = generic.select(contexts=[1]).settings


# -- joint ----------------------------------------------------------------------------------
def test_joint_policy_hand_made() -> None:
    # knobs given top_p first: the policy names them in canonical order
    grid = metactl.grid(top_p=[0.9, 1.0], temperature=[0.7, 1.2])
    policy = MetaPolicy(grid, TAMPO(), Nucleus(0.7), hyperparameter="joint", seed=1)
    assert policy.candidates is grid
    assert policy.num_candidates == 4
    assert policy.knobs == ("temperature", "top_p")
    assert policy.family == "joint"
    assert policy.setting(1) == {"temperature": 1.2, "top_p": 0.9}
    assert list(policy.setting(1)) == ["temperature", "top_p"]
    decision = policy.select()
    assert isinstance(decision.value, dict)
    assert decision.value == policy.setting(decision.index) == decision.setting
    assert decision.on_grid
    assert decision.knobs == ("temperature", "top_p")
    json.dumps(decision.value)
    setting = decision.setting
    setting["top_p"] = 0.5  # a copy: the decision is unchanged
    assert decision.setting == policy.setting(decision.index)
    text = repr(policy)
    assert "knobs=['temperature', 'top_p']" in text and "temperature=1.2,top_p=0.9" in text


def test_joint_from_mappings_and_factory() -> None:
    cands = [{"temperature": 0.8, "top_k": 20}, {"temperature": 1.0, "top_k": 50}]
    policy = MetaPolicy(cands, Hedge(), hyperparameter="joint")
    assert isinstance(policy.candidates, metactl.KnobGrid)
    assert policy.knobs == ("temperature", "top_k")
    assert policy.setting(1) == {"temperature": 1.0, "top_k": 50}
    assert type(policy.setting(1)["top_k"]) is int
    inferred = metactl.tampo(metactl.grid(temperature=[0.6, 1.0], top_p=[0.9, 1.0]))
    assert inferred.hyperparameter == "joint" and inferred.family == "joint"
    assert metactl.tampo().hyperparameter == "temperature"


def test_joint_loglik_feedback_through_family() -> None:
    """The adapters' call: candidate_loglik(..., policy.candidates, policy.family)."""
    grid = metactl.grid(temperature=[0.7, 1.0, 1.3], top_p=[0.9, 1.0])
    policy = metactl.tampo(grid, seed=0)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 5, 7))
    tokens = rng.integers(0, 7, size=(4, 5))
    mask = np.ones((4, 5), dtype=bool)
    loglik = metactl.likelihood.candidate_loglik(
        logits, tokens, mask, policy.candidates, policy.family
    )
    assert loglik.shape == (4, 6)
    for k in range(6):  # column k scores candidate k's setting
        alone = metactl.likelihood.candidate_loglik(
            logits, tokens, mask, [policy.setting(k), policy.setting((k + 1) % 6)], "joint"
        )
        np.testing.assert_allclose(loglik[:, k], alone[:, 0], rtol=1e-12)
    info = policy.update(policy.select(), loglik=loglik, advantages=rng.normal(size=4))
    assert info.probs.shape == (6,)


INDEX_RULES = [TAMPO(), Hedge(), MetaGradient(), EXP3(), UCB1(), ThompsonGaussian()]


@pytest.mark.parametrize("rule", INDEX_RULES, ids=lambda r: r.name)
def test_index_rules_run_on_a_joint_grid(rule: Any) -> None:
    grid = metactl.grid(temperature=[0.7, 1.0, 1.3], top_p=[0.9, 1.0])
    policy = MetaPolicy(grid, rule, hyperparameter="joint", seed=2)
    chosen = _run(policy, 12, seed=0)
    assert all(0 <= i < 6 for i in chosen)
    assert policy.step == 12
    assert np.isclose(policy.probs.sum(), 1.0)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (Schedule("linear", 0.7, 1.3, 10), "Schedule produces continuous values.*joint"),
        (EntropyTarget(0.5), "EntropyTarget produces continuous values.*joint"),
        (EntropySchedule(0.6, 0.3, 10), "EntropySchedule produces continuous values.*joint"),
        (Uncertainty(), "Uncertainty produces continuous values.*joint"),
        (PTGS(), "PTGS is a per-context rule.*joint"),
        (ContextualTAMPO(), "ContextualTAMPO is a per-context rule.*joint"),
        (LinearThompson(), "LinearThompson is a per-context rule.*joint"),
        (Mixture(), "Mixture is a per-context rule.*joint"),
        (Spread(), "Spread is a per-context rule.*joint"),
        (Fixed(1.0), "Fixed reads the candidate values.*joint"),
        (Counterfactual(), "Counterfactual reads the candidate values.*joint"),
    ],
    ids=lambda x: x if isinstance(x, str) else x.name,
)
def test_value_rules_refuse_a_joint_grid(rule: Any, message: str) -> None:
    grid = metactl.grid(temperature=[0.7, 1.0, 1.3], top_p=[0.9, 1.0])
    with pytest.raises(ValueError, match=message):
        MetaPolicy(grid, rule, hyperparameter="joint")


def test_every_rule_is_classified() -> None:
    """Every shipped rule declares how it uses the candidates; the joint tests above cover all."""
    covered = {r.name for r in INDEX_RULES} | {
        "Schedule", "EntropyTarget", "EntropySchedule", "Uncertainty", "PTGS",
        "ContextualTAMPO", "LinearThompson", "Fixed", "Counterfactual", "Mixture", "Spread",
    }  # fmt: skip
    assert covered == set(RULES)
    assert {RULES[n].candidate_use for n in RULES} == {"indices", "values", "continuous"}


def test_top_k_refuses_continuous_rules() -> None:
    with pytest.raises(ValueError, match=r"Schedule.*top_k is an integer knob"):
        MetaPolicy([1, 50], Schedule("linear", 1.0, 50.0, 10), hyperparameter="top_k")
    with pytest.raises(ValueError, match=r"EntropyTarget.*top_k"):
        MetaPolicy([1, 50], EntropyTarget(0.5, initial=1.0), hyperparameter="top_k")
    fixed = MetaPolicy([1, 20, 50], Fixed(20), hyperparameter="top_k")
    assert fixed.select().setting == {"top_k": 20}


# -- the setting/index mapping (property) ---------------------------------------------------
knob_lists = {
    "temperature": st.lists(
        st.floats(0.05, 3.0, allow_nan=False), min_size=1, max_size=4, unique=True
    ),
    "top_p": st.lists(
        st.floats(0.01, 1.0, allow_nan=False), min_size=1, max_size=3, unique=True
    ),
    "top_k": st.lists(st.integers(1, 1000), min_size=1, max_size=3, unique=True),
    "min_p": st.lists(
        st.floats(0.0, 0.99, allow_nan=False), min_size=1, max_size=3, unique=True
    ),
}


@st.composite
def grids(draw: st.DrawFn) -> dict[str, list[Any]]:
    knobs = draw(st.lists(st.sampled_from(list(knob_lists)), min_size=2, max_size=3, unique=True))
    axes = {k: draw(knob_lists[k]) for k in knobs}
    if all(len(v) == 1 for v in axes.values()):  # a grid needs K >= 2 candidates
        axes[knobs[0]] = draw(knob_lists[knobs[0]].filter(lambda v: len(v) >= 2))
    return axes


@settings(max_examples=60, deadline=None)
@given(axes=grids(), seed=st.integers(0, 2**16))
def test_joint_setting_index_mapping(axes: dict[str, list[Any]], seed: int) -> None:
    grid = metactl.grid(**axes)
    policy = MetaPolicy(grid, EXP3(), hyperparameter="joint", seed=seed)
    k = len(grid)
    assert policy.num_candidates == k
    assert policy.knobs == tuple(knob for knob in metactl.knobs.KNOBS if knob in axes)
    for i in range(k):
        setting = policy.setting(i)
        assert setting == grid[i]
        assert list(setting) == list(policy.knobs)
        if "top_k" in setting:
            assert type(setting["top_k"]) is int
    assert len({json.dumps(policy.setting(i)) for i in range(k)}) == k  # one-to-one
    decision = policy.select()
    assert decision.setting == policy.setting(decision.index) == grid[decision.index]


@settings(max_examples=60, deadline=None)
@given(
    knob=st.sampled_from(["temperature", "top_p", "top_k", "min_p"]),
    data=st.data(),
)
def test_one_knob_setting_index_mapping(knob: str, data: st.DataObject) -> None:
    values = data.draw(knob_lists[knob].filter(lambda v: len(v) >= 2))
    policy = MetaPolicy(values, EXP3(), hyperparameter=knob)
    for i, v in enumerate(values):
        assert policy.setting(i) == {knob: v}
        assert type(policy.setting(i)[knob]) is type(v)
    decision = policy.select()
    assert decision.setting == {knob: values[decision.index]}


# -- validation -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("candidates", "hyperparameter", "error", "match"),
    [
        ([0.5, 1.5], "top_p", ValueError, r"candidates.*top-p.*candidates\[1\]"),
        ([0.0, 0.5], "top_p", ValueError, r"candidates\[0\] must lie in \(0, 1\]"),
        ([0.1, 1.0], "min_p", ValueError, r"candidates\[1\] must lie in \[0, 1\)"),
        ([0, 5], "top_k", ValueError, r"candidates\[0\] must be an integer >= 1"),
        ([-3, 5], "top_k", ValueError, r"candidates\[0\]"),
        ([2.5, 5], "top_k", TypeError, r"candidates\[0\] must be an integer"),
        ([5.0, 10.0], "top_k", TypeError, r"candidates\[0\] must be an integer"),
        ([True, 5], "top_k", TypeError, r"candidates\[0\]"),
        ([5, 5], "top_k", ValueError, "candidates has duplicate values"),
        ([5], "top_k", ValueError, "candidates needs at least 2"),
        ([0.9, float("nan")], "top_p", ValueError, "candidates"),
        ([0.9, 1.0], "top-p", ValueError, "hyperparameter must be one of"),
        ([0.9, 1.0], "beam", ValueError, "hyperparameter"),
        ([0.9, 1.0], "joint", ValueError, "candidates: hyperparameter='joint' needs a KnobGrid"),
        (
            metactl.grid(temperature=[0.7, 1.0], top_p=[0.9, 1.0]),
            "temperature",
            ValueError,
            r"candidates is a joint grid over \['temperature', 'top_p'\].*hyperparameter='joint'",
        ),
        (
            [{"temperature": 0.7}, {"temperature": 1.0}],
            "top_p",
            ValueError,
            "candidates is a joint grid",
        ),
        (
            [{"temperature": 0.7, "top_p": 0.9}, {"temperature": 1.0}],
            "joint",
            ValueError,
            "candidates is a mixed grid",
        ),
        (
            [{"temperature": 0.7, "beam": 2}, {"temperature": 1.0, "beam": 3}],
            "joint",
            ValueError,
            r"candidates\[0\]: unknown knob 'beam'",
        ),
        (
            [{"top_p": 0.7}, {"top_p": 1.5}],
            "joint",
            ValueError,
            r"candidates\[1\]\['top_p'\] must lie in \(0, 1\]",
        ),
        (
            [{"top_k": 0}, {"top_k": 5}],
            "joint",
            ValueError,
            r"candidates\[0\]\['top_k'\] must be an integer >= 1",
        ),
        ([{"top_p": 0.7}, 0.9], "joint", TypeError, r"candidates\[1\] must be a mapping"),
        ([{"top_p": 0.7}, {"top_p": 0.7}], "joint", ValueError, "duplicate"),
    ],
)
def test_invalid_candidates_are_rejected(
    candidates: Any, hyperparameter: str, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        MetaPolicy(candidates, TAMPO(), hyperparameter=hyperparameter)


def test_grid_rejects_unknown_knobs_and_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown knob 'beam'"):
        metactl.grid(temperature=[0.7, 1.0], beam=[1, 2])
    with pytest.raises(ValueError, match=r"top_p\[1\] must lie in \(0, 1\]"):
        metactl.grid(temperature=[0.7], top_p=[0.9, 1.2])
    with pytest.raises(TypeError, match=r"top_k\[0\] must be an integer"):
        metactl.grid(temperature=[0.7], top_k=[0.5, 2])


@pytest.mark.parametrize(
    ("index", "error"), [(4, ValueError), (-1, ValueError), (1.0, TypeError), (True, TypeError)]
)
def test_setting_validates_its_index(index: Any, error: type[Exception]) -> None:
    policy = metactl.tampo(metactl.grid(temperature=[0.7, 1.0], top_p=[0.9, 1.0]))
    before = json.dumps(policy.state_dict())
    with pytest.raises(error, match="index"):
        policy.setting(index)
    assert json.dumps(policy.state_dict()) == before


def test_rejected_calls_change_no_state() -> None:
    grid = metactl.grid(temperature=[0.7, 1.0], top_p=[0.9, 1.0])
    policy = metactl.tampo(grid, seed=4)
    _run(policy, 3, seed=1)
    decision = policy.select()
    before = json.dumps(policy.state_dict())
    with pytest.raises(ValueError, match="loglik"):  # K = 4 columns expected
        policy.update(decision, loglik=np.zeros((3, 5)), advantages=np.zeros(3))
    other = metactl.tampo(metactl.grid(temperature=[0.7, 1.0], top_p=[0.95, 1.0]), seed=4)
    with pytest.raises(ValueError, match="candidates"):
        policy.load_state_dict(other.state_dict())
    top_p_state = MetaPolicy([0.7, 0.8, 0.9, 1.0], TAMPO(), Nucleus(0.7), hyperparameter="top_p")
    with pytest.raises(ValueError, match="hyperparameter"):
        policy.load_state_dict(top_p_state.state_dict())
    tampered = json.loads(before)
    tampered["candidates"]["knobs"] = ["temperature", "min_p"]
    with pytest.raises(ValueError, match="candidates"):
        policy.load_state_dict(tampered)
    assert json.dumps(policy.state_dict()) == before
    # the decision drawn before the failures is still the one to update with
    policy.update(decision, loglik=np.zeros((3, 4)), advantages=np.zeros(3))


# -- state ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda: MetaPolicy([1, 5, 20, 50], TAMPO(), Nucleus(0.7), hyperparameter="top_k", seed=7),
        lambda: MetaPolicy([1, 5, 20, 50], EXP3(), hyperparameter="top_k", seed=7),
        lambda: metactl.tampo(
            metactl.grid(temperature=metactl.PAPER_TEMPERATURES, top_p=[0.9, 1.0]), seed=7
        ),
        lambda: MetaPolicy(
            metactl.grid(temperature=[0.7, 1.0, 1.3], top_k=[20, 50]),
            ThompsonGaussian(),
            hyperparameter="joint",
            seed=7,
        ),
    ],
    ids=["top_k-tampo", "top_k-exp3", "joint-tampo", "joint-thompson"],
)
def test_state_round_trip_continues_bit_identically(make: Any) -> None:
    policy = make()
    _run(policy, 6, seed=3)
    state = json.loads(json.dumps(policy.state_dict()))  # JSON-safe
    rebuilt = MetaPolicy.from_state_dict(state)
    loaded = make()
    loaded.load_state_dict(state)
    assert rebuilt.knobs == loaded.knobs == policy.knobs
    if policy.hyperparameter == "joint":
        assert rebuilt.candidates == policy.candidates
    else:
        assert np.array_equal(rebuilt.candidates, policy.candidates)
    runs = [_run(p, 15, seed=11) for p in (policy, rebuilt, loaded)]
    assert runs[0] == runs[1] == runs[2]
    assert json.dumps(policy.state_dict()) == json.dumps(rebuilt.state_dict())
    assert np.array_equal(policy.probs, rebuilt.probs)


def test_state_names_the_knobs() -> None:
    grid = metactl.grid(temperature=[0.7, 1.0], top_p=[0.9, 1.0])
    state = metactl.tampo(grid).state_dict()
    assert state["schema_version"] == metactl.SCHEMA_VERSION == 1
    assert state["hyperparameter"] == "joint"
    assert state["candidates"] == {
        "version": 1,
        "knobs": ["temperature", "top_p"],
        "candidates": [[0.7, 0.9], [0.7, 1.0], [1.0, 0.9], [1.0, 1.0]],
    }
    # a temperature policy's state keeps the format it always had
    old = metactl.tampo().state_dict()
    assert old["hyperparameter"] == "temperature"
    assert old["candidates"] == list(metactl.PAPER_TEMPERATURES)


def test_value_functions_name_a_joint_grid() -> None:
    """The functions that need one number per candidate (T*, the diagnostics) refuse a grid
    with an error that says so; the candidate indices work."""
    grid = metactl.grid(temperature=[0.7, 1.0], top_p=[0.9, 1.0])
    loglik = np.array([[-1.0, -0.5, -2.0, -3.0], [-0.1, -2.0, -3.0, -0.2]])
    with pytest.raises(ValueError, match=r"candidates is a joint grid over \['temperature'"):
        metactl.likelihood.likelihood_optimal(loglik, grid)
    with pytest.raises(ValueError, match="candidates is a joint grid"):
        metactl.diagnostics.signal_diagnostics(loglik, [1.0, -1.0], grid, 1.0, 2)
    best = metactl.likelihood.likelihood_optimal(loglik, np.arange(len(grid)))
    assert best.tolist() == [1.0, 0.0]
    assert [grid[int(i)] for i in best] == [grid[1], grid[0]]
