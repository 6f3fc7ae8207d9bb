"""Selectors turn the meta-policy's probabilities into one choice per step.

Each selector draws at most one uniform number from the policy's own generator, so two policies
with the same seed and the same history choose identically (on every rank of a distributed run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ._validation import unit_interval

__all__ = ["TIE_ULPS", "Greedy", "Nucleus", "Sample", "Selector", "nucleus_support"]

# Cumulative sums of probabilities carry rounding error; a set whose mass is within this of
# top_p counts as reaching it (so top_p = 1 keeps exactly the candidates with positive mass).
_MASS_TOLERANCE = 1e-12
# Two probabilities count as tied when they differ by at most this many units in the last place
# of the boundary probability (ulp-relative, so the rule is the same at every scale). Equal
# mathematical values computed along different paths (a renormalising division, a sum in another
# order) differ by a few ulps; sampling cannot tell such values apart, so neither does the cut.
TIE_ULPS = 8


def _inverse_cdf(probs: np.ndarray, u: float) -> int:
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    # u * total can equal cdf[-1] only through rounding; fall back to the last positive entry.
    return min(index, int(np.flatnonzero(probs > 0)[-1]))


def nucleus_support(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest set of candidates, by descending probability, with mass >= top_p,
    plus every candidate tied with the set's least probable member (fair ties).

    Ties at the boundary are kept, not broken: when the smallest set would have to choose
    between equally probable candidates, all of them stay in, and the selector then samples
    from the kept set in proportion to the (renormalised) probabilities. So from a uniform
    distribution every candidate can be chosen, whatever ``top_p``; breaking ties by candidate
    order would instead always keep the lowest-indexed ones. Deterministic: no random number is
    drawn for ties. Two probabilities are tied when they differ by at most ``TIE_ULPS`` (8)
    units in the last place of the boundary probability (``numpy.spacing``); candidates with
    probability 0 are never kept. The indices come in descending probability (stable order
    among equal values). ``top_p = 0`` keeps the argmax (all of them if several tie).

    Example:
        >>> nucleus_support(np.array([0.1, 0.5, 0.3, 0.1]), 0.7).tolist()
        [1, 2]
        >>> nucleus_support(np.full(4, 0.25), 0.5).tolist()   # a tie at the boundary: keep all
        [0, 1, 2, 3]
    """
    order = np.argsort(-probs, kind="stable")
    ordered = probs[order]
    cumulative = np.cumsum(ordered)
    reach = int(np.searchsorted(cumulative, top_p - _MASS_TOLERANCE, side="left")) + 1
    size = min(reach, probs.shape[0])
    boundary = float(ordered[size - 1])
    # ``ordered`` is non-increasing, so the candidates tied with the boundary directly follow it.
    tied = (ordered[size:] >= boundary - TIE_ULPS * np.spacing(boundary)) & (ordered[size:] > 0)
    extra = int(np.argmin(tied)) if not np.all(tied) else int(tied.shape[0])
    return order[: size + extra]


class Selector:
    """Base class: ``select(probs, rng) -> (index, probability of that index)``."""

    name: ClassVar[str] = "Selector"

    def select(self, probs: np.ndarray, rng: np.random.Generator) -> tuple[int, float]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class Nucleus(Selector):
    """Nucleus (top-p) sampling over candidates, the paper's selector (``top_p = 0.7``).

    Keeps the smallest set of candidates whose probability reaches ``top_p`` together with every
    candidate tied with its least probable member (see :func:`nucleus_support`: ties are kept,
    so from the uniform start every candidate can be chosen), renormalises and samples.
    ``top_p = 0`` is argmax (uniform among tied maxima); ``top_p = 1`` samples from the whole
    distribution. Draws exactly one uniform number from the policy's generator.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> Nucleus(top_p=0.0).select(np.array([0.2, 0.5, 0.3]), rng)
        (1, 1.0)
    """

    top_p: float = 0.7
    name: ClassVar[str] = "Nucleus"

    def __post_init__(self) -> None:
        object.__setattr__(self, "top_p", unit_interval(self.top_p, "top_p"))

    def select(self, probs: np.ndarray, rng: np.random.Generator) -> tuple[int, float]:
        kept = nucleus_support(probs, self.top_p)
        mass = probs[kept] / probs[kept].sum()
        u = rng.random()
        choice = _inverse_cdf(mass, u) if kept.shape[0] > 1 else 0
        return int(kept[choice]), float(mass[choice])

    def config(self) -> dict[str, Any]:
        return {"top_p": self.top_p}


@dataclass(frozen=True)
class Sample(Selector):
    """Sample a candidate in proportion to its probability.

    Example:
        >>> Sample().select(np.array([0.0, 1.0]), np.random.default_rng(0))
        (1, 1.0)
    """

    name: ClassVar[str] = "Sample"

    def select(self, probs: np.ndarray, rng: np.random.Generator) -> tuple[int, float]:
        index = _inverse_cdf(probs, rng.random())
        return index, float(probs[index] / probs.sum())


@dataclass(frozen=True)
class Greedy(Selector):
    """Always the most probable candidate (ties: the first); draws no random number.

    Example:
        >>> Greedy().select(np.array([0.3, 0.4, 0.3]), np.random.default_rng(0))
        (1, 1.0)
    """

    name: ClassVar[str] = "Greedy"

    def select(self, probs: np.ndarray, rng: np.random.Generator) -> tuple[int, float]:
        return int(np.argmax(probs)), 1.0


SELECTORS: dict[str, type[Selector]] = {cls.name: cls for cls in (Nucleus, Sample, Greedy)}
