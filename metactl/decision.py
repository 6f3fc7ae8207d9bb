"""The records a meta-policy hands out: one :class:`Decision` per rollout batch (or, from
``select(contexts=...)``, one per context, bundled in a :class:`DecisionBatch`), one
:class:`UpdateInfo` per update."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

from .knobs import KnobGrid, KnobValue

__all__ = ["ContextKey", "Decision", "DecisionBatch", "UpdateInfo", "group_settings"]

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
        value: the value to sample with (and to score the rows with): a ``float`` for a
            policy over one knob (also for ``top_k``: the float of the integer, see
            ``setting``) or ``"generic"`` numbers; for a joint policy
            (``hyperparameter="joint"``) the candidate's knob mapping, a plain JSON-safe
            ``dict`` such as ``{"temperature": 0.8, "top_p": 0.95}`` (knobs in the order of
            :data:`metactl.knobs.KNOBS`); a joint decision is then not hashable.
        prob: the probability with which the policy picked ``index`` (its propensity): for
            continuous values, the probability that the rule's draw falls nearest to
            ``candidates[index]`` (see the rule).
        step: the policy step this decision belongs to; ``update`` accepts it only at that step.
        policy_id: identifies the policy that made it; another policy refuses it.
        context: the context key for a per-context decision, ``None`` for a global one.
        on_grid: whether ``value`` is exactly ``candidates[index]`` (see ``index``).
        features: the context's feature vector given to ``select`` (rules with features), else
            ``None``.
        knobs: the sampler knobs the decision sets (``policy.knobs``): ``("temperature",)``,
            ``("top_k",)``, ..., the grid's knobs for a joint policy, ``()`` for
            ``"generic"``.

    ``setting`` is the sampler keyword arguments of the decision, ``{knob: value}``, so that an
    adapter can always do ``sampler_kwargs.update(decision.setting)``.
    """

    index: int
    value: float | dict[str, KnobValue]
    prob: float
    step: int
    policy_id: str
    context: ContextKey | None = None
    on_grid: bool = True
    features: tuple[float, ...] | None = None
    knobs: tuple[str, ...] = ()

    @property
    def setting(self) -> dict[str, KnobValue]:
        """The sampler setting ``{knob: value}`` (a new dict each call): ``{"temperature":
        0.9}``, ``{"top_k": 50}`` (an ``int``), ``{"temperature": 0.8, "top_p": 0.95}``.

        Raises:
            ValueError: a ``"generic"`` decision (it sets no knob; apply ``value`` yourself).
        """
        return decision_setting(self.knobs, self.value)


def decision_setting(knobs: tuple[str, ...], value: float | dict[str, KnobValue]) -> dict[
    str, KnobValue
]:
    """``{knob: value}`` of a decision over ``knobs`` (see :attr:`Decision.setting`)."""
    if not knobs:
        raise ValueError(
            "a 'generic' decision sets no sampler knob (hyperparameter='generic'): apply "
            "decision.value yourself"
        )
    if isinstance(value, dict):
        return dict(value)
    if len(knobs) != 1:
        raise ValueError(f"a decision over the knobs {list(knobs)} needs a mapping value")
    knob = knobs[0]
    # top_k decisions are always on the grid (continuous rules are refused for it): exact int
    return {knob: int(value) if knob == "top_k" else float(value)}


class DecisionBatch(Sequence[Decision]):
    """The decisions of one ``select`` call: one per context, in the order of ``contexts``,
    held as arrays (no per-context Python object until one is indexed). ``select()`` without
    contexts makes a batch of one global decision (``contexts`` None) and returns its only
    element.

    It is a ``Sequence[Decision]`` (``len``, indexing, iteration give :class:`Decision`
    records), and exposes the arrays a trainer needs to apply the values to its rows:
    ``values`` (n,), ``indices`` (n,), ``probs`` (n,), ``on_grid`` (n,), ``contexts`` (tuple
    of keys) and ``features`` ((n, d) or None). ``probs`` may be computed on first access
    (PTGS's cell probabilities cost two incomplete-beta evaluations per context, which a
    trainer that never reads them should not pay); the values are fixed at ``select``. Pass
    it (or a list of its decisions, or the concatenation of several batches of the same step
    as a list) to ``policy.update``; the arrays are read-only. ``knobs`` is the one knob the
    values set (``()`` for ``"generic"``) and ``settings`` the per-context sampler settings.
    Per-context decisions exist for one-knob policies only: a joint policy refuses contextual
    rules (see :class:`metactl.MetaPolicy`); its global decision's value is the setting of the
    candidate in ``grid``.
    """

    __slots__ = (
        "_contexts",
        "_features",
        "_grid",
        "_indices",
        "_knobs",
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
        contexts: tuple[ContextKey, ...] | None,
        values: np.ndarray,
        indices: np.ndarray,
        probs: np.ndarray | Callable[[], np.ndarray],
        on_grid: np.ndarray,
        features: np.ndarray | None,
        step: int,
        policy_id: str,
        knobs: tuple[str, ...] = (),
        grid: KnobGrid | None = None,
    ) -> None:
        n = 1 if contexts is None else len(contexts)
        if len(knobs) > 1 and grid is None:
            raise ValueError("a DecisionBatch over several knobs needs their grid")
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
        self._grid = grid
        self._values = values
        self._indices = indices
        self._probs = probs
        self._on_grid = on_grid
        self._features = features
        self._knobs = tuple(knobs)
        self.step = step
        self.policy_id = policy_id

    @property
    def contexts(self) -> tuple[ContextKey, ...] | None:
        """The context keys, in order; None for the global decision of ``select()``."""
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

    @property
    def knobs(self) -> tuple[str, ...]:
        """The knob the values set (``("temperature",)``, ...), ``()`` for generic values."""
        return self._knobs

    @property
    def settings(self) -> list[dict[str, KnobValue]]:
        """The sampler setting of each context, ``[{knob: value}, ...]`` (see
        :attr:`Decision.setting`); ``ValueError`` for generic values."""
        if self._grid is not None:
            return [self._grid[i] for i in self._indices.tolist()]
        return [decision_setting(self._knobs, v) for v in self._values.tolist()]

    def __len__(self) -> int:
        return self._values.shape[0]

    @overload
    def __getitem__(self, i: int) -> Decision: ...

    @overload
    def __getitem__(self, i: slice) -> list[Decision]: ...

    def __getitem__(self, i: int | slice) -> Decision | list[Decision]:
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"DecisionBatch index {i} out of range for {n} decisions")
        i = i % n
        feats = None if self._features is None else tuple(self._features[i].tolist())
        index = int(self._indices[i])
        return Decision(
            index=index,
            value=float(self._values[i]) if self._grid is None else self._grid[index],
            prob=float(self.probs[i]),
            step=self.step,
            policy_id=self.policy_id,
            context=None if self._contexts is None else self._contexts[i],
            on_grid=bool(self._on_grid[i]),
            features=feats,
            knobs=self._knobs,
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


def group_settings(decision: Decision | DecisionBatch, groups: int) -> list[dict[str, KnobValue]]:
    """The sampler setting of each of ``groups`` prompt groups, in order: a per-prompt
    :class:`DecisionBatch`'s own settings (one per decision, ``groups`` of them), or the global
    :class:`Decision`'s setting for every group. The one place a trainer turns a decision into
    per-group settings, whatever the rule.

    Example:
        >>> import metactl
        >>> group_settings(metactl.tampo(seed=0).select(), 2)
        [{'temperature': 1.2}, {'temperature': 1.2}]
    """
    if isinstance(decision, DecisionBatch):
        if len(decision) != groups:
            raise ValueError(f"groups is {groups} but the batch holds {len(decision)} decisions")
        return decision.settings
    if not isinstance(decision, Decision):
        raise TypeError(f"decision must be a metactl.Decision or DecisionBatch, got "
                        f"{type(decision).__name__}")  # fmt: skip
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    setting = decision.setting
    return [dict(setting) for _ in range(groups)]

