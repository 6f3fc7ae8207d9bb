"""The sampler setting: knobs, their validation, joint grids and the truncated distribution.

A *knob* is one sampling hyperparameter the rollout sampler exposes (:data:`KNOBS`); a
:class:`Setting` is one value of each (``temperature``, ``top_p``, ``top_k``, ``min_p``), and a
:class:`SettingRows` one setting per row of a batch (a temperature per prompt group, say).
:func:`grid` builds the cartesian product of values for two or more knobs; each candidate is a
small mapping of knob values (``{"temperature": 0.8, "top_p": 0.95}``), scored jointly by
:func:`metactl.likelihood.candidate_loglik`. A :class:`KnobGrid` is an immutable sequence of
such mappings, JSON-safe through :meth:`KnobGrid.to_state` / :meth:`KnobGrid.from_state`.

Knob ranges (those of HF ``generate`` and vLLM, with "off" values allowed as candidates):

* ``temperature``: in ``[1e-6, 1e6]`` (:data:`TEMPERATURE_RANGE`; ``> 0`` and finite);
* ``top_p``: ``(0, 1]`` (``1`` keeps every token);
* ``top_k``: an integer ``>= 1`` below ``2**53`` (a value ``>= V`` keeps every token; ``None``
  is off);
* ``min_p``: ``[0, 1)`` (``0`` keeps every token).

The distribution a setting samples from, for raw logits ``z`` (NumPy arrays or torch tensors;
torch is imported only when tensors are passed): ``p = softmax(z / T)``, the *kept set* ``S``
(:func:`kept_mask`) a prefix of the tokens sorted by logit with ties kept together (top-k keeps
every logit ``>=`` the ``k``-th largest; top-p keeps a token when the mass of the tokens strictly
more likely than it is ``< top_p`` times the mass of the survivors of the earlier truncations;
min-p keeps ``p_v >= min_p * max(p)``), and the sampler's ``p_trunc = p [v in S] / p(S)``
(:func:`truncated_probs`). HF ``generate`` applies top-k, then top-p, then min-p
(``order="hf"``); vLLM min-p, then top-k and top-p (``order="vllm"``): the two differ only when
top-p and min-p are both on (:mod:`metactl.likelihood.families` has the details).
:func:`log_probs` gives the smoothed log-probabilities every scorer uses,
``log q = log((1 - eps) p_trunc + eps p)`` with ``eps = SMOOTHING_EPS`` (finite off ``S``, which
a token sampled under another setting may be); with no truncation on, ``q = p`` exactly.
:func:`metactl.likelihood.candidate_loglik` scores a candidate with the same ``q`` and the same
kept-set code, so a trainer's loss and the meta-policy's likelihoods agree.

Example:
    >>> import numpy as np
    >>> s = Setting(temperature=0.7).with_values({"top_p": 0.9})
    >>> s.label(), s.truncated
    ('temperature=0.7,top_p=0.9', True)
    >>> z = np.array([[3.0, 2.0, 0.0, -1.0]])
    >>> kept_mask(z, Setting(top_p=0.8)).tolist()
    [[True, True, False, False]]
    >>> np.round(truncated_probs(z, Setting(top_p=0.8)), 3).tolist()
    [[0.731, 0.269, 0.0, 0.0]]
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, overload

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "HYPERPARAMETERS",
    "KNOBS",
    "KNOB_OFF",
    "ORDERS",
    "SMOOTHING_EPS",
    "KnobGrid",
    "SamplingTerms",
    "Setting",
    "SettingRows",
    "check_knob",
    "grid",
    "joint_candidates",
    "kept_mask",
    "knob_values",
    "log_probs",
    "sampling_terms",
    "truncated_probs",
]

#: The knobs a candidate may set, in canonical order.
KNOBS: tuple[str, ...] = ("temperature", "top_p", "top_k", "min_p")

#: Each knob's value when it is off (no truncation); temperature 1 is the untempered model.
KNOB_OFF: dict[str, float | int | None] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": None,
    "min_p": 0.0,
}

#: What a :class:`metactl.MetaPolicy` can control: one sampler knob (its candidates are values
#: of that knob), ``"joint"`` (candidates are a :class:`KnobGrid` of knob mappings) or
#: ``"generic"`` (any finite numbers, no knob: the caller applies them).
HYPERPARAMETERS: tuple[str, ...] = (*KNOBS, "joint", "generic")

#: How errors name each knob's values.
KNOB_PLURALS: dict[str, str] = {
    "temperature": "temperatures",
    "top_p": "top-p values",
    "top_k": "top-k values",
    "min_p": "min-p values",
}

KnobValue = float | int

#: The temperatures a sampler can use: below 1e-6 logits / T overflows float32 for ordinary
#: logits, above 1e6 every distribution is uniform to float64 precision.
TEMPERATURE_RANGE = (1e-6, 1e6)
#: top_k values are held as float64 candidates: every integer below 2**53 is exact there.
TOP_K_LIMIT = 2**53
#: The most candidates a policy or a grid holds (the rules keep O(K) to O(K^2) numbers each).
MAX_CANDIDATES = 10_000
#: The weight ``eps`` of the full distribution in the smoothed ``q = (1 - eps) p_trunc + eps p``
#: (:func:`log_probs`; :func:`metactl.likelihood.candidate_loglik`'s default ``epsilon``).
SMOOTHING_EPS = 1e-3
#: Orders of the truncations: HF ``generate``'s or vLLM's sampler.
ORDERS: tuple[str, ...] = ("hf", "vllm")

_STATE_VERSION = 1
# kept-set scratch per torch call, in logit entries (a sort's values): rows are taken in chunks
_CHUNK_ENTRIES = 1 << 23


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
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 and not isinstance(
        value, numbers.Number
    ):
        value = value.item()  # a 0-d numpy array or torch scalar tensor (a bool one too)
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{label} must be a real number, got bool")
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
            f"{label} must be > 0 and within the sampler's temperatures "
            f"[{TEMPERATURE_RANGE[0]:g}, {TEMPERATURE_RANGE[1]:g}], got {x}"
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


def _format(value: object) -> str:
    return "off" if value is None else f"{value:g}"


def _label(items: Iterator[tuple[str, object]] | Sequence[tuple[str, object]]) -> str:
    """``'temperature=0.7,top_p=0.9'``: the log label of knob values (``top_k`` off: ``off``)."""
    return ",".join(f"{knob}={_format(value)}" for knob, value in items)


def _check_knob_names(knobs: object, name: str) -> tuple[str, ...]:
    if isinstance(knobs, str) or not isinstance(knobs, Sequence):
        raise TypeError(f"{name} must be a sequence of knob names, e.g. ('temperature',), got "
                        f"{type(knobs).__name__}")  # fmt: skip
    return tuple(_check_knob_name(knob, name) for knob in knobs)


@dataclass(frozen=True)
class Setting:
    """One sampler setting: a value of every knob, each off by default (``top_k=None``).

    Every value is checked with :func:`check_knob` (``top_k`` stays an ``int``, the others
    become ``float``). A policy's decision sets some knobs (``decision.setting``); the trainer's
    fixed setting supplies the rest (:meth:`with_values`).

    Example:
        >>> s = Setting(temperature=0.8, top_k=50)
        >>> s.as_dict()
        {'temperature': 0.8, 'top_p': 1.0, 'top_k': 50, 'min_p': 0.0}
        >>> s.with_values({"top_p": 0.9}).label()
        'temperature=0.8,top_p=0.9,top_k=50'
        >>> s.fixed_knobs(("temperature",))
        {'top_p': 1.0, 'top_k': 50, 'min_p': 0.0}
        >>> Setting(top_p=1.5)
        Traceback (most recent call last):
        ...
        ValueError: top_p must lie in (0, 1], got 1.5
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0

    def __post_init__(self) -> None:
        for knob in KNOBS:
            value = getattr(self, knob)
            if not (knob == "top_k" and value is None):
                object.__setattr__(self, knob, check_knob(knob, value))

    @property
    def truncated(self) -> bool:
        """Whether a truncation is on (``top_p < 1``, a ``top_k`` or ``min_p > 0``)."""
        return self.top_p < 1.0 or self.top_k is not None or self.min_p > 0.0

    def as_dict(self) -> dict[str, Any]:
        """Every knob's value, in :data:`KNOBS` order (JSON-safe; ``top_k`` ``None`` when off)."""
        return {knob: getattr(self, knob) for knob in KNOBS}

    def with_values(self, values: Mapping[str, Any]) -> Setting:
        """This setting with the knobs in ``values`` replaced (``{knob: value}``, e.g. a
        decision's ``setting`` or a :class:`KnobGrid` candidate); every value is checked."""
        if not isinstance(values, Mapping):
            raise TypeError(f"values must be a mapping of knob values, got "
                            f"{type(values).__name__}")  # fmt: skip
        unknown = sorted(str(k) for k in values if k not in KNOBS)
        if unknown:
            raise ValueError(f"a sampler setting has no knob {unknown}; its knobs are "
                             f"{list(KNOBS)}")  # fmt: skip
        return Setting(**{**self.as_dict(), **values})

    def fixed_knobs(self, varied: Sequence[str]) -> dict[str, Any]:
        """The knobs that candidates varying ``varied`` leave fixed, at this setting's values:
        :func:`metactl.likelihood.candidate_loglik`'s ``temperature``/``top_p``/``top_k``/
        ``min_p`` keywords."""
        names = _check_knob_names(varied, "varied")
        return {k: v for k, v in self.as_dict().items() if k not in names}

    def label(self, knobs: Sequence[str] | None = None) -> str:
        """A short label for logs: ``knobs`` in the given order (as :meth:`KnobGrid.labels`
        writes a candidate over them), by default the temperature and every knob that is on."""
        if knobs is None:
            names = tuple(k for k in KNOBS if k == "temperature" or getattr(self, k) != KNOB_OFF[k])
        else:
            names = _check_knob_names(knobs, "knobs")
        return _label([(k, getattr(self, k)) for k in names])

    def at_temperature(self, temperature: Any) -> Setting | SettingRows:
        """This setting at ``temperature``: one number (a :class:`Setting`), or one per row (a
        1-D sequence, array or tensor: a :class:`SettingRows`), e.g. a per-prompt policy's.

        Example:
            >>> Setting(top_p=0.9).at_temperature(0.7).label()
            'temperature=0.7,top_p=0.9'
            >>> Setting(top_p=0.9).at_temperature([0.7, 1.2]).temperature.tolist()
            [0.7, 1.2]
        """
        if isinstance(temperature, (list, tuple, np.ndarray)) or _is_tensor(temperature):
            shape = tuple(temperature.shape) if hasattr(temperature, "shape") else np.shape(
                temperature
            )
            if len(shape) == 1:
                return self.rows(shape[0], temperature=temperature)
            if shape:
                raise ValueError(f"temperature must be a number or 1-D (one per row), got "
                                 f"shape {shape}")  # fmt: skip
        return self.with_values({"temperature": temperature})

    def rows(self, n: int, **values: Any) -> SettingRows:
        """This setting for each of ``n`` rows, with the knobs in ``values`` given per row: a
        number for every row, or ``n`` of them (a sequence, an array or a tensor), each checked
        with :func:`check_knob` (``top_k=None`` is off, also for one row of a sequence)."""
        if isinstance(n, bool) or not isinstance(n, (numbers.Integral, np.integer)) or n < 1:
            raise ValueError(f"n must be an int >= 1 (the number of rows), got {n!r}")
        unknown = sorted(str(k) for k in values if k not in KNOBS)
        if unknown:
            raise ValueError(f"a sampler setting has no knob {unknown}; its knobs are "
                             f"{list(KNOBS)}")  # fmt: skip
        own = self.as_dict()
        return SettingRows(**{
            knob: _row_values(knob, values.get(knob, own[knob]), int(n)) for knob in KNOBS
        })  # fmt: skip


def _row_values(knob: str, value: Any, n: int) -> np.ndarray:
    """One knob's value for each of ``n`` rows (``top_k`` off is 0)."""
    if knob == "top_k" and value is None:
        return np.zeros(n, dtype=np.int64)
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, (list, tuple, np.ndarray)):
        if np.shape(value) != (n,):
            raise ValueError(f"{knob} must be a number or one value per row, shape ({n},), got "
                             f"{np.shape(value)}")  # fmt: skip
        items = value.tolist() if isinstance(value, np.ndarray) else list(value)
        checked = [0 if knob == "top_k" and v is None else check_knob(knob, v, f"{knob}[{i}]")
                   for i, v in enumerate(items)]  # fmt: skip
    else:
        checked = [check_knob(knob, value)] * n
    return np.asarray(checked, dtype=np.int64 if knob == "top_k" else np.float64)


@dataclass(frozen=True, eq=False)
class SettingRows:
    """One sampler setting per row: ``(N,)`` read-only arrays ``temperature``, ``top_p``,
    ``top_k`` (``int64``, 0 = off) and ``min_p`` (``float64``). Row ``i`` of a batch of logits
    (its leading axis) samples under setting ``i``; :meth:`Setting.rows` builds one.

    Example:
        >>> rows = Setting(top_p=0.9).rows(3, temperature=[0.7, 1.0, 1.3])
        >>> len(rows), rows.temperature.tolist(), rows.truncated.tolist()
        (3, [0.7, 1.0, 1.3], [True, True, True])
        >>> rows[2]
        Setting(temperature=1.3, top_p=0.9, top_k=None, min_p=0.0)
    """

    temperature: np.ndarray
    top_p: np.ndarray
    top_k: np.ndarray
    min_p: np.ndarray

    def __post_init__(self) -> None:
        lengths = set()
        for knob in KNOBS:
            arr = np.asarray(getattr(self, knob))
            if arr.ndim != 1:
                raise ValueError(f"{knob} must be 1-D (one value per row), got shape {arr.shape}")
            integral = np.issubdtype(arr.dtype, np.integer)
            if arr.dtype == np.bool_ or not (integral or np.issubdtype(arr.dtype, np.floating)):
                raise TypeError(f"{knob} must hold real numbers, got dtype {arr.dtype}")
            if knob == "top_k" and not integral:
                raise TypeError(f"top_k must hold integers (0 = off), got dtype {arr.dtype}")
            arr = arr.astype(np.int64 if knob == "top_k" else np.float64)  # a fresh copy
            lo, hi = TEMPERATURE_RANGE
            ok = {
                "temperature": (arr >= lo) & (arr <= hi),
                "top_p": (arr > 0.0) & (arr <= 1.0),
                "top_k": (arr >= 0) & (arr < TOP_K_LIMIT),
                "min_p": (arr >= 0.0) & (arr < 1.0),
            }[knob]
            if not ok.all():
                i = int(np.flatnonzero(~ok)[0])
                allowed = {
                    "temperature": f"a temperature in [{lo:g}, {hi:g}]",
                    "top_p": "in (0, 1]",
                    "top_k": "an integer in [0, 2**53) (0 = off)",
                    "min_p": "in [0, 1)",
                }[knob]
                raise ValueError(f"{knob}[{i}] must be {allowed}, got {arr[i]}")
            arr.setflags(write=False)
            object.__setattr__(self, knob, arr)
            lengths.add(arr.shape[0])
        if len(lengths) != 1:
            raise ValueError("temperature, top_p, top_k and min_p must have the same length")
        if 0 in lengths:
            raise ValueError("a SettingRows needs at least one row")

    def __len__(self) -> int:
        return int(self.temperature.shape[0])

    def __getitem__(self, index: int) -> Setting:
        i = int(index)
        top_k = int(self.top_k[i])
        return Setting(float(self.temperature[i]), float(self.top_p[i]), top_k or None,
                       float(self.min_p[i]))  # fmt: skip

    @property
    def truncated(self) -> np.ndarray:
        """``(N,)`` bool: the row has a truncation on."""
        return (self.top_k > 0) | (self.top_p < 1.0) | (self.min_p > 0.0)

    def repeat(self, times: int) -> SettingRows:
        """Every row repeated ``times`` times in place (row ``i`` -> rows ``i * times ..``),
        e.g. once per position of a sequence."""
        return SettingRows(*(np.repeat(getattr(self, knob), times) for knob in KNOBS))


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
        return [_label(list(cand.items())) for cand in self]

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


# ----------------------------------------------------------------------------------------------
# The truncated distribution
# ----------------------------------------------------------------------------------------------
class SamplingTerms(NamedTuple):
    """What a trainer needs of a setting's distribution over logits ``(..., V)``: ``log_q``
    (the smoothed log-probabilities, :func:`log_probs`), ``log_p`` (``log softmax(z / T)``),
    ``kept`` (the kept set, bool; all True where no truncation is on), ``kept_mass``
    (``(...)``, ``p(S)``, 1 where none is on) and ``truncated`` (``(...)`` bool). NumPy arrays
    for NumPy logits, tensors for tensors (``log_q``, ``log_p`` and ``kept_mass``
    differentiable)."""

    log_q: Any
    log_p: Any
    kept: Any
    kept_mass: Any
    truncated: Any


def _check_order(order: object) -> str:
    if order not in ORDERS:
        if not isinstance(order, str):
            raise TypeError(f"order must be a str, one of {list(ORDERS)}, got "
                            f"{type(order).__name__}")  # fmt: skip
        raise ValueError(f"order must be one of {list(ORDERS)}, got {order!r}")
    return str(order)


def _check_epsilon(epsilon: object, name: str = "epsilon") -> float:
    if isinstance(epsilon, (bool, np.bool_)) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(epsilon).__name__}")
    eps = float(epsilon)
    if not 0.0 < eps < 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {epsilon!r}")
    return eps


def _is_tensor(x: object) -> bool:
    """Whether ``x`` is a torch tensor (checked without importing torch)."""
    return hasattr(x, "detach") and hasattr(x, "is_floating_point")


def check_float_logits(logits: Any) -> tuple[int, ...]:
    """``logits`` is a floating numpy array or torch tensor; returns its shape."""
    if _is_tensor(logits):
        if not logits.is_floating_point():
            raise TypeError(f"logits must hold floating-point values, got {logits.dtype}")
    elif isinstance(logits, np.ndarray):
        if not np.issubdtype(logits.dtype, np.floating):
            raise TypeError(f"logits must hold floating-point values, got {logits.dtype}")
    else:
        raise TypeError(f"logits must be a numpy.ndarray or torch.Tensor, got "
                        f"{type(logits).__name__}")  # fmt: skip
    return tuple(logits.shape)


def _check_inputs(logits: Any, setting: object, tokens: Any = None) -> None:
    if not isinstance(setting, (Setting, SettingRows)):
        raise TypeError(f"setting must be a metactl.knobs.Setting or SettingRows, got "
                        f"{type(setting).__name__}")  # fmt: skip
    shape = check_float_logits(logits)
    if len(shape) < 1 or shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got {shape}")
    if isinstance(setting, SettingRows) and (len(shape) < 2 or shape[0] != len(setting)):
        raise ValueError(f"setting has {len(setting)} rows but logits has shape {shape}: one "
                         "row per entry of the leading axis")  # fmt: skip
    if tokens is not None:
        if tuple(tokens.shape) != shape[:-1]:
            raise ValueError(f"tokens must have shape {shape[:-1]} (the logits' without V), got "
                             f"{tuple(tokens.shape)}")  # fmt: skip
        if "int" not in str(tokens.dtype):
            raise TypeError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")


def sampling_terms(
    logits: Any, setting: Setting | SettingRows, *, order: str = "hf",
    epsilon: float = SMOOTHING_EPS,
) -> SamplingTerms:  # fmt: skip
    """Every term of ``setting``'s distribution over ``logits`` ``(..., V)``: see
    :class:`SamplingTerms` (a :class:`SettingRows` gives one setting per entry of the leading
    axis). NumPy logits are computed in float64, tensors in float32 on their device.

    Example:
        >>> import numpy as np
        >>> t = sampling_terms(np.array([[2.0, 1.0, -1.0]]), Setting(top_k=2))
        >>> t.kept.tolist(), np.round(t.kept_mass, 3).tolist()
        ([[True, True, False]], [0.965])
    """
    _check_inputs(logits, setting)
    order = _check_order(order)
    eps = _check_epsilon(epsilon)
    if _is_tensor(logits):
        return _torch_terms(logits, setting, order, eps)
    return _numpy_terms(logits, setting, order, eps)


def log_probs(
    logits: Any, setting: Setting | SettingRows, tokens: Any = None, *, order: str = "hf",
    epsilon: float = SMOOTHING_EPS,
) -> Any:  # fmt: skip
    """Smoothed log-probabilities ``log q = log((1 - eps) p_trunc + eps p)`` of ``setting``
    over raw ``logits`` ``(..., V)``: the whole ``(..., V)`` array, or with ``tokens``
    (``logits.shape[:-1]`` integer ids) those tokens' (``tokens.shape``). With no truncation on
    it is ``log softmax(z / T)`` exactly. Differentiable for tensors (the kept set is locally
    constant in the logits). This is the ``q`` that
    :func:`metactl.likelihood.candidate_loglik` scores a candidate with.

    Example:
        >>> import numpy as np
        >>> z = np.array([[3.0, 2.0, 0.0, -1.0]])
        >>> lq = log_probs(z, Setting(top_p=0.8), np.array([2]))   # a token outside the nucleus
        >>> bool(np.isfinite(lq).all()), bool(lq[0] < np.log(0.034))
        (True, True)
    """
    if tokens is not None and not _is_tensor(tokens):
        tokens = np.asarray(tokens)
    _check_inputs(logits, setting, tokens)
    order = _check_order(order)
    eps = _check_epsilon(epsilon)
    if _is_tensor(logits):
        if tokens is not None:
            return _torch_token_log_probs(logits, setting, tokens, order, eps)
        return _torch_terms(logits, setting, order, eps).log_q
    log_q = _numpy_terms(logits, setting, order, eps).log_q
    if tokens is None:
        return log_q
    toks = np.asarray(tokens)
    vocab = logits.shape[-1]
    if toks.size and (toks.min() < 0 or toks.max() >= vocab):
        raise ValueError(f"tokens must lie in [0, V) = [0, {vocab})")
    return np.take_along_axis(log_q, toks[..., None], axis=-1)[..., 0]


def kept_mask(logits: Any, setting: Setting | SettingRows, *, order: str = "hf") -> Any:
    """The kept set of ``setting`` over ``logits`` ``(..., V)``: a bool array (tensor) of the
    same shape, all True where no truncation is on. Ties are kept or dropped together;
    ``-inf`` logits (probability 0) only where the kept set reaches them.

    Example:
        >>> import numpy as np
        >>> kept_mask(np.array([[1.0, 2.0, 2.0, 0.5]]), Setting(top_k=2)).tolist()
        [[False, True, True, False]]
    """
    _check_inputs(logits, setting)
    order = _check_order(order)
    if _is_tensor(logits):
        import torch

        scaled, knobs, truncated = _torch_setup(logits, setting)
        if truncated is False:
            return torch.ones_like(scaled, dtype=torch.bool)
        return _torch_kept(scaled, knobs, order)
    return _numpy_terms(logits, setting, order, SMOOTHING_EPS).kept


def truncated_probs(logits: Any, setting: Setting | SettingRows, *, order: str = "hf") -> Any:
    """The sampler's distribution ``p_trunc = p [v in S] / p(S)`` of ``setting`` over raw
    ``logits`` ``(..., V)`` (``p = softmax(z / T)``; ``p`` itself where no truncation is on):
    what a rollout draws from.

    Example:
        >>> import numpy as np
        >>> truncated_probs(np.array([[0.0, 0.0, -9.0]]), Setting(top_k=1)).tolist()
        [[0.5, 0.5, 0.0]]
    """
    _check_inputs(logits, setting)
    order = _check_order(order)
    if _is_tensor(logits):
        return _torch_truncated_probs(logits, setting, order)
    terms = _numpy_terms(logits, setting, order, SMOOTHING_EPS)
    p = np.exp(terms.log_p)
    kept = np.where(terms.kept, p, 0.0)
    return np.where(terms.truncated[..., None], kept / kept.sum(axis=-1, keepdims=True), p)


# ----------------------------------------------------------------------------------------------
# NumPy kernels (float64): also those of metactl.likelihood's NumPy scoring
# ----------------------------------------------------------------------------------------------
def _sort_rows(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, zs, first)`` of ``(M, V)`` logits: the descending order (stable), the sorted
    logits and, for each sorted entry, the index where its tie group starts."""
    vocab = z.shape[1]
    order = np.argsort(-z, axis=1, kind="stable")
    zs = np.take_along_axis(z, order, axis=1)
    new_group = np.ones_like(zs, dtype=bool)
    new_group[:, 1:] = zs[:, 1:] != zs[:, :-1]
    first = np.maximum.accumulate(np.where(new_group, np.arange(vocab), 0), axis=1)
    return order, zs, first


def _sorted_mass(
    e: np.ndarray, order: np.ndarray, first: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ws, cum, above)``: ``e = p / p_max`` in the sorted order, its cumulative sum, and the
    mass strictly more likely than each sorted entry (the mass before its tie group)."""
    ws = np.take_along_axis(e, order, axis=1)
    cum = np.cumsum(ws, axis=1)
    above = np.take_along_axis(cum - ws, first, axis=1)
    return ws, cum, above


def _kept_count_numpy(
    zs: np.ndarray,
    ws: np.ndarray,
    cum: np.ndarray,
    above: np.ndarray,
    top_k: Any,
    top_p: Any,
    min_p: Any,
    order: str,
) -> np.ndarray:
    """``(M,)`` length of each row's kept prefix (in ``[1, V]``), the knobs a number for every
    row or one per row (``top_k`` 0 = off): the kept-set definition of the NumPy backend."""
    c, vocab = zs.shape
    rows = np.arange(c)
    full = np.full(c, vocab)
    top_k = np.broadcast_to(np.asarray(top_k, dtype=np.int64), (c,))
    top_p = np.broadcast_to(np.asarray(top_p, dtype=np.float64), (c,))
    min_p = np.broadcast_to(np.asarray(min_p, dtype=np.float64), (c,))
    has_k = top_k > 0
    n_k = full
    if has_k.any():  # ties at the k-th logit are kept (HF, vLLM)
        k = np.where(has_k, np.minimum(top_k, vocab), vocab)
        n_k = np.where(has_k, (zs >= zs[rows, k - 1][:, None]).sum(axis=1), full)
    has_mp = min_p > 0.0
    n_mp = np.where(has_mp, (ws >= min_p[:, None]).sum(axis=1), full) if has_mp.any() else full
    n = np.minimum(n_k, n_mp)
    has_p = top_p < 1.0
    if has_p.any():  # top-p measures the mass of the earlier truncations' survivors
        base = n_k if order == "hf" else n
        base_mass = cum[rows, base - 1]
        n_p = np.where(has_p, (above < top_p[:, None] * base_mass[:, None]).sum(axis=1), full)
        n = np.minimum(n, n_p)
    return n


def _smoothed_numpy(logp: Any, kept: Any, frac: Any, eps: float) -> Any:
    """``log q = log p + log((1 - eps) [kept] / p(S) + eps)``, at most 0 (``frac = p(S)``)."""
    ratio = np.where(kept, (1.0 - eps) / frac + eps, eps)
    return np.minimum(logp + np.log(ratio), 0.0)


def _log_softmax_rows(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _numpy_rows(
    logits: np.ndarray, setting: Setting | SettingRows
) -> tuple[np.ndarray, SettingRows]:
    """The logits as ``(M, V)`` float64 rows and the setting of each row."""
    vocab = logits.shape[-1]
    z = np.asarray(logits, dtype=np.float64).reshape(-1, vocab)
    if isinstance(setting, Setting):
        return z, setting.rows(z.shape[0])
    inner = z.shape[0] // len(setting)
    return z, setting.repeat(inner) if inner != 1 else setting


def _numpy_terms(
    logits: np.ndarray, setting: Setting | SettingRows, order: str, eps: float
) -> SamplingTerms:
    shape = logits.shape
    z, rows = _numpy_rows(logits, setting)
    m, vocab = z.shape
    if m and not np.all(np.isfinite(z.max(axis=1))):
        raise ValueError("logits must not hold NaN or +inf, and every row needs a finite entry "
                         "(-inf, probability 0, is allowed)")  # fmt: skip
    temps = rows.temperature.reshape(m, 1)
    truncated = rows.truncated
    plain = _log_softmax_rows(z / temps)
    if not truncated.any():
        terms = (plain, plain, np.ones((m, vocab), dtype=bool), np.ones(m), truncated)
    else:
        index = np.arange(m)
        u = z - z.max(axis=1, keepdims=True)  # <= 0, max exactly 0
        e = np.exp(u / temps)  # p / p_max
        total = np.maximum(e.sum(axis=1), 1.0)
        logp = u / temps - np.log(total)[:, None]
        # descending by logit (the order does not depend on T > 0); ties grouped
        sort, zs, first = _sort_rows(z)
        ws, cum, above = _sorted_mass(e, sort, first)
        n = _kept_count_numpy(zs, ws, cum, above, rows.top_k, rows.top_p, rows.min_p, order)
        kept = z >= zs[index, n - 1][:, None]
        frac = np.minimum(cum[index, n - 1] / total, 1.0)
        log_q = _smoothed_numpy(logp, kept, frac[:, None], eps)
        cut = truncated[:, None]
        terms = (np.where(cut, log_q, plain), np.where(cut, logp, plain),
                 np.where(cut, kept, True), np.where(truncated, frac, 1.0), truncated)  # fmt: skip
    log_q, log_p, kept, frac, truncated = terms
    return SamplingTerms(log_q.reshape(shape), log_p.reshape(shape), kept.reshape(shape),
                         frac.reshape(shape[:-1]), truncated.reshape(shape[:-1]))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Torch kernels (float32; torch imported on use): also those of metactl.likelihood's scoring
# ----------------------------------------------------------------------------------------------
class _Counts(NamedTuple):
    n: Any  # (...) kept prefix length, >= 1
    base: Any  # (...) the prefix whose mass top-p measures


def _tie_starts(vals: torch.Tensor) -> torch.Tensor:
    """For logits sorted in descending order ``(..., S)``: where each entry's tie group starts."""
    import torch

    idx = torch.arange(vals.shape[-1], device=vals.device).expand(vals.shape)
    new_group = torch.ones_like(vals, dtype=torch.bool)
    new_group[..., 1:] = vals[..., 1:] != vals[..., :-1]
    return torch.where(new_group, idx, torch.zeros_like(idx)).cummax(-1).values


def _kept_count_torch(
    vals: torch.Tensor,
    ws: torch.Tensor,
    cum: torch.Tensor,
    top_k: Any,
    top_p: Any,
    min_p: Any,
    *,
    order: str,
    vocab: int,
    full_mass: torch.Tensor | None = None,
) -> _Counts:
    """Kept prefix lengths (shape ``ws.shape[:-1]``): the kept-set definition of the torch
    backend.

    ``vals``: logits in descending order ``(..., S)`` (broadcastable to ``ws``); ``ws``: ``p /
    p_max`` in that order; ``cum = ws.cumsum(-1)``. ``S`` may be a window of the top ``S <
    vocab`` logits: then a count of ``S`` may continue past it (the caller widens the window)
    and ``full_mass`` is the mass of all ``vocab`` tokens. The knobs are numbers (every row) or
    tensors broadcastable to ``ws.shape[:-1]`` (``top_k`` 0 = off).
    """
    import torch

    shape = ws.shape[:-1]
    size = ws.shape[-1]
    full = torch.full(shape, vocab, dtype=torch.long, device=ws.device)
    if isinstance(top_k, torch.Tensor):  # ties at the k-th logit are kept (HF, vLLM)
        idx = (top_k.clamp(max=vocab) - 1).clamp(0, size - 1).expand(shape)
        kth = vals.expand(*shape, size).gather(-1, idx.unsqueeze(-1))
        n_k = torch.where(top_k > 0, (vals >= kth).sum(-1), full)
    elif top_k:
        k = min(int(top_k), vocab)
        n_k = (vals >= vals[..., k - 1 : k]).sum(-1)
    else:
        n_k = full
    if isinstance(min_p, torch.Tensor):
        on = min_p > 0
        n_mp = full
        if bool(on.any()):
            n_mp = torch.where(on, (ws >= min_p.unsqueeze(-1)).sum(-1), full)
    else:
        n_mp = (ws >= min_p).sum(-1) if min_p > 0 else full
    # >= 1 for valid rows (the top token is always kept); the clamp keeps indices in range
    n = torch.minimum(n_k, n_mp).clamp_min(1)
    base = n_k if order == "hf" else n  # top-p measures the earlier truncations' survivors
    on_p = top_p < 1.0
    if bool(on_p.any()) if isinstance(on_p, torch.Tensor) else on_p:
        inside = cum.gather(-1, (base - 1).clamp(0, size - 1).unsqueeze(-1)).squeeze(-1)
        base_mass = inside if full_mass is None else torch.where(base >= vocab, full_mass, inside)
        limit = top_p * base_mass
        # a token is kept when the mass strictly more likely than it (before its tie group)
        # is < limit: a tie at the boundary is kept or dropped whole
        above = (cum - ws).gather(-1, _tie_starts(vals).expand(ws.shape))
        n_p = (above < limit.unsqueeze(-1)).sum(-1)
        if isinstance(on_p, torch.Tensor):
            n_p = torch.where(on_p, n_p, full)
        n = torch.minimum(n, n_p).clamp_min(1)
    return _Counts(n, base)


def _smoothed_torch(logp: Any, kept: Any, frac: Any, eps: float) -> Any:
    """``log q = log p + log((1 - eps) [kept] / p(S) + eps)``, at most 0 (``frac = p(S)``)."""
    import torch

    ratio = torch.where(kept, (1.0 - eps) / frac + eps, eps)
    return (logp + ratio.log()).clamp(max=0.0)  # q <= 1 exactly; removes rounding only


_TorchKnobs = tuple[Any, Any, Any]


def _torch_setup(
    logits: torch.Tensor, setting: Setting | SettingRows
) -> tuple[torch.Tensor, _TorchKnobs, Any]:
    """``(scaled, (top_k, top_p, min_p), truncated)``: ``logits / T`` in float32, the
    truncation knobs (numbers, or tensors over the rows of ``scaled.reshape(-1, V)``) and
    whether a truncation is on (a bool, or a tensor of ``logits.shape[:-1]``)."""
    import torch

    if isinstance(setting, Setting):
        scaled = logits.float() / setting.temperature
        knobs: _TorchKnobs = (setting.top_k or 0, setting.top_p, setting.min_p)
        return scaled, knobs, setting.truncated
    device = logits.device
    shape = (-1,) + (1,) * (logits.ndim - 1)
    temps = torch.tensor(setting.temperature, dtype=torch.float32, device=device)
    scaled = logits.float() / temps.reshape(shape)
    truncated = setting.truncated
    if not truncated.any():
        return scaled, (0, 1.0, 0.0), False
    if all(np.all(v == v[0]) for v in (setting.top_k, setting.top_p, setting.min_p)):
        # one truncation for every row (a temperature per row): the knobs as numbers
        first = setting[0]
        return scaled, (first.top_k or 0, first.top_p, first.min_p), True
    inner = math.prod(logits.shape[1:-1])

    def per_row(values: np.ndarray, dtype: Any) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device).repeat_interleave(inner)

    knobs = (per_row(setting.top_k, torch.long), per_row(setting.top_p, torch.float32),
             per_row(setting.min_p, torch.float32))  # fmt: skip
    cut = per_row(truncated, torch.bool).reshape(logits.shape[:-1])
    return scaled, knobs, cut


def _torch_kept(scaled: torch.Tensor, knobs: _TorchKnobs, order: str) -> torch.Tensor:
    """Bool kept set of the tempered logits ``scaled`` (``(..., V)`` float32), in chunks of
    rows (a sort's values of ``2**23`` logits at most)."""
    import torch

    vocab = scaled.shape[-1]
    flat = scaled.reshape(-1, vocab).float()
    out = torch.empty_like(flat, dtype=torch.bool)
    step = max(1, _CHUNK_ENTRIES // vocab)
    with torch.no_grad():
        for s in range(0, flat.shape[0], step):
            rows = flat[s : s + step]
            part = tuple(k[s : s + step] if isinstance(k, torch.Tensor) else k for k in knobs)
            vals = rows.sort(dim=-1, descending=True).values
            w = torch.exp(vals - vals[:, :1])  # p / p_max, sorted descending
            cum = w.cumsum(-1)
            n = _kept_count_torch(vals, w, cum, *part, order=order, vocab=vocab).n
            out[s : s + step] = rows >= vals.gather(-1, (n - 1)[:, None])  # the last kept logit
    return out.reshape(scaled.shape)


def _torch_terms(
    logits: torch.Tensor, setting: Setting | SettingRows, order: str, eps: float
) -> SamplingTerms:
    import torch

    scaled, knobs, truncated = _torch_setup(logits, setting)
    logp = torch.log_softmax(scaled, dim=-1)
    shape = logp.shape[:-1]
    if truncated is False:
        ones = torch.ones_like(logp, dtype=torch.bool)
        return SamplingTerms(logp, logp, ones, torch.ones(shape, device=logp.device),
                             torch.zeros(shape, dtype=torch.bool, device=logp.device))  # fmt: skip
    kept = _torch_kept(scaled.detach(), knobs, order)
    frac = (logp.exp() * kept).sum(-1).clamp(min=1e-38, max=1.0)  # p(S), differentiable
    log_q = _smoothed_torch(logp, kept, frac.unsqueeze(-1), eps)
    if isinstance(truncated, torch.Tensor):
        cut = truncated.unsqueeze(-1)
        frac = torch.where(truncated, frac, torch.ones_like(frac))
        return SamplingTerms(torch.where(cut, log_q, logp), logp, kept, frac, truncated)
    return SamplingTerms(log_q, logp, kept, frac,
                         torch.ones(shape, dtype=torch.bool, device=logp.device))  # fmt: skip


def _torch_token_log_probs(
    logits: torch.Tensor, setting: Setting | SettingRows, tokens: torch.Tensor, order: str,
    eps: float,
) -> torch.Tensor:  # fmt: skip
    """:func:`log_probs` of ``tokens`` only: ``O(...)`` extra memory beyond one ``(..., V)``
    log-softmax (the kept set is a bool array of that shape)."""
    import torch

    scaled, knobs, truncated = _torch_setup(logits, setting)
    logp = torch.log_softmax(scaled, dim=-1)
    index = torch.as_tensor(tokens).to(device=logp.device, dtype=torch.long).unsqueeze(-1)
    logp_o = logp.gather(-1, index).squeeze(-1)
    if truncated is False:
        return logp_o
    kept = _torch_kept(scaled.detach(), knobs, order)
    kept_o = kept.gather(-1, index).squeeze(-1)
    # the kept mass p(S) (differentiable; the kept set itself is piecewise constant)
    frac = (logp.exp() * kept).sum(-1).clamp(min=1e-38, max=1.0)
    log_q = _smoothed_torch(logp_o, kept_o, frac, eps)
    if isinstance(truncated, torch.Tensor):
        return torch.where(truncated, log_q, logp_o)
    return log_q


def _torch_truncated_probs(
    logits: torch.Tensor, setting: Setting | SettingRows, order: str
) -> torch.Tensor:
    import torch

    scaled, knobs, truncated = _torch_setup(logits, setting)
    probs = torch.softmax(scaled, dim=-1)
    if truncated is False:
        return probs
    kept = _torch_kept(scaled, knobs, order)
    out = probs * kept
    out = out / out.sum(-1, keepdim=True)
    if isinstance(truncated, torch.Tensor):
        return torch.where(truncated.unsqueeze(-1), out, probs)
    return out
