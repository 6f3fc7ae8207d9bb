"""Sampling knobs and joint candidate grids (e.g. temperature x top-p).

A *knob* is one sampling hyperparameter the rollout sampler exposes. :func:`grid` builds the
cartesian product of values for two or more knobs; each candidate is then a small mapping of
knob values (``{"temperature": 0.8, "top_p": 0.95}``), scored jointly by
:func:`metactl.likelihood.candidate_loglik`. A :class:`KnobGrid` is an immutable sequence of
such mappings, JSON-safe through :meth:`KnobGrid.to_state` / :meth:`KnobGrid.from_state`.

Knob ranges (those of HF ``generate`` and vLLM, with "off" values allowed as candidates):

* ``temperature``: ``> 0`` (finite);
* ``top_p``: ``(0, 1]`` (``1`` keeps every token);
* ``top_k``: an integer ``>= 1`` (a value ``>= V`` keeps every token);
* ``min_p``: ``[0, 1)`` (``0`` keeps every token).
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, overload

import numpy as np

__all__ = ["KNOBS", "KnobGrid", "check_knob", "grid", "joint_candidates", "knob_values"]

#: The knobs a candidate may set, in canonical order.
KNOBS: tuple[str, ...] = ("temperature", "top_p", "top_k", "min_p")

#: Each knob's value when it is off (no truncation); temperature 1 is the untempered model.
KNOB_OFF: dict[str, float | int | None] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": None,
    "min_p": 0.0,
}

KnobValue = float | int

#: The temperatures a sampler can use: below 1e-6 logits / T overflows float32 for ordinary
#: logits, above 1e6 every distribution is uniform to float64 precision.
TEMPERATURE_RANGE = (1e-6, 1e6)
#: top_k values are held as float64 candidates: every integer below 2**53 is exact there.
TOP_K_LIMIT = 2**53
#: The most candidates a policy or a grid holds (the rules keep O(K) to O(K^2) numbers each).
MAX_CANDIDATES = 10_000

_STATE_VERSION = 1


def _check_knob_name(knob: object, name: str) -> str:
    if not isinstance(knob, str):
        raise TypeError(f"{name} must be a knob name (str), one of {list(KNOBS)}, got "
                        f"{type(knob).__name__}")  # fmt: skip
    if knob not in KNOBS:
        raise ValueError(f"{name}: unknown knob {knob!r}; known knobs are {list(KNOBS)}")
    return knob


def check_knob(knob: str, value: object, name: str | None = None) -> KnobValue:
    """Validate one knob value; returns it as ``float`` (``int`` for ``top_k``).

    Args:
        knob: one of :data:`KNOBS`.
        value: the value to check (bools, NaN and infinities are rejected).
        name: how to name the argument in errors (default: the knob's name).

    Raises:
        TypeError: an unknown knob type, a non-number, or a non-integer ``top_k``.
        ValueError: an unknown knob, or a value outside the knob's range.

    Example:
        >>> check_knob("top_p", 0.9), check_knob("top_k", 50)
        (0.9, 50)
    """
    knob = _check_knob_name(knob, "knob")
    label = knob if name is None else name
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{label} must be a number, got bool")
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 and not isinstance(
        value, numbers.Number
    ):
        value = value.item()  # a 0-d numpy array or torch scalar tensor
    if knob == "top_k":
        if not isinstance(value, (numbers.Integral, np.integer)):
            raise TypeError(f"{label} must be an integer >= 1, got {type(value).__name__} "
                            f"{value!r}")  # fmt: skip
        k = int(value)
        if not 1 <= k < TOP_K_LIMIT:
            raise ValueError(f"{label} must be an integer >= 1 and below 2**53, got {k}")
        return k
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{label} must be a real number, got {type(value).__name__}")
    try:
        x = float(value)
    except OverflowError as exc:
        raise ValueError(f"{label} must be finite, got a number beyond the float64 range") from exc
    if not math.isfinite(x):
        raise ValueError(f"{label} must be finite, got {x}")
    if knob == "temperature" and not TEMPERATURE_RANGE[0] <= x <= TEMPERATURE_RANGE[1]:
        raise ValueError(
            f"{label} must be a temperature in [{TEMPERATURE_RANGE[0]:g}, "
            f"{TEMPERATURE_RANGE[1]:g}] (> 0), got {x}"
        )
    if knob == "top_p" and not 0.0 < x <= 1.0:
        raise ValueError(f"{label} must lie in (0, 1], got {x}")
    if knob == "min_p" and not 0.0 <= x < 1.0:
        raise ValueError(f"{label} must lie in [0, 1), got {x}")
    return x


def knob_values(
    knob: str, values: object, name: str | None = None, *, minimum: int = 1
) -> np.ndarray:
    """Validate a 1-D list of unique values of one knob (at least ``minimum`` of them).

    Returns a float64 array (int64 for ``top_k``), order kept.
    """
    knob = _check_knob_name(knob, "knob")
    label = knob if name is None else name
    if isinstance(values, (str, bytes, Mapping)) or values is None:
        raise TypeError(f"{label} must be a sequence of {knob} values, got "
                        f"{type(values).__name__}")  # fmt: skip
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise ValueError(f"{label} must be 1-D, got shape {values.shape}")
        items = values.tolist()
    elif isinstance(values, Sequence):
        items = list(values)
    elif isinstance(values, numbers.Number):
        raise TypeError(f"{label} must be a sequence of {knob} values (e.g. [{values!r}]), got "
                        f"a single {type(values).__name__}")  # fmt: skip
    else:
        raise TypeError(f"{label} must be a sequence of {knob} values, got "
                        f"{type(values).__name__}")  # fmt: skip
    checked = [check_knob(knob, v, f"{label}[{i}]") for i, v in enumerate(items)]
    if len(checked) < minimum:
        raise ValueError(f"{label} needs at least {minimum} value(s), got {len(checked)}")
    dups = sorted(v for v, count in Counter(checked).items() if count > 1)
    if dups:
        raise ValueError(f"{label} has duplicate values: {dups}")
    dtype = np.int64 if knob == "top_k" else np.float64
    return np.asarray(checked, dtype=dtype)


class KnobGrid(Sequence[Mapping[str, KnobValue]]):
    """An immutable list of joint candidates over the same knobs.

    Candidate ``k`` is the mapping ``{knob: columns[knob][k]}``. Built by :func:`grid`
    (cartesian product) or :func:`joint_candidates` (any list of mappings with the same keys).

    Example:
        >>> g = grid(temperature=[0.7, 1.0], top_p=[0.9, 1.0])
        >>> len(g), g.knobs, g[1]
        (4, ('temperature', 'top_p'), {'temperature': 0.7, 'top_p': 1.0})
        >>> g.labels()[1]
        'temperature=0.7,top_p=1'
    """

    __slots__ = ("_columns", "_knobs")

    def __init__(self, knobs: Sequence[str], columns: Mapping[str, np.ndarray]) -> None:
        knobs = tuple(knobs)
        if not knobs:
            raise ValueError("a KnobGrid needs at least one knob")
        for knob in knobs:
            _check_knob_name(knob, "knobs")
        if len(set(knobs)) != len(knobs):
            raise ValueError(f"knobs has duplicates: {list(knobs)}")
        if set(columns) != set(knobs):
            raise ValueError(f"columns must have keys {list(knobs)}, got {sorted(columns)}")
        size = {len(columns[k]) for k in knobs}
        if len(size) != 1:
            raise ValueError("every knob column must have the same length")
        cols = {}
        for knob in knobs:
            arr = np.array(columns[knob], dtype=np.int64 if knob == "top_k" else np.float64)
            for i, v in enumerate(arr.tolist()):
                check_knob(knob, v, f"candidates[{i}][{knob!r}]")
            arr.setflags(write=False)
            cols[knob] = arr
        rows = list(zip(*(cols[k].tolist() for k in knobs), strict=True))
        if len(rows) > MAX_CANDIDATES:
            raise ValueError(f"a candidate grid holds at most {MAX_CANDIDATES} candidates, got "
                             f"{len(rows)}")  # fmt: skip
        if len(rows) < 2:
            raise ValueError(f"a candidate grid needs at least 2 candidates (K >= 2), got "
                             f"{len(rows)}")  # fmt: skip
        if len(set(rows)) != len(rows):
            dup = next(r for i, r in enumerate(rows) if r in rows[:i])
            shown = dict(zip(knobs, dup, strict=True))
            raise ValueError(f"candidates has duplicate entries: {shown}")
        self._knobs = knobs
        self._columns = cols

    @property
    def knobs(self) -> tuple[str, ...]:
        """The knob names, in the order given."""
        return self._knobs

    def column(self, knob: str) -> np.ndarray:
        """The (read-only) values of ``knob`` over the candidates."""
        if knob not in self._columns:
            raise KeyError(f"knob {knob!r} is not in this grid (knobs: {list(self._knobs)})")
        return self._columns[knob]

    def __len__(self) -> int:
        return len(self._columns[self._knobs[0]])

    @overload
    def __getitem__(self, index: int) -> dict[str, KnobValue]: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict[str, KnobValue]]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        if isinstance(index, bool) or not isinstance(index, (numbers.Integral, np.integer)):
            raise TypeError(f"index must be an int or slice, got {type(index).__name__}")
        i = int(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"candidate index {i} out of range for {len(self)} candidates")
        return {k: self._columns[k][i].item() for k in self._knobs}

    def __iter__(self) -> Iterator[dict[str, KnobValue]]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KnobGrid):
            return NotImplemented
        return self._knobs == other._knobs and all(
            np.array_equal(self._columns[k], other._columns[k]) for k in self._knobs
        )

    def __hash__(self) -> int:
        return hash((self._knobs, *(self._columns[k].tobytes() for k in self._knobs)))

    def __repr__(self) -> str:
        return f"KnobGrid(knobs={list(self._knobs)}, K={len(self)})"

    def labels(self) -> list[str]:
        """One short label per candidate, e.g. ``'temperature=0.7,top_p=0.9'`` (for logs)."""
        return [",".join(f"{k}={v:g}" for k, v in cand.items()) for cand in self]

    def to_state(self) -> dict[str, Any]:
        """JSON-safe description: ``{"version", "knobs", "candidates": [[v, ...], ...]}``."""
        return {
            "version": _STATE_VERSION,
            "knobs": list(self._knobs),
            "candidates": [[cand[k] for k in self._knobs] for cand in self],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> KnobGrid:
        """Inverse of :meth:`to_state` (every value re-validated)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        if set(state) != {"version", "knobs", "candidates"}:
            raise ValueError(f"state must have keys ['candidates', 'knobs', 'version'], got "
                             f"{sorted(map(str, state))}")  # fmt: skip
        version = state["version"]
        if isinstance(version, bool) or not isinstance(version, int) or version != _STATE_VERSION:
            raise ValueError(f"state['version'] must be {_STATE_VERSION}, got {state['version']!r}")
        knobs = state["knobs"]
        rows = state["candidates"]
        if not isinstance(knobs, list) or not isinstance(rows, list):
            raise TypeError("state['knobs'] and state['candidates'] must be lists")
        for i, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != len(knobs):
                raise ValueError(f"state['candidates'][{i}] must be a list of {len(knobs)} values")
        return joint_candidates([dict(zip(knobs, row, strict=True)) for row in rows])


def grid(**axes: Sequence[KnobValue]) -> KnobGrid:
    """Cartesian product of knob values: the joint candidates of a meta-policy.

    Args:
        **axes: ``knob=[values...]`` for each knob of :data:`KNOBS` to vary (at least one;
            each a non-empty sequence of unique valid values). The order of the keyword
            arguments is the order of the knobs; the last knob varies fastest.

    Returns:
        A :class:`KnobGrid` with ``prod(len(values))`` candidates (at least 2).

    Raises:
        TypeError: a knob given a single number or a non-sequence, or a wrongly typed value.
        ValueError: no knob, an unknown knob, an out-of-range or duplicate value, or fewer
            than 2 candidates in all.

    Example:
        >>> g = grid(temperature=[0.6, 1.0, 1.4], top_p=[0.9, 1.0])
        >>> len(g), g[0]
        (6, {'temperature': 0.6, 'top_p': 0.9})
    """
    if not axes:
        raise ValueError(f"grid needs at least one knob, e.g. grid(temperature=[...], "
                         f"top_p=[...]); known knobs are {list(KNOBS)}")  # fmt: skip
    for knob in axes:
        if knob not in KNOBS:
            raise ValueError(f"grid: unknown knob {knob!r}; known knobs are {list(KNOBS)}")
    values = {knob: knob_values(knob, vals, knob) for knob, vals in axes.items()}
    size = math.prod(len(v) for v in values.values())
    if size > MAX_CANDIDATES:
        raise ValueError(
            f"grid: {size} candidates, more than the {MAX_CANDIDATES} a policy holds; use "
            "fewer values per knob"
        )
    knobs = tuple(axes)
    rows = list(itertools.product(*(values[k].tolist() for k in knobs)))
    columns = {k: np.array([r[j] for r in rows]) for j, k in enumerate(knobs)}
    return KnobGrid(knobs, columns)


def joint_candidates(candidates: object, name: str = "candidates") -> KnobGrid:
    """A :class:`KnobGrid` from a grid or a list of mappings that all set the same knobs.

    Raises:
        TypeError: not a sequence of mappings (e.g. numbers mixed with mappings).
        ValueError: mappings with different knobs ("mixed grid"), unknown knobs, bad values,
            duplicates, or fewer than 2 candidates.
    """
    if isinstance(candidates, KnobGrid):
        return candidates
    if isinstance(candidates, (str, bytes, Mapping)) or not isinstance(candidates, Sequence):
        raise TypeError(f"{name} must be a KnobGrid or a list of knob mappings, got "
                        f"{type(candidates).__name__}")  # fmt: skip
    items = list(candidates)
    if not items:
        raise ValueError(f"{name} is empty")
    for i, cand in enumerate(items):
        if not isinstance(cand, Mapping):
            raise TypeError(f"{name}[{i}] must be a mapping of knob values like "
                            f"{{'temperature': 0.8, 'top_p': 0.9}}, got {type(cand).__name__}; "
                            "a candidate list cannot mix numbers and mappings")  # fmt: skip
        for knob in cand:
            if knob not in KNOBS:
                raise ValueError(f"{name}[{i}]: unknown knob {knob!r}; known knobs are "
                                 f"{list(KNOBS)}")  # fmt: skip
    knobs = tuple(items[0])
    if not knobs:
        raise ValueError(f"{name}[0] sets no knob")
    for i, cand in enumerate(items):
        if set(cand) != set(knobs):
            raise ValueError(f"{name} is a mixed grid: {name}[{i}] sets {sorted(cand)} but "
                             f"{name}[0] sets {sorted(knobs)}; every candidate must set the "
                             "same knobs")  # fmt: skip
    columns = {}
    for knob in knobs:
        vals = [check_knob(knob, cand[knob], f"{name}[{i}][{knob!r}]")
                for i, cand in enumerate(items)]  # fmt: skip
        columns[knob] = np.array(vals)
    return KnobGrid(knobs, columns)
