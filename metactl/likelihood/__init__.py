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

Besides temperatures, candidates can be min-p, top-p or top-k values, temperatures under a
fixed truncation, or joint settings (:func:`metactl.knobs.grid`); every family is the exact
probability the sampler gives the sampled token (:mod:`metactl.likelihood.families`).

Layout: this module holds the public API; ``families`` the per-family definitions (and their
float64 math), ``_numpy`` / ``_torch`` / ``_triton`` the backends, ``_checks`` input checks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, cast

import numpy as np

from .._validation import candidate_values, is_joint_like
from ..knobs import SMOOTHING_EPS, KnobGrid, _check_epsilon
from ._checks import (
    ArrayLike,
    _check_chunk_size,
    _is_torch,
    _to_numpy,
    default_chunk_size,
)
from ._numpy import _loglik_numpy
from .families import FAMILIES, ORDERS, build_spec

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "FAMILIES",
    "ORDERS",
    "candidate_loglik",
    "default_chunk_size",
    "likelihood_optimal",
]


def candidate_loglik(
    logits: ArrayLike,
    tokens: ArrayLike,
    mask: ArrayLike,
    candidates: Sequence[float] | Sequence[Mapping[str, float]] | KnobGrid | ArrayLike,
    family: str | None = None,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    min_p: float = 0.0,
    epsilon: float = SMOOTHING_EPS,
    order: str = "hf",
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
        candidates: ``K >= 2`` unique candidates: temperatures (``> 0``) for
            ``family="temperature"``, min-p thresholds in ``[0, 1)`` for ``"min_p"``, top-p
            values in ``(0, 1]`` for ``"top_p"``, integers ``>= 1`` for ``"top_k"``, or
            joint candidates for ``"joint"``: a :class:`metactl.knobs.KnobGrid`
            (:func:`metactl.knobs.grid`) or a list of mappings that all set the same knobs
            (``{"temperature": 0.8, "top_p": 0.95}``).
        family: ``"temperature"``, ``"min_p"``, ``"top_p"``, ``"top_k"`` or ``"joint"``;
            ``None`` (default) means ``"joint"`` for knob mappings, else ``"temperature"``.
        temperature: the fixed sampling temperature of every family whose candidates do not
            set it (must stay ``1.0`` when they do).
        top_p, top_k, min_p: fixed truncations, held at these values for every candidate
            that does not set the knob itself (defaults: off; ``top_k=None`` keeps all
            tokens). E.g. ``family="temperature", top_p=0.9`` scores temperature candidates
            as the sampler draws with nucleus 0.9. A fixed value for a knob the candidates
            set is an error.
        epsilon: smoothing weight of truncated candidates, in ``(0, 1)`` (see below; default
            :data:`metactl.knobs.SMOOTHING_EPS`, what :func:`metactl.knobs.log_probs` uses).
        order: order of the truncations: ``"hf"`` (HF ``generate``: top-k, top-p, min-p) or
            ``"vllm"`` (vLLM: min-p, top-k, top-p); they differ only when top-p and min-p
            are both active (see :mod:`metactl.likelihood.families`).
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
            Candidates with top-k (torch) also take each position's top ``k + 1`` logits
            once (a ``torch.topk`` window, widened 8x if a tie at the ``k``-th logit runs
            past it); the window's probabilities are computed for a batch of candidates at a
            time, at most ``V`` window entries per position in all. Top-p without top-k
            sorts each position's logits once (values only; NumPy's sort on CPU) and runs
            every temperature's ``exp`` pass over the sorted order, reading each kept set off
            block sums of that pass (no cumulative sum over the vocabulary). Either way the
            extra scratch stays a small constant number of ``chunk_size x V`` buffers; plain
            min-p and min-p under several temperatures need no sort at all.
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
        * ``"top_p"`` / ``"top_k"``: the same smoothing for nucleus and top-k truncation
          at the fixed ``temperature``; ``"temperature"`` with ``top_p``/``top_k``/``min_p``
          set, and ``"joint"``: every candidate is a full sampler setting, truncated in the
          sampler's order and smoothed likewise. Exact kept sets, ties (top-k keeps ties at
          the ``k``-th logit as HF and vLLM do; top-p keeps a tie at its boundary whole) and
          the HF / vLLM orders are defined in :mod:`metactl.likelihood.families`.

    Raises:
        TypeError: a wrong argument type (names the argument).
        ValueError: NaN/``+inf`` logits at a masked position or ``-inf`` at a masked
            sampled token (the message names the row and position), wrong ndim or shapes, an empty
            batch, token ids out of range, a row with no masked token (``mask``), ``K < 2``,
            duplicate / non-finite / out-of-range candidates, an unknown family or knob, a
            mixed grid, a bad ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``epsilon``,
            ``order`` or ``chunk_size``, a fixed knob that the candidates also set, or
            ``fused=True`` where the fused kernel cannot run.

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
    spec = build_spec(
        candidates,
        family,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        order=order,
        to_numpy=_to_numpy,
    )
    eps = _check_epsilon(epsilon)
    chunk = _check_chunk_size(chunk_size)
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused must be True, False or None, got {fused!r}")

    if _is_torch(logits):
        from ._torch import _loglik_torch
        from ._triton import _want_fused

        lg = cast("torch.Tensor", logits)
        use_fused = _want_fused(lg, spec, fused)
        return _loglik_torch(lg, tokens, mask, spec, eps, chunk, use_fused)
    if fused:
        raise ValueError("fused=True needs CUDA torch tensors (and triton); got a numpy array")
    if not isinstance(logits, np.ndarray):
        raise TypeError(
            f"logits must be a torch.Tensor or numpy.ndarray, got {type(logits).__name__}"
        )
    return _loglik_numpy(logits, tokens, mask, spec, eps, chunk)


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
    if is_joint_like(candidates):  # a KnobGrid has no value per candidate: a clear error
        candidate_values(candidates, "generic")
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
