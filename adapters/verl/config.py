"""The ``metactl`` config group of a verl run, parsed and validated into a :class:`MetaPolicy`.

Pure Python + numpy (no verl import), so a bad group fails fast in the driver, before Ray
starts anything. The group, as a Hydra override or in a YAML file::

    metactl:
      rule: TAMPO              # a metactl.RULES name (TAMPO, Hedge, PTGS, ContextualTAMPO, ...)
      rule_kwargs: {alpha: 0.05}
      candidates: [0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
      selector: Nucleus        # a metactl.SELECTORS name, or null for the rule's default
      selector_kwargs: {top_p: 0.7}
      seed: 0
      context_key: null        # per-prompt rules: the dataset field holding a stable prompt id

Example:
    >>> policy = policy_from_config({"rule": "Hedge", "candidates": [0.7, 1.0], "seed": 3})
    >>> policy.rule.name, policy.candidates.tolist()
    ('Hedge', [0.7, 1.0])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import metactl
from metactl.factories import ptgs_candidates
from metactl.policy import PAPER_TEMPERATURES
from metactl.rules import RULES
from metactl.selectors import SELECTORS

__all__ = [
    "AGENT_LOOP_NAME",
    "META_STATE_NAME",
    "SAMPLED_TEMPERATURE_KEY",
    "TEMPERATURE_FIELD",
    "TESTED_VERL",
    "TRAINER_NAME",
    "MetaSettings",
    "policy_from_config",
    "settings_from_config",
]

#: verl releases the trainer and agent loop are tested against (private hooks move between them).
TESTED_VERL = ">=0.9.1,<0.10"
#: ``trainer.v1.trainer_mode`` of :class:`metactl.adapters.verl.trainer.MetaPPOTrainer`.
TRAINER_NAME = "metactl"
#: ``actor_rollout_ref.rollout.agent.default_agent_loop`` of the metactl agent loop.
AGENT_LOOP_NAME = "metactl_single_turn"
#: Per-prompt field carrying the chosen temperature from the driver to the agent loop (verl
#: stores every per-prompt field with each trajectory in its TransferQueue).
TEMPERATURE_FIELD = "metactl_temperature"
#: Key in each trajectory's ``extra_fields`` recording the temperature it was sampled at.
SAMPLED_TEMPERATURE_KEY = "metactl_sampled_temperature"
#: File written into every verl checkpoint folder (``global_step_<n>/``).
META_STATE_NAME = "metactl_state.json"

_KEYS = {"rule", "rule_kwargs", "candidates", "selector", "selector_kwargs", "seed", "context_key"}


@dataclass(frozen=True)
class MetaSettings:
    """What the trainer needs besides the policy: ``context_key`` names the per-prompt field
    holding each prompt's stable id (per-prompt rules only; ``None`` for a global rule)."""

    context_key: str | None


def _plain(group: Any) -> dict[str, Any]:
    """The group as a plain dict (an OmegaConf ``DictConfig`` is resolved first)."""
    if group is None:
        return {}
    if hasattr(group, "_metadata"):  # an OmegaConf node; imported only when one is passed
        from omegaconf import OmegaConf

        group = OmegaConf.to_container(group, resolve=True)
    if not isinstance(group, Mapping):
        raise TypeError(f"the metactl config group must be a mapping, got {type(group).__name__}")
    unknown = sorted(set(map(str, group)) - _KEYS)
    if unknown:
        raise ValueError(
            f"unknown keys in the metactl config group: {unknown}; known: {sorted(_KEYS)}"
        )
    return dict(group)


def _kwargs(group: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = group.get(name) or {}
    if not isinstance(value, Mapping):
        raise TypeError(f"metactl.{name} must be a mapping, got {type(value).__name__}")
    return {str(k): v for k, v in value.items()}


def policy_from_config(group: Any) -> metactl.MetaPolicy:
    """Build the temperature meta-policy the ``metactl`` config group describes (defaults: TAMPO
    with the paper's candidates and selector, seed 0). Every error names the key."""
    group = _plain(group)
    rule_name = group.get("rule", "TAMPO")
    if rule_name not in RULES:
        raise ValueError(f"metactl.rule must be one of {sorted(RULES)}, got {rule_name!r}")
    try:
        rule = RULES[rule_name](**_kwargs(group, "rule_kwargs"))
    except TypeError as error:
        raise TypeError(f"metactl.rule_kwargs do not fit {rule_name}: {error}") from error
    candidates = group.get("candidates")
    if candidates is None:
        if isinstance(rule, metactl.PTGS):
            candidates = ptgs_candidates(rule.tau, rule.t_ref)
        else:
            candidates = PAPER_TEMPERATURES
    elif isinstance(candidates, (str, bytes)) or not hasattr(candidates, "__len__"):
        raise TypeError(f"metactl.candidates must be a list of temperatures, got {candidates!r}")
    selector_name = group.get("selector")
    selector = None
    if selector_name is not None:
        if selector_name not in SELECTORS:
            raise ValueError(
                f"metactl.selector must be one of {sorted(SELECTORS)} or null, got "
                f"{selector_name!r}"
            )
        try:
            selector = SELECTORS[selector_name](**_kwargs(group, "selector_kwargs"))
        except TypeError as error:
            raise TypeError(
                f"metactl.selector_kwargs do not fit {selector_name}: {error}"
            ) from error
    elif group.get("selector_kwargs"):
        raise ValueError("metactl.selector_kwargs is set but metactl.selector is null")
    seed = group.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"metactl.seed must be an int, got {type(seed).__name__}")
    return metactl.MetaPolicy(list(candidates), rule, selector, seed)


def settings_from_config(group: Any, policy: metactl.MetaPolicy) -> MetaSettings:
    """Validate ``metactl.context_key`` against the policy: required (a non-empty str) for a
    per-prompt rule, refused for a global one."""
    key = _plain(group).get("context_key")
    if policy.contextual:
        if not isinstance(key, str) or not key:
            raise ValueError(
                f"{policy.rule.name} chooses a temperature per prompt: set metactl.context_key to "
                "the dataset field holding a stable int or str id per prompt (verl's 'index' "
                "comes from extra_info.index and is 0 for rows without one)"
            )
        if getattr(policy.rule, "feature_dim", 0):
            raise ValueError("the verl trainer passes no context features: use feature_dim=0")
    elif key is not None:
        raise ValueError(
            f"metactl.context_key is only used by per-prompt rules, not {policy.rule.name}"
        )
    return MetaSettings(context_key=key)
