"""Per-prompt TAMPO: one TAMPO EMA per context, shrunk toward the global (paper) EMA.

For each update with per-context decisions (G rows per decision):

* the global EMA is the paper's, trained on all N rows:
  ``Abar <- (1 - alpha) Abar + alpha a`` with ``a_k = mean_i lhat_k(i) A_i`` over the batch;
* each context x of the batch keeps its own EMA trained on its own rows only:
  ``Abar_x <- (1 - alpha) Abar_x + alpha a_x`` with ``a_x`` the same mean over x's rows
  (all of x's rows when x occurs in several decisions). A context's first update starts its
  EMA from the global EMA of that moment (the prior), not from 0;
* the context's policy is TAMPO's min-max rule on the shrunk EMA
  ``Abar_global + w_x (Abar_x - Abar_global)``, ``w_x = n_x / (n_x + prior_weight)``, where
  ``n_x`` counts the updates x received: a context seen once is mostly the global policy, a
  context seen often is mostly its own. Unseen contexts (``n_x = 0``) get the global policy.

With a single context the context EMA equals the global one bit for bit, the shrinkage adds
exactly 0, and the choices and probabilities are those of :func:`metactl.tampo` (same RNG draws).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .._validation import finite_scalar, integer, one_of, unit_interval
from ..selectors import Nucleus, Selector
from . import base
from .base import DEFAULT_MAX_CONTEXTS, Rule
from .tampo import (
    _RELATIVE_SPREAD_FLOOR,
    NORMALIZERS,
    candidate_advantages,
    normalized_rows,
)

__all__ = ["ContextualTAMPO", "minmax_rows"]


# From this many rows on, minmax_rows takes each row's extremes on the transposed (K, n) copy:
# one vector operation per candidate instead of a short inner loop per row.
_TRANSPOSED_ROWS = 64


def minmax_rows(ema: np.ndarray) -> np.ndarray:
    """:func:`metactl.minmax_probs` applied to each row of ``ema`` (n, K), bit for bit."""
    if ema.ndim == 2 and ema.dtype == np.float64 and ema.shape[0] >= _TRANSPOSED_ROWS:
        probs = _minmax_columns(ema)
        if probs is not None:
            return probs
    return _minmax_each_row(ema)


def _minmax_columns(ema: np.ndarray) -> np.ndarray | None:
    """:func:`_minmax_each_row` through the transposed copy of ``ema``, bit for bit; None
    (take the row-wise path) when a row's largest or smallest entry is zero (which of +0.0 and
    -0.0 a row-wise reduction returns depends on its loop order) or its spread overflows."""
    columns = np.ascontiguousarray(ema.T)
    high, low = np.max(columns, axis=0), np.min(columns, axis=0)
    with np.errstate(over="ignore", invalid="ignore"):
        spread = high - low
    if not np.all(np.isfinite(spread)) or np.any(high == 0.0) or np.any(low == 0.0):
        return None
    flat = (spread <= _RELATIVE_SPREAD_FLOOR * np.max(np.abs(columns), axis=0)) | (spread == 0.0)
    safe_spread = np.where(flat, 1.0, spread)
    # back to (n, K), C-contiguous: the row sums below are numpy's sums of the same rows
    scaled = np.ascontiguousarray(((columns - low) / safe_spread).T)
    probs = scaled / np.where(flat, 1.0, scaled.sum(axis=1))[:, None]
    probs[flat] = 1.0 / ema.shape[1]
    return probs


def _minmax_each_row(ema: np.ndarray) -> np.ndarray:
    """:func:`minmax_rows` with row-wise reductions."""
    with np.errstate(over="ignore", invalid="ignore"):
        spread = np.max(ema, axis=1) - np.min(ema, axis=1)
    wide = ~np.isfinite(spread)
    if np.any(wide):  # the scalar rule halves such rows (exact) before normalising
        ema = ema.copy()
        ema[wide] = ema[wide] * 0.5
        spread = np.max(ema, axis=1) - np.min(ema, axis=1)
    flat = (spread <= _RELATIVE_SPREAD_FLOOR * np.max(np.abs(ema), axis=1)) | (spread == 0.0)
    safe_spread = np.where(flat, 1.0, spread)
    scaled = (ema - np.min(ema, axis=1, keepdims=True)) / safe_spread[:, None]
    probs = scaled / np.where(flat, 1.0, scaled.sum(axis=1))[:, None]
    probs[flat] = 1.0 / ema.shape[1]
    return probs


def _decision_means(weighted: np.ndarray, groups: base.Batch) -> np.ndarray:
    """``groups.per_decision(weighted).mean(axis=1)``, (n, K), bit for bit."""
    rows = groups.per_decision(weighted)  # (n, G, K)
    if not (rows.flags.c_contiguous and rows.shape[2] >= 2 and rows.shape[1] >= 2):
        return rows.mean(axis=1)
    # With C-contiguous rows and K >= 2 numpy's reduction runs over K innermost and adds the G
    # rows of a decision to its identity 0.0 one after the other, first to last: the same
    # additions as vectors (0.0 + x turns a -0.0 into 0.0, as numpy's sum does), without the
    # per-row loop overhead.
    total = np.add(0.0, rows[:, 0])
    for g in range(1, rows.shape[1]):
        np.add(total, rows[:, g], out=total)
    total /= rows.shape[1]
    return total


def _group_means(weighted: np.ndarray, groups: base.Batch) -> np.ndarray:
    """Mean over each distinct context's rows of ``weighted`` (N, K): (m, K)."""
    per_decision = _decision_means(weighted, groups)  # (n, K)
    if groups.m == groups.n:
        return groups.pool(per_decision)
    return groups.pool(per_decision) / groups.counts[:, None]  # equal G: mean of the means


@dataclass(frozen=True)
class ContextualTAMPO(Rule):
    """TAMPO with one EMA per context, shrunk toward the global EMA (module docstring).

    Args:
        alpha: EMA coefficient in (0, 1] (paper: 0.05), for the global and every context EMA.
        normalizer: ``"sparsemax"`` (paper) or ``"softmax"``.
        prior_weight: ``n0 >= 0`` in the shrinkage weight ``w_x = n_x / (n_x + n0)``;
            0 uses each seen context's own EMA alone.
        max_contexts: the most contexts stored (least recently updated evicted beyond).

    base.Feedback: ``loglik`` (N, K) and ``advantages`` (N,), G rows per decision. The policy's
    selector (default ``Nucleus(0.7)``; ``Sample`` and ``Greedy`` also work) picks each
    context's candidate from its probabilities, one uniform draw per context in order.

    Example:
        >>> import metactl, numpy as np
        >>> policy = metactl.tampo_per_prompt(seed=0)
        >>> batch = policy.select(contexts=["a", "b"])
        >>> ll = np.random.default_rng(0).normal(-1.0, 0.1, size=(4, 10))   # G = 2
        >>> info = policy.update(batch, loglik=ll, advantages=[1.0, -1.0, 0.5, -0.5])
        >>> policy.context_probs(["a", "b", "new"]).shape
        (3, 10)
    """

    alpha: float = 0.05
    normalizer: str = "sparsemax"
    prior_weight: float = 4.0
    max_contexts: int = DEFAULT_MAX_CONTEXTS
    requires: ClassVar[tuple[str, ...]] = ("loglik", "advantages")
    candidate_use: ClassVar[str] = "indices"
    zero_advantage_rows_ignored: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", unit_interval(self.alpha, "alpha", low_open=True))
        one_of(self.normalizer, "normalizer", NORMALIZERS)
        weight = finite_scalar(self.prior_weight, "prior_weight")
        if weight < 0:
            raise ValueError(f"prior_weight must be >= 0, got {weight}")
        object.__setattr__(self, "prior_weight", weight)
        object.__setattr__(
            self, "max_contexts", integer(self.max_contexts, "max_contexts", minimum=1)
        )

    def default_selector(self) -> Selector:
        return Nucleus(top_p=0.7)

    def row_fields(self, candidates: np.ndarray) -> dict[str, int]:
        return {"ema": candidates.shape[0], "updates": 0}

    def init_state(self, candidates: np.ndarray) -> base.RuleState:
        return {"ema": np.zeros(candidates.shape[0])}

    def prior_rows(self, state: base.RuleState, candidates: np.ndarray, m: int) -> base.ContextRows:
        return {"ema": np.tile(state["ema"], (m, 1)), "updates": np.zeros(m)}

    def global_rows(self, state: base.RuleState, candidates: np.ndarray) -> base.ContextRows:
        return self.prior_rows(state, candidates, 1)

    def check_rows(self, rows: base.ContextRows, candidates: np.ndarray, step: int) -> None:
        updates = rows["updates"]
        if np.any(updates < 1) or np.any(updates != np.floor(updates)) or np.any(updates > step):
            raise ValueError(
                "state_dict['contexts']['rows']['updates'] must hold integers in [1, step]: "
                "a stored context was updated at least once, at most once per step"
            )

    def shrunk(self, state: base.RuleState, rows: base.ContextRows) -> np.ndarray:
        """``Abar_global + w_x (Abar_x - Abar_global)`` per context, (n, K)."""
        n_x = rows["updates"]
        total = n_x + self.prior_weight
        weight = np.divide(n_x, total, out=np.zeros_like(n_x), where=total > 0)
        return state["ema"] + weight[:, None] * (rows["ema"] - state["ema"])

    def probs(self, state: base.RuleState, ctx: base.Contexts) -> np.ndarray:
        return minmax_rows(self.shrunk(state, ctx.rows))

    def update(
        self, state: base.RuleState, ctx: base.Contexts, batch: base.Batch, feedback: base.Feedback
    ) -> tuple[base.RuleState, base.ContextRows, np.ndarray]:
        rows, groups = ctx.rows, batch
        loglik, advantages = feedback["loglik"], feedback["advantages"]
        # the products overwrite the weights (a new array): one large array fewer, same bits
        weighted = normalized_rows(loglik, self.normalizer)
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            np.multiply(weighted, advantages[:, None], out=weighted)
            signal = np.mean(weighted, axis=0)  # the paper's a_k, as candidate_advantages
            context_signal = _group_means(weighted, groups)
        if not (np.all(np.isfinite(signal)) and np.all(np.isfinite(context_signal))):
            # advantages near the float64 limit: the global signal through TAMPO's overflow-
            # safe path, the context means with the same power-of-two scaling
            signal = candidate_advantages(loglik, advantages, self.normalizer)
            weights = normalized_rows(loglik, self.normalizer)
            _, exponent = np.frexp(np.max(np.abs(advantages)))
            scaled = weights * np.ldexp(advantages, -exponent)[:, None]
            context_signal = np.ldexp(_group_means(scaled, groups), exponent)
        ema = (1.0 - self.alpha) * state["ema"] + self.alpha * signal
        context_ema = (1.0 - self.alpha) * rows["ema"] + self.alpha * context_signal
        return {"ema": ema}, {"ema": context_ema, "updates": rows["updates"] + 1.0}, signal
