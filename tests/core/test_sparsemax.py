"""The vectorised sparsemax against the plain closed form (sort, cumulative sums, support), bit
for bit: TAMPO's recorded decision streams depend on every bit of its weights."""

from __future__ import annotations

import numpy as np
import pytest

from metactl.sparsemax import sorting_network, sparsemax, sparsemax_rows


def _reference(x: np.ndarray) -> np.ndarray:
    """Sparsemax of each row of a finite (n, K) array: the textbook closed form, with the rows
    of magnitude >= 1024 shifted by their maximum (as metactl documents)."""
    rows = x.astype(np.float64)
    large = np.max(np.abs(rows), axis=1) >= 1024.0
    with np.errstate(over="ignore"):
        rows = rows - np.where(large, np.max(rows, axis=1), 0.0)[:, None]
    ordered = np.sort(rows, axis=1)[:, ::-1]
    cumsum = np.cumsum(ordered, axis=1)
    k = np.arange(1, rows.shape[1] + 1, dtype=np.float64)
    k_z = np.sum(1.0 + k * ordered > cumsum, axis=1)
    tau = (cumsum[np.arange(rows.shape[0]), k_z - 1] - 1.0) / k_z
    return np.maximum(rows - tau[:, None], 0.0)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(
        np.array_equal(a.view(np.int64), b.view(np.int64))
    )


@pytest.mark.parametrize("k", range(1, 17))
def test_sorting_network_sorts_every_zero_one_input(k: int) -> None:
    # the 0-1 principle: a comparator network that sorts every 0/1 input sorts every input
    lanes = ((np.arange(2**k)[None, :] >> np.arange(k)[:, None]) & 1).astype(np.float64)
    for i, j in sorting_network(k):
        assert 0 <= i < j < k
        lanes[i], lanes[j] = np.minimum(lanes[i], lanes[j]), np.maximum(lanes[i], lanes[j])
    assert np.all(np.diff(lanes, axis=0) >= 0)


def _batch(rng: np.random.Generator, kind: int, n: int, k: int) -> np.ndarray:
    if kind == 0:  # log-likelihoods as TAMPO sees them
        return rng.normal(-1.0, 0.3, (n, k))
    if kind == 1:  # ties
        return rng.integers(-3, 3, (n, k)).astype(np.float64) * 0.5
    if kind == 2:  # signed zeros
        signed = np.where(rng.random((n, k)) < 0.5, 0.0, -0.0)
        return signed + rng.integers(0, 2, (n, k)) * rng.normal(size=(n, k))
    if kind == 3:  # every scale, some rows shifted
        return rng.normal(size=(n, k)) * 10.0 ** rng.integers(-300, 300, (n, 1))
    values = [-1e308, 1e308, 0.0, -0.0, 1.0, 5e-324, -1023.9999, 1024.0]
    return rng.choice(values, size=(n, k))


@pytest.mark.filterwarnings("ignore:overflow encountered")  # rows near the float64 limit
@pytest.mark.parametrize("k", [1, 2, 3, 7, 10, 16, 17, 40, 70])
def test_sparsemax_matches_the_closed_form_bit_for_bit(k: int) -> None:
    rng = np.random.default_rng(k)
    for kind in range(5):
        # small batches run as whole-array operations, large ones (>= 16384 entries) in a buffer
        for n in (1, 5, 300, 16384 // k + 1):
            x = _batch(rng, kind, n, k)
            with np.errstate(over="ignore", invalid="ignore"):
                expected = _reference(x)
            for given in (x, np.asfortranarray(x)):
                for out in (sparsemax(given, axis=1), sparsemax_rows(given)):
                    assert _same_bits(out, expected), (kind, n)
                    assert out.flags.c_contiguous
            assert _same_bits(sparsemax(x.T, axis=0), expected.T)
            assert _same_bits(sparsemax(x[None], axis=-1)[0], expected)


def test_sparsemax_rows_leaves_its_input_and_validates() -> None:
    x = np.random.default_rng(0).normal(size=(64, 10))
    before = x.copy()
    out = sparsemax_rows(x)
    assert _same_bits(x, before)
    assert out.flags.c_contiguous and not np.shares_memory(out, x)
    x[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        sparsemax_rows(x)
    assert _same_bits(sparsemax_rows([[1.0, 0.8, -1.0]]), sparsemax(np.array([[1.0, 0.8, -1.0]])))
