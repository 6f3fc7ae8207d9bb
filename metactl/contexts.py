"""Per-context (per-prompt) meta-policies: the contract every trainer and adapter follows.

One temperature per step cannot suit an easy and a hard prompt at once; a *contextual* rule
(:class:`metactl.PTGS`, :class:`metactl.ContextualTAMPO`, :class:`metactl.LinearThompson`)
keeps a small state per context and picks a value per context. The API is the global one with
a list of contexts:

Example (G = 2 rollouts per prompt; PTGS needs the per-row ``rewards``):

    >>> import metactl
    >>> policy = metactl.ptgs(seed=0, total_steps=100)
    >>> batch = policy.select(contexts=[17, 4, 17])     # one Decision per context, in order
    >>> len(batch), batch[0].context, batch[0].on_grid
    (3, 17, False)
    >>> temps = batch.values                            # (n,): sample context i's rows at temps[i]
    >>> info = policy.update(batch, rewards=[1, 0, 0, 0, 1, 1])   # rows: G per decision, in order
    >>> info.contexts, policy.num_contexts, policy.step             # 17's two groups are pooled
    (2, 2, 1)

The contract a trainer follows (keys, features, G consecutive rows per decision, which
feedback each rule needs, eviction) is in ``docs/api.md`` ("Per prompt"). This module holds the
keys' validation, the bounded store of per-context rows (least recently updated evicted first,
part of ``state_dict()['contexts']`` so a resumed policy continues bit-identically) and the
check of an update's decisions against the policy and step.
"""

from __future__ import annotations

import collections
import itertools
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from . import _validation as check
from .decision import ContextKey, Decision, DecisionBatch
from .rules.base import DEFAULT_MAX_CONTEXTS, ContextRows

__all__ = [
    "DEFAULT_MAX_CONTEXTS",
    "ContextRows",
    "ContextStore",
    "DecisionArrays",
    "context_keys",
    "decision_arrays",
]


def _key(x: Any, name: str) -> ContextKey:
    if isinstance(x, str):
        return str(x)  # numpy.str_ and other str subclasses become plain (JSON-safe) str
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must hold context keys (int or str), got {type(x).__name__} {x!r}")
    return int(x)


def context_keys(contexts: Any, name: str = "contexts") -> tuple[ContextKey, ...]:
    """Validate a batch of context keys: a non-empty list/tuple or 1-D numpy array of ``int``
    or ``str`` keys (numpy ints become Python ints). Returns them as a tuple."""
    if isinstance(contexts, np.ndarray):
        if contexts.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {contexts.shape}")
        if np.issubdtype(contexts.dtype, np.integer):
            keys: tuple[ContextKey, ...] = tuple(contexts.tolist())
        elif np.issubdtype(contexts.dtype, np.str_):
            keys = tuple(str(k) for k in contexts.tolist())
        else:
            raise TypeError(f"{name} must hold ints or strs, got dtype {contexts.dtype}")
    elif isinstance(contexts, (list, tuple)):
        keys = tuple(_key(k, f"{name}[{i}]") for i, k in enumerate(contexts))
    else:
        raise TypeError(
            f"{name} must be a list, tuple or 1-D array of context keys, got "
            f"{type(contexts).__name__}"
        )
    if not keys:
        raise ValueError(f"{name} is empty: give at least one context")
    return keys


class ContextStore:
    """The stored contexts of one policy: keys in least-recently-updated order and one numpy
    array per row field (slot-indexed; free slots are reused), at most ``capacity`` keys.

    Lookups and writes cost O(keys in the call): a dict maps key -> slot; each slot carries the
    stamp of its last write (a counter that only grows), and a log of (slot, stamp) in write
    order lists the keys least recently updated first (an entry whose slot was written again or
    freed since no longer matches its slot's stamp and is skipped). A write stamps its slots
    and appends them to the log as vectors, with no per-key work for stored keys.
    """

    def __init__(self, fields: Mapping[str, int], capacity: int) -> None:
        self._fields = dict(fields)
        self._capacity = capacity
        self._slot_of: dict[ContextKey, int] = {}
        self._allocated = 0
        self._arrays: dict[str, np.ndarray] = {
            name: np.zeros((0, width) if width else (0,)) for name, width in self._fields.items()
        }
        self._key_of = np.empty(0, dtype=object)  # by slot; None for a free slot
        self._stamp = np.zeros(0, dtype=np.int64)  # by slot: its last write's stamp, -1 free
        self._clock = 0  # the next stamp
        # the log: entries [head, end) of (slot, stamp), in write order
        self._log_slots = np.zeros(0, dtype=np.int64)
        self._log_stamps = np.zeros(0, dtype=np.int64)
        self._head = 0
        self._end = 0
        self._free: list[int] = []
        # The keys and slots of the last lookup: select(contexts=...) and the update of its
        # decisions look up the same keys with no write in between (any write clears it).
        self._looked_up: tuple[tuple[ContextKey, ...], np.ndarray] | None = None
        # The slots and rows of the last gather of stored keys only (any write clears it).
        self._gathered: tuple[np.ndarray, ContextRows] | None = None

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, key: object) -> bool:
        return key in self._slot_of

    @property
    def capacity(self) -> int:
        return self._capacity

    def _live_slots(self) -> np.ndarray:
        """The slots of the stored keys, least recently updated first."""
        slots = self._log_slots[self._head : self._end]
        return slots[self._stamp[slots] == self._log_stamps[self._head : self._end]]

    def keys(self) -> list[ContextKey]:
        """Stored keys, least recently updated first."""
        return list(self._key_of[self._live_slots()].tolist())

    def slots(self, keys: Sequence[ContextKey]) -> np.ndarray:
        """The slot of each key, -1 for keys not stored; changes nothing."""
        keys = tuple(keys)
        last = self._looked_up
        if last is not None and last[0] == keys:
            return last[1].copy()
        found = np.fromiter(
            map(self._slot_of.get, keys, itertools.repeat(-1, len(keys))),
            dtype=np.int64,
            count=len(keys),
        )
        self._looked_up = (keys, found.copy())
        return found

    def looked_up(self, keys: Sequence[ContextKey]) -> np.ndarray | None:
        """The slots of ``keys`` when they were the last keys looked up (with no write since),
        else None (nothing is looked up)."""
        last = self._looked_up
        if last is not None and last[0] == tuple(keys):
            return last[1].copy()
        return None

    def gather(self, slots: np.ndarray, prior: ContextRows) -> ContextRows:
        """Rows for these slots; ``prior`` (rows of the same length) fills slots -1."""
        seen = slots >= 0
        if not np.any(seen):
            return {name: prior[name].copy() for name in self._arrays}
        if np.all(seen):  # the usual batch of stored keys: the stored rows alone (new arrays)
            return {name: rows.copy() for name, rows in self._stored_rows(slots).items()}
        out: ContextRows = {}
        for name, array in self._arrays.items():
            rows = prior[name].copy()
            rows[seen] = array[slots[seen]]
            out[name] = rows
        return out

    def _stored_rows(self, slots: np.ndarray) -> ContextRows:
        """The stored rows of these slots (all stored), kept until the next write: select and
        the update of its decisions gather the same slots (read from the cache, then copied
        by the caller, as random reads of large arrays cost more than a copy)."""
        last = self._gathered
        if last is not None and np.array_equal(last[0], slots):
            return last[1]
        rows = {name: array[slots] for name, array in self._arrays.items()}
        self._gathered = (slots.copy(), rows)
        return rows

    def evictions(self, keys: Sequence[ContextKey], slots: np.ndarray) -> list[ContextKey]:
        """The keys that writing ``keys`` (distinct, at their current ``slots``) would evict,
        oldest first."""
        return list(self._key_of[self._evicted_slots(slots)].tolist())

    def _evicted_slots(self, slots: np.ndarray) -> np.ndarray:
        """The slots :meth:`evictions` names, oldest first."""
        new = int(np.count_nonzero(slots < 0))
        excess = len(self._slot_of) + new - self._capacity
        if excess <= 0:
            return np.zeros(0, dtype=np.int64)
        return self._oldest(excess, slots[slots >= 0])

    def _oldest(self, count: int, writing: np.ndarray) -> np.ndarray:
        """The slots of the ``count`` least recently updated keys whose slots are not in
        ``writing``, oldest first: the log read from its head in growing windows."""
        found: list[np.ndarray] = []
        need, start, width = count, self._head, max(count + writing.size, 64)
        while need > 0 and start < self._end:
            stop = min(start + width, self._end)
            slots = self._log_slots[start:stop]
            live = self._stamp[slots] == self._log_stamps[start:stop]
            if writing.size:
                live &= ~np.isin(slots, writing)
            taken = slots[live][:need]
            found.append(taken)
            need -= taken.size
            start, width = stop, 2 * width
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def write(
        self, keys: Sequence[ContextKey], slots: np.ndarray, rows: ContextRows
    ) -> list[ContextKey]:
        """Store ``rows`` for the distinct ``keys`` (their current ``slots``), mark them as the
        most recently updated (in the order given), evict beyond capacity. Returns the evicted
        keys, oldest first."""
        self._looked_up = self._gathered = None
        gone = self._evicted_slots(slots)
        evicted: list[ContextKey] = self._key_of[gone].tolist()
        collections.deque(map(self._slot_of.pop, evicted), maxlen=0)
        self._free.extend(gone.tolist())
        self._key_of[gone] = None
        self._stamp[gone] = -1
        is_new = slots < 0
        slots = slots.copy()
        new = np.flatnonzero(is_new)
        if new.size:
            reuse = min(len(self._free), new.size)
            fresh = new.size - reuse
            assigned = [self._free.pop() for _ in range(reuse)]
            if fresh:
                self._grow(self._allocated + fresh)
                assigned.extend(range(self._allocated, self._allocated + fresh))
                self._allocated += fresh
            slots[new] = assigned
            new_keys = [keys[i] for i in new.tolist()]
            self._slot_of.update(zip(new_keys, assigned, strict=True))
            self._key_of[slots[new]] = _object_array(new_keys)
        for name, array in self._arrays.items():
            array[slots] = rows[name]
        stamps = np.arange(self._clock, self._clock + slots.size, dtype=np.int64)
        self._clock += slots.size
        self._stamp[slots] = stamps
        self._append_log(slots, stamps)
        self._advance_head()
        return evicted

    def _advance_head(self) -> None:
        """Move the log's head past its stale entries (each entry is passed once), so that
        reading the oldest keys does not rescan the evicted and rewritten ones."""
        width = 64
        while self._head < self._end:
            stop = min(self._head + width, self._end)
            slots = self._log_slots[self._head : stop]
            live = np.flatnonzero(self._stamp[slots] == self._log_stamps[self._head : stop])
            if live.size:
                self._head += int(live[0])
                return
            self._head, width = stop, 2 * width

    def _append_log(self, slots: np.ndarray, stamps: np.ndarray) -> None:
        """Append entries to the log; when it is full, keep only its live entries (in order)
        in a log of twice their number plus room for these."""
        end = self._end + slots.size
        if end > self._log_slots.size:
            live = self._live_slots()
            size = max(2 * (live.size + slots.size), 64)
            log_slots, log_stamps = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64)
            log_slots[: live.size] = live
            log_stamps[: live.size] = self._stamp[live]
            self._log_slots, self._log_stamps = log_slots, log_stamps
            self._head, self._end = 0, live.size
            end = live.size + slots.size
        self._log_slots[self._end : end] = slots
        self._log_stamps[self._end : end] = stamps
        self._end = end

    def _grow(self, needed: int) -> None:
        current = self._stamp.shape[0]
        if needed <= current:
            return
        size = min(max(needed, 2 * current, 64), max(needed, self._capacity))
        for name, array in self._arrays.items():
            grown = np.zeros((size, *array.shape[1:]))
            grown[: array.shape[0]] = array
            self._arrays[name] = grown
        key_of = np.empty(size, dtype=object)
        key_of[:current] = self._key_of
        stamp = np.full(size, -1, dtype=np.int64)
        stamp[:current] = self._stamp
        self._key_of, self._stamp = key_of, stamp

    def to_json(self) -> dict[str, Any]:
        """``{"keys": [...], "rows": {field: [...]}}``, least recently updated first."""
        slots = self._live_slots()
        return {
            "keys": list(self._key_of[slots].tolist()),
            "rows": {name: array[slots].tolist() for name, array in self._arrays.items()},
        }

    @classmethod
    def from_json(
        cls, data: Any, fields: Mapping[str, int], capacity: int, name: str
    ) -> tuple[ContextStore, ContextRows]:
        """Validate ``state_dict['contexts']`` (keys int/str, distinct, at most ``capacity``;
        each field a finite float array with one row per key and the field's width) and
        rebuild the store. Returns the store and its rows (for the rule's own checks)."""
        if not isinstance(data, dict) or set(data) != {"keys", "rows"}:
            got = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{name} must be a dict with keys ['keys', 'rows'], got {got}")
        raw_keys = data["keys"]
        if not isinstance(raw_keys, list):
            raise TypeError(f"{name}['keys'] must be a list, got {type(raw_keys).__name__}")
        keys = [_key(k, f"{name}['keys'][{i}]") for i, k in enumerate(raw_keys)]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{name}['keys'] has duplicate keys")
        if len(keys) > capacity:
            raise ValueError(
                f"{name} holds {len(keys)} contexts, more than max_contexts = {capacity}"
            )
        raw_rows = data["rows"]
        if not isinstance(raw_rows, dict) or set(raw_rows) != set(fields):
            got = (
                sorted(map(str, raw_rows))
                if isinstance(raw_rows, dict)
                else type(raw_rows).__name__
            )
            raise ValueError(f"{name}['rows'] must have keys {sorted(fields)}, got {got}")
        m = len(keys)
        rows: ContextRows = {}
        for field, width in fields.items():
            field_name = f"{name}['rows'][{field!r}]"
            shape = (m, width) if width else (m,)
            if m == 0:
                value = raw_rows[field]
                if not isinstance(value, list) or value:
                    raise ValueError(f"{field_name} must be an empty list (no keys stored)")
                rows[field] = np.zeros(shape)
                continue
            array = check.finite_array(raw_rows[field], field_name, ndim=len(shape))
            if array.shape != shape:
                raise ValueError(f"{field_name} must have shape {shape}, got {array.shape}")
            rows[field] = array
        store = cls(fields, capacity)
        if m:
            store._grow(m)
            for field, array in rows.items():
                store._arrays[field][:m] = array
            store._allocated = m
            store._slot_of = dict(zip(keys, range(m), strict=True))
            store._key_of[:m] = _object_array(keys)
            store._stamp[:m] = np.arange(m)
            store._clock = m
            store._append_log(np.arange(m, dtype=np.int64), np.arange(m, dtype=np.int64))
        return store, rows


def _object_array(keys: Sequence[ContextKey]) -> np.ndarray:
    """The keys as a 1-D object array (each key itself, never split or converted)."""
    out = np.empty(len(keys), dtype=object)
    out[:] = list(keys)
    return out


class DecisionArrays(NamedTuple):
    """The decisions of one update as arrays: ``contexts`` (None for the global decision),
    ``values``, ``indices`` (n,), ``features`` ((n, d) or None) and a function giving the
    propensities (n,) (computed only for rules that read them)."""

    contexts: tuple[ContextKey, ...] | None
    values: np.ndarray
    indices: np.ndarray
    features: np.ndarray | None
    propensities: Callable[[], np.ndarray]


def _check_owner(d: Decision | DecisionBatch, name: str, policy_id: str, step: int) -> None:
    was, are = ("were", "are") if isinstance(d, DecisionBatch) else ("was", "is")
    if d.policy_id != policy_id:
        raise ValueError(f"{name} {was} made by another MetaPolicy; select() on this one")
    if d.step != step:
        raise ValueError(
            f"{name} {are} from step {d.step} but the policy is at step {step}: each "
            "decision is updated once, at the step it was made"
        )


def _check_index(index: object, name: str, n_candidates: int) -> int:
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (numbers.Integral, np.integer)):
        raise TypeError(f"{name}.index must be an int, got {type(index).__name__} {index!r}")
    if not 0 <= int(index) < n_candidates:
        raise ValueError(f"{name}.index {index} is out of range")
    return int(index)


def decision_arrays(
    decisions: Any, policy_id: str, step: int, candidates: np.ndarray, feature_dim: int
) -> DecisionArrays:
    """Check the decisions of an update against the policy and step: the global
    :class:`Decision` of ``select()``, a :class:`DecisionBatch`, or a list of per-context
    :class:`Decision` records. Returns them as :class:`DecisionArrays`."""
    k = candidates.shape[0]
    if isinstance(decisions, Decision) and decisions.context is None:
        _check_owner(decisions, "decision", policy_id, step)
        index = _check_index(decisions.index, "decision", k)
        value = decisions.value if not isinstance(decisions.value, dict) else candidates[index]
        prob = decisions.prob
        return DecisionArrays(
            None,
            np.array([value], dtype=np.float64),
            np.array([index], dtype=np.int64),
            None,
            lambda: np.array([prob], dtype=np.float64),
        )
    if isinstance(decisions, DecisionBatch):
        _check_owner(decisions, "decisions", policy_id, step)
        if len(decisions) == 0:
            raise ValueError("decisions is empty")
        batch = decisions
        return DecisionArrays(
            batch.contexts, batch.values, batch.indices, batch.features, lambda: batch.probs
        )
    if isinstance(decisions, Decision):
        decisions = [decisions]
    if not isinstance(decisions, (list, tuple)):
        raise TypeError(
            "decisions must be a metactl.Decision, a DecisionBatch or a list of Decisions, got "
            f"{type(decisions).__name__}"
        )
    if not decisions:
        raise ValueError("decisions is empty")
    contexts: list[ContextKey] = []
    values = np.empty(len(decisions))
    indices = np.empty(len(decisions), dtype=np.int64)
    props = np.empty(len(decisions))
    features = np.empty((len(decisions), feature_dim)) if feature_dim else None
    for i, d in enumerate(decisions):
        name = f"decisions[{i}]"
        if not isinstance(d, Decision):
            raise TypeError(f"{name} must be a metactl.Decision, got {type(d).__name__}")
        _check_owner(d, name, policy_id, step)
        if d.context is None:
            raise ValueError(
                f"{name} is a global decision (context None): update it alone, not in a list "
                "of per-context decisions"
            )
        indices[i] = _check_index(d.index, name, k)
        contexts.append(_key(d.context, f"{name}.context"))
        if isinstance(d.value, dict):  # joint policies make no per-context decisions
            raise TypeError(f"{name} is a joint decision; per-context decisions set one knob")
        values[i] = d.value
        props[i] = d.prob
        if features is not None:
            if d.features is None or len(d.features) != feature_dim:
                raise ValueError(f"{name}.features must hold {feature_dim} values")
            features[i] = d.features
    return DecisionArrays(tuple(contexts), values, indices, features, lambda: props)
