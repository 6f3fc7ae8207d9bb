"""Wrappers that expose a sampling knob (the rollout temperature) as a validated env attribute.

The knob is a plain attribute of the wrapper, so the standard gymnasium plumbing reaches it through
any wrapper chain and across vector envs: ``env.get_wrapper_attr("temperature")``,
``env.set_wrapper_attr("temperature", 1.2)``, ``vec_env.set_attr("temperature", [0.8, 1.2])``,
``vec_env.get_attr("temperature")``. Every assignment is validated (a sampler knob as
:func:`metactl.knobs.check_knob` checks it, any other knob a finite float > 0), whichever route it
takes. The current value is also reported in ``info[name]`` by ``reset`` and
``step`` (so logs record which temperature sampled each episode), and ``reset(options={name: v})``
sets it before an episode.

The environment itself does not read the knob: the agent that samples actions does (a GRPO learner
reads the temperature the meta-policy chose and samples ``softmax(logits / T)``).

Example
-------
>>> import gymnasium as gym
>>> import metactl.adapters.gym
>>> from gymnasium.wrappers import RecordEpisodeStatistics
>>> env = RecordEpisodeStatistics(TemperatureWrapper(gym.make("metactl/TokenSearch-v0")))
>>> env.set_wrapper_attr("temperature", 1.3)
True
>>> env.get_wrapper_attr("temperature")
1.3
>>> env.set_wrapper_attr("temperature", 0.0)
Traceback (most recent call last):
...
ValueError: temperature must be > 0 and within the sampler's temperatures [1e-06, 1e+06], got 0.0
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real
from typing import Any, SupportsFloat

import gymnasium as gym

from metactl.knobs import KNOBS, check_knob

__all__ = ["KnobWrapper", "TemperatureWrapper", "knob_value", "positive_finite"]


def positive_finite(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a finite real number > 0, else raise: the default
    validator of a :class:`KnobWrapper` attribute that is not a sampler knob.

    >>> positive_finite("beam_width", 2)
    2.0
    >>> positive_finite("beam_width", float("nan"))
    Traceback (most recent call last):
    ...
    ValueError: beam_width must be a finite number > 0, got nan
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        # numpy scalars are registered as numbers.Real; 0-d arrays are not, so accept those too
        if not (hasattr(value, "ndim") and getattr(value, "ndim", 1) == 0):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out) or out <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {out}")
    return out


def knob_value(name: str, value: Any) -> Any:
    """Validate a sampler knob's value as :func:`metactl.knobs.check_knob` does (top_p in
    ``(0, 1]``, top_k an int ``>= 1`` or ``None`` for off, min_p in ``[0, 1)``, temperature
    ``> 0``): the default validator of a :class:`KnobWrapper` named after a knob.

    >>> knob_value("top_k", 50), knob_value("top_k", None)
    (50, None)
    >>> knob_value("top_p", 1.5)
    Traceback (most recent call last):
    ...
    ValueError: top_p must lie in (0, 1], got 1.5
    """
    if name == "top_k" and value is None:
        return None
    return check_knob(name, value, name)


class KnobWrapper(gym.Wrapper):
    """Expose one named, validated knob (attribute) on an environment.

    Args:
        env: the environment to wrap.
        name: the attribute name (a Python identifier not already used by the wrapper API).
        value: the initial value.
        validator: ``validator(name, value) -> value`` that raises ``ValueError``/``TypeError`` on a
            bad value; defaults to :func:`knob_value` for a sampler knob's name
            (:data:`metactl.knobs.KNOBS`: ``top_p``, ``top_k``, ``min_p``, ``temperature``),
            else :func:`positive_finite`.

    Example
    -------
    >>> import gymnasium as gym
    >>> import metactl.adapters.gym
    >>> env = KnobWrapper(gym.make("metactl/TokenSearch-v0"), "top_p", 0.9)
    >>> env.top_p = 0.7
    >>> env.get_wrapper_attr("top_p")
    0.7
    >>> env.top_p = 1.2
    Traceback (most recent call last):
    ...
    ValueError: top_p must lie in (0, 1], got 1.2
    """

    _knob_name: str
    _knob_validator: Callable[[str, Any], Any]

    def __init__(
        self,
        env: gym.Env,
        name: str,
        value: Any,
        *,
        validator: Callable[[str, Any], Any] | None = None,
    ) -> None:
        super().__init__(env)
        if validator is None:
            validator = knob_value if name in KNOBS else positive_finite
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise ValueError(f"name must be a public Python identifier, got {name!r}")
        if hasattr(self, name):
            raise ValueError(f"name {name!r} clashes with an attribute of the gymnasium Wrapper")
        if not callable(validator):
            raise TypeError("validator must be callable")
        object.__setattr__(self, "_knob_name", name)
        object.__setattr__(self, "_knob_validator", validator)
        setattr(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        # Every route (attribute assignment, set_wrapper_attr, vec_env.set_attr) ends here.
        if name == self.__dict__.get("_knob_name"):
            value = self._knob_validator(name, value)
        super().__setattr__(name, value)

    @property
    def knob_name(self) -> str:
        """The name of the exposed knob."""
        return self._knob_name

    @property
    def knob_value(self) -> Any:
        """The knob's current value."""
        return getattr(self, self._knob_name)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Reset; ``options={knob_name: v}`` sets the knob first (the rest goes to the env)."""
        if options and self._knob_name in options:
            options = dict(options)
            setattr(self, self._knob_name, options.pop(self._knob_name))
            options = options or None
        obs, info = self.env.reset(seed=seed, options=options)
        info = dict(info)
        info[self._knob_name] = self.knob_value
        return obs, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        """Step the env and report the knob's value in ``info``."""
        obs, reward, terminated, truncated, info = self.env.step(action)
        info = dict(info)
        info[self._knob_name] = self.knob_value
        return obs, reward, terminated, truncated, info


def _temperature(name: str, value: Any) -> float:
    """A temperature as :func:`metactl.knobs.check_knob` accepts it, named ``name``."""
    return float(check_knob("temperature", value, name))


class TemperatureWrapper(KnobWrapper):
    """Expose the rollout ``temperature`` (checked with :func:`metactl.knobs.check_knob`) as a
    wrapper attribute.

    Example
    -------
    >>> import gymnasium as gym
    >>> import metactl.adapters.gym
    >>> from gymnasium.vector import SyncVectorEnv
    >>> make = lambda: TemperatureWrapper(gym.make("metactl/TokenSearch-v0"), temperature=0.8)
    >>> vec = SyncVectorEnv([make, make])
    >>> vec.set_attr("temperature", [0.9, 1.4])
    >>> vec.get_attr("temperature")
    (0.9, 1.4)
    """

    def __init__(
        self, env: gym.Env, temperature: float = 1.0, *, name: str = "temperature"
    ) -> None:
        super().__init__(env, name, temperature, validator=_temperature)
