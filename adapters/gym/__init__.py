"""Gymnasium adapter: ``metactl/TokenSearch-v0``, a temperature wrapper and a tabular GRPO learner.

Importing this package registers the environment ``metactl/TokenSearch-v0``.

Example
-------
>>> import gymnasium as gym
>>> import metactl.adapters.gym
>>> env = metactl.adapters.gym.TemperatureWrapper(gym.make("metactl/TokenSearch-v0"))
>>> env.get_wrapper_attr("temperature")
1.0
"""

from __future__ import annotations

import gymnasium as gym

from .env import FAMILIES, MAX_LENGTH, TokenSearchConfig, TokenSearchEnv
from .wrappers import KnobWrapper, TemperatureWrapper

ENV_ID = "metactl/TokenSearch-v0"

if ENV_ID not in gym.registry:
    gym.register(
        id=ENV_ID,
        entry_point="metactl.adapters.gym.env:TokenSearchEnv",
        # every episode terminates after `length` <= MAX_LENGTH steps: the limit is a safety net
        max_episode_steps=MAX_LENGTH,
    )

__all__ = [
    "ENV_ID",
    "FAMILIES",
    "MAX_LENGTH",
    "KnobWrapper",
    "TemperatureWrapper",
    "TokenSearchConfig",
    "TokenSearchEnv",
]
