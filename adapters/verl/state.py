"""The meta state of a verl checkpoint (:data:`META_STATE_NAME` in every ``global_step_<n>/``):
the policy's JSON state and the trainer's recent ``meta_history``, written atomically and
durably, read back with every field validated.

Pure Python (no verl import), so the format is checked where verl is not installed.

Example:
    >>> import metactl, os, tempfile
    >>> policy = metactl.tampo(seed=0)
    >>> history = [{"global_step": 1, "policy_step": 1, "temperatures": [0.7, 0.7],
    ...             "probs": [1 / 10] * 10}]
    >>> path = os.path.join(tempfile.mkdtemp(), "metactl_state.json")
    >>> write_meta_state(path, meta_state(policy, history))
    >>> restored, entries = read_meta_state(path, policy)
    >>> restored.step, entries == history
    (0, True)
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import metactl

from ..integrity import atomic_write
from .config import META_HISTORY_LIMIT

__all__ = ["STATE_FORMAT", "meta_state", "read_meta_state", "write_meta_state"]

#: The format version written; version 1 (the policy only, no history) is still read.
STATE_FORMAT = 2
_READABLE_FORMATS = (1, 2)
_HISTORY_KEYS = ("global_step", "policy_step", "temperatures", "probs")


def meta_state(policy: metactl.MetaPolicy, history: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The JSON-safe meta state: the policy's state and the last :data:`META_HISTORY_LIMIT`
    entries of ``history``."""
    entries = [dict(entry) for entry in history][-META_HISTORY_LIMIT:]
    return {"format": STATE_FORMAT, "policy": policy.state_dict(), "history": entries}


def write_meta_state(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Write ``state`` as JSON to ``path`` atomically and durably (the library's
    ``atomic_write``: a temporary file in the same folder, flushed and ``fsync``-ed, renamed
    over ``path``, then the folder ``fsync``-ed, so the rename survives a crash). On any error
    the temporary file is removed and ``path`` is untouched."""
    data = json.dumps(state, allow_nan=False).encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def _numbers(value: Any, name: str, length: int | None = None) -> list[float]:
    if not isinstance(value, list):
        raise ValueError(f"{name} must be a list of numbers, got {type(value).__name__}")
    out = []
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise ValueError(f"{name}[{i}] must be a finite number, got {x!r}")
        out.append(float(x))
    if length is not None and len(out) != length:
        raise ValueError(f"{name} must hold {length} values, got {len(out)}")
    return out


def _history(value: Any, num_candidates: int) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ValueError(f"history must be a list, got {type(value).__name__}")
    if len(value) > META_HISTORY_LIMIT:
        raise ValueError(
            f"history holds {len(value)} entries, more than the {META_HISTORY_LIMIT} kept"
        )
    entries = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or sorted(entry) != sorted(_HISTORY_KEYS):
            raise ValueError(f"history[{i}] must be an object with keys {list(_HISTORY_KEYS)}")
        entries.append(
            {
                "global_step": _integer(entry["global_step"], f"history[{i}].global_step"),
                "policy_step": _integer(entry["policy_step"], f"history[{i}].policy_step"),
                "temperatures": _numbers(entry["temperatures"], f"history[{i}].temperatures"),
                "probs": _numbers(entry["probs"], f"history[{i}].probs", num_candidates),
            }
        )
    return entries


def read_meta_state(
    path: str | os.PathLike[str], policy: metactl.MetaPolicy
) -> tuple[metactl.MetaPolicy, list[dict[str, Any]]]:
    """Read and validate a meta state written by :func:`write_meta_state`: a copy of
    ``policy`` with the saved state loaded, and the saved history. ``policy`` itself is never
    changed.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: anything else wrong with the file (it names the file and the field): not
            JSON, a ``format`` that is not one of the int versions read (a bool is no
            version), a policy state the policy refuses, a malformed history.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: resuming would restart the meta-policy while the model resumes"
        )
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        if not isinstance(state, dict):
            raise ValueError(f"the file must hold a JSON object, got {type(state).__name__}")
        version = state.get("format")
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(
                f"format must be an int version, one of {list(_READABLE_FORMATS)}, got "
                f"{version!r}"
            )
        if version not in _READABLE_FORMATS:
            raise ValueError(f"format must be one of {list(_READABLE_FORMATS)}, got {version}")
        expected = {"format", "policy"} | ({"history"} if version >= 2 else set())
        if set(state) != expected:
            raise ValueError(f"a format-{version} state has the keys {sorted(expected)}, got "
                             f"{sorted(state)}")  # fmt: skip
        history = _history(state["history"], policy.num_candidates) if version >= 2 else []
        trial = copy.deepcopy(policy)
        trial.load_state_dict(state["policy"])
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{path} is not a valid metactl state: {error}") from error
    return trial, history
