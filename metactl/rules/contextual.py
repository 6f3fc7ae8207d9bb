"""The per-context rule contract (see :mod:`metactl.contexts` for what trainers hand over):
the :class:`ContextualRule` base class, how rows map onto decisions (:class:`RowGroups`) and
vectorised selectors bit-identical to :mod:`metactl.selectors` row by row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..decision import Decision
from ..selectors import TIE_ULPS, Greedy, Nucleus, Sample, Selector
from .base import Feedback, Rule, RuleState

__all__ = [
    "DEFAULT_MAX_CONTEXTS",
    "ContextRows",
    "ContextualRule",
    "RowGroups",
    "nearest_index",
    "select_rows",
]

DEFAULT_MAX_CONTEXTS = 1_000_000
ContextRows = dict[str, np.ndarray]
"""Per-context state rows: field name -> float64 array of shape (m,) or (m, width)."""

# Same tolerance as the scalar Nucleus selector (a set within this of top_p reaches it).
_MASS_TOLERANCE = 1e-12


def nearest_index(values: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Index of the candidate nearest to each value (smallest ``|value - candidate|``, ties to
    the lower index), shape (n,), int64."""
    return np.argmin(np.abs(values[:, None] - candidates[None, :]), axis=1).astype(np.int64)


# -- vectorised selectors (bit-identical, row by row, to metactl.selectors) ---------------------
def _inverse_cdf_rows(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(probs, axis=1)
    target = u * cdf[:, -1]
    index = np.sum(cdf <= target[:, None], axis=1)  # searchsorted(..., side="right")
    k = probs.shape[1]
    last_positive = k - 1 - np.argmax((probs > 0)[:, ::-1], axis=1)
    return np.minimum(index, last_positive)


def select_rows(
    probs: np.ndarray, selector: Selector, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``selector`` to every row of ``probs`` (n, K): ``(indices, probabilities)``.

    Row i gives exactly what ``selector.select(probs[i], rng)`` gives when the rows are
    selected one after the other (same arithmetic, same uniform draws: one per row for
    :class:`Nucleus` and :class:`Sample`, none for :class:`Greedy`).
    """
    n, k = probs.shape
    rows = np.arange(n)
    if isinstance(selector, Greedy):
        return np.argmax(probs, axis=1).astype(np.int64), np.ones(n)
    if isinstance(selector, Sample):
        u = np.asarray(rng.random(n), dtype=np.float64)
        index = _inverse_cdf_rows(probs, u)
        return index.astype(np.int64), probs[rows, index] / probs.sum(axis=1)
    if not isinstance(selector, Nucleus):
        raise TypeError(
            f"per-context selection supports Nucleus, Sample and Greedy, got {selector!r}"
        )
    order = np.argsort(-probs, axis=1, kind="stable")
    ordered = np.take_along_axis(probs, order, axis=1)
    cumulative = np.cumsum(ordered, axis=1)
    reach = np.sum(cumulative < selector.top_p - _MASS_TOLERANCE, axis=1) + 1
    size = np.minimum(reach, k)
    boundary = ordered[rows, size - 1]
    position = np.arange(k)[None, :]
    tied = (ordered >= (boundary - TIE_ULPS * np.spacing(boundary))[:, None]) & (ordered > 0)
    after = position >= size[:, None]
    # candidates tied with the boundary directly follow it: count the leading run of ties
    run = np.cumprod(np.where(after, tied, True), axis=1).astype(bool) & after
    kept_size = size + run.sum(axis=1)
    kept_mask = position < kept_size[:, None]
    kept = np.where(kept_mask, ordered, 0.0)
    total = np.empty(n)
    # the scalar selector sums the kept entries of each row as a 1-D array of their length:
    # sum rows of equal length together so the floating-point result is the same
    for length in np.unique(kept_size):
        same = kept_size == length
        total[same] = ordered[same, :length].sum(axis=1)
    mass = kept / total[:, None]
    u = np.asarray(rng.random(n), dtype=np.float64)
    choice = np.where(kept_size > 1, _inverse_cdf_rows(mass, u), 0)
    index = order[rows, choice]
    return index.astype(np.int64), mass[rows, choice]


@dataclass(frozen=True)
class RowGroups:
    """How the rows of one contextual update map onto decisions and contexts.

    Attributes:
        n: number of decisions; G: rows per decision (``N = n * G``).
        inverse: (n,) the distinct-context position of each decision.
        m: number of distinct contexts; counts: (m,) decisions per distinct context.
        values, indices: (n,) the decisions' values and candidate indices.
        features: (n, d) the decisions' features, or None.
    """

    n: int
    group_size: int
    inverse: np.ndarray
    m: int
    counts: np.ndarray
    values: np.ndarray
    indices: np.ndarray
    features: np.ndarray | None

    def per_decision(self, row_values: np.ndarray) -> np.ndarray:
        """Reshape per-row values (N, ...) to (n, G, ...)."""
        return row_values.reshape((self.n, self.group_size, *row_values.shape[1:]))

    def pool(self, per_decision: np.ndarray) -> np.ndarray:
        """Sum per-decision values (n, ...) over the decisions of each distinct context: (m, ...)
        (exactly the values themselves when every context occurs once)."""
        if self.m == self.n:
            out = np.empty_like(per_decision)
            out[self.inverse] = per_decision
            return out
        out = np.zeros((self.m, *per_decision.shape[1:]))
        np.add.at(out, self.inverse, per_decision)
        return out


class ContextualRule(Rule):
    """Base class of the per-context rules (the contract :class:`metactl.MetaPolicy` drives).

    A contextual rule has a *global* state (``init_state``: fixed-shape arrays and scalars,
    validated like any rule's state) and per-context *rows* (``row_fields``: name -> width, 0
    for a scalar per context). Subclasses implement:

    * ``prior_rows(state, candidates, m)``: the rows of m unseen contexts (the documented prior);
    * ``global_rows(state, candidates)``: the global state seen as one context's rows (used by
      ``select()`` without contexts);
    * ``select_contexts(state, rows, features, candidates, step, selector, rng)`` ->
      ``(values, indices, probs, on_grid)`` arrays of shape (n,) (``probs`` may instead be a
      function returning them, evaluated on first access, when propensities are costly);
    * ``context_probs(state, rows, features, candidates, step, selector)`` -> (n, K): the
      distribution of ``Decision.index`` for each context (for logging);
    * ``update_contexts(state, rows, groups, feedback, candidates, step)`` -> ``(new_state,
      new_rows, signal)``: ``rows`` are those of the m distinct contexts (before the update),
      ``feedback`` holds the validated per-row arrays, and the new global state is trained on
      all N rows;
    * ``check_rows(rows, candidates, step)``: the rows' invariants (on every load and update).

    ``probs`` is the global policy's distribution (that of ``select()``). ``max_contexts``
    (a dataclass field of each subclass) bounds the stored contexts.
    """

    # plain class attributes (not dataclass fields here): subclasses redeclare them as fields
    feature_dim: int = 0
    max_contexts: int = DEFAULT_MAX_CONTEXTS
    # whether select_contexts uses the policy's selector (Nucleus, Sample or Greedy); rules that
    # draw their own values refuse any selector other than their default
    uses_selector: ClassVar[bool] = False

    def row_fields(self, candidates: np.ndarray) -> dict[str, int]:
        raise NotImplementedError

    def prior_rows(self, state: RuleState, candidates: np.ndarray, m: int) -> ContextRows:
        raise NotImplementedError

    def global_rows(self, state: RuleState, candidates: np.ndarray) -> ContextRows:
        raise NotImplementedError

    def select_contexts(
        self,
        state: RuleState,
        rows: ContextRows,
        features: np.ndarray | None,
        candidates: np.ndarray,
        step: int,
        selector: Selector,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | Callable[[], np.ndarray], np.ndarray]:
        raise NotImplementedError

    def context_probs(
        self,
        state: RuleState,
        rows: ContextRows,
        features: np.ndarray | None,
        candidates: np.ndarray,
        step: int,
        selector: Selector,
    ) -> np.ndarray:
        raise NotImplementedError

    def update_contexts(
        self,
        state: RuleState,
        rows: ContextRows,
        groups: RowGroups,
        feedback: Feedback,
        candidates: np.ndarray,
        step: int,
    ) -> tuple[RuleState, ContextRows, np.ndarray | None]:
        raise NotImplementedError

    def check_rows(self, rows: ContextRows, candidates: np.ndarray, step: int) -> None:
        """Raise ``ValueError`` naming the field if ``rows`` (finite, of the right shapes)
        break the rule's invariants. Default: no further invariant."""

    # The global-path hooks of Rule are not used for contextual rules: MetaPolicy routes
    # select()/update() through the vectorised methods above with the global rows.
    def update(
        self, state: RuleState, candidates: np.ndarray, decision: Decision, feedback: Feedback
    ) -> tuple[RuleState, np.ndarray | None]:
        raise TypeError(f"{self.name} is updated through MetaPolicy.update")
