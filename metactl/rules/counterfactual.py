"""A counterfactual temperature controller: from the rollouts of one step, estimate by
self-normalised importance weights what every candidate temperature would have given, and move
to the candidate with the most expected learning signal.

GRPO learns only from prompt groups whose rewards differ (an all-fail or all-pass group has zero
advantages). For every prompt group ``g`` and candidate ``T_k`` the rule estimates the group's
reward distribution under ``T_k`` from the completions sampled at ``T_s`` by reweighting them
with ``w_i = p_{T_k}(y_i) / p_{T_s}(y_i)`` (whole completions: summed log-likelihoods), and
scores the candidate by the expected within-group reward variance (the GRPO gradient signal,
``p (1 - p)`` for 0/1 rewards) or by the probability that a group of that size is informative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .._validation import finite_scalar, one_of, unit_interval
from ..selectors import Greedy, Selector
from . import base
from .base import Draw, Rule, check_groups, one_hot, one_value, state_field

__all__ = ["OBJECTIVES", "Counterfactual", "counterfactual_scores"]

OBJECTIVES = ("signal", "informative")

# Scores closer to the maximum than this (relative to its magnitude) count as tied with it:
# rounding noise, not evidence for moving.
_RELATIVE_TIE = 64 * np.finfo(np.float64).eps


def counterfactual_scores(
    loglik_sum: np.ndarray,
    rewards: np.ndarray,
    group_size: int,
    sampling_index: int,
    *,
    objective: str = "signal",
    min_ess: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-candidate expected learning signal of one batch, and the trusted-group counts.

    Args:
        loglik_sum: ``(N, K)`` summed log-likelihood of every whole completion under every
            candidate; column ``sampling_index`` is the temperature that sampled the batch.
        rewards: ``(N,)`` one reward per completion (0/1 for ``objective="informative"``).
        group_size: ``G``, completions per prompt; rows ``[g G, (g + 1) G)`` form group ``g``.
        sampling_index: the column of the sampling temperature ``T_s``.
        objective: ``"signal"``: the self-normalised estimate of the group's reward variance
            under ``T_k``, ``sum_i w_i (r_i - mu_k)^2`` with ``mu_k = sum_i w_i r_i`` (for 0/1
            rewards ``p_k (1 - p_k)``); ``"informative"``: the probability that ``G`` fresh
            completions at ``T_k`` do not all agree, ``1 - p_k^G - (1 - p_k)^G``.
        min_ess: the effective-sample-size guard, a fraction of ``G`` in ``(0, 1]``. For group
            ``g`` and candidate ``k`` the normalised weights give ``ESS = 1 / sum_i w_i^2``
            (``G`` at ``T_s``, 1 when one completion takes all the weight). Below
            ``min_ess * G`` the estimate is not trusted and the group's on-policy value (its
            value at ``T_s``) is used instead: with too little evidence the rule predicts no
            change, so a poorly supported candidate can never look better than ``T_s``.

    Returns:
        ``(scores, trusted)``: ``scores[k]`` is the mean over groups of the (guarded) estimate,
        ``trusted[k]`` the number of groups whose estimate for ``T_k`` passed the guard.

    The estimate is invariant to a per-row constant added to ``loglik_sum`` (it cancels in the
    ratio), to permutations of rows within a group and of groups, and for ``"signal"`` to a shift
    of the rewards (a scale ``c`` multiplies every score by ``c^2``).

    Example:
        >>> # one prompt, G = 4 completions sampled at T_s = candidates[1]; only the first, the
        >>> # least likely at T_s and relatively more likely at the higher candidate, succeeds
        >>> ll = np.array([[-30.0, -25.0, -24.5], [-20.0, -20.5, -21.0],
        ...                [-20.0, -20.5, -21.0], [-20.0, -20.5, -21.0]])
        >>> scores, trusted = counterfactual_scores(ll, np.array([1.0, 0, 0, 0]), 4, 1)
        >>> scores.round(4).tolist(), trusted.tolist()   # 0.1875 = p (1 - p) at p = 1/4
        ([0.0014, 0.1875, 0.2494], [1, 1, 1])
    """
    one_of(objective, "objective", OBJECTIVES)
    min_ess = unit_interval(min_ess, "min_ess", low_open=True)
    n, k = loglik_sum.shape
    check_groups(n, group_size)
    if rewards.shape != (n,):
        raise ValueError(f"rewards must have shape ({n},), one per completion, got {rewards.shape}")
    if not 0 <= sampling_index < k:
        raise ValueError(f"sampling_index must lie in [0, {k}), got {sampling_index}")
    if objective == "informative" and not np.all((rewards == 0.0) | (rewards == 1.0)):
        raise ValueError("rewards must be 0 or 1 (pass/fail) for objective='informative'")
    with np.errstate(over="ignore", invalid="ignore"):
        log_ratio = loglik_sum - loglik_sum[:, [sampling_index]]
    if not np.all(np.isfinite(log_ratio)):
        raise ValueError(
            "loglik_sum: the log-likelihood differences between candidates exceed the float64 "
            "range; pass summed log-likelihoods of ordinary magnitude"
        )
    groups = n // group_size
    log_ratio = log_ratio.reshape(groups, group_size, k)
    # shift by the group maximum: every weight lies in (0, 1], the largest is 1, no overflow
    weights = np.exp(log_ratio - log_ratio.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    ess = 1.0 / np.sum(weights * weights, axis=1)  # (groups, K), in [1, G]
    trusted = ess >= min_ess * group_size
    trusted[:, sampling_index] = True  # equal weights: ESS = G up to rounding
    # centre each group's rewards first, so a shift of every reward changes nothing
    grouped = rewards.reshape(groups, group_size)
    centred = grouped - grouped.mean(axis=1, keepdims=True)
    mean = np.einsum("gik,gi->gk", weights, centred)
    if objective == "signal":
        second = np.einsum("gik,gi->gk", weights, centred * centred)
        values = np.maximum(second - mean * mean, 0.0)  # a variance; >= 0 up to rounding
    else:
        p = np.clip(mean + grouped.mean(axis=1, keepdims=True), 0.0, 1.0)  # rounding only
        values = 1.0 - p**group_size - (1.0 - p) ** group_size
    guarded = np.where(trusted, values, values[:, [sampling_index]])
    return guarded.mean(axis=0), trusted.sum(axis=0)


@dataclass(frozen=True)
class Counterfactual(Rule):
    """Move to the candidate whose counterfactual learning signal is largest.

    Each step, :func:`counterfactual_scores` estimates for every candidate ``T_k`` the expected
    signal of the batch had it been sampled at ``T_k`` (self-normalised importance weights over
    whole completions, with an effective-sample-size guard that falls back to the on-policy
    value); the rule keeps an EMA of these scores, ``S <- (1 - alpha) S + alpha s``, and uses the
    candidate with the largest ``S`` next. Ties (within ``64 eps`` relative) keep the current
    candidate, else go to the tied candidate nearest to it (the lower one if two are equally
    near). Deterministic: ``probs`` is the one-hot of the next candidate (selector: ``Greedy``).

    Because poorly supported candidates fall back to the on-policy value, the rule moves one
    neighbourhood at a time, as far as the importance weights reach (completions sampled at
    ``T_s`` say little about a distant ``T_k``). All-fail and all-pass groups contribute 0 to
    every candidate: the estimate cannot see a success that was never sampled. The log-ratio of
    a whole completion under two temperatures grows with its length, so with long completions
    the weights of even neighbouring candidates degenerate, the guard holds, and the rule stays
    where it is; a finer candidate grid keeps neighbours within reach.

    Args:
        alpha: EMA coefficient in (0, 1].
        min_ess: effective-sample-size guard, as a fraction of the group size, in (0, 1].
        objective: ``"signal"`` (expected within-group reward variance; any real rewards) or
            ``"informative"`` (expected share of groups that are neither all-fail nor all-pass;
            0/1 rewards).
        initial: the starting temperature; the nearest candidate is used first.

    base.Feedback: ``loglik`` (N, K) **summed** log-likelihoods of each whole completion under every
    candidate (``likelihood_normalization == "sum"``: the length-normalised values of
    :func:`metactl.likelihood.candidate_loglik` times each completion's token count), ``rewards``
    (N,) one per completion, and ``group_size`` (completions per prompt, >= 2; groups are
    consecutive rows). The decision's candidate is the sampling temperature.

    Example:
        >>> import metactl, numpy as np
        >>> policy = metactl.MetaPolicy([0.8, 1.0, 1.2], metactl.Counterfactual(alpha=0.5))
        >>> d = policy.select(); d.value
        1.0
        >>> # one prompt, four completions: only the least likely one at T = 1.0 succeeds, and
        >>> # it is relatively more likely at 1.2: raising T would give more informative groups
        >>> ll = np.array([[-30.0, -25.0, -24.5], [-20.0, -20.5, -21.0],
        ...                [-20.0, -20.5, -21.0], [-20.0, -20.5, -21.0]])
        >>> _ = policy.update(d, loglik=ll, rewards=np.array([1.0, 0, 0, 0]), group_size=4)
        >>> policy.select().value
        1.2
    """

    alpha: float = 0.3
    min_ess: float = 0.5
    objective: str = "signal"
    initial: float = 1.0
    requires: ClassVar[tuple[str, ...]] = ("loglik", "rewards", "group_size")
    likelihood_normalization: ClassVar[str] = "sum"

    @property
    def loglik_reduction(self) -> str:
        return "sum"

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", unit_interval(self.alpha, "alpha", low_open=True))
        object.__setattr__(self, "min_ess", unit_interval(self.min_ess, "min_ess", low_open=True))
        one_of(self.objective, "objective", OBJECTIVES)
        object.__setattr__(self, "initial", finite_scalar(self.initial, "initial"))

    def default_selector(self) -> Selector:
        return Greedy()

    def validate_candidates(self, candidates: np.ndarray) -> None:
        low, high = float(candidates.min()), float(candidates.max())
        if not low <= self.initial <= high:
            raise ValueError(
                f"initial={self.initial} lies outside the candidate range [{low}, {high}]"
            )

    def init_state(self, candidates: np.ndarray) -> base.RuleState:
        start = int(np.argmin(np.abs(candidates - self.initial)))
        return {"score": np.zeros(candidates.shape[0]), "current": float(start)}

    def check_state(self, state: base.RuleState, candidates: np.ndarray, step: int) -> None:
        score = np.asarray(state["score"], dtype=np.float64)
        if np.any(score < 0):
            raise ValueError(
                f"{state_field('score')} must be >= 0 (an EMA of variances or "
                f"probabilities), got {score.tolist()}"
            )
        if self.objective == "informative" and np.any(score > 1):
            raise ValueError(
                f"{state_field('score')} must lie in [0, 1] for objective='informative' (an EMA "
                f"of probabilities), got {score.tolist()}"
            )
        current = float(state["current"])
        k = candidates.shape[0]
        if current != int(current) or not 0 <= current < k:
            raise ValueError(
                f"{state_field('current')} must be a candidate index, an integer in [0, {k}), "
                f"got {current}"
            )
        if int(current) not in _maximisers(score):
            raise ValueError(
                f"{state_field('current')} = {int(current)} is not a maximiser of "
                f"{state_field('score')} = {score.tolist()}: the rule always moves to one"
            )

    def probs(self, state: base.RuleState, ctx: base.Contexts) -> np.ndarray:
        return one_hot(ctx.candidates.shape[0], int(state["current"]))

    def select(self, state: base.RuleState, ctx: base.Contexts, rng: np.random.Generator) -> Draw:
        index = int(state["current"])
        return one_value(ctx, float(ctx.candidates[index]), index)

    def update(
        self, state: base.RuleState, ctx: base.Contexts, batch: base.Batch, feedback: base.Feedback
    ) -> tuple[base.RuleState, base.ContextRows, np.ndarray]:
        scores, _ = counterfactual_scores(
            feedback["loglik"],
            feedback["rewards"],
            feedback["group_size"],
            batch.index,
            objective=self.objective,
            min_ess=self.min_ess,
        )
        score = (1.0 - self.alpha) * state["score"] + self.alpha * scores
        if self.objective == "informative":
            score = np.minimum(score, 1.0)  # an EMA of values in [0, 1]: only rounding exceeds 1
        current = _nearest_maximiser(score, int(state["current"]))
        return {"score": score, "current": float(current)}, {}, scores


def _maximisers(score: np.ndarray) -> np.ndarray:
    top = float(np.max(score))
    return np.flatnonzero(score >= top - _RELATIVE_TIE * abs(top))


def _nearest_maximiser(score: np.ndarray, current: int) -> int:
    best = _maximisers(score)
    distance = np.abs(best - current)
    return int(best[np.argmin(distance)])  # argmin takes the first: the lower of two equals
