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

__all__ = [
    "STATE_FIELD",
    "Feedback",
    "Rule",
    "RuleState",
    "check_counts",
    "check_max_is_zero",
    "state_field",
]

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
    # How the rule uses the candidates (checked by MetaPolicy against its hyperparameter):
    # "indices": only K and the chosen index (any candidates work, a joint KnobGrid too);
    # "values": reads the candidate values as numbers (the candidate nearest a configured value)
    # but decides on the grid; "continuous": produces off-grid values between the candidates
    # (schedules, entropy controllers, PTGS). A joint policy takes "indices" rules only, an
    # integer knob (top_k) refuses "continuous" ones. The default is the cautious "values".
    candidate_use: ClassVar[str] = "values"
    # The sampler knobs the rule can drive: None for any knob (the rule ranks candidates without
    # reading a direction into their values); ("temperature",) for rules whose update moves the
    # value in a direction that only means something for a temperature (heat / cool).
    knobs: ClassVar[tuple[str, ...] | None] = None

    @property
    def loglik_reduction(self) -> str:
        """How the rule expects ``loglik`` rows reduced over tokens: ``"mean"`` (per-token
        mean, TAMPO's paper form) or ``"sum"`` (the whole completion)."""
        return "mean"

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

    def check_state(self, state: RuleState, candidates: np.ndarray, step: int) -> None:
        """Raise ``ValueError`` naming the field if ``state`` cannot be this rule's state after
        ``step`` updates. ``state`` already has the keys and shapes of :meth:`init_state`,
        every entry finite. Rules with further invariants (counts, bounds) override this."""

    def validate_state(self, state: RuleState, candidates: np.ndarray, step: int) -> None:
        """:meth:`check_state`, then check that :meth:`probs` is computed without a
        floating-point overflow or invalid operation and gives a distribution (finite,
        non-negative, summing to 1). Used on every load and after every update."""
        self.check_state(state, candidates, step)
        try:
            with np.errstate(over="raise", invalid="raise", divide="raise"):
                probs = np.asarray(self.probs(state, candidates, step), dtype=np.float64)
        except FloatingPointError as exc:
            raise ValueError(f"{STATE_FIELD}: its probabilities overflow float64 ({exc})") from exc
        k = candidates.shape[0]
        if (
            probs.shape != (k,)
            or not np.all(np.isfinite(probs))
            or np.any(probs < 0)
            or abs(float(probs.sum()) - 1.0) > 1e-9
        ):
            raise ValueError(f"{STATE_FIELD} gives no probability distribution: {probs.tolist()}")

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


STATE_FIELD = "state_dict['rule_state']"

# Counts are stored as float64: below 2**53 every integer, and every increment by 1, is exact.
MAX_COUNT = 2**53


def state_field(key: str) -> str:
    """How errors name one entry of a rule's state."""
    return f"{STATE_FIELD}[{key!r}]"


def check_counts(state: RuleState, key: str, step: int) -> np.ndarray:
    """``state[key]`` holds per-candidate counts: non-negative integers (below ``MAX_COUNT``)
    that sum to ``step``, since every update adds 1 to one count. Returns the counts."""
    counts = np.asarray(state[key])
    name = state_field(key)
    if np.any(counts < 0) or np.any(counts != np.floor(counts)) or np.any(counts >= MAX_COUNT):
        raise ValueError(
            f"{name} must hold non-negative integers below 2**53, got {counts.tolist()}"
        )
    if float(counts.sum()) != step:
        raise ValueError(
            f"{name} sums to {float(counts.sum())} but the policy made {step} update(s): "
            "each update adds one count"
        )
    return counts


def check_max_is_zero(state: RuleState, key: str) -> None:
    """Logits or log-weights are stored shifted so that their maximum is exactly 0 (the same
    softmax, and bounded values)."""
    values = np.asarray(state[key])
    if float(values.max()) != 0.0:
        raise ValueError(
            f"{state_field(key)} must have maximum exactly 0 (stored shifted), got "
            f"{float(values.max())}"
        )


def one_hot(k: int, index: int) -> np.ndarray:
    out = np.zeros(k)
    out[index] = 1.0
    return out
