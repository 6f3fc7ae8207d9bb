"""Setting the temperature (and ``top_p``, ``top_k``, ``min_p``) at every place TRL 1.16's
``GRPOTrainer`` keeps it.

``GRPOTrainer`` reads ``args.temperature`` once, in ``__init__``, and copies it into:

1. ``trainer.generation_config.temperature`` (transformers ``generate`` and ``generate_batch``),
2. ``trainer.generation_kwargs["temperature"]`` (passed to ``unwrap_model_for_generation``),
3. the closure of the fused log-prob head that ``trl.trainer.utils.add_fused_lm_head`` installs as
   ``model.forward`` on the policy (old and current log-probs; with PEFT also the reference
   log-probs) and on the reference model,
4. ``trainer.vllm_generation.temperature`` when vLLM generates,
5. ``trainer.temperature`` (read by nothing after ``__init__``; kept in sync for users).

The truncation knobs ``top_p``, ``top_k`` and ``min_p`` live in (1), (2), (4) and (5) only
(:func:`set_trainer_knob`): TRL's log-prob head scores at the temperature alone.

For (3) the adapter writes the ``temperature`` cell of TRL's ``_fused_forward`` closure in place.
That changes exactly one number: it keeps any wrapper installed around the forward afterwards
(accelerate's mixed-precision ``autocast``/``convert_outputs_to_fp32`` wrapper on the policy and the
reference model), creates no new closure, and cannot nest patches. Re-running
``add_fused_lm_head`` after popping ``forward`` from the instance dict would drop such a wrapper.

Example:
    >>> import torch
    >>> from trl.trainer.utils import add_fused_lm_head
    >>> from metactl.adapters.trl.testing import build_char_tokenizer, build_tiny_model
    >>> model = build_tiny_model(build_char_tokenizer(), hidden_size=32, num_layers=1)
    >>> add_fused_lm_head(model, temperature=1.0)
    >>> head = FusedHead.find(model)
    >>> head.temperature
    1.0
    >>> head.set_temperature(0.7)
    >>> FusedHead.find(model).temperature
    0.7
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FusedHead",
    "find_trainer_heads",
    "output_embeddings",
    "policy_target",
    "set_trainer_knob",
    "set_trainer_setting",
    "set_trainer_temperature",
    "trainer_knobs",
    "trainer_temperatures",
    "unwrap",
]

_FUSED_CODE_NAME = "_fused_forward"
_TRUNCATION_KNOBS = ("top_p", "top_k", "min_p")


def _candidates(fn: Any) -> Iterator[Any]:
    """Objects a forward wrapper may delegate to (bound methods, functools/accelerate wrappers)."""
    if isinstance(fn, types.MethodType):
        yield fn.__func__
    for attr in ("__wrapped__", "model_forward", "func"):
        inner = getattr(fn, attr, None)
        if inner is not None:
            yield inner
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # empty cell
            continue
        if callable(value):
            yield value


@dataclass
class FusedHead:
    """Handle on the fused log-prob head TRL installed on one model (its closure cells).

    Attributes:
        function: TRL's ``_fused_forward`` function.
        model: the model whose ``forward`` it is.
    """

    function: types.FunctionType
    model: Any

    @classmethod
    def find(cls, model: Any) -> FusedHead:
        """Locate TRL's fused forward behind ``model.forward`` (through any wrappers).

        Raises:
            RuntimeError: ``model`` carries no fused log-prob head.
        """
        fn = cls._search(model)
        if fn is None:
            raise RuntimeError(
                f"no TRL fused log-prob head found on {type(model).__name__}.forward; "
                "metactl.adapters.trl expects GRPOTrainer (trl 1.16) to have called "
                "trl.trainer.utils.add_fused_lm_head on it"
            )
        return cls(function=fn, model=model)

    @staticmethod
    def _search(model: Any) -> types.FunctionType | None:
        start = [model.__dict__.get("forward"), model.__dict__.get("_original_forward")]
        stack = [f for f in start if f is not None]
        seen: set[int] = set()
        while stack:
            fn = stack.pop()
            if id(fn) in seen:
                continue
            seen.add(id(fn))
            code = getattr(fn, "__code__", None)
            if (
                isinstance(fn, types.FunctionType)
                and code is not None
                and code.co_name == _FUSED_CODE_NAME
                and "temperature" in code.co_freevars
            ):
                return fn
            stack.extend(_candidates(fn))
        return None

    def _cell(self, name: str) -> Any:
        code = self.function.__code__
        if name not in code.co_freevars:
            raise RuntimeError(f"TRL's fused head has no closure variable {name!r}")
        return self.function.__closure__[code.co_freevars.index(name)]  # type: ignore[index]

    def _get(self, name: str, default: Any) -> Any:
        code = self.function.__code__
        if name not in code.co_freevars:
            return default
        return self._cell(name).cell_contents

    @property
    def temperature(self) -> float:
        """The temperature the head divides the logits by."""
        return float(self._cell("temperature").cell_contents)

    def set_temperature(self, value: float) -> None:
        """Make every later fused forward of this model score at ``value``."""
        self._cell("temperature").cell_contents = float(value)

    @property
    def logit_scale(self) -> float:
        """Multiplier applied to ``hidden @ W.T`` before soft-capping (1.0 for most models)."""
        return float(self._get("logit_scale", 1.0))

    @property
    def softcap(self) -> float | None:
        """``final_logit_softcapping`` of the model (``None`` for most models)."""
        value = self._get("final_logit_softcapping", None)
        return None if value is None else float(value)

    @property
    def backbone_attr(self) -> str:
        """Attribute of the model holding the transformer backbone the head reads."""
        return str(self._get("backbone_attr", "base_model"))


def unwrap(model: Any) -> Any:
    """Strip DDP/DeepSpeed-style ``.module`` containers (not accelerate's forward wrappers).

    Example:
        >>> import torch
        >>> unwrap(torch.nn.Linear(1, 1)).__class__.__name__
        'Linear'
    """
    seen = 0
    while hasattr(model, "module") and not hasattr(model, "config") and seen < 8:
        model = model.module
        seen += 1
    return model


def policy_target(model: Any) -> Any:
    """The model TRL patched for the policy: the PEFT base model, else the model itself."""
    model = unwrap(model)
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        return get_base()
    return model


def _check_temperature(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"temperature must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be finite and > 0, got {value}")
    return value


def set_trainer_temperature(trainer: Any, value: float, heads: list[FusedHead]) -> None:
    """Write ``value`` to every place ``trainer`` (TRL 1.16 ``GRPOTrainer``) keeps the temperature.

    Args:
        trainer: the trainer.
        value: the temperature (> 0).
        heads: the fused heads of the policy (and reference model), from :meth:`FusedHead.find`.
    """
    value = _check_temperature(value)
    trainer.temperature = value
    config = getattr(trainer, "generation_config", None)
    if config is not None:
        config.temperature = value
    kwargs = getattr(trainer, "generation_kwargs", None)
    if isinstance(kwargs, dict):
        kwargs["temperature"] = value
    for head in heads:
        head.set_temperature(value)
    vllm = getattr(trainer, "vllm_generation", None)
    if vllm is not None:
        vllm.temperature = value
    # Older TRL releases fused the GRPO loss with Liger and kept a temperature there.
    liger = getattr(trainer, "liger_grpo_loss", None)
    if liger is not None and hasattr(liger, "temperature"):
        liger.temperature = value


def trainer_temperatures(trainer: Any, heads: list[FusedHead]) -> dict[str, float]:
    """Every temperature ``trainer`` currently holds, by place (for checks and debugging).

    Example keys: ``"generation_config"``, ``"generation_kwargs"``, ``"fused_head[0]"``.
    """
    out: dict[str, float] = {"trainer.temperature": float(trainer.temperature)}
    config = getattr(trainer, "generation_config", None)
    if config is not None:
        out["generation_config"] = float(config.temperature)
    kwargs = getattr(trainer, "generation_kwargs", None)
    if isinstance(kwargs, dict) and "temperature" in kwargs:
        out["generation_kwargs"] = float(kwargs["temperature"])
    for i, head in enumerate(heads):
        out[f"fused_head[{i}]"] = head.temperature
    vllm = getattr(trainer, "vllm_generation", None)
    if vllm is not None:
        out["vllm_generation"] = float(vllm.temperature)
    return out


def _engine_value(knob: str, value: Any) -> Any:
    """How TRL and both engines spell a knob value (``top_k`` an ``int``, the others floats;
    ``None`` only where TRL itself held ``None``, e.g. ``min_p`` off)."""
    if value is None:
        return None
    return int(value) if knob == "top_k" else float(value)


def set_trainer_knob(trainer: Any, knob: str, value: Any) -> None:
    """Write a truncation knob (``top_p``, ``top_k`` or ``min_p``) everywhere TRL 1.16 keeps it.

    ``trainer.<knob>`` (read by nothing after ``__init__``; kept in sync),
    ``trainer.generation_config.<knob>`` (transformers ``generate``),
    ``trainer.generation_kwargs[knob]`` (``unwrap_model_for_generation``) and
    ``trainer.vllm_generation.<knob>`` (read at every vLLM ``generate`` call, colocate and
    server). TRL's log-prob head has no truncation (its loss scores at the temperature only).
    """
    if knob not in _TRUNCATION_KNOBS:
        raise ValueError(f"knob must be one of {list(_TRUNCATION_KNOBS)}, got {knob!r}")
    value = _engine_value(knob, value)
    setattr(trainer, knob, value)
    config = getattr(trainer, "generation_config", None)
    if config is not None:
        setattr(config, knob, value)
    kwargs = getattr(trainer, "generation_kwargs", None)
    if isinstance(kwargs, dict):
        kwargs[knob] = value
    vllm = getattr(trainer, "vllm_generation", None)
    if vllm is not None:
        setattr(vllm, knob, value)


def set_trainer_setting(trainer: Any, setting: dict[str, Any], heads: list[FusedHead]) -> None:
    """Write every knob of ``setting`` (``{knob: value}``) where TRL keeps it."""
    for knob, value in setting.items():
        if knob == "temperature":
            set_trainer_temperature(trainer, value, heads)
        else:
            set_trainer_knob(trainer, knob, value)


def trainer_knobs(trainer: Any, knob: str) -> dict[str, Any]:
    """Every value of a truncation knob ``trainer`` holds, by place (for checks and debugging).

    Example keys: ``"trainer.top_p"``, ``"generation_config"``, ``"vllm_generation"``.
    """
    out: dict[str, Any] = {f"trainer.{knob}": getattr(trainer, knob)}
    config = getattr(trainer, "generation_config", None)
    if config is not None:
        out["generation_config"] = getattr(config, knob)
    kwargs = getattr(trainer, "generation_kwargs", None)
    if isinstance(kwargs, dict) and knob in kwargs:
        out["generation_kwargs"] = kwargs[knob]
    vllm = getattr(trainer, "vllm_generation", None)
    if vllm is not None:
        out["vllm_generation"] = getattr(vllm, knob)
    return out


def find_trainer_heads(trainer: Any) -> list[FusedHead]:
    """The fused heads of the policy and (when ``beta > 0`` without PEFT) the reference model."""
    heads = [FusedHead.find(policy_target(trainer.model))]
    ref = getattr(trainer, "ref_model", None)
    if ref is not None:
        heads.append(FusedHead.find(unwrap(ref)))
    return heads


def output_embeddings(model: Any) -> Any:
    """The LM head module of a (possibly PEFT-wrapped) causal LM."""
    return policy_target(model).get_output_embeddings()
