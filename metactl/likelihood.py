"""Trajectory log-likelihoods under every candidate sampling hyperparameter.

TAMPO (and every full-information rule in metactl) needs, for each sampled trajectory
``i`` and each candidate value ``c_k``, the length-normalised log-likelihood of the tokens
that were actually sampled, had they been sampled with ``c_k``:

.. math::

    L[i, k] = \\frac{1}{|\\tau_i|} \\sum_{t \\in \\tau_i} \\log q_{c_k}(o_{i,t} \\mid z_{i,t})

where ``z`` are the raw (un-tempered) logits the rollout policy produced and ``o`` the sampled
tokens. :func:`candidate_loglik` computes this matrix from logits that a trainer already holds
(the rollout / old-logprob pass), chunked over positions so that its extra memory is one chunk
of positions, never ``K`` copies of the logits. :func:`likelihood_optimal` turns it into the
per-trajectory likelihood-optimal candidate (the paper's ``T*``).

Implementations: on CPU, worker threads score chunks of positions with single-threaded torch
ops in cache-sized buffers (``exp2`` on scaled logits, one pass per candidate, squaring where
one temperature is half another); on CUDA a fused Triton kernel reads each logit row twice
and keeps the ``K`` sums in registers (an eager chunked loop is the fallback). This module
never imports torch at import time: torch is imported only when torch tensors are passed in.
NumPy input is handled by a pure NumPy implementation (float64).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import numbers
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Union, cast

import numpy as np

from ._validation import candidate_values

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["FAMILIES", "candidate_loglik", "default_chunk_size", "likelihood_optimal"]

#: Sampling families understood by :func:`candidate_loglik`.
FAMILIES: tuple[str, ...] = ("temperature", "min_p")

_LN2 = math.log(2.0)
_INV_LN2 = 1.0 / _LN2

# Default CPU buffer per worker thread (bytes of float32 scratch). Measured on a 2-core
# AVX-512 CPU with V = 32768 (benchmarks/likelihood.py): 2 and 4 MiB per worker were within
# noise of each other, 16 MiB was ~30% slower (out of cache), 1 MiB slightly slower
# (per-op dispatch overhead).
_CPU_WORKER_BYTES = 2 << 20
# Temperature family with vocab * K at most this: score blocks of positions (across rows) for
# all K candidates in one vectorised (positions, K, V) step. Per-segment Python work would
# otherwise dominate (tiny vocabularies, short completions, many rows).
_SMALL_VOCAB_ELEMENTS = 1 << 10
# On accelerators kernel-launch overhead dominates small chunks.
_ACCEL_CHUNK_BYTES = 256 << 20

ArrayLike = Union["torch.Tensor", np.ndarray]


# --------------------------------------------------------------------------------------
# validation helpers (private; may move to metactl/_validation.py)
# --------------------------------------------------------------------------------------


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


def _check_family(family: object) -> str:
    if not isinstance(family, str):
        raise TypeError(f"family must be a str, one of {FAMILIES}, got {type(family).__name__}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return family


def _check_real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def _check_candidates(candidates: object, family: str) -> np.ndarray:
    return candidate_values(_to_numpy(candidates, "candidates"), family)


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


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------


def candidate_loglik(
    logits: ArrayLike,
    tokens: ArrayLike,
    mask: ArrayLike,
    candidates: Sequence[float] | ArrayLike,
    family: str = "temperature",
    *,
    temperature: float = 1.0,
    epsilon: float = 1e-3,
    chunk_size: int | None = None,
    fused: bool | None = None,
) -> ArrayLike:
    r"""Length-normalised log-likelihood of sampled tokens under every candidate value.

    Args:
        logits: ``(N, L, V)`` raw (un-tempered) logits, already aligned so that
            ``logits[:, t]`` scores ``tokens[:, t]``. A torch tensor (any device, any float
            dtype; the computation runs in float32 on that device) or a NumPy array (computed
            in float64 with NumPy; meant for small inputs). Only the masked positions are
            read (and checked): NaN and ``+inf`` are errors; ``-inf`` (a banned vocabulary
            entry, probability 0) is allowed everywhere except at the sampled token.
        tokens: ``(N, L)`` integer token ids; at masked positions they must lie in
            ``[0, V)`` (unmasked positions may hold anything, e.g. ``-100``).
        mask: ``(N, L)`` boolean or 0/1: 1 for the completion tokens to count, 0 for prompt
            and padding. Every row needs at least one selected position.
        candidates: ``K >= 2`` unique finite candidate values: temperatures (``> 0``) for
            ``family="temperature"``, min-p thresholds in ``[0, 1)`` for ``family="min_p"``.
        family: ``"temperature"`` or ``"min_p"``.
        temperature: the fixed sampling temperature of the ``"min_p"`` family (must stay
            ``1.0`` for ``"temperature"``, where the candidates are the temperatures).
        epsilon: smoothing weight of the ``"min_p"`` family, in ``(0, 1)`` (see below).
        chunk_size: number of positions processed at once (default:
            :func:`default_chunk_size`, 2 MiB of float32 per CPU worker thread, 256 MiB on
            accelerators). The extra memory is ``chunk_size x V`` float32 values of scratch
            (on CPU split between the worker threads) plus O(``chunk_size x K`` +
            ``N x L``) bookkeeping; the input is never copied whole and never modified. The
            fused CUDA kernel needs no ``chunk_size x V`` buffer at all (its default is 65536
            positions per launch). On CPU, torch's intra-op thread count ``W`` sets how many
            threads score chunks in parallel (each with single-threaded ops, which stays fast
            when other processes share the cores); ``torch.set_num_threads(1)`` makes it
            sequential. Results do not depend on ``W`` or ``chunk_size`` beyond rounding.
            Small problems (temperature family with ``V x K <= 1024``, e.g. character-level
            vocabularies) are scored in blocks of ``chunk_size`` masked positions taken across
            rows, all ``K`` candidates at once (a ``chunk_size x K x V`` block, default
            2 MiB), since per-row work would dominate there.
        fused: temperature family on CUDA only: score with a fused Triton kernel that reads
            each logit row twice and keeps the ``K`` sums in registers (no scratch buffer).
            ``None`` (default) uses it when the logits are a CUDA tensor and ``triton``
            imports, ``False`` never does, ``True`` requires it (ValueError otherwise).

    Returns:
        ``(N, K)`` array: ``out[i, k]`` is the mean over the masked positions ``t`` of row
        ``i`` of ``log q_k(tokens[i, t] | logits[i, t])``. A float32 tensor on the logits'
        device for torch input, a float64 NumPy array for NumPy input. Column ``k``
        corresponds to ``candidates[k]`` (in the given order).

    Families:
        * ``"temperature"``: ``q_k = softmax(z / T_k)``, i.e.
          ``out[i, k] = mean_t (z[o]/T_k - logsumexp(z/T_k))``.
        * ``"min_p"``: sampling at the fixed ``temperature`` with min-p truncation. With
          ``p = softmax(z / temperature)`` the kept set is ``{v : p_v >= min_p_k * max(p)}``
          (the most likely token is always kept; ``min_p = 0`` keeps everything) and
          ``p_trunc = p * [kept] / sum(p[kept])``. A sampled token outside the kept set would
          have probability 0 (log-likelihood ``-inf``), so the distribution is smoothed with
          the full distribution: ``q_k = (1 - epsilon) * p_trunc + epsilon * p``. This is a
          proper distribution, equals ``p_trunc`` up to a factor ``(1 - epsilon)`` on kept
          tokens (plus ``epsilon * p``) and gives a dropped token ``log(epsilon * p_o)``.
          The kept-set test is evaluated in float32 (torch) or float64 (NumPy), so a token
          whose probability ratio ties ``min_p`` to rounding may fall on either side.

    Raises:
        TypeError: a wrong argument type (names the argument).
        ValueError: NaN/``+inf`` logits at a masked position or ``-inf`` at a masked
            sampled token (the message names the row and position), wrong ndim or shapes, an empty
            batch, token ids out of range, a row with no masked token (``mask``), ``K < 2``,
            duplicate / non-finite / out-of-range candidates, an unknown family, a bad
            ``temperature``, ``epsilon`` or ``chunk_size``, or ``fused=True`` where the
            fused kernel cannot run.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> logits = rng.normal(size=(2, 5, 7))
        >>> tokens = rng.integers(0, 7, size=(2, 5))
        >>> mask = np.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=bool)
        >>> L = candidate_loglik(logits, tokens, mask, [0.7, 1.0, 1.3])
        >>> L.shape, L.dtype
        ((2, 3), dtype('float64'))
        >>> bool(np.all(L <= 0))
        True
    """
    family = _check_family(family)
    cands = _check_candidates(candidates, family)
    temp = _check_real(temperature, "temperature")
    if temp <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if family == "temperature" and temp != 1.0:
        raise ValueError(
            "temperature applies only to the 'min_p' family; for family='temperature' the "
            f"candidates are the temperatures (got temperature={temperature!r})"
        )
    eps = _check_real(epsilon, "epsilon")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"epsilon must lie in (0, 1), got {epsilon!r}")
    chunk = _check_chunk_size(chunk_size)
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused must be True, False or None, got {fused!r}")

    if _is_torch(logits):
        lg = cast("torch.Tensor", logits)
        use_fused = _want_fused(lg, family, fused)
        return _loglik_torch(lg, tokens, mask, cands, family, temp, eps, chunk, use_fused)
    if fused:
        raise ValueError("fused=True needs CUDA torch tensors (and triton); got a numpy array")
    if not isinstance(logits, np.ndarray):
        raise TypeError(
            f"logits must be a torch.Tensor or numpy.ndarray, got {type(logits).__name__}"
        )
    return _loglik_numpy(logits, tokens, mask, cands, family, temp, eps, chunk)


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


def likelihood_optimal(loglik: ArrayLike, candidates: Sequence[float] | ArrayLike) -> np.ndarray:
    """Per-trajectory likelihood-optimal candidate (the paper's ``T*``).

    Args:
        loglik: ``(N, K)`` log-likelihoods (e.g. from :func:`candidate_loglik`), NumPy array
            or torch tensor; must be finite.
        candidates: the ``K`` candidate values, column ``k`` of ``loglik`` scoring
            ``candidates[k]``.

    Returns:
        ``(N,)`` float64 array: ``candidates[argmax_k loglik[i, k]]``; ties go to the smaller
        index ``k``.

    Raises:
        TypeError: non-numeric input.
        ValueError: wrong shapes, ``N = 0``, ``K < 2``, non-finite values, duplicate or
            non-finite candidates.

    Example:
        >>> likelihood_optimal([[-1.0, -0.5, -0.5], [-0.1, -2.0, -3.0]], [0.8, 1.0, 1.2])
        array([1. , 0.8])
    """
    cands = candidate_values(_to_numpy(candidates, "candidates"), "generic")
    arr = _to_numpy(loglik, "loglik")
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise TypeError(f"loglik must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"loglik must have shape (N, K), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("loglik is an empty batch (N = 0)")
    if arr.shape[1] != cands.size:
        raise ValueError(
            f"loglik has {arr.shape[1]} columns but candidates has {cands.size} values"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError("loglik must be finite (found NaN or inf)")
    return cands[np.argmax(arr, axis=1)]


# --------------------------------------------------------------------------------------
# torch implementation
# --------------------------------------------------------------------------------------


def _loglik_torch(
    logits: torch.Tensor,
    tokens: Any,
    mask: Any,
    cands: np.ndarray,
    family: str,
    temp: float,
    eps: float,
    chunk: int | None,
    use_fused: bool = False,
) -> torch.Tensor:
    import torch

    if not logits.is_floating_point():
        raise TypeError(f"logits must hold floating-point values, got dtype {logits.dtype}")
    logits = logits.detach()  # a view; grad mode is thread-local, so also for the workers
    tok_host = _to_numpy(tokens, "tokens")
    mask_host = _to_numpy(mask, "mask")
    _check_shapes(tuple(logits.shape), tok_host, mask_host)
    n, _, vocab = logits.shape
    bmask = _check_mask_tokens(tok_host, mask_host, vocab)
    device = logits.device
    if use_fused:
        return _loglik_fused(logits, tokens, tok_host, bmask, cands, chunk or 65536)
    if family == "temperature" and vocab * cands.size <= _SMALL_VOCAB_ELEMENTS:
        return _loglik_blocks(logits, tokens, tok_host, bmask, cands, chunk)

    workers = _cpu_workers(torch) if device.type == "cpu" else 1
    if chunk is None:
        chunk = default_chunk_size(vocab, device.type, workers=workers)
    # with W workers, each holds a buffer of chunk // W positions: one chunk in all
    seg_row, seg_start, seg_stop = _segments(bmask, max(1, chunk // workers))
    n_seg = seg_row.size
    workers = min(workers, n_seg)

    # Segments hold masked positions only, so placeholders (e.g. -100) are never gathered.
    if _is_torch(tokens):
        tok_src = tokens.detach()
    else:
        tok_src = torch.from_numpy(np.ascontiguousarray(tok_host))

    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    k = cands.size
    partial = torch.empty((n_seg, k), dtype=acc_dtype, device=device)
    bad = torch.zeros(n_seg, dtype=torch.bool, device=device)
    longest = int((seg_stop - seg_start).max())
    betas = torch.tensor(
        1.0 / cands if family == "temperature" else cands, dtype=torch.float32, device=device
    )

    if family == "temperature":
        plan = _square_plan(cands)
    else:
        order = np.argsort(cands, kind="stable")
        # threshold_ keeps x > thr; with thr the float32 just below min_p this keeps x >= min_p.
        thr = [
            float(np.nextafter(np.float32(cands[j]), np.float32(-np.inf), dtype=np.float32))
            for j in order
        ]

    # exp(beta u) == exp2(beta / ln2 * u); which is faster on CPU depends on the torch build.
    # Chosen by version, never by a timing: the low bits of the result must not depend on
    # machine load (a resumed run, or another rank, must score alike).
    use_exp2 = device.type != "cpu" or _cpu_exp2_is_fast(torch.__version__)
    unit = _INV_LN2 if use_exp2 else 1.0
    scales = unit / (cands if family == "temperature" else np.array([temp]))
    fuse_limit = 1e37 / float(scales.max())
    rows_l, starts_l, stops_l = seg_row.tolist(), seg_start.tolist(), seg_stop.tolist()

    def score_segment(idx: int, scratch: torch.Tensor) -> None:
        i, t0, t1 = rows_l[idx], starts_l[idx], stops_l[idx]
        seg = logits[i, t0:t1]  # (c, V) view, input dtype
        c = t1 - t0
        e = scratch[:c]
        hi = seg.amax(dim=-1)  # NaN propagates; +inf shows here
        lo = seg.amin(dim=-1)  # for fuse_ok (torch.aminmax is much slower on CPU)
        m = hi.float().unsqueeze(-1)  # (c, 1)
        # s * z - s * m in one fused op is exact enough, unless s * z overflows float32
        # (|logits| ~ 1e38 / s): then subtract first. One host sync per segment.
        fuse_ok = float(torch.maximum(hi.abs().max(), lo.abs().max()).float()) < fuse_limit
        tok = tok_src[i, t0:t1].to(device=device, dtype=torch.long).unsqueeze(-1)  # (c, 1)
        u_o = seg.gather(-1, tok).float() - m  # (c, 1): z_o - max <= 0
        # NaN or +inf anywhere makes hi non-finite; -inf at the sampled token makes u_o -inf.
        # -inf elsewhere is probability 0: exp(s * (-inf - m)) = 0 in both shift forms.
        bad[idx] = ~(torch.isfinite(hi).all() & torch.isfinite(u_o).all())
        if family == "temperature":
            sums = torch.empty((k, c), dtype=torch.float32, device=device)
            for j, square in plan:
                if square:  # T_j == T_prev / 2: exp(2 beta u) == exp(beta u) ** 2
                    e.mul_(e)
                else:
                    s = unit / float(cands[j])
                    _scaled_shift(seg, m, s, e, fuse_ok)  # e = beta * unit * (z - m)
                    _exp_inplace(e, use_exp2)
                torch.sum(e, dim=-1, out=sums[j])
            # log q_k(o) = beta_k (z_o - m) - log sum_v exp(beta_k (z_v - m)). The max
            # term of the sum is exactly 1, so sums >= 1: clamping only removes rounding
            # and keeps log q <= 0 (u_o <= 0 holds exactly).
            logq = betas.unsqueeze(-1) * u_o.T - sums.clamp_min_(1.0).log_()  # (K, c)
        else:
            s = unit / temp
            _scaled_shift(seg, m, s, e, fuse_ok)
            _exp_inplace(e, use_exp2)  # e_v = p_v / p_max, the max token gives exactly 1
            e_o = e.gather(-1, tok)  # (c, 1)
            total = e.sum(dim=-1).clamp_min_(1.0)  # (c,), >= 1 up to rounding
            logp_o = u_o.squeeze(-1) / temp - total.log()  # log p(o)
            kept_mass = torch.empty((k, c), dtype=torch.float32, device=device)
            for j, th in zip(order.tolist(), thr, strict=True):
                # thresholds ascend, so thresholding in place is cumulative and exact
                torch.threshold_(e, th, 0.0)
                torch.sum(e, dim=-1, out=kept_mass[j])
            z_frac = (kept_mass / total).clamp_max_(1.0)  # (K, c): kept mass, (0, 1]
            kept_o = e_o.T >= betas.unsqueeze(-1)  # (K, c): sampled token kept?
            # log q = log p(o) + log((1 - eps) [kept] / Z + eps)
            ratio = torch.where(kept_o, (1.0 - eps) / z_frac + eps, eps)
            # q(o) <= 1 exactly; clamp only the rounding of a probability near 1
            logq = (logp_o.unsqueeze(0) + ratio.log()).clamp_max_(0.0)
        partial[idx] = logq.sum(dim=-1, dtype=acc_dtype)

    with torch.no_grad():
        if workers <= 1:
            scratch = torch.empty((longest, vocab), dtype=torch.float32, device=device)
            for idx in range(n_seg):
                score_segment(idx, scratch)
        else:
            _run_pooled(torch, score_segment, n_seg, workers, (longest, vocab))
        if bool(bad.any()):
            _raise_for_bad_segments(logits, tok_src, bad, seg_row, seg_start, seg_stop)
        # summed in segment order whatever the schedule: results do not depend on workers
        acc = torch.zeros((n, k), dtype=acc_dtype, device=device)
        acc.index_add_(0, torch.from_numpy(seg_row).to(device), partial)
        counts = torch.from_numpy(bmask.sum(axis=1)).to(device=device, dtype=acc_dtype)
        return (acc / counts.unsqueeze(-1)).to(torch.float32)


def _raise_for_bad_segments(
    logits: torch.Tensor,
    tok_src: torch.Tensor,
    bad: torch.Tensor,
    seg_row: np.ndarray,
    seg_start: np.ndarray,
    seg_stop: np.ndarray,
) -> None:
    """Name the first bad position of the first flagged segment (see ``score_segment``)."""
    import torch

    for idx in np.flatnonzero(bad.cpu().numpy()).tolist():
        i, t0, t1 = int(seg_row[idx]), int(seg_start[idx]), int(seg_stop[idx])
        cols = torch.arange(t0, t1, device=logits.device)
        rows = torch.full_like(cols, i)
        toks = tok_src[i, t0:t1].to(device=logits.device, dtype=torch.long)
        _check_positions_torch(logits, rows, cols, toks)
    raise ValueError("logits contain NaN or +inf, or -inf at a sampled token, at masked positions")


def _loglik_blocks(
    logits: torch.Tensor,
    tokens: Any,
    tok_host: np.ndarray,
    bmask: np.ndarray,
    cands: np.ndarray,
    chunk: int | None,
) -> torch.Tensor:
    """Temperature family for small ``V * K``: blocks of masked positions, taken across rows,
    scored for all candidates at once; a block is at most ``chunk`` positions (default: a
    ``(positions, K, V)`` float32 block of ``_CPU_WORKER_BYTES``)."""
    import torch

    n, _, vocab = logits.shape
    k = cands.size
    device = logits.device
    if chunk is None:
        chunk = max(1, _CPU_WORKER_BYTES // (4 * k * vocab))
    rows_host, cols_host = np.nonzero(bmask)
    rows = torch.from_numpy(rows_host).to(device)
    cols = torch.from_numpy(cols_host).to(device)
    tok_src = tokens.detach() if _is_torch(tokens) else torch.from_numpy(tok_host)
    tok_all = tok_src.to(device=device, dtype=torch.long)[rows, cols]
    betas = torch.tensor(1.0 / cands, dtype=torch.float32, device=device)
    acc = torch.zeros((n, k), dtype=torch.float64, device=device)
    # single-threaded ops on CPU: small ops gain nothing from threads, and on shared cores each
    # parallel region waits for descheduled threads (see _cpu_workers below)
    threads = _single_threaded_ops(torch) if device.type == "cpu" else contextlib.nullcontext()
    with torch.no_grad(), threads:
        for start in range(0, rows_host.size, chunk):
            r, c = rows[start : start + chunk], cols[start : start + chunk]
            z = logits[r, c].float()  # (p, V)
            tk = tok_all[start : start + chunk]
            # -inf (probability 0) is fine except at the sampled token; NaN, +inf never are
            bad = (torch.isnan(z) | (z == float("inf"))).any() | (
                z.gather(-1, tk.unsqueeze(-1)) == float("-inf")
            ).any()
            if bool(bad):
                _check_positions_torch(logits, r, c, tk)
            u = z - z.amax(dim=-1, keepdim=True)  # <= 0, the max is exactly 0 (finite: z_o is)
            u_o = u.gather(-1, tk.unsqueeze(-1))  # (p, 1)
            # u * beta <= 0 with one entry exactly 0: the sum lies in [1, V], no overflow
            lse = torch.exp(u.unsqueeze(1) * betas[None, :, None]).sum(dim=-1).log_()  # (p, K)
            # log q = beta (z_o - max) - lse <= 0; the clamp removes rounding only
            logq = (u_o * betas - lse).clamp_max_(0.0)
            acc.index_add_(0, r, logq.double())
        counts = torch.from_numpy(bmask.sum(axis=1)).to(device=device, dtype=torch.float64)
        return (acc / counts.unsqueeze(-1)).to(torch.float32)


# CPU parallelism. Each torch op on a (chunk, V) buffer would otherwise open its own OpenMP
# parallel region: thousands per call, and on a machine whose cores are shared with other
# processes every region waits for a descheduled thread (measured on a busy 2-core machine:
# 31.8 s instead of 0.42 s). Instead, W Python threads each score whole segments with
# single-threaded ops (torch releases the GIL inside ops), pulling segments from a shared
# counter so that a slow core simply takes fewer segments.
_THREADS_LOCK = threading.Lock()
_THREADS_STATE = {"depth": 0, "saved": 1}


def _cpu_workers(torch: Any) -> int:
    """Worker threads for the CPU path: torch's intra-op thread count (OpenMP builds only)."""
    threads = int(torch.get_num_threads())
    if threads <= 1 or "OpenMP" not in _parallel_backend(torch):
        return 1
    return threads


@functools.lru_cache(maxsize=1)
def _parallel_backend(torch: Any) -> str:
    for line in torch.__config__.parallel_info().splitlines():
        if "parallel backend" in line:
            return str(line)
    return ""


@contextlib.contextmanager
def _single_threaded_ops(torch: Any) -> Iterator[None]:
    """Set torch's intra-op threads to 1 for the duration (re-entrant, thread-safe)."""
    with _THREADS_LOCK:
        if _THREADS_STATE["depth"] == 0:
            _THREADS_STATE["saved"] = int(torch.get_num_threads())
            torch.set_num_threads(1)
        _THREADS_STATE["depth"] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_STATE["depth"] -= 1
            if _THREADS_STATE["depth"] == 0:
                torch.set_num_threads(_THREADS_STATE["saved"])


def _run_pooled(
    torch: Any,
    work: Callable[[int, Any], None],
    n_items: int,
    workers: int,
    buffer_shape: tuple[int, int],
) -> None:
    """Run ``work(i, buffer)`` for i in range(n_items) on ``workers`` threads."""
    counter = itertools.count()
    lock = threading.Lock()

    def loop() -> None:
        buffer = torch.empty(buffer_shape, dtype=torch.float32)
        with torch.no_grad():  # grad mode is thread-local
            while True:
                with lock:
                    i = next(counter)
                if i >= n_items:
                    return
                work(i, buffer)

    with _single_threaded_ops(torch), ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(loop) for _ in range(workers)]
        for fut in futures:
            fut.result()  # re-raises a worker's exception


def _exp_inplace(e: torch.Tensor, use_exp2: bool) -> None:
    if use_exp2:
        e.exp2_()
    else:
        e.exp_()


def _cpu_exp2_is_fast(version: str) -> bool:
    """Whether to use ``exp2`` on CPU: torch >= 2.13, where single-threaded ``exp2_`` measured
    4.6x faster than ``exp_`` on an AVX-512 CPU (0.069 vs 0.319 ms for 512k floats); with
    torch 2.11 on another machine the exp2 path ran about 3x slower than expected.

    Example:
        >>> _cpu_exp2_is_fast("2.13.0+cpu"), _cpu_exp2_is_fast("2.11.0+cu130")
        (True, False)
    """
    major, minor = (int(part) for part in version.split("+")[0].split(".")[:2])
    return (major, minor) >= (2, 13)


def _scaled_shift(
    seg: torch.Tensor, m: torch.Tensor, s: float, out: torch.Tensor, fuse: bool
) -> None:
    """``out = s * (seg - m)``: one fused pass when ``s * seg`` cannot overflow, else two."""
    import torch

    if fuse:
        torch.add(m * (-s), seg, alpha=s, out=out)
    else:
        torch.sub(seg, m, out=out)
        out.mul_(s)


def _want_fused(logits: torch.Tensor, family: str, fused: bool | None) -> bool:
    if fused is False:
        return False
    ok = family == "temperature" and logits.device.type == "cuda" and _triton_kernel() is not None
    if fused and not ok:
        raise ValueError(
            "fused=True needs family='temperature', CUDA logits and an importable triton; "
            f"got family={family!r}, device={logits.device.type!r}"
        )
    return ok


_KERNEL: list[Any] = []  # [kernel or None], built on first use


def _triton_kernel() -> Any:
    """The fused Triton kernel, or None where triton is unavailable."""
    if not _KERNEL:
        _KERNEL.append(_build_triton_kernel())
    return _KERNEL[0]


def _build_triton_kernel() -> Any:
    try:
        import triton
        import triton.language as tl
    except Exception:
        return None

    @triton.jit
    def temperature_sums(
        z_ptr, stride_n, stride_t, stride_v, n_ptr, t_ptr, tok_ptr, s_ptr,
        sums_ptr, uo_ptr, chk_ptr, V,
        K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # One program per position: pass 1 takes the row max (and a finiteness checksum),
        # pass 2 accumulates sum_v exp2(s_k (z_v - max)) for all K candidates at once.
        pid = tl.program_id(0)
        n = tl.load(n_ptr + pid)
        t = tl.load(t_ptr + pid)
        base = z_ptr + n * stride_n + t * stride_t
        offs = tl.arange(0, BLOCK)
        mvec = tl.full([BLOCK], float("-inf"), tl.float32)
        cvec = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            ok = idx < V
            z = tl.load(base + idx * stride_v, mask=ok, other=0.0).to(tl.float32)
            cvec += z
            mvec = tl.maximum(mvec, tl.where(ok, z, float("-inf")))
        mx = tl.max(mvec, axis=0)
        ks = tl.arange(0, KP)
        s = tl.load(s_ptr + ks, mask=ks < K, other=1.0)
        acc = tl.zeros([KP, BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            ok = idx < V
            z = tl.load(base + idx * stride_v, mask=ok, other=0.0).to(tl.float32)
            u = tl.where(ok, z - mx, float("-inf"))
            acc += tl.exp2(s[:, None] * u[None, :])
        tl.store(sums_ptr + pid * KP + ks, tl.sum(acc, axis=1), mask=ks < K)
        tok = tl.load(tok_ptr + pid)
        z_o = tl.load(base + tok * stride_v).to(tl.float32)
        tl.store(uo_ptr + pid, z_o - mx)
        tl.store(chk_ptr + pid, tl.sum(cvec, axis=0))

    return temperature_sums


def _loglik_fused(
    logits: torch.Tensor,
    tokens: Any,
    tok_host: np.ndarray,
    bmask: np.ndarray,
    cands: np.ndarray,
    chunk: int,
) -> torch.Tensor:
    import torch

    kernel = _triton_kernel()
    device = logits.device
    n, _, vocab = logits.shape
    k = cands.size
    kp = max(2, 1 << (k - 1).bit_length())
    rows_np, cols_np = np.nonzero(bmask)
    rows = torch.from_numpy(rows_np.astype(np.int64)).to(device)
    cols = torch.from_numpy(cols_np.astype(np.int64)).to(device)
    if _is_torch(tokens):
        tok = tokens.detach().to(device)[rows, cols].to(torch.long)
    else:
        tok = torch.from_numpy(tok_host[bmask].astype(np.int64)).to(device)
    betas = torch.tensor(1.0 / cands, dtype=torch.float32, device=device)
    scale = (betas * _INV_LN2).contiguous()
    acc = torch.zeros((n, k), dtype=torch.float64, device=device)
    chk = torch.empty(rows.numel(), dtype=torch.float32, device=device)
    sn, st, sv = logits.stride()
    with torch.no_grad():
        for a in range(0, rows.numel(), chunk):
            r, c, tk = rows[a : a + chunk], cols[a : a + chunk], tok[a : a + chunk]
            p = r.numel()
            sums = torch.empty((p, kp), dtype=torch.float32, device=device)
            u_o = torch.empty(p, dtype=torch.float32, device=device)
            kernel[(p,)](
                logits, sn, st, sv, r, c, tk, scale, sums, u_o, chk[a : a + p], vocab,
                K=k, KP=kp, BLOCK=512, num_warps=8,
            )  # fmt: skip
            logq = u_o.unsqueeze(1) * betas - sums[:, :k].clamp_min_(1.0).log_()  # (p, K)
            acc.index_add_(0, r, logq.to(torch.float64))
        bad = ~torch.isfinite(chk)
        if bool(bad.any()):
            # the checksum is also non-finite for huge finite logits and for -inf entries
            # (probability 0, fine except at the sampled token): confirm on the flagged rows
            idx = torch.nonzero(bad).squeeze(1)
            _check_positions_torch(logits, rows[idx], cols[idx], tok[idx])
        counts = torch.from_numpy(bmask.sum(axis=1)).to(device=device, dtype=torch.float64)
        return (acc / counts.unsqueeze(-1)).to(torch.float32)


# --------------------------------------------------------------------------------------
# NumPy implementation (float64)
# --------------------------------------------------------------------------------------


def _loglik_numpy(
    logits: np.ndarray,
    tokens: Any,
    mask: Any,
    cands: np.ndarray,
    family: str,
    temp: float,
    eps: float,
    chunk: int | None,
) -> np.ndarray:
    if not np.issubdtype(logits.dtype, np.floating):
        raise TypeError(f"logits must hold floating-point values, got dtype {logits.dtype}")
    tok_host = _to_numpy(tokens, "tokens")
    mask_host = _to_numpy(mask, "mask")
    _check_shapes(logits.shape, tok_host, mask_host)
    n, _, vocab = logits.shape
    bmask = _check_mask_tokens(tok_host, mask_host, vocab)
    if chunk is None:
        chunk = max(1, _CPU_WORKER_BYTES // (8 * vocab))
    rows, cols = np.nonzero(bmask)
    acc = np.zeros((n, cands.size), dtype=np.float64)
    for a in range(0, rows.size, chunk):
        r, t = rows[a : a + chunk], cols[a : a + chunk]
        z = logits[r, t].astype(np.float64)  # (c, V)
        toks = tok_host[r, t]
        if not np.all(np.isfinite(z)):  # -inf is probability 0: fine except at the sampled token
            _raise_for_bad_logits(z, r, t, toks)
        u = z - z.max(axis=1, keepdims=True)  # the max is finite: the sampled token's is
        u_o = u[np.arange(r.size), toks]  # (c,)
        if family == "temperature":
            logq = np.empty((r.size, cands.size))
            for j, T in enumerate(cands):
                logq[:, j] = u_o / T - np.log(np.maximum(np.exp(u / T).sum(axis=1), 1.0))
        else:
            w = np.exp(u / temp)  # p / p_max
            total = np.maximum(w.sum(axis=1), 1.0)  # the max term is exactly 1
            logp_o = u_o / temp - np.log(total)
            w_o = np.exp(u_o / temp)
            logq = np.empty((r.size, cands.size))
            for j, th in enumerate(cands):
                z_frac = np.minimum(np.where(w >= th, w, 0.0).sum(axis=1) / total, 1.0)
                ratio = np.where(w_o >= th, (1.0 - eps) / z_frac + eps, eps)
                logq[:, j] = np.minimum(logp_o + np.log(ratio), 0.0)
        np.add.at(acc, r, logq)
    return acc / bmask.sum(axis=1)[:, None]
