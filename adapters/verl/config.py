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
      temperature_check: error # error | warn | off: the sampled tokens' temperature, every step
      temperature_check_kwargs: {z_threshold: 5.0, min_effect: 0.1}
      candidate_likelihood: fused  # fused | passes: where the candidates' likelihoods come from

Example:
    >>> policy = policy_from_config({"rule": "Hedge", "candidates": [0.7, 1.0], "seed": 3})
    >>> policy.rule.name, policy.candidates.tolist()
    ('Hedge', [0.7, 1.0])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import metactl
from metactl import PAPER_TEMPERATURES, ptgs_candidates
from metactl.effective_temperature import (
    CHECK_MODES,
    TemperatureScore,
    check_temperature_score,
)
from metactl.feedback import TrainerSupport, check_trainer
from metactl.rules import RULES
from metactl.selectors import SELECTORS

__all__ = [
    "AGENT_LOOP_NAME",
    "CANDIDATE_LIKELIHOOD_MODES",
    "META_HISTORY_LIMIT",
    "META_STATE_NAME",
    "SAMPLED_TEMPERATURE_KEY",
    "TEMPERATURE_FIELD",
    "TESTED_VERL",
    "TRAINER_NAME",
    "TRAINER_SUPPORT",
    "MetaSettings",
    "check_candidate_likelihood",
    "check_rollout",
    "check_temperature_check",
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
#: The most entries ``MetaPPOTrainer.meta_history`` keeps (one per training step, the oldest
#: dropped first); saved with the meta state and restored on resume.
META_HISTORY_LIMIT = 1000

#: Where ``MetaPPOTrainer`` gets the candidates' likelihoods (``metactl.candidate_likelihood``):
#: ``"fused"`` (default) scores them from the logits of verl's old-log-prob pass, in the
#: workers (:mod:`metactl.adapters.verl.engine_hook`); ``"passes"`` runs one extra no-grad
#: log-prob pass per candidate temperature.
CANDIDATE_LIKELIHOOD_MODES = ("fused", "passes")
#: ``actor_rollout_ref.actor.strategy`` values whose engine the fused scoring hooks into.
_FUSED_STRATEGIES = ("fsdp", "fsdp2")

#: What ``MetaPPOTrainer`` can give a rule (checked by :func:`metactl.check_trainer`): every
#: feedback name (``rewards`` per trajectory, ``group_size`` = ``rollout.n``, ``loglik``
#: summed or length-normalised, from the old-log-prob pass's logits or one log-prob pass per
#: candidate temperature), the temperature only, one value per prompt, no context features.
TRAINER_SUPPORT = TrainerSupport(
    "MetaPPOTrainer",
    feedback=("loglik", "advantages", "reward", "entropy", "vocab_size", "rewards", "group_size"),
    knobs=("temperature",),
    per_context=True,
    features=False,
    loglik=("mean", "sum"),
)

_KEYS = {
    "rule",
    "rule_kwargs",
    "candidates",
    "selector",
    "selector_kwargs",
    "seed",
    "context_key",
    "temperature_check",
    "temperature_check_kwargs",
    "candidate_likelihood",
}


@dataclass(frozen=True)
class MetaSettings:
    """What the trainer needs besides the policy.

    Attributes:
        context_key: the per-prompt field holding each prompt's stable id (per-prompt rules
            only; ``None`` for a global rule).
        temperature_check: what a step whose sampled tokens look drawn at another temperature
            than the chosen one does (:data:`metactl.effective_temperature.CHECK_MODES`):
            ``"error"`` (the default) stops training, ``"warn"`` warns, ``"off"`` skips the check.
        temperature_check_kwargs: thresholds passed to
            :func:`metactl.effective_temperature.check_temperature_score` (``z_threshold``,
            ``min_effect``); empty for its calibrated defaults.
        candidate_likelihood: where a likelihood rule's candidate log-likelihoods come from
            (:data:`CANDIDATE_LIKELIHOOD_MODES`): ``"fused"`` (the default) from the logits
            of verl's old-log-prob pass, ``"passes"`` from one extra log-prob pass per
            candidate. Both give the same sums up to float32 rounding; the fused path saves
            ``K`` forward passes a step.
    """

    context_key: str | None
    temperature_check: str = "error"
    temperature_check_kwargs: Mapping[str, float] = field(default_factory=dict)
    candidate_likelihood: str = "fused"


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
    """``metactl.<name>``: a mapping of keyword arguments; absent or null is ``{}`` (an empty
    list, ``0`` or ``""`` is a mistake, not "no arguments")."""
    value = group.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(
            f"metactl.{name} must be a mapping of keyword arguments (or null), got "
            f"{type(value).__name__} {value!r}"
        )
    return {str(k): v for k, v in value.items()}


def _name(group: Mapping[str, Any], key: str, registry: Mapping[str, Any], default: Any) -> Any:
    """``metactl.<key>``: one name of ``registry`` (a str); ``default`` when absent, and null
    only where ``default`` is null."""
    name = group.get(key, default)
    allowed = f"one of {sorted(registry)}" + (" or null" if default is None else "")
    if name is None and default is None:
        return None
    if not isinstance(name, str):
        raise TypeError(
            f"metactl.{key} must be one name (a str), {allowed}, got {type(name).__name__} {name!r}"
        )
    if name not in registry:
        raise ValueError(f"metactl.{key} must be {allowed}, got {name!r}")
    return name


def _candidates(value: Any) -> list[Any]:
    """``metactl.candidates``: an ordered list of temperatures (a list, tuple or 1-D array);
    a mapping or a set is refused (their order is not the user's)."""
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return value.tolist()
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"metactl.candidates must be a list of temperatures, got {type(value).__name__} "
            f"{value!r}"
        )
    return list(value)


def policy_from_config(group: Any) -> metactl.MetaPolicy:
    """Build the temperature meta-policy the ``metactl`` config group describes (defaults: TAMPO
    with the paper's candidates and selector, seed 0). Every error names the key."""
    group = _plain(group)
    rule_name = _name(group, "rule", RULES, "TAMPO")
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
    else:
        candidates = _candidates(candidates)
    selector_name = _name(group, "selector", SELECTORS, None)
    selector = None
    if selector_name is not None:
        try:
            selector = SELECTORS[selector_name](**_kwargs(group, "selector_kwargs"))
        except TypeError as error:
            raise TypeError(
                f"metactl.selector_kwargs do not fit {selector_name}: {error}"
            ) from error
    elif _kwargs(group, "selector_kwargs"):
        raise ValueError("metactl.selector_kwargs is set but metactl.selector is null")
    seed = group.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"metactl.seed must be an int, got {type(seed).__name__}")
    return metactl.MetaPolicy(list(candidates), rule, selector, seed)


def settings_from_config(group: Any, policy: metactl.MetaPolicy) -> MetaSettings:
    """Check the policy against what the verl trainer gives (:data:`TRAINER_SUPPORT`, through
    :func:`metactl.check_trainer`) and validate ``metactl.context_key``: required (a non-empty
    str) for a per-prompt rule, refused for a global one."""
    check_trainer(policy, TRAINER_SUPPORT)
    key = _plain(group).get("context_key")
    rule = policy.rule.name
    if policy.spec.per_context:
        if not isinstance(key, str) or not key:
            raise ValueError(
                f"{rule} chooses a temperature per prompt: set metactl.context_key to "
                "the dataset field holding a stable int or str id per prompt (verl's 'index' "
                "comes from extra_info.index and is 0 for rows without one)"
            )
    elif key is not None:
        raise ValueError(f"metactl.context_key is only used by per-prompt rules, not {rule}")
    mode, thresholds = _temperature_check(_plain(group))
    likelihood = _plain(group).get("candidate_likelihood", "fused")
    if not isinstance(likelihood, str) or likelihood not in CANDIDATE_LIKELIHOOD_MODES:
        raise ValueError(
            f"metactl.candidate_likelihood must be one of {list(CANDIDATE_LIKELIHOOD_MODES)}, "
            f"got {type(likelihood).__name__} {likelihood!r}"
        )
    return MetaSettings(
        context_key=key,
        temperature_check=mode,
        temperature_check_kwargs=thresholds,
        candidate_likelihood=likelihood,
    )


def _temperature_check(group: Mapping[str, Any]) -> tuple[str, dict[str, float]]:
    """``metactl.temperature_check`` (one of :data:`CHECK_MODES`, default ``"error"``; ``false``
    is ``"off"``) and its ``temperature_check_kwargs``, validated by the check itself."""
    mode = group.get("temperature_check", "error")
    if mode is False:  # YAML 1.1 (OmegaConf's loader) reads an unquoted `off` as false
        mode = "off"
    if not isinstance(mode, str) or mode not in CHECK_MODES:
        raise ValueError(
            f"metactl.temperature_check must be one of {list(CHECK_MODES)}, got "
            f"{type(mode).__name__} {mode!r}"
        )
    kwargs = _kwargs(group, "temperature_check_kwargs")
    if kwargs and mode == "off":
        raise ValueError(
            "metactl.temperature_check_kwargs is set but metactl.temperature_check=off"
        )
    nothing = TemperatureScore(math.nan, 1.0, math.nan, 0.0, 0.0, 0.0, 0)  # passes any threshold
    try:
        check_temperature_score(nothing, mode="off", **kwargs)
    except (TypeError, ValueError) as error:
        raise type(error)(
            f"metactl.temperature_check_kwargs do not fit check_temperature_score: {error}"
        ) from error
    return mode, {k: float(v) for k, v in kwargs.items()}


def _truncation(rollout: Mapping[str, Any]) -> dict[str, Any]:
    """The truncating knobs ``rollout`` samples with (verl's off values: ``top_p=1``,
    ``top_k=-1``; vLLM also reads ``top_k=0`` as off)."""
    active: dict[str, Any] = {}
    top_p = rollout.get("top_p", 1.0)
    if top_p is not None and float(top_p) != 1.0:
        active["top_p"] = top_p
    top_k = rollout.get("top_k", -1)
    if top_k is not None and int(top_k) not in (-1, 0):
        active["top_k"] = top_k
    return active


def check_rollout(policy: metactl.MetaPolicy, rollout: Mapping[str, Any]) -> None:
    """Refuse, at construction, a rollout config (``actor_rollout_ref.rollout``) the trainer
    cannot feed the policy's rule from.

    * A rule that scores candidates by their likelihood (``loglik``) with ``top_p < 1`` or
      ``top_k`` set: verl samples with the truncation, but its log-prob pass (the only place
      the logits are) scores at the temperature alone, so the candidates' likelihoods would
      describe another sampler.
    * A rule that needs ``group_size`` (``rollout.n``, completions per prompt) with
      ``rollout.n < 2`` (a group of one has no spread).

    Raises:
        ValueError: naming the config key and the rule.

    Example:
        >>> check_rollout(metactl.tampo(), {"top_p": 1.0, "top_k": -1, "n": 4})
        >>> check_rollout(metactl.tampo(), {"top_p": 0.9, "top_k": -1, "n": 4})
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: actor_rollout_ref.rollout.top_p=0.9: ...
    """
    spec, rule = policy.spec, policy.rule.name
    truncation = _truncation(rollout)
    if spec.needs_loglik and truncation:
        given = ", ".join(f"actor_rollout_ref.rollout.{k}={v}" for k, v in truncation.items())
        raise ValueError(
            f"{given}: {rule} scores the candidate temperatures by the likelihood of the "
            "sampled tokens, and MetaPPOTrainer scores them with verl's log-prob pass, which "
            f"applies the temperature only, not {' or '.join(truncation)}; set "
            "rollout.top_p=1.0 and rollout.top_k=-1, or use a rule that needs no likelihoods "
            "(EXP3, UCB1, PTGS, EntropyTarget, Uncertainty, ...)"
        )
    if "group_size" in spec.feedback:
        n = rollout.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(
                f"actor_rollout_ref.rollout.n={n!r}: {rule} compares the completions of each "
                "prompt (group_size = rollout.n), so it needs rollout.n >= 2"
            )


def check_temperature_check(
    settings: MetaSettings, rollout: Mapping[str, Any], algorithm: Mapping[str, Any]
) -> None:
    """Refuse, at construction, a run whose sampled temperature the check cannot test:

    * a truncated rollout (``rollout.top_p < 1`` or ``rollout.top_k`` set): the check scores
      the tokens against verl's old-log-prob pass, whose log-probabilities and entropy are those
      of the full distribution at the temperature; a truncated sampler draws from the kept set
      only, which reads as colder;
    * ``algorithm.rollout_correction.bypass_mode``: verl then skips the old-log-prob pass (no
      entropy; the old log-probs are the sampler's own).

    Nothing is refused with ``metactl.temperature_check=off``.

    Raises:
        ValueError: naming the config key and how to turn the check off.

    Example:
        >>> on = MetaSettings(context_key=None)
        >>> check_temperature_check(on, {"top_p": 1.0, "top_k": -1}, {})
        >>> check_temperature_check(on, {"top_p": 0.9}, {})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: actor_rollout_ref.rollout.top_p=0.9: ...
    """
    if settings.temperature_check == "off":
        return
    off = "set +metactl.temperature_check=off to train without the check"
    truncation = _truncation(rollout)
    if truncation:
        given = ", ".join(f"actor_rollout_ref.rollout.{k}={v}" for k, v in truncation.items())
        raise ValueError(
            f"{given}: metactl.temperature_check tests the sampled tokens against the full "
            f"distribution at the chosen temperature (verl's log-prob pass applies no "
            f"{' or '.join(truncation)}), so a truncated rollout would read as too cold; {off}"
        )
    correction = algorithm.get("rollout_correction", None) or {}
    if correction.get("bypass_mode", False):
        raise ValueError(
            "algorithm.rollout_correction.bypass_mode=True skips verl's old-log-prob pass, whose "
            f"log-probabilities and entropy metactl.temperature_check reads; {off}"
        )


def check_candidate_likelihood(
    settings: MetaSettings, policy: metactl.MetaPolicy, config: Mapping[str, Any]
) -> None:
    """Refuse, at construction, ``metactl.candidate_likelihood=fused`` where the old-log-prob
    pass cannot score the candidates (only for rules that read ``loglik``):

    * ``actor_rollout_ref.model.use_fused_kernels=True``: verl's fused kernels return
      log-probabilities without ever materialising the logits;
    * an ``actor_rollout_ref.actor.strategy`` other than ``fsdp`` / ``fsdp2`` (Megatron and the
      other engines have no hook);
    * Ulysses sequence parallelism (``actor.ulysses_sequence_parallel_size > 1``): a rank
      holds a slice of the packed sequence;
    * ``algorithm.rollout_correction.bypass_mode=True``: verl skips the old-log-prob pass.

    ``metactl.candidate_likelihood=passes`` runs anywhere verl's ``compute_log_prob`` does.

    Raises:
        ValueError: naming ``metactl.candidate_likelihood`` and the verl key.
    """
    if settings.candidate_likelihood != "fused" or not policy.spec.needs_loglik:
        return
    passes = "set +metactl.candidate_likelihood=passes (one extra log-prob pass per candidate)"
    reason = None
    actor_rollout_ref = config.get("actor_rollout_ref", {}) or {}
    model = actor_rollout_ref.get("model", {}) or {}
    actor = actor_rollout_ref.get("actor", {}) or {}
    strategy = actor.get("strategy", "fsdp")
    sp = max(
        int(actor.get("ulysses_sequence_parallel_size", 1) or 1),
        int((actor.get("fsdp_config", {}) or {}).get("ulysses_sequence_parallel_size", 1) or 1),
    )
    correction = (config.get("algorithm", {}) or {}).get("rollout_correction", None) or {}
    if model.get("use_fused_kernels", False):
        reason = (
            "actor_rollout_ref.model.use_fused_kernels=True: verl's fused kernels never "
            "materialise the logits the candidates are scored from"
        )
    elif strategy not in _FUSED_STRATEGIES:
        reason = (
            f"actor_rollout_ref.actor.strategy={strategy!r}: the candidates are scored inside "
            f"the FSDP engine's log-prob pass ({' or '.join(_FUSED_STRATEGIES)} only)"
        )
    elif sp > 1:
        reason = (
            f"actor_rollout_ref.actor.ulysses_sequence_parallel_size={sp}: with sequence "
            "parallelism a rank holds only a slice of each packed sequence"
        )
    elif correction.get("bypass_mode", False):
        reason = (
            "algorithm.rollout_correction.bypass_mode=True: verl skips the old-log-prob pass "
            "the candidates are scored in"
        )
    if reason is not None:
        raise ValueError(f"metactl.candidate_likelihood=fused cannot run with {reason}; {passes}")
