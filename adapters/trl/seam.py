"""Every place the adapter touches TRL's (and transformers') internals, in one module: a TRL
upgrade is reviewed here.

What the adapter relies on, as of trl 1.16 (``guards.TESTED_TRL``):

* **Private methods of ``GRPOTrainer``** (overridden by :class:`GRPOSeam`, each forwarding to
  one ``_meta_*`` hook the adapter's trainer implements): ``_generate_and_score_completions``
  (called once per generation batch, training or evaluation), ``_generate_single_turn`` (the
  generation call inside it), ``_get_per_token_logps_and_entropies`` (every log-prob pass: old,
  reference, current), ``_calculate_rewards`` (the rewards of every completion, gathered over
  ranks), ``_save_checkpoint`` and ``_load_optimizer_and_scheduler`` (transformers' checkpoint
  hooks), and the public ``train``, ``compute_loss`` and ``prediction_step``.
* **Where TRL keeps the sampler setting** (:func:`set_trainer_setting`). ``GRPOTrainer`` reads
  ``args.temperature`` once, in ``__init__``, and copies it into ``trainer.generation_config``
  (transformers ``generate`` and ``generate_batch``), ``trainer.generation_kwargs``
  (``unwrap_model_for_generation``), the closure of the fused log-prob head that
  ``trl.trainer.utils.add_fused_lm_head`` installs as ``model.forward`` on the policy and the
  reference model (:class:`FusedHead`), ``trainer.vllm_generation`` (vLLM) and
  ``trainer.temperature`` (read by nothing after ``__init__``; kept in sync for users).
  ``top_p``, ``top_k`` and ``min_p`` live in the same places except the fused head (TRL's loss
  scores at the temperature alone).
* **The fused head's closure**: the ``temperature`` cell of TRL's ``_fused_forward`` is written in
  place. That changes exactly one number: it keeps any wrapper installed around the forward
  afterwards (accelerate's mixed-precision wrapper on the policy and the reference model),
  creates no new closure, and cannot nest patches.
* **Generation** (:func:`row_temperature_generation`): ``model.generate`` of the unwrapped policy
  is wrapped for one call so that a per-row logits processor carries each row's temperature;
  with vLLM, ``LLM.generate`` of ``trainer.vllm_generation.llm`` (colocate: TRL's one
  ``SamplingParams`` becomes one per row) or ``VLLMClient.generate`` of
  ``trainer.vllm_generation.vllm_client`` (server: one request per distinct temperature).
* **TRL's chunked log-prob kernel** (:func:`tapped_fused_head`): ``ChunkedLogProbFunction`` in
  ``trl.trainer.utils`` and ``_forward_tile`` / ``_forward_kernel`` in
  ``trl.kernels.chunked_logprob`` are wrapped for one pass, to read the logit tiles.
* **TRL's attributes and batches**: which passes TRL makes (:func:`makes_old_logprob_pass`,
  :func:`generates_with_model_generate`), the effective sampling settings
  (:func:`generation_settings`, with what transformers' ``generate`` fills into the knobs TRL
  leaves unset: :func:`generate_fills`), the paths that cannot carry a temperature per row
  (:func:`check_per_row_paths`), TRL's metrics (:func:`log_metric`, :func:`batch_reward`) and the
  tensors the adapter reads from TRL's generation-batch dict (:class:`GeneratedBatch`) and the
  key under which a tensor travels with TRL's buffered batch (:func:`carry_row_temperatures`).

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

import contextlib
import os
import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer

from metactl.knobs import check_knob

__all__ = [
    "ROW_TEMPERATURE_KEY",
    "FusedHead",
    "GRPOSeam",
    "GeneratedBatch",
    "LogProbPass",
    "RowTemperatureProcessor",
    "batch_reward",
    "carry_row_temperatures",
    "check_per_row_config",
    "check_per_row_paths",
    "find_trainer_heads",
    "fused_kernel_rows_are_compact",
    "generate_fills",
    "generates_with_model_generate",
    "generation_settings",
    "log_metric",
    "makes_old_logprob_pass",
    "output_embeddings",
    "policy_target",
    "row_temperature_generation",
    "set_trainer_setting",
    "tapped_fused_head",
    "trainer_knobs",
    "unwrap",
]

#: Key of the per-row sampling temperature in TRL's buffered batch (per-prompt policies only):
#: TRL shuffles and splits every tensor of the batch in unison, so each row keeps its own value.
ROW_TEMPERATURE_KEY = "metactl_row_temperature"

_FUSED_CODE_NAME = "_fused_forward"
_TRUNCATION_KNOBS = ("top_p", "top_k", "min_p")
# TRL's sampling fields of GRPOConfig, merged with generation_kwargs as TRL merges them
_CONFIG_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# The arguments of TRL's log-prob pass after (model, input_ids, attention_mask, logits_to_keep),
# in its positional order; from "pixel_values" on they are multimodal inputs.
_LOG_PROB_ARGS = (
    "batch_size",
    "compute_entropy",
    "compute_aux_loss",
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
_MULTIMODAL_ARGS = _LOG_PROB_ARGS[3:]


# ---------------------------------------------------------------------------- overridden methods
class GRPOSeam(GRPOTrainer):
    """``GRPOTrainer`` whose overridden methods each forward to one ``_meta_*`` hook.

    This class holds every TRL method name and signature the adapter depends on; the hooks
    (implemented by :class:`~metactl.adapters.trl.MetaGRPOTrainer`) see only what they need.
    """

    # -- hooks ---------------------------------------------------------------------------------
    def _meta_training_batch(
        self, inputs: list[dict[str, Any]], generate: Callable[[list[dict[str, Any]]], Any]
    ) -> dict[str, Any]:
        """One training generation batch; ``generate(inputs)`` runs TRL's own."""
        raise NotImplementedError

    def _meta_evaluation_batch(self) -> None:
        """Before TRL generates and scores an evaluation batch."""
        raise NotImplementedError

    def _meta_evaluation(self) -> AbstractContextManager[None]:
        """Around one evaluation step (generation, scoring and loss)."""
        raise NotImplementedError

    def _meta_generation(self) -> AbstractContextManager[None]:
        """Around TRL's generation call of a batch."""
        raise NotImplementedError

    def _meta_log_prob_pass(self, call: LogProbPass) -> Any:
        """One log-prob pass of TRL (``call.run()`` runs TRL's own)."""
        raise NotImplementedError

    def _meta_rewards(self, rewards_per_func: torch.Tensor) -> None:
        """TRL's ``(N_global, F)`` rewards of the batch being scored (all ranks, rank order)."""
        raise NotImplementedError

    def _meta_loss_rows(self, rows: torch.Tensor | None) -> AbstractContextManager[None]:
        """Around TRL's loss of one micro-batch; ``rows``: its per-row temperatures, if any."""
        raise NotImplementedError

    def _meta_before_train(self, checkpoint: str | None) -> None:
        """Before TRL's ``train`` loads anything; ``checkpoint``: the folder resumed from."""
        raise NotImplementedError

    def _meta_save(self, folder: str) -> None:
        """After TRL wrote the checkpoint ``folder`` (on the processes that save)."""
        raise NotImplementedError

    def _meta_resume(self, folder: str) -> None:
        """After TRL loaded the optimizer and scheduler of the checkpoint ``folder``."""
        raise NotImplementedError

    # -- the overrides -------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        if not cast(torch.nn.Module, self.model).training:
            self._meta_evaluation_batch()
            return super()._generate_and_score_completions(inputs)
        return self._meta_training_batch(inputs, super()._generate_and_score_completions)

    def _generate_single_turn(self, *args: Any, **kwargs: Any) -> Any:
        with self._meta_generation():
            return super()._generate_single_turn(*args, **kwargs)

    def _get_per_token_logps_and_entropies(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        call = LogProbPass(
            model=model,
            input_ids=input_ids,
            attention_mask=attention_mask,
            logits_to_keep=int(logits_to_keep),
            args=args,
            kwargs=kwargs,
            trl_pass=super()._get_per_token_logps_and_entropies,
        )
        return self._meta_log_prob_pass(call)

    def _calculate_rewards(self, *args: Any, **kwargs: Any) -> Any:
        rewards_per_func = super()._calculate_rewards(*args, **kwargs)
        self._meta_rewards(rewards_per_func)
        return rewards_per_func

    def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        rows = inputs.get(ROW_TEMPERATURE_KEY) if isinstance(inputs, dict) else None
        with self._meta_loss_rows(rows):
            return super().compute_loss(model, inputs, *args, **kwargs)

    def prediction_step(
        self,
        model: Any,
        inputs: Any,
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> Any:
        with self._meta_evaluation():
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        checkpoint: Any = resume_from_checkpoint
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir)  # None: TRL raises below
        folder = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else None
        self._meta_before_train(folder)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._meta_save(os.path.join(self._get_output_dir(trial=trial), folder))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._meta_resume(checkpoint)


@dataclass(frozen=True)
class LogProbPass:
    """One call of TRL's log-prob pass (``_get_per_token_logps_and_entropies``).

    Attributes:
        model: the model scored (the policy, or the reference model).
        input_ids, attention_mask: ``(N, P + C)`` prompt+completion.
        logits_to_keep: ``C``, the completion positions scored.
        args, kwargs: TRL's further arguments (``batch_size``, multimodal inputs, ...).
        trl_pass: TRL's own pass, called with all of the above.
    """

    model: Any
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    logits_to_keep: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    trl_pass: Callable[..., Any] = field(repr=False)

    @property
    def batch_size(self) -> int | None:
        """The rows TRL scores per forward (``None``: all at once)."""
        return self.args[0] if self.args else self.kwargs.get("batch_size")

    def run(self) -> Any:
        """TRL's pass, unchanged."""
        return self.trl_pass(
            self.model,
            self.input_ids,
            self.attention_mask,
            self.logits_to_keep,
            *self.args,
            **self.kwargs,
        )

    def run_per_row(
        self, temperatures: torch.Tensor, heads: list[FusedHead], *, contiguous: bool
    ) -> Any:
        """TRL's pass with row ``i`` at ``temperatures[i]``: one pass of TRL's own fused head per
        distinct temperature (exactly TRL's kernel at that scalar), the rows put back in order.

        Args:
            temperatures: ``(N,)`` one temperature per row.
            heads: the fused heads whose temperature each pass sets (restored afterwards).
            contiguous: group contiguous runs of one temperature (the rows are in generation
                order and a hidden-state capture concatenates the passes in call order), else
                all rows of each distinct value.

        Raises:
            RuntimeError: ``temperatures`` does not have one entry per row.
            ValueError: multimodal inputs (their tensors are not split per row).
        """
        n = self.input_ids.shape[0]
        if temperatures.shape != (n,):
            raise RuntimeError(
                f"metactl: a log-prob pass over {n} rows met {tuple(temperatures.shape)} per-row "
                "temperatures; the rows cannot be matched to their prompts"
            )
        call = dict(zip(_LOG_PROB_ARGS, self.args, strict=False))
        call.update(self.kwargs)
        if any(call.get(name) is not None for name in _MULTIMODAL_ARGS):
            raise ValueError(
                "a per-prompt meta_policy does not support multimodal inputs in TRL's log-prob "
                "pass (the image tensors are not split per row); use a global meta_policy"
            )
        temps = temperatures.detach().double().cpu()
        groups: list[tuple[float, torch.Tensor]] = []
        if contiguous:
            start = 0
            for i in range(1, n + 1):
                if i == n or temps[i] != temps[start]:
                    groups.append((float(temps[start]), torch.arange(start, i)))
                    start = i
        else:
            for value in dict.fromkeys(temps.tolist()):
                groups.append((value, torch.nonzero(temps == value).flatten()))
        before = [head.temperature for head in heads]
        parts: list[tuple[torch.Tensor, Any]] = []
        try:
            for value, index in groups:
                for head in heads:
                    head.set_temperature(value)
                rows = index.to(self.input_ids.device)
                out = self.trl_pass(
                    self.model,
                    self.input_ids[rows],
                    self.attention_mask[rows],
                    self.logits_to_keep,
                    **call,
                )
                parts.append((rows, out))
        finally:
            for head, value in zip(heads, before, strict=True):
                head.set_temperature(value)
        order = torch.argsort(torch.cat([rows for rows, _ in parts]))
        logps = torch.cat([out[0] for _, out in parts], dim=0)[order]
        entropies = (
            None
            if parts[0][1][1] is None
            else torch.cat([out[1] for _, out in parts], dim=0)[order]
        )
        aux = None
        if parts[0][1][2] is not None:
            weights = torch.tensor([float(len(i)) for i, _ in parts], device=parts[0][1][2].device)
            aux = (torch.stack([out[2] for _, out in parts]) * weights).sum() / weights.sum()
        return logps, entropies, aux


# ---------------------------------------------------------------------------- TRL's batch dict
@dataclass(frozen=True)
class GeneratedBatch:
    """What the adapter reads from the dict TRL's ``_generate_and_score_completions`` returns
    (this rank's rows).

    Attributes:
        prompt_ids, prompt_mask: ``(N, P)`` the left-padded prompts.
        completion_ids, completion_mask: ``(N, C)`` the right-padded completions.
        scored_mask: ``(N, C)`` the completion tokens TRL's loss scores (tool outputs left out).
        advantages: ``(N,)`` TRL's advantage of every completion.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    scored_mask: torch.Tensor
    advantages: torch.Tensor

    @classmethod
    def read(cls, output: Mapping[str, Any]) -> GeneratedBatch:
        mask = output["completion_mask"]
        scored = mask * output["tool_mask"] if "tool_mask" in output else mask
        return cls(
            prompt_ids=output["prompt_ids"],
            prompt_mask=output["prompt_mask"],
            completion_ids=output["completion_ids"],
            completion_mask=mask,
            scored_mask=scored,
            advantages=output["advantages"],
        )


def carry_row_temperatures(output: dict[str, Any], rows: torch.Tensor) -> None:
    """Put one temperature per row into TRL's batch dict: TRL shuffles and splits every tensor
    of the buffered batch in unison, so each row keeps its value up to the loss.

    Raises:
        RuntimeError: TRL returned another number of rows.
    """
    n = output["completion_ids"].shape[0]
    if n != rows.shape[0]:
        raise RuntimeError(
            f"metactl: TRL returned {n} rows for {rows.shape[0]} per-row temperatures; they "
            "cannot be matched to the rows"
        )
    output[ROW_TEMPERATURE_KEY] = rows.to(output["completion_ids"].device)


# ---------------------------------------------------------------------------- the fused head
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
        """Make every later fused forward of this model score at ``value`` (a temperature)."""
        self._cell("temperature").cell_contents = float(check_knob("temperature", value))

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


# ---------------------------------------------------------------------------- the sampler setting
def _engine_value(knob: str, value: Any) -> Any:
    """How TRL and both engines spell a knob value (``top_k`` an ``int``, the others floats;
    ``None`` only where TRL itself held ``None``, e.g. ``min_p`` off)."""
    if value is None:
        return None
    return int(value) if knob == "top_k" else float(value)


def _checked_value(knob: str, value: Any) -> Any:
    """``value`` checked with :func:`metactl.knobs.check_knob`, or a truncation knob's off value
    as TRL and the engines spell it (``None``; ``top_k`` 0 or -1), kept as it is."""
    if knob != "temperature" and knob not in _TRUNCATION_KNOBS:
        known = ["temperature", *_TRUNCATION_KNOBS]
        raise ValueError(f"setting: unknown knob {knob!r}; TRL keeps {known}")
    if knob != "temperature" and value is None:
        return None
    if knob == "top_k" and type(value) is int and value in (0, -1):
        return value
    return check_knob(knob, value)


def set_trainer_setting(trainer: Any, setting: Mapping[str, Any], heads: list[FusedHead]) -> None:
    """Write every knob of ``setting`` (``{knob: value}``) wherever TRL 1.16 keeps it.

    The temperature goes to ``trainer.temperature``, ``generation_config``,
    ``generation_kwargs``, the fused ``heads``, ``vllm_generation`` and (older TRL releases)
    ``liger_grpo_loss``; ``top_p``, ``top_k`` and ``min_p`` to the same places but the heads.
    Each value is checked first (:func:`metactl.knobs.check_knob`, or a truncation knob's off
    value as TRL holds it: ``None``, ``top_k`` 0 or -1), so a refused setting writes nothing.
    """
    checked = {knob: _checked_value(knob, value) for knob, value in setting.items()}
    for knob, value in checked.items():
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
        if knob == "temperature":
            for head in heads:
                head.set_temperature(value)
            liger = getattr(trainer, "liger_grpo_loss", None)
            if liger is not None and hasattr(liger, "temperature"):
                liger.temperature = value


def trainer_knobs(trainer: Any, knob: str, heads: list[FusedHead]) -> dict[str, Any]:
    """Every value of ``knob`` that ``trainer`` currently holds, by place (for checks and
    debugging; they are always equal). Example keys: ``"trainer.top_p"``,
    ``"generation_config"``, ``"generation_kwargs"``, ``"fused_head[0]"``, ``"vllm_generation"``.
    """
    out: dict[str, Any] = {f"trainer.{knob}": getattr(trainer, knob)}
    config = getattr(trainer, "generation_config", None)
    if config is not None:
        out["generation_config"] = getattr(config, knob)
    kwargs = getattr(trainer, "generation_kwargs", None)
    if isinstance(kwargs, dict) and knob in kwargs:
        out["generation_kwargs"] = kwargs[knob]
    if knob == "temperature":
        for i, head in enumerate(heads):
            out[f"fused_head[{i}]"] = head.temperature
    vllm = getattr(trainer, "vllm_generation", None)
    if vllm is not None:
        out["vllm_generation"] = getattr(vllm, knob)
    if knob == "temperature":
        out = {place: float(value) for place, value in out.items()}
    return out


def generation_settings(trainer: Any) -> dict[str, Any]:
    """The effective sampling settings of ``trainer``: TRL's ``GRPOConfig`` fields, overridden by
    its merged ``generation_kwargs`` and the user's ``GRPOConfig.generation_kwargs`` (as TRL
    merges them for transformers, and vLLM in colocate and server mode)."""
    config: Any = trainer.args
    settings: dict[str, Any] = {
        name: getattr(config, name, None) for name in _CONFIG_SAMPLING_FIELDS
    }
    settings.update(getattr(trainer, "generation_kwargs", None) or {})
    settings.update(config.generation_kwargs or {})
    return settings


def generate_fills(
    trainer: Any, settings: Mapping[str, Any], knobs: tuple[str, ...]
) -> dict[str, Any]:
    """``settings`` with the sampling ``knobs`` TRL leaves unset (``None``) as transformers'
    ``generate`` fills them (``GenerationMixin._prepare_generation_config``, transformers 5):
    from the policy model's own ``generation_config``, then from transformers' global defaults
    (``top_k=50``; ``min_p`` has none and stays off). TRL passes its ``GRPOConfig`` values
    explicitly (``top_k=0`` by default), so only a knob the user set to ``None`` is filled.

    Example:
        >>> from types import SimpleNamespace
        >>> from metactl.adapters.trl.testing import build_char_tokenizer, build_tiny_model
        >>> model = build_tiny_model(build_char_tokenizer(), hidden_size=32, num_layers=1)
        >>> generate_fills(SimpleNamespace(model=model), {"top_k": None, "min_p": None},
        ...                ("top_k", "min_p"))
        {'top_k': 50, 'min_p': None}
    """
    from transformers import GenerationConfig

    own = getattr(policy_target(trainer.model), "generation_config", None)
    defaults = GenerationConfig._get_default_generation_params()
    filled = dict(settings)
    for knob in knobs:
        if filled.get(knob) is None:
            value = getattr(own, knob, None) if own is not None else None
            filled[knob] = defaults.get(knob) if value is None else value
    return filled


# ---------------------------------------------------------------------------- TRL's paths
def makes_old_logprob_pass(trainer: Any) -> bool:
    """Whether TRL makes an old-logprob pass over every generation batch (its condition)."""
    args: Any = trainer.args
    generate_every = args.steps_per_generation * trainer.num_iterations
    return args.gradient_accumulation_steps % generate_every != 0 or bool(
        getattr(trainer, "use_vllm", False)
        and getattr(trainer, "vllm_importance_sampling_correction", False)
    )


def uses_vllm(trainer: Any) -> bool:
    """Whether vLLM generates (its truncations run in vLLM's order)."""
    return bool(getattr(trainer, "use_vllm", False))


def uses_continuous_batching(trainer: Any) -> bool:
    """Whether transformers' ``generate_batch`` generates (its own sampler)."""
    return bool(getattr(trainer, "use_transformers_continuous_batching", False))


def generates_with_model_generate(trainer: Any) -> bool:
    """Whether TRL generates through ``model.generate`` of the policy itself (no vLLM, no
    continuous batching, no user rollout, no tools or environments)."""
    return not (
        uses_vllm(trainer)
        or uses_continuous_batching(trainer)
        or getattr(trainer, "rollout_func", None) is not None
        or getattr(trainer, "tools", None)
        or getattr(trainer, "environment_factories", None) is not None
    )


def _tensor_parallel_colocate(args: Any) -> str | None:
    """The refusal of colocated vLLM with tensor parallelism under a per-prompt policy: the
    engine of a tensor-parallel group generates the prompts of all its ranks in one call."""
    size = int(getattr(args, "vllm_tensor_parallel_size", 1) or 1)
    colocate = getattr(args, "use_vllm", False) and getattr(args, "vllm_mode", None) == "colocate"
    if not (colocate and size > 1):
        return None
    return (
        f"vllm_tensor_parallel_size={size} (colocated vLLM gathers the prompts of a "
        "tensor-parallel group into one call; use vllm_tensor_parallel_size=1 or "
        "vllm_mode='server')"
    )


def _refuse_per_row(path: str) -> ValueError:
    return ValueError(
        f"a per-prompt meta_policy needs a temperature per row, which the TRL path {path} cannot "
        "carry; turn it off or use a global meta_policy"
    )


def check_per_row_config(args: Any) -> None:
    """Refuse, from the ``GRPOConfig`` alone (before TRL builds its vLLM engine), the settings
    that cannot carry a temperature per row: colocated vLLM with tensor parallelism.

    Raises:
        ValueError: naming ``vllm_tensor_parallel_size``.
    """
    refused = _tensor_parallel_colocate(args)
    if refused is not None:
        raise _refuse_per_row(refused)


def check_per_row_paths(trainer: Any) -> None:
    """Refuse every TRL path that cannot carry a temperature per row.

    transformers ``generate`` and vLLM (colocated: one ``SamplingParams`` per row; server: one
    request per distinct temperature) carry them (:func:`row_temperature_generation`), except
    colocated vLLM with tensor parallelism (:func:`check_per_row_config`).

    Raises:
        ValueError: naming the path (``vllm_tensor_parallel_size > 1`` in colocate mode,
            continuous batching, a rollout function, tools, environments, Liger's fused loss).
    """
    args: Any = trainer.args
    check_per_row_config(args)
    refused = {
        "use_transformers_continuous_batching (generate_batch)": uses_continuous_batching(trainer),
        "rollout_func (a user rollout samples outside the trainer)": getattr(
            trainer, "rollout_func", None
        )
        is not None,
        "tools (multi-turn tool calls regroup the rows)": bool(getattr(trainer, "tools", None)),
        "environment_factories (multi-turn environments)": getattr(
            trainer, "environment_factories", None
        )
        is not None,
        "use_liger_kernel (Liger's fused GRPO loss takes one scalar temperature)": bool(
            getattr(args, "use_liger_kernel", False)
            or getattr(trainer, "liger_grpo_loss", None) is not None
        ),
    }
    for path, active in refused.items():
        if active:
            raise _refuse_per_row(path)


def log_metric(trainer: Any, mode: Literal["train", "eval"], name: str, value: float) -> None:
    """Append ``value`` to TRL's metric ``name`` (every TRL logger reports it)."""
    trainer._metrics[mode][name].append(float(value))


def batch_reward(trainer: Any) -> float | None:
    """TRL's logged mean reward of the last training batch (over all ranks), if any."""
    rewards = trainer._metrics["train"].get("reward")
    return float(rewards[-1]) if rewards else None


# ---------------------------------------------------------------------------- generation
class RowTemperatureProcessor:
    """Logits processor dividing row ``i``'s scores by ``temperatures[i]`` (generation at T = 1).

    Sampling then draws row ``i`` from ``softmax(z_i / T_i)``, as transformers' own temperature
    warper would with ``temperature=T_i``. ``calls`` proves that generation went through it.

    Example:
        >>> import torch
        >>> p = RowTemperatureProcessor(torch.tensor([0.5, 2.0]))
        >>> p(None, torch.ones(2, 3)).tolist()
        [[2.0, 2.0, 2.0], [0.5, 0.5, 0.5]]
    """

    def __init__(self, temperatures: torch.Tensor) -> None:
        self.temperatures = temperatures
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != self.temperatures.shape[0]:
            raise RuntimeError(
                f"metactl: generation produced {scores.shape[0]} rows but "
                f"{self.temperatures.shape[0]} per-row temperatures were prepared; the per-prompt "
                "temperature cannot be applied"
            )
        self.calls += 1
        divisor = self.temperatures.to(device=scores.device, dtype=scores.dtype).unsqueeze(-1)
        return scores / divisor


@contextmanager
def _replaced(
    owner: Any, name: str, replacement: Callable[..., Any]
) -> Iterator[Callable[..., Any]]:
    """``owner.<name>`` is ``replacement`` inside this block (an instance attribute, removed or
    put back afterwards); yields the original."""
    original = getattr(owner, name)
    had_own = name in owner.__dict__  # e.g. a user's instance-level wrapper
    setattr(owner, name, replacement)
    try:
        yield original
    finally:
        if had_own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


def _check_unit_temperature(where: str, value: Any) -> None:
    """TRL's scalar temperature must be 1 while each row carries its own (the window sets it)."""
    if value is None or float(value) != 1.0:
        raise RuntimeError(
            f"metactl: {where} carried temperature {value!r}, not 1; something wrote a "
            "temperature over the per-prompt window, so the per-row temperatures cannot be applied"
        )


@contextmanager
def row_temperature_generation(
    trainer: Any, temperatures: torch.Tensor, groups: torch.Tensor | None = None
) -> Iterator[None]:
    """Inside this block, TRL's generation samples row ``i`` at ``temperatures[i]`` (TRL's own
    temperature must be 1), on the engine TRL generates with:

    * transformers ``model.generate`` of the unwrapped policy: a
      :class:`RowTemperatureProcessor` is appended to its logits processors;
    * vLLM colocated (``trainer.vllm_generation.llm``): ``LLM.generate`` gets one
      ``SamplingParams`` per prompt (TRL sends one prompt per row), a clone of TRL's with the
      row's temperature (every other field kept: ``logprobs``, ``seed``, ...);
    * vLLM's server (``vllm_generation.vllm_client``, main process only): TRL sends each prompt
      group's prompt once with ``n = num_generations``; ``groups`` (the temperature of every prompt
      group, all ranks in rank order, as TRL gathers the prompts) splits that request into one
      per distinct temperature, and the outputs are put back in TRL's order.

    vLLM returns processed log-probs (TRL sets ``logprobs_mode="processed_logprobs"``), so each
    row's log-probs are at its own temperature too.

    Raises:
        RuntimeError: generation did not go through the per-row path (TRL generated elsewhere),
            met another number of rows or prompt groups than prepared, or TRL's own temperature
            was not 1; in each case the per-prompt temperatures were not applied.
    """
    calls = [0]
    with contextlib.ExitStack() as stack:
        if not uses_vllm(trainer):
            stack.enter_context(_hf_row_temperatures(trainer, temperatures, calls))
        elif trainer.vllm_generation.mode == "colocate":
            stack.enter_context(_colocate_row_temperatures(trainer, temperatures, calls))
        elif getattr(trainer.vllm_generation, "vllm_client", None) is not None:
            if groups is None:
                raise RuntimeError(
                    "metactl: vLLM server generation needs the temperature of every prompt group"
                )
            stack.enter_context(_server_group_temperatures(trainer, groups, calls))
        else:  # server mode on a process other than the main one: it sends no request
            calls[0] = -1
        yield
    if calls[0] == 0:
        raise RuntimeError(
            "metactl: generation did not go through the per-row temperature path (TRL generated "
            "outside model.generate / vLLM's generate); the per-prompt temperatures were not "
            "applied"
        )


@contextmanager
def _hf_row_temperatures(
    trainer: Any, temperatures: torch.Tensor, calls: list[int]
) -> Iterator[None]:
    """transformers ``generate``: a :class:`RowTemperatureProcessor` on every call."""
    from transformers import LogitsProcessorList

    target = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    processor = RowTemperatureProcessor(temperatures)

    def generate(*a: Any, **kw: Any) -> Any:
        processors = LogitsProcessorList(kw.pop("logits_processor", None) or [])
        processors.append(processor)
        return original(*a, logits_processor=processors, **kw)

    with _replaced(target, "generate", generate) as original:
        yield
    calls[0] += processor.calls


@contextmanager
def _colocate_row_temperatures(
    trainer: Any, temperatures: torch.Tensor, calls: list[int]
) -> Iterator[None]:
    """Colocated vLLM: one ``SamplingParams`` per prompt, each at its row's temperature."""
    llm = trainer.vllm_generation.llm
    values = [float(t) for t in temperatures.detach().cpu().double().tolist()]

    def generate(prompts: Any, sampling_params: Any = None, *a: Any, **kw: Any) -> Any:
        if sampling_params is None or isinstance(sampling_params, (list, tuple)):
            raise RuntimeError(
                "metactl: TRL called vLLM's LLM.generate without its one SamplingParams "
                f"({type(sampling_params).__name__}); the per-row temperatures cannot be applied"
            )
        if len(prompts) != len(values):
            raise RuntimeError(
                f"metactl: vLLM was asked for {len(prompts)} prompts but {len(values)} per-row "
                "temperatures were prepared (a tensor-parallel group gathers the prompts of "
                "several ranks); the per-prompt temperatures cannot be applied"
            )
        _check_unit_temperature("TRL's SamplingParams", sampling_params.temperature)
        per_row = []
        for value in values:
            params = sampling_params.clone()
            params.temperature = value
            if params.temperature != value:  # vLLM clamps temperatures below 0.01
                raise RuntimeError(f"metactl: vLLM would not sample at temperature {value}")
            per_row.append(params)
        calls[0] += 1
        return original(prompts, per_row, *a, **kw)

    with _replaced(llm, "generate", generate) as original:
        yield


#: What ``VLLMClient.generate`` returns per prompt (the rest is per completion, ``n`` per prompt)
_PER_PROMPT_OUTPUT = ("prompt_ids",)
_PER_COMPLETION_OUTPUT = ("completion_ids", "logprobs", "logprob_token_ids")


@contextmanager
def _server_group_temperatures(
    trainer: Any, groups: torch.Tensor, calls: list[int]
) -> Iterator[None]:
    """vLLM's server: one client request per distinct temperature, outputs in TRL's order."""
    client = trainer.vllm_generation.vllm_client
    values = [float(t) for t in groups.detach().cpu().double().tolist()]

    def generate(prompts: Any, features: Any = None, **kw: Any) -> Any:
        if len(prompts) != len(values):
            raise RuntimeError(
                f"metactl: the vLLM server was asked for {len(prompts)} prompts but "
                f"{len(values)} prompt groups have a temperature; the per-prompt temperatures "
                "cannot be applied"
            )
        _check_unit_temperature("TRL's vLLM server request", kw.get("temperature"))
        n = int(kw.get("n", 1))
        merged: dict[str, list[Any] | None] = {}
        for value in dict.fromkeys(values):
            index = [i for i, v in enumerate(values) if v == value]
            out = original(
                prompts=[prompts[i] for i in index],
                features=None if features is None else [features[i] for i in index],
                **{**kw, "temperature": value},
            )
            unknown = set(out) - {*_PER_PROMPT_OUTPUT, *_PER_COMPLETION_OUTPUT}
            if unknown:
                raise RuntimeError(
                    f"metactl: VLLMClient.generate returned {sorted(unknown)}, which the "
                    "per-prompt split does not know how to put back in order"
                )
            for key, part in out.items():
                per = 1 if key in _PER_PROMPT_OUTPUT else n
                if key not in merged:
                    merged[key] = [None] * (len(values) * per)
                target = merged[key]
                if part is None or target is None:
                    merged[key] = None
                    continue
                if len(part) != len(index) * per:
                    raise RuntimeError(
                        f"metactl: the vLLM server returned {len(part)} {key} for "
                        f"{len(index)} prompts x {per}"
                    )
                for j, i in enumerate(index):
                    target[i * per : (i + 1) * per] = part[j * per : (j + 1) * per]
        calls[0] += 1
        return merged

    with _replaced(client, "generate", generate) as original:
        yield


# ---------------------------------------------------------------------------- the log-prob kernel
def fused_kernel_rows_are_compact(device: torch.device) -> bool:
    """Whether TRL's chunked kernel on ``device`` gets only the scored positions as rows (Triton)
    rather than every position of every sequence (torch)."""
    import trl.kernels.chunked_logprob as kernels

    return bool(kernels._use_triton(device))


@contextmanager
def tapped_fused_head(
    start_call: Callable[[torch.Tensor, Any, torch.Tensor], None],
    end_call: Callable[[], None],
    tile: Callable[[torch.Tensor, torch.Tensor, int, int, dict[str, Any]], None],
    device: torch.device,
) -> Iterator[None]:
    """Read the logit tiles of TRL's fused log-prob head for the passes run inside this block.

    ``start_call(hidden, weight, targets)`` runs before every ``ChunkedLogProbFunction.apply``
    (one batch chunk of a pass) and ``end_call()`` after it; ``tile(tile, targets, vocab_start,
    n_cols, kernel_kwargs)`` runs before TRL's fold reads each ``[tokens, vocab chunk]`` tile (the
    raw logits of the chunk, before TRL's logit scaling and soft-capping, which
    ``kernel_kwargs`` hold). The tiles are only read, never changed.
    """
    import trl.kernels.chunked_logprob as kernel_module
    import trl.trainer.utils as utils_module

    # patched for the duration of the block only (module globals read at call time)
    kernels: Any = kernel_module
    trl_utils: Any = utils_module
    original_apply_owner = trl_utils._ChunkedLogProbFunction
    original_tile = kernels._forward_tile
    original_kernel = kernels._forward_kernel

    class _Apply:
        """Stands in for ``ChunkedLogProbFunction`` in ``trl.trainer.utils`` (its ``apply``)."""

        @staticmethod
        def apply(hidden: torch.Tensor, weight: Any, bias: Any, targets: torch.Tensor,
                  *args: Any) -> Any:  # fmt: skip
            start_call(hidden, weight, targets)
            try:
                return original_apply_owner.apply(hidden, weight, bias, targets, *args)
            finally:
                end_call()

    def tile_fold(tile_: torch.Tensor, stride: int, targets: torch.Tensor, *args: Any,
                  **kwargs: Any) -> Any:  # fmt: skip
        tile(tile_, targets, args[7], args[8], kwargs)
        return original_tile(tile_, stride, targets, *args, **kwargs)

    class _KernelGrid:
        def __getitem__(self, grid: Any) -> Any:
            launch = original_kernel[grid]

            def run(tile_: torch.Tensor, stride: int, targets: torch.Tensor, *args: Any,
                    **kwargs: Any) -> Any:  # fmt: skip
                tile(tile_, targets, args[7], args[8], kwargs)
                return launch(tile_, stride, targets, *args, **kwargs)

            return run

    trl_utils._ChunkedLogProbFunction = _Apply
    kernels._forward_tile = tile_fold
    if kernels._use_triton(device):
        kernels._forward_kernel = _KernelGrid()
    try:
        yield
    finally:
        trl_utils._ChunkedLogProbFunction = original_apply_owner
        kernels._forward_tile = original_tile
        kernels._forward_kernel = original_kernel
