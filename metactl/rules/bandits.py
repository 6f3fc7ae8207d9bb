"""Chosen-arm bandits, for when only a scalar reward of the batch sampled at the chosen value is
known (no per-candidate likelihoods). Feedback: ``reward``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .._validation import finite_scalar, integer, positive_scalar, unit_interval
from ..sparsemax import softmax
from . import base
from .base import Draw, Rule, check_counts, check_max_is_zero, one_hot, one_value, state_field

__all__ = ["EXP3", "UCB1", "ThompsonGaussian"]


def _require_in_range(reward: float, low: float, high: float) -> float:
    if not low <= reward <= high:
        raise ValueError(
            f"reward {reward} lies outside [reward_min, reward_max] = [{low}, {high}]; "
            "widen the range in the rule's config (rewards are never clipped)"
        )
    return (reward - low) / (high - low)


def _check_range(low: float, high: float) -> None:
    finite_scalar(low, "reward_min")
    finite_scalar(high, "reward_max")
    if not high > low:
        raise ValueError(f"reward_max must be > reward_min, got [{low}, {high}]")


def _check_untried_are_zero(state: base.RuleState, counts: np.ndarray, key: str) -> None:
    """A candidate never chosen has received no reward: its entry of ``state[key]`` is 0."""
    untried = counts == 0
    if np.any(np.asarray(state[key])[untried] != 0.0):
        raise ValueError(
            f"{state_field(key)} must be 0 where counts is 0 (untried candidates), got "
            f"{np.asarray(state[key]).tolist()}"
        )


class _Bandit(Rule):
    """A chosen-arm bandit: fed the batch reward only, over the candidates' indices (any
    candidates, a joint grid too)."""

    requires: ClassVar[tuple[str, ...]] = ("reward",)
    candidate_use: ClassVar[str] = "indices"


@dataclass(frozen=True)
class EXP3(_Bandit):
    """EXP3 (Auer et al., 2002): exponential weights with importance-weighted chosen-arm rewards.

    ``pi = (1 - gamma) softmax(w) + gamma / K``; after a reward ``r`` rescaled to [0, 1],
    ``w_chosen += (gamma / K) * r / p_chosen`` with ``p_chosen = decision.prob`` (the propensity
    the selector actually used, so pair EXP3 with ``Sample()``, its default selector).

    Args:
        gamma: exploration rate in (0, 1].
        reward_min, reward_max: the range rewards are rescaled from; a reward outside raises.

    Example:
        >>> import metactl
        >>> policy = metactl.MetaPolicy([0.8, 1.2], metactl.EXP3(gamma=0.2), seed=0)
        >>> d = policy.select()
        >>> p = policy.update(d, reward=1.0).probs
        >>> bool(p[d.index] > 0.5)
        True
    """

    gamma: float = 0.1
    reward_min: float = 0.0
    reward_max: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "gamma", unit_interval(self.gamma, "gamma", low_open=True))
        _check_range(self.reward_min, self.reward_max)

    def init_state(self, candidates: np.ndarray) -> base.RuleState:
        return {"log_weights": np.zeros(candidates.shape[0])}

    def probs(self, state: base.RuleState, ctx: base.Contexts) -> np.ndarray:
        k = ctx.candidates.shape[0]
        return ((1.0 - self.gamma) * softmax(state["log_weights"]) + self.gamma / k)[None, :]

    def check_state(self, state: base.RuleState, candidates: np.ndarray, step: int) -> None:
        check_max_is_zero(state, "log_weights")

    def update(
        self, state: base.RuleState, ctx: base.Contexts, batch: base.Batch, feedback: base.Feedback
    ) -> tuple[base.RuleState, base.ContextRows, None]:
        reward = _require_in_range(feedback["reward"], self.reward_min, self.reward_max)
        k = ctx.candidates.shape[0]
        log_weights = state["log_weights"].copy()
        propensity = float(batch.propensities[0])
        log_weights[batch.index] += (self.gamma / k) * reward / propensity
        return {"log_weights": log_weights - log_weights.max()}, {}, None


@dataclass(frozen=True)
class UCB1(_Bandit):
    """UCB1 (Auer et al., 2002): try every candidate once, then the highest upper bound
    ``mean_k + exploration * sqrt(2 ln t / n_k)``. Deterministic: ``probs`` is one-hot on the
    next choice and the selector is not used.

    Example:
        >>> import metactl
        >>> policy = metactl.MetaPolicy([0.8, 1.2], metactl.UCB1(), seed=0)
        >>> [policy.select().index, policy.update(policy.select(), reward=0.5).step]
        [0, 0]
    """

    exploration: float = 1.0

    def __post_init__(self) -> None:
        value = positive_scalar(self.exploration, "exploration", allow_zero=True)
        object.__setattr__(self, "exploration", value)

    def init_state(self, candidates: np.ndarray) -> base.RuleState:
        k = candidates.shape[0]
        return {"counts": np.zeros(k), "means": np.zeros(k)}

    def check_state(self, state: base.RuleState, candidates: np.ndarray, step: int) -> None:
        _check_untried_are_zero(state, check_counts(state, "counts", step), "means")

    def _next(self, state: base.RuleState) -> int:
        counts, means = state["counts"], state["means"]
        untried = np.flatnonzero(counts == 0)
        if untried.size:
            return int(untried[0])
        bonus = self.exploration * np.sqrt(2.0 * np.log(counts.sum()) / counts)
        return int(np.argmax(means + bonus))

    def probs(self, state: base.RuleState, ctx: base.Contexts) -> np.ndarray:
        return one_hot(ctx.candidates.shape[0], self._next(state))

    def select(self, state: base.RuleState, ctx: base.Contexts, rng: np.random.Generator) -> Draw:
        index = self._next(state)
        return one_value(ctx, float(ctx.candidates[index]), index)

    def update(
        self, state: base.RuleState, ctx: base.Contexts, batch: base.Batch, feedback: base.Feedback
    ) -> tuple[base.RuleState, base.ContextRows, None]:
        counts, means = state["counts"].copy(), state["means"].copy()
        i = batch.index
        counts[i] += 1.0
        means[i] += (feedback["reward"] - means[i]) / counts[i]
        return {"counts": counts, "means": means}, {}, None


@dataclass(frozen=True)
class ThompsonGaussian(_Bandit):
    """Thompson sampling with a Gaussian prior ``N(prior_mean, prior_std^2)`` per candidate and a
    Gaussian reward likelihood of known ``noise_std``.

    ``select`` draws one mean per candidate from the posterior (with the policy's generator) and
    takes the argmax. ``probs`` reports each candidate's posterior probability of being best,
    estimated from ``mc_samples`` draws of a generator seeded by the step, so reading it never
    moves the policy's random stream.

    Example:
        >>> import metactl
        >>> policy = metactl.MetaPolicy([0.8, 1.2], metactl.ThompsonGaussian(), seed=0)
        >>> d = policy.select()
        >>> round(float(policy.update(d, reward=3.0).probs[d.index]), 1)
        1.0
    """

    prior_mean: float = 0.0
    prior_std: float = 1.0
    noise_std: float = 0.5
    mc_samples: int = 4096

    def __post_init__(self) -> None:
        object.__setattr__(self, "prior_mean", finite_scalar(self.prior_mean, "prior_mean"))
        object.__setattr__(self, "prior_std", positive_scalar(self.prior_std, "prior_std"))
        object.__setattr__(self, "noise_std", positive_scalar(self.noise_std, "noise_std"))
        object.__setattr__(self, "mc_samples", integer(self.mc_samples, "mc_samples", minimum=1))
        for name in ("prior_std", "noise_std"):
            # the posterior divides by these squared: squares and their reciprocals must be
            # finite and non-zero (about 1e-154 < std < 1e154)
            std = getattr(self, name)
            variance = std * std
            if not (variance > 0 and math.isfinite(variance) and math.isfinite(1.0 / variance)):
                raise ValueError(f"{name}**2 must be a finite positive float64, got {name}={std}")

    def init_state(self, candidates: np.ndarray) -> base.RuleState:
        k = candidates.shape[0]
        return {"counts": np.zeros(k), "sums": np.zeros(k)}

    def check_state(self, state: base.RuleState, candidates: np.ndarray, step: int) -> None:
        _check_untried_are_zero(state, check_counts(state, "counts", step), "sums")

    def posterior(self, state: base.RuleState) -> tuple[np.ndarray, np.ndarray]:
        """Posterior means and standard deviations of every candidate's mean reward."""
        precision = 1.0 / self.prior_std**2 + state["counts"] / self.noise_std**2
        mean = (self.prior_mean / self.prior_std**2 + state["sums"] / self.noise_std**2) / precision
        return mean, 1.0 / np.sqrt(precision)

    def probs(self, state: base.RuleState, ctx: base.Contexts) -> np.ndarray:
        mean, std = self.posterior(state)
        draws = np.random.default_rng(ctx.step).standard_normal((self.mc_samples, mean.shape[0]))
        best = np.argmax(mean + std * draws, axis=1)
        return (np.bincount(best, minlength=mean.shape[0]) / self.mc_samples)[None, :]

    def select(self, state: base.RuleState, ctx: base.Contexts, rng: np.random.Generator) -> Draw:
        mean, std = self.posterior(state)
        index = int(np.argmax(mean + std * rng.standard_normal(mean.shape[0])))
        draw = one_value(ctx, float(ctx.candidates[index]), index)
        return Draw(draw.values, draw.indices, self.probs(state, ctx)[:, index], draw.on_grid)

    def update(
        self, state: base.RuleState, ctx: base.Contexts, batch: base.Batch, feedback: base.Feedback
    ) -> tuple[base.RuleState, base.ContextRows, None]:
        counts, sums = state["counts"].copy(), state["sums"].copy()
        counts[batch.index] += 1.0
        sums[batch.index] += feedback["reward"]
        return {"counts": counts, "sums": sums}, {}, None
