"""Non-learning controllers behind the same API, so baselines run through the same code path:
a fixed value, a schedule over training steps, and the E3 entropy-targeting rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .._validation import finite_scalar, integer, one_of, positive_scalar
from ..selectors import Greedy, Selector
from . import base
from .base import Draw, Rule, one_hot, one_value, state_field

__all__ = ["EntropyTarget", "Fixed", "Schedule"]

#: The shapes of :class:`Schedule`.
_SCHEDULE_KINDS: tuple[str, ...] = ("linear", "cosine", "step")


def _nearest(candidates: np.ndarray, value: float) -> int:
    return int(np.argmin(np.abs(candidates - value)))


def _within_grid(value: float, candidates: np.ndarray, name: str) -> None:
    low, high = float(candidates.min()), float(candidates.max())
    if not low <= value <= high:
        raise ValueError(f"{name}={value} lies outside the candidate range [{low}, {high}]")


class _Scheduled(Rule):
    """A rule whose value is a function of the step alone (:meth:`at`): no state, no feedback,
    greedy selection, and a distribution that is all on the candidate nearest the value."""

    requires: ClassVar[tuple[str, ...]] = ()

    def at(self, step: int) -> float:
        """The value at ``step``."""
        raise NotImplementedError

    def default_selector(self) -> Selector:
        return Greedy()

    def init_state(self, candidates: np.ndarray) -> base.RuleState:
        return {}

    def probs(self, state: base.RuleState, ctx: base.Contexts) -> np.ndarray:
        return one_hot(ctx.candidates.shape[0], _nearest(ctx.candidates, self.at(ctx.step)))

    def update(
        self, state: base.RuleState, ctx: base.Contexts, batch: base.Batch, feedback: base.Feedback
    ) -> tuple[base.RuleState, base.ContextRows, None]:
        return {}, {}, None


@dataclass(frozen=True)
class Fixed(_Scheduled):
    """Always the same value (one of the candidates). No feedback.

    Example:
        >>> import metactl
        >>> metactl.MetaPolicy([0.9, 1.2, 1.5], metactl.Fixed(1.2)).select().value
        1.2
    """

    value: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", finite_scalar(self.value, "value"))

    def validate_candidates(self, candidates: np.ndarray) -> None:
        if not np.any(np.isclose(candidates, self.value, rtol=1e-12, atol=0.0)):
            raise ValueError(
                f"value={self.value} is not one of the candidates {candidates.tolist()}"
            )

    def at(self, step: int) -> float:
        return self.value

    def select(self, state: base.RuleState, ctx: base.Contexts, rng: np.random.Generator) -> Draw:
        index = _nearest(ctx.candidates, self.value)
        return one_value(ctx, float(ctx.candidates[index]), index)


@dataclass(frozen=True)
class Schedule(_Scheduled):
    """A value moving from ``start`` to ``end`` over ``total_steps`` steps, then staying at ``end``.

    ``kind="linear"``: ``start + (end - start) * f``; ``kind="cosine"``:
    ``start + (end - start) * (1 - cos(pi f)) / 2``, with ``f = min(step / (total_steps - 1), 1)``.
    ``kind="step"``: ``start`` for the steps ``0 .. total_steps - 1``, then ``end`` (one switch,
    no ramp: e.g. a warm-up temperature, then a chosen one).
    The decision's value is the exact scheduled value; its index is the nearest candidate.
    Both ends must lie inside the candidate range. No feedback.

    Example:
        >>> import metactl
        >>> policy = metactl.MetaPolicy([0.9, 1.2, 1.5], metactl.Schedule("linear", 0.9, 1.5, 3))
        >>> values = []
        >>> for _ in range(4):
        ...     d = policy.select(); values.append(round(d.value, 3)); _ = policy.update(d)
        >>> values
        [0.9, 1.2, 1.5, 1.5]
        >>> switch = metactl.Schedule("step", 1.5, 1.2, total_steps=2)
        >>> [switch.at(step) for step in range(4)]
        [1.5, 1.5, 1.2, 1.2]
    """

    kind: str
    start: float
    end: float
    total_steps: int
    candidate_use: ClassVar[str] = "continuous"

    def __post_init__(self) -> None:
        one_of(self.kind, "kind", _SCHEDULE_KINDS)
        object.__setattr__(self, "start", finite_scalar(self.start, "start"))
        object.__setattr__(self, "end", finite_scalar(self.end, "end"))
        object.__setattr__(self, "total_steps", integer(self.total_steps, "total_steps", minimum=1))

    def validate_candidates(self, candidates: np.ndarray) -> None:
        _within_grid(self.start, candidates, "start")
        _within_grid(self.end, candidates, "end")

    def at(self, step: int) -> float:
        """The scheduled value at ``step``."""
        if self.kind == "step":
            return self.start if step < self.total_steps else self.end
        fraction = min(step / max(self.total_steps - 1, 1), 1.0)
        if self.kind == "cosine":
            fraction = (1.0 - math.cos(math.pi * fraction)) / 2.0
        return self.start + (self.end - self.start) * fraction

    def select(self, state: base.RuleState, ctx: base.Contexts, rng: np.random.Generator) -> Draw:
        return one_value(ctx, self.at(ctx.step))


@dataclass(frozen=True)
class EntropyTarget(Rule):
    """The E3 entropy-targeting controller:
    ``T <- T * (1 + T * ln(H* / H) / (ln V + ln ln V))``.

    ``H`` is the mean token entropy (nats) of the batch sampled at the current ``T`` and ``V``
    the vocabulary size. The temperature is continuous and is kept inside
    ``[min(candidates), max(candidates)]`` (a documented bound of the controller, reported by
    ``probs`` as the nearest candidate). Feedback: ``entropy`` (> 0) and ``vocab_size`` (>= 3,
    so that ``ln ln V > 0``).

    The target is absolute (``target_entropy`` in nats) or, with ``target_entropy=None``,
    calibrated from the run itself as in E3's reference code: the temperature stays at
    ``initial`` for the first ``calibration_steps`` batches, and ``H*`` is ``target_ratio``
    times their mean entropy (E3's code: ratio 1, one batch). A target in nats does not carry
    over between models or tasks; one relative to the starting entropy does.

    Args:
        target_entropy: ``H*`` in nats (> 0), or None to calibrate it.
        initial: the temperature of the first step (inside the candidate range).
        calibration_steps: batches whose mean entropy sets ``H*`` (>= 1; with None only).
        target_ratio: ``H* = target_ratio * H0`` (> 0; with None only).

    Example:
        >>> import metactl
        >>> policy = metactl.MetaPolicy([0.5, 1.0, 1.5], metactl.EntropyTarget(2.0, initial=1.0))
        >>> d = policy.select()
        >>> _ = policy.update(d, entropy=1.0, vocab_size=1000)   # too little entropy: heat up
        >>> policy.select().value > 1.0
        True
        >>> calibrated = metactl.MetaPolicy([0.5, 1.0, 1.5], metactl.EntropyTarget())
        >>> _ = calibrated.update(calibrated.select(), entropy=1.0, vocab_size=1000)  # H* = 1.0
        >>> _ = calibrated.update(calibrated.select(), entropy=0.8, vocab_size=1000)
        >>> calibrated.select().value > 1.0                       # entropy fell below H0: heat
        True
    """

    target_entropy: float | None = None
    initial: float = 1.0
    calibration_steps: int = 1
    target_ratio: float = 1.0
    requires: ClassVar[tuple[str, ...]] = ("entropy", "vocab_size")
    candidate_use: ClassVar[str] = "continuous"
    knobs: ClassVar[tuple[str, ...] | None] = ("temperature",)

    def __post_init__(self) -> None:
        if self.target_entropy is not None:
            target = positive_scalar(self.target_entropy, "target_entropy")
            object.__setattr__(self, "target_entropy", target)
        object.__setattr__(self, "initial", positive_scalar(self.initial, "initial"))
        steps = integer(self.calibration_steps, "calibration_steps", minimum=1)
        object.__setattr__(self, "calibration_steps", steps)
        object.__setattr__(self, "target_ratio", positive_scalar(self.target_ratio, "target_ratio"))
        if self.target_entropy is not None and (steps != 1 or self.target_ratio != 1.0):
            raise ValueError(
                "calibration_steps and target_ratio set a calibrated target: they need "
                f"target_entropy=None (got target_entropy={self.target_entropy})"
            )

    def config(self) -> dict[str, Any]:
        """The settings; with an absolute target only ``target_entropy`` and ``initial`` (the
        calibration settings are then at their defaults), as state dicts have always held."""
        if self.target_entropy is None:
            return super().config()
        return {"target_entropy": self.target_entropy, "initial": self.initial}

    @property
    def calibrated(self) -> bool:
        """Whether the target is calibrated from the first batches (``target_entropy=None``)."""
        return self.target_entropy is None

    def default_selector(self) -> Selector:
        return Greedy()

    def validate_candidates(self, candidates: np.ndarray) -> None:
        _within_grid(self.initial, candidates, "initial")

    def init_state(self, candidates: np.ndarray) -> base.RuleState:
        if self.calibrated:  # the entropies seen so far, and H* once they are all in (else 0)
            return {"value": self.initial, "entropy_sum": 0.0, "target": 0.0}
        return {"value": self.initial}

    def check_state(self, state: base.RuleState, candidates: np.ndarray, step: int) -> None:
        # the controller's documented bound: a positive temperature inside the candidate range
        value = float(state["value"])
        low, high = float(candidates.min()), float(candidates.max())
        if not (value > 0 and low <= value <= high):
            raise ValueError(
                f"{state_field('value')} must be a temperature > 0 inside the candidate range "
                f"[{low}, {high}], got {value}"
            )
        if not self.calibrated:
            return
        if float(state["entropy_sum"]) < 0:
            raise ValueError(f"{state_field('entropy_sum')} must be >= 0")
        target = float(state["target"])
        if step < self.calibration_steps and (target != 0.0 or value != self.initial):
            raise ValueError(
                f"{state_field('target')} must be 0 and {state_field('value')} the initial "
                f"{self.initial} during the {self.calibration_steps} calibration step(s), at "
                f"step {step}"
            )
        if step >= self.calibration_steps and not target > 0:
            raise ValueError(f"{state_field('target')} must be > 0 after calibration, got {target}")

    def probs(self, state: base.RuleState, ctx: base.Contexts) -> np.ndarray:
        return one_hot(ctx.candidates.shape[0], _nearest(ctx.candidates, state["value"]))

    def select(self, state: base.RuleState, ctx: base.Contexts, rng: np.random.Generator) -> Draw:
        return one_value(ctx, float(state["value"]))

    def update(
        self, state: base.RuleState, ctx: base.Contexts, batch: base.Batch, feedback: base.Feedback
    ) -> tuple[base.RuleState, base.ContextRows, None]:
        candidates = ctx.candidates
        entropy, vocab = feedback["entropy"], feedback["vocab_size"]
        if entropy <= 0:
            raise ValueError(f"entropy must be > 0 for the E3 rule (ln(H*/H)), got {entropy}")
        if vocab < 3:
            raise ValueError(f"vocab_size must be >= 3 for the E3 rule (ln ln V > 0), got {vocab}")
        if self.calibrated and ctx.step < self.calibration_steps:
            total = float(state["entropy_sum"]) + entropy
            done = ctx.step + 1 == self.calibration_steps
            target = self.target_ratio * total / self.calibration_steps if done else 0.0
            calibrating = {"value": float(state["value"]), "entropy_sum": total, "target": target}
            return calibrating, {}, None
        target = float(state["target"] if self.target_entropy is None else self.target_entropy)
        t = float(state["value"])
        t_next = t * (
            1.0
            + t
            * math.log(target / entropy)
            / (math.log(vocab) + math.log(math.log(vocab)))
        )
        bounded = min(max(t_next, float(candidates.min())), float(candidates.max()))
        return {**state, "value": bounded}, {}, None
