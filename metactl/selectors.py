"""Selectors turn the meta-policy's probabilities into one choice per step.

Each selector draws at most one uniform number from the policy's own generator, so two policies
with the same seed and the same history choose identically (on every rank of a distributed run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ._validation import unit_interval

__all__ = ["Greedy", "Nucleus", "Sample", "Selector", "nucleus_support"]

# Cumulative sums of probabilities carry rounding error; a set whose mass is within this of
# top_p counts as reaching it (so top_p = 1 keeps exactly the candidates with positive mass).
_MASS_TOLERANCE = 1e-12


def _inverse_cdf(probs: np.ndarray, u: float) -> int:
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    # u * total can equal cdf[-1] only through rounding; fall back to the last positive entry.
    return min(index, int(np.flatnonzero(probs > 0)[-1]))


def nucleus_support(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest set of candidates, by descending probability, with mass >= top_p.

    Ties are broken by candidate order (stable sort). ``top_p = 0`` keeps only the argmax.

    Example:
        >>> nucleus_support(np.array([0.1, 0.5, 0.3, 0.1]), 0.7).tolist()
        [1, 2]
    """
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    size = int(np.searchsorted(cumulative, top_p - _MASS_TOLERANCE, side="left")) + 1
    return order[: min(size, probs.shape[0])]


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

    Keeps the smallest set of candidates whose probability reaches ``top_p``, renormalises and
    samples. ``top_p = 0`` is argmax; ``top_p = 1`` samples from the whole distribution.

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
