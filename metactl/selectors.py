"""Selectors turn the meta-policy's probabilities into one choice per context (one per step for
the global policy).

Each selector draws at most one uniform number per context from the policy's own generator, so
two policies with the same seed and the same history choose identically (on every rank of a
distributed run).
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


def _inverse_cdf_rows(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Row-wise inverse CDF: the first index whose cumulative probability exceeds ``u`` times
    the row's total (``searchsorted(..., side="right")``); ``u * total`` can reach the total only
    through rounding, so the last positive entry bounds the result."""
    cdf = np.cumsum(probs, axis=1)
    target = u * cdf[:, -1]
    index = np.sum(cdf <= target[:, None], axis=1)
    k = probs.shape[1]
    last_positive = k - 1 - np.argmax((probs > 0)[:, ::-1], axis=1)
    return np.minimum(index, last_positive)


# Columns (rows of probabilities) from which the running sums over candidates are taken one
# candidate vector at a time: numpy's accumulation along the first axis runs a short inner loop
# per column, which dominates for many columns.
_VECTOR_COLUMNS = 64


def _cumulative_columns(columns: np.ndarray) -> np.ndarray:
    """``np.cumsum(columns, axis=0)`` of a (K, n) array, bit for bit: the running sums added
    one candidate at a time (the first copied), as the accumulation adds them."""
    if columns.shape[1] < _VECTOR_COLUMNS:
        return np.cumsum(columns, axis=0)
    out = np.empty_like(columns)
    out[0] = columns[0]
    for j in range(1, columns.shape[0]):
        np.add(out[j - 1], columns[j], out=out[j])
    return out


def _inverse_cdf_columns(mass: np.ndarray, u: np.ndarray) -> np.ndarray:
    """:func:`_inverse_cdf_rows` of ``mass.T`` for the transposed (K, n) ``mass``, bit for
    bit."""
    cdf = _cumulative_columns(mass)
    index = np.count_nonzero(cdf <= u * cdf[-1], axis=0)
    k = mass.shape[0]
    last_positive = k - 1 - np.argmax((mass > 0)[::-1], axis=0)
    return np.minimum(index, last_positive)


def _kept_totals(ordered: np.ndarray, kept_size: np.ndarray) -> np.ndarray:
    """The sum of each row's first ``kept_size`` entries of ``ordered`` (n, K), each summed as
    a 1-D array of that length (rows of equal length together), as ``nucleus_support``'s
    renormalisation sums its kept set."""
    total = np.empty(ordered.shape[0])
    for length in np.unique(kept_size):
        same = kept_size == length
        total[same] = ordered[same, :length].sum(axis=1)
    return total


# numpy sums a contiguous row of fewer than this many float64 entries as a fixed expression
# (its pairwise summation without a second block): _kept_totals_columns takes it as vectors.
_PAIRWISE_BLOCK = 8
_FIXED_SUM_CANDIDATES = 2 * _PAIRWISE_BLOCK - 1


def _kept_totals_columns(columns: np.ndarray, kept_size: np.ndarray) -> np.ndarray:
    """:func:`_kept_totals` of ``columns.T`` for the transposed (K, n) ``columns``, bit for
    bit, for K < 16. numpy's sum of a contiguous row ``a`` of L < 16 entries is its identity
    0.0 plus, for L < 8, ``a[0] + a[1] + ...`` left to right, and for 8 <= L < 16,
    ``((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))`` followed by ``a[8], a[9], ...``
    left to right (its pairwise summation, whose unrolled block is 8 wide). Every prefix
    length's sum is built as vectors over the n rows, then each row's kept length is read."""
    k, n = columns.shape
    if k > _FIXED_SUM_CANDIDATES:
        return _kept_totals(np.ascontiguousarray(columns.T), kept_size)
    sums = np.empty((k, n))
    sums[0] = columns[0]
    for length in range(2, k + 1):
        if length == _PAIRWISE_BLOCK:
            c = columns
            sums[length - 1] = ((c[0] + c[1]) + (c[2] + c[3])) + ((c[4] + c[5]) + (c[6] + c[7]))
        else:
            np.add(sums[length - 2], columns[length - 1], out=sums[length - 1])
    np.add(0.0, sums, out=sums)  # the identity (turns a -0.0 sum into 0.0, as numpy's does)
    return sums[kept_size - 1, np.arange(n)]


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
    """Base class. A selector implements ``select_rows(probs (n, K), rng) -> (indices (n,),
    probabilities (n,))``, one choice per row (the global policy is one row); ``select(probs
    (K,), rng)`` is the one-row case. A custom selector may implement ``select`` alone: it then
    serves global policies (one row per step); per-prompt policies need ``select_rows``."""

    name: ClassVar[str] = "Selector"

    @property
    def vectorised(self) -> bool:
        """Whether the selector implements ``select_rows`` itself."""
        return type(self).select_rows is not Selector.select_rows

    def select_rows(
        self, probs: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        if type(self).select is Selector.select:
            raise NotImplementedError(f"{type(self).__name__} implements neither select_rows "
                                      "nor select")  # fmt: skip
        chosen = [self.select(row, rng) for row in probs]
        return (
            np.array([index for index, _ in chosen], dtype=np.int64),
            np.array([prob for _, prob in chosen], dtype=np.float64),
        )

    def select(self, probs: np.ndarray, rng: np.random.Generator) -> tuple[int, float]:
        """Choose one index from ``probs`` (K,): ``(index, probability of that index)``."""
        index, prob = self.select_rows(np.asarray(probs, dtype=np.float64)[None, :], rng)
        return int(index[0]), float(prob[0])

    def config(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class Nucleus(Selector):
    """Nucleus (top-p) sampling over candidates, the paper's selector (``top_p = 0.7``).

    Keeps the smallest set of candidates whose probability reaches ``top_p`` together with every
    candidate tied with its least probable member (see :func:`nucleus_support`: ties are kept,
    so from the uniform start every candidate can be chosen), renormalises and samples.
    ``top_p = 0`` is argmax (uniform among tied maxima); ``top_p = 1`` samples from the whole
    distribution. Draws exactly one uniform number per row from the policy's generator.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> Nucleus(top_p=0.0).select(np.array([0.2, 0.5, 0.3]), rng)
        (1, 1.0)
    """

    top_p: float = 0.7
    name: ClassVar[str] = "Nucleus"

    def __post_init__(self) -> None:
        object.__setattr__(self, "top_p", unit_interval(self.top_p, "top_p"))

    def select_rows(
        self, probs: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        n, k = probs.shape
        rows = np.arange(n)
        order = np.argsort(-probs, axis=1, kind="stable")
        # each row descending, C-contiguous (a take from the flattened rows: fewer index arrays)
        ordered = np.take(probs, order + (rows * k)[:, None])
        # The per-candidate steps run on the transposed (K, n) copy: a vector operation per
        # candidate instead of a short inner loop per row, the same additions in the same order.
        columns = np.ascontiguousarray(ordered.T)
        cumulative = _cumulative_columns(columns)  # np.cumsum(ordered, axis=1).T, bit for bit
        reach = np.count_nonzero(cumulative < self.top_p - _MASS_TOLERANCE, axis=0) + 1
        size = np.minimum(reach, k)
        boundary = columns[size - 1, rows]
        # Each row is non-increasing, so its positive entries tied with the boundary (within
        # TIE_ULPS) form a prefix, which covers the first `size` entries unless the boundary
        # is 0: the kept set is the longer of the two (the boundary's run of ties included).
        tied = (columns >= boundary - TIE_ULPS * np.spacing(boundary)) & (columns > 0)
        kept_size = np.maximum(size, np.count_nonzero(tied, axis=0))
        kept = np.where(np.arange(k)[:, None] < kept_size, columns, 0.0)
        mass = kept / _kept_totals_columns(columns, kept_size)
        u = np.asarray(rng.random(n), dtype=np.float64)
        choice = np.where(kept_size > 1, _inverse_cdf_columns(mass, u), 0)
        return order[rows, choice].astype(np.int64), mass[choice, rows]

    def config(self) -> dict[str, Any]:
        return {"top_p": self.top_p}


@dataclass(frozen=True)
class Sample(Selector):
    """Sample a candidate in proportion to its probability (one uniform draw per row).

    Example:
        >>> Sample().select(np.array([0.0, 1.0]), np.random.default_rng(0))
        (1, 1.0)
    """

    name: ClassVar[str] = "Sample"

    def select_rows(
        self, probs: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        u = np.asarray(rng.random(probs.shape[0]), dtype=np.float64)
        index = _inverse_cdf_rows(probs, u)
        return index.astype(np.int64), probs[np.arange(probs.shape[0]), index] / probs.sum(axis=1)


@dataclass(frozen=True)
class Greedy(Selector):
    """Always the most probable candidate (ties: the first); draws no random number.

    Example:
        >>> Greedy().select(np.array([0.3, 0.4, 0.3]), np.random.default_rng(0))
        (1, 1.0)
    """

    name: ClassVar[str] = "Greedy"

    def select_rows(
        self, probs: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        return np.argmax(probs, axis=1).astype(np.int64), np.ones(probs.shape[0])


SELECTORS: dict[str, type[Selector]] = {cls.name: cls for cls in (Nucleus, Sample, Greedy)}
