"""The gym learner's effective-temperature check: every step's rollout is checked (pooled over
windows of steps, a few rows of each); samplers that ignore the chosen temperature (greedy,
T = 1 for a chosen 0.6) or the truncation are caught; "warn" warns, "off" skips; the
learner's own smoothed truncated sampler raises no false alarm; no number of a run changes."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
import pytest
from metactl.adapters.gym import TokenSearchEnv
from metactl.adapters.gym import training as training_mod
from metactl.adapters.gym.learner import GRPOConfig, Rollout, TabularGRPO
from metactl.adapters.gym.training import TrainLog, check_rollouts, check_rows, train

import metactl
from metactl.effective_temperature import EffectiveTemperatureWarning

ENV = TokenSearchEnv(vocab_size=16, length=6, num_tasks=6)  # the study's environment
ROLLOUT = TabularGRPO.rollout


def fixed(value: float, knob: str = "temperature") -> metactl.MetaPolicy:
    candidates = metactl.PAPER_TEMPERATURES if knob == "temperature" else [0.5, 0.9, 1.0]
    return metactl.MetaPolicy(candidates, metactl.Fixed(value), hyperparameter=knob)


def sampling_at(temperature: float) -> Any:
    """A rollout that samples at ``temperature`` whatever was chosen, and reports the chosen
    one (a sampler that ignores the temperature)."""

    def rollout(self: TabularGRPO, chosen: Any, rng: np.random.Generator,
                **knobs: Any) -> Rollout:
        return dataclasses.replace(ROLLOUT(self, temperature, rng, **knobs), temperature=chosen)

    return rollout


def untruncated(self: TabularGRPO, temperature: Any, rng: np.random.Generator,
                **knobs: Any) -> Rollout:
    """A rollout that ignores top-p and reports it as applied."""
    batch = ROLLOUT(self, temperature, rng, top_p=1.0, top_k=None, min_p=0.0)
    assert batch.truncation is None  # really untruncated
    return dataclasses.replace(batch, truncation=self.truncation(**knobs))


# ----------------------------------------------------------------------------------------------
# the log
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("policy", "config"), [
    (fixed(0.6), GRPOConfig()), (fixed(1.5), GRPOConfig()),
    (fixed(0.9), GRPOConfig(top_p=0.9)), (fixed(1.2), GRPOConfig(top_k=3, min_p=0.05)),
    (metactl.tampo(seed=0), GRPOConfig()), (metactl.ptgs(seed=0), GRPOConfig()),
    (fixed(0.9, "top_p"), GRPOConfig(temperature=0.8)),
])
def test_every_step_is_checked_once_in_windows(policy, config):
    log = train(policy, ENV, steps=40, seed=0, config=config)
    checks = log.temperature_checks
    assert [(c.first_step, c.last_step) for c in checks] == [(0, 15), (16, 31), (32, 39)]
    rows, length = config.temperature_check_rows, ENV.config.length
    assert [c.estimate.tokens for c in checks] == [16 * rows * length, 16 * rows * length,
                                                   8 * rows * length]
    for c in checks:
        assert c.passed and abs(c.estimate.z_lr) < 5


def test_the_check_changes_no_number_of_a_run():
    def fields(log: TrainLog) -> dict[str, Any]:
        return {f.name: getattr(log, f.name) for f in dataclasses.fields(log)
                if f.name != "temperature_checks"}

    checked = fields(train(metactl.tampo(seed=0), ENV, steps=20, seed=3))
    unchecked = fields(train(metactl.tampo(seed=0), ENV, steps=20, seed=3,
                             config=GRPOConfig(temperature_check="off")))
    assert checked.keys() == unchecked.keys()
    for name, value in checked.items():
        if isinstance(value, dict):
            assert value.keys() == unchecked[name].keys()
            for key in value:
                np.testing.assert_array_equal(value[key], unchecked[name][key])
        else:
            np.testing.assert_array_equal(value, unchecked[name])


def test_the_rows_read_are_spread_over_the_tasks():
    assert check_rows(48, 6).tolist() == [0, 8, 16, 24, 32, 40]  # one per task of G = 8
    assert check_rows(48, 0).tolist() == list(range(48))
    assert check_rows(4, 6).tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------------
# the failures it is there for
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sampled", "chosen", "message"), [
    (1e-4, 1.2, "drawn at temperature 0, not the intended 1.2"),     # greedy
    (1.0, 0.6, r"drawn at temperature (0\.9|1\.)\d*, not the intended 0.6"),
])
def test_a_sampler_that_ignores_the_chosen_temperature_stops_the_run(monkeypatch, sampled,
                                                                     chosen, message):
    monkeypatch.setattr(TabularGRPO, "rollout", sampling_at(sampled))
    with pytest.raises(ValueError, match=f"gym learner, steps 0-15: sampled tokens look "
                                         f"{message}"):
        train(fixed(chosen), ENV, steps=40, seed=0)


def test_a_sampler_that_ignores_the_truncation_stops_the_run(monkeypatch):
    monkeypatch.setattr(TabularGRPO, "rollout", untruncated)
    with pytest.raises(ValueError, match="outside the intended kept set"):
        train(fixed(1.0), ENV, steps=16, seed=0, config=GRPOConfig(top_p=0.5))


def test_warn_mode_warns_and_goes_on(monkeypatch):
    monkeypatch.setattr(TabularGRPO, "rollout", sampling_at(1.0))
    with pytest.warns(EffectiveTemperatureWarning, match="not the intended 0.6") as caught:
        log = train(fixed(0.6), ENV, steps=32, seed=0,
                    config=GRPOConfig(temperature_check="warn"))
    assert len(caught) == 2 and len(log.temperature) == 32
    assert [c.passed for c in log.temperature_checks] == [False, False]
    for c in log.temperature_checks:
        assert c.estimate.temperature == pytest.approx(1.0, rel=0.25)


def test_off_mode_neither_estimates_nor_logs(monkeypatch):
    def no_check(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the check is off: nothing may be estimated")

    monkeypatch.setattr(training_mod, "check_rollouts", no_check)
    monkeypatch.setattr(TabularGRPO, "rollout", sampling_at(1e-4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", EffectiveTemperatureWarning)
        log = train(fixed(1.2), ENV, steps=20, seed=0,
                    config=GRPOConfig(temperature_check="off"))
    assert log.temperature_checks == () and len(log.temperature) == 20


def test_the_learners_smoothed_truncation_raises_no_false_alarm():
    # the gym samples (1 - eps) p|S + eps p: a few tokens fall outside the kept set by design
    config = GRPOConfig(top_p=0.5, temperature_check_rows=0, temperature_check_window=1)
    log = train(fixed(1.0), ENV, steps=150, seed=0, config=config)
    assert all(c.passed for c in log.temperature_checks)
    assert sum(c.estimate.outside for c in log.temperature_checks) > 0  # they did occur


@pytest.mark.parametrize(("field", "value"), [
    ("temperature_check", "loud"), ("temperature_check_rows", -1),
    ("temperature_check_window", 0), ("temperature_check_window", True),
])
def test_the_check_settings_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        GRPOConfig(**{field: value})


def test_check_rollouts_refuses_what_it_cannot_check():
    learner = TabularGRPO(ENV, GRPOConfig())
    batch = learner.rollout(1.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least one Rollout"):
        check_rollouts([])
    with pytest.raises(ValueError, match="mode"):
        check_rollouts([batch], mode="loud")
    with pytest.raises(TypeError, match="Rollouts"):
        check_rollouts([batch.logits])
