"""An uncertainty-driven heat/cool controller in the style of AGPO (arXiv 2605.20722): the
temperature moves around a base value by how uncertain the batch's outcomes are compared with
their running baseline, with the step size normalised by the running deviation (adaptive
clipping). Our reading of the method from its abstract; no code of it is used."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .._validation import positive_scalar, unit_interval
from ..selectors import Greedy, Selector
from . import base as rule_base  # `base` is a field name here
from .base import Draw, Rule, check_groups, one_hot, one_value, state_field

__all__ = ["Uncertainty", "outcome_uncertainty"]


def outcome_uncertainty(rewards: np.ndarray, group_size: int) -> float:
    """The batch's outcome uncertainty ``u = mean_g 4 Var_g(r)`` in ``[0, 1]``.

    ``Var_g`` is the (population) variance of the rewards of prompt group ``g`` (consecutive
    rows of ``group_size``); rewards lie in ``[0, 1]``, so ``4 Var_g <= 1``, with 1 for a group
    split evenly between 0 and 1 and 0 for an all-pass or all-fail group (``4 p (1 - p)`` for
    0/1 rewards at pass rate ``p``).

    Example:
        >>> outcome_uncertainty(np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]), 4)
        0.375
    """
    n = rewards.shape[0]
    check_groups(n, group_size)
    if np.any(rewards < 0) or np.any(rewards > 1):
        raise ValueError("rewards must lie in [0, 1] for the uncertainty controller")
    grouped = rewards.reshape(n // group_size, group_size)
    return float(min(4.0 * float(np.mean(np.var(grouped, axis=1))), 1.0))  # min: rounding only


@dataclass(frozen=True)
class Uncertainty(Rule):
    """Heat when the outcomes are more certain than usual, cool when they are less.

    Each step gives the outcome uncertainty ``u_t`` (:func:`outcome_uncertainty`: 0 when every
    prompt group is all-pass or all-fail, so GRPO gets no gradient; 1 when every group splits
    evenly). Against the running baseline ``b`` (an EMA of ``u`` with coefficient ``beta``) the
    centred uncertainty ``c = u_t - b`` is divided by the running mean absolute deviation
    ``s`` (an EMA of ``|c|``, updated first, so ``|c| / s <= 1 / beta``) and limited to
    ``[-clip, clip]``; the next temperature is ``T = base * exp(-gain * z)``. Outcomes
    collapsing to agreement (``u`` below its baseline) heat the sampler to find informative
    groups again; unusually split outcomes cool it. The first step only initialises ``b = u``
    (and ``T`` stays at ``base``); a step with ``s = 0`` (``u`` never moved) leaves ``T`` at
    ``base``. The controller is bidirectional around ``base``: it reacts to changes of the
    outcome uncertainty and returns to ``base`` when it settles.

    The range ``base * exp(+-gain * clip)`` must lie inside the candidate range (checked when
    the policy is built), so no temperature is ever clamped. Deterministic (``Greedy``);
    ``probs`` is the one-hot of the candidate nearest the current temperature, and the decision
    value is the exact temperature.

    Args:
        base: the base temperature (> 0).
        gain: the log-temperature step per unit of normalised uncertainty (> 0).
        beta: EMA coefficient of the baseline and the deviation, in (0, 1].
        clip: the largest normalised uncertainty used (> 0).

    rule_base.Feedback: ``rewards`` (N,) in ``[0, 1]`` (0/1 pass/fail, or a graded score) and
    ``group_size`` (completions per prompt, >= 2; groups are consecutive rows).

    Example:
        >>> import metactl, numpy as np
        >>> policy = metactl.MetaPolicy([0.6, 1.0, 1.5], metactl.Uncertainty(gain=0.2))
        >>> for rewards in ([1, 0, 1, 0], [1, 0, 1, 0], [1, 1, 1, 1]):   # the groups collapse
        ...     _ = policy.update(policy.select(), rewards=np.array(rewards), group_size=2)
        >>> round(policy.select().value, 4)   # heated: exp(0.2 * 2) with z = -clip
        1.4918
    """

    base: float = 1.0
    gain: float = 0.1
    beta: float = 0.1
    clip: float = 2.0
    requires: ClassVar[tuple[str, ...]] = ("rewards", "group_size")
    candidate_use: ClassVar[str] = "continuous"
    knobs: ClassVar[tuple[str, ...] | None] = ("temperature",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", positive_scalar(self.base, "base"))
        object.__setattr__(self, "gain", positive_scalar(self.gain, "gain"))
        object.__setattr__(self, "beta", unit_interval(self.beta, "beta", low_open=True))
        object.__setattr__(self, "clip", positive_scalar(self.clip, "clip"))
        try:
            low, high = self.bounds()
        except OverflowError:
            low, high = 0.0, math.inf
        if not (math.isfinite(high) and low > 0):
            raise ValueError(
                f"gain * clip = {self.gain * self.clip} is too large: base * exp(+-gain * clip) "
                "leaves the float64 range"
            )

    def bounds(self) -> tuple[float, float]:
        """The lowest and highest temperature the controller can reach: the update's own
        expression at ``z = -+clip``, so a saturated step lands exactly on them."""
        return (
            self.base * math.exp(-self.gain * self.clip),
            self.base * math.exp(self.gain * self.clip),
        )

    def default_selector(self) -> Selector:
        return Greedy()

    def validate_candidates(self, candidates: np.ndarray) -> None:
        low, high = self.bounds()
        grid_low, grid_high = float(candidates.min()), float(candidates.max())
        if not grid_low <= low <= high <= grid_high:
            raise ValueError(
                f"base * exp(+-gain * clip) = [{low:.6g}, {high:.6g}] must lie inside the "
                f"candidate range [{grid_low}, {grid_high}]: lower gain or clip, or widen the grid"
            )

    def init_state(self, candidates: np.ndarray) -> rule_base.RuleState:
        return {"value": self.base, "baseline": 0.0, "deviation": 0.0}

    def check_state(self, state: rule_base.RuleState, candidates: np.ndarray, step: int) -> None:
        value, baseline, deviation = (
            float(state["value"]),
            float(state["baseline"]),
            float(state["deviation"]),
        )
        for key, number in (("baseline", baseline), ("deviation", deviation)):
            if not 0.0 <= number <= 1.0:
                raise ValueError(f"{state_field(key)} must lie in [0, 1], got {number}")
        low, high = self.bounds()
        if not low <= value <= high:
            raise ValueError(
                f"{state_field('value')} must be a temperature in base * exp(+-gain * clip) = "
                f"[{low:.6g}, {high:.6g}], got {value}"
            )
        if step == 0 and (value, baseline, deviation) != (self.base, 0.0, 0.0):
            raise ValueError(
                f"{state_field('value')}, ['baseline'], ['deviation'] must be the initial "
                f"({self.base}, 0.0, 0.0) before the first update, got "
                f"({value}, {baseline}, {deviation})"
            )

    def _index(self, state: rule_base.RuleState, candidates: np.ndarray) -> int:
        return int(np.argmin(np.abs(candidates - float(state["value"]))))

    def probs(self, state: rule_base.RuleState, ctx: rule_base.Contexts) -> np.ndarray:
        return one_hot(ctx.candidates.shape[0], self._index(state, ctx.candidates))

    def select(
        self, state: rule_base.RuleState, ctx: rule_base.Contexts, rng: np.random.Generator
    ) -> Draw:
        return one_value(ctx, float(state["value"]), self._index(state, ctx.candidates))

    def update(
        self,
        state: rule_base.RuleState,
        ctx: rule_base.Contexts,
        batch: rule_base.Batch,
        feedback: rule_base.Feedback,
    ) -> tuple[rule_base.RuleState, rule_base.ContextRows, None]:
        uncertainty = outcome_uncertainty(feedback["rewards"], feedback["group_size"])
        if ctx.step == 0:
            return {"value": self.base, "baseline": uncertainty, "deviation": 0.0}, {}, None
        centred = uncertainty - float(state["baseline"])
        deviation = (1.0 - self.beta) * float(state["deviation"]) + self.beta * abs(centred)
        z = centred / deviation if deviation > 0 else 0.0
        z = min(max(z, -self.clip), self.clip)  # the documented saturation of the controller
        value = self.base * math.exp(-self.gain * z)
        baseline = (1.0 - self.beta) * float(state["baseline"]) + self.beta * uncertainty
        return (
            {
                "value": value,
                "baseline": min(max(baseline, 0.0), 1.0),  # an EMA of values in [0, 1]: rounding
                "deviation": min(deviation, 1.0),  # |u - b| <= 1: only rounding exceeds 1
            },
            {},
            None,
        )
