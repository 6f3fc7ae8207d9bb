"""The gym learner's sampler: temperature, top-k, top-p and min-p, in Hugging Face's order, each
exactly as :mod:`metactl.likelihood.families` defines it, so that sampling and scoring agree.

For a row of raw logits ``z`` (V tokens) and a setting ``(T, top_k, top_p, min_p)``:

* ``p = softmax(z / T)``;
* the kept set ``S`` is a prefix of the tokens sorted by logit (ties kept together): top-k keeps
  the tokens whose logit is ``>=`` the ``k``-th largest; top-p (on the top-k survivors, HF's
  order) keeps a token when the mass of the survivors strictly more likely than it is
  ``< top_p`` times the survivors' mass; min-p keeps ``p_v >= min_p * max(p)``; ``S`` is what
  all three keep (the most likely token always survives);
* the sampling distribution is the family's smoothed one,
  ``q = (1 - epsilon) * p|S + epsilon * p`` (``p|S`` the renormalised restriction of ``p`` to
  ``S``), and ``q = p`` exactly when no truncation is active.

``q`` is the distribution ``metactl.likelihood.candidate_loglik`` scores a truncated candidate
with (``order="hf"``, the same ``epsilon``): the candidate that sampled a batch scores it with
the batch's own log-probabilities. An LLM sampler draws from ``p|S`` (``epsilon = 0``); the
epsilon mixture differs from it by at most ``epsilon`` in probability, and it is what keeps a
token outside ``S`` (under another candidate's truncation) finite. The arithmetic (float64)
follows the family's NumPy implementation operation by operation, so the kept sets agree to
the bit, ties and ``-inf`` logits included.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from metactl.knobs import KNOBS, check_knob

__all__ = ["SAMPLER_KNOBS", "SamplerRows", "family_log_probs", "log_softmax", "row_settings"]

#: The knobs the gym learner's sampler applies (every knob of :data:`metactl.knobs.KNOBS`).
SAMPLER_KNOBS: tuple[str, ...] = KNOBS


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable ``log softmax`` along ``axis``.

    >>> np.round(np.exp(log_softmax(np.array([0.0, np.log(3.0)]))), 3).tolist()
    [0.25, 0.75]
    """
    shifted = z - z.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


@dataclass(frozen=True)
class SamplerRows:
    """The truncation knobs of every row, ``(N,)`` arrays: ``top_k`` (int64, 0 = off),
    ``top_p`` (1 = off), ``min_p`` (0 = off), and the family's smoothing ``epsilon``. The
    temperature is the rollout's own (``Rollout.temperature``)."""

    top_k: np.ndarray
    top_p: np.ndarray
    min_p: np.ndarray
    epsilon: float

    def __post_init__(self) -> None:
        n = self.top_k.shape
        if self.top_p.shape != n or self.min_p.shape != n or len(n) != 1:
            raise ValueError("top_k, top_p and min_p must be (N,) arrays of the same length")
        if not 0.0 < self.epsilon < 1.0:
            raise ValueError(f"epsilon must lie in (0, 1), got {self.epsilon}")
        for array in (self.top_k, self.top_p, self.min_p):
            array.setflags(write=False)

    @property
    def truncated(self) -> np.ndarray:
        """``(N,)`` bool: the row has an active truncation."""
        return (self.top_k > 0) | (self.top_p < 1.0) | (self.min_p > 0.0)

    def repeat(self, times: int) -> SamplerRows:
        """Every row repeated ``times`` times in place (row ``i`` -> rows ``i*times ..``), e.g.
        once per position."""
        return SamplerRows(
            np.repeat(self.top_k, times),
            np.repeat(self.top_p, times),
            np.repeat(self.min_p, times),
            self.epsilon,
        )

    def value(self, knob: str) -> np.ndarray:
        """``(N,)`` values of a truncation knob (float64; top_k 0 = off)."""
        return np.asarray(getattr(self, knob), dtype=np.float64)


def _rows(knob: str, value: Any, n: int, name: str) -> np.ndarray:
    """One knob's value for every row: a scalar (every row) or an ``(n,)`` array, each entry
    checked with :func:`metactl.knobs.check_knob`; ``top_k=None`` is off (0)."""
    if knob == "top_k" and value is None:
        return np.zeros(n, dtype=np.int64)
    if isinstance(value, (list, tuple, np.ndarray)):
        items = np.asarray(value).tolist() if isinstance(value, np.ndarray) else list(value)
        if np.shape(value) != (n,):
            raise ValueError(
                f"{name} must be a number or one value per row, shape ({n},), got "
                f"{np.shape(value)}"
            )
        checked = [check_knob(knob, v, f"{name}[{i}]") for i, v in enumerate(items)]
    else:
        checked = [check_knob(knob, value, name)] * n
    return np.asarray(checked, dtype=np.int64 if knob == "top_k" else np.float64)


def row_settings(
    n: int,
    *,
    top_p: Any = 1.0,
    top_k: Any = None,
    min_p: Any = 0.0,
    epsilon: float = 1e-3,
) -> SamplerRows:
    """Validate the truncation knobs of ``n`` rows (scalars or ``(n,)`` arrays; ``top_k=None``
    keeps every token) and return them as :class:`SamplerRows`.

    >>> rows = row_settings(3, top_p=0.9, top_k=[5, 5, 1])
    >>> rows.top_k.tolist(), rows.top_p.tolist(), rows.truncated.tolist()
    ([5, 5, 1], [0.9, 0.9, 0.9], [True, True, True])
    """
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.floating)):
        raise TypeError(f"epsilon must be a float, got {type(epsilon).__name__}")
    if not 0.0 < float(epsilon) < 1.0:
        raise ValueError(f"epsilon must lie in (0, 1), got {epsilon}")
    return SamplerRows(
        _rows("top_k", top_k, n, "top_k"),
        _rows("top_p", top_p, n, "top_p"),
        _rows("min_p", min_p, n, "min_p"),
        float(epsilon),
    )


@dataclass(frozen=True)
class FamilyTerms:
    """What sampling, scoring and the gradient need for ``(M, V)`` logit rows: ``log_q``
    (the log sampling distribution, ``(M, V)``), ``p`` (``softmax(z / T)``), ``kept`` (the
    kept set, all True for untruncated rows), ``frac`` (``p(S)``, 1 for untruncated rows) and
    ``truncated`` (``(M,)``)."""

    log_q: np.ndarray
    p: np.ndarray
    kept: np.ndarray
    frac: np.ndarray
    truncated: np.ndarray
    epsilon: float

    def grad_weights(self, tokens: np.ndarray) -> np.ndarray:
        """``(M, V)`` weights ``w`` with ``d log q(o) / d z = (onehot(o) - w) / T`` for the
        sampled tokens ``tokens`` (``(M,)``): ``w = p`` for an untruncated row or a token
        outside ``S``; for a token in ``S``, ``w = p + c p (1[v in S] - p(S))`` with
        ``c = (1 - eps) / (p(S)^2 r)``, ``r = (1 - eps) / p(S) + eps`` (the kept set is
        locally constant in ``z``). Each row of ``w`` sums to 1."""
        rows = np.arange(tokens.shape[0])
        kept_o = self.kept[rows, tokens] & self.truncated
        eps = self.epsilon
        frac = self.frac
        ratio = (1.0 - eps) / frac + eps
        c = np.where(kept_o, (1.0 - eps) / (frac * frac * ratio), 0.0)
        return self.p + (c[:, None] * self.p) * (self.kept - frac[:, None])


def family_log_probs(z: np.ndarray, temperature: np.ndarray, rows: SamplerRows) -> FamilyTerms:
    """The sampling distribution of ``(M, V)`` raw logit rows: row ``m`` at temperature
    ``temperature[m]`` under the truncation ``rows`` (``M`` rows). Untruncated rows take the
    plain ``log_softmax(z / T)``; truncated ones the family's smoothed ``q`` (module doc),
    computed as ``metactl.likelihood`` computes it."""
    m, vocab = z.shape
    temps = np.asarray(temperature, dtype=np.float64).reshape(m, 1)
    truncated = rows.truncated
    plain = log_softmax(z / temps)
    if not truncated.any():
        p = np.exp(plain)
        return FamilyTerms(plain, p, np.ones((m, vocab), dtype=bool), np.ones(m), truncated,
                           rows.epsilon)  # fmt: skip
    index = np.arange(m)
    u = z - z.max(axis=1, keepdims=True)  # <= 0, max exactly 0
    e = np.exp(u / temps)  # p / p_max
    total = np.maximum(e.sum(axis=1), 1.0)
    logp = u / temps - np.log(total)[:, None]
    # descending by logit (the order does not depend on T > 0); ties grouped
    order = np.argsort(-z, axis=1, kind="stable")
    zs = np.take_along_axis(z, order, axis=1)
    new_group = np.ones_like(zs, dtype=bool)
    new_group[:, 1:] = zs[:, 1:] != zs[:, :-1]
    first = np.maximum.accumulate(np.where(new_group, np.arange(vocab), 0), axis=1)
    ws = np.take_along_axis(e, order, axis=1)
    cum = np.cumsum(ws, axis=1)
    above = np.take_along_axis(cum - ws, first, axis=1)  # mass strictly more likely
    full = np.full(m, vocab)
    k = np.where(rows.top_k > 0, np.minimum(rows.top_k, vocab), vocab)
    n_k = np.where(rows.top_k > 0, (zs >= zs[index, k - 1][:, None]).sum(axis=1), full)
    n_mp = np.where(rows.min_p > 0.0, (ws >= rows.min_p[:, None]).sum(axis=1), full)
    base_mass = cum[index, n_k - 1]  # HF: top-p measures mass among the top-k survivors
    n_p = np.where(
        rows.top_p < 1.0, (above < rows.top_p[:, None] * base_mass[:, None]).sum(axis=1), full
    )
    n = np.minimum(np.minimum(n_k, n_mp), n_p)
    kept_mass = cum[index, n - 1]
    kept = z >= zs[index, n - 1][:, None]
    frac = np.minimum(kept_mass / total, 1.0)
    eps = rows.epsilon
    ratio = np.where(kept, ((1.0 - eps) / frac + eps)[:, None], eps)
    log_q = np.minimum(logp + np.log(ratio), 0.0)
    log_q = np.where(truncated[:, None], log_q, plain)
    p = np.where(truncated[:, None], np.exp(logp), np.exp(plain))
    kept = np.where(truncated[:, None], kept, True)
    frac = np.where(truncated, frac, 1.0)
    return FamilyTerms(log_q, p, kept, frac, truncated, eps)


def setting_rows(
    knobs: tuple[str, ...],
    values: Mapping[str, Any],
    defaults: Mapping[str, Any],
) -> dict[str, Any]:
    """The sampler keyword arguments: ``values`` for the ``knobs`` a policy sets, ``defaults``
    (the learner's fixed knobs) for the others."""
    return {knob: values[knob] if knob in knobs else defaults[knob] for knob in SAMPLER_KNOBS}
