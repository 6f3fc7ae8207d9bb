"""Diagnostics of the likelihood rules' signal: hand-computed spreads, support
sizes and correlations, degenerate groups, bad inputs, and that both trainers record them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import metactl
from metactl.diagnostics import SCALAR_FIELDS, signal_diagnostics, signal_options, stack_diagnostics
from metactl.rules.tampo import candidate_advantages


def _no_nan(d: dict) -> None:
    json.dumps(d, allow_nan=False)  # raises on NaN/inf anywhere


# ------------------------------------------------------------------------------ hand computed
def test_spread_favoured_support_and_correlation_of_a_hand_made_step():
    # sparsemax rows: [0.6, 0.4] and [0.2, 0.8]; a = ([0.6, 0.4] - [0.2, 0.8]) / 2 = [0.2, -0.2]
    ll = np.array([[-1.0, -1.2], [-1.0, -0.4]])
    d = signal_diagnostics(ll, [1.0, -1.0], [0.8, 1.2], 1.0, group_size=2)
    assert d["signal"] == pytest.approx([0.2, -0.2], abs=1e-15)
    assert d["signal_spread"] == pytest.approx(0.4, abs=1e-15)
    assert (d["favoured_index"], d["favoured_candidate"]) == (0, 0.8)
    assert d["favoured_signal"] == pytest.approx(0.2, abs=1e-15)
    assert d["support_mean"] == 2.0 and d["support_histogram"] == [0, 2]
    # T* = [0.8, 1.2] against A = [1, -1]: a perfect negative correlation
    assert d["tstar_advantage_correlation"] == -1.0
    assert d["group_correlations"] == [-1.0]
    assert d["informative_groups"] == 1 and d["signal_rows"] == 2
    assert d["tstar_gap"] == pytest.approx(0.8 - 1.2)
    assert d["sampling_value"] == 1.0
    _no_nan(d)


def test_support_size_counts_the_candidates_sparsemax_keeps():
    # sparsemax supports, by the sorted-prefix test 1 + k z_(k) > sum_{j<=k} z_(j):
    # [0, -0.5, -3] -> 2; [0, -2, -2] -> 1; [0, 0, 0] -> 3; [-0.1, -0.2, -0.3] -> 3
    ll = np.array([[0.0, -0.5, -3.0], [0.0, -2.0, -2.0], [0.0, 0.0, 0.0], [-0.1, -0.2, -0.3]])
    d = signal_diagnostics(ll, [1.0, -1.0, 2.0, -2.0], [0.6, 1.0, 1.4], 1.0, group_size=2)
    assert d["support_histogram"] == [1, 1, 2]
    assert d["support_mean"] == 2.25
    # softmax keeps every candidate; a small tau makes sparsemax one-hot on these rows
    soft = signal_diagnostics(ll[[0, 1, 3]], [1.0, -1.0, 2.0], [0.6, 1.0, 1.4], 1.0, 3,
                              normalizer="softmax")
    assert soft["support_histogram"] == [0, 0, 3] and soft["support_mean"] == 3.0
    sharp = signal_diagnostics(ll[[0, 1, 3]], [1.0, -1.0, 2.0], [0.6, 1.0, 1.4], 1.0, 3,
                               tau=0.01)
    assert sharp["support_histogram"] == [3, 0, 0]
    # the signal is exactly the rule's a_k, normaliser and tau included
    for kwargs in ({}, {"normalizer": "softmax"}, {"tau": 0.3}):
        got = signal_diagnostics(ll, [1.0, -1.0, 2.0, -2.0], [0.6, 1.0, 1.4], 1.0, 2, **kwargs)
        want = candidate_advantages(ll, np.array([1.0, -1.0, 2.0, -2.0]), **kwargs)
        assert got["signal"] == want.tolist()


def _one_hot_rows(columns: list[int], k: int = 3) -> np.ndarray:
    """Rows whose likelihood-optimal candidate is the given column (by a margin of 0.1)."""
    ll = np.full((len(columns), k), -1.0)
    ll[np.arange(len(columns)), columns] = -0.9
    return ll


def test_within_group_correlation_is_the_mean_over_informative_groups():
    cands = [0.8, 1.0, 1.2]
    # group 0: T* = [0.8, 1.0, 1.0, 1.2], A = [1, 1, -1, -1]: r = -0.4 / sqrt(0.08 * 4)
    # group 1: T* constant (1.0) while A varies: undefined, counts 0, not informative
    # group 2: every A = 0: undefined, counts 0, not informative
    # group 3: T* = [1.2, 1.2, 0.8, 0.8], A = [2, 1, -1, -2]: dx = [.2, .2, -.2, -.2],
    #          dy = A: r = 1.2 / sqrt(0.16 * 10)
    columns = [*[0, 1, 1, 2], *[1, 1, 1, 1], *[0, 2, 0, 2], *[2, 2, 0, 0]]
    adv = [*[1, 1, -1, -1], *[1, -1, 1, -1], *[0, 0, 0, 0], *[2, 1, -1, -2]]
    d = signal_diagnostics(_one_hot_rows(columns), adv, cands, 1.0, group_size=4)
    r0, r3 = -0.4 / math.sqrt(0.32), 1.2 / math.sqrt(1.6)
    assert d["group_correlations"] == pytest.approx([r0, 0.0, 0.0, r3], abs=1e-12)
    assert d["informative_groups"] == 2
    assert d["tstar_advantage_correlation"] == pytest.approx((r0 + r3) / 2, abs=1e-12)
    assert d["signal_rows"] == 12
    _no_nan(d)


def test_rows_with_zero_advantage_are_left_out_whatever_their_placeholder_likelihoods():
    # the reference trainer leaves A = 0 rows unscored (loglik 0): they must change nothing
    rng = np.random.default_rng(0)
    ll = rng.normal(-1.0, 0.2, (8, 4))
    adv = np.array([1.0, 0.0, -1.0, 0.0, 0.5, -0.5, 0.0, 0.0])
    cands = [0.6, 0.9, 1.2, 1.5]
    placeholder = ll.copy()
    placeholder[adv == 0] = 0.0
    a = signal_diagnostics(ll, adv, cands, 0.9, group_size=4)
    b = signal_diagnostics(placeholder, adv, cands, 0.9, group_size=4)
    assert a == b
    assert a["signal_rows"] == 4 and sum(a["support_histogram"]) == 4
    # group 0 correlates over its two signal rows only: +-1 (or 0 if their T* tie)
    assert abs(a["group_correlations"][0]) in (0.0, 1.0)


def test_a_step_without_any_signal_is_flat_and_nan_free():
    ll = np.array([[-1.0, -0.5], [-0.7, -0.9], [-0.2, -0.3], [-0.4, -0.1]])
    d = signal_diagnostics(ll, np.zeros(4), [0.8, 1.2], 1.2, group_size=2)
    assert d["signal"] == [0.0, 0.0] and d["signal_spread"] == 0.0
    assert (d["favoured_index"], d["favoured_candidate"]) == (-1, None)
    assert d["support_mean"] == 0.0 and d["support_histogram"] == [0, 0]
    assert d["tstar_advantage_correlation"] == 0.0 and d["informative_groups"] == 0
    assert d["group_correlations"] == [0.0, 0.0]
    assert d["signal_rows"] == 0 and d["tstar_gap"] == 0.0
    _no_nan(d)
    # only successes (no A < 0): the T* gap has no side to compare, 0.0
    one_sided = signal_diagnostics(ll, [1.0, 0.0, 0.0, 0.0], [0.8, 1.2], 1.2, group_size=2)
    # row 0 is sparsemax [0.25, 0.75]: the step favours 1.2
    assert one_sided["tstar_gap"] == 0.0 and one_sided["favoured_candidate"] == 1.2
    _no_nan(one_sided)


def test_huge_advantages_stay_finite_and_correlations_bounded():
    ll = _one_hot_rows([0, 2, 0, 2])
    d = signal_diagnostics(ll, [1e300, -1e300, 3e299, -3e299], [0.8, 1.0, 1.2], 1.0, 4)
    # dx = [-.2, .2, -.2, .2], dy = A / 1e300: r = -0.52 / sqrt(0.16 * 2.18), scale-free
    assert d["tstar_advantage_correlation"] == pytest.approx(-0.52 / math.sqrt(0.16 * 2.18))
    assert -1.0 <= d["tstar_advantage_correlation"] <= 1.0
    _no_nan(d)


def test_sampling_value_per_row_is_reported_as_its_mean():
    ll = _one_hot_rows([0, 1, 2, 0])
    d = signal_diagnostics(ll, [1, -1, 1, -1], [0.8, 1.0, 1.2], [0.8, 0.8, 1.2, 1.2], 2)
    assert d["sampling_value"] == pytest.approx(1.0)
    assert signal_diagnostics(ll, [1, -1, 1, -1], [0.8, 1.0, 1.2], np.float32(1.5), 2)[
        "sampling_value"] == 1.5


# ------------------------------------------------------------------------------- bad inputs
GOOD = {"loglik": _one_hot_rows([0, 1, 2, 0]), "advantages": [1.0, -1.0, 1.0, -1.0],
        "candidates": [0.8, 1.0, 1.2], "sampling_value": 1.0, "group_size": 2}


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"loglik": np.zeros(4)}, ValueError, "loglik must have shape"),
        ({"loglik": np.zeros((4, 2))}, ValueError, "loglik has 2 columns"),
        ({"loglik": np.zeros((0, 3))}, ValueError, "loglik is empty"),
        ({"loglik": np.array([[np.nan, 0, 0]] * 4)}, ValueError, "loglik contains 4 NaN"),
        ({"loglik": "abc"}, TypeError, "loglik must be an array"),
        ({"advantages": [1.0, -1.0]}, ValueError, r"advantages must have shape \(4,\)"),
        ({"advantages": [1.0, np.inf, 0.0, 0.0]}, ValueError, "advantages contains 1 NaN"),
        ({"advantages": [True, False, True, False]}, TypeError, "advantages must hold numbers"),
        ({"candidates": [0.8, 0.8, 1.2]}, ValueError, "candidates has duplicate"),
        ({"candidates": [1.0]}, ValueError, "candidates needs at least 2"),
        ({"sampling_value": np.nan}, ValueError, "sampling_value must be finite"),
        ({"sampling_value": [1.0, 1.0]}, ValueError, "sampling_value must be a number or"),
        ({"sampling_value": "1.0"}, TypeError, "sampling_value must be an array"),
        ({"sampling_value": True}, TypeError, "sampling_value must hold numbers"),
        ({"group_size": 3}, ValueError, "group_size 3 must divide the 4 rows"),
        ({"group_size": 1}, ValueError, "group_size must be >= 2"),
        ({"group_size": 2.0}, TypeError, "group_size must be an integer"),
        ({"group_size": True}, TypeError, "group_size must be an integer"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(change, error, match):
    with pytest.raises(error, match=match):
        signal_diagnostics(**{**GOOD, **change})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"normalizer": "entmax"}, ValueError, "normalizer must be one of"),
        ({"normalizer": None}, TypeError, "normalizer must be a string"),
        ({"tau": 0.0}, ValueError, "tau must be > 0"),
        ({"tau": float("nan")}, ValueError, "tau must be finite"),
    ],
)
def test_bad_options_raise_naming_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        signal_diagnostics(**GOOD, **kwargs)


def test_the_largest_finite_advantages_give_a_finite_spread():
    # max a - min a <= mean |A|: advantages of both signs at the float64 limit stay finite
    ll = np.array([[0.0, -5.0], [-5.0, 0.0]])
    d = signal_diagnostics(ll, [1.79e308, -1.79e308], [0.8, 1.2], 1.0, 2)
    assert d["signal_spread"] == pytest.approx(1.79e308) and d["favoured_candidate"] == 0.8
    _no_nan(d)


def test_stack_diagnostics_makes_per_step_arrays_with_gaps_on_flat_steps():
    ll = np.array([[-1.0, -1.2], [-1.0, -0.4]])
    steps = [signal_diagnostics(ll, [1.0, -1.0], [0.8, 1.2], 1.0, 2),
             signal_diagnostics(ll, [0.0, 0.0], [0.8, 1.2], 1.2, 2)]
    arrays = stack_diagnostics(steps)
    assert set(arrays) == set(SCALAR_FIELDS) | {"signal", "support_histogram"}
    assert arrays["signal"].shape == (2, 2) and arrays["support_histogram"].shape == (2, 2)
    assert arrays["sampling_value"].tolist() == [1.0, 1.2]
    assert arrays["favoured_candidate"][0] == 0.8 and np.isnan(arrays["favoured_candidate"][1])
    assert arrays["favoured_index"].tolist() == [0.0, -1.0]
    with pytest.raises(ValueError, match="records must be a non-empty list"):
        stack_diagnostics([])
    wide = signal_diagnostics(_one_hot_rows([0, 2]), [1.0, -1.0], [0.8, 1.0, 1.2], 1.0, 2)
    with pytest.raises(ValueError, match="disagree on the number of candidates"):
        stack_diagnostics([steps[0], wide])


# ---------------------------------------------------------------------- the trainers record it
def test_the_gym_learner_records_the_signal_of_every_step_for_likelihood_rules(tmp_path):
    from metactl.adapters.gym import TokenSearchEnv
    from metactl.adapters.gym.learner import GRPOConfig
    from metactl.adapters.gym.training import train
    from metactl.adapters.lab.gym_study import main

    env = TokenSearchEnv(vocab_size=5, length=3, num_tasks=3)
    config = GRPOConfig(group_size=4)
    for policy in (metactl.tampo(seed=0), metactl.tampo(normalizer="softmax", seed=0),
                   metactl.MetaPolicy(metactl.PAPER_TEMPERATURES, metactl.TAMPO(tau=0.2))):
        seen: list[dict] = []

        def keep(record, seen=seen, policy=policy):
            seen.append(signal_diagnostics(
                record.feedback["loglik"], record.feedback["advantages"],
                metactl.PAPER_TEMPERATURES, float(record.decision.value), 4,
                normalizer=policy.rule.normalizer, tau=policy.rule.tau))

        log = train(policy, env, steps=6, config=config, seed=1, on_step=keep)
        assert log.signal is not None
        want = stack_diagnostics(seen)
        assert set(log.signal) == set(want)
        for key, values in want.items():
            np.testing.assert_array_equal(log.signal[key], values, err_msg=key)
        assert log.signal["sampling_value"].tolist() == log.temperature.tolist()
        assert np.any(log.signal["signal_spread"] > 0)  # the run had informative steps
    fixed = metactl.MetaPolicy(metactl.PAPER_TEMPERATURES, metactl.Fixed(1.0))
    assert train(fixed, env, steps=2, config=config).signal is None
    # the study saves them (signal.npz) and plots the TAMPO arms (signal_diagnostics.png)
    out = tmp_path / "study"
    assert main(["--seeds", "2", "--steps", "6", "--controllers", "tampo,fixed-1.0",
                 "--workers", "1", "--out", str(out), "--quiet"]) == 0
    saved = np.load(out / "signal.npz")
    assert saved["tampo/seed"].tolist() == [0, 1]
    assert saved["tampo/signal"].shape == (2, 6, 10)
    assert not any(key.startswith("fixed-") for key in saved.files)
    assert (out / "signal_diagnostics.png").stat().st_size > 10_000


def test_the_reference_trainer_records_the_signal_of_every_step(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import torch
    from metactl.adapters.char_tokenizer import build_char_tokenizer
    from metactl.adapters.lab.reproduce.report import make_plots
    from metactl.adapters.reference.model import TinyModelConfig, build_model
    from metactl.adapters.reference.tasks import ALPHABET, ChainTask
    from metactl.adapters.reference.trainer import GRPOConfig, GRPOTrainer

    task = ChainTask(ops=("+",), min_len=1, max_len=2, benchmark_lengths=(1, 2))
    tiny = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                           intermediate_size=64, max_positions=32)

    def run(policy, **overrides):
        torch.manual_seed(0)
        tok = build_char_tokenizer(ALPHABET)
        cfg = GRPOConfig(**{**dict(steps=4, prompts_per_step=4, group_size=4, lr=1e-3,
                                   max_new_tokens=6, checkpoint_every=0, eval_every=0),
                            **overrides})
        trainer = GRPOTrainer(build_model(tiny, tok, seed=0), tok, cfg, policy,
                              prompts=lambda rng, n: task.sample(rng, n),
                              reward_fn=lambda c, a: float("7" in c))
        trainer.train(progress_bar=False)
        return trainer

    plain = run(metactl.tampo(seed=1))
    scored = run(metactl.tampo(seed=1), diagnostic_steps=(0, 1, 2, 3))  # every row scored
    assert all("signal" in h for h in plain.history)
    assert any(h["grad_rows"] < 16 for h in plain.history), "needs a step with A = 0 rows"
    for h, d, full in zip(plain.history, scored.diagnostics, scored.history, strict=True):
        # the rows the plain run left unscored (placeholder 0) change nothing
        assert h["signal"] == full["signal"]
        want = signal_diagnostics(d["loglik"], d["advantages"], metactl.PAPER_TEMPERATURES,
                                  d["temperature"], 4)
        lists = ("signal", "group_correlations", "support_histogram")
        for key in lists:
            assert h["signal"][key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
        assert {k: v for k, v in h["signal"].items() if k not in lists} == pytest.approx(
            {k: v for k, v in want.items() if k not in lists}, rel=1e-6, abs=1e-9)
        json.dumps(h["signal"], allow_nan=False)
    assert any(h["signal"]["signal_spread"] > 0 for h in plain.history)
    fixed = run(metactl.MetaPolicy(metactl.PAPER_TEMPERATURES, metactl.Fixed(1.0)), steps=2)
    assert not any("signal" in h for h in fixed.history)

    # the report's figure, from results shaped as run_arm writes them
    results = [{"controller": c, "seed": 0, "curve": [], "steps": 4,
                "temperature": [h["temperature"] for h in t.history],
                "reward": [h["reward"] for h in t.history],
                "probs": [h["probs"] for h in t.history], "diagnostics": t.diagnostics,
                "candidates": list(metactl.PAPER_TEMPERATURES),
                **({"signal": [h["signal"] for h in t.history]} if c == "tampo" else {})}
               for c, t in (("tampo", scored), ("fixed-1.0", fixed))]
    figs = make_plots(tmp_path, results, ["tampo", "fixed-1.0"])
    assert (tmp_path / figs["signal_diagnostics"]).stat().st_size > 10_000


def test_the_module_examples_run():
    import doctest

    import metactl.diagnostics

    result = doctest.testmod(metactl.diagnostics, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_the_figure_draws_arms_without_any_signal_and_rejects_bad_input(tmp_path):
    from metactl.adapters.lab.signal_plot import plot_signal_diagnostics, stack_runs

    cands = [0.8, 1.0, 1.2]
    loud = stack_runs([signal_diagnostics(_one_hot_rows([0, 1, 2, 0]), [1, -1, 2, -2], cands,
                                          t, 2) for t in (0.8, 1.0, 1.2, 1.0)])
    quiet = stack_runs([None, signal_diagnostics(_one_hot_rows([0, 1, 2, 0]), np.zeros(4),
                                                 cands, 1.0, 2)])  # every step flat
    assert stack_runs([None, None]) is None
    assert loud is not None and quiet is not None
    path = plot_signal_diagnostics({"tampo": [loud, loud], "flat": [quiet]}, cands,
                                   tmp_path / "signal.png")
    assert path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="arms is empty"):
        plot_signal_diagnostics({}, cands, tmp_path / "x.png")
    with pytest.raises(ValueError, match="arm 'tampo' has no seeds"):
        plot_signal_diagnostics({"tampo": []}, cands, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"expected \(steps, 2\)"):
        plot_signal_diagnostics({"tampo": [loud]}, [0.8, 1.0], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_signal_options_are_the_rules_own_normaliser_and_scale() -> None:
    assert signal_options(metactl.TAMPO(normalizer="softmax", tau=0.2)) == {
        "normalizer": "softmax", "tau": 0.2}  # fmt: skip
    assert signal_options(metactl.Hedge(normalizer="softmax")) == {"normalizer": "softmax"}
    assert signal_options(metactl.MetaGradient()) == {"normalizer": "sparsemax"}
    assert signal_options(metactl.ContextualTAMPO(normalizer="softmax")) == {
        "normalizer": "softmax"}  # fmt: skip
    assert signal_options(metactl.PTGS()) == {}  # PTGS's tau is its temperature range
    assert signal_options(metactl.Fixed(1.0)) == {}
