"""The gym learner's sampler, row by row: each row's truncation knobs (:class:`SamplerRows`) and
the terms of its sampling distribution that the learner's hand-written gradient needs.

The distribution is :mod:`metactl.knobs`' (HF order): ``p = softmax(z / T)``, the kept set ``S``
of the row's top-k / top-p / min-p, and the smoothed ``q = (1 - epsilon) * p|S + epsilon * p``
(``q = p`` exactly when no truncation is on), the ``q`` that
:func:`metactl.likelihood.candidate_loglik` scores a truncated candidate with (the same kept-set
code, the same ``epsilon``): the candidate that sampled a batch scores it with the batch's own
log-probabilities. The gym samples ``q`` itself; an LLM sampler draws from ``p|S``
(``epsilon = 0``), which differs from it by at most ``epsilon`` in probability.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from metactl.knobs import SMOOTHING_EPS, Setting, SettingRows, sampling_terms

__all__ = ["SamplerRows", "family_log_probs", "log_softmax", "row_settings"]

def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable ``log softmax`` along ``axis``.

    >>> np.round(np.exp(log_softmax(np.array([0.0, np.log(3.0)]))), 3).tolist()
    [0.25, 0.75]
    """
    shifted = z - z.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


@dataclass(frozen=True)
class SamplerRows:
    """The truncation knobs of every row (a :class:`metactl.knobs.SettingRows`; the temperature
    is the rollout's own, ``Rollout.temperature``) and the smoothing ``epsilon``."""

    settings: SettingRows
    epsilon: float

    def __post_init__(self) -> None:
        if not isinstance(self.settings, SettingRows):
            raise TypeError(f"settings must be a metactl.knobs.SettingRows, got "
                            f"{type(self.settings).__name__}")  # fmt: skip
        if not 0.0 < self.epsilon < 1.0:
            raise ValueError(f"epsilon must lie in (0, 1), got {self.epsilon}")

    @property
    def truncated(self) -> np.ndarray:
        """``(N,)`` bool: the row has an active truncation."""
        return self.settings.truncated

    def repeat(self, times: int) -> SamplerRows:
        """Every row repeated ``times`` times in place (row ``i`` -> rows ``i*times ..``), e.g.
        once per position."""
        return SamplerRows(self.settings.repeat(times), self.epsilon)

    def value(self, knob: str) -> np.ndarray:
        """``(N,)`` values of a truncation knob (float64; top_k 0 = off)."""
        return np.asarray(getattr(self.settings, knob), dtype=np.float64)


def row_settings(
    n: int,
    *,
    top_p: Any = 1.0,
    top_k: Any = None,
    min_p: Any = 0.0,
    epsilon: float = SMOOTHING_EPS,
) -> SamplerRows:
    """Validate the truncation knobs of ``n`` rows (scalars or ``(n,)`` arrays; ``top_k=None``
    keeps every token) and return them as :class:`SamplerRows`.

    >>> rows = row_settings(3, top_p=0.9, top_k=[5, 5, 1])
    >>> rows.settings.top_k.tolist(), rows.settings.top_p.tolist(), rows.truncated.tolist()
    ([5, 5, 1], [0.9, 0.9, 0.9], [True, True, True])
    """
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"epsilon must be a float, got {type(epsilon).__name__}")
    if not 0.0 < float(epsilon) < 1.0:
        raise ValueError(f"epsilon must lie in (0, 1), got {epsilon}")
    return SamplerRows(Setting().rows(n, top_p=top_p, top_k=top_k, min_p=min_p), float(epsilon))


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
    ``temperature[m]`` under the truncation ``rows`` (``M`` rows), from
    :func:`metactl.knobs.sampling_terms`."""
    m = z.shape[0]
    temps = np.asarray(temperature, dtype=np.float64).reshape(m)
    cut = rows.settings
    settings = SettingRows(temps, cut.top_p, cut.top_k, cut.min_p)
    terms = sampling_terms(z, settings, epsilon=rows.epsilon)
    return FamilyTerms(terms.log_q, np.exp(terms.log_p), terms.kept, terms.kept_mass,
                       terms.truncated, rows.epsilon)  # fmt: skip
