"""The contract every update rule follows.

A rule is a small frozen config (validated in ``__post_init__``) plus pure functions of an
explicit state: ``init_state`` builds it, ``probs`` reads the distribution off it, ``update``
returns a new one. :class:`metactl.MetaPolicy` owns the state, the step counter and the RNG.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from ..decision import Decision
from ..selectors import Sample, Selector

__all__ = ["Feedback", "Rule", "RuleState"]

RuleState = dict[str, Any]
"""A rule's state: numpy float64 arrays and Python scalars only (so it serialises to JSON)."""

Feedback = dict[str, Any]
"""Validated feedback: ``loglik`` (N, K) and ``advantages`` (N,) arrays, ``reward``,
``entropy`` floats, ``vocab_size`` int."""


class Rule:
    """Base class of the update rules and controllers.

    Subclasses set ``requires`` (the feedback names ``update`` needs) and implement
    ``init_state``, ``probs`` and ``update``. Rules that pick their own index (UCB1, Fixed, ...)
    override ``choose``; rules with a continuous output (schedules) override ``decision_value``.
    """

    requires: ClassVar[tuple[str, ...]] = ()
    # True when the update depends on ``loglik`` only through advantage-weighted terms, so a
    # trajectory with advantage 0 contributes exactly nothing whatever its likelihoods: a trainer
    # may skip scoring such rows and pass any finite ``loglik`` values for them (e.g. zeros).
    zero_advantage_rows_ignored: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return type(self).__name__

    def config(self) -> dict[str, Any]:
        """The rule's settings as a JSON-safe dict (its dataclass fields)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def default_selector(self) -> Selector:
        return Sample()

    def validate_candidates(self, candidates: np.ndarray) -> None:
        """Raise if the rule cannot work on this candidate grid (default: any grid works)."""

    def init_state(self, candidates: np.ndarray) -> RuleState:
        raise NotImplementedError

    def probs(self, state: RuleState, candidates: np.ndarray, step: int) -> np.ndarray:
        raise NotImplementedError

    def update(
        self, state: RuleState, candidates: np.ndarray, decision: Decision, feedback: Feedback
    ) -> tuple[RuleState, np.ndarray | None]:
        """Return the new state and the per-candidate signal of this batch (or None)."""
        raise NotImplementedError

    def choose(
        self, state: RuleState, candidates: np.ndarray, step: int, rng: np.random.Generator
    ) -> int | None:
        """Pick the index directly, or return None to let the selector sample ``probs``."""
        return None

    def decision_value(
        self, state: RuleState, candidates: np.ndarray, step: int, index: int
    ) -> float:
        """The value to apply for a decision at ``index`` (default: that candidate)."""
        return float(candidates[index])


def one_hot(k: int, index: int) -> np.ndarray:
    out = np.zeros(k)
    out[index] = 1.0
    return out
