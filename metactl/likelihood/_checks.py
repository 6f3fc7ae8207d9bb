"""Input checks and position bookkeeping shared by the likelihood backends (private)."""

from __future__ import annotations

import numbers
import sys
from typing import TYPE_CHECKING, Any, Union

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

ArrayLike = Union["torch.Tensor", np.ndarray]

# Default CPU buffer per worker thread (bytes of float32 scratch). Measured on a 2-core
# AVX-512 CPU with V = 32768 (benchmarks/likelihood.py): 2 and 4 MiB per worker were within
# noise of each other, 16 MiB was ~30% slower (out of cache), 1 MiB slightly slower
# (per-op dispatch overhead).
_CPU_WORKER_BYTES = 2 << 20
# On accelerators kernel-launch overhead dominates small chunks.
_ACCEL_CHUNK_BYTES = 256 << 20


def _is_torch(x: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if _is_torch(x):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} must be an array or tensor, got {type(x).__name__}")
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise TypeError(f"{name} must be an array or tensor, got {type(x).__name__}") from exc


def _check_chunk_size(chunk_size: object) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def _check_shapes(logits_shape: tuple[int, ...], tokens: np.ndarray, mask: np.ndarray) -> None:
    if len(logits_shape) != 3:
        raise ValueError(
            f"logits must have shape (N, L, V) (3 dims), got {len(logits_shape)} dims "
            f"{tuple(logits_shape)}"
        )
    n, length, vocab = logits_shape
    if n == 0:
        raise ValueError("logits is an empty batch (N = 0)")
    if length == 0 or vocab == 0:
        raise ValueError(
            f"logits must have L >= 1 positions and V >= 1 classes, got {logits_shape}"
        )
    if tokens.shape != (n, length):
        raise ValueError(f"tokens must have shape (N, L) = {(n, length)}, got {tokens.shape}")
    if mask.shape != (n, length):
        raise ValueError(f"mask must have shape (N, L) = {(n, length)}, got {mask.shape}")


def _check_mask_tokens(tokens: np.ndarray, mask: np.ndarray, vocab: int) -> np.ndarray:
    """Validate tokens and mask (host copies); return the boolean mask."""
    if tokens.dtype == np.bool_ or not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
    if mask.dtype == np.bool_:
        bmask = mask
    elif np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating):
        ok = (mask == 0) | (mask == 1)
        if not np.all(ok):
            bad = mask[~ok].ravel()[:3].tolist()
            raise ValueError(f"mask must be boolean or hold only 0/1, found {bad}")
        bmask = mask == 1
    else:
        raise TypeError(f"mask must be boolean or 0/1, got dtype {mask.dtype}")
    counts = bmask.sum(axis=1)
    if np.any(counts == 0):
        rows = np.flatnonzero(counts == 0)[:5].tolist()
        raise ValueError(
            f"mask selects no token in row(s) {rows}: every trajectory needs at least one "
            "completion token"
        )
    sel = tokens[bmask]
    if sel.size and (sel.min() < 0 or sel.max() >= vocab):
        lo, hi = int(sel.min()), int(sel.max())
        raise ValueError(
            f"tokens at masked positions must lie in [0, V) = [0, {vocab}), found range "
            f"[{lo}, {hi}]"
        )
    return bmask


def _segments(bmask: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split every maximal run of masked positions into pieces of at most ``chunk``.

    Returns ``(row, start, stop)`` arrays, one entry per piece, in row-major order.
    """
    n, length = bmask.shape
    padded = np.zeros((n, length + 2), dtype=np.int8)
    padded[:, 1:-1] = bmask
    d = np.diff(padded, axis=1)
    rows, starts = np.nonzero(d == 1)
    _, stops = np.nonzero(d == -1)
    lengths = stops - starts
    pieces = -(-lengths // chunk)
    seg_row = np.repeat(rows, pieces)
    run_start = np.repeat(starts, pieces)
    run_stop = np.repeat(stops, pieces)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    offset = (np.arange(seg_row.size) - first) * chunk
    seg_start = run_start + offset
    seg_stop = np.minimum(seg_start + chunk, run_stop)
    return seg_row, seg_start, seg_stop


def _square_plan(temps: np.ndarray) -> list[tuple[int, bool]]:
    """Order in which to score the temperatures, reusing squares where possible.

    ``exp(u / T)`` squared is ``exp(u / (T / 2))``: one multiply instead of a scaled add and an
    ``exp2``. Temperatures are grouped into halving chains (e.g. 1.2 -> 0.6, 1.4 -> 0.7 in the
    paper's grid). Returns ``(index, square)`` pairs; ``square`` means "square the previous
    buffer".
    """
    order = np.argsort(-temps, kind="stable")  # hottest first
    done = np.zeros(temps.size, dtype=bool)
    plan: list[tuple[int, bool]] = []
    for start in order.tolist():
        if done[start]:
            continue
        done[start] = True
        plan.append((start, False))
        current = start
        while True:
            half = temps[current] / 2.0
            close = np.flatnonzero(~done & np.isclose(temps, half, rtol=1e-9, atol=0.0))
            if close.size == 0:
                break
            current = int(close[0])
            done[current] = True
            plan.append((current, True))
    return plan


def _raise_for_bad_logits(
    z: np.ndarray, rows: np.ndarray, cols: np.ndarray, toks: np.ndarray
) -> None:
    """Raise for the first bad position among logit rows ``z[j] = logits[rows[j], cols[j]]``
    (masked positions, ``toks[j]`` the sampled token): a NaN or ``+inf`` anywhere, or ``-inf``
    at the sampled token. ``-inf`` elsewhere (a banned vocabulary entry) is probability 0 and
    fine. Returns when no position is bad."""
    invalid = np.isnan(z) | (z == np.inf)
    sampled_zero = z[np.arange(z.shape[0]), toks] == -np.inf
    bad = np.flatnonzero(invalid.any(axis=1) | sampled_zero)
    if bad.size == 0:
        return
    j = int(bad[0])
    row, pos = int(rows[j]), int(cols[j])
    if invalid[j].any():
        v = int(np.flatnonzero(invalid[j])[0])
        raise ValueError(
            f"logits[{row}, {pos}, {v}] is {z[j, v]} at a masked position (row {row}, position "
            f"{pos}): logits must not be NaN or +inf there (-inf, probability 0, is allowed "
            "except at the sampled token)"
        )
    tok = int(toks[j])
    raise ValueError(
        f"logits[{row}, {pos}, {tok}] is -inf at the sampled token {tok} (row {row}, position "
        f"{pos}): that token would have probability 0, so it cannot have been sampled from "
        "these logits (check the alignment of logits, tokens and mask)"
    )


def _check_positions_torch(
    logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, toks: torch.Tensor
) -> None:
    """:func:`_raise_for_bad_logits` for positions ``(rows, cols)`` of a torch tensor: the
    test runs on the tensor's device in chunks, and only a bad row is copied to the host."""
    import torch

    vocab = logits.shape[-1]
    budget = _CPU_WORKER_BYTES if logits.device.type == "cpu" else _ACCEL_CHUNK_BYTES
    step = max(1, budget // (4 * vocab))
    for a in range(0, rows.numel(), step):
        r, c, t = rows[a : a + step], cols[a : a + step], toks[a : a + step]
        z = logits[r, c].float()
        bad = (torch.isnan(z) | (z == float("inf"))).any(dim=-1)
        bad |= z.gather(-1, t.view(-1, 1).long()).squeeze(-1) == float("-inf")
        if bool(bad.any()):
            j = int(torch.nonzero(bad)[0, 0])
            _raise_for_bad_logits(
                z[j : j + 1].double().cpu().numpy(),
                r[j : j + 1].cpu().numpy(),
                c[j : j + 1].cpu().numpy(),
                t[j : j + 1].cpu().numpy(),
            )


def default_chunk_size(vocab_size: int, device: str = "cpu", *, workers: int = 1) -> int:
    """Number of positions :func:`candidate_loglik` processes at once by default.

    On CPU each of the ``workers`` threads (torch's intra-op thread count) holds a float32
    buffer of 2 MiB (it stays in a per-core L2 cache), so the chunk is
    ``workers x 2 MiB / (4 V)`` positions. On accelerators the eager path uses one 256 MiB
    buffer (fewer kernel launches).

    Args:
        vocab_size: the vocabulary size ``V`` (>= 1).
        device: a torch device type such as ``"cpu"`` or ``"cuda"``.
        workers: CPU worker threads (>= 1); ignored on accelerators.

    Returns:
        The default chunk size (>= ``workers`` on CPU, >= 1 elsewhere).

    Example:
        >>> default_chunk_size(32768, workers=2)
        32
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if not isinstance(device, str):
        raise TypeError(f"device must be a str such as 'cpu', got {type(device).__name__}")
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if device == "cpu":
        return int(workers) * max(1, _CPU_WORKER_BYTES // (4 * int(vocab_size)))
    return max(1, _ACCEL_CHUNK_BYTES // (4 * int(vocab_size)))
