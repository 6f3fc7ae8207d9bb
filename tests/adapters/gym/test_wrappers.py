"""TemperatureWrapper / KnobWrapper: attribute access through wrapper chains and vector envs."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import SyncVectorEnv
from gymnasium.wrappers import RecordEpisodeStatistics
from metactl.adapters.gym import ENV_ID, KnobWrapper, TemperatureWrapper


def _chain(temperature: float = 1.0) -> gym.Env:
    # gym.make adds TimeLimit, OrderEnforcing and PassiveEnvChecker under our wrapper
    return RecordEpisodeStatistics(TemperatureWrapper(gym.make(ENV_ID), temperature))


def test_get_and_set_through_a_wrapper_chain() -> None:
    env = _chain(0.8)
    assert env.get_wrapper_attr("temperature") == 0.8
    assert env.set_wrapper_attr("temperature", np.float32(1.25)) is True
    value = env.get_wrapper_attr("temperature")
    assert isinstance(value, float) and math.isclose(value, 1.25)
    # the value lives on the TemperatureWrapper, not on the outer wrapper
    assert "temperature" not in vars(env)
    _, info = env.reset(seed=0)
    assert info["temperature"] == value
    *_, info = env.step(0)
    assert info["temperature"] == value


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_values_are_rejected_on_every_route(bad: float) -> None:
    env = _chain()
    with pytest.raises(ValueError, match=r"^temperature must be (finite|> 0)"):
        env.set_wrapper_attr("temperature", bad)
    with pytest.raises(ValueError, match="temperature"):
        env.env.temperature = bad  # direct assignment on the TemperatureWrapper
    with pytest.raises(ValueError, match="temperature"):
        TemperatureWrapper(gym.make(ENV_ID), bad)
    assert env.get_wrapper_attr("temperature") == 1.0


@pytest.mark.parametrize("bad", ["1.0", True, None, [1.0]])
def test_non_numbers_are_rejected(bad: object) -> None:
    with pytest.raises(TypeError, match="temperature must be a real number"):
        _chain().set_wrapper_attr("temperature", bad)


def test_reset_option_sets_the_temperature() -> None:
    env = _chain()
    _, info = env.reset(seed=0, options={"temperature": 1.4, "task_id": 1})
    assert info["temperature"] == 1.4 and info["task_id"] == 1
    assert env.get_wrapper_attr("temperature") == 1.4
    with pytest.raises(ValueError, match="temperature"):
        env.reset(options={"temperature": -2.0})


def test_vector_env_set_attr_and_get_attr() -> None:
    vec = SyncVectorEnv([_chain for _ in range(3)])
    assert vec.get_attr("temperature") == (1.0, 1.0, 1.0)
    vec.set_attr("temperature", [0.6, 1.0, 1.5])
    assert vec.get_attr("temperature") == (0.6, 1.0, 1.5)
    vec.set_attr("temperature", 1.2)
    assert vec.get_attr("temperature") == (1.2, 1.2, 1.2)
    with pytest.raises(ValueError, match="temperature"):
        vec.set_attr("temperature", [1.1, 0.0, 1.1])
    # SyncVectorEnv sets the envs in order: the first took 1.1, the invalid one kept its value
    assert vec.get_attr("temperature")[1] == 1.2
    vec.set_attr("temperature", [0.7, 0.8, 0.9])
    obs, infos = vec.reset(seed=0)
    assert obs["prefix"].shape == (3, 6)
    np.testing.assert_allclose(infos["temperature"], [0.7, 0.8, 0.9])
    vec.close()


def test_custom_knob_name_and_validator() -> None:
    def unit(name: str, value: object) -> float:
        out = float(value)  # type: ignore[arg-type]
        if not 0.0 < out <= 1.0:
            raise ValueError(f"{name} must lie in (0, 1], got {out}")
        return out

    env = KnobWrapper(gym.make(ENV_ID), "top_p", 0.9, validator=unit)
    assert env.knob_name == "top_p" and env.knob_value == 0.9
    env.set_wrapper_attr("top_p", 0.5)
    assert env.get_wrapper_attr("top_p") == 0.5
    with pytest.raises(ValueError, match="top_p must lie in"):
        env.set_wrapper_attr("top_p", 1.5)
    hot = TemperatureWrapper(gym.make(ENV_ID), 1.1, name="tau")
    assert hot.get_wrapper_attr("tau") == 1.1


@pytest.mark.parametrize("name", ["", "1x", "_private", "env", "step", "unwrapped"])
def test_bad_knob_names(name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        KnobWrapper(gym.make(ENV_ID), name, 1.0)
