"""``metactl_state.json``: the meta-policy state saved into, validated and loaded from every TRL
checkpoint of ``MetaGRPOTrainer``.

The file holds the policy state, the sampler setting of the buffered window (so a resume samples
where the run left off) and the trainer's ``meta_history``. On a resume it is read and validated
before TRL loads the model, optimizer or anything else; a missing or corrupt file is an error
naming it, and a rejected state changes nothing.

Example:
    >>> import metactl
    >>> policy = metactl.MetaPolicy([0.8, 0.9, 1.0], metactl.TAMPO(), hyperparameter="top_p")
    >>> state = meta_state_dict(policy, {"top_p": 0.9}, history=[], eval_temperature=1.0,
    ...                         likelihood="fast")
    >>> check_meta_state(state, policy).setting
    {'top_p': 0.9}
    >>> check_meta_state({**state, "train_setting": {"top_p": 0.85}}, policy)
    Traceback (most recent call last):
    ...
    ValueError: train_setting {'top_p': 0.85} is not a setting the policy can choose: ...
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import metactl
from metactl.knobs import KnobValue, check_knob

from ..integrity import atomic_write

__all__ = [
    "META_STATE_NAME",
    "MetaState",
    "check_meta_state",
    "check_setting",
    "meta_state_dict",
    "read_meta_state",
    "write_meta_state",
]

# the trainer's logger (not this module's): users and tests filter on it
logger = logging.getLogger("metactl.adapters.trl.trainer")

#: File written into every TRL checkpoint directory.
META_STATE_NAME = "metactl_state.json"
_STATE_FORMAT = 1


@dataclass(frozen=True)
class MetaState:
    """A validated ``metactl_state.json``.

    Attributes:
        policy: the policy's ``state_dict()`` (checked by a load on a copy of the policy).
        setting: the sampler setting of the saved window (``None``: none, or per-row values).
        history: the trainer's ``meta_history`` entries, oldest first.
    """

    policy: dict[str, Any]
    setting: dict[str, KnobValue] | None
    history: list[dict[str, Any]]


def meta_state_dict(
    policy: metactl.MetaPolicy,
    setting: Mapping[str, KnobValue] | None,
    *,
    history: Sequence[Mapping[str, Any]],
    eval_temperature: float,
    likelihood: str,
) -> dict[str, Any]:
    """What ``metactl_state.json`` holds: the policy state, the sampler setting of the window
    (``train_setting``, ``{knob: value}``; ``train_temperature`` repeats its temperature for a
    temperature policy), the history, and the evaluation temperature and likelihood path."""
    temperature_only = tuple(policy.knobs) == ("temperature",)
    return {
        "format": _STATE_FORMAT,
        "policy": policy.state_dict(),
        "train_temperature": (
            setting["temperature"] if setting is not None and temperature_only else None
        ),
        "train_setting": None if setting is None else dict(setting),
        "history": [dict(entry) for entry in history],
        "eval_temperature": eval_temperature,
        "likelihood": likelihood,
    }


def check_setting(policy: metactl.MetaPolicy, setting: Any, name: str) -> dict[str, KnobValue]:
    """A saved sampler setting, checked to be one the policy can have chosen: exactly its knobs,
    each a valid value inside the candidates' range, and one of the candidates' settings unless
    the rule produces values between them (schedules, entropy controllers, PTGS).

    Raises:
        TypeError: not a mapping of numbers.
        ValueError: other knobs, a value out of range or off the grid (names ``name``).
    """
    if not isinstance(setting, dict):
        raise TypeError(f"{name} must be an object or null, got {type(setting).__name__}")
    knobs = tuple(policy.knobs)
    if set(setting) != set(knobs):
        raise ValueError(f"{name} sets {sorted(setting)}, the policy sets {list(knobs)}")
    candidates = [policy.setting(k) for k in range(policy.num_candidates)]
    for knob in knobs:
        value = setting[knob]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}[{knob!r}] must be a number, got {type(value).__name__}")
        values = [float(c[knob]) for c in candidates]
        low, high = min(values), max(values)
        if not (math.isfinite(value) and low <= value <= high):
            raise ValueError(
                f"{name}[{knob!r}] must be a finite {knob} inside the candidate range "
                f"[{low}, {high}], got {value!r}"
            )
    continuous = policy.rule.candidate_use == "continuous"
    if not continuous and not any(
        all(float(setting[knob]) == float(c[knob]) for knob in knobs) for c in candidates
    ):
        raise ValueError(
            f"{name} {setting!r} is not a setting the policy can choose: {policy.rule.name} "
            f"samples only at its candidates {candidates}"
        )
    checked: dict[str, KnobValue] = {}
    for knob in knobs:
        value = setting[knob]
        if knob == "top_k" and isinstance(value, float) and value == int(value):
            value = int(value)  # JSON may spell an integer as a float
        checked[knob] = check_knob(knob, value, f"{name}[{knob!r}]")
    return checked


def _check_history(history: Any) -> list[dict[str, Any]]:
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise TypeError("history must be a list of objects (the meta_history entries)")
    return [dict(h) for h in history]


def check_meta_state(state: Any, policy: metactl.MetaPolicy) -> MetaState:
    """Validate a :func:`meta_state_dict` for ``policy`` without applying anything.

    Raises:
        TypeError / ValueError: naming the entry that is wrong.
    """
    if not isinstance(state, dict):
        raise TypeError(f"a {META_STATE_NAME} holds a JSON object, got {type(state).__name__}")
    if state.get("format") != _STATE_FORMAT or isinstance(state.get("format"), bool):
        raise ValueError(
            f"format is {state.get('format')!r}; this metactl reads format {_STATE_FORMAT}"
        )
    if "policy" not in state:
        raise ValueError("the 'policy' entry is missing")
    temperature = state.get("train_temperature")
    setting: dict[str, KnobValue] | None = None
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(
                f"train_temperature must be a number or null, got {type(temperature).__name__}"
            )
        if tuple(policy.knobs) != ("temperature",):
            raise ValueError(
                f"train_temperature is {temperature!r}, but the policy sets "
                f"{list(policy.knobs)} (its setting is train_setting)"
            )
        setting = check_setting(policy, {"temperature": temperature}, "train_temperature")
    saved = state.get("train_setting")
    if saved is not None:
        checked = check_setting(policy, saved, "train_setting")
        if setting is not None and checked != setting:
            raise ValueError(
                f"train_setting {saved!r} disagrees with train_temperature {temperature!r}"
            )
        setting = checked
    history = _check_history(state.get("history", []))
    # the policy's own load validates everything before assigning; run it on a copy so that
    # nothing is applied until the rest has passed as well
    copy.deepcopy(policy).load_state_dict(state["policy"])
    return MetaState(policy=state["policy"], setting=setting, history=history)


def read_meta_state(
    checkpoint: str, policy: metactl.MetaPolicy, *, allow_missing: bool
) -> MetaState | None:
    """Read and validate ``<checkpoint>/metactl_state.json``.

    Returns ``None`` when the file is missing and ``allow_missing`` (a warning is logged).

    Raises:
        FileNotFoundError: the file is missing and not ``allow_missing``.
        ValueError: any corruption, naming the file (nothing is applied).
    """
    path = os.path.join(checkpoint, META_STATE_NAME)
    if not os.path.exists(path):
        if allow_missing:
            logger.warning(
                "metactl: %s has no %s; the meta-policy keeps its current state "
                "(allow_missing_meta_state=True)",
                checkpoint,
                META_STATE_NAME,
            )
            return None
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint has no meta-policy state, so resuming would "
            "restart the meta-policy while the model resumes. Resume from a checkpoint "
            "written by MetaGRPOTrainer, or pass allow_missing_meta_state=True to continue "
            "with the meta-policy's current state"
        )
    try:
        with open(path, "rb") as f:
            state = json.loads(f.read().decode("utf-8"))
        return check_meta_state(state, policy)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError) as exc:
        raise ValueError(
            f"{path} is corrupt or not a {META_STATE_NAME} of this run ({exc}); nothing "
            "was loaded. Resume from another checkpoint (or restore this file)"
        ) from exc


def write_meta_state(folder: str, state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``<folder>/metactl_state.json`` atomically (a unique temporary file in
    the same folder, flushed to disk, renamed into place, then the folder flushed: see
    :func:`metactl.adapters.integrity.atomic_write`)."""
    data = json.dumps(state, allow_nan=False).encode("utf-8")
    atomic_write(os.path.join(folder, META_STATE_NAME), lambda f: f.write(data))
