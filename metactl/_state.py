"""Validation and JSON conversion of ``MetaPolicy.state_dict()``: the schema, the top-level
keys, the configuration match and the rule state (the RNG state is checked by
``_validation.pcg64_state``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from . import _validation as check
from .rules.base import Rule, RuleState

SCHEMA_VERSION = 1
# Steps (and the counts that sum to them) stay below 2**53, where float64 counts are exact.
MAX_STEP = 2**53
STATE_KEYS = {
    "schema_version",
    "hyperparameter",
    "candidates",
    "rule",
    "selector",
    "seed",
    "step",
    "rule_state",
    "rng",
}


def state_to_json(state: RuleState) -> dict[str, Any]:
    return {
        key: value.tolist() if isinstance(value, np.ndarray) else value
        for key, value in state.items()
    }


def state_from_json(data: Any, template: RuleState) -> RuleState:
    """Convert ``state_dict['rule_state']`` to the rule's types: the template's keys, float64
    arrays of the template's shapes and finite floats, every entry finite."""
    if not isinstance(data, dict) or set(data) != set(template):
        got = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"state_dict['rule_state'] must have keys {sorted(template)}, got {got}")
    out: RuleState = {}
    for key, like in template.items():
        name = f"state_dict['rule_state'][{key!r}]"
        if isinstance(like, np.ndarray):
            value = check.finite_array(data[key], name, ndim=1)
            if value.shape != like.shape:
                raise ValueError(f"{name} must have shape {like.shape}, got {value.shape}")
            out[key] = value
        else:
            out[key] = check.finite_scalar(data[key], name)
    return out


def json_equal(value: Any, mine: Any, name: str) -> bool:
    try:
        return bool(json.loads(json.dumps(value)) == json.loads(json.dumps(mine)))
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"{name} is not JSON data: {exc}") from exc


def check_state_header(state: Any, mine: dict[str, Any], contextual: bool) -> None:
    """Check a ``state_dict`` before its fields are read: a dict of this schema version with
    exactly the expected keys (``"contexts"`` too for a contextual rule) whose configuration
    (hyperparameter, candidates, rule, selector) equals ``mine``, the loading policy's."""
    if not isinstance(state, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state).__name__}")
    version = state.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int) or version != SCHEMA_VERSION:
        raise ValueError(
            f"state_dict['schema_version'] is {state.get('schema_version')!r}; "
            f"this metactl reads schema {SCHEMA_VERSION}"
        )
    expected = STATE_KEYS | {"contexts"} if contextual else STATE_KEYS
    if set(state) != expected:
        raise ValueError(
            f"state_dict has keys {sorted(map(str, state))}; expected exactly {sorted(expected)}"
        )
    for key in ("hyperparameter", "candidates", "rule", "selector"):
        if not json_equal(state[key], mine[key], f"state_dict[{key!r}]"):
            raise ValueError(
                f"state_dict[{key!r}] = {state[key]!r} does not match this policy's "
                f"{mine[key]!r}; build the policy with the same configuration "
                "(or use MetaPolicy.from_state_dict)"
            )


@contextmanager
def float64_guard(rule_name: str) -> Iterator[None]:
    """Run an update with floating-point overflow or an invalid operation anywhere (feedback
    near the float64 limit) raising ``ValueError`` instead of leaving inf/NaN in the state."""
    try:
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            yield
    except FloatingPointError as exc:
        raise ValueError(
            f"{rule_name} update overflows float64 ({exc}); the feedback is too large "
            "in magnitude (rescale it); the policy is unchanged"
        ) from exc


def check_new_state(
    rule: Rule,
    new_state: RuleState,
    signal: np.ndarray | None,
    candidates: np.ndarray,
    step: int,
    *,
    new_rows: dict[str, np.ndarray] | None = None,
    check_rows: Callable[[], None] | None = None,
) -> np.ndarray:
    """Check an update's result like a loaded state before it is assigned: a finite signal,
    finite ``rule_state`` (and ``contexts`` rows, when given) entries, the rule's invariants at
    ``step`` (the step after the update) and ``check_rows`` (the contextual rows' invariants).
    Returns the global probabilities of the new state (``Rule.validate_state``'s)."""
    if signal is not None and not np.all(np.isfinite(signal)):
        raise ValueError(f"{rule.name} update gave a non-finite signal; policy unchanged")
    parts = [("rule_state", new_state)]
    if new_rows is not None:
        parts.append(("contexts", new_rows))
    for label, part in parts:
        for key, value in part.items():
            if not np.all(np.isfinite(value)):
                raise ValueError(
                    f"{rule.name} update would leave a non-finite {label}[{key!r}] "
                    "(feedback too large in magnitude); the policy is unchanged"
                )
    try:
        probs = rule.validate_state(new_state, candidates, step)
        if check_rows is not None:
            check_rows()
    except ValueError as exc:
        raise ValueError(
            f"{rule.name} update would leave an invalid state ({exc}); the policy is unchanged"
        ) from exc
    return probs
