"""The training loop of the gym learner: :func:`train` runs a :class:`~.learner.TabularGRPO`
on ``TokenSearch`` with a meta-policy choosing the sampler setting of every step.

What ``meta`` needs is read from ``meta.spec`` (:class:`metactl.FeedbackSpec`) and checked
against what the learner gives (:data:`TRAINER_SUPPORT`, :func:`metactl.check_trainer`) before
anything is drawn.

One training step, cleanrl style:

1. ``d = meta.select()``; ``d.setting``: the sampler setting of this step (``{"temperature": T}``,
   ``{"top_p": 0.9}``, ``{"temperature": 0.8, "top_p": 0.95}``, ...). With a per-prompt policy
   (``meta.spec.per_context``: :class:`metactl.PTGS`, :class:`metactl.ContextualTAMPO`,
   :class:`metactl.LinearThompson` with ``feature_dim=0``),
   ``d = meta.select(contexts=task_ids)`` instead: one decision per task (the key is the task
   id). Either way :func:`metactl.group_settings` gives one setting per task, task ``i``'s rows
   sampled at the ``i``-th.
2. Roll out ``group_size`` answers for every task at its setting (vectorised sampling of the
   same dynamics as ``env.step``; rewards come from ``env.score``, the env's single definition).
3. GRPO advantages per task group: ``A = (r - mean) / (std + eps)``.
4. One policy-gradient step on ``-(1/N) sum_i A_i (1/L) sum_t log q_i(o_it | z_it)``, ``q_i``
   the distribution that sampled row ``i`` (``softmax(z / T_i)`` without truncation; Adam or
   SGD on the logit table).
5. Feedback for the meta-policy from the logits the rollout already has (no extra episodes):
   only what ``meta.requires`` asks for, among ``loglik`` (``metactl.likelihood.candidate_loglik``
   with ``meta.candidates`` and ``meta.family``, the fixed knobs at the learner's values;
   length-normalised, or summed per answer when ``meta.spec.loglik`` is ``"sum"``),
   ``advantages``, ``reward`` (batch mean), ``rewards`` (one per answer),
   ``group_size``, ``entropy`` (mean token entropy, each row at its own setting) and
   ``vocab_size``. The candidate likelihoods are over the candidate grid: they do not depend on
   the sampling setting. Rows are in decision order (task ``i`` owns rows
   ``i G .. (i + 1) G - 1``), as :mod:`metactl.contexts` asks; built into a
   :class:`metactl.Feedback` by :func:`metactl.build_feedback` (:meth:`TabularGRPO.feedback`).
6. ``meta.update(d, feedback)``.

The meta-policy may set any knob the learner's sampler applies (``temperature``, ``top_p``,
``top_k``, ``min_p``: one of them, or a joint grid, :func:`metactl.grid`); the knobs it does not
set stay at the learner's fixed values (:class:`~.learner.GRPOConfig`), which also score its
candidates (``candidate_loglik(..., meta.candidates, meta.family, **fixed)``). A policy that sets
no knob (``hyperparameter="generic"``) or needs per-context features is refused before anything
is drawn.

Example
-------
>>> import metactl
>>> from metactl.adapters.gym import TokenSearchEnv
>>> env = TokenSearchEnv(vocab_size=6, length=3, families=("shoulder",))
>>> joint = metactl.tampo(metactl.grid(temperature=[0.8, 1.2], top_p=[0.9, 1.0]), seed=0)
>>> log = train(joint, env, steps=4, seed=0)
>>> sorted(log.knobs), log.probs.shape
(['min_p', 'temperature', 'top_k', 'top_p'], (4, 4))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import metactl
from metactl.decision import group_settings
from metactl.diagnostics import signal_diagnostics, signal_options, stack_diagnostics
from metactl.feedback import FEEDBACK_NAMES, FeedbackSpec, TrainerSupport, check_trainer
from metactl.knobs import KNOBS

from .learner import GRPOConfig, Rollout, TabularGRPO

__all__ = [
    "TRAINER_SUPPORT",
    "StepRecord",
    "TrainLog",
    "check_policy",
    "group_advantages",
    "train",
]

#: What :func:`train` gives a rule (:class:`metactl.TrainerSupport`, checked by
#: :func:`metactl.check_trainer`): every feedback (candidate log-likelihoods length-normalised or
#: summed, advantages, rewards, the batch reward, the entropy at the sampling settings, the
#: vocabulary size, the group size), every knob of its sampler, decisions per task over any of
#: them (each row sampled at its own setting), and no context features.
TRAINER_SUPPORT = TrainerSupport(
    "the gym learner",
    feedback=FEEDBACK_NAMES,
    knobs=KNOBS,
    per_context=True,
    features=False,
)


def group_advantages(rewards: np.ndarray, group_size: int, eps: float = 1e-4) -> np.ndarray:
    """GRPO advantages: rewards standardised within consecutive groups of ``group_size``.

    ``A = (r - mean_group) / (std_group + eps)`` with the unbiased std (as TRL); a group whose
    rewards are all equal gets zero advantages.

    >>> group_advantages(np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), 3).round(3).tolist()
    [1.155, -0.577, -0.577, 0.0, 0.0, 0.0]
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if group_size < 2 or rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by group_size >= 2, "
            f"got shape {rewards.shape} and group_size={group_size}"
        )
    grouped = rewards.reshape(-1, group_size)
    centred = grouped - grouped.mean(axis=1, keepdims=True)
    std = grouped.std(axis=1, ddof=1, keepdims=True)
    return (centred / (std + eps)).reshape(-1)


@dataclass(frozen=True)
class StepRecord:
    """One step of :func:`train`, handed to its ``on_step`` callback (after both updates)."""

    step: int
    decision: Any
    batch: Rollout
    advantages: np.ndarray
    feedback: dict[str, Any]
    """The feedback the policy got, by name (the fields of its :class:`metactl.Feedback`
    that are set)."""
    info: Any
    learner: TabularGRPO


@dataclass
class TrainLog:
    """What :func:`train` records; ``steps`` rows unless noted.

    ``success``: exact eval success rate before every step and after the last (``steps + 1``);
    ``success_by_task``: the same per task (``steps + 1, num_tasks``); ``greedy``: fraction of
    tasks that greedy decoding solves (``steps + 1``, temperature-free); ``temperature``: the
    sampling temperature of each step (with a per-task policy: the mean over the tasks; the
    learner's fixed temperature for a policy that does not set it); ``task_temperature``: the
    value each task was sampled at (``steps, num_tasks``; every column equal for a global
    policy); ``knobs``: every sampler knob's value at each step, ``{knob: (steps,)}`` for
    ``temperature`` (equal to ``temperature``), ``top_p``, ``top_k`` (0: off) and ``min_p``
    (the mean over the tasks for a per-task policy); ``reward``: the batch mean reward;
    ``entropy``: mean token entropy at the sampling settings; ``probs``: the meta-policy's
    probabilities after each update (``steps, K``; a per-task policy's global probabilities).
    ``signal``: for a likelihood rule (one that asks for ``loglik`` and ``advantages``, e.g.
    TAMPO) over one knob, the per-step diagnostics of its signal
    (:func:`metactl.diagnostics.stack_diagnostics` of every step's
    :func:`metactl.diagnostics.signal_diagnostics`, computed from the feedback the rule got,
    over the values of its knob); None for other rules and for joint grids (the diagnostics
    rank candidates by their value, which a joint candidate does not have).
    """

    success: np.ndarray
    success_by_task: np.ndarray
    greedy: np.ndarray
    temperature: np.ndarray
    reward: np.ndarray
    entropy: np.ndarray
    probs: np.ndarray
    families: tuple[str, ...] = field(default_factory=tuple)
    task_temperature: np.ndarray | None = None
    signal: dict[str, np.ndarray] | None = None
    knobs: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def auc(self) -> float:
        """Area under the learning curve: mean of ``success`` over the ``steps + 1`` evaluations."""
        s = self.success  # trapezoid rule on a unit grid (np.trapezoid needs numpy >= 2)
        return float((s[:-1] + s[1:]).sum() / 2.0 / (s.shape[0] - 1))

    @property
    def final_success(self) -> float:
        """The success rate after the last step."""
        return float(self.success[-1])


def check_policy(meta: Any) -> FeedbackSpec:
    """``meta``'s trainer contract (``meta.spec``), refused unless the learner can feed and
    sample it (:data:`TRAINER_SUPPORT`).

    Raises:
        TypeError: ``meta`` is not a ``metactl.MetaPolicy``.
        ValueError: a policy the learner cannot sample or feed (:func:`metactl.check_trainer`:
            one that sets no knob, ``"generic"``, or needs context features).
    """
    if not isinstance(meta, metactl.MetaPolicy):
        raise TypeError(f"meta must be a metactl.MetaPolicy, got {type(meta).__name__}")
    check_trainer(meta, TRAINER_SUPPORT)
    return meta.spec


def train(
    meta: Any,
    env: Any,
    steps: int,
    config: GRPOConfig | None = None,
    seed: int = 0,
    on_step: Callable[[StepRecord], None] | None = None,
) -> TrainLog:
    """Train a :class:`TabularGRPO` on ``env`` for ``steps`` steps; ``meta`` picks the sampler
    setting (``decision.setting``) of every step.

    A global ``meta`` picks one setting per step; a per-prompt one (``meta.spec.per_context``)
    picks one per task, keyed by the task id (``meta.select(contexts=[0, 1, ...])``), and its
    update gets every row's feedback in task order.

    Args:
        meta: a ``metactl.MetaPolicy`` (any rule or controller, global or per-prompt) over
            ``temperature``, ``top_p``, ``top_k``, ``min_p`` or a joint grid of them.
        env: a :class:`TokenSearchEnv` or a wrapper around one (e.g. ``gym.make(...)``).
        steps: number of GRPO steps (one meta decision each).
        config: learner hyperparameters, with the fixed values of the knobs ``meta`` does not
            set.
        seed: seeds the rollout sampler (the meta-policy has its own seed).
        on_step: called after every step with a :class:`StepRecord` (for logging or checks).

    Returns:
        A :class:`TrainLog`.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    spec = check_policy(meta)  # before anything is drawn
    knobs = spec.knobs
    learner = TabularGRPO(env, config)
    group = learner.config.group_size
    defaults = learner.config.fixed_knobs()
    # the knobs the policy does not set: they sampled the batch and score the candidates
    fixed = {knob: defaults[knob] for knob in KNOBS if knob not in knobs}
    family = meta.family
    rng = np.random.default_rng(seed)
    k = len(meta.candidates)
    num_tasks = learner.env.num_tasks
    success = np.empty(steps + 1)
    by_task = np.empty((steps + 1, num_tasks))
    greedy = np.empty(steps + 1)
    reward = np.empty(steps)
    entropy = np.empty(steps)
    probs = np.empty((steps, k))
    knob_log = {knob: np.empty(steps) for knob in KNOBS}
    # a likelihood rule's signal diagnostics, from the (N, K) likelihoods it already receives
    # (over one knob's values: a joint grid's candidates have no single value to rank)
    diagnose = {"loglik", "advantages"} <= set(spec.feedback) and family != "joint"
    options = signal_options(meta.rule)
    signal_records: list[dict[str, Any]] = []
    task_temperature = np.empty((steps, num_tasks))
    # the task ids are the contexts of a per-prompt policy; rows come in task order, G per
    # task (decision order)
    task_ids = list(range(num_tasks)) if spec.per_context else None
    for step in range(steps):
        by_task[step] = learner.success_by_task()
        success[step] = by_task[step].mean()
        greedy[step] = learner.greedy_success_by_task().mean()

        decision = meta.select(contexts=task_ids)
        # every knob per task (for the log) and per row (for the sampler): one setting per task,
        # whatever the policy; one decision for the batch gives the sampler each knob as one
        # value (its fast path), per-task decisions give every row its task's value
        settings = group_settings(decision, num_tasks)
        per_task: dict[str, np.ndarray] = {}
        rows: dict[str, Any] = {}
        for knob in knobs:
            per_task[knob] = np.asarray([s[knob] for s in settings])
            rows[knob] = np.repeat(per_task[knob], group) if spec.per_context else settings[0][knob]
        for knob, value in fixed.items():
            per_task[knob] = np.full(num_tasks, 0 if value is None else value)
            rows[knob] = value
        batch = learner.rollout(
            rows["temperature"], rng, top_p=rows["top_p"], top_k=rows["top_k"], min_p=rows["min_p"]
        )
        advantages = group_advantages(batch.rewards, group, learner.config.adv_eps)
        learner.update(batch, advantages)
        feedback = learner.feedback(
            spec, batch, advantages, meta.candidates, family=family, fixed=fixed
        )
        info = meta.update(decision, feedback)
        if diagnose:
            signal_records.append(
                signal_diagnostics(
                    feedback.loglik,
                    feedback.advantages,
                    meta.candidates,
                    rows[family],  # the value of the policy's knob that sampled each row
                    group,
                    **options,
                )
            )
        if on_step is not None:
            given = {name: getattr(feedback, name) for name in feedback.given()}
            on_step(StepRecord(step, decision, batch, advantages, given, info, learner))

        for knob in KNOBS:
            # a global step logs its value itself (a mean of equal floats may round)
            value = rows[knob] if not isinstance(rows[knob], np.ndarray) else per_task[knob].mean()
            knob_log[knob][step] = 0.0 if value is None else float(value)
        task_temperature[step] = per_task["temperature"]
        reward[step] = batch.rewards.mean()
        entropy[step] = learner.entropy(batch)
        probs[step] = info.probs
    by_task[steps] = learner.success_by_task()
    success[steps] = by_task[steps].mean()
    greedy[steps] = learner.greedy_success_by_task().mean()
    return TrainLog(
        success=success,
        success_by_task=by_task,
        greedy=greedy,
        temperature=knob_log["temperature"].copy(),
        reward=reward,
        entropy=entropy,
        probs=probs,
        families=learner.env.families,
        task_temperature=task_temperature,
        signal=stack_diagnostics(signal_records) if signal_records else None,
        knobs=knob_log,
    )
