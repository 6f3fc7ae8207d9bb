"""``MetaPPOTrainer`` (``trainer.v1.trainer_mode=metactl``): verl's sync V1 trainer with the
rollout temperature chosen by a metactl meta-policy, per step or per prompt.

* **Select** when a training batch is submitted to the rollout (``_submit_batch_to_rollout``):
  one decision per step, or one per prompt (``select(contexts=...)`` with the
  ``metactl.context_key`` field), stamped on every prompt as :data:`TEMPERATURE_FIELD`; the
  ``metactl_single_turn`` agent loop samples with it and verl stores it with each trajectory.
* **Log-prob passes**: verl stamps ``extra_info["temperature"]`` from the config in five places
  (``trainer_base.py``: sampling, old log-prob, reference, values, actor update). The worker
  groups' entry points are wrapped so that the batch leaving the driver carries the chosen value
  (per step: the scalar, fused kernels allowed) or no scalar and a per-sample ``temperature``
  field of shape ``(bsz,)`` written to the TransferQueue (per prompt; the FSDP engine divides
  each row's logits by it; fused kernels are refused).
* **Temperature check** right after verl's old-log-prob pass (``_compute_old_log_prob``): each
  response token's log-probability and entropy at the stamped temperature (verl computes the
  entropy in that pass anyway) give :func:`metactl.effective_temperature.temperature_score`,
  logged as ``metactl/effective_temperature_z`` and ``_effect``, and checked with
  :func:`metactl.effective_temperature.check_temperature_score` in the mode of
  ``metactl.temperature_check`` (error by default): a rollout engine that sampled greedily or
  at another temperature than the chosen one stops the run at that step.
* **Candidate likelihoods** (rules that read ``loglik``), per ``metactl.candidate_likelihood``:
  ``fused`` (default): the old-log-prob pass's batch carries the candidate temperatures in its
  ``extra_info`` (:data:`.engine_hook.CANDIDATES_KEY`), and the FSDP engine, wrapped by
  :mod:`.engine_hook` in every worker, scores each trajectory's response tokens under every
  candidate from the raw logits it already holds and returns the ``(bsz, K)`` sums as the
  TransferQueue field :data:`.engine_hook.LOGLIK_FIELD`: no extra forward pass. ``passes``:
  one extra no-grad ``compute_log_prob`` per candidate temperature after the advantages (what
  runs where the fused path is refused: fused kernels, Megatron, sequence parallelism).
* **Feedback** right after verl's advantages (``_compute_advantage``): only what
  ``policy.spec.feedback`` names, from the batch: advantages, rewards (``rm_scores`` summed per
  trajectory), the entropy, ``group_size`` (``rollout.n``), and the candidate likelihoods
  (summed per trajectory), all turned into a :class:`metactl.Feedback` by
  :func:`metactl.build_feedback` (which reduces the likelihoods to the rule's mean or sum).
  ``meta_seconds`` measures it (the fused scoring runs inside verl's old-log-prob pass and is
  timed there).
* **Checks at construction**, before any worker group or rollout server starts: the policy
  against :data:`.config.TRAINER_SUPPORT` (:func:`metactl.check_trainer`), the rollout config
  against the rule (:func:`.config.check_rollout`: no ``top_p``/``top_k`` truncation for
  likelihood rules, ``rollout.n >= 2`` for rules comparing a prompt's completions) and against
  the temperature check (:func:`.config.check_temperature_check`), and the fused likelihoods
  against the engine (:func:`.config.check_candidate_likelihood`).
* **Checkpoint**: :data:`META_STATE_NAME` in every ``global_step_<n>/`` folder (the policy's
  state and ``meta_history``, the last :data:`META_HISTORY_LIMIT` steps), written atomically
  and durably before verl's ``latest_checkpointed_iteration.txt``, read and validated on
  resume.

The driver holds the only policy; every worker rank receives the same value with the batch.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import transfer_queue as tq
from tensordict import TensorDict
from verl.trainer.ppo.v1 import PPOTrainerSync, register_trainer
from verl.workers.utils.padding import response_from_nested

import metactl
from metactl.contexts import context_keys
from metactl.effective_temperature import (
    EffectiveTemperatureWarning,
    TemperatureScore,
    check_temperature_score,
    temperature_score,
)

from . import feedback as fb
from .config import (
    AGENT_LOOP_NAME,
    META_HISTORY_LIMIT,
    META_STATE_NAME,
    SAMPLED_TEMPERATURE_KEY,
    TEMPERATURE_FIELD,
    TRAINER_NAME,
    check_candidate_likelihood,
    check_rollout,
    check_temperature_check,
    policy_from_config,
    settings_from_config,
)
from .engine_hook import CANDIDATES_KEY, LOGLIK_FIELD
from .state import meta_state, read_meta_state, write_meta_state

__all__ = ["WRAPPED_METHODS", "MetaPPOTrainer"]

logger = logging.getLogger(__name__)

#: Worker-group methods that receive a batch whose ``extra_info["temperature"]`` verl stamped.
WRAPPED_METHODS = (
    "compute_log_prob",
    "compute_ref_log_prob",
    "update_actor",
    "infer_batch",
    "train_mini_batch",
)


@dataclass
class _Submission:
    """The decision(s) behind one submitted training batch, awaiting their feedback: one
    ``Decision`` per step, or the batch of per-prompt decisions."""

    decision: Any
    uids: list[str]
    temperatures: np.ndarray  # per prompt, in submission order


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "tolist"):
        return list(value.tolist())
    return list(value)


def _check_scored(result: Any) -> None:
    """Fail where a worker returned no :data:`LOGLIK_FIELD` for a pass that asked for it (the
    engine hook is installed when the worker imports verl with ``VERL_USE_EXTERNAL_MODULES``)."""
    fields = getattr(result, "fields", None)
    if fields is not None and LOGLIK_FIELD not in fields:
        raise RuntimeError(
            f"the old-log-prob pass returned no {LOGLIK_FIELD!r} (fields: {sorted(fields)}): the "
            "actor workers did not load metactl's engine hook. Pass "
            "VERL_USE_EXTERNAL_MODULES=metactl.adapters.verl.register to the workers (e.g. "
            "+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=...), or set "
            "+metactl.candidate_likelihood=passes"
        )


@register_trainer(TRAINER_NAME)
class MetaPPOTrainer(PPOTrainerSync):
    """``PPOTrainerSync`` whose rollout temperature is chosen by the ``metactl`` config group.

    Attributes:
        meta_policy: the driver's :class:`metactl.MetaPolicy`.
        meta_history: one entry per training step (``global_step``, ``policy_step``, the
            per-prompt ``temperatures``, the candidate ``probs`` after the update), the last
            :data:`META_HISTORY_LIMIT` steps only (a ``deque``, oldest dropped first); saved in
            every checkpoint and restored on resume.
        meta_seconds: cumulative seconds of metactl's work (selection, feedback, scoring).
    """

    def __init__(self, config: Any) -> None:
        group = config.get("metactl")
        self.meta_policy = policy_from_config(group)
        self.meta_settings = settings_from_config(group, self.meta_policy)
        self._check_supported(config)
        super().__init__(config)
        self.meta_history: deque[dict[str, Any]] = deque(maxlen=META_HISTORY_LIMIT)
        self.meta_seconds = 0.0
        # the submission whose batch is in flight (kept until the next one: the actor update
        # runs after the feedback) and whether its feedback is still due
        self._pending: _Submission | None = None
        self._awaiting_feedback = False
        self._step_temperature: float | None = None  # per step; None with a per-prompt policy
        self._original_methods: dict[tuple[int, str], Callable[..., Any]] = {}

    # ------------------------------------------------------------------ configuration checks
    def _check_supported(self, config: Any) -> None:
        rollout = config.actor_rollout_ref.rollout
        check_rollout(self.meta_policy, rollout)
        check_temperature_check(self.meta_settings, rollout, config.algorithm)
        check_candidate_likelihood(self.meta_settings, self.meta_policy, config)
        agent = rollout.get("agent", {}) or {}
        if agent.get("default_agent_loop") != AGENT_LOOP_NAME:
            raise ValueError(
                "MetaPPOTrainer samples through its own agent loop: set "
                f"actor_rollout_ref.rollout.agent.default_agent_loop={AGENT_LOOP_NAME} (got "
                f"{agent.get('default_agent_loop')!r})"
            )
        v1 = config.trainer.v1
        if v1.get(TRAINER_NAME, {}) and v1[TRAINER_NAME].get("parameter_sync_step", 1) != 1:
            raise ValueError(
                "MetaPPOTrainer makes one decision per step: parameter_sync_step must be 1"
            )
        filter_groups = config.algorithm.get("filter_groups", None)
        if filter_groups is not None and filter_groups.get("enable", False):
            raise ValueError(
                "algorithm.filter_groups (DAPO) refills prompts within a step, so one step's "
                "trajectories would come from several decisions; not supported by MetaPPOTrainer"
            )
        if v1.sampler.get("sync_refill_failed_groups", False):
            raise ValueError("trainer.v1.sampler.sync_refill_failed_groups is not supported")
        if self.meta_policy.spec.per_context and config.actor_rollout_ref.model.get(
            "use_fused_kernels"
        ):
            raise ValueError(
                "a per-prompt temperature needs a (bsz,) temperature tensor, which verl's fused "
                "kernels refuse: set actor_rollout_ref.model.use_fused_kernels=False"
            )

    def _build_replay_buffer(self) -> Any:
        # verl branches on ``trainer_mode == "sync"`` (the replay buffer, exact refills, the
        # TransferQueue in checkpoints); registered under its own name, this is the sync trainer
        self.trainer_mode = "sync"
        return super()._build_replay_buffer()

    # ------------------------------------------------------------------ setup and the wrappers
    def _setup(self) -> None:
        super()._setup()
        groups = {}
        for name in ("actor_rollout_wg", "ref_policy_wg", "critic_wg"):
            group = getattr(self, name, None)
            if group is not None:
                groups[id(group)] = group
        for group in groups.values():
            self.wrap_worker_group(group)

    def wrap_worker_group(self, group: Any) -> None:
        """Route every batch-taking entry point of ``group`` through :meth:`stamp_temperature`."""
        for name in WRAPPED_METHODS:
            method = getattr(group, name, None)
            if method is None or (id(group), name) in self._original_methods:
                continue
            self._original_methods[(id(group), name)] = method

            def wrapped(*args: Any, _method: Callable[..., Any] = method, **kwargs: Any) -> Any:
                scoring = False
                for arg in (*args, *kwargs.values()):
                    if hasattr(arg, "extra_info"):
                        self.stamp_temperature(arg)
                        scoring = scoring or CANDIDATES_KEY in arg.extra_info
                result = _method(*args, **kwargs)
                if scoring:
                    _check_scored(result)
                return result

            setattr(group, name, wrapped)

    def stamp_temperature(self, batch: Any) -> None:
        """Replace the config temperature verl stamped on ``batch.extra_info`` with the chosen
        one: the step's scalar, or (per prompt) no scalar, so that the per-sample
        ``temperature`` field written by :meth:`_write_row_temperatures` reaches the engine."""
        info = batch.extra_info
        if "temperature" not in info:
            return
        if self._pending is None:
            raise RuntimeError(
                "a log-prob pass ran with no meta-policy decision in flight; MetaPPOTrainer "
                "selects when a training batch is submitted"
            )
        if self.meta_policy.spec.per_context:
            del info["temperature"]
        else:
            info["temperature"] = self._step_temperature

    # ------------------------------------------------------------------ selection
    def _submit_batch_to_rollout(self, batch: TensorDict) -> int:
        self.begin_submission(batch)
        return super()._submit_batch_to_rollout(batch)

    def begin_submission(self, batch: TensorDict) -> None:
        """Select for a training batch about to be submitted and stamp each prompt's value as
        :data:`TEMPERATURE_FIELD` (float64, one per prompt)."""
        if self._awaiting_feedback:
            raise RuntimeError(
                "a second training batch was submitted before the first one's feedback; "
                "MetaPPOTrainer supports one submission per step"
            )
        t0 = time.perf_counter()
        uids = [str(u) for u in _as_list(batch["uid"])]
        decision: Any
        if self.meta_policy.spec.per_context:
            key = self.meta_settings.context_key
            assert key is not None
            if key not in batch.keys():
                raise KeyError(f"metactl.context_key {key!r} is not a field of the training batch")
            contexts = context_keys(_as_list(batch[key]), f"batch[{key!r}]")
            decision = self.meta_policy.select(contexts=list(contexts))
            temperatures = np.array(
                [float(d.setting["temperature"]) for d in decision], dtype=np.float64
            )
            self._step_temperature = None
        else:
            decision = self.meta_policy.select()
            value = float(decision.setting["temperature"])
            temperatures = np.full(len(uids), value)
            self._step_temperature = value
        batch[TEMPERATURE_FIELD] = torch.as_tensor(temperatures, dtype=torch.float64)
        self._pending = _Submission(decision, uids, temperatures)
        self._awaiting_feedback = True
        self.meta_seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ per-row temperatures
    def _balance_batch(self, batch: Any, metrics: Any, *args: Any, **kwargs: Any) -> Any:
        batch = super()._balance_batch(batch, metrics, *args, **kwargs)
        if self.meta_policy.spec.per_context:
            self._write_row_temperatures(batch)
        return batch

    def _write_row_temperatures(self, batch: Any) -> None:
        """Write each row's sampling temperature as the per-sample ``temperature`` field
        (float32, shape ``(bsz,)``), the layout verl's FSDP engine accepts."""
        data = tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id, select_fields=[TEMPERATURE_FIELD]
        )
        values = torch.as_tensor(data[TEMPERATURE_FIELD]).reshape(-1).to(torch.float32)
        if values.shape[0] != len(batch.keys):
            raise RuntimeError(f"{len(batch.keys)} rows but {values.shape[0]} temperatures")
        tq.kv_batch_put(
            keys=batch.keys,
            partition_id=batch.partition_id,
            fields=TensorDict({"temperature": values}, batch_size=len(batch.keys)),
        )

    # ------------------------------------------------------------------ temperature check
    @property
    def fused_likelihoods(self) -> bool:
        """Whether the candidates are scored inside verl's old-log-prob pass."""
        return (
            self.meta_policy.spec.needs_loglik
            and self.meta_settings.candidate_likelihood == "fused"
        )

    def _compute_old_log_prob(self, batch: Any, metrics: dict[str, Any]) -> Any:
        scored = batch if self.fused_likelihoods else None
        if scored is not None:  # this pass only: verl sends the same batch to the later passes
            scored.extra_info[CANDIDATES_KEY] = tuple(self.meta_policy.candidates.tolist())
        try:
            batch = super()._compute_old_log_prob(batch, metrics)
        finally:
            if scored is not None:
                scored.extra_info.pop(CANDIDATES_KEY, None)
        t0 = time.perf_counter()
        self.check_sampled_temperatures(batch, metrics)
        self.meta_seconds += time.perf_counter() - t0
        return batch

    def check_sampled_temperatures(
        self, batch: Any, metrics: dict[str, Any]
    ) -> TemperatureScore | None:
        """Test whether the batch's response tokens were sampled at the chosen temperatures,
        from the old-log-prob pass's ``old_log_probs`` and ``entropy`` (each row scored at its
        prompt's value); log ``metactl/effective_temperature_z``, ``_effect`` and ``_departed``
        (1.0 when the check failed) and act as ``metactl.temperature_check`` says. Returns the
        score (``None`` when the check is off or the batch has no response token).

        Raises:
            ValueError: in ``error`` mode, tokens that look drawn at another temperature (the
                message names the step, the chosen value and the statistics).
            RuntimeError: no decision in flight, or a row of a prompt this step did not submit.
        """
        mode = self.meta_settings.temperature_check
        if mode == "off":
            return None
        pending = self._pending
        if pending is None or not self._awaiting_feedback:
            raise RuntimeError("a log-prob pass ran with no meta-policy decision in flight")
        keys = self._real_rows(batch)
        fields = ["uid", "old_log_probs", "entropy", "response_mask"]
        raw = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=fields)
        uids = [str(u) for u in _as_list(raw.pop("uid"))]
        position = {uid: i for i, uid in enumerate(pending.uids)}
        if any(u not in position for u in uids):
            raise RuntimeError("the batch holds trajectories of a prompt this step did not submit")
        temperatures = pending.temperatures[[position[u] for u in uids]]
        data = raw.to_padded_tensor()
        if not bool(data["response_mask"].bool().any()):  # no response token: nothing to test
            return None
        score = temperature_score(
            data["old_log_probs"],
            data["entropy"],
            data["response_mask"],
            temperature=temperatures,
        )
        message = None
        thresholds: dict[str, Any] = dict(self.meta_settings.temperature_check_kwargs)
        try:
            check_temperature_score(score, **thresholds)
        except ValueError as error:
            message = (
                f"step {self.global_steps}: {error} [metactl.temperature_check={mode}; set it "
                "to warn or off to train on]"
            )
        metrics["metactl/effective_temperature_z"] = score.z
        metrics["metactl/effective_temperature_effect"] = score.effect
        metrics["metactl/effective_temperature_departed"] = float(message is not None)
        if message is not None:
            if mode == "error":
                raise ValueError(message)
            warnings.warn(message, EffectiveTemperatureWarning, stacklevel=2)
        return score

    # ------------------------------------------------------------------ feedback and update
    def _compute_advantage(self, batch: Any, metrics: dict[str, Any]) -> Any:
        batch = super()._compute_advantage(batch, metrics)
        t0 = time.perf_counter()
        self._update_policy(batch, metrics)
        self.meta_seconds += time.perf_counter() - t0
        metrics["metactl/seconds"] = self.meta_seconds
        return batch

    def _real_rows(self, batch: Any) -> list[str]:
        return [
            k
            for k, tag in zip(batch.keys, batch.tags, strict=True)
            if not tag.get("is_padding", False)
        ]

    def _update_policy(self, batch: Any, metrics: dict[str, Any]) -> None:
        pending = self._pending
        if pending is None or not self._awaiting_feedback:
            raise RuntimeError("advantages were computed with no meta-policy decision in flight")
        spec = self.meta_policy.spec
        needs = set(spec.feedback)
        keys = self._real_rows(batch)
        fields = ["uid", "response_mask", "extra_fields"]
        if "advantages" in needs:
            fields.append("advantages")
        if needs & {"rewards", "reward"}:
            fields.append("rm_scores")
        if "entropy" in needs:
            fields.append("entropy")
        if self.fused_likelihoods:
            fields.append(LOGLIK_FIELD)
        raw = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=fields)
        uids = [str(u) for u in _as_list(raw.pop("uid"))]
        extra = _as_list(raw.pop("extra_fields"))
        sampled = np.array([float(e.get(SAMPLED_TEMPERATURE_KEY, np.nan)) for e in extra])
        data = raw.to_padded_tensor()
        position = {uid: i for i, uid in enumerate(pending.uids)}
        if any(u not in position for u in uids):
            raise RuntimeError("the batch holds trajectories of a prompt this step did not submit")
        rows = np.array([position[u] for u in uids])
        expected = pending.temperatures[rows]
        if not np.array_equal(sampled, expected):
            raise RuntimeError(
                "trajectories were not sampled at the chosen temperatures (is the agent loop "
                f"{AGENT_LOOP_NAME}?): chosen {expected.tolist()}, sampled {sampled.tolist()}"
            )
        decision, selected = self._feedback_rows(pending, rows, spec)
        pick = torch.as_tensor(selected, dtype=torch.long)
        mask = data["response_mask"][pick]
        inputs: dict[str, Any] = {}
        if "advantages" in needs:
            inputs["advantages"] = fb.trajectory_advantages(data["advantages"][pick], mask)
        if needs & {"rewards", "reward"}:
            rewards = fb.trajectory_rewards(data["rm_scores"][pick], mask)
            if "rewards" in needs:
                inputs["rewards"] = rewards
            if "reward" in needs:  # the batch's mean reward (bandit rules)
                inputs["reward"] = float(rewards.mean())
        if "entropy" in needs:
            inputs["entropy_sum"], inputs["entropy_tokens"] = fb.entropy_totals(
                data["entropy"][pick], mask
            )
        if "vocab_size" in needs:
            inputs["vocab_size"] = int(self.tokenizer.vocab_size)
        if "group_size" in needs:
            inputs["group_size"] = int(self.config.actor_rollout_ref.rollout.n)
        if spec.needs_loglik and self.fused_likelihoods:
            inputs["loglik_sum"] = fb.candidate_loglik_rows(data[LOGLIK_FIELD][pick], mask)
            inputs["token_counts"] = fb.token_counts(mask)
        elif spec.needs_loglik:
            log_probs, scored_mask = self._candidate_log_probs(batch, keys)
            scored_mask = scored_mask[pick]
            inputs["loglik_sum"] = fb.candidate_loglik_sums(
                [lp[pick] for lp in log_probs], scored_mask
            )
            inputs["token_counts"] = fb.token_counts(scored_mask)
        feedback = metactl.build_feedback(spec, **inputs)
        info = self.meta_policy.update(decision, feedback)
        self._awaiting_feedback = False
        self._log(pending, info, metrics)

    def _feedback_rows(
        self, pending: _Submission, rows: np.ndarray, spec: metactl.FeedbackSpec
    ) -> tuple[Any, np.ndarray]:
        """The decision(s) to update and the batch rows of their feedback, in decision order
        (prompts in submission order, each prompt's trajectories together).

        Where rows are grouped per prompt (a per-prompt policy: ``rollout.n`` rows per decision;
        a rule that needs ``group_size``), only complete groups are kept: a group that verl's
        replay buffer evicted (failed requests) or sampled with another ``n`` is left out."""
        order = np.argsort(rows, kind="stable")
        if not (spec.per_context or "group_size" in spec.feedback):
            return pending.decision, order
        group = int(self.config.actor_rollout_ref.rollout.n)
        counts = np.bincount(rows, minlength=len(pending.uids))
        complete = np.flatnonzero(counts == group)
        if complete.size == 0:
            raise RuntimeError(
                f"no prompt of this step came back with all rollout.n = {group} trajectories "
                f"(trajectories per prompt: {counts.tolist()}): {self.meta_policy.rule.name} "
                "needs whole prompt groups"
            )
        selected = order[np.isin(rows[order], complete)]
        decision = pending.decision
        if spec.per_context and complete.size != len(pending.uids):
            decision = [decision[int(i)] for i in complete]
        return decision, selected

    def _candidate_log_probs(
        self, batch: Any, keys: list[str]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-token log-probs of the rows ``keys`` under every candidate temperature (one
        no-grad log-prob pass each, ``metactl.candidate_likelihood=passes``), right-padded
        ``(N, L)``, and their response mask."""
        original = self._original_methods[(id(self.actor_rollout_wg), "compute_log_prob")]
        log_probs = []
        mask = None
        for value in self.meta_policy.candidates.tolist():
            scoring = copy.copy(batch)
            scoring.extra_info = {
                "calculate_entropy": False,
                "compute_loss": False,
                "temperature": value,
            }
            original(scoring)
            data = tq.kv_batch_get(
                keys=keys,
                partition_id=batch.partition_id,
                select_fields=["log_probs", "response_mask"],
            )
            lp = response_from_nested(data.pop("log_probs"), data["response_mask"])
            padded = TensorDict(
                {"lp": lp, "mask": data["response_mask"]}, batch_size=len(keys)
            ).to_padded_tensor()
            log_probs.append(padded["lp"])
            mask = padded["mask"]
        assert mask is not None
        return log_probs, mask

    def _log(self, pending: _Submission, info: metactl.UpdateInfo, metrics: dict[str, Any]) -> None:
        temperatures = pending.temperatures
        metrics["metactl/temperature"] = float(temperatures.mean())
        metrics["metactl/temperature_min"] = float(temperatures.min())
        metrics["metactl/temperature_max"] = float(temperatures.max())
        for value, prob in zip(self.meta_policy.candidates, info.probs, strict=True):
            metrics[f"metactl/prob/{value:g}"] = float(prob)
        self.meta_history.append(
            {
                "global_step": int(self.global_steps),
                "policy_step": int(self.meta_policy.step),
                "temperatures": temperatures.tolist(),
                "probs": [float(p) for p in info.probs],
            }
        )
        print(f"metactl: step {self.global_steps} temperatures {temperatures.tolist()}", flush=True)

    # ------------------------------------------------------------------ checkpoints
    def _step_folder(self, step: int) -> str:
        root = self.config.trainer.default_local_dir
        if not os.path.isabs(root):
            root = os.path.join(os.getcwd(), root)
        return os.path.join(root, f"global_step_{step}")

    def meta_state_dict(self) -> dict[str, Any]:
        """The JSON-safe meta state: the policy's state and :attr:`meta_history`."""
        return meta_state(self.meta_policy, self.meta_history)

    def _save_checkpoint(self) -> None:
        # written before verl's tracker file, so a checkpoint verl resumes from always has it
        folder = self._step_folder(self.global_steps)
        os.makedirs(folder, exist_ok=True)
        write_meta_state(os.path.join(folder, META_STATE_NAME), self.meta_state_dict())
        super()._save_checkpoint()

    def _load_checkpoint(self) -> None:
        super()._load_checkpoint()
        if self.global_steps == 0:
            return
        if self.config.trainer.resume_mode == "resume_path":
            folder = self.config.trainer.resume_from_path
            if not os.path.isabs(folder):
                folder = os.path.join(os.getcwd(), folder)
        else:
            folder = self._step_folder(self.global_steps)
        self.load_meta_state(os.path.join(folder, META_STATE_NAME))

    def load_meta_state(self, path: str) -> None:
        """Read, validate and apply a :data:`META_STATE_NAME` (the policy's state and
        :attr:`meta_history`); any problem is a ``ValueError`` (``FileNotFoundError`` when
        missing) naming the file, and changes nothing."""
        policy, history = read_meta_state(path, self.meta_policy)
        self.meta_policy = policy
        self.meta_history = deque(history, maxlen=META_HISTORY_LIMIT)
        logger.info("metactl: meta-policy restored from %s (step %d)", path, policy.step)
