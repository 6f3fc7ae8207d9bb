"""Sparsemax and softmax: the two normalisers TAMPO can apply across candidates.

Sparsemax (Martins & Astudillo, 2016) is the Euclidean projection onto the probability simplex:
like softmax it is invariant to adding a constant, but it returns exact zeros for entries far
below the maximum, so a trajectory only credits the candidates near its likelihood-optimal one.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from scipy.special import softmax as _scipy_softmax

from ._validation import finite_array, integer

__all__ = ["softmax", "sparsemax"]

# Rows whose largest |entry| reaches this are shifted by their maximum (see sparsemax).
_SHIFT_FROM = 1024.0
# Batches of at least this many entries (rows x candidates) and at most _NETWORK_CANDIDATES
# candidates loop over the candidates inside one buffer, sorted by a sorting network
# (compare-exchanges of whole candidate vectors); the others run as a few whole-array operations.
_BUFFERED_ENTRIES = 16384
_NETWORK_CANDIDATES = 16
# Up to this many candidates the whole-array cumulative sums run as one vector addition per
# candidate (np.cumsum beyond: the same additions).
_LOOP_CANDIDATES = 64


@functools.cache
def sorting_network(k: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort for ``k`` inputs: compare-exchanges ``(i, j)``, ``i < j``,
    after which position ``j`` holds the larger value. Built for the next power of two and
    pruned of the comparators that touch positions ``>= k`` (as if those held +inf, which no
    comparator moves), so it sorts any ``k``."""
    size = 1 << max(k - 1, 0).bit_length()
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < size:
        step = p
        while step >= 1:
            for j in range(step % p, size - step, 2 * step):
                for i in range(min(step, size - j - step)):
                    if (i + j) // (2 * p) == (i + j + step) // (2 * p) and i + j + step < k:
                        pairs.append((i + j, i + j + step))
            step //= 2
        p *= 2
    return tuple(pairs)


def _sparsemax_rows(rows: np.ndarray) -> np.ndarray:
    """Sparsemax of each row of a finite float64 (n, K) array (left unchanged), without the
    shift of large rows: a new C-contiguous (n, K) array."""
    n, k = rows.shape
    if rows.size < _BUFFERED_ENTRIES or k > _NETWORK_CANDIDATES:
        return _sparsemax_whole_arrays(rows)
    # One (K + 1, n) buffer holds the candidates' vectors (K rows and a spare for the sorting
    # network's exchanges), then the cumulative sums, then (reshaped) the result: fresh large
    # arrays cost page faults that dominate the arithmetic for many rows.
    buf = np.empty((k + 1) * n)
    vectors = buf.reshape(k + 1, n)
    np.copyto(vectors[:k], rows.T)
    # place[i]: the buffer row holding the i-th smallest value of every row
    place = list(range(k + 1))
    for i, j in sorting_network(k):
        spare = place[k]
        np.minimum(vectors[place[i]], vectors[place[j]], out=vectors[spare])
        np.maximum(vectors[place[i]], vectors[place[j]], out=vectors[place[j]])
        place[i], place[k] = spare, place[i]
    # Descending order: the j-th largest is in buffer row place[k - 1 - j]. Its cumulative sum
    # overwrites it once read, added in the order of the sorted values (as np.cumsum does).
    # k is in the support iff 1 + k * z_(k) > sum_{j<=k} z_(j); the support is a prefix, and
    # k = 1 is always in it (1 + z_(1) > z_(1)). The count is int8 (k <= 16): adding the bool
    # test's bytes is then a same-type loop, not a casting one.
    count = np.ones(n, dtype=np.int8)
    scaled = np.empty(n)
    above = np.empty(n, dtype=bool)
    previous = vectors[place[k - 1]]
    for j in range(1, k):
        current = vectors[place[k - 1 - j]]
        np.multiply(current, float(j + 1), out=scaled)
        np.add(1.0, scaled, out=scaled)
        np.add(previous, current, out=current)
        np.greater(scaled, current, out=above)
        np.add(count, above.view(np.int8), out=count)
        previous = current
    # tau from the cumulative sum of the support
    rows_of = np.asarray(place[:k][::-1], dtype=np.int64)  # descending position -> buffer row
    tau = (buf[rows_of[count - 1] * n + np.arange(n)] - 1.0) / count
    out = buf[: n * k].reshape(n, k)
    np.subtract(rows, tau[:, None], out=out)
    np.maximum(out, 0.0, out=out)
    return out


def _sparsemax_whole_arrays(rows: np.ndarray) -> np.ndarray:
    """:func:`_sparsemax_rows` for a small batch or many candidates, with a few whole-array
    operations (fewer numpy calls). The same operations on the same values."""
    k = rows.shape[1]
    ordered = np.ascontiguousarray(np.sort(rows, axis=-1).T[::-1])  # (K, n), descending
    if k <= _LOOP_CANDIDATES:
        cumsum = np.empty_like(ordered)
        cumsum[0] = ordered[0]
        for j in range(1, k):
            np.add(cumsum[j - 1], ordered[j], out=cumsum[j])
    else:
        cumsum = np.cumsum(ordered, axis=0)
    scale = np.arange(1, k + 1, dtype=np.float64)[:, None]
    count = np.sum(1.0 + scale * ordered > cumsum, axis=0)  # >= 1 (k = 1 satisfies it)
    tau = (cumsum[count - 1, np.arange(count.shape[0])] - 1.0) / count
    out = np.empty(rows.shape)  # C-contiguous whatever the layout of rows
    np.subtract(rows, tau[:, None], out=out)
    return np.maximum(out, 0.0, out=out)


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
    shape = z.shape
    out = _sparsemax_checked(z.reshape(-1, shape[-1]))  # (n, K): one row per distribution
    return np.moveaxis(out.reshape(shape), -1, ax)


def sparsemax_rows(x: Any) -> np.ndarray:
    """``sparsemax(x, axis=1)`` of an (n, K) array, bit for bit, without its validating copy
    when ``x`` is already a finite float64 array of two dimensions (as a validated
    :class:`metactl.Feedback` holds); ``x`` is never changed. A new C-contiguous array."""
    if isinstance(x, np.ndarray) and x.dtype == np.float64 and x.ndim == 2 and x.size:
        with np.errstate(over="ignore", invalid="ignore"):
            total = np.sum(x)
        # a finite sum has finite terms (an inf or NaN term makes it inf or NaN); a sum that
        # overflows goes through the validating path below
        if np.isfinite(total):
            return _sparsemax_checked(x)
    return sparsemax(x, axis=1)


def _sparsemax_checked(rows: np.ndarray) -> np.ndarray:
    """Sparsemax of each row of a finite float64 (n, K) array, large rows shifted first."""
    # Shift large rows by their maximum (the projection is shift-invariant): the cumulative
    # sums then hold differences from the top entry, not the magnitudes, so the "1 +" in the
    # support test is not lost in rounding (a row at -1e14 summed to 0.94 unshifted) and
    # nothing overflows (a constant row at -1e16 gave inf). Rows below _SHIFT_FROM in magnitude
    # (log-likelihoods as TAMPO sees them) lose at most ~1e-13 unshifted and are not shifted (a
    # shift by 0 is exact), so their results keep the bits of earlier metactl versions and
    # resumed runs continue identically. An entry more than the float64 range below the
    # maximum becomes -inf: outside the support, as it must be (anything more than 1 below the
    # maximum is).
    if max(float(np.max(rows)), -float(np.min(rows))) >= _SHIFT_FROM:
        columns = np.ascontiguousarray(rows.T)
        large = np.max(np.abs(columns), axis=0) >= _SHIFT_FROM
        with np.errstate(over="ignore"):
            columns = columns - np.where(large, np.max(columns, axis=0), 0.0)
        rows = columns.T
    return _sparsemax_rows(rows)


def softmax(x: Any, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis`` (shift-invariant, strictly positive).

    Example:
        >>> softmax([0.0, 0.0]).tolist()
        [0.5, 0.5]
    """
    z = finite_array(x, "x")
    return np.asarray(_scipy_softmax(z, axis=_axis(z, axis)))
