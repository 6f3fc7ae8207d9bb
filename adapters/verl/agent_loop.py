"""``metactl_single_turn``: verl's single-turn agent loop, sampling each prompt at the temperature
the driver's meta-policy chose for it (the per-prompt field :data:`TEMPERATURE_FIELD`).

verl's ``AgentLoopWorkerTQ`` builds one ``sampling_params`` dict from the worker's own config and
hands every per-prompt field of the batch to the loop as a keyword argument; this loop copies the
dict, sets ``temperature`` from the field and records the value in the output's
``extra_fields[SAMPLED_TEMPERATURE_KEY]`` (stored with the trajectory, checked by the trainer).
Validation batches carry no field: they sample at ``rollout.val_kwargs.temperature`` unchanged.
"""

from __future__ import annotations

from typing import Any

from verl.experimental.agent_loop.agent_loop import register
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

from metactl.knobs import check_knob

from .config import AGENT_LOOP_NAME, SAMPLED_TEMPERATURE_KEY, TEMPERATURE_FIELD

__all__ = ["MetaSingleTurnAgentLoop", "sampling_params_for"]


def sampling_params_for(sampling_params: dict[str, Any], value: Any) -> dict[str, Any]:
    """A copy of ``sampling_params`` with the chosen temperature ``value`` (a temperature as
    :func:`metactl.knobs.check_knob` accepts it, or a one-element tensor holding one). A greedy
    request (``temperature == 0``, verl's ``__do_sample__``) conflicts with a chosen temperature
    and is refused."""
    if hasattr(value, "numel") and hasattr(value, "reshape"):  # verl hands a tensor per prompt
        if value.numel() != 1:
            raise ValueError(f"{TEMPERATURE_FIELD} must hold one value per prompt, got {value!r}")
        value = value.item()  # a Python number (a bool tensor gives a bool, which is refused)
    temperature = float(check_knob("temperature", value, TEMPERATURE_FIELD))
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
