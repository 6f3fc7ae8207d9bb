"""The records a meta-policy hands out: one :class:`Decision` per rollout batch (or, from
``select(contexts=...)``, one per context, bundled in a :class:`DecisionBatch`), one
:class:`UpdateInfo` per update."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

__all__ = ["ContextKey", "Decision", "DecisionBatch", "UpdateInfo"]

ContextKey = int | str
"""A context's key: a Python ``int`` (a prompt id, a data-set index, a bucket number) or a
``str`` (a task id). ``1`` and ``"1"`` are different keys; ``bool`` is refused."""


@dataclass(frozen=True)
class Decision:
    """The value chosen for one rollout batch (global) or for one context's rows (contextual).

    Attributes:
        index: a position in ``policy.candidates``, always a valid ``int``. When ``on_grid`` is
            True, ``value == candidates[index]``. When ``on_grid`` is False the rule produced a
            continuous value (a schedule, an entropy controller, PTGS's posterior-tempered
            temperature) and ``index`` is the candidate nearest to ``value`` (smallest
            ``|value - candidate|``, ties to the lower index); apply ``value``, never
            ``candidates[index]``.
        value: the value to sample with (and to score the rows with).
        prob: the probability with which the policy picked ``index`` (its propensity): for
            continuous values, the probability that the rule's draw falls nearest to
            ``candidates[index]`` (see the rule).
        step: the policy step this decision belongs to; ``update`` accepts it only at that step.
        policy_id: identifies the policy that made it; another policy refuses it.
        context: the context key for a per-context decision, ``None`` for a global one.
        on_grid: whether ``value`` is exactly ``candidates[index]`` (see ``index``).
        features: the context's feature vector given to ``select`` (rules with features), else
            ``None``.
    """

    index: int
    value: float
    prob: float
    step: int
    policy_id: str
    context: ContextKey | None = None
    on_grid: bool = True
    features: tuple[float, ...] | None = None


class DecisionBatch(Sequence[Decision]):
    """The decisions of one ``select(contexts=...)`` call: one per context, in the order of
    ``contexts``, held as arrays (no per-context Python object until one is indexed).

    It is a ``Sequence[Decision]`` (``len``, indexing, iteration give :class:`Decision`
    records), and exposes the arrays a trainer needs to apply the values to its rows:
    ``values`` (n,), ``indices`` (n,), ``probs`` (n,), ``on_grid`` (n,), ``contexts`` (tuple
    of keys) and ``features`` ((n, d) or None). ``probs`` may be computed on first access
    (PTGS's cell probabilities cost two incomplete-beta evaluations per context, which a
    trainer that never reads them should not pay); the values are fixed at ``select``. Pass
    it (or a list of its decisions, or the concatenation of several batches of the same step
    as a list) to ``policy.update``; the arrays are read-only.
    """

    __slots__ = (
        "_contexts",
        "_features",
        "_indices",
        "_on_grid",
        "_probs",
        "_probs_fn",
        "_values",
        "policy_id",
        "step",
    )

    def __init__(
        self,
        *,
        contexts: tuple[ContextKey, ...],
        values: np.ndarray,
        indices: np.ndarray,
        probs: np.ndarray | Callable[[], np.ndarray],
        on_grid: np.ndarray,
        features: np.ndarray | None,
        step: int,
        policy_id: str,
    ) -> None:
        n = len(contexts)
        self._probs_fn: Callable[[], np.ndarray] | None = None
        if callable(probs):
            self._probs_fn, probs = probs, np.zeros(n)
        arrays = (values, indices, probs, on_grid)
        if any(a.shape != (n,) for a in arrays) or (
            features is not None and (features.ndim != 2 or features.shape[0] != n)
        ):
            raise ValueError("DecisionBatch arrays must have one entry per context")
        for array in (*arrays, features):
            if array is not None:
                array.setflags(write=False)
        self._contexts = contexts
        self._values = values
        self._indices = indices
        self._probs = probs
        self._on_grid = on_grid
        self._features = features
        self.step = step
        self.policy_id = policy_id

    @property
    def contexts(self) -> tuple[ContextKey, ...]:
        return self._contexts

    @property
    def values(self) -> np.ndarray:
        """The value of each context, shape (n,): apply ``values[i]`` to context i's rows."""
        return self._values

    @property
    def indices(self) -> np.ndarray:
        """``Decision.index`` of each context, shape (n,), int64."""
        return self._indices

    @property
    def probs(self) -> np.ndarray:
        """``Decision.prob`` of each context, shape (n,) (computed on first access for rules
        whose propensities cost more than the draw)."""
        if self._probs_fn is not None:
            probs = np.asarray(self._probs_fn(), dtype=np.float64)
            if probs.shape != self._values.shape:
                raise ValueError("DecisionBatch probs must have one entry per context")
            probs.setflags(write=False)
            self._probs, self._probs_fn = probs, None
        return self._probs

    @property
    def on_grid(self) -> np.ndarray:
        """``Decision.on_grid`` of each context, shape (n,), bool."""
        return self._on_grid

    @property
    def features(self) -> np.ndarray | None:
        """The features given to ``select``, shape (n, d), or None."""
        return self._features

    def __len__(self) -> int:
        return len(self._contexts)

    @overload
    def __getitem__(self, i: int) -> Decision: ...

    @overload
    def __getitem__(self, i: slice) -> list[Decision]: ...

    def __getitem__(self, i: int | slice) -> Decision | list[Decision]:
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        n = len(self._contexts)
        if not -n <= i < n:
            raise IndexError(f"DecisionBatch index {i} out of range for {n} decisions")
        i = i % n
        feats = None if self._features is None else tuple(self._features[i].tolist())
        return Decision(
            index=int(self._indices[i]),
            value=float(self._values[i]),
            prob=float(self.probs[i]),
            step=self.step,
            policy_id=self.policy_id,
            context=self._contexts[i],
            on_grid=bool(self._on_grid[i]),
            features=feats,
        )

    def __iter__(self) -> Iterator[Decision]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"DecisionBatch(step={self.step}, n={len(self)}, values={self._values!r})"


@dataclass(frozen=True)
class UpdateInfo:
    """What an update did, for logging.

    Attributes:
        step: the step that was updated (the decision's step).
        probs: the meta-policy probabilities after the update, shape (K,) (for a contextual
            rule: those of its global policy, which every update also trains).
        candidate_advantages: the per-candidate signal of this batch, shape (K,), for rules that
            compute one (TAMPO, Hedge, MetaGradient: ``a_k = mean_i lhat_k(i) * A_i``); else None.
        contexts: for an update with per-context decisions, the number of distinct contexts it
            updated; else None.
        evicted: the context keys dropped from memory by this update (the least recently
            updated ones beyond the rule's ``max_contexts``), oldest first.
    """

    step: int
    probs: np.ndarray
    candidate_advantages: np.ndarray | None = None
    contexts: int | None = None
    evicted: tuple[ContextKey, ...] = ()
