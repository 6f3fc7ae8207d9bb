"""Per-prompt (contextual) meta-policies, issue 10: the core contract, PTGS, per-prompt TAMPO,
LinearThompson, the bounded context store and its state, and bad inputs."""

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
from hypothesis.extra.numpy import arrays

import metactl
from metactl import PTGS, Decision, DecisionBatch, MetaPolicy
from metactl.rules.contextual_tampo import minmax_rows
from metactl.selectors import Greedy, Nucleus, Sample, nucleus_support
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


# -- PTGS: the rule of the research note ---------------------------------------------------------
def test_ptgs_tempering_rule_by_hand() -> None:
    rule = PTGS(tau=1.5, t_ref=1.2)
    pivot = 0.25
    p_hat = np.array([0.0, 0.125, 0.25, 0.625, 1.0])
    # h = (p~ - p^) / p~ below the pivot, (p~ - p^) / (1 - p~) above it
    expected = 1.2 * 1.5 ** np.array([1.0, 0.5, 0.0, -0.5, -1.0])
    np.testing.assert_allclose(rule.temperature(p_hat, pivot), expected, rtol=1e-15)
    assert rule.temperature(np.array([0.25]), pivot)[0] == 1.2
    low, high = rule.bounds
    assert (low, high) == (1.2 / 1.5, 1.2 * 1.5)
    assert rule.temperature(np.array([0.0, 1.0]), pivot).tolist() == [high, low]


def test_ptgs_pivot_ramp_is_geometric() -> None:
    rule = PTGS(total_steps=100)
    assert rule.pivot(0) == 0.25
    assert rule.pivot(50) == pytest.approx(0.25 * 2**0.5, rel=1e-15)
    assert rule.pivot(100) == pytest.approx(0.5, rel=1e-15)
    assert rule.pivot(250) == rule.pivot(100)  # u stays 1 after total_steps
    assert all(rule.pivot(s) < rule.pivot(s + 1) for s in range(100))
    assert PTGS().pivot(0) == PTGS().pivot(10**6) == 0.25  # total_steps=None: no ramp


def test_ptgs_hand_computed_draws() -> None:
    tau, gamma, t_ref = 1.4, 0.9, 1.1
    policy = metactl.ptgs(seed=7, tau=tau, gamma=gamma, t_ref=t_ref, total_steps=4)
    replica = np.random.Generator(np.random.PCG64(7))

    def expected(s: list[float], f: list[float], step: int) -> np.ndarray:
        pivot = 0.25 * (0.5 / 0.25) ** (step / 4)
        out = []
        for s_x, f_x in zip(s, f, strict=True):
            p_hat = replica.beta(2 * pivot + s_x, 2 * (1 - pivot) + f_x)
            h = (pivot - p_hat) / pivot if p_hat <= pivot else (pivot - p_hat) / (1 - pivot)
            out.append(t_ref * tau**h)
        return np.array(out)

    batch = policy.select(contexts=["a", "b", 3])
    np.testing.assert_allclose(batch.values, expected([0, 0, 0], [0, 0, 0], 0), rtol=1e-14)
    # G = 4: a succeeds 4 / 4, b 1 / 4, 3 fails every rollout
    policy.update(batch, rewards=[1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    batch = policy.select(contexts=["a", "b", "new", 3])
    np.testing.assert_allclose(batch.values, expected([4, 1, 0, 0], [0, 3, 0, 4], 1), rtol=1e-14)
    # second update: a gets 2 / 4 more, b 4 / 4, new 0 / 4, 3 1 / 4
    policy.update(batch, rewards=[1, 1, 0, 0] + [1] * 4 + [0] * 4 + [1, 0, 0, 0])
    s = [gamma * 4 + 2, gamma * 1 + 4, 0.0, gamma * 0 + 1]
    f = [gamma * 0 + 2, gamma * 3 + 0, 4.0, gamma * 4 + 3]
    batch = policy.select(contexts=["a", "b", "new", 3])
    np.testing.assert_allclose(batch.values, expected(s, f, 2), rtol=1e-14)
    rows = policy.state_dict()["contexts"]["rows"]
    keys = policy.state_dict()["contexts"]["keys"]
    by_key = dict(zip(keys, zip(rows["successes"], rows["failures"], strict=True), strict=True))
    for key, s_x, f_x in zip(["a", "b", "new", 3], s, f, strict=True):
        assert by_key[key] == pytest.approx((s_x, f_x), rel=1e-15)
    # the global context pools every row: 5 / 12 then 7 / 16 successes
    state = policy.state_dict()["rule_state"]
    assert state["successes"] == pytest.approx(gamma * 5 + 7, rel=1e-15)
    assert state["failures"] == pytest.approx(gamma * 7 + 9, rel=1e-15)


def test_ptgs_easy_prompts_cool_hard_prompts_heat() -> None:
    policy = metactl.ptgs(seed=0)
    for _ in range(10):  # G = 8: "easy" always succeeds, "hard" always fails, "mid" 2 / 8
        batch = policy.select(contexts=["easy", "hard", "mid"])
        policy.update(batch, rewards=[1.0] * 8 + [0.0] * 8 + [1.0] * 2 + [0.0] * 6)
    draws = np.array([policy.select(contexts=["easy", "hard", "mid"]).values for _ in range(300)])
    easy, hard, mid = draws.T
    assert np.all(easy < 1.0) and np.mean(easy) < 0.75  # near t_ref / tau
    assert np.all(hard > 1.0) and np.mean(hard) > 1.35  # near tau t_ref
    assert 0.85 < np.median(mid) < 1.15  # a pass rate at the pivot: about t_ref
    probs = policy.context_probs(["easy", "hard"])
    grid = policy.candidates
    assert probs[0] @ grid < 0.8 and probs[1] @ grid > 1.3


def test_ptgs_decision_prob_is_the_cell_probability() -> None:
    policy = metactl.ptgs(seed=3)
    policy.update(policy.select(contexts=[0, 1]), rewards=[1, 1, 0, 0, 0, 1])
    batch = policy.select(contexts=[0, 1, 2])
    table = policy.context_probs([0, 1, 2])
    np.testing.assert_allclose(table.sum(axis=1), 1.0, atol=1e-12)
    assert not batch.on_grid.any()
    np.testing.assert_allclose(batch.probs, table[np.arange(3), batch.indices], rtol=1e-12)
    nearest = np.argmin(np.abs(batch.values[:, None] - policy.candidates[None, :]), axis=1)
    assert batch.indices.tolist() == nearest.tolist()
    # empirical frequencies of the nearest candidate match the cell probabilities
    indices = np.array([policy.select(contexts=[0, 1, 2]).indices for _ in range(4000)])
    for row in range(3):
        freq = np.bincount(indices[:, row], minlength=policy.candidates.shape[0]) / 4000
        assert np.max(np.abs(freq - table[row])) < 0.04


@settings(max_examples=80, deadline=None)
@given(
    tau=st.floats(1.01, 3.0),
    t_ref=st.floats(0.1, 5.0),
    pivot=st.floats(0.01, 0.99),
    p_hat=arrays(np.float64, 20, elements=st.floats(0.0, 1.0)),
)
def test_ptgs_temperatures_stay_in_range(
    tau: float, t_ref: float, pivot: float, p_hat: np.ndarray
) -> None:
    rule = PTGS(tau=tau, t_ref=t_ref)
    temps = rule.temperature(p_hat, pivot)
    low, high = rule.bounds
    assert np.all((temps >= low) & (temps <= high))
    order = np.argsort(p_hat, kind="stable")
    assert np.all(np.diff(temps[order]) <= 1e-12 * high)  # non-increasing in p^


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    tau=st.floats(1.05, 2.0),
    rewards=arrays(np.float64, 24, elements=st.floats(0.0, 1.0)),
)
def test_ptgs_policy_values_in_range(seed: int, tau: float, rewards: np.ndarray) -> None:
    policy = metactl.ptgs(seed=seed, tau=tau, t_ref=0.9, total_steps=3)
    low, high = policy.rule.bounds
    for _ in range(4):
        batch = policy.select(contexts=[1, 2, 3, 1])
        assert np.all((batch.values >= low) & (batch.values <= high))
        policy.update(batch, rewards=rewards[:16])  # G = 4, fractional rewards allowed


# -- per-prompt TAMPO ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("top_p", [0.7, 0.0, 1.0])
def test_contextual_tampo_with_one_context_is_tampo(seed: int, top_p: float) -> None:
    paper = metactl.tampo(seed=seed, top_p=top_p)
    per_prompt = metactl.tampo_per_prompt(seed=seed, top_p=top_p)
    rng = np.random.default_rng(seed)
    for step in range(150):
        d_paper = paper.select()
        d_prompt = per_prompt.select(contexts=["the prompt"])[0]
        assert (d_paper.index, d_paper.value, d_paper.prob) == (
            d_prompt.index,
            d_prompt.value,
            d_prompt.prob,
        ), step
        rows = 8
        loglik = rng.normal(-1.0, 0.3, size=(rows, 10))
        # zero-advantage steps too (flat EMA, uniform probabilities, boundary ties)
        advantages = rng.normal(size=rows) if step % 7 else np.zeros(rows)
        info_paper = paper.update(d_paper, loglik=loglik, advantages=advantages)
        info_prompt = per_prompt.update([d_prompt], loglik=loglik, advantages=advantages)
        assert np.array_equal(info_paper.probs, info_prompt.probs)
        assert np.array_equal(info_paper.candidate_advantages, info_prompt.candidate_advantages)
        assert np.array_equal(per_prompt.context_probs(["the prompt"])[0], paper.probs)
    assert paper.state_dict()["rule_state"] == per_prompt.state_dict()["rule_state"]
    assert paper.state_dict()["rng"] == per_prompt.state_dict()["rng"]


def test_contextual_tampo_global_select_is_tampo() -> None:
    paper, per_prompt = metactl.tampo(seed=5), metactl.tampo_per_prompt(seed=5)
    rng = np.random.default_rng(0)
    for _ in range(60):
        a, b = paper.select(), per_prompt.select()
        assert (a.index, a.prob, b.context) == (b.index, b.prob, None)
        fb = {"loglik": rng.normal(-1, 0.3, (6, 10)), "advantages": rng.normal(size=6)}
        paper.update(a, **fb)
        per_prompt.update(b, **fb)
    assert per_prompt.num_contexts == 0


def test_contextual_tampo_shrinks_toward_the_global_ema() -> None:
    policy = metactl.tampo_per_prompt([0.8, 1.0, 1.2], alpha=0.5, prior_weight=2.0, seed=0)
    rng = np.random.default_rng(1)
    for step in range(3):
        contexts = ["x", "y"] if step < 2 else ["y"]
        batch = policy.select(contexts=contexts)
        rows = 3 * len(contexts)
        policy.update(
            batch, loglik=rng.normal(-1, 0.4, (rows, 3)), advantages=rng.normal(size=rows)
        )
    state = policy.state_dict()
    ema = np.array(state["rule_state"]["ema"])
    stored = dict(zip(state["contexts"]["keys"], state["contexts"]["rows"]["ema"], strict=True))
    updates = dict(
        zip(state["contexts"]["keys"], state["contexts"]["rows"]["updates"], strict=True)
    )
    assert updates == {"x": 2.0, "y": 3.0}
    for key in ("x", "y"):
        w = updates[key] / (updates[key] + 2.0)
        shrunk = ema + w * (np.array(stored[key]) - ema)
        np.testing.assert_array_equal(policy.context_probs([key])[0], metactl.minmax_probs(shrunk))
    # an unseen context gets the global policy
    np.testing.assert_array_equal(policy.context_probs(["unseen"])[0], policy.probs)


@settings(max_examples=200, deadline=None)
@given(
    raw=arrays(np.float64, (6, 5), elements=st.sampled_from([0.0, 0.0, 0.1, 0.2, 0.25, 0.5, 1.0])),
    top_p=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.9, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_vectorised_selectors_match_the_scalar_ones(
    raw: np.ndarray, top_p: float, seed: int
) -> None:
    raw[:, 0] += 1e-3  # every row has some mass
    probs = raw / raw.sum(axis=1, keepdims=True)

    def inverse_cdf(p: np.ndarray, u: float) -> int:
        cdf = np.cumsum(p)
        index = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
        return min(index, int(np.flatnonzero(p > 0)[-1]))

    def scalar(selector: object, row: np.ndarray, rng: np.random.Generator) -> tuple[int, float]:
        """The selection rule one row at a time, written out with nucleus_support."""
        if isinstance(selector, Greedy):
            return int(np.argmax(row)), 1.0
        if isinstance(selector, Sample):
            index = inverse_cdf(row, rng.random())
            return index, float(row[index] / row.sum())
        kept = nucleus_support(row, top_p)
        mass = row[kept] / row[kept].sum()
        u = rng.random()
        choice = inverse_cdf(mass, u) if kept.shape[0] > 1 else 0
        return int(kept[choice]), float(mass[choice])

    for selector in (Nucleus(top_p), Sample(), Greedy()):
        scalar_rng = np.random.default_rng(seed)
        expected = [scalar(selector, row, scalar_rng) for row in probs]
        vector_rng = np.random.default_rng(seed)
        index, prob = selector.select_rows(probs, vector_rng)
        assert [(int(i), float(p)) for i, p in zip(index, prob, strict=True)] == expected
        assert scalar_rng.bit_generator.state == vector_rng.bit_generator.state


@settings(max_examples=200, deadline=None)
@given(
    ema=arrays(
        np.float64,
        (4, 6),
        elements=st.one_of(
            st.floats(-1e308, 1e308), st.sampled_from([0.0, 1.0, -1.0, 1e-300, 3e307])
        ),
    )
)
def test_minmax_rows_match_minmax_probs(ema: np.ndarray) -> None:
    rows = minmax_rows(ema)
    for i in range(ema.shape[0]):
        assert np.array_equal(rows[i], metactl.minmax_probs(ema[i]))


# -- LinearThompson: features, so new prompts benefit from old ones ------------------------------
def _spread_env(
    values: np.ndarray, features: np.ndarray, rng: np.random.Generator, group: int
) -> np.ndarray:
    """Feature 1 prompts give mixed rewards only when sampled hot (T >= 1.2), feature 0
    prompts only when sampled cold (T <= 0.8); otherwise every rollout gets the same reward."""
    hot = features[:, 0] > 0.5
    mixed = np.where(hot, values >= 1.2 - 1e-9, values <= 0.8 + 1e-9)
    p = np.where(mixed, 0.5, np.where(hot, 0.0, 1.0))
    return (rng.random((values.shape[0], group)) < p[:, None]).astype(float).reshape(-1)


def test_linear_thompson_transfers_to_unseen_prompts() -> None:
    policy = metactl.linear_thompson(seed=0, feature_dim=1, noise_std=0.2)
    rng = np.random.default_rng(0)
    for step in range(40):
        keys = list(range(step * 32, (step + 1) * 32))  # every prompt is new
        features = (np.arange(32) % 2).astype(float)[:, None]
        batch = policy.select(contexts=keys, features=features)
        policy.update(batch, rewards=_spread_env(batch.values, features, rng, 8))
    probs = policy.context_probs([-1, -2], features=[[1.0], [0.0]])
    grid = policy.candidates
    assert probs[0][grid >= 1.2 - 1e-9].sum() > 0.8  # a new hot-type prompt: sampled hot
    assert probs[1][grid <= 0.8 + 1e-9].sum() > 0.8  # a new cold-type prompt: sampled cold
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    batch = policy.select(contexts=[-1, -2], features=[[1.0], [0.0]])
    assert batch.on_grid.all() and np.all((batch.probs >= 0) & (batch.probs <= 1))
    np.testing.assert_allclose(batch.probs, probs[[0, 1], batch.indices], atol=0.02)


def test_linear_thompson_running_pass_rate_is_a_feature() -> None:
    rule = metactl.LinearThompson()
    phi = rule.phi({"successes": np.array([0.0, 8.0]), "failures": np.array([0.0, 0.0])}, None)
    assert phi[0].tolist() == [1.0, 0.0, 0.0]  # unseen: pass rate 1/2
    assert phi[1].tolist() == pytest.approx([1.0, 0.4, 0.16])  # (8 + 1) / (8 + 2) - 1/2


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
def _snapshot(policy: MetaPolicy) -> str:
    return json.dumps(policy.state_dict(), sort_keys=True)


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
    before = _snapshot(policy)
    with pytest.raises(error, match=match):
        policy.select(contexts=contexts)
    assert _snapshot(policy) == before  # the RNG did not move


def test_bad_features_raise() -> None:
    with pytest.raises(ValueError, match="uses no features"):
        metactl.ptgs().select(contexts=[1], features=[[0.0]])
    policy = metactl.linear_thompson(feature_dim=2)
    before = _snapshot(policy)
    with pytest.raises(ValueError, match="needs features"):
        policy.select(contexts=[1])
    with pytest.raises(ValueError, match="features must have shape"):
        policy.select(contexts=[1, 2], features=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="features contains 1 NaN"):
        policy.select(contexts=[1], features=[[0.0, math.nan]])
    with pytest.raises(ValueError, match="features are given per context"):
        policy.select(features=[[0.0, 1.0]])
    assert _snapshot(policy) == before


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
    before = _snapshot(policy)  # after the global select() above, which draws
    for decisions, feedback, error, match in bad_cases:
        with pytest.raises(error, match=match):
            policy.update(decisions, **feedback)
        assert _snapshot(policy) == before, (decisions, sorted(feedback))
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
    before = _snapshot(target)
    with pytest.raises((ValueError, TypeError), match=match):
        target.load_state_dict(state)
    assert _snapshot(target) == before


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


def test_global_states_of_old_rules_are_unchanged() -> None:
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


@pytest.mark.parametrize(
    "module",
    [
        "metactl.contexts",
        "metactl.rules.ptgs",
        "metactl.rules.contextual_tampo",
        "metactl.rules.linear_thompson",
        "metactl.policy",
    ],
)
def test_docstring_examples_run(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


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


def test_ptgs_needs_positive_candidates_and_valid_settings() -> None:
    with pytest.raises(ValueError, match="temperatures > 0"):
        MetaPolicy([-1.0, 1.0], PTGS(), hyperparameter="generic")
    for kwargs, match in [
        ({"tau": 1.0}, "tau must be > 1"),
        ({"gamma": 0.0}, "gamma"),
        ({"pivot_start": 1.0}, "pivot_start"),
        ({"pivot_end": 0.0}, "pivot_end"),
        ({"total_steps": 0}, "total_steps"),
        ({"max_contexts": 0}, "max_contexts"),
        ({"t_ref": -1.0}, "t_ref"),
    ]:
        with pytest.raises(ValueError, match=match):
            PTGS(**kwargs)
    with pytest.raises(TypeError, match="total_steps"):
        PTGS(total_steps=1.5)  # type: ignore[arg-type]
