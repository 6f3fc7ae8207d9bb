"""``MetaGRPOTrainer``: TRL's ``GRPOTrainer`` with the rollout temperature chosen by a meta-policy.

One temperature per *generation batch* (or, with a per-prompt policy and
``meta_context_column``, one per prompt group of it): TRL generates once every
``steps_per_generation * num_iterations`` training steps and reuses the batch in between, so the
value is chosen in ``_generate_and_score_completions`` (called exactly once per generation batch)
and written to every place TRL keeps the temperature (:mod:`.patching`). The rollouts, the old,
reference and current log-probs of every optimisation pass over that batch therefore all use the
temperature that sampled it.

A policy over ``top_p``, ``top_k``, ``min_p`` or a joint grid works the same way (:mod:`.knobs`):
the chosen setting is written where TRL keeps each knob for the window; the knobs it does not own
stay at the user's values and are held fixed when its candidates are scored, in the engine's
order of operations; TRL's own loss keeps its temperature-only log-probs.

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
import logging
import time
from typing import Any, Literal, cast

import torch
from trl import GRPOTrainer

import metactl
from metactl.distributed import assert_same_choice, gather_feedback, torch_collectives

from .checkpoint import META_STATE_NAME, MetaCheckpointMixin
from .fused import FusedLogitsCapture
from .guards import (
    check_continuous_batching,
    check_generation_settings,
    check_transformers_version,
    check_trl_version,
)
from .knobs import CandidateScoring, PolicyKnobs
from .patching import (
    FusedHead,
    find_trainer_heads,
    output_embeddings,
    policy_target,
    set_trainer_setting,
    set_trainer_temperature,
    trainer_knobs,
    trainer_temperatures,
)
from .per_prompt import (
    ROW_TEMPERATURE_KEY,
    Path,
    PerPromptMixin,
    _check_per_prompt_policy,
)
from .per_prompt import (
    _RowTemperatureProcessor as _RowTemperatureProcessor,  # re-exported: tests import it here
)
from .scoring import (
    DEFAULT_WINDOW_BYTES,
    HiddenCapture,
    LikelihoodResult,
    candidate_loglik_exact,
    candidate_loglik_from_hidden,
    completion_advantages,
    dense_head,
)

__all__ = ["META_STATE_NAME", "ROW_TEMPERATURE_KEY", "MetaGRPOTrainer"]

logger = logging.getLogger(__name__)


class MetaGRPOTrainer(PerPromptMixin, MetaCheckpointMixin, GRPOTrainer):
    """``GRPOTrainer`` whose rollout temperature (or ``top_p``, ``top_k``, ``min_p``, or a joint
    setting of them) is chosen per generation batch by ``meta_policy``.

    All ``GRPOTrainer`` arguments are accepted unchanged; for a knob the policy owns,
    ``GRPOConfig``'s value becomes the *evaluation* value (evaluation samples and scores at it and
    never updates the policy); knobs it does not own stay at the user's values and are held
    fixed when the candidates are scored (the README's guard matrix says which are accepted).

    Args:
        meta_policy: a :class:`metactl.MetaPolicy` over the temperature, ``top_p``, ``top_k``,
            ``min_p`` or a joint grid (default :func:`metactl.tampo`). Give every rank the same
            seed.
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
            ``value``, ``setting`` (``{knob: value}``), ``index``, ``probs`` (after the
            update), ``candidate_advantages``, ``likelihood_path``, ``reward`` (TRL's mean
            reward of the batch, all ranks); with a per-prompt policy ``value`` is the mean
            over the prompts and ``contexts``, ``values``, ``indices`` give each prompt's
            decision.
        eval_temperature: the temperature used during evaluation (``args.temperature``).
        eval_setting: the owned knobs' values during evaluation (``GRPOConfig``'s).
        meta_knobs: the knobs the policy owns, its family and candidate settings.
        meta_scoring: how the candidates are scored (family, fixed knobs, engine order).
        meta_seconds: wall time spent in the meta-policy work (selection, scoring, update).

    Logged metrics (``self._metrics``, so every TRL logger sees them): ``metactl/<knob>`` for
    every knob of the decision (``metactl/temperature``, ``metactl/top_p``, ...),
    ``metactl/decision_prob``, ``metactl/prob/<label>``, ``metactl/candidate_advantage/<label>``
    (``<label>``: the value, or ``temperature=0.7,top_p=0.9`` for a joint grid).
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
        knobs = PolicyKnobs.from_policy(policy)
        if "entropy" in policy.requires and knobs.knobs != ("temperature",):
            raise ValueError(
                f"meta_policy's rule needs the entropy at the chosen temperature, but the policy "
                f"sets {list(knobs.knobs)}; entropy controllers set the temperature only"
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
            _check_per_prompt_policy(policy, likelihood, meta_context_column, knobs.knobs)
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
        self.meta_knobs = knobs
        # the sampler setting of the buffered window ({knob: value}; None: none yet, per-prompt)
        self._meta_train_setting: dict[str, Any] | None = None
        self._meta_capture: HiddenCapture | FusedLogitsCapture | None = None
        self._meta_old_done = False
        self._meta_collectives: tuple[Any, Any] | None = None
        super().__init__(*args, **kwargs)

        config: Any = self.args
        self.eval_temperature = float(config.temperature)
        # the effective sampling settings: TRL's config fields, overridden by generation_kwargs
        # (as TRL merges them for transformers, and vLLM in colocate and server mode)
        settings: dict[str, Any] = {
            name: getattr(config, name, None)
            for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        }
        settings.update(getattr(self, "generation_kwargs", None) or {})
        settings.update(config.generation_kwargs or {})
        check_generation_settings(
            settings,
            generation_kwargs=config.generation_kwargs,
            needs_likelihood="loglik" in policy.requires,
            owned=knobs.knobs,
        )
        if getattr(self, "use_transformers_continuous_batching", False):
            check_continuous_batching(
                settings, owned=knobs.knobs, needs_likelihood="loglik" in policy.requires
            )
        self._meta_heads: list[FusedHead] = find_trainer_heads(self)
        #: the setting evaluation samples at: the values TRL holds from GRPOConfig (for a knob
        #: the policy owns besides the temperature, its off value: the guards require it)
        self.eval_setting: dict[str, Any] = {
            knob: self.eval_temperature if knob == "temperature" else getattr(self, knob)
            for knob in knobs.knobs
        }
        order = "vllm" if getattr(self, "use_vllm", False) else "hf"
        settings["temperature"] = self.eval_temperature
        self.meta_scoring: CandidateScoring = knobs.scoring(settings, order=order)
        if self.contextual:
            self._check_per_prompt_paths(settings)

    # ------------------------------------------------------------------ sampler plumbing
    def set_temperature(self, value: float) -> None:
        """Write ``value`` to every place TRL keeps the temperature (see :mod:`.patching`)."""
        set_trainer_temperature(self, value, self._meta_heads)

    def set_sampling(self, setting: dict[str, Any]) -> None:
        """Write every knob of ``setting`` (``{knob: value}``) where TRL keeps it."""
        set_trainer_setting(self, setting, self._meta_heads)

    def temperatures(self) -> dict[str, float]:
        """Every temperature the trainer currently holds, by place (they are always equal)."""
        return trainer_temperatures(self, self._meta_heads)

    def knob_values(self, knob: str) -> dict[str, Any]:
        """Every value of ``knob`` the trainer currently holds, by place (always equal)."""
        if knob == "temperature":
            return dict(self.temperatures())
        return trainer_knobs(self, knob)

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
            self.set_sampling(self.eval_setting)
            for knob, value in self.eval_setting.items():
                self._metrics["eval"][f"metactl/{knob}"].append(float(value or 0.0))
            return super()._generate_and_score_completions(inputs)
        if self.contextual:
            return self._generate_per_prompt(inputs)

        t0 = time.perf_counter()
        decision = self.meta_policy.select()
        if self.check_sync and self._multi_process:
            assert_same_choice(decision, self._collectives()[1])
        setting = self.meta_knobs.setting(decision.value)
        self.set_sampling(setting)
        self._meta_train_setting = setting
        requires = set(self.meta_policy.requires)
        needs_scoring = bool(requires & {"loglik", "entropy"})
        path = self._likelihood_path() if needs_scoring else None
        capture: HiddenCapture | FusedLogitsCapture | None = None
        if path in ("old", "generate"):
            capture = HiddenCapture(self._backbone(), path)
        elif path == "fused":
            capture = FusedLogitsCapture(
                self.meta_scoring,
                entropy_temperature=(
                    float(setting["temperature"]) if "entropy" in requires else None
                ),
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

    def _generate_single_turn(self, *args: Any, **kwargs: Any) -> Any:
        if self._meta_row_temperatures is not None:
            return self._generate_per_row(*args, **kwargs)
        return self._generate_single_turn_captured(*args, **kwargs)

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
        candidates = self.meta_scoring
        ent_t = (
            float(self.meta_knobs.setting(decision.value)["temperature"])
            if "entropy" in self.meta_policy.requires
            else None
        )
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
            feedback["advantages"] = completion_advantages(
                output, scored if "loglik" in feedback else None)
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
        setting = self.meta_knobs.setting(decision.value)
        for knob, value in setting.items():
            metrics[f"metactl/{knob}"].append(float(value))
        metrics["metactl/decision_prob"].append(decision.prob)
        labels = self.meta_knobs.labels()
        for label, prob in zip(labels, info.probs, strict=True):
            metrics[f"metactl/prob/{label}"].append(float(prob))
        adv = info.candidate_advantages
        rewards = metrics.get("reward")  # TRL's mean reward of this batch over all ranks
        if adv is not None:
            for label, a in zip(labels, adv, strict=True):
                metrics[f"metactl/candidate_advantage/{label}"].append(float(a))
        self.meta_history.append(
            {
                "policy_step": decision.step,
                "global_step": int(self.state.global_step),
                "value": decision.value,
                "setting": setting,
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
        # Evaluation generates *and* computes its loss at the evaluation setting; then the
        # training setting of the current (possibly half-consumed) buffered batch comes back.
        self.set_sampling(self.eval_setting)
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        finally:
            if self._meta_train_setting is not None:
                self.set_sampling(self._meta_train_setting)
