"""``MetaGRPOTrainer``: TRL's ``GRPOTrainer`` with the rollout temperature chosen by a meta-policy.

One temperature per *generation batch* (or, with a per-prompt policy and
``meta_context_column``, one per prompt group of it): TRL generates once every
``steps_per_generation * num_iterations`` training steps and reuses the batch in between, so the
value is chosen in ``_generate_and_score_completions`` (called exactly once per generation batch)
and written to every place TRL keeps the temperature (:mod:`.patching`). The rollouts, the old,
reference and current log-probs of every optimisation pass over that batch therefore all use the
temperature that sampled it.

The meta update happens in the same call, right after TRL has scored the batch: the advantages
come from TRL's output, the candidate likelihoods from :mod:`.scoring` (fast path: hidden states
captured during the old-logprob pass when TRL makes one, else during generation; exact path: one
extra no-grad forward). Feedback is gathered across ranks in rank order and every rank updates its
own copy of the policy identically, so the next selection agrees on every rank (checked with a
broadcast from rank 0 at every selection).

Example:
    >>> import metactl
    >>> from metactl.adapters.trl import MetaGRPOTrainer
    >>> from metactl.adapters.trl.testing import (addition_dataset, digit_count_reward,
    ...     tiny_grpo_config, tiny_model_dir)
    >>> path = str(tiny_model_dir())
    >>> trainer = MetaGRPOTrainer(model=path, reward_funcs=digit_count_reward,
    ...     args=tiny_grpo_config("metactl_doc_run", max_steps=2),
    ...     train_dataset=addition_dataset(32), meta_policy=metactl.tampo(seed=0))
    >>> _ = trainer.train()  # prints TRL's logs, metactl/* metrics included
    {...'metactl/temperature': ...}
    >>> [round(h["value"], 1) in trainer.meta_policy.candidates for h in trainer.meta_history]
    [True, True]
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import tempfile
import time
from typing import Any, Literal, cast

import numpy as np
import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import GRPOTrainer

import metactl
from metactl.distributed import assert_same_choice, gather_feedback, torch_collectives

from .guards import check_generation_settings, check_transformers_version, check_trl_version
from .patching import (
    FusedHead,
    find_trainer_heads,
    output_embeddings,
    policy_target,
    set_trainer_temperature,
    trainer_temperatures,
)
from .scoring import (
    DEFAULT_WINDOW_BYTES,
    FusedLogitsCapture,
    HiddenCapture,
    LikelihoodResult,
    candidate_loglik_exact,
    candidate_loglik_from_hidden,
    dense_head,
)

__all__ = ["META_STATE_NAME", "ROW_TEMPERATURE_KEY", "MetaGRPOTrainer"]

logger = logging.getLogger(__name__)

#: File written into every TRL checkpoint directory.
META_STATE_NAME = "metactl_state.json"
_STATE_FORMAT = 1

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
    policy: metactl.MetaPolicy, likelihood: str, context_column: str | None
) -> None:
    """Refuse the per-prompt configurations this adapter cannot carry, before TRL starts."""
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


class MetaGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose rollout temperature is chosen per generation batch by ``meta_policy``.

    All ``GRPOTrainer`` arguments are accepted unchanged; ``GRPOConfig.temperature`` becomes the
    *evaluation* temperature (evaluation samples and scores at it and never updates the policy).

    Args:
        meta_policy: a :class:`metactl.MetaPolicy` over temperatures (default
            :func:`metactl.tampo`). Give every rank the same seed.
        likelihood: ``"fast"`` (default; no extra transformer forward: hidden states are captured
            during TRL's old-logprob pass when it makes one, else during generation, and the LM head
            is applied window by window), ``"fused"`` (when TRL makes an old-logprob pass, the
            candidates are folded into the logit tiles of TRL's own fused log-prob head while they
            exist: no extra matmul; otherwise as ``"fast"``) or ``"exact"`` (one extra no-grad
            scoring forward). Only used when the rule needs likelihoods or entropies.
        check_sync: on multi-process runs, check at every selection that all ranks chose the
            same candidate as rank 0 (one tiny broadcast).
        loglik_window_bytes: memory bound of one window of logits on the fast path.
        allow_missing_meta_state: on ``train(resume_from_checkpoint=...)``, a checkpoint
            without ``metactl_state.json`` is an error (``FileNotFoundError``) unless this is
            True; then the meta-policy keeps its current state (a warning is logged).
        meta_context_column: with a per-prompt policy (``policy.contextual``), the dataset
            column holding each prompt's stable ``int``/``str`` context key (required then).
            Every prompt group is then sampled and scored at its own temperature (see the
            README section "A temperature per prompt group").

    Attributes:
        meta_history: one dict per generation batch: ``policy_step``, ``global_step``,
            ``value``, ``index``, ``probs`` (after the update), ``candidate_advantages``,
            ``likelihood_path``, ``reward`` (TRL's mean reward of the batch, all ranks); with a
            per-prompt policy ``value`` is the mean over the prompts and ``contexts``,
            ``values``, ``indices`` give each prompt's decision.
        eval_temperature: the temperature used during evaluation (``args.temperature``).
        meta_seconds: wall time spent in the meta-policy work (selection, scoring, update).

    Logged metrics (``self._metrics``, so every TRL logger sees them): ``metactl/temperature``,
    ``metactl/decision_prob``, ``metactl/prob/<T>``, ``metactl/candidate_advantage/<T>``.
    """

    def __init__(
        self,
        *args: Any,
        meta_policy: metactl.MetaPolicy | None = None,
        likelihood: Literal["fast", "fused", "exact"] = "fast",
        check_sync: bool = True,
        loglik_window_bytes: int = DEFAULT_WINDOW_BYTES,
        allow_missing_meta_state: bool = False,
        meta_context_column: str | None = None,
        **kwargs: Any,
    ) -> None:
        check_trl_version()
        check_transformers_version()
        policy = metactl.tampo() if meta_policy is None else meta_policy
        if not isinstance(policy, metactl.MetaPolicy):
            raise TypeError(
                f"meta_policy must be a metactl.MetaPolicy, got {type(policy).__name__}"
            )
        if policy.hyperparameter != "temperature":
            raise ValueError(
                f"meta_policy controls {policy.hyperparameter!r}; MetaGRPOTrainer sets the "
                "temperature, so build the policy with hyperparameter='temperature'"
            )
        if likelihood not in ("fast", "fused", "exact"):
            raise ValueError(f"likelihood must be 'fast', 'fused' or 'exact', got {likelihood!r}")
        if not isinstance(check_sync, bool):
            raise TypeError(f"check_sync must be a bool, got {type(check_sync).__name__}")
        if isinstance(loglik_window_bytes, bool) or not isinstance(loglik_window_bytes, int):
            raise TypeError("loglik_window_bytes must be an int")
        if loglik_window_bytes < 1:
            raise ValueError(f"loglik_window_bytes must be >= 1, got {loglik_window_bytes}")
        if not isinstance(allow_missing_meta_state, bool):
            raise TypeError(
                "allow_missing_meta_state must be a bool, got "
                f"{type(allow_missing_meta_state).__name__}"
            )
        self.allow_missing_meta_state = allow_missing_meta_state
        self.contextual = bool(getattr(policy, "contextual", False))
        if meta_context_column is not None and not isinstance(meta_context_column, str):
            raise TypeError(
                "meta_context_column must be a str (a dataset column) or None, got "
                f"{type(meta_context_column).__name__}"
            )
        if self.contextual:
            _check_per_prompt_policy(policy, likelihood, meta_context_column)
        self.meta_context_column = meta_context_column
        # per-row temperatures of the log-prob pass in progress (None: one scalar temperature)
        self._meta_row_temperatures: torch.Tensor | None = None
        # TRL's gathered (N_global, F) rewards of the generation batch in progress
        self._meta_rewards_per_func: torch.Tensor | None = None
        # (checkpoint folder, validated state or None) read by train() before TRL loads anything
        self._meta_pending: tuple[str, dict[str, Any] | None] | None = None
        self.meta_policy = policy
        self.likelihood = likelihood
        self.check_sync = check_sync
        self.loglik_window_bytes = loglik_window_bytes
        self.meta_history: list[dict[str, Any]] = []
        self.meta_seconds = 0.0
        self._meta_train_temperature: float | None = None
        self._meta_capture: HiddenCapture | FusedLogitsCapture | None = None
        self._meta_old_done = False
        self._meta_collectives: tuple[Any, Any] | None = None
        super().__init__(*args, **kwargs)

        config: Any = self.args
        self.eval_temperature = float(config.temperature)
        settings = dict(getattr(self, "generation_kwargs", None) or {})
        for name in ("top_p", "top_k", "min_p", "repetition_penalty"):
            settings.setdefault(name, getattr(config, name, None))
        check_generation_settings(
            settings,
            generation_kwargs=config.generation_kwargs,
            needs_likelihood="loglik" in policy.requires,
        )
        self._meta_heads: list[FusedHead] = find_trainer_heads(self)
        if self.contextual:
            self._check_per_prompt_paths(settings)

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

    # ------------------------------------------------------------------ temperature plumbing
    def set_temperature(self, value: float) -> None:
        """Write ``value`` to every place TRL keeps the temperature (see :mod:`.patching`)."""
        set_trainer_temperature(self, value, self._meta_heads)

    def temperatures(self) -> dict[str, float]:
        """Every temperature the trainer currently holds, by place (they are always equal)."""
        return trainer_temperatures(self, self._meta_heads)

    # ------------------------------------------------------------------ collectives
    def _collectives(self) -> tuple[Any, Any]:
        if self._meta_collectives is None:
            self._meta_collectives = torch_collectives()
        return self._meta_collectives

    @property
    def _multi_process(self) -> bool:
        return self.accelerator.num_processes > 1

    # ------------------------------------------------------------------ the hook
    def _likelihood_path(self) -> Path:
        """Where this generation batch's candidate likelihoods come from."""
        if self.likelihood == "exact":
            return "exact"
        args: Any = self.args
        generate_every = args.steps_per_generation * self.num_iterations
        use_vllm = bool(getattr(self, "use_vllm", False))
        if args.gradient_accumulation_steps % generate_every != 0 or (
            use_vllm and getattr(self, "vllm_importance_sampling_correction", False)
        ):
            # TRL makes an old-logprob pass over the batch: score inside its fused head, or
            # capture its hidden states
            return "fused" if self.likelihood == "fused" else "old"
        plain_generate = not (
            use_vllm
            or getattr(self, "use_transformers_continuous_batching", False)
            or getattr(self, "rollout_func", None) is not None
            or getattr(self, "tools", None)
            or getattr(self, "environment_factories", None) is not None
        )
        return "generate" if plain_generate else "exact"

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        if not cast(torch.nn.Module, self.model).training:
            # Evaluation: sample and score at the evaluation temperature; never update the policy.
            self.set_temperature(self.eval_temperature)
            self._metrics["eval"]["metactl/temperature"].append(self.eval_temperature)
            return super()._generate_and_score_completions(inputs)
        if self.contextual:
            return self._generate_per_prompt(inputs)

        t0 = time.perf_counter()
        decision = self.meta_policy.select()
        if self.check_sync and self._multi_process:
            assert_same_choice(decision, self._collectives()[1])
        self.set_temperature(decision.value)
        self._meta_train_temperature = decision.value
        requires = set(self.meta_policy.requires)
        needs_scoring = bool(requires & {"loglik", "entropy"})
        path = self._likelihood_path() if needs_scoring else None
        capture: HiddenCapture | FusedLogitsCapture | None = None
        if path in ("old", "generate"):
            capture = HiddenCapture(self._backbone(), path)
        elif path == "fused":
            capture = FusedLogitsCapture(
                self.meta_policy.candidates.tolist(),
                entropy_temperature=decision.value if "entropy" in requires else None,
            )
        self._meta_capture, self._meta_old_done = capture, False
        self.meta_seconds += time.perf_counter() - t0
        try:
            if capture is not None:
                with capture:
                    output = super()._generate_and_score_completions(inputs)
            else:
                output = super()._generate_and_score_completions(inputs)
        finally:
            self._meta_capture = None
        t1 = time.perf_counter()
        self._update_policy(decision, output, capture, path)
        self.meta_seconds += time.perf_counter() - t1
        if isinstance(capture, FusedLogitsCapture):
            self.meta_seconds += capture.seconds  # the fold ran inside TRL's own pass
        return output

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
        self._meta_train_temperature = None
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
            advantages = output["advantages"].detach().float().cpu().numpy().astype(np.float64)
            if advantages.ndim != 1:
                raise ValueError(
                    "MetaGRPOTrainer needs one advantage per completion (shape (N,)); got "
                    f"shape {advantages.shape}"
                )
            if "loglik" in local:
                advantages = np.where(scored, advantages, 0.0)
            local["advantages"] = advantages
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

    def _generate_single_turn(self, *args: Any, **kwargs: Any) -> Any:
        if self._meta_row_temperatures is not None:
            return self._generate_per_row(*args, **kwargs)
        return self._generate_single_turn_captured(*args, **kwargs)

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

    def _generate_single_turn_captured(self, *args: Any, **kwargs: Any) -> Any:
        capture = self._meta_capture
        if isinstance(capture, HiddenCapture) and capture.mode == "generate":
            with capture.recording():
                return super()._generate_single_turn(*args, **kwargs)
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
        capture = self._meta_capture
        run: Any = (
            self._per_row_logps
            if self._meta_row_temperatures is not None
            else super()._get_per_token_logps_and_entropies
        )
        # TRL's first policy pass inside _generate_and_score_completions is the old-logprob pass
        # (the reference pass comes after it; with PEFT it also runs on self.model).
        if (
            capture is not None
            and capture.mode in ("old", "fused")
            and not self._meta_old_done
            and model is self.model
        ):
            self._meta_old_done = True
            recording: contextlib.AbstractContextManager[None]
            if isinstance(capture, FusedLogitsCapture):
                batch_size = args[0] if args else kwargs.get("batch_size")
                recording = capture.recording(input_ids, attention_mask, logits_to_keep, batch_size)
            else:
                recording = cast(HiddenCapture, capture).recording(keep=logits_to_keep)
            with recording:
                return run(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        return run(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)

    def _backbone(self) -> torch.nn.Module:
        target = policy_target(self.model)
        return getattr(target, self._meta_heads[0].backbone_attr)

    # ------------------------------------------------------------------ feedback and update
    def _score(
        self,
        decision: metactl.Decision,
        output: dict[str, Any],
        capture: HiddenCapture | FusedLogitsCapture | None,
        path: Path,
    ) -> tuple[LikelihoodResult, Path]:
        tokens = output["completion_ids"]
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        candidates = self.meta_policy.candidates.tolist()
        ent_t = decision.value if "entropy" in self.meta_policy.requires else None
        if isinstance(capture, FusedLogitsCapture):
            fused = capture.result(tokens, mask)
            if fused is not None:
                return fused, path
            logger.warning(
                "metactl: scoring inside TRL's fused head failed (%s); scoring this batch with "
                "an extra forward (likelihood='exact')",
                capture.failure,
            )
            capture = None
        if capture is not None:
            hidden = self._aligned_hidden(capture, tokens, mask)
            if hidden is not None:
                head = self._meta_heads[0]
                weight, bias, head_fn = dense_head(output_embeddings(self.model))
                return candidate_loglik_from_hidden(
                    hidden,
                    tokens,
                    mask,
                    weight,
                    bias,
                    candidates,
                    logit_scale=head.logit_scale,
                    softcap=head.softcap,
                    entropy_temperature=ent_t,
                    window_bytes=self.loglik_window_bytes,
                    head=head_fn,
                ), path
            logger.warning(
                "metactl: the %s-pass hidden states did not line up with the completions; "
                "scoring this batch with an extra forward (likelihood='exact')",
                path,
            )
        input_ids = torch.cat([output["prompt_ids"], tokens], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        result = candidate_loglik_exact(
            self.model,
            input_ids,
            attention_mask,
            tokens,
            mask,
            candidates,
            batch_size=self.args.per_device_train_batch_size,
            entropy_temperature=ent_t,
            autocast=self.accelerator.autocast,
        )
        return result, "exact"

    @staticmethod
    def _aligned_hidden(
        capture: HiddenCapture, tokens: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor | None:
        """The captured ``(N, C, H)`` hidden states, or ``None`` if they cannot be aligned."""
        if not capture.parts:
            return None
        hidden = capture.hidden()
        n, c = tokens.shape
        if hidden.shape[0] != n:
            return None
        steps = hidden.shape[1]
        if steps >= c:
            return hidden[:, :c]
        if bool(mask[:, steps:].any()):
            return None
        pad = hidden.new_zeros((n, c - steps, hidden.shape[2]))
        return torch.cat([hidden, pad], dim=1)

    def _update_policy(
        self,
        decision: metactl.Decision,
        output: dict[str, Any],
        capture: HiddenCapture | FusedLogitsCapture | None,
        path: Path | None,
    ) -> Path | None:
        requires = set(self.meta_policy.requires)
        feedback: dict[str, Any] = {}
        path_used: Path | None = None
        if path is not None:
            result, path_used = self._score(decision, output, capture, path)
            scored = (result.counts > 0).cpu().numpy()
            if "loglik" in requires:
                feedback["loglik"] = result.loglik.cpu().numpy()
            if "entropy" in requires:
                tokens = float(result.counts.sum())
                feedback["entropy"] = float(result.entropy_sum or 0.0) / max(tokens, 1.0)
        if "advantages" in requires or "loglik" in requires:
            advantages = output["advantages"].detach().float().cpu().numpy().astype(np.float64)
            if advantages.ndim != 1:
                raise ValueError(
                    "MetaGRPOTrainer needs one advantage per completion (shape (N,)); got "
                    f"shape {advantages.shape}"
                )
            if "loglik" in feedback:
                # A completion with no scored token (mask_truncated_completions, tool-only) carries
                # no likelihood; TRL leaves it out of the loss, and weight 0 leaves it out here.
                advantages = np.where(scored, advantages, 0.0)
            feedback["advantages"] = advantages
        if "reward" in requires:
            # TRL's logged batch reward is already the mean over all ranks' completions.
            feedback["reward"] = float(self._metrics["train"]["reward"][-1])
        if "vocab_size" in requires:
            feedback["vocab_size"] = int(output_embeddings(self.model).weight.shape[0])
        if self._multi_process and feedback:
            feedback = gather_feedback(feedback, self._collectives()[0])
        info = self.meta_policy.update(decision, **feedback)
        self._log_meta(decision, info, path_used)
        return path_used

    def _log_meta(
        self, decision: metactl.Decision, info: metactl.UpdateInfo, path: Path | None
    ) -> None:
        metrics = self._metrics["train"]
        metrics["metactl/temperature"].append(decision.value)
        metrics["metactl/decision_prob"].append(decision.prob)
        candidates = self.meta_policy.candidates
        for value, prob in zip(candidates, info.probs, strict=True):
            metrics[f"metactl/prob/{value:g}"].append(float(prob))
        adv = info.candidate_advantages
        rewards = metrics.get("reward")  # TRL's mean reward of this batch over all ranks
        if adv is not None:
            for value, a in zip(candidates, adv, strict=True):
                metrics[f"metactl/candidate_advantage/{value:g}"].append(float(a))
        self.meta_history.append(
            {
                "policy_step": decision.step,
                "global_step": int(self.state.global_step),
                "value": decision.value,
                "index": decision.index,
                "probs": [float(p) for p in info.probs],
                "candidate_advantages": None if adv is None else [float(a) for a in adv],
                "likelihood_path": path,
                "reward": float(rewards[-1]) if rewards else None,
            }
        )

    # ------------------------------------------------------------------ evaluation
    def prediction_step(
        self,
        model: Any,
        inputs: Any,
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> Any:
        # Evaluation generates *and* computes its loss at the evaluation temperature; then the
        # training temperature of the current (possibly half-consumed) buffered batch comes back.
        self.set_temperature(self.eval_temperature)
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        finally:
            if self._meta_train_temperature is not None:
                self.set_temperature(self._meta_train_temperature)

    # ------------------------------------------------------------------ checkpoints
    def meta_state_dict(self) -> dict[str, Any]:
        """What ``metactl_state.json`` holds: the policy state and the current temperatures."""
        return {
            "format": _STATE_FORMAT,
            "policy": self.meta_policy.state_dict(),
            "train_temperature": self._meta_train_temperature,
            "eval_temperature": self.eval_temperature,
            "likelihood": self.likelihood,
        }

    def load_meta_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`meta_state_dict` (the policy continues bit-identically).

        The policy state and the temperature are both validated before either is applied:
        a rejected state (``ValueError``/``TypeError``) changes nothing.
        """
        policy_state, temperature = self._check_meta_state(state)
        self.meta_policy.load_state_dict(policy_state)  # validated above: cannot fail now
        if temperature is not None:
            self._meta_train_temperature = temperature
            self.set_temperature(temperature)

    def _check_meta_state(self, state: Any) -> tuple[dict[str, Any], float | None]:
        """Validate a :meth:`meta_state_dict` without applying it."""
        if not isinstance(state, dict):
            raise TypeError(f"a {META_STATE_NAME} holds a JSON object, got {type(state).__name__}")
        if state.get("format") != _STATE_FORMAT or isinstance(state.get("format"), bool):
            raise ValueError(
                f"format is {state.get('format')!r}; this metactl reads format {_STATE_FORMAT}"
            )
        if "policy" not in state:
            raise ValueError("the 'policy' entry is missing")
        temperature = state.get("train_temperature")
        if temperature is not None:
            if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
                raise TypeError(
                    f"train_temperature must be a number or null, got {type(temperature).__name__}"
                )
            low, high = (
                float(c)
                for c in (self.meta_policy.candidates.min(), self.meta_policy.candidates.max())
            )
            if not (math.isfinite(temperature) and low <= temperature <= high):
                raise ValueError(
                    f"train_temperature must be a finite temperature inside the candidate range "
                    f"[{low}, {high}], got {temperature!r}"
                )
            temperature = float(temperature)
        # the policy's own load validates everything before assigning; run it on a copy so
        # that nothing is applied until the temperature has passed as well
        copy.deepcopy(self.meta_policy).load_state_dict(state["policy"])
        return state["policy"], temperature

    def _read_meta_state(self, checkpoint: str) -> dict[str, Any] | None:
        """Read and validate ``<checkpoint>/metactl_state.json``: one ``ValueError`` naming the
        file for any corruption; None when it is missing and ``allow_missing_meta_state``."""
        path = os.path.join(checkpoint, META_STATE_NAME)
        if not os.path.exists(path):
            if self.allow_missing_meta_state:
                logger.warning(
                    "metactl: %s has no %s; the meta-policy keeps its current state "
                    "(allow_missing_meta_state=True)",
                    checkpoint,
                    META_STATE_NAME,
                )
                return None
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint has no meta-policy state, so resuming would "
                "restart the meta-policy while the model resumes. Resume from a checkpoint "
                "written by MetaGRPOTrainer, or pass allow_missing_meta_state=True to continue "
                "with the meta-policy's current state"
            )
        try:
            with open(path, "rb") as f:
                state = json.loads(f.read().decode("utf-8"))
            self._check_meta_state(state)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError) as exc:
            raise ValueError(
                f"{path} is corrupt or not a {META_STATE_NAME} of this run ({exc}); nothing "
                "was loaded. Resume from another checkpoint (or restore this file)"
            ) from exc
        return cast(dict[str, Any], state)

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """``GRPOTrainer.train``; on a resume, ``metactl_state.json`` is read and validated
        before TRL loads the model, optimizer or anything else from the checkpoint."""
        checkpoint: Any = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)  # None: TRL raises below
        self._meta_pending = None
        if isinstance(checkpoint, (str, os.PathLike)):
            folder = os.fspath(checkpoint)
            self._meta_pending = (folder, self._read_meta_state(folder))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        out_dir = os.path.join(self._get_output_dir(trial=trial), folder)
        os.makedirs(out_dir, exist_ok=True)
        # a unique temporary name in the same folder, then an atomic rename into place
        fd, tmp = tempfile.mkstemp(prefix=META_STATE_NAME + ".", suffix=".tmp", dir=out_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.meta_state_dict(), f, allow_nan=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(out_dir, META_STATE_NAME))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        pending, self._meta_pending = self._meta_pending, None
        if pending is not None and os.path.realpath(pending[0]) == os.path.realpath(checkpoint):
            state = pending[1]  # read and validated by train() before anything was loaded
        else:
            state = self._read_meta_state(checkpoint)
        if state is not None:
            self.load_meta_state_dict(state)
