"""A small GRPO learner for ``TokenSearchEnv``, its temperature chosen by a ``MetaPolicy``.

The policy is a tabular softmax over the next token for every state ``(task, position, previous
token)`` (a bigram "language model" per task), initialised from the environment's
``prior_logits``. One training step, cleanrl style (see :func:`train`):

1. ``d = meta.select()``; ``T = d.value``: the one temperature of this step. With a per-prompt
   policy (``meta.contextual``: :class:`metactl.PTGS`, :class:`metactl.ContextualTAMPO`,
   :class:`metactl.LinearThompson`), ``d = meta.select(contexts=task_ids)`` instead: one
   decision per task (the key is the task id), task ``i``'s rows at ``d.values[i]``.
2. Roll out ``group_size`` answers for every task at its temperature (vectorised sampling of the
   same dynamics as ``env.step``; rewards come from ``env.score``, the env's single definition).
3. GRPO advantages per task group: ``A = (r - mean) / (std + eps)``.
4. One policy-gradient step on ``-(1/N) sum_i A_i (1/L) sum_t log softmax(z_it / T_i)[o_it]``,
   with the log-probs of every row at the temperature ``T_i`` that sampled it (Adam or SGD on
   the logit table).
5. Feedback for the meta-policy from the logits the rollout already has (no extra episodes):
   only what ``meta.requires`` asks for, among ``loglik`` (``metactl.likelihood.candidate_loglik``,
   length-normalised, or summed per answer when the rule's ``likelihood_normalization`` is
   ``"sum"``), ``advantages``, ``reward`` (batch mean), ``rewards`` (one per answer),
   ``group_size``, ``entropy`` (mean token entropy, each row at its ``T_i``) and ``vocab_size``.
   The candidate likelihoods are over the candidate grid: they do not depend on the sampling
   temperature. Rows are in decision order (task ``i`` owns rows ``i G .. (i + 1) G - 1``), as
   :mod:`metactl.contexts` asks.
6. ``meta.update(d, **feedback)``.

Evaluation is exact (no sampling noise): the success rate of the learned policy at
``eval_temperature`` is ``mean_task prod_t softmax(z[task, t, target_{t-1}] / T_eval)[target_t]``.

Example
-------
>>> import metactl
>>> from metactl.adapters.gym import TokenSearchEnv
>>> from metactl.adapters.gym.learner import GRPOConfig, train
>>> env = TokenSearchEnv(vocab_size=6, length=3, families=("shoulder",))
>>> log = train(metactl.MetaPolicy([0.8, 1.2], metactl.Fixed(1.2)), env, steps=5, seed=0)
>>> log.success.shape, log.temperature.tolist()
((6,), [1.2, 1.2, 1.2, 1.2, 1.2])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from metactl.diagnostics import signal_diagnostics, stack_diagnostics

from .env import TokenSearchEnv

__all__ = [
    "GRPOConfig",
    "Rollout",
    "StepRecord",
    "TabularGRPO",
    "TrainLog",
    "group_advantages",
    "log_softmax",
    "train",
]


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable ``log softmax`` along ``axis``.

    >>> np.round(np.exp(log_softmax(np.array([0.0, np.log(3.0)]))), 3).tolist()
    [0.25, 0.75]
    """
    shifted = z - z.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


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
class GRPOConfig:
    """Hyperparameters of :class:`TabularGRPO` (validated on construction).

    Example
    -------
    >>> GRPOConfig(group_size=4).group_size
    4
    >>> GRPOConfig(lr=-1.0)
    Traceback (most recent call last):
    ...
    ValueError: lr must be a finite float > 0, got -1.0
    """

    group_size: int = 8
    """Answers sampled per task and step (the GRPO group, G >= 2)."""
    lr: float = 0.1
    """Learning rate on the logit table."""
    optimizer: Literal["adam", "sgd"] = "adam"
    """``"adam"`` (as LLM RL trainers) or plain ``"sgd"``."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's moment decay rates."""
    adam_eps: float = 1e-8
    """Adam's denominator epsilon."""
    adv_eps: float = 1e-4
    """Epsilon added to the group std of the advantages (TRL's value)."""
    eval_temperature: float = 1.0
    """Temperature at which the learned policy's success rate is evaluated."""

    def __post_init__(self) -> None:
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, (int, np.integer)):
            raise TypeError(f"group_size must be an int, got {type(self.group_size).__name__}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {self.group_size}")
        for name in ("lr", "adam_eps", "adv_eps", "eval_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
                raise TypeError(f"{name} must be a float, got {type(value).__name__}")
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite float > 0, got {value}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two floats in [0, 1), got {self.betas}")


@dataclass(frozen=True)
class Rollout:
    """One batch of complete answers, grouped by task (``group_size`` consecutive rows per task).

    ``tasks (N,)``, ``states (N, L)`` (the previous token, ``V`` = begin), ``tokens (N, L)``,
    ``logits (N, L, V)`` raw (un-tempered) logits that predicted each token, ``rewards (N,)``,
    and the ``temperature`` that sampled them: a float (one for the whole batch), or an
    ``(N,)`` array, row ``i`` sampled at ``temperature[i]`` (a temperature per task).
    """

    tasks: np.ndarray
    states: np.ndarray
    tokens: np.ndarray
    logits: np.ndarray
    rewards: np.ndarray
    temperature: float | np.ndarray

    def row_temperatures(self) -> np.ndarray:
        """``(N,)``: the temperature of every row."""
        if isinstance(self.temperature, np.ndarray):
            return self.temperature.copy()
        return np.full(self.tasks.shape[0], self.temperature)


def _divisor(temperature: float | np.ndarray, ndim: int) -> float | np.ndarray:
    """What to divide ``(N, ...)`` logits of ``ndim`` dimensions by: the float itself (the global
    path, unchanged), or the per-row temperatures shaped ``(N, 1, ...)`` to broadcast."""
    if isinstance(temperature, np.ndarray):
        return temperature.reshape((-1,) + (1,) * (ndim - 1))
    return temperature


def _check_temperature(temperature: Any, n: int) -> float | np.ndarray:
    """A float > 0, or a finite ``(n,)`` array of temperatures > 0 (one per row)."""
    if isinstance(temperature, (list, tuple, np.ndarray)):
        temps = np.asarray(temperature, dtype=np.float64)
        if temps.shape != (n,):
            raise ValueError(
                f"temperature must be a float or one per row, shape ({n},), got {temps.shape}"
            )
        if not np.all(np.isfinite(temps)) or np.any(temps <= 0):
            raise ValueError("temperature must hold finite values > 0 (one per row)")
        return temps
    if isinstance(temperature, bool) or not isinstance(
        temperature, (int, float, np.integer, np.floating)
    ):
        raise TypeError(
            f"temperature must be a float or an array, got {type(temperature).__name__}"
        )
    value = float(temperature)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {value}")
    return value


class TabularGRPO:
    """Tabular softmax policy ``z[task, t, prev, :]`` trained by GRPO at a chosen temperature.

    Args:
        env: the environment (its unwrapped :class:`TokenSearchEnv` is used for the prior, the
            task set and the rewards).
        config: the learner's hyperparameters.

    Example
    -------
    >>> from metactl.adapters.gym import TokenSearchEnv
    >>> learner = TabularGRPO(TokenSearchEnv(vocab_size=6, length=3), GRPOConfig(group_size=4))
    >>> batch = learner.rollout(1.0, np.random.default_rng(0))
    >>> batch.tokens.shape, batch.logits.shape
    ((24, 3), (24, 3, 6))
    """

    def __init__(self, env: Any, config: GRPOConfig | None = None) -> None:
        base = getattr(env, "unwrapped", env)
        if not isinstance(base, TokenSearchEnv):
            raise TypeError(
                f"env must be a TokenSearchEnv (or wrap one), got {type(base).__name__}"
            )
        self.env: TokenSearchEnv = base
        self.config = config if config is not None else GRPOConfig()
        n, length, v = base.num_tasks, base.config.length, base.config.vocab_size
        self.vocab_size = v
        self.length = length
        self.logits = np.stack([base.prior_logits(i) for i in range(n)])  # (n, L, V+1, V)
        self._m = np.zeros_like(self.logits)
        self._v = np.zeros_like(self.logits)
        self._updates = 0
        group = self.config.group_size
        self._tasks = np.repeat(np.arange(n), group)
        self._positions = np.arange(length)

    # ------------------------------------------------------------------ rollouts
    @property
    def num_rows(self) -> int:
        """Answers per rollout: ``num_tasks * group_size`` (task ``i`` owns rows ``i G ..``)."""
        return int(self._tasks.shape[0])

    def rollout(self, temperature: float | np.ndarray, rng: np.random.Generator) -> Rollout:
        """Sample ``group_size`` answers per task at ``temperature``; score them with the env.

        ``temperature``: a float for the whole batch, or ``(N,)`` per-row temperatures
        (:attr:`num_rows`; e.g. ``np.repeat(per_task, group_size)``).
        """
        tasks = self._tasks
        n = tasks.shape[0]
        temperature = _check_temperature(temperature, n)
        divisor = _divisor(temperature, 2)
        states = np.empty((n, self.length), dtype=np.int64)
        tokens = np.empty((n, self.length), dtype=np.int64)
        logits = np.empty((n, self.length, self.vocab_size))
        prev = np.full(n, self.vocab_size, dtype=np.int64)
        uniforms = rng.random((n, self.length))
        for t in range(self.length):
            z = self.logits[tasks, t, prev]
            probs = np.exp(log_softmax(z / divisor))
            cdf = np.cumsum(probs, axis=1)
            token = (uniforms[:, t, None] > cdf[:, :-1]).sum(axis=1)  # inverse-CDF sampling
            states[:, t], tokens[:, t], logits[:, t] = prev, token, z
            prev = token
        rewards = self.env.score(tasks, tokens)
        return Rollout(tasks, states, tokens, logits, rewards, temperature)

    # ------------------------------------------------------------------ learning
    def token_logprobs(
        self, batch: Rollout, temperature: float | np.ndarray | None = None
    ) -> np.ndarray:
        """``(N, L)`` log-probs of the sampled tokens at ``temperature`` (a float or one per
        row; default: the batch's own, each row at the temperature that sampled it)."""
        n = batch.tokens.shape[0]
        temp = batch.temperature if temperature is None else _check_temperature(temperature, n)
        logp = log_softmax(batch.logits / _divisor(temp, 3))
        return np.take_along_axis(logp, batch.tokens[..., None], axis=-1)[..., 0]

    def gradient(self, batch: Rollout, advantages: np.ndarray) -> tuple[float, np.ndarray]:
        """GRPO loss of ``batch`` at its own temperature and its gradient w.r.t. the logit table.

        Uses the current table at the batch's states, so repeated passes over a batch see the
        updated policy (the first pass equals the rollout's own logits).

        Loss: ``-(1/N) sum_i A_i (1/L) sum_t log softmax(z_it / T_i)[o_it]``, ``T_i`` the
        temperature that sampled row ``i`` (on-policy: the importance ratio is 1; no KL term).
        Returns ``(loss, grad)``, ``grad`` shaped like :attr:`logits`.
        """
        advantages = np.asarray(advantages, dtype=np.float64)
        n = batch.tokens.shape[0]
        if advantages.shape != (n,):
            raise ValueError(f"advantages must have shape ({n},), got {advantages.shape}")
        temp = _divisor(batch.temperature, 3)  # (N, 1, 1) per-row, or the batch's float
        # the current table (equal to batch.logits for the on-policy step; fresher after a step)
        z = self.logits[batch.tasks[:, None], self._positions[None, :], batch.states]
        logp = log_softmax(z / temp)  # (N, L, V)
        index = batch.tokens[..., None]
        taken = np.take_along_axis(logp, index, axis=-1)[..., 0]
        loss = float(-(advantages[:, None] * taken).mean())
        # d loss / d z_it = -(A_i / (N L)) (onehot(o_it) - softmax(z_it / T_i)) / T_i
        rows = np.exp(logp)
        np.put_along_axis(rows, index, np.take_along_axis(rows, index, axis=-1) - 1.0, axis=-1)
        # batch.temperature: the float, or (N,) per row: one expression for both
        rows *= (advantages / (n * self.length * batch.temperature))[:, None, None]
        grad = np.zeros_like(self.logits)
        np.add.at(grad, (batch.tasks[:, None], self._positions[None, :], batch.states), rows)
        return loss, grad

    def update(self, batch: Rollout, advantages: np.ndarray) -> float:
        """One optimiser step on :meth:`gradient`; returns the loss before the step."""
        loss, grad = self.gradient(batch, advantages)
        self._apply(grad)
        return loss

    def _apply(self, grad: np.ndarray) -> None:
        cfg = self.config
        self._updates += 1
        if cfg.optimizer == "sgd":
            self.logits -= cfg.lr * grad
            return
        b1, b2 = cfg.betas
        self._m = b1 * self._m + (1 - b1) * grad
        self._v = b2 * self._v + (1 - b2) * grad * grad
        m_hat = self._m / (1 - b1**self._updates)
        v_hat = self._v / (1 - b2**self._updates)
        self.logits -= cfg.lr * m_hat / (np.sqrt(v_hat) + cfg.adam_eps)

    # ------------------------------------------------------------------ meta feedback
    def feedback(
        self,
        requires: Sequence[str],
        batch: Rollout,
        advantages: np.ndarray,
        candidates: np.ndarray,
        *,
        likelihood_normalization: str = "mean",
    ) -> dict[str, Any]:
        """The feedback a meta-policy asks for (``requires``), from the rollout's own logits.

        ``loglik``: ``(N, K)`` log-likelihood of every answer under every candidate temperature
        (``metactl.likelihood.candidate_loglik``; every position counts, as all answers have
        length L): length-normalised when ``likelihood_normalization="mean"`` (TAMPO's paper
        form), the sum over the answer's L tokens when ``"sum"`` (the probability of the whole
        answer, e.g. for :class:`metactl.Counterfactual`'s importance weights); pass the rule's
        own ``likelihood_normalization`` attribute (:func:`train` does). ``advantages``: the GRPO
        advantages. ``reward``: the batch's mean reward. ``rewards``: ``(N,)`` one reward per
        answer, rows in the order of ``loglik``. ``group_size``: answers per task (the groups
        are consecutive rows). ``entropy``: mean token entropy (nats), every row at the
        temperature that sampled it. ``vocab_size``: V.
        """
        if likelihood_normalization not in ("mean", "sum"):
            raise ValueError(
                "likelihood_normalization must be 'mean' or 'sum', got "
                f"{likelihood_normalization!r}"
            )
        out: dict[str, Any] = {}
        for name in requires:
            if name == "loglik":
                from metactl.likelihood import candidate_loglik

                mask = np.ones(batch.tokens.shape, dtype=bool)
                loglik = np.asarray(
                    candidate_loglik(
                        batch.logits, batch.tokens, mask, np.asarray(candidates, dtype=np.float64)
                    )
                )
                if likelihood_normalization == "sum":
                    loglik = loglik * mask.sum(axis=1)[:, None]  # the mean times the length
                out["loglik"] = loglik
            elif name == "advantages":
                out["advantages"] = np.asarray(advantages, dtype=np.float64)
            elif name == "reward":
                out["reward"] = float(batch.rewards.mean())
            elif name == "rewards":
                out["rewards"] = np.array(batch.rewards, dtype=np.float64)  # a copy: rules keep it
            elif name == "group_size":
                out["group_size"] = self.config.group_size
            elif name == "entropy":
                out["entropy"] = self.entropy(batch)
            elif name == "vocab_size":
                out["vocab_size"] = self.vocab_size
            else:
                raise ValueError(f"the gym learner cannot provide feedback {name!r}")
        return out

    def entropy(self, batch: Rollout) -> float:
        """Mean token entropy (nats) of ``batch``'s sampling distributions (each row at the
        temperature that sampled it)."""
        logp = log_softmax(batch.logits / _divisor(batch.temperature, 3))
        return float(-(np.exp(logp) * logp).sum(axis=-1).mean())

    # ------------------------------------------------------------------ evaluation
    def success_by_task(self, temperature: float | None = None) -> np.ndarray:
        """Exact probability, per task, that sampling at ``temperature`` writes the target.

        ``temperature`` defaults to ``config.eval_temperature``. Uses the hidden targets, for
        evaluation only (the learner trains from rewards alone).
        """
        temperature = self.config.eval_temperature if temperature is None else float(temperature)
        targets = self.env.targets  # (n, L)
        n = targets.shape[0]
        prev = np.concatenate([np.full((n, 1), self.vocab_size), targets[:, :-1]], axis=1)
        rows = np.arange(n)[:, None]
        z = self.logits[rows, self._positions[None, :], prev]  # (n, L, V)
        logp = log_softmax(z / temperature)
        on_target = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return np.exp(on_target.sum(axis=1))

    def greedy_success_by_task(self) -> np.ndarray:
        """Per task, 1.0 if greedy (argmax) decoding writes the target, else 0.0.

        Greedy decoding is the same at every temperature, so this metric does not depend on the
        evaluation temperature.
        """
        targets = self.env.targets
        n = targets.shape[0]
        prev = np.concatenate([np.full((n, 1), self.vocab_size), targets[:, :-1]], axis=1)
        z = self.logits[np.arange(n)[:, None], self._positions[None, :], prev]  # (n, L, V)
        return (z.argmax(axis=-1) == targets).all(axis=1).astype(np.float64)

    def success_rate(self, temperature: float | None = None) -> float:
        """Mean over tasks of :meth:`success_by_task`."""
        return float(self.success_by_task(temperature).mean())


@dataclass(frozen=True)
class StepRecord:
    """One step of :func:`train`, handed to its ``on_step`` callback (after both updates)."""

    step: int
    decision: Any
    batch: Rollout
    advantages: np.ndarray
    feedback: dict[str, Any]
    info: Any
    learner: TabularGRPO


@dataclass
class TrainLog:
    """What :func:`train` records; ``steps`` rows unless noted.

    ``success``: exact eval success rate before every step and after the last (``steps + 1``);
    ``success_by_task``: the same per task (``steps + 1, num_tasks``); ``greedy``: fraction of
    tasks that greedy decoding solves (``steps + 1``, temperature-free); ``temperature``: the value
    used at each step (with a per-task policy: the mean over the tasks); ``task_temperature``:
    the value each task was sampled at (``steps, num_tasks``; every column equal for a global
    policy); ``reward``: the batch mean reward; ``entropy``: mean token entropy at the sampling
    temperatures; ``probs``: the meta-policy's probabilities after each update (``steps, K``; a
    per-task policy's global probabilities). ``signal``: for a likelihood rule (one that asks
    for ``loglik`` and ``advantages``, e.g. TAMPO), the per-step diagnostics of its signal
    (:func:`metactl.diagnostics.stack_diagnostics` of every step's
    :func:`metactl.diagnostics.signal_diagnostics`, computed from the feedback the rule got);
    None for other rules.
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

    @property
    def auc(self) -> float:
        """Area under the learning curve: mean of ``success`` over the ``steps + 1`` evaluations."""
        s = self.success  # trapezoid rule on a unit grid (np.trapezoid needs numpy >= 2)
        return float((s[:-1] + s[1:]).sum() / 2.0 / (s.shape[0] - 1))

    @property
    def final_success(self) -> float:
        """The success rate after the last step."""
        return float(self.success[-1])


def train(
    meta: Any,
    env: Any,
    steps: int,
    config: GRPOConfig | None = None,
    seed: int = 0,
    on_step: Callable[[StepRecord], None] | None = None,
) -> TrainLog:
    """Train a :class:`TabularGRPO` on ``env`` for ``steps`` steps; ``meta`` picks the temperature.

    A global ``meta`` picks one temperature per step; a per-prompt one (``meta.contextual``)
    picks one per task, keyed by the task id (``meta.select(contexts=[0, 1, ...])``), and its
    update gets every row's feedback in task order.

    Args:
        meta: a ``metactl.MetaPolicy`` (any rule or controller, global or per-prompt).
        env: a :class:`TokenSearchEnv` or a wrapper around one (e.g. ``gym.make(...)``).
        steps: number of GRPO steps (one meta decision each).
        config: learner hyperparameters.
        seed: seeds the rollout sampler (the meta-policy has its own seed).
        on_step: called after every step with a :class:`StepRecord` (for logging or checks).

    Returns:
        A :class:`TrainLog`.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    learner = TabularGRPO(env, config)
    group = learner.config.group_size
    rng = np.random.default_rng(seed)
    k = len(meta.candidates)
    success = np.empty(steps + 1)
    by_task = np.empty((steps + 1, learner.env.num_tasks))
    greedy = np.empty(steps + 1)
    temperature = np.empty(steps)
    reward = np.empty(steps)
    entropy = np.empty(steps)
    probs = np.empty((steps, k))
    # a likelihood rule's signal diagnostics, from the (N, K) likelihoods it already receives
    diagnose = {"loglik", "advantages"} <= set(meta.requires)
    signal_records: list[dict[str, Any]] = []
    task_temperature = np.empty((steps, learner.env.num_tasks))
    contextual = bool(getattr(meta, "contextual", False))
    # the task ids are the contexts; rows come in task order, G per task (decision order)
    task_ids = list(range(learner.env.num_tasks))
    # what the rule expects in ``loglik``: TAMPO's paper form is length-normalised ("mean")
    normalization = getattr(getattr(meta, "rule", None), "likelihood_normalization", "mean")
    if normalization not in ("mean", "sum"):  # checked before the first select draws from meta
        raise ValueError(
            f"meta.rule.likelihood_normalization must be 'mean' or 'sum', got {normalization!r}"
        )
    for step in range(steps):
        by_task[step] = learner.success_by_task()
        success[step] = by_task[step].mean()
        greedy[step] = learner.greedy_success_by_task().mean()

        decision = meta.select(contexts=task_ids) if contextual else meta.select()
        if contextual:
            per_task = np.asarray(decision.values, dtype=np.float64)
            row_temps: float | np.ndarray = np.repeat(per_task, group)
            temp = float(per_task.mean())
        else:
            temp = float(decision.value)
            per_task = np.full(len(task_ids), temp)
            row_temps = temp
        batch = learner.rollout(row_temps, rng)
        advantages = group_advantages(batch.rewards, group, learner.config.adv_eps)
        learner.update(batch, advantages)
        feedback = learner.feedback(
            meta.requires,
            batch,
            advantages,
            meta.candidates,
            likelihood_normalization=normalization,
        )
        info = meta.update(decision, **feedback)
        if diagnose:
            signal_records.append(
                signal_diagnostics(
                    feedback["loglik"],
                    feedback["advantages"],
                    meta.candidates,
                    row_temps,
                    group,
                    normalizer=getattr(meta.rule, "normalizer", "sparsemax"),
                    tau=getattr(meta.rule, "tau", 1.0),
                )
            )
        if on_step is not None:
            on_step(StepRecord(step, decision, batch, advantages, feedback, info, learner))

        temperature[step] = temp
        task_temperature[step] = per_task
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
        temperature=temperature,
        reward=reward,
        entropy=entropy,
        probs=probs,
        families=learner.env.families,
        task_temperature=task_temperature,
        signal=stack_diagnostics(signal_records) if signal_records else None,
    )
