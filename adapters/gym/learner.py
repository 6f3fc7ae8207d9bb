"""A small GRPO learner for ``TokenSearchEnv``, its sampler setting chosen by a ``MetaPolicy``.

The policy is a tabular softmax over the next token for every state ``(task, position, previous
token)`` (a bigram "language model" per task), initialised from the environment's
``prior_logits``. The sampler applies every knob of :data:`metactl.knobs.KNOBS`: temperature,
top-k, top-p and min-p, in Hugging Face's order, exactly as :mod:`metactl.likelihood`'s families
define them (:mod:`metactl.adapters.gym.sampling`), so the batch's log-probabilities, the
gradient and the candidates' likelihoods all use the distribution that sampled it. The knobs a
policy does not set stay at the learner's fixed values (:class:`GRPOConfig`: ``temperature``,
``top_p``, ``top_k``, ``min_p``). The training loop, one meta decision per GRPO step, is
:func:`train` (:mod:`metactl.adapters.gym.training`, which lists its steps).

Evaluation is exact (no sampling noise): the success rate of the learned policy at
``eval_temperature`` (no truncation) is
``mean_task prod_t softmax(z[task, t, target_{t-1}] / T_eval)[target_t]``.

Example
-------
>>> import metactl
>>> from metactl.adapters.gym import TokenSearchEnv
>>> from metactl.adapters.gym.learner import GRPOConfig
>>> from metactl.adapters.gym.training import train
>>> env = TokenSearchEnv(vocab_size=6, length=3, families=("shoulder",))
>>> log = train(metactl.MetaPolicy([0.8, 1.2], metactl.Fixed(1.2)), env, steps=5, seed=0)
>>> log.success.shape, log.temperature.tolist()
((6,), [1.2, 1.2, 1.2, 1.2, 1.2])
>>> top_p = metactl.MetaPolicy([0.8, 1.0], metactl.Fixed(0.8), hyperparameter="top_p")
>>> train(top_p, env, steps=3, seed=0).knobs["top_p"].tolist()
[0.8, 0.8, 0.8]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from metactl.effective_temperature import CHECK_MODES
from metactl.feedback import Feedback, FeedbackSpec, build_feedback
from metactl.knobs import check_knob

from .env import TokenSearchEnv
from .sampling import SamplerRows, family_log_probs, log_softmax, row_settings

__all__ = [
    "GRPOConfig",
    "Rollout",
    "TabularGRPO",
    "log_softmax",
]

_CONFIG: Any = object()  # "the learner's fixed value" (top_k=None already means "off")


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
    temperature: float = 1.0
    """The sampling temperature when the meta-policy does not set it (e.g. a top-p policy)."""
    top_p: float = 1.0
    """The fixed top-p, in ``(0, 1]`` (1: off), when the meta-policy does not set it."""
    top_k: int | None = None
    """The fixed top-k, an int ``>= 1`` (``None``: off), when the meta-policy does not set it."""
    min_p: float = 0.0
    """The fixed min-p, in ``[0, 1)`` (0: off), when the meta-policy does not set it."""
    truncation_epsilon: float = 1e-3
    """Smoothing of a truncated sampler, in ``(0, 1)``: it samples
    ``(1 - eps) p|S + eps p`` (:mod:`metactl.adapters.gym.sampling`); the likelihood default."""
    temperature_check: str = "error"
    """The effective-temperature check of :func:`~.training.train`'s rollouts
    (:mod:`metactl.effective_temperature`, from the rollouts' own logits): ``"error"`` raises on
    a departure from the chosen setting, ``"warn"`` warns, ``"off"`` neither estimates nor
    logs."""
    temperature_check_rows: int = 6
    """Rows of every rollout the check reads, spread evenly over the batch
    (:func:`~.training.check_rows`; 0: every row)."""
    temperature_check_window: int = 16
    """Steps whose rollouts one check pools (the last window may be shorter). The estimate
    costs a few passes over the logits it reads plus a fixed overhead per call, each about
    as much as a tabular step's own work: reading a few rows of each step and pooling
    steps keeps it a small share of training. A departure is caught at most this many steps
    late."""

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
        check_knob("temperature", self.temperature, "temperature")
        check_knob("top_p", self.top_p, "top_p")
        if self.top_k is not None:
            check_knob("top_k", self.top_k, "top_k")
        check_knob("min_p", self.min_p, "min_p")
        row_settings(1, epsilon=self.truncation_epsilon)  # validates the epsilon
        if self.temperature_check not in CHECK_MODES:
            raise ValueError(f"temperature_check must be one of {list(CHECK_MODES)}, got "
                             f"{self.temperature_check!r}")
        for name, low in (("temperature_check_rows", 0), ("temperature_check_window", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

    def fixed_knobs(self) -> dict[str, Any]:
        """The learner's sampler setting for the knobs a policy does not set.

        >>> GRPOConfig(top_p=0.9).fixed_knobs()
        {'temperature': 1.0, 'top_p': 0.9, 'top_k': None, 'min_p': 0.0}
        """
        return {
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "top_k": None if self.top_k is None else int(self.top_k),
            "min_p": float(self.min_p),
        }


@dataclass(frozen=True)
class Rollout:
    """One batch of complete answers, grouped by task (``group_size`` consecutive rows per task).

    ``tasks (N,)``, ``states (N, L)`` (the previous token, ``V`` = begin), ``tokens (N, L)``,
    ``logits (N, L, V)`` raw (un-tempered) logits that predicted each token, ``rewards (N,)``,
    and the ``temperature`` that sampled them: a float (one for the whole batch), or an
    ``(N,)`` array, row ``i`` sampled at ``temperature[i]`` (a temperature per task).
    ``truncation``: the rows' top-k / top-p / min-p (:class:`~.sampling.SamplerRows`), or
    ``None`` when no row was truncated (plain ``softmax(z / T)``).
    """

    tasks: np.ndarray
    states: np.ndarray
    tokens: np.ndarray
    logits: np.ndarray
    rewards: np.ndarray
    temperature: float | np.ndarray
    truncation: SamplerRows | None = None

    def setting(self, knob: str) -> float | np.ndarray:
        """The value of ``knob`` that sampled the batch: a float when every row shares it,
        else ``(N,)`` per row (top_k: 0 = off)."""
        if knob == "temperature":
            values = self.row_temperatures()
        elif self.truncation is None:
            return 0.0 if knob == "top_k" else float(knob == "top_p")
        else:
            values = self.truncation.value(knob)
        return float(values[0]) if np.all(values == values[0]) else values

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
    """A temperature (a float), or one per row (an ``(n,)`` array), each value checked by
    :func:`metactl.knobs.check_knob`."""
    if isinstance(temperature, (list, tuple, np.ndarray)):
        temps = np.asarray(temperature, dtype=np.float64)
        if temps.shape != (n,):
            raise ValueError(
                f"temperature must be a float or one per row, shape ({n},), got {temps.shape}"
            )
        for i, value in enumerate(temps.tolist()):
            check_knob("temperature", value, f"temperature[{i}]")
        return temps
    if isinstance(temperature, bool) or not isinstance(
        temperature, (int, float, np.integer, np.floating)
    ):
        raise TypeError(
            f"temperature must be a float or an array, got {type(temperature).__name__}"
        )
    return float(check_knob("temperature", temperature, "temperature"))


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

    def truncation(
        self, top_p: Any = _CONFIG, top_k: Any = _CONFIG, min_p: Any = _CONFIG
    ) -> SamplerRows | None:
        """The rows' truncation knobs (each a scalar or one per row; omitted: the config's
        fixed value; ``top_k=None``: off), or ``None`` when no row is truncated."""
        fixed = self.config.fixed_knobs()
        rows = row_settings(
            self.num_rows,
            top_p=fixed["top_p"] if top_p is _CONFIG else top_p,
            top_k=fixed["top_k"] if top_k is _CONFIG else top_k,
            min_p=fixed["min_p"] if min_p is _CONFIG else min_p,
            epsilon=self.config.truncation_epsilon,
        )
        return rows if rows.truncated.any() else None

    def rollout(
        self,
        temperature: float | np.ndarray,
        rng: np.random.Generator,
        *,
        top_p: Any = _CONFIG,
        top_k: Any = _CONFIG,
        min_p: Any = _CONFIG,
    ) -> Rollout:
        """Sample ``group_size`` answers per task at the given setting; score them with the env.

        ``temperature``: a float for the whole batch, or ``(N,)`` per-row temperatures
        (:attr:`num_rows`; e.g. ``np.repeat(per_task, group_size)``). ``top_p``, ``top_k``,
        ``min_p``: likewise a value or one per row (each checked as
        :func:`metactl.knobs.check_knob` does; ``top_k=None`` keeps every token); omitted, the
        config's fixed value. Every row samples from the family distribution of its setting
        (:mod:`metactl.adapters.gym.sampling`); with no truncation, ``softmax(z / T)``.
        """
        tasks = self._tasks
        n = tasks.shape[0]
        temperature = _check_temperature(temperature, n)
        truncation = self.truncation(top_p, top_k, min_p)
        divisor = _divisor(temperature, 2)
        row_temps = np.broadcast_to(np.asarray(temperature, dtype=np.float64), (n,))
        states = np.empty((n, self.length), dtype=np.int64)
        tokens = np.empty((n, self.length), dtype=np.int64)
        logits = np.empty((n, self.length, self.vocab_size))
        prev = np.full(n, self.vocab_size, dtype=np.int64)
        uniforms = rng.random((n, self.length))
        for t in range(self.length):
            z = self.logits[tasks, t, prev]
            if truncation is None:
                probs = np.exp(log_softmax(z / divisor))
            else:
                probs = np.exp(family_log_probs(z, row_temps, truncation).log_q)
            cdf = np.cumsum(probs, axis=1)
            token = (uniforms[:, t, None] > cdf[:, :-1]).sum(axis=1)  # inverse-CDF sampling
            states[:, t], tokens[:, t], logits[:, t] = prev, token, z
            prev = token
        rewards = self.env.score(tasks, tokens)
        return Rollout(tasks, states, tokens, logits, rewards, temperature, truncation)

    def _family_terms(
        self, z: np.ndarray, batch: Rollout, temperature: float | np.ndarray
    ) -> Any:
        """The family terms of ``(N, L, V)`` logits ``z`` at ``temperature`` under the batch's
        truncation (flattened to ``(N L, V)`` rows)."""
        assert batch.truncation is not None
        n, length, vocab = z.shape
        temps = np.broadcast_to(np.asarray(temperature, dtype=np.float64), (n,))
        return family_log_probs(
            z.reshape(n * length, vocab), np.repeat(temps, length), batch.truncation.repeat(length)
        )

    # ------------------------------------------------------------------ learning
    def token_logprobs(
        self, batch: Rollout, temperature: float | np.ndarray | None = None
    ) -> np.ndarray:
        """``(N, L)`` log-probs of the sampled tokens at ``temperature`` (a float or one per
        row; default: the batch's own, each row at the temperature that sampled it), under the
        batch's truncation (the distribution that sampled it)."""
        n = batch.tokens.shape[0]
        temp = batch.temperature if temperature is None else _check_temperature(temperature, n)
        if batch.truncation is None:
            logp = log_softmax(batch.logits / _divisor(temp, 3))
            return np.take_along_axis(logp, batch.tokens[..., None], axis=-1)[..., 0]
        terms = self._family_terms(batch.logits, batch, temp)
        flat = batch.tokens.reshape(-1)
        return terms.log_q[np.arange(flat.shape[0]), flat].reshape(batch.tokens.shape)

    def gradient(self, batch: Rollout, advantages: np.ndarray) -> tuple[float, np.ndarray]:
        """GRPO loss of ``batch`` at its own temperature and its gradient w.r.t. the logit table.

        Uses the current table at the batch's states, so repeated passes over a batch see the
        updated policy (the first pass equals the rollout's own logits).

        Loss: ``-(1/N) sum_i A_i (1/L) sum_t log q_i(o_it | z_it)``, ``q_i`` the distribution
        that sampled row ``i`` (``softmax(z / T_i)`` without truncation; on-policy: the
        importance ratio is 1; no KL term). Returns ``(loss, grad)``, ``grad`` shaped like
        :attr:`logits`.
        """
        advantages = np.asarray(advantages, dtype=np.float64)
        n = batch.tokens.shape[0]
        if advantages.shape != (n,):
            raise ValueError(f"advantages must have shape ({n},), got {advantages.shape}")
        temp = _divisor(batch.temperature, 3)  # (N, 1, 1) per-row, or the batch's float
        # the current table (equal to batch.logits for the on-policy step; fresher after a step)
        z = self.logits[batch.tasks[:, None], self._positions[None, :], batch.states]
        index = batch.tokens[..., None]
        if batch.truncation is None:
            logp = log_softmax(z / temp)  # (N, L, V)
            taken = np.take_along_axis(logp, index, axis=-1)[..., 0]
            # d loss / d z_it = -(A_i / (N L)) (onehot(o_it) - softmax(z_it / T_i)) / T_i
            rows = np.exp(logp)
        else:
            terms = self._family_terms(z, batch, batch.temperature)
            flat = batch.tokens.reshape(-1)
            taken = terms.log_q[np.arange(flat.shape[0]), flat].reshape(batch.tokens.shape)
            # d loss / d z_it = -(A_i / (N L)) (onehot(o_it) - w_it) / T_i (sampling.py)
            rows = terms.grad_weights(flat).reshape(z.shape)
        loss = float(-(advantages[:, None] * taken).mean())
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
        spec: FeedbackSpec,
        batch: Rollout,
        advantages: np.ndarray,
        candidates: Any,
        *,
        family: str = "temperature",
        fixed: Mapping[str, Any] | None = None,
    ) -> Feedback:
        """The feedback a meta-policy asks for (``spec``: ``policy.spec``), from the rollout's own
        logits, built by :func:`metactl.build_feedback` (only what ``spec.feedback`` names is
        computed).

        ``loglik``: ``(N, K)`` log-likelihood of every answer under every candidate
        (``metactl.likelihood.candidate_loglik(..., candidates, family, **fixed)``, in HF's
        order with the config's ``truncation_epsilon``: ``candidates`` and ``family`` are the
        policy's, ``fixed`` the knobs it does not set at the values that sampled the batch, as
        :func:`train` passes them; every position counts, as all answers have length L), per
        token as ``candidate_loglik`` gives it, and summed over the answer's L tokens when
        ``spec.loglik`` is ``"sum"`` (the probability of the whole answer, e.g. for
        :class:`metactl.Counterfactual`'s importance weights). ``advantages``: the GRPO
        advantages. ``reward``: the batch's mean reward. ``rewards``: ``(N,)`` one reward per
        answer, rows in the order of ``loglik``. ``group_size``: answers per task (the groups
        are consecutive rows). ``entropy``: mean token entropy (nats), every row at the
        setting that sampled it. ``vocab_size``: V.

        Raises:
            TypeError: ``spec`` is not a :class:`metactl.FeedbackSpec`.
        """
        if not isinstance(spec, FeedbackSpec):
            raise TypeError(
                f"spec must be a metactl.FeedbackSpec (policy.spec), got {type(spec).__name__}"
            )
        needs = set(spec.feedback)
        loglik = None
        if "loglik" in needs:
            from metactl.likelihood import candidate_loglik

            mask = np.ones(batch.tokens.shape, dtype=bool)
            loglik = np.asarray(
                candidate_loglik(
                    batch.logits,
                    batch.tokens,
                    mask,
                    candidates,
                    family,
                    order="hf",
                    epsilon=self.config.truncation_epsilon,
                    **dict(fixed or {}),
                )
            )
        entropy = self._token_entropies(batch) if "entropy" in needs else None
        return build_feedback(
            spec,
            loglik_mean=loglik,
            token_counts=np.full(batch.tokens.shape[0], batch.tokens.shape[1]),
            advantages=np.asarray(advantages, dtype=np.float64),
            rewards=batch.rewards,
            reward=float(batch.rewards.mean()),
            entropy_sum=None if entropy is None else float(entropy.sum()),
            entropy_tokens=None if entropy is None else entropy.size,
            vocab_size=self.vocab_size,
            group_size=self.config.group_size,
        )

    def entropy(self, batch: Rollout) -> float:
        """Mean token entropy (nats) of ``batch``'s sampling distributions (each row at the
        setting that sampled it)."""
        return float(self._token_entropies(batch).mean())

    def _token_entropies(self, batch: Rollout) -> np.ndarray:
        """The entropy (nats) of the sampling distribution at every position of ``batch``."""
        if batch.truncation is None:
            logp = log_softmax(batch.logits / _divisor(batch.temperature, 3))
            return -(np.exp(logp) * logp).sum(axis=-1)
        log_q = self._family_terms(batch.logits, batch, batch.temperature).log_q
        q = np.exp(log_q)
        return -np.where(q > 0.0, q * log_q, 0.0).sum(axis=-1)

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
