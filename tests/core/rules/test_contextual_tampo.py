"""Per-prompt TAMPO (``metactl.rules.contextual_tampo``): with one context it is TAMPO
bit for bit, its global select is TAMPO's, each context shrinks toward the global EMA, and its
row-wise min-max equals ``minmax_probs``."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import metactl
from metactl.rules.contextual_tampo import _minmax_each_row, minmax_rows


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


def test_decision_means_are_numpys_mean_bit_for_bit() -> None:
    # the per-decision means add the G rows as vectors: the same bits as numpy's mean over G
    from types import SimpleNamespace

    from metactl.rules.contextual_tampo import _decision_means

    rng = np.random.default_rng(0)
    for trial in range(400):
        n, g, k = int(rng.integers(1, 60)), int(rng.integers(1, 20)), int(rng.integers(1, 30))
        x = rng.normal(size=(n * g, k)) * 10.0 ** rng.integers(-5, 5, (n * g, 1))
        if trial % 3 == 0:  # exact zeros of both signs
            x = np.where(rng.random(x.shape) < 0.7, 0.0, -0.0 * x)
        if trial % 4 == 0:
            x = np.asfortranarray(x)
        groups = SimpleNamespace(per_decision=lambda v, n=n, g=g: v.reshape((n, g, -1)))
        expected = x.reshape(n, g, k).mean(axis=1)
        got = _decision_means(x, groups)  # type: ignore[arg-type]
        assert got.shape == expected.shape
        assert np.array_equal(got.view(np.int64), expected.view(np.int64)), (n, g, k)


@pytest.mark.parametrize("kind", ["normal", "flat", "zeros", "ties", "wide", "tiny"])
def test_minmax_rows_of_many_rows_equal_the_row_wise_path(kind: str) -> None:
    """From 64 rows on the extremes come from the transposed copy: the same bits as the
    row-wise reductions (rows whose extreme is a signed zero or whose spread overflows take
    the row-wise path)."""
    rng = np.random.default_rng(len(kind))
    for n, k in [(64, 10), (300, 10), (1024, 5), (100, 16)]:
        ema = rng.normal(size=(n, k))
        if kind == "flat":
            ema[::3] = ema[::3, :1]
        elif kind == "zeros":
            ema[::5, 0], ema[::7, 1] = 0.0, -0.0
        elif kind == "ties":
            ema = np.round(ema, 1)
        elif kind == "wide":
            ema[::4] = rng.choice([1e308, -1e308, 1.0], size=(len(ema[::4]), k))
        elif kind == "tiny":
            ema *= 1e-300
        expected = _minmax_each_row(ema)
        got = minmax_rows(ema)
        assert got.tobytes() == expected.tobytes() and got.flags.c_contiguous
