"""The per-prompt side of ``MetaGRPOTrainer`` (only used when ``meta_policy.contextual``).

One decision per prompt group: the context keys come from ``meta_context_column``, generation
runs at T = 1 with a per-row logits processor carrying each row's temperature, TRL's log-prob
passes run its fused head once per distinct temperature, and the update gets every row's
feedback in decision order. :class:`PerPromptMixin` holds these methods; ``MetaGRPOTrainer``
(in :mod:`.trainer`) inherits them and dispatches to them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch

import metactl
from metactl.distributed import gather_feedback

from .scoring import HiddenCapture, completion_advantages

if TYPE_CHECKING:
    from .fused import FusedLogitsCapture
    from .patching import FusedHead
    from .scoring import LikelihoodResult

if TYPE_CHECKING:
    from trl import GRPOTrainer as _TrainerBase
else:
    _TrainerBase = object

__all__ = ["ROW_TEMPERATURE_KEY", "PerPromptMixin"]

Path = Literal["fused", "old", "generate", "exact"]

#: Key of the per-row sampling temperature in TRL's buffered batch (per-prompt policies only):
#: TRL shuffles and splits every tensor of the batch in unison, so each row keeps its own value.
ROW_TEMPERATURE_KEY = "metactl_row_temperature"

# Sampling settings applied by transformers *before* the custom logits processors that carry
# the per-row temperature; they depend on the temperature, so they would act at T = 1.
_TEMPERATURE_DEPENDENT = {
    "top_p": 1.0,
    "min_p": 0.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
}


def _check_per_prompt_policy(
    policy: metactl.MetaPolicy,
    likelihood: str,
    context_column: str | None,
    knobs: tuple[str, ...] = ("temperature",),
) -> None:
    """Refuse the per-prompt configurations this adapter cannot carry, before TRL starts."""
    if knobs != ("temperature",):
        raise ValueError(
            f"a per-prompt meta_policy over {list(knobs)}: MetaGRPOTrainer carries one value per "
            "prompt group for the temperature only (a per-row logits processor); transformers' "
            "top_p / top_k / min_p warpers and vLLM's SamplingParams take one value per batch. "
            "Use a global meta_policy for these knobs"
        )
    if context_column is None:
        raise ValueError(
            "a per-prompt meta_policy (policy.contextual) needs one stable context key per prompt, "
            "and TRL does not hand the dataset index to the trainer: pass "
            "meta_context_column='<column>' naming a train_dataset column that holds a stable "
            "int or str id per prompt (e.g. dataset.add_column('prompt_id', range(len(dataset))))"
        )
    if likelihood == "fused":
        raise ValueError(
            "likelihood='fused' cannot carry a temperature per prompt group (the candidates are "
            "folded into one scalar-temperature pass of TRL's fused head); use likelihood='fast' "
            "or 'exact' with a per-prompt meta_policy"
        )
    if "entropy" in policy.requires:
        raise ValueError(
            "MetaGRPOTrainer does not compute the per-prompt entropy feedback; use a per-prompt "
            "rule that needs rewards or loglik/advantages (metactl.ptgs, metactl.tampo_per_prompt)"
        )
    if getattr(policy.rule, "feature_dim", 0):
        raise ValueError(
            "MetaGRPOTrainer does not pass context features to select(); build the per-prompt "
            "policy with feature_dim=0"
        )


class _RowTemperatureProcessor:
    """Logits processor dividing row ``i``'s scores by ``temperatures[i]`` (generation at T = 1).

    Sampling then draws row ``i`` from ``softmax(z_i / T_i)``, as transformers' own temperature
    warper would with ``temperature=T_i``. ``calls`` proves that generation went through it.
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


class PerPromptMixin(_TrainerBase):
    """The per-prompt methods of ``MetaGRPOTrainer`` (they use the trainer's ``_meta_*`` state,
    ``_score``, ``_likelihood_path``, ``_backbone`` and ``_generate_single_turn_captured``)."""

    if TYPE_CHECKING:  # set and defined by MetaGRPOTrainer (see its __init__)
        meta_policy: metactl.MetaPolicy
        meta_context_column: str | None
        check_sync: bool
        meta_seconds: float
        meta_history: list[dict[str, Any]]
        _meta_heads: list[FusedHead]
        _meta_capture: HiddenCapture | FusedLogitsCapture | None
        _meta_old_done: bool
        _meta_row_temperatures: torch.Tensor | None
        _meta_rewards_per_func: torch.Tensor | None
        _meta_train_setting: dict[str, Any] | None

        @property
        def _multi_process(self) -> bool: ...
        def set_temperature(self, value: float) -> None: ...
        def _collectives(self) -> tuple[Any, Any]: ...
        def _likelihood_path(self) -> Path: ...
        def _backbone(self) -> torch.nn.Module: ...
        def _score(
            self,
            decision: metactl.Decision,
            output: dict[str, Any],
            capture: HiddenCapture | FusedLogitsCapture | None,
            path: Path,
        ) -> tuple[LikelihoodResult, Path]: ...
        def _generate_single_turn_captured(self, *args: Any, **kwargs: Any) -> Any: ...

    # ------------------------------------------------------------------ per-prompt checks
    def _check_per_prompt_paths(self, settings: dict[str, Any]) -> None:
        """Refuse a per-prompt policy on every TRL path that cannot carry per-row temperatures."""
        args: Any = self.args
        refused = {
            "use_vllm (vLLM generation; one SamplingParams per request batch is not wired)": bool(
                getattr(self, "use_vllm", False)
            ),
            "use_transformers_continuous_batching (generate_batch)": bool(
                getattr(self, "use_transformers_continuous_batching", False)
            ),
            "rollout_func (a user rollout samples outside the trainer)": getattr(
                self, "rollout_func", None
            )
            is not None,
            "tools (multi-turn tool calls regroup the rows)": bool(getattr(self, "tools", None)),
            "environment_factories (multi-turn environments)": getattr(
                self, "environment_factories", None
            )
            is not None,
            "use_liger_kernel (Liger's fused GRPO loss takes one scalar temperature)": bool(
                getattr(args, "use_liger_kernel", False)
                or getattr(self, "liger_grpo_loss", None) is not None
            ),
        }
        for path, active in refused.items():
            if active:
                raise ValueError(
                    f"a per-prompt meta_policy needs a temperature per row, which the TRL path "
                    f"{path} cannot carry; turn it off or use a global meta_policy"
                )
        for name, neutral in _TEMPERATURE_DEPENDENT.items():
            value = settings.get(name)
            if value is not None and float(value) != neutral:
                raise ValueError(
                    f"{name}={value!r}: with a per-prompt meta_policy the per-row temperature is "
                    "applied by a logits processor after transformers' own truncations, so "
                    f"{name} would act on the untempered distribution; set {name}={neutral!r}"
                )
        dataset = getattr(self, "train_dataset", None)
        columns = getattr(dataset, "column_names", None)
        if columns is not None and self.meta_context_column not in columns:
            raise ValueError(
                f"meta_context_column={self.meta_context_column!r} is not a column of "
                f"train_dataset (columns: {sorted(columns)}); add a stable int or str id per "
                "prompt and name it"
            )

    # ------------------------------------------------------------------ per-prompt temperatures
    def _context_keys(self, inputs: list[dict[str, Any]]) -> list[int | str]:
        column = cast(str, self.meta_context_column)
        keys: list[int | str] = []
        for i, row in enumerate(inputs):
            if column not in row:
                raise ValueError(
                    f"row {i} of the generation batch has no column {column!r} "
                    "(meta_context_column); keep it in the dataset (remove_unused_columns=False)"
                )
            key = row[column]
            if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer, str)):
                raise TypeError(
                    f"meta_context_column {column!r} must hold int or str keys, got "
                    f"{type(key).__name__} {key!r} in row {i}"
                )
            keys.append(key if isinstance(key, str) else int(key))
        return keys

    def _generate_per_prompt(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """One generation batch of a per-prompt policy: one decision per prompt group, each group
        sampled and scored at its own temperature, one update with every row in decision order."""
        from accelerate.utils import gather_object

        t0 = time.perf_counter()
        group = int(cast(int, self.num_generations))
        local_keys = self._context_keys(inputs)
        # TRL's groups of num_generations rows are contiguous in rank order (they may span ranks)
        keys = list(gather_object(local_keys)) if self._multi_process else local_keys
        if len(keys) % group != 0:
            raise ValueError(
                f"the generation batch has {len(keys)} rows, not a multiple of "
                f"num_generations={group}"
            )
        contexts = keys[::group]
        for g, key in enumerate(contexts):
            if any(k != key for k in keys[g * group : (g + 1) * group]):
                raise ValueError(
                    f"prompt group {g} mixes context keys {keys[g * group : (g + 1) * group]!r}: "
                    f"meta_context_column={self.meta_context_column!r} must be one id per prompt"
                )
        batch = self.meta_policy.select(contexts=contexts)
        values = np.asarray(batch.values, dtype=np.float64)
        if self.check_sync and self._multi_process:
            chosen = gather_object([tuple(values.tolist())])
            if any(v != chosen[0] for v in chosen):
                raise RuntimeError(
                    "metactl: the ranks chose different per-prompt temperatures; give every rank "
                    "the same meta_policy seed and state"
                )
        start = self.accelerator.process_index * len(inputs)
        rows = np.repeat(values, group)[start : start + len(inputs)]
        row_temperatures = torch.tensor(rows, dtype=torch.float64)
        # generation at T = 1: the per-row logits processor applies each row's temperature
        self.set_temperature(1.0)
        self._meta_train_setting = None
        requires = set(self.meta_policy.requires)
        path = self._likelihood_path() if "loglik" in requires else None
        capture: HiddenCapture | None = None
        if path in ("old", "generate"):
            capture = HiddenCapture(self._backbone(), cast(Literal["old", "generate"], path))
        self._meta_capture, self._meta_old_done = capture, False
        self._meta_row_temperatures = row_temperatures
        self._meta_rewards_per_func = None
        self.meta_seconds += time.perf_counter() - t0
        try:
            if capture is not None:
                with capture:
                    output = super()._generate_and_score_completions(inputs)
            else:
                output = super()._generate_and_score_completions(inputs)
        finally:
            self._meta_capture = None
            self._meta_row_temperatures = None
        t1 = time.perf_counter()
        if output["completion_ids"].shape[0] != len(inputs):
            raise RuntimeError(
                f"metactl: TRL returned {output['completion_ids'].shape[0]} rows for "
                f"{len(inputs)} inputs; the per-row temperatures cannot be matched to them"
            )
        output[ROW_TEMPERATURE_KEY] = row_temperatures.to(output["completion_ids"].device)
        self._update_per_prompt(batch, output, capture, path)
        self.meta_seconds += time.perf_counter() - t1
        return output

    def _calculate_rewards(self, *args: Any, **kwargs: Any) -> Any:
        rewards_per_func = super()._calculate_rewards(*args, **kwargs)
        if self._meta_row_temperatures is not None:
            self._meta_rewards_per_func = rewards_per_func.detach()
        return rewards_per_func

    def _row_rewards(self) -> np.ndarray:
        """Every row's reward (all ranks, rank order), as TRL sums the reward functions."""
        per_func = self._meta_rewards_per_func
        if per_func is None:
            raise RuntimeError("metactl: TRL computed no rewards for this generation batch")
        unscorable = torch.isnan(per_func).all(dim=1)
        if bool(unscorable.any()):
            raise ValueError(
                f"{int(unscorable.sum())} completions got no reward from any reward function "
                "(all None); the per-prompt rule needs a reward in [0, 1] for every row"
            )
        weights = self.reward_weights.to(per_func.device).unsqueeze(0)
        rewards = (per_func * weights).nansum(dim=1)
        return rewards.double().cpu().numpy()

    def _update_per_prompt(
        self,
        batch: Any,
        output: dict[str, Any],
        capture: HiddenCapture | None,
        path: Path | None,
    ) -> None:
        requires = set(self.meta_policy.requires)
        local: dict[str, Any] = {}
        path_used: Path | None = None
        if path is not None:
            result, path_used = self._score(cast(Any, batch), output, capture, path)
            scored = (result.counts > 0).cpu().numpy()
            local["loglik"] = result.loglik.cpu().numpy()
        if "advantages" in requires or "loglik" in requires:
            local["advantages"] = completion_advantages(
                output, scored if "loglik" in local else None)
        feedback = (
            gather_feedback(local, self._collectives()[0])
            if self._multi_process and local
            else local
        )
        if "rewards" in requires:
            feedback["rewards"] = self._row_rewards()  # already gathered by TRL, rank order
        if "reward" in requires:
            feedback["reward"] = float(self._metrics["train"]["reward"][-1])
        info = self.meta_policy.update(batch, **feedback)
        metrics = self._metrics["train"]
        values = [float(v) for v in batch.values]
        metrics["metactl/temperature"].append(float(np.mean(values)))
        metrics["metactl/temperature_min"].append(min(values))
        metrics["metactl/temperature_max"].append(max(values))
        rewards = metrics.get("reward")
        self.meta_history.append(
            {
                "policy_step": int(batch[0].step),
                "global_step": int(self.state.global_step),
                "value": float(np.mean(values)),
                "contexts": [d.context for d in batch],
                "values": values,
                "indices": [int(i) for i in batch.indices],
                "probs": [float(p) for p in info.probs],
                "likelihood_path": path_used,
                "reward": float(rewards[-1]) if rewards else None,
            }
        )

    def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        rows = inputs.get(ROW_TEMPERATURE_KEY) if isinstance(inputs, dict) else None
        if rows is None:
            return super().compute_loss(model, inputs, *args, **kwargs)
        # this micro-batch's rows (shuffled and split by TRL together with the temperatures)
        self._meta_row_temperatures = rows
        try:
            return super().compute_loss(model, inputs, *args, **kwargs)
        finally:
            self._meta_row_temperatures = None

    def _per_row_logps(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """TRL's log-prob pass with row ``i`` at its own temperature: one pass of TRL's own fused
        head per distinct temperature (exact: the same kernel at that scalar), rows put back."""
        temps = cast(torch.Tensor, self._meta_row_temperatures)
        n = input_ids.shape[0]
        if temps.shape != (n,):
            raise RuntimeError(
                f"metactl: a log-prob pass over {n} rows met {tuple(temps.shape)} per-row "
                "temperatures; the rows cannot be matched to their prompts"
            )
        names = (
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
        call = dict(zip(names, args, strict=False))
        call.update(kwargs)
        if any(call.get(name) is not None for name in names[3:]):
            raise ValueError(
                "a per-prompt meta_policy does not support multimodal inputs in TRL's log-prob "
                "pass (the image tensors are not split per row); use a global meta_policy"
            )
        temps_cpu = temps.detach().double().cpu()
        # groups: contiguous runs of one temperature when the rows are in generation order
        # (a hidden-state capture concatenates the passes in call order), else distinct values
        groups: list[tuple[float, torch.Tensor]] = []
        if self._meta_capture is not None:
            start = 0
            for i in range(1, n + 1):
                if i == n or temps_cpu[i] != temps_cpu[start]:
                    groups.append((float(temps_cpu[start]), torch.arange(start, i)))
                    start = i
        else:
            for value in dict.fromkeys(temps_cpu.tolist()):
                groups.append((value, torch.nonzero(temps_cpu == value).flatten()))
        before = [head.temperature for head in self._meta_heads]
        parts: list[tuple[torch.Tensor, Any]] = []
        try:
            for value, index in groups:
                for head in self._meta_heads:
                    head.set_temperature(value)
                index_dev = index.to(input_ids.device)
                parts.append(
                    (
                        index_dev,
                        super()._get_per_token_logps_and_entropies(
                            model,
                            input_ids[index_dev],
                            attention_mask[index_dev],
                            logits_to_keep,
                            **call,
                        ),
                    )
                )
        finally:
            for head, value in zip(self._meta_heads, before, strict=True):
                head.set_temperature(value)
        order = torch.argsort(torch.cat([index for index, _ in parts]))
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

    def _generate_per_row(self, *args: Any, **kwargs: Any) -> Any:
        """HF generation with a per-row logits processor (the generation temperature is 1)."""
        from transformers import LogitsProcessorList

        target = self.accelerator.unwrap_model(self.model_wrapped)
        processor = _RowTemperatureProcessor(cast(torch.Tensor, self._meta_row_temperatures))
        original = target.generate

        def generate(*a: Any, **kw: Any) -> Any:
            processors = LogitsProcessorList(kw.pop("logits_processor", None) or [])
            processors.append(processor)
            return original(*a, logits_processor=processors, **kw)

        had_own = "generate" in target.__dict__  # e.g. a user's instance-level wrapper
        target.generate = generate
        try:
            out = self._generate_single_turn_captured(*args, **kwargs)
        finally:
            if had_own:
                target.generate = original
            else:
                del target.generate
        if processor.calls == 0:
            raise RuntimeError(
                "metactl: generation did not go through the per-row temperature processor "
                "(TRL generated outside model.generate); the per-prompt temperatures were not "
                "applied"
            )
        return out
