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
   Every :attr:`~.learner.GRPOConfig.temperature_check_window` steps, the rollouts of those
   steps are checked (:func:`check_rollouts`: the temperature their tokens came from, estimated
   from their own logits, :mod:`metactl.effective_temperature`, against the settings that
   were chosen; a few rows of each, :func:`check_rows`): a departure raises
   (``temperature_check="error"``), warns (``"warn"``) or is not looked for (``"off"``);
   :attr:`TrainLog.temperature_checks` holds the estimates.
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

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import metactl
from metactl.decision import group_settings
from metactl.diagnostics import signal_diagnostics, signal_options, stack_diagnostics
from metactl.effective_temperature import (
    DEFAULT_OUTSIDE,
    EffectiveTemperatureWarning,
    TemperatureEstimate,
    check_effective_temperature,
    effective_temperature,
)
from metactl.feedback import FEEDBACK_NAMES, FeedbackSpec, TrainerSupport, check_trainer
from metactl.knobs import KNOBS, SettingRows

from .learner import GRPOConfig, Rollout, TabularGRPO

__all__ = [
    "TRAINER_SUPPORT",
    "StepRecord",
    "TemperatureCheck",
    "TrainLog",
    "check_policy",
    "check_rollouts",
    "check_rows",
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


@dataclass(frozen=True)
class TemperatureCheck:
    """One effective-temperature check of :func:`train`: the rollouts of steps
    ``first_step .. last_step`` (both included) pooled into one estimate
    (:func:`check_rollouts`).

    ``estimate.ratio`` is the common factor by which every row's temperature was off (1 when
    the sampler applied the chosen settings); ``estimate.temperature`` is that factor times the
    rows' (geometric mean) chosen temperature; ``passed`` is the check's verdict.
    """

    first_step: int
    last_step: int
    estimate: TemperatureEstimate
    passed: bool


def _outside_share(tokens: int, epsilon: float) -> float:
    """The largest share of sampled tokens outside their kept sets that the gym's own sampler
    explains: it samples the smoothed ``(1 - eps) p|S + eps p``, so a token falls outside with
    probability below ``eps``; the count's Bernstein bound at a false-alarm rate of 1e-6
    (never below the check's default share)."""
    mean = epsilon * tokens
    slack = (9.2 + math.sqrt(84.6 + 110.4 * mean)) / 2.0  # t^2 = 2 ln(1e6) (mean + t / 3)
    return min(1.0, max(DEFAULT_OUTSIDE, (mean + slack) / tokens))


def _knob_columns(batch: Rollout, rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """The temperature, top-p, top-k and min-p that sampled ``rows`` of ``batch``."""
    temps = batch.row_temperatures()[rows]
    if batch.truncation is None:
        n = temps.shape[0]
        return temps, np.ones(n), np.zeros(n, dtype=np.int64), np.zeros(n)
    cut = batch.truncation.settings
    return temps, cut.top_p[rows], cut.top_k[rows], cut.min_p[rows]


def check_rows(n_rows: int, max_rows: int) -> np.ndarray:
    """The rows of every rollout that :func:`train`'s check reads: ``max_rows`` rows spread
    evenly over the batch (row ``floor(i N / max_rows)``; every task is represented when
    ``max_rows`` is a multiple of the number of tasks), every row when ``max_rows`` is 0 or at
    least ``n_rows``. Fixed before sampling, so the estimate's statistics stay valid.

    >>> check_rows(48, 6).tolist(), check_rows(4, 0).tolist()
    ([0, 8, 16, 24, 32, 40], [0, 1, 2, 3])
    """
    if max_rows == 0 or max_rows >= n_rows:
        return np.arange(n_rows)
    return (np.arange(max_rows) * n_rows) // max_rows


def check_rollouts(batches: Sequence[Rollout], *, rows: np.ndarray | None = None,
                   first_step: int = 0, mode: str = "error",
                   epsilon: float = 1e-3) -> TemperatureCheck:
    """The temperature ``batches`` (the rollouts of consecutive steps from ``first_step``) were
    sampled at, estimated from their own logits and checked against the settings that were
    meant to sample them (each row's temperature and truncation):
    :func:`metactl.effective_temperature` over the pooled rows (``rows`` of each batch, e.g.
    :func:`check_rows`; default all), then
    :func:`metactl.check_effective_temperature` at its calibrated tolerance, allowing the share
    of tokens outside the kept sets that the sampler's smoothing ``epsilon`` explains
    (:attr:`GRPOConfig.truncation_epsilon`).

    A departure raises ``ValueError`` (``mode="error"``) or warns
    (:class:`metactl.effective_temperature.EffectiveTemperatureWarning`, ``"warn"``), the
    message naming the steps and both temperatures; ``"off"`` only returns the verdict. Reads
    the batches only and draws nothing.

    >>> from metactl.adapters.gym import TokenSearchEnv
    >>> learner = TabularGRPO(TokenSearchEnv(vocab_size=6, length=3), GRPOConfig())
    >>> batches = [learner.rollout(0.8, np.random.default_rng(s)) for s in range(3)]
    >>> check = check_rollouts(batches, first_step=10)
    >>> check.first_step, check.last_step, check.passed, check.estimate.tokens
    (10, 12, True, 432)
    """
    if mode not in ("error", "warn", "off"):
        raise ValueError(f"mode must be 'error', 'warn' or 'off', got {mode!r}")
    if isinstance(first_step, bool) or not isinstance(first_step, (int, np.integer)):
        raise TypeError(f"first_step must be an int, got {type(first_step).__name__}")
    if not batches:
        raise ValueError("batches must hold at least one Rollout")
    for b in batches:
        if not isinstance(b, Rollout):
            raise TypeError(f"batches must hold Rollouts, got {type(b).__name__}")
    pick = np.arange(batches[0].tokens.shape[0]) if rows is None else np.asarray(rows)
    logits = np.concatenate([b.logits[pick] for b in batches])
    tokens = np.concatenate([b.tokens[pick] for b in batches])
    pooled = SettingRows(*(np.concatenate(column) for column in
                           zip(*(_knob_columns(b, pick) for b in batches), strict=True)))
    est = effective_temperature(logits, tokens, temperature=pooled, order="hf")
    last_step = int(first_step) + len(batches) - 1
    try:
        passed = check_effective_temperature(est, mode="error",
                                             max_outside=_outside_share(est.tokens, epsilon))
    except ValueError as exc:
        span = f"step {last_step}" if last_step == first_step else \
            f"steps {first_step}-{last_step}"
        message = (f"gym learner, {span}: {exc} (GRPOConfig.temperature_check={mode!r}; "
                   "'warn' warns and goes on)")
        if mode == "error":
            raise ValueError(message) from None
        if mode == "warn":
            warnings.warn(message, EffectiveTemperatureWarning, stacklevel=2)
        passed = False
    return TemperatureCheck(int(first_step), last_step, est, passed)


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
    ``temperature_checks``: the effective-temperature checks of the rollouts, one per window
    of :attr:`~.learner.GRPOConfig.temperature_check_window` steps (:class:`TemperatureCheck`;
    empty when the check is off).
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
    temperature_checks: tuple[TemperatureCheck, ...] = ()

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
    # the effective-temperature check, over windows of rollouts (before any learns from them)
    check_mode = learner.config.temperature_check
    window = learner.config.temperature_check_window
    check_subsample = check_rows(learner.num_rows, learner.config.temperature_check_rows)
    pending: list[Rollout] = []
    checks: list[TemperatureCheck] = []
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
        if check_mode != "off":
            pending.append(batch)
            if len(pending) == window or step == steps - 1:
                checks.append(check_rollouts(pending, rows=check_subsample,
                                             first_step=step + 1 - len(pending),
                                             mode=check_mode,
                                             epsilon=learner.config.truncation_epsilon))
                pending = []
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
        temperature_checks=tuple(checks),
    )
