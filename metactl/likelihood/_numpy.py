"""NumPy backend of :func:`metactl.likelihood.candidate_loglik` (float64; meant for small
inputs and as a readable statement of the math)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._checks import (
    _CPU_WORKER_BYTES,
    _check_mask_tokens,
    _check_shapes,
    _raise_for_bad_logits,
    _to_numpy,
)
from .families import CandidateSpec, numpy_logq


def _loglik_numpy(
    logits: np.ndarray,
    tokens: Any,
    mask: Any,
    spec: CandidateSpec,
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
    if spec.is_pure("temperature"):
        family, cands, temp = "temperature", spec.temperature, 1.0
    elif spec.is_pure("min_p"):
        family, cands, temp = "min_p", spec.min_p, float(spec.temperature[0])
    else:
        family, cands, temp = "truncated", spec.temperature, 1.0
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
        elif family == "truncated":
            logq = numpy_logq(z, toks, spec, eps)
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
