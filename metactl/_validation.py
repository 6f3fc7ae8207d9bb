"""Input checks shared by the public functions: every failure names the offending argument.

Nothing here clips, drops or coerces silently: a value is either accepted as it is (after a
lossless conversion to a float64 numpy array) or rejected with a ``ValueError``/``TypeError``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .knobs import (
    HYPERPARAMETERS,
    KNOB_PLURALS,
    MAX_CANDIDATES,
    KnobGrid,
    check_knob,
    knob_values,
)


def to_numpy(x: Any, name: str) -> np.ndarray:
    """Convert an array-like (numpy, list, or a torch tensor on any device) to a numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) in {"torch.bfloat16", "torch.float16"}:
            x = x.float()
        x = x.numpy()
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} must be an array of numbers, got {type(x).__name__}")
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} must be an array of numbers: {exc}") from exc
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise TypeError(f"{name} must be an array of numbers, got dtype {arr.dtype}")
    return arr


def finite_array(x: Any, name: str, ndim: int | None = None) -> np.ndarray:
    """A float64 array with every entry finite and (optionally) the given number of dimensions."""
    arr = to_numpy(x, name)
    if np.issubdtype(arr.dtype, np.bool_):
        raise TypeError(f"{name} must hold numbers, not booleans")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"{name} must be real, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=True)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s)")
    return arr


def finite_scalar(x: Any, name: str) -> float:
    """A finite real number (bools and arrays of size != 1 are rejected)."""
    if isinstance(x, bool) or isinstance(x, np.bool_):
        raise TypeError(f"{name} must be a real number, got bool")
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = to_numpy(x, name)
    if isinstance(x, np.ndarray):
        if x.size != 1:
            raise ValueError(f"{name} must be a scalar, got shape {x.shape}")
        x = x.reshape(()).item()
    if not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    try:
        value = float(x)
    except OverflowError as exc:  # an int (or Fraction) beyond the float64 range
        raise ValueError(f"{name} must be finite, got a number beyond the float64 range") from exc
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def positive_scalar(x: Any, name: str, *, allow_zero: bool = False) -> float:
    value = finite_scalar(x, name)
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def unit_interval(x: Any, name: str, *, low_open: bool = False, high_open: bool = False) -> float:
    value = finite_scalar(x, name)
    low_bad = value <= 0 if low_open else value < 0
    high_bad = value >= 1 if high_open else value > 1
    if low_bad or high_bad:
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


def integer(
    x: Any, name: str, *, minimum: int | None = None, below: int | None = None
) -> int:
    """An integer (bools rejected), optionally ``>= minimum`` and ``< below``."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(x).__name__}")
    value = int(x)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if below is not None and value >= below:
        raise ValueError(f"{name} must be < {below}, got {value}")
    return value


_PCG64_KEYS = {"bit_generator", "state", "has_uint32", "uinteger"}


def pcg64_state(x: Any, name: str) -> dict[str, Any]:
    """A ``numpy.random.PCG64`` state dict, checked field by field; returns a plain copy.

    ``state`` and ``inc`` are the 128-bit LCG state and increment (ints in ``[0, 2**128)``;
    the increment is odd, as PCG64 requires and every seeding produces), ``has_uint32`` is 0/1
    and ``uinteger`` the buffered 32-bit half in ``[0, 2**32)``. Checking here means a
    tampered value raises ``ValueError``/``TypeError`` naming the field, never numpy's
    ``OverflowError``.
    """
    if not isinstance(x, dict):
        raise TypeError(f"{name} must be a dict (a PCG64 state), got {type(x).__name__}")
    if set(x) != _PCG64_KEYS:
        raise ValueError(f"{name} must have keys {sorted(_PCG64_KEYS)}, got {sorted(map(str, x))}")
    if x["bit_generator"] != "PCG64":
        raise ValueError(f"{name}['bit_generator'] must be 'PCG64', got {x['bit_generator']!r}")
    inner = x["state"]
    if not isinstance(inner, dict) or set(inner) != {"state", "inc"}:
        got = sorted(map(str, inner)) if isinstance(inner, dict) else type(inner).__name__
        raise ValueError(f"{name}['state'] must be a dict with keys ['inc', 'state'], got {got}")
    lcg_state = integer(inner["state"], f"{name}['state']['state']", minimum=0, below=1 << 128)
    inc = integer(inner["inc"], f"{name}['state']['inc']", minimum=0, below=1 << 128)
    if inc % 2 == 0:
        raise ValueError(f"{name}['state']['inc'] must be odd (a PCG64 increment), got {inc}")
    has_uint32 = integer(x["has_uint32"], f"{name}['has_uint32']", minimum=0, below=2)
    uinteger = integer(x["uinteger"], f"{name}['uinteger']", minimum=0, below=1 << 32)
    return {
        "bit_generator": "PCG64",
        "state": {"state": lcg_state, "inc": inc},
        "has_uint32": has_uint32,
        "uinteger": uinteger,
    }


def one_of(x: Any, name: str, allowed: Sequence[str]) -> str:
    if not isinstance(x, str):
        raise TypeError(f"{name} must be a string, one of {list(allowed)}, got {type(x).__name__}")
    if x not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {x!r}")
    return x


def is_joint_like(candidates: Any) -> bool:
    """Whether ``candidates`` is a joint grid: a :class:`~metactl.knobs.KnobGrid` or a non-empty
    list/tuple whose first entry is a mapping (``{"temperature": 0.8, "top_p": 0.9}``)."""
    if isinstance(candidates, KnobGrid):
        return True
    return (
        isinstance(candidates, (list, tuple))
        and len(candidates) > 0
        and isinstance(candidates[0], Mapping)
    )


def candidate_values(
    candidates: Any, hyperparameter: str = "temperature", name: str = "candidates"
) -> np.ndarray:
    """Validate the candidates of one knob (or ``"generic"`` numbers): 1-D, K >= 2, finite,
    unique, every value in the knob's range (:func:`metactl.knobs.check_knob`: temperature
    ``> 0``, top_p in ``(0, 1]``, top_k an integer ``>= 1``, min_p in ``[0, 1)``).

    Returns a float64 array, order kept (it is the index order of probabilities and
    decisions); ``top_k`` values must be integers (a float such as ``50.0`` is refused, as by
    ``check_knob``) and come back as exact float64 integers. A joint grid (a ``KnobGrid`` or a
    list of knob mappings) is refused: it has no single value per candidate.
    """
    one_of(hyperparameter, "hyperparameter", HYPERPARAMETERS)
    if hyperparameter == "joint":
        raise ValueError(
            f"{name}: joint candidates are a KnobGrid, not an array of values; use "
            "metactl.knobs.joint_candidates"
        )
    if is_joint_like(candidates):
        knobs = (
            list(candidates.knobs)
            if isinstance(candidates, KnobGrid)
            else sorted(map(str, candidates[0]))
        )
        needs = (
            "one number per candidate"
            if hyperparameter == "generic"
            else f"the values of one knob (hyperparameter={hyperparameter!r})"
        )
        raise ValueError(
            f"{name} is a joint grid over {knobs} (knob mappings), but this needs {needs}; "
            "build a joint policy with hyperparameter='joint', or pass one knob's values "
            "(grid.column(knob)) or the candidate indices (numpy.arange(K))"
        )
    if hyperparameter == "top_k":
        # the raw values, so that a bool or a float among the ints is refused as such
        ints = knob_values("top_k", candidates, name, minimum=2)
        if ints.shape[0] > MAX_CANDIDATES:
            raise ValueError(f"{name} holds {ints.shape[0]} values, more than {MAX_CANDIDATES}")
        return ints.astype(np.float64)
    arr = finite_array(candidates, name, ndim=1)
    if arr.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 values (K >= 2), got {arr.shape[0]}")
    if arr.shape[0] > MAX_CANDIDATES:
        raise ValueError(f"{name} holds {arr.shape[0]} values, more than {MAX_CANDIDATES}")
    if np.unique(arr).shape[0] != arr.shape[0]:
        values, counts = np.unique(arr, return_counts=True)
        raise ValueError(f"{name} has duplicate values: {values[counts > 1].tolist()}")
    if hyperparameter != "generic":
        for i, value in enumerate(arr.tolist()):
            try:
                check_knob(hyperparameter, value, f"{name}[{i}]")
            except ValueError as exc:
                raise ValueError(
                    f"{name}: {KNOB_PLURALS[hyperparameter]} out of range ({exc}); got "
                    f"{arr.tolist()}"
                ) from exc
    return arr
