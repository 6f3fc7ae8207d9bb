"""Per-context (per-prompt) policies in the core: the bounded context store (prior,
eviction, duplicates, state), decision batches, the selectors a per-context rule accepts, bad
inputs (clear errors, nothing changed), tampered states, and the per-prompt benchmark script."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import metactl
from metactl import PTGS, Decision, DecisionBatch, MetaPolicy
from metactl.selectors import Nucleus, Sample
from tests.core.helpers import snapshot
from tests.paths import ROOT


def _json_round_trip(policy: MetaPolicy) -> MetaPolicy:
    return MetaPolicy.from_state_dict(json.loads(json.dumps(policy.state_dict())))


def _feedback(policy: MetaPolicy, rng: np.random.Generator, rows: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "rewards" in policy.requires:
        out["rewards"] = (rng.random(rows) < 0.5).astype(float)
    if "loglik" in policy.requires:
        out["loglik"] = rng.normal(-1.0, 0.3, size=(rows, policy.candidates.shape[0]))
        out["advantages"] = rng.normal(size=rows)
    return out


FACTORIES = {
    "ptgs": lambda **kw: metactl.ptgs(total_steps=50, **kw),
    "tampo-per-prompt": lambda **kw: metactl.tampo_per_prompt(**kw),
    "linear-thompson": lambda **kw: metactl.linear_thompson(**kw),
}


# -- the store: prior, eviction, duplicates, state ----------------------------------------------
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_unseen_context_gets_the_prior(name: str) -> None:
    policy = FACTORIES[name](seed=0)
    fresh = FACTORIES[name](seed=0)
    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = policy.select(contexts=["a", "b"])
        policy.update(batch, **_feedback(policy, rng, 8))
    rule = policy.rule
    assert rule.row_fields(np.asarray(policy.candidates, dtype=np.float64))  # per-context rows
    state = policy.state_dict()
    prior = rule.prior_rows(policy._state, policy.candidates, 1)
    if name == "tampo-per-prompt":  # the global EMA of now, no updates
        assert prior["ema"][0].tolist() == state["rule_state"]["ema"]
        np.testing.assert_array_equal(policy.context_probs(["z"])[0], policy.probs)
    else:  # zero counts
        assert all(np.all(v == 0) for v in prior.values())
        assert set(prior) == {"successes", "failures"}
    if name == "ptgs":  # Beta(2 p~, 2 (1 - p~)) at the current pivot
        pivot = policy.rule.pivot(policy.step)
        cells = policy.rule._cell_probs(
            np.array([2 * pivot]), np.array([2 * (1 - pivot)]), policy.candidates, pivot
        )
        np.testing.assert_array_equal(policy.context_probs(["z"]), cells)
        assert not np.array_equal(cells, fresh.context_probs(["z"]))  # the pivot moved
    if name == "linear-thompson":  # an unseen prompt is a pass rate of 1/2 for the shared model
        phi = rule.phi(prior, None)
        assert phi.tolist() == [[1.0, 0.0, 0.0]]


def test_eviction_is_least_recently_updated_and_round_trips() -> None:
    policy = metactl.ptgs(seed=0, max_contexts=3)
    assert policy.update(policy.select(contexts=["a", "b", "c"]), rewards=[1, 0, 1]).evicted == ()
    policy.select(contexts=["a"])  # selecting does not count as a use
    info = policy.update(policy.select(contexts=["d"]), rewards=[1])
    assert info.evicted == ("a",) and policy.num_contexts == 3
    info = policy.update(policy.select(contexts=["b"]), rewards=[0])  # b is now the newest
    assert info.evicted == ()
    assert policy.state_dict()["contexts"]["keys"] == ["c", "d", "b"]
    resumed = _json_round_trip(policy)
    for p in (policy, resumed):
        info = p.update(p.select(contexts=["e", "f"]), rewards=[1, 1])
        assert info.evicted == ("c", "d")
        assert p.state_dict()["contexts"]["keys"] == ["b", "e", "f"]
    assert policy.state_dict() == resumed.state_dict()
    # an evicted key is like a new one
    np.testing.assert_allclose(
        policy.context_probs(["a"]), metactl.ptgs(seed=0).context_probs(["a"]), rtol=1e-12
    )
    with pytest.raises(ValueError, match="max_contexts"):
        policy.select(contexts=[1, 2, 3, 4])


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_round_trip_with_many_contexts(name: str) -> None:
    policy = FACTORIES[name](seed=11, max_contexts=1500)
    rng = np.random.default_rng(0)
    keys: list[Any] = [*range(1000), *[f"task-{i}" for i in range(1000)]]
    for _ in range(10):
        contexts = [keys[i] for i in rng.choice(len(keys), size=400, replace=False)]
        batch = policy.select(contexts=contexts)
        policy.update(batch, **_feedback(policy, rng, 400 * 4))
    assert policy.num_contexts == 1500  # evictions happened
    resumed = _json_round_trip(policy)
    assert resumed.state_dict() == policy.state_dict()
    for _ in range(4):
        contexts = [keys[i] for i in rng.choice(len(keys), size=300, replace=False)]
        a, b = policy.select(contexts=contexts), resumed.select(contexts=contexts)
        assert np.array_equal(a.values, b.values) and np.array_equal(a.probs, b.probs)
        fb = _feedback(policy, rng, 300 * 2)
        ia, ib = policy.update(a, **fb), resumed.update(b, **fb)
        assert ia.evicted == ib.evicted
    assert json.dumps(policy.state_dict()) == json.dumps(resumed.state_dict())


def test_duplicate_contexts_are_pooled() -> None:
    twice = metactl.ptgs(seed=0, gamma=0.5)
    once = metactl.ptgs(seed=0, gamma=0.5)
    for policy, contexts, rewards in (
        (twice, ["x", "x", "y"], [1, 1, 1, 0, 0, 0]),
        (once, ["x", "y"], None),
    ):
        batch = policy.select(contexts=contexts)
        assert len(batch) == len(contexts)  # one draw per occurrence
        if rewards is None:  # x's 4 rows pooled by hand: 3 successes, 1 failure
            policy.update([batch[0]], rewards=[1, 1, 1, 0])
        else:
            info = policy.update(batch, rewards=rewards)
            assert info.contexts == 2
    rows = twice.state_dict()["contexts"]
    by_key = dict(zip(rows["keys"], rows["rows"]["successes"], strict=True))
    assert by_key == {"x": 3.0, "y": 0.0}
    assert dict(zip(rows["keys"], rows["rows"]["failures"], strict=True)) == {"x": 1.0, "y": 2.0}
    assert once.state_dict()["contexts"]["rows"]["successes"] == [3.0]


def test_decision_batch_is_a_sequence_of_decisions() -> None:
    policy = metactl.tampo_per_prompt(seed=0)
    batch = policy.select(contexts=np.array([4, 5, 6]))
    assert isinstance(batch, DecisionBatch) and len(batch) == 3
    d = batch[-1]
    assert isinstance(d, Decision) and d.context == 6 and isinstance(d.context, int)
    assert (d.index, d.value, d.prob, d.on_grid) == (
        int(batch.indices[2]),
        float(batch.values[2]),
        float(batch.probs[2]),
        True,
    )
    assert [x.context for x in batch] == [4, 5, 6] and len(batch[1:]) == 2
    with pytest.raises(ValueError):
        batch.values[0] = 1.0  # read-only
    # a list of its decisions updates exactly like the batch itself
    twin = metactl.tampo_per_prompt(seed=0)
    twin_batch = twin.select(contexts=[4, 5, 6])
    rng = np.random.default_rng(0)
    fb = {"loglik": rng.normal(-1, 0.3, (6, 10)), "advantages": rng.normal(size=6)}
    policy.update(batch, **fb)
    twin.update(list(twin_batch), **fb)
    assert policy.state_dict()["contexts"] == twin.state_dict()["contexts"]


def test_global_rules_refuse_contexts() -> None:
    policy = metactl.tampo(seed=0)
    with pytest.raises(TypeError, match="contexts"):
        policy.select(contexts=[1, 2])
    with pytest.raises(TypeError, match="contextual"):
        policy.context_probs([1])
    d = policy.select()
    assert d.context is None and d.on_grid
    with pytest.raises(TypeError, match="list of decisions"):
        policy.update([d], loglik=np.zeros((2, 10)), advantages=np.zeros(2))


# -- bad inputs: clear errors, nothing changed ---------------------------------------------------


@pytest.mark.parametrize(
    ("contexts", "error", "match"),
    [
        ([1.5, 2], TypeError, r"contexts\[0\]"),
        ([True], TypeError, r"contexts\[0\]"),
        ([None], TypeError, r"contexts\[0\]"),
        ([1, (2, 3)], TypeError, r"contexts\[1\]"),
        ([], ValueError, "contexts is empty"),
        (np.zeros((2, 2), dtype=int), ValueError, "contexts must be 1-D"),
        (np.array([1.0, 2.0]), TypeError, "contexts"),
        ("abc", TypeError, "contexts"),
        ({1: 2}, TypeError, "contexts"),
    ],
)
def test_bad_contexts_raise_and_draw_nothing(contexts: Any, error: type, match: str) -> None:
    policy = metactl.ptgs(seed=0)
    before = snapshot(policy)
    with pytest.raises(error, match=match):
        policy.select(contexts=contexts)
    assert snapshot(policy) == before  # the RNG did not move


def test_bad_features_raise() -> None:
    with pytest.raises(ValueError, match="uses no features"):
        metactl.ptgs().select(contexts=[1], features=[[0.0]])
    policy = metactl.linear_thompson(feature_dim=2)
    before = snapshot(policy)
    with pytest.raises(ValueError, match="needs features"):
        policy.select(contexts=[1])
    with pytest.raises(ValueError, match="features must have shape"):
        policy.select(contexts=[1, 2], features=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="features contains 1 NaN"):
        policy.select(contexts=[1], features=[[0.0, math.nan]])
    with pytest.raises(ValueError, match="features are given per context"):
        policy.select(features=[[0.0, 1.0]])
    assert snapshot(policy) == before


def _trained(name: str) -> tuple[MetaPolicy, DecisionBatch]:
    policy = FACTORIES[name](seed=0)
    rng = np.random.default_rng(0)
    policy.update(policy.select(contexts=[1, 2]), **_feedback(policy, rng, 8))
    return policy, policy.select(contexts=[1, 2, 3])


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_bad_updates_raise_and_change_nothing(name: str) -> None:
    policy, batch = _trained(name)
    _, other_batch = _trained(name)
    rng = np.random.default_rng(1)
    good = _feedback(policy, rng, 12)  # G = 4
    row_name = "rewards" if "rewards" in good else "advantages"
    bad_cases: list[tuple[Any, dict[str, Any], type, str]] = [
        (batch, {**good, row_name: good[row_name][:11]}, ValueError, "has 11"),
        (batch, _feedback(policy, rng, 10), ValueError, "not a multiple of the 3 decisions"),
        (batch, {**good, "group_size": 3}, ValueError, "group_size is 3"),
        (other_batch, good, ValueError, "another MetaPolicy"),
        (list(other_batch), good, ValueError, r"decisions\[0\] was made by another"),
        ([*batch[:2], policy.select()], good, ValueError, r"decisions\[2\] is a global decision"),
        ([batch[0], "x", batch[1]], good, TypeError, r"decisions\[1\] must be a metactl.Decision"),
        ([], good, ValueError, "decisions is empty"),
        (batch, {}, ValueError, "needs feedback"),
        (batch, {**good, "bogus": 1}, TypeError, "unknown feedback"),
    ]
    nan = {key: np.array(value, dtype=float) for key, value in good.items()}
    nan[row_name][5] = math.nan
    bad_cases.append((batch, nan, ValueError, f"{row_name} contains 1 NaN"))
    if "rewards" in good:
        out_of_range = {**good, "rewards": np.full(12, 2.0)}
        bad_cases.append((batch, out_of_range, ValueError, r"rewards must lie in \[0, 1\]"))
    else:
        bad_cases.append(
            (batch, {**good, "loglik": good["loglik"][:8]}, ValueError, "advantages has 12")
        )
    before = snapshot(policy)  # after the global select() above, which draws
    for decisions, feedback, error, match in bad_cases:
        with pytest.raises(error, match=match):
            policy.update(decisions, **feedback)
        assert snapshot(policy) == before, (decisions, sorted(feedback))
    policy.update(batch, **good)  # the good update still works, once
    with pytest.raises(ValueError, match="from step 1 but the policy is at step 2"):
        policy.update(batch, **good)


def test_huge_advantages_take_the_overflow_safe_path() -> None:
    policy, batch = _trained("tampo-per-prompt")
    rng = np.random.default_rng(2)
    loglik = rng.normal(-1.0, 0.3, size=(30, 10))
    advantages = np.full(30, 1.7e308)  # the batch sum overflows float64, the mean does not
    info = policy.update(batch, loglik=loglik, advantages=advantages)
    expected = metactl.candidate_advantages(loglik, advantages)
    assert np.all(np.isfinite(expected))
    np.testing.assert_array_equal(info.candidate_advantages, expected)
    rows = np.array(policy.state_dict()["contexts"]["rows"]["ema"])
    assert np.all(np.isfinite(rows)) and np.abs(rows).max() > 1e300
    resumed = _json_round_trip(policy)
    np.testing.assert_array_equal(resumed.context_probs([1, 2, 3]), policy.context_probs([1, 2, 3]))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s["contexts"]["keys"].__setitem__(1, s["contexts"]["keys"][0]), "duplicate"),
        (lambda s: s["contexts"]["keys"].__setitem__(0, True), r"\['keys'\]\[0\]"),
        (lambda s: s["contexts"]["keys"].__setitem__(0, 1.5), r"\['keys'\]\[0\]"),
        (lambda s: s["contexts"]["rows"]["successes"].pop(), r"must have shape \(3,\)"),
        (lambda s: s["contexts"]["rows"]["failures"].__setitem__(0, -1.0), "must be >= 0"),
        (lambda s: s["contexts"]["rows"]["failures"].__setitem__(0, math.inf), "NaN or inf"),
        (lambda s: s["contexts"]["rows"].pop("failures"), "must have keys"),
        (lambda s: s["contexts"].pop("rows"), "must be a dict with keys"),
        (lambda s: s.pop("contexts"), "expected exactly"),
        (lambda s: s["rule_state"].__setitem__("successes", -2.0), "must be >= 0"),
    ],
)
def test_tampered_context_state_is_refused_whole(edit: Any, match: str) -> None:
    policy, _ = _trained("ptgs")
    policy.update(policy.select(contexts=[1, 2, 3]), rewards=np.ones(3))
    state = json.loads(json.dumps(policy.state_dict()))
    edit(state)
    target = metactl.ptgs(seed=0, total_steps=50)
    before = snapshot(target)
    with pytest.raises((ValueError, TypeError), match=match):
        target.load_state_dict(state)
    assert snapshot(target) == before


def test_tampered_tampo_rows_are_refused() -> None:
    policy, _ = _trained("tampo-per-prompt")
    state = json.loads(json.dumps(policy.state_dict()))
    state["contexts"]["rows"]["updates"][0] = 5.0  # more updates than steps
    with pytest.raises(ValueError, match="updates"):
        metactl.tampo_per_prompt(seed=0).load_state_dict(state)
    state["contexts"]["rows"]["updates"][0] = 1.0
    state["contexts"]["rows"]["ema"][0] = [0.0] * 3
    with pytest.raises((TypeError, ValueError), match=r"\['rows'\]\['ema'\]"):
        metactl.tampo_per_prompt(seed=0).load_state_dict(state)
    small = metactl.tampo_per_prompt(seed=0, max_contexts=1)
    with pytest.raises(ValueError):  # another max_contexts is another configuration
        small.load_state_dict(policy.state_dict())


def test_global_states_hold_no_contexts() -> None:
    state = metactl.tampo(seed=0).state_dict()
    assert "contexts" not in state and state["schema_version"] == metactl.SCHEMA_VERSION


def test_benchmark_script_runs() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "per_prompt.py"),
            "--prompts",
            "16",
            "--stored",
            "20",
            "--repeats",
            "2",
            "--warmup",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "ptgs" in result.stdout and "evicting" in result.stdout


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 6),
    batches=st.lists(
        st.lists(st.one_of(st.integers(0, 9), st.sampled_from(["a", "b", "c"])), min_size=1),
        min_size=1,
        max_size=8,
    ),
    reload_at=st.integers(0, 8),
)
def test_store_follows_a_reference_lru_model(
    capacity: int, batches: list[list[Any]], reload_at: int
) -> None:
    policy = metactl.ptgs(seed=1, max_contexts=capacity)
    order: list[Any] = []  # the reference model: least recently updated first
    counts: dict[Any, float] = {}
    for step, contexts in enumerate(batches):
        if step == reload_at:
            policy = _json_round_trip(policy)
        distinct = list(dict.fromkeys(contexts))
        if len(distinct) > capacity:
            with pytest.raises(ValueError, match="max_contexts"):
                policy.select(contexts=contexts)
            continue
        batch = policy.select(contexts=contexts)
        info = policy.update(batch, rewards=np.ones(len(contexts)))  # G = 1, all successes
        kept = [key for key in order if key not in distinct]
        excess = len(kept) + len(distinct) - capacity
        evicted = kept[: max(excess, 0)]
        assert list(info.evicted) == evicted
        for key in evicted:
            del counts[key]
        order = kept[len(evicted) :] + distinct
        for key in distinct:  # discount once per update, then add the pooled successes
            counts[key] = 0.95 * counts.get(key, 0.0) + contexts.count(key)
        stored = policy.state_dict()["contexts"]
        assert stored["keys"] == order and policy.num_contexts == len(order) <= capacity
        by_key = dict(zip(stored["keys"], stored["rows"]["successes"], strict=True))
        assert by_key == pytest.approx(counts, rel=1e-12)


def test_selectors_of_contextual_rules_are_checked() -> None:
    with pytest.raises(ValueError, match="uses no selector"):
        MetaPolicy(metactl.ptgs_candidates(), PTGS(), Nucleus(0.7))
    with pytest.raises(ValueError, match="uses no selector"):
        MetaPolicy([0.8, 1.2], metactl.LinearThompson(), Sample())

    class Custom(metactl.Selector):
        def select(self, probs: np.ndarray, rng: np.random.Generator) -> tuple[int, float]:
            return 0, float(probs[0])

    with pytest.raises(TypeError, match="Nucleus, Sample or Greedy"):
        MetaPolicy([0.8, 1.2], metactl.ContextualTAMPO(), Custom())
    sampled = MetaPolicy([0.8, 1.0, 1.2], metactl.ContextualTAMPO(), Sample(), seed=3)
    assert sampled.select(contexts=[1, 2]).indices.shape == (2,)


def test_store_lookups_see_every_write() -> None:
    # the store keeps its last lookup (select and update look up the same keys): a write or an
    # eviction in between must not leave a stale slot behind
    from metactl.contexts import ContextStore

    store = ContextStore({"x": 0}, capacity=2)
    keys = ("a", "b")
    assert store.slots(keys).tolist() == [-1, -1]
    store.write(keys, store.slots(keys), {"x": np.array([1.0, 2.0])})
    assert sorted(store.slots(keys).tolist()) == [0, 1]
    store.write(("c",), store.slots(("c",)), {"x": np.array([3.0])})  # evicts "a"
    assert store.slots(keys)[0] == -1 and store.slots(keys)[1] >= 0
    assert store.slots(["c", "a"]).tolist()[1] == -1
