"""The meta-policy: a categorical distribution over candidate values of one sampling
hyperparameter, with ``select()`` once per rollout batch and ``update()`` from its feedback."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _validation as check
from .decision import Decision, UpdateInfo
from .rules import RULES, TAMPO, Rule
from .rules.base import Feedback, RuleState
from .selectors import SELECTORS, Nucleus, Selector

__all__ = ["FEEDBACK_NAMES", "PAPER_TEMPERATURES", "SCHEMA_VERSION", "MetaPolicy", "tampo"]

SCHEMA_VERSION = 1
# Steps (and the counts that sum to them) stay below 2**53, where float64 counts are exact.
MAX_STEP = 2**53
PAPER_TEMPERATURES: tuple[float, ...] = tuple(round(0.6 + 0.1 * i, 1) for i in range(10))
FEEDBACK_NAMES = (
    "loglik",
    "advantages",
    "reward",
    "entropy",
    "vocab_size",
    "rewards",
    "group_size",
)
_STATE_KEYS = {
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


def _validate_feedback(feedback: dict[str, Any], k: int) -> Feedback:
    """Check every feedback value given (needed by the rule or not) and convert it."""
    unknown = sorted(set(feedback) - set(FEEDBACK_NAMES))
    if unknown:
        raise TypeError(f"unknown feedback {unknown}; accepted names are {list(FEEDBACK_NAMES)}")
    out: Feedback = {}
    if "loglik" in feedback:
        loglik = check.finite_array(feedback["loglik"], "loglik", ndim=2)
        if loglik.shape[1] != k:
            raise ValueError(f"loglik must have shape (N, K={k}), got {loglik.shape}")
        out["loglik"] = loglik
    if "advantages" in feedback:
        advantages = check.finite_array(feedback["advantages"], "advantages", ndim=1)
        if "loglik" in out and advantages.shape[0] != out["loglik"].shape[0]:
            raise ValueError(
                f"advantages has {advantages.shape[0]} entries but loglik has "
                f"{out['loglik'].shape[0]} rows: one advantage per trajectory"
            )
        out["advantages"] = advantages
    if "reward" in feedback:
        out["reward"] = check.finite_scalar(feedback["reward"], "reward")
    if "rewards" in feedback:  # one reward per trajectory, rows in the order of ``loglik``
        rewards = check.finite_array(feedback["rewards"], "rewards", ndim=1)
        if "loglik" in out and rewards.shape[0] != out["loglik"].shape[0]:
            raise ValueError(
                f"rewards has {rewards.shape[0]} entries but loglik has "
                f"{out['loglik'].shape[0]} rows: one reward per trajectory"
            )
        out["rewards"] = rewards
    if "group_size" in feedback:  # completions per prompt; groups are consecutive rows
        out["group_size"] = check.integer(feedback["group_size"], "group_size", minimum=1)
    if "entropy" in feedback:
        out["entropy"] = check.positive_scalar(feedback["entropy"], "entropy", allow_zero=True)
    if "vocab_size" in feedback:
        out["vocab_size"] = check.integer(feedback["vocab_size"], "vocab_size", minimum=2)
    return out


def _state_to_json(state: RuleState) -> dict[str, Any]:
    return {
        key: value.tolist() if isinstance(value, np.ndarray) else value
        for key, value in state.items()
    }


def _state_from_json(data: Any, template: RuleState) -> RuleState:
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


def _json_equal(value: Any, mine: Any, name: str) -> bool:
    try:
        return bool(json.loads(json.dumps(value)) == json.loads(json.dumps(mine)))
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"{name} is not JSON data: {exc}") from exc


class MetaPolicy:
    """A learned distribution over candidate values of one sampling hyperparameter.

    Args:
        candidates: the K >= 2 candidate values (unique, finite; > 0 for temperatures).
        rule: the update rule or controller (:class:`TAMPO`, :class:`Hedge`, :class:`Fixed`, ...).
        selector: how a value is drawn from the probabilities; default: the rule's own
            (``Nucleus(0.7)`` for TAMPO, ``Sample()`` for Hedge/EXP3, ``Greedy()`` for controllers).
        seed: seeds the policy's own ``numpy.random.Generator`` (PCG64). Equal seeds and equal
            feedback give equal choices, on every rank of a distributed run.
        hyperparameter: ``"temperature"`` (default), ``"top_p"``, ``"min_p"`` or ``"generic"``;
            sets the range the candidates are checked against.

    Example:
        >>> import metactl, numpy as np
        >>> policy = metactl.tampo(seed=0)
        >>> decision = policy.select()            # sample this batch at decision.value
        >>> loglik = np.random.default_rng(0).normal(-1.0, 0.1, size=(8, 10))
        >>> info = policy.update(decision, loglik=loglik, advantages=np.linspace(-1, 1, 8))
        >>> round(float(policy.probs.sum()), 12), policy.step
        (1.0, 1)
    """

    def __init__(
        self,
        candidates: Sequence[float] | np.ndarray,
        rule: Rule,
        selector: Selector | None = None,
        seed: int = 0,
        *,
        hyperparameter: str = "temperature",
    ) -> None:
        if not isinstance(rule, Rule):
            raise TypeError(f"rule must be a metactl rule (e.g. metactl.TAMPO()), got {rule!r}")
        if selector is not None and not isinstance(selector, Selector):
            raise TypeError(
                f"selector must be a metactl selector (e.g. Nucleus()), got {selector!r}"
            )
        self._hyperparameter = check.one_of(hyperparameter, "hyperparameter", check.HYPERPARAMETERS)
        self._candidates = check.candidate_values(candidates, hyperparameter)
        self._candidates.setflags(write=False)
        rule.validate_candidates(self._candidates)
        self._rule = rule
        self._selector = selector if selector is not None else rule.default_selector()
        self._seed = check.integer(seed, "seed", minimum=0)
        self._rng = np.random.Generator(np.random.PCG64(self._seed))
        self._state = rule.init_state(self._candidates)
        self._step = 0
        self._id = uuid.uuid4().hex

    # -- read-only views ---------------------------------------------------------------------
    @property
    def candidates(self) -> np.ndarray:
        """The candidate values, shape (K,) (read-only)."""
        return self._candidates

    @property
    def rule(self) -> Rule:
        return self._rule

    @property
    def selector(self) -> Selector:
        return self._selector

    @property
    def hyperparameter(self) -> str:
        return self._hyperparameter

    @property
    def step(self) -> int:
        """Number of updates so far; decisions are made and accepted at this step."""
        return self._step

    @property
    def requires(self) -> tuple[str, ...]:
        """Feedback names the rule needs in ``update`` (compute only these)."""
        return self._rule.requires

    @property
    def probs(self) -> np.ndarray:
        """The current probabilities over candidates, shape (K,), non-negative, summing to 1."""
        return self._rule.probs(self._state, self._candidates, self._step)

    # -- the loop ----------------------------------------------------------------------------
    def select(self) -> Decision:
        """Choose the value for the next rollout batch."""
        probs = self.probs
        index = self._rule.choose(self._state, self._candidates, self._step, self._rng)
        if index is None:
            index, prob = self._selector.select(probs, self._rng)
        else:
            prob = float(probs[index])
        value = self._rule.decision_value(self._state, self._candidates, self._step, index)
        return Decision(
            index=int(index),
            value=float(value),
            prob=float(prob),
            step=self._step,
            policy_id=self._id,
        )

    def update(self, decision: Decision, **feedback: Any) -> UpdateInfo:
        """Update from the feedback of the batch sampled with ``decision``.

        Keyword feedback: ``loglik`` (N, K), ``advantages`` (N,), ``reward``, ``entropy``,
        ``vocab_size``. Every name given is validated; the rule uses those in ``requires``.

        The update never leaves inf/NaN behind: the rules' math is overflow-safe for ordinary
        magnitudes (sparsemax shifted by the row maximum, the batch mean of advantages scaled
        when it would overflow, min-max normalisation of any finite EMA), and an update that
        would still overflow float64 (feedback near the float64 limit) or leave a state that
        ``load_state_dict`` would refuse raises ``ValueError`` with the policy unchanged.
        """
        if not isinstance(decision, Decision):
            raise TypeError(f"decision must be a metactl.Decision, got {type(decision).__name__}")
        if decision.policy_id != self._id:
            raise ValueError("decision was made by another MetaPolicy; select() on this one")
        if decision.step != self._step:
            raise ValueError(
                f"decision is from step {decision.step} but the policy is at step {self._step}: "
                "each decision is updated once, at the step it was made"
            )
        if not 0 <= decision.index < self._candidates.shape[0]:
            raise ValueError(f"decision.index {decision.index} is out of range")
        missing = [name for name in self._rule.requires if name not in feedback]
        if missing:
            raise ValueError(f"{self._rule.name} needs feedback {missing} (got {sorted(feedback)})")
        checked = _validate_feedback(feedback, self._candidates.shape[0])
        if self._step + 1 >= MAX_STEP:
            raise ValueError(f"the policy has reached the largest step {MAX_STEP - 1}")
        # Floating-point overflow or an invalid operation anywhere in the update (feedback near
        # the float64 limit) raises instead of leaving inf/NaN in the state; the new state is
        # checked like a loaded one, and assigned only when it passes.
        try:
            with np.errstate(over="raise", invalid="raise", divide="raise"):
                new_state, signal = self._rule.update(
                    self._state, self._candidates, decision, checked
                )
        except FloatingPointError as exc:
            raise ValueError(
                f"{self._rule.name} update overflows float64 ({exc}); the feedback is too large "
                "in magnitude (rescale it); the policy is unchanged"
            ) from exc
        if signal is not None and not np.all(np.isfinite(signal)):
            raise ValueError(f"{self._rule.name} update gave a non-finite signal; policy unchanged")
        for key, value in new_state.items():
            if not np.all(np.isfinite(value)):
                raise ValueError(
                    f"{self._rule.name} update would leave a non-finite rule_state[{key!r}] "
                    "(feedback too large in magnitude); the policy is unchanged"
                )
        try:
            self._rule.validate_state(new_state, self._candidates, self._step + 1)
        except ValueError as exc:
            raise ValueError(
                f"{self._rule.name} update would leave an invalid state ({exc}); "
                "the policy is unchanged"
            ) from exc
        self._state = new_state
        self._step += 1
        return UpdateInfo(step=decision.step, probs=self.probs, candidate_advantages=signal)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically, as plain JSON-safe values."""
        return {
            "schema_version": SCHEMA_VERSION,
            "hyperparameter": self._hyperparameter,
            "candidates": self._candidates.tolist(),
            "rule": {"type": self._rule.name, "config": self._rule.config()},
            "selector": {"type": self._selector.name, "config": self._selector.config()},
            "seed": self._seed,
            "step": self._step,
            "rule_state": _state_to_json(self._state),
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()`` taken from a policy with the same configuration.

        Every field is validated before anything is assigned (a rejected state leaves the
        policy unchanged) and only ``ValueError``/``TypeError`` naming the field are raised:
        the step is an int in ``[0, 2**53)``; the rule state has the rule's keys and shapes,
        finite entries and the rule's invariants (counts are non-negative integers summing to
        the step, untried candidates hold 0, stored logits have maximum 0, an entropy
        controller's temperature lies inside the candidate range) and gives a probability
        distribution without overflow; the RNG is a PCG64 state with ints in range.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state).__name__}")
        version = state.get("schema_version")
        if isinstance(version, bool) or not isinstance(version, int) or version != SCHEMA_VERSION:
            raise ValueError(
                f"state_dict['schema_version'] is {state.get('schema_version')!r}; "
                f"this metactl reads schema {SCHEMA_VERSION}"
            )
        if set(state) != _STATE_KEYS:
            raise ValueError(
                f"state_dict has keys {sorted(state)}; expected exactly {sorted(_STATE_KEYS)}"
            )
        mine = self.state_dict()
        for key in ("hyperparameter", "candidates", "rule", "selector"):
            if not _json_equal(state[key], mine[key], f"state_dict[{key!r}]"):
                raise ValueError(
                    f"state_dict[{key!r}] = {state[key]!r} does not match this policy's "
                    f"{mine[key]!r}; build the policy with the same configuration "
                    "(or use MetaPolicy.from_state_dict)"
                )
        # Validate everything before assigning anything: a rejected state changes nothing.
        step = check.integer(state["step"], "state_dict['step']", minimum=0, below=MAX_STEP)
        seed = check.integer(state["seed"], "state_dict['seed']", minimum=0)
        rule_state = _state_from_json(state["rule_state"], self._rule.init_state(self._candidates))
        self._rule.validate_state(rule_state, self._candidates, step)
        rng_state = check.pcg64_state(state["rng"], "state_dict['rng']")
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = rng_state
        self._seed, self._step, self._state, self._rng = seed, step, rule_state, rng

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> MetaPolicy:
        """Rebuild a policy (rule, selector, candidates and all) from a ``state_dict()``."""
        if not isinstance(state, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state).__name__}")
        try:
            rule_cls = RULES[state["rule"]["type"]]
            selector_cls = SELECTORS[state["selector"]["type"]]
            rule = rule_cls(**state["rule"]["config"])
            selector = selector_cls(**state["selector"]["config"])
            policy = cls(
                state["candidates"],
                rule,
                selector,
                seed=state["seed"],
                hyperparameter=state["hyperparameter"],
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"state_dict does not describe a metactl policy: {exc!r}") from exc
        policy.load_state_dict(state)
        return policy

    def __repr__(self) -> str:
        probs = np.array2string(self.probs, precision=3, separator=", ")
        return (
            f"MetaPolicy({self._hyperparameter}, candidates={self._candidates.tolist()}, "
            f"rule={self._rule!r}, selector={self._selector!r}, step={self._step}, probs={probs})"
        )


def tampo(
    candidates: Sequence[float] | np.ndarray = PAPER_TEMPERATURES,
    *,
    alpha: float = 0.05,
    normalizer: str = "sparsemax",
    top_p: float = 0.7,
    seed: int = 0,
) -> MetaPolicy:
    """A TAMPO meta-policy with the paper's defaults: temperatures 0.6..1.5 (step 0.1),
    ``alpha = 0.05``, sparsemax, nucleus selection with ``top_p = 0.7``.

    Example:
        >>> import metactl
        >>> policy = metactl.tampo(seed=0)
        >>> policy.probs.round(2).tolist() == [0.1] * 10   # uniform before the first update
        True
    """
    return MetaPolicy(candidates, TAMPO(alpha=alpha, normalizer=normalizer), Nucleus(top_p), seed)
