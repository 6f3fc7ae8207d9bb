"""Sparsemax and softmax: the two normalisers TAMPO can apply across candidates.

Sparsemax (Martins & Astudillo, 2016) is the Euclidean projection onto the probability simplex:
like softmax it is invariant to adding a constant, but it returns exact zeros for entries far
below the maximum, so a trajectory only credits the candidates near its likelihood-optimal one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import softmax as _scipy_softmax

from ._validation import finite_array, integer

__all__ = ["softmax", "sparsemax"]

# Rows whose largest |entry| reaches this are shifted by their maximum (see sparsemax).
_SHIFT_FROM = 1024.0
# Up to this many candidates the cumulative sums run as one vector addition per candidate.
_LOOP_CANDIDATES = 64


def _axis(x: np.ndarray, axis: Any) -> int:
    ax = integer(axis, "axis")
    if not -x.ndim <= ax < x.ndim:
        raise ValueError(f"axis {ax} is out of range for an array of {x.ndim} dimension(s)")
    return ax % x.ndim


def sparsemax(x: Any, axis: int = -1) -> np.ndarray:
    """Project ``x`` onto the probability simplex along ``axis``.

    ``sparsemax(z)_k = max(z_k - tau, 0)`` with the threshold ``tau`` chosen so the result sums
    to 1 (closed form via the sorted cumulative sums; rows with an entry of magnitude >= 1024
    are first shifted by their maximum, so any finite input, however large, gives a
    distribution).

    Example:
        >>> import numpy as np
        >>> sparsemax(np.array([1.0, 0.8, -1.0])).round(6).tolist()
        [0.6, 0.4, 0.0]
        >>> sparsemax(np.array([0.5, 0.5])).tolist()   # ties split evenly
        [0.5, 0.5]
    """
    z = finite_array(x, "x")
    ax = _axis(z, axis)
    z = np.moveaxis(z, ax, -1)
    # Shift large rows by their maximum (the projection is shift-invariant): the cumulative
    # sums then hold differences from the top entry, not the magnitudes, so the "1 +" below is
    # not lost in rounding (a row at -1e14 summed to 0.94 unshifted) and nothing overflows (a
    # constant row at -1e16 gave inf). Rows below _SHIFT_FROM in magnitude (log-likelihoods
    # as TAMPO sees them) lose at most ~1e-13 unshifted and are not shifted (a shift by 0 is
    # exact), so their results keep the bits of earlier metactl versions and resumed runs
    # continue identically. An entry more than the float64 range below the maximum becomes
    # -inf: outside the support, as it must be (anything more than 1 below the maximum is).
    shape = z.shape
    rows = z.reshape(-1, shape[-1])  # (n, K): one row per distribution
    # Reductions run over the candidates of a (K, n) copy: with few candidates and many rows
    # each is K vector operations instead of a short loop per row (the same additions in the
    # same order, so the same bits as summing each row).
    columns = np.ascontiguousarray(rows.T)
    large = np.max(np.abs(columns), axis=0) >= _SHIFT_FROM
    if np.any(large):
        with np.errstate(over="ignore"):
            columns = columns - np.where(large, np.max(columns, axis=0), 0.0)
        rows = columns.T
    ordered = np.ascontiguousarray(np.sort(rows, axis=-1).T[::-1])  # (K, n), descending
    if ordered.shape[0] <= _LOOP_CANDIDATES:  # a vector addition per candidate
        cumsum = np.empty_like(ordered)
        cumsum[0] = ordered[0]
        for j in range(1, ordered.shape[0]):
            np.add(cumsum[j - 1], ordered[j], out=cumsum[j])
    else:
        cumsum = np.cumsum(ordered, axis=0)
    k = np.arange(1, ordered.shape[0] + 1, dtype=np.float64)[:, None]
    # k is in the support iff 1 + k * z_(k) > sum_{j<=k} z_(j); the support is a prefix.
    support = 1.0 + k * ordered > cumsum
    k_z = np.sum(support, axis=0)  # >= 1 always (k = 1 satisfies it)
    tau = (cumsum[k_z - 1, np.arange(k_z.shape[0])] - 1.0) / k_z
    out = np.ascontiguousarray(np.maximum(columns - tau, 0.0).T).reshape(shape)
    return np.moveaxis(out, -1, ax)


def softmax(x: Any, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis`` (shift-invariant, strictly positive).

    Example:
        >>> softmax([0.0, 0.0]).tolist()
        [0.5, 0.5]
    """
    z = finite_array(x, "x")
    return np.asarray(_scipy_softmax(z, axis=_axis(z, axis)))
