"""``metactl_single_turn``: verl's single-turn agent loop, sampling each prompt at the temperature
the driver's meta-policy chose for it (the per-prompt field :data:`TEMPERATURE_FIELD`).

verl's ``AgentLoopWorkerTQ`` builds one ``sampling_params`` dict from the worker's own config and
hands every per-prompt field of the batch to the loop as a keyword argument; this loop copies the
dict, sets ``temperature`` from the field and records the value in the output's
``extra_fields[SAMPLED_TEMPERATURE_KEY]`` (stored with the trajectory, checked by the trainer).
Validation batches carry no field: they sample at ``rollout.val_kwargs.temperature`` unchanged.
"""

from __future__ import annotations

import math
from typing import Any

from verl.experimental.agent_loop.agent_loop import register
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

from .config import AGENT_LOOP_NAME, SAMPLED_TEMPERATURE_KEY, TEMPERATURE_FIELD

__all__ = ["MetaSingleTurnAgentLoop", "sampling_params_for"]


def sampling_params_for(sampling_params: dict[str, Any], value: Any) -> dict[str, Any]:
    """A copy of ``sampling_params`` with the chosen temperature ``value`` (a finite float > 0, or
    a 0-d tensor holding one). A greedy request (``temperature == 0``, verl's ``__do_sample__``)
    conflicts with a chosen temperature and is refused."""
    if hasattr(value, "item"):
        if getattr(value, "numel", lambda: 1)() != 1:
            raise ValueError(f"{TEMPERATURE_FIELD} must hold one value per prompt, got {value!r}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{TEMPERATURE_FIELD} must be a number, got {type(value).__name__}")
    temperature = float(value)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{TEMPERATURE_FIELD} must be finite and > 0, got {temperature!r}")
    if float(sampling_params.get("temperature", 1.0)) == 0.0:
        raise ValueError(
            "this prompt asks for greedy decoding (__do_sample__=False) but the meta-policy chose "
            f"temperature {temperature}: drop __do_sample__ from the data set"
        )
    params = dict(sampling_params)
    params["temperature"] = temperature
    return params


@register(AGENT_LOOP_NAME)
class MetaSingleTurnAgentLoop(SingleTurnAgentLoop):
    """``SingleTurnAgentLoop`` whose sampling temperature comes from the prompt's
    :data:`TEMPERATURE_FIELD` (chosen by ``MetaPPOTrainer``)."""

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> Any:
        if TEMPERATURE_FIELD not in kwargs:  # validation: verl's own val_kwargs apply
            return await super().run(sampling_params, **kwargs)
        params = sampling_params_for(sampling_params, kwargs[TEMPERATURE_FIELD])
        output = await super().run(params, **kwargs)
        output.extra_fields[SAMPLED_TEMPERATURE_KEY] = params["temperature"]
        return output
