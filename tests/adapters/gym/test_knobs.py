"""The gym learner and study over any sampler knob: the sampler draws from the likelihood
family's own distribution, the batch is scored and trained as it was sampled, the new study arms
run end to end, and a policy over a knob the learner cannot set is refused."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from metactl.adapters.gym import TokenSearchEnv
from metactl.adapters.gym.learner import GRPOConfig, TabularGRPO
from metactl.adapters.gym.sampling import family_log_probs, log_softmax, row_settings
from metactl.adapters.gym.training import StepRecord, train
from metactl.adapters.lab.controllers import JOINT_GRID
from metactl.adapters.lab.controllers import TOP_P_GRID as TOP_P_CANDIDATES
from metactl.adapters.lab.gym_study import main, make_controller

import metactl
from metactl.likelihood import candidate_loglik

# one state, V = 6, a tie at 1.0 (top-k = 2 keeps both tied tokens) and a long tail
LOGITS = np.array([2.0, 1.0, 1.0, 0.2, -0.5, -1.5])
V = LOGITS.shape[0]
DRAWS = 40_000


def _family_probs(setting: dict[str, Any]) -> np.ndarray:
    """The exact probability of every token under ``setting``, from metactl.likelihood."""
    other = {k: (v + 1 if k == "top_k" else v * 0.9) for k, v in setting.items()}
    z = np.broadcast_to(LOGITS, (V, 1, V))
    tokens = np.arange(V)[:, None]
    loglik = candidate_loglik(z, tokens, np.ones((V, 1), dtype=bool), [setting, other], "joint")
    return np.exp(np.asarray(loglik)[:, 0])


def _one_state_learner(group_size: int = DRAWS) -> TabularGRPO:
    env = TokenSearchEnv(vocab_size=V, length=1, num_tasks=1, families=("shoulder",))
    learner = TabularGRPO(env, GRPOConfig(group_size=group_size))
    learner.logits[0, 0, V] = LOGITS  # the begin-of-answer state's logits
    return learner


@pytest.mark.parametrize(
    "setting",
    [
        {"temperature": 1.0, "top_p": 0.7},
        {"temperature": 1.0, "top_k": 2},  # the tie at the boundary is kept: 3 tokens
        {"temperature": 1.0, "min_p": 0.3},
        {"temperature": 0.7, "top_p": 0.8},
        {"temperature": 1.4, "top_k": 4, "top_p": 0.9, "min_p": 0.1},
    ],
    ids=["top_p", "top_k_tie", "min_p", "T_top_p", "all"],
)
def test_sampling_matches_the_family_probabilities(setting: dict[str, Any]) -> None:
    exact = _family_probs(setting)
    plain = np.exp(log_softmax(LOGITS / setting["temperature"]))
    # the truncation moves real mass: a sampler that ignored it would fail the check below
    assert np.abs(exact - plain).max() > 0.03
    np.testing.assert_allclose(exact.sum(), 1.0, rtol=1e-12)
    learner = _one_state_learner()
    knobs = {k: v for k, v in setting.items() if k != "temperature"}
    batch = learner.rollout(setting["temperature"], np.random.default_rng(0), **knobs)
    freq = np.bincount(batch.tokens[:, 0], minlength=V) / DRAWS
    tolerance = 5.0 * np.sqrt(exact * (1 - exact) / DRAWS) + 1e-3
    assert np.all(np.abs(freq - exact) <= tolerance), (freq, exact)
    assert np.any(np.abs(freq - plain) > tolerance)
    # the learner scores its batch with exactly those probabilities
    own = learner.token_logprobs(batch)[:, 0]
    np.testing.assert_allclose(np.exp(own), exact[batch.tokens[:, 0]], rtol=1e-12)


def test_top_k_of_one_samples_the_mode_up_to_the_smoothing() -> None:
    learner = _one_state_learner()
    batch = learner.rollout(1.0, np.random.default_rng(1), top_k=1)
    freq = np.bincount(batch.tokens[:, 0], minlength=V) / DRAWS
    p_mode = np.exp(log_softmax(LOGITS))[0]
    eps = learner.config.truncation_epsilon
    assert freq[0] == pytest.approx((1 - eps) + eps * p_mode, abs=5e-4)


def test_family_log_probs_agree_with_candidate_loglik_to_the_bit() -> None:
    rng = np.random.default_rng(0)
    m = 300
    z = np.round(rng.normal(size=(m, 8)) * 2) / 2  # many ties
    z[rng.random(z.shape) < 0.1] = -np.inf  # banned tokens
    z[:, 0] = np.maximum(z[:, 0], 0.0)
    tokens = np.array([rng.choice(np.flatnonzero(np.isfinite(row))) for row in z])
    for setting in ({"temperature": 0.8, "top_p": 0.7}, {"temperature": 1.3, "top_k": 3},
                    {"temperature": 1.0, "min_p": 0.2},
                    {"temperature": 0.7, "top_p": 0.8, "top_k": 4, "min_p": 0.05}):  # fmt: skip
        rows = row_settings(m, top_p=setting.get("top_p", 1.0), top_k=setting.get("top_k"),
                            min_p=setting.get("min_p", 0.0))  # fmt: skip
        terms = family_log_probs(z, np.full(m, setting["temperature"]), rows)
        other = {k: (v + 1 if k == "top_k" else v * 0.9) for k, v in setting.items()}
        expected = candidate_loglik(z[:, None], tokens[:, None], np.ones((m, 1), dtype=bool),
                                    [setting, other], "joint")  # fmt: skip
        np.testing.assert_array_equal(terms.log_q[np.arange(m), tokens], expected[:, 0])
        np.testing.assert_allclose(np.exp(terms.log_q).sum(axis=1), 1.0, rtol=1e-12)


@pytest.mark.parametrize(
    "knobs", [{"top_p": 0.7}, {"top_k": 2}, {"min_p": 0.2, "top_p": 0.9}], ids=str
)
def test_truncated_gradient_matches_finite_differences(knobs: dict[str, Any]) -> None:
    env = TokenSearchEnv(vocab_size=5, length=3, num_tasks=2)
    learner = TabularGRPO(env, GRPOConfig(group_size=4))
    learner.logits += np.random.default_rng(2).normal(size=learner.logits.shape)
    temps = np.repeat([0.8, 1.3], 4)  # a temperature per task, as a per-prompt policy gives
    batch = learner.rollout(temps, np.random.default_rng(3), **knobs)
    assert batch.truncation is not None
    advantages = np.random.default_rng(4).normal(size=learner.num_rows)
    loss, grad = learner.gradient(batch, advantages)
    # the loss is -(A log q) with q the sampler's own distribution
    expected = -(advantages[:, None] * learner.token_logprobs(batch)).mean()
    assert loss == pytest.approx(expected, rel=1e-12)
    used = np.argwhere(grad != 0)
    h = 1e-6
    for index in map(tuple, used[:: max(len(used) // 25, 1)]):
        saved = learner.logits[index]
        learner.logits[index] = saved + h
        up = learner.gradient(batch, advantages)[0]
        learner.logits[index] = saved - h
        down = learner.gradient(batch, advantages)[0]
        learner.logits[index] = saved
        assert (up - down) / (2 * h) == pytest.approx(grad[index], rel=1e-5, abs=1e-9)


def _records(policy: metactl.MetaPolicy, config: GRPOConfig, steps: int = 4) -> list[StepRecord]:
    records: list[StepRecord] = []
    env = TokenSearchEnv(vocab_size=6, length=3, num_tasks=3)
    train(policy, env, steps, config, seed=0, on_step=records.append)
    return records


@pytest.mark.parametrize(
    ("make", "config"),
    [
        (lambda: metactl.tampo([0.8, 0.9, 1.0], hyperparameter="top_p", seed=0),
         GRPOConfig(group_size=4)),
        (lambda: metactl.tampo([1, 2, 6], hyperparameter="top_k", seed=0),
         GRPOConfig(group_size=4, temperature=1.2)),
        (lambda: metactl.tampo(metactl.grid(temperature=[0.7, 1.2], top_p=[0.85, 1.0]), seed=0),
         GRPOConfig(group_size=4, min_p=0.05)),
        (lambda: metactl.tampo(seed=0), GRPOConfig(group_size=4, top_p=0.9, top_k=4)),
    ],
    ids=["top_p", "top_k", "joint", "temperature-under-truncation"],
)
def test_sampling_candidate_scores_the_batch_as_it_was_sampled(make: Any, config: Any) -> None:
    policy = make()
    for record in _records(policy, config):
        loglik = np.asarray(record.feedback["loglik"])
        own = TabularGRPO.token_logprobs(record.learner, record.batch).mean(axis=1)
        np.testing.assert_allclose(loglik[:, record.decision.index], own, rtol=1e-12)
        setting = record.decision.setting
        batch = record.batch
        for knob, value in setting.items():
            assert batch.setting(knob) == value
        # the knobs the policy does not set sampled at the learner's fixed values
        fixed = config.fixed_knobs()
        for knob in ("temperature", "top_p", "top_k", "min_p"):
            if knob not in setting:
                want = 0.0 if fixed[knob] is None else fixed[knob]
                assert batch.setting(knob) == want


def test_the_log_records_every_knob() -> None:
    env = TokenSearchEnv(vocab_size=6, length=3, num_tasks=3)
    policy = metactl.tampo(metactl.grid(temperature=[0.7, 1.2], top_k=[2, 4]), seed=1)
    records: list[StepRecord] = []
    log = train(policy, env, 5, GRPOConfig(group_size=4, top_p=0.95), seed=0,
                on_step=records.append)  # fmt: skip
    settings = [r.decision.setting for r in records]
    assert log.temperature.tolist() == [s["temperature"] for s in settings]
    assert log.knobs["temperature"].tolist() == log.temperature.tolist()
    assert log.knobs["top_k"].tolist() == [s["top_k"] for s in settings]
    assert log.knobs["top_p"].tolist() == [0.95] * 5 and log.knobs["min_p"].tolist() == [0.0] * 5
    assert log.probs.shape == (5, 4)
    assert log.signal is None  # diagnostics rank candidate values; a joint grid has none


def test_per_prompt_top_p_sets_each_task_rows() -> None:
    policy = metactl.MetaPolicy([0.7, 0.85, 1.0], metactl.ContextualTAMPO(), metactl.Nucleus(0.7),
                                hyperparameter="top_p", seed=3)  # fmt: skip
    for record in _records(policy, GRPOConfig(group_size=4)):
        batch = record.batch
        expected = np.repeat(record.decision.values, 4)
        if batch.truncation is None:  # every task at top_p = 1
            assert np.all(expected == 1.0)
        else:
            np.testing.assert_array_equal(batch.truncation.settings.top_p, expected)
        assert batch.setting("temperature") == 1.0


def test_one_knob_signal_diagnostics_use_the_knob_values() -> None:
    env = TokenSearchEnv(vocab_size=6, length=3, num_tasks=3)
    policy = metactl.tampo(TOP_P_CANDIDATES, hyperparameter="top_p", seed=0)
    log = train(policy, env, 4, GRPOConfig(group_size=4), seed=0)
    assert log.signal is not None
    assert log.signal["sampling_value"].tolist() == log.knobs["top_p"].tolist()


def test_a_policy_over_a_knob_the_learner_cannot_set_is_refused() -> None:
    env = TokenSearchEnv(vocab_size=6, length=3, num_tasks=3)
    generic = metactl.MetaPolicy([-1.0, 2.0], metactl.EXP3(), hyperparameter="generic")
    before = json.dumps(generic.state_dict())
    with pytest.raises(ValueError, match="generic"):
        train(generic, env, 3)
    assert json.dumps(generic.state_dict()) == before  # nothing drawn

    class BeamPolicy(metactl.MetaPolicy):
        """A policy over a knob the gym sampler does not have (a spec the core itself would
        refuse to build, forced past its checks)."""

        @property
        def knobs(self) -> tuple[str, ...]:
            return ("num_beams",)

        @property
        def spec(self) -> Any:
            spec = copy.copy(super().spec)
            object.__setattr__(spec, "knobs", ("num_beams",))
            return spec

    beams = BeamPolicy([1.0, 2.0], metactl.EXP3(), hyperparameter="generic")
    with pytest.raises(ValueError, match=r"cannot sample the policy's knobs \['num_beams'\]"):
        train(beams, env, 3)
    assert beams.step == 0
    with pytest.raises(TypeError, match=r"metactl\.MetaPolicy"):
        train(object(), env, 3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"top_p": 1.5}, ValueError, r"top_p must lie in \(0, 1\]"),
        ({"top_p": 0.0}, ValueError, "top_p"),
        ({"top_k": 0}, ValueError, "top_k must be an integer >= 1"),
        ({"top_k": 2.5}, TypeError, "top_k"),
        ({"min_p": 1.0}, ValueError, r"min_p must lie in \[0, 1\)"),
        ({"temperature": -1.0}, ValueError, "temperature must be > 0"),
        ({"truncation_epsilon": 0.0}, ValueError, "epsilon"),
    ],
)
def test_learner_knob_settings_are_validated(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        GRPOConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"top_p": [0.9, 0.9]}, ValueError, r"top_p must be a number or one value per row"),
        ({"top_p": np.full(8, 1.2)}, ValueError, r"top_p\[0\] must lie in"),
        ({"top_k": np.full(8, 2.0)}, TypeError, r"top_k\[0\] must be an integer"),
        ({"min_p": float("nan")}, ValueError, "min_p must be finite"),
    ],
)
def test_rollout_validates_its_knobs(kwargs: dict, error: type, match: str) -> None:
    env = TokenSearchEnv(vocab_size=5, length=2, num_tasks=2)
    learner = TabularGRPO(env, GRPOConfig(group_size=4))
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    with pytest.raises(error, match=match):
        learner.rollout(1.0, rng, **kwargs)
    assert rng.bit_generator.state == state  # nothing drawn


def test_study_runs_the_knob_arms_end_to_end(tmp_path: Path, capsys) -> None:
    out = tmp_path / "study"
    argv = ["--seeds", "2", "--steps", "20", "--group-size", "4", "--num-tasks", "3",
            "--controllers", "fixed-1.0,top-p,tampo-joint", "--workers", "1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "top_p 0." in printed  # the table prints the other knob of the knob arms
    result = json.loads((out / "results.json").read_text())
    rows = {row["controller"]: row for row in result["rows"]}
    assert rows["top-p"]["knobs"] == ["top_p"] and rows["top-p"]["mean_temperature"] == 1.0
    assert rows["tampo-joint"]["knobs"] == ["temperature", "top_p"]
    assert 0.8 <= rows["top-p"]["other_knobs"]["top_p"]["mean"] <= 1.0
    runs = np.load(out / "runs.npz")
    names = runs["controller"].tolist()
    assert runs["probs/top-p"].shape == (2, 20, 5)
    assert runs["probs/tampo-joint"].shape == (2, 20, len(JOINT_GRID))
    top_p = runs["top_p"][np.array(names) == "top-p"]
    assert set(np.unique(top_p).tolist()) <= set(TOP_P_CANDIDATES)
    joint = np.array(names) == "tampo-joint"
    assert set(np.unique(runs["top_p"][joint]).tolist()) <= {0.9, 1.0}
    assert set(np.unique(runs["temperature"][joint]).round(1).tolist()) <= set(
        metactl.PAPER_TEMPERATURES
    )
    for name in ("learning_curves.png", "temperature.png", "meta_probs.png"):
        assert (out / name).stat().st_size > 0
    assert make_controller("top-p", result_config(result), seed=0).family == "top_p"


def result_config(result: dict) -> Any:
    from metactl.adapters.lab.gym_study import StudyConfig

    config = dict(result["config"])
    config["families"] = tuple(config["families"])
    return StudyConfig(**config)


def test_knob_wrappers_validate_sampler_knobs_like_the_core() -> None:
    import gymnasium as gym
    from metactl.adapters.gym import ENV_ID, KnobWrapper

    env = KnobWrapper(gym.make(ENV_ID), "top_k", None)  # None: off
    env.set_wrapper_attr("top_k", 50)
    assert env.get_wrapper_attr("top_k") == 50
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        env.set_wrapper_attr("top_k", 0)
    with pytest.raises(TypeError, match="top_k"):
        env.set_wrapper_attr("top_k", 2.5)
    assert env.get_wrapper_attr("top_k") == 50  # a refused value changes nothing
    with pytest.raises(ValueError, match=r"min_p must lie in \[0, 1\)"):
        KnobWrapper(gym.make(ENV_ID), "min_p", 1.0)
    loose = KnobWrapper(gym.make(ENV_ID), "beam_width", 2.0)  # not a sampler knob: > 0
    with pytest.raises(ValueError, match="beam_width must be a finite number > 0"):
        loose.set_wrapper_attr("beam_width", -1.0)
