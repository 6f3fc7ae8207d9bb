"""The meta-policy: a categorical distribution over candidate values of one sampling
hyperparameter (or over joint settings of several, :func:`metactl.grid`), with ``select()`` once
per rollout batch and ``update()`` from its feedback."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from copy import deepcopy
from typing import Any, overload

import numpy as np

from . import _validation as check
from ._state import (
    MAX_STEP,
    SCHEMA_VERSION,
    check_new_state,
    check_state_header,
    float64_guard,
    state_from_json,
    state_to_json,
)
from .contexts import ContextStore, context_keys, decision_arrays
from .decision import ContextKey, Decision, DecisionBatch, UpdateInfo, decision_setting
from .feedback import ROW_FEEDBACK, Feedback, FeedbackSpec
from .knobs import KNOBS, KnobGrid, KnobValue, joint_candidates
from .rules import RULES, Rule
from .rules.base import Batch, Contexts
from .selectors import SELECTORS, Selector

__all__ = ["SCHEMA_VERSION", "MetaPolicy"]

class MetaPolicy:
    """A learned distribution over candidate values of one sampling hyperparameter (a knob),
    or over joint settings of several knobs.

    Args:
        candidates: the K >= 2 candidates: unique values of the knob (each in the knob's range,
            :func:`metactl.knobs.check_knob`: temperatures ``> 0``, top_p in ``(0, 1]``, top_k
            integers ``>= 1``, min_p in ``[0, 1)``; any finite numbers for ``"generic"``), or
            for ``hyperparameter="joint"`` a :class:`metactl.KnobGrid`
            (``metactl.grid(temperature=[...], top_p=[...])``) or a list of mappings that all
            set the same knobs (turned into one).
        rule: the update rule or controller (:class:`TAMPO`, :class:`Hedge`, :class:`Fixed`, ...).
        selector: how a value is drawn from the probabilities; default: the rule's own
            (``Nucleus(0.7)`` for TAMPO, ``Sample()`` for Hedge/EXP3, ``Greedy()`` for controllers).
        seed: seeds the policy's own ``numpy.random.Generator`` (PCG64). Equal seeds and equal
            feedback give equal choices, on every rank of a distributed run.
        hyperparameter: what the candidates are: ``"temperature"`` (default), ``"top_p"``,
            ``"top_k"``, ``"min_p"``, ``"joint"`` (a grid of knob mappings) or ``"generic"``
            (numbers that set no sampler knob; the caller applies them).

    Each decision names its sampler setting: ``decision.setting`` is ``{knob: value}``
    (``{"temperature": 0.9}``, ``{"top_k": 50}``, ``{"temperature": 0.8, "top_p": 0.95}``) and
    ``policy.setting(k)`` that of candidate ``k``; ``policy.family`` is the
    :func:`metactl.likelihood.candidate_loglik` family that scores the candidates.

    A joint policy takes the rules that use only the candidates' indices (TAMPO, Hedge,
    MetaGradient, EXP3, UCB1, ThompsonGaussian): the rules that read candidate values as
    numbers (Fixed, Counterfactual) or produce continuous values between them (Schedule,
    EntropyTarget, EntropySchedule, Uncertainty, PTGS) are refused, and so are per-context
    rules (ContextualTAMPO, LinearThompson, PTGS): per-prompt decisions over a joint grid are
    not supported. A ``top_k`` policy (an integer knob) refuses the continuous rules.

    With a contextual rule (:class:`PTGS`, :class:`ContextualTAMPO`, :class:`LinearThompson`)
    the policy also keeps per-context state: ``select(contexts=...)`` gives one decision per
    context and ``update(decisions, ...)`` takes G rows per decision (:mod:`metactl.contexts`
    describes the contract); ``select()`` alone is the global policy.

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
        candidates: Sequence[float] | np.ndarray | KnobGrid | Sequence[Mapping[str, KnobValue]],
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
        self._grid: KnobGrid | None = None
        if hyperparameter == "joint":
            if not check.is_joint_like(candidates):
                raise ValueError(
                    "candidates: hyperparameter='joint' needs a KnobGrid (metactl.grid("
                    "temperature=[...], top_p=[...])) or a list of knob mappings, got "
                    f"{type(candidates).__name__}"
                )
            self._grid = joint_candidates(candidates, "candidates")
            # The rules see the candidate positions: a joint policy takes "indices" rules only.
            self._candidates = np.arange(len(self._grid), dtype=np.float64)
        else:
            self._candidates = check.candidate_values(candidates, hyperparameter)
        self._candidates.setflags(write=False)
        # what ``candidates`` shows: top_k values as the ints the sampler takes
        self._public = (
            self._candidates.astype(np.int64) if hyperparameter == "top_k" else self._candidates
        )
        self._public.setflags(write=False)
        self._knobs: tuple[str, ...] = (
            tuple(k for k in KNOBS if k in self._grid.knobs)
            if self._grid is not None
            else () if hyperparameter == "generic" else (hyperparameter,)
        )
        check_rule_fits(rule, hyperparameter, self._candidates)
        rule.validate_candidates(self._candidates)
        self._rule = rule
        self._selector = selector if selector is not None else rule.default_selector()
        fields = rule.row_fields(self._candidates)
        if fields and rule.uses_selector and not self._selector.vectorised:
            raise TypeError(
                f"{rule.name} selects per context with a vectorised selector (Nucleus, Sample "
                f"or Greedy, or one implementing select_rows); got selector {self._selector!r}"
            )
        if not rule.uses_selector and self._selector != rule.default_selector():
            raise ValueError(
                f"{rule.name} draws its own values and uses no selector: pass selector=None "
                f"(got {self._selector!r})"
            )
        self._seed = check.integer(seed, "seed", minimum=0)
        self._rng = np.random.Generator(np.random.PCG64(self._seed))
        self._state = rule.init_state(self._candidates)
        self._step = 0
        self._id = uuid.uuid4().hex
        # Per-context rows of a per-prompt rule (PTGS, ContextualTAMPO, ...); None otherwise.
        self._store: ContextStore | None = (
            ContextStore(fields, rule.max_contexts) if fields else None
        )
        # Whether select(contexts=...) decides per context: rules with per-context rows, and
        # rules that deal one distribution over the groups (Mixture, Spread) without them.
        self._per_context = bool(fields) or rule.decides_per_context

    def __deepcopy__(self, memo: dict[int, Any]) -> MetaPolicy:
        """An independent policy with the same state and a new identity: the original refuses
        the copy's decisions and the copy the original's."""
        copy = MetaPolicy.__new__(MetaPolicy)
        memo[id(self)] = copy
        for key, value in self.__dict__.items():
            setattr(copy, key, deepcopy(value, memo))
        copy._id = uuid.uuid4().hex
        return copy

    def __copy__(self) -> MetaPolicy:
        """As :meth:`__deepcopy__`: a copy sharing the state arrays would corrupt both."""
        return self.__deepcopy__({})

    # -- read-only views ---------------------------------------------------------------------
    @property
    def candidates(self) -> Any:
        """The candidates: the values, a read-only array of shape (K,) (float64; int64 for
        ``top_k``), or for a joint policy its :class:`metactl.KnobGrid`. Pass it to
        ``candidate_loglik(..., policy.candidates, policy.family)``."""
        return self._grid if self._grid is not None else self._public

    @property
    def num_candidates(self) -> int:
        """K, the number of candidates."""
        return int(self._candidates.shape[0])

    @property
    def knobs(self) -> tuple[str, ...]:
        """The sampler knobs the policy sets: ``("temperature",)``, ``("top_p",)``, ...; a joint
        policy's grid knobs in the canonical order of :data:`metactl.knobs.KNOBS`; ``()`` for
        ``"generic"``."""
        return self._knobs

    @property
    def family(self) -> str:
        """The :func:`metactl.likelihood.candidate_loglik` family of the candidates:
        ``"temperature"``, ``"top_p"``, ``"top_k"``, ``"min_p"`` or ``"joint"`` (score with
        ``candidate_loglik(..., policy.candidates, policy.family, **fixed_knobs)``).

        Raises:
            ValueError: a ``"generic"`` policy (its numbers are no sampler knob).
        """
        if self._hyperparameter == "generic":
            raise ValueError(
                "a 'generic' policy has no likelihood family: its candidates set no sampler "
                "knob (build it with hyperparameter='temperature', 'top_p', ... or 'joint')"
            )
        return self._hyperparameter

    def setting(self, index: int) -> dict[str, KnobValue]:
        """The sampler setting of candidate ``index`` (``0 <= index < K``): ``{"temperature":
        0.9}``, ``{"top_k": 50}`` (an int), ``{"temperature": 0.8, "top_p": 0.95}`` (joint,
        knobs in :data:`metactl.knobs.KNOBS` order). A new dict each call.

        Raises:
            TypeError: ``index`` is not an int.
            ValueError: ``index`` out of range, or a ``"generic"`` policy (it sets no knob).
        """
        k = self.num_candidates
        i = check.integer(index, "index", minimum=0, below=k)
        return self._setting(i)

    def _setting(self, index: int) -> dict[str, KnobValue]:
        if self._grid is not None:
            cand = self._grid[index]
            return {knob: cand[knob] for knob in self._knobs}
        return decision_setting(self._knobs, float(self._candidates[index]))

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
    def spec(self) -> FeedbackSpec:
        """The trainer contract of this policy (:class:`metactl.FeedbackSpec`): the feedback
        its rule needs, how ``loglik`` is reduced over tokens, whether zero-advantage rows may
        go unscored, per-context decisions and features, and the knobs the decisions set."""
        rule = self._rule
        return FeedbackSpec(
            feedback=rule.requires,
            loglik=rule.loglik_reduction,  # type: ignore[arg-type]
            zero_advantage_rows_free=rule.zero_advantage_rows_ignored,
            per_context=self._per_context,
            feature_dim=rule.feature_dim,
            knobs=self._knobs,
        )

    @property
    def probs(self) -> np.ndarray:
        """The current probabilities over candidates, shape (K,), non-negative, summing to 1."""
        return self._rule.global_probs(self._state, self._candidates, self._step)

    @property
    def contextual(self) -> bool:
        """Whether the rule decides per context (``select(contexts=...)`` works)."""
        return self._per_context

    @property
    def num_contexts(self) -> int:
        """Number of contexts stored (0 for a global rule)."""
        return 0 if self._store is None else len(self._store)

    # -- the loop ----------------------------------------------------------------------------
    @overload
    def select(self, contexts: None = None, *, features: None = None) -> Decision: ...

    @overload
    def select(self, contexts: Any, *, features: Any = None) -> DecisionBatch: ...

    def select(self, contexts: Any = None, *, features: Any = None) -> Decision | DecisionBatch:
        """Choose the value for the next rollout batch, or (``contexts`` given) one value per
        context, returned as a :class:`DecisionBatch` (one :class:`Decision` per context, in
        order). ``contexts`` needs a per-prompt rule (PTGS, ContextualTAMPO, LinearThompson);
        ``features`` (n, feature_dim) is required by rules with features and refused by the
        others. See :mod:`metactl.contexts` for the contract. A rejected call draws nothing.
        """
        if contexts is None:
            if features is not None:
                raise ValueError("features are given per context: pass contexts=... with them")
            return self._draw(None, None)[0]
        if not self._per_context:
            raise TypeError(
                f"contexts=... needs a contextual rule (metactl.PTGS, metactl.ContextualTAMPO, "
                f"metactl.LinearThompson); {self._rule.name} keeps one global state"
            )
        return self._draw(context_keys(contexts, "contexts"), features)

    def _checked_features(self, features: Any, n: int) -> np.ndarray | None:
        dim = self._rule.feature_dim
        if dim == 0:
            if features is not None:
                raise ValueError(f"{self._rule.name} uses no features: pass features=None")
            return None
        if features is None:
            raise ValueError(f"{self._rule.name} needs features of shape (n, {dim}) per context")
        array = check.finite_array(features, "features", ndim=2)
        if array.shape != (n, dim):
            raise ValueError(
                f"features must have shape (len(contexts)={n}, feature_dim={dim}), got "
                f"{array.shape}"
            )
        return array

    def _contexts(
        self,
        keys: tuple[ContextKey, ...] | None,
        features: np.ndarray | None,
        slots: np.ndarray | None = None,
    ) -> tuple[Contexts, np.ndarray]:
        """The hook argument for these contexts (``keys=None``: the one global context) and
        their store slots (-1: not stored; ``slots``, when given, are those of ``keys``, from
        an earlier lookup). Reads the store, changes nothing."""
        rule = self._rule
        if keys is None or not self._per_context:
            rows = rule.global_rows(self._state, self._candidates)
            slots = np.zeros(0, dtype=np.int64)
            n = 1
        elif self._store is None:  # decides per context, keeps no rows
            rows = {}
            slots = np.zeros(0, dtype=np.int64)
            n = len(keys)
        else:
            n = len(keys)
            slots = self._store.slots(keys) if slots is None else slots
            prior = rule.prior_rows(self._state, self._candidates, n)
            rows = self._store.gather(slots, prior)
        ctx = Contexts(self._candidates, self._step, self._selector, n, rows, features)
        return ctx, slots

    def _draw(self, keys: tuple[ContextKey, ...] | None, features: Any) -> DecisionBatch:
        """Validate, then draw one decision per context (``keys=None``: the global context,
        returned as a batch of one). Nothing is drawn when validation fails."""
        checked = None
        if keys is not None:
            checked = self._checked_features(features, len(keys))
            distinct = len(set(keys))
            if distinct > self._rule.max_contexts:
                raise ValueError(
                    f"contexts has {distinct} distinct keys, more than max_contexts = "
                    f"{self._rule.max_contexts}: one update could not store them"
                )
        ctx, _ = self._contexts(keys, checked)
        draw = self._rule.select(self._state, ctx, self._rng)
        probs = draw.probs
        return DecisionBatch(
            contexts=keys,
            values=np.asarray(draw.values, dtype=np.float64),
            indices=np.asarray(draw.indices, dtype=np.int64),
            probs=probs if callable(probs) else np.asarray(probs, dtype=np.float64),
            on_grid=np.asarray(draw.on_grid, dtype=bool),
            features=checked,
            step=self._step,
            policy_id=self._id,
            knobs=self._knobs,
            grid=self._grid,
        )

    def context_probs(self, contexts: Any, *, features: Any = None) -> np.ndarray:
        """The distribution of ``Decision.index`` for each context, shape (n, K) (for logging:
        draws nothing, changes nothing). Unseen contexts get the rule's prior."""
        if not self._per_context:
            raise TypeError(f"context_probs needs a contextual rule; {self._rule.name} is global")
        keys = context_keys(contexts, "contexts")
        ctx, _ = self._contexts(keys, self._checked_features(features, len(keys)))
        return self._rule.probs(self._state, ctx)

    def update(
        self,
        decision: Decision | DecisionBatch | Sequence[Decision],
        feedback: Feedback | None = None,
        /,
        **kwargs: Any,
    ) -> UpdateInfo:
        """Update from the feedback of the batch sampled with ``decision``.

        The feedback is a :class:`metactl.Feedback` (``metactl.build_feedback`` makes one from
        a trainer's tensors) or keywords: ``loglik`` (N, K), ``advantages`` (N,), ``rewards``
        (N,), ``reward``, ``entropy``, ``vocab_size``, ``group_size``. Every value given is
        validated; the rule uses those in ``policy.spec.feedback``.

        ``decision`` is the global :class:`Decision` of ``select()``, or, for a per-prompt rule,
        the :class:`DecisionBatch` of ``select(contexts=...)`` (or a list of its per-context
        decisions): then the per-row feedback holds G rows per decision, in order (see
        :mod:`metactl.contexts`).

        The update never leaves inf/NaN behind: the rules' math is overflow-safe for ordinary
        magnitudes (sparsemax shifted by the row maximum, the batch mean of advantages scaled
        when it would overflow, min-max normalisation of any finite EMA), and an update that
        would still overflow float64 (feedback near the float64 limit) or leave a state that
        ``load_state_dict`` would refuse raises ``ValueError`` with the policy unchanged.
        """
        if feedback is None:
            feedback = Feedback.from_kwargs(kwargs)
        elif not isinstance(feedback, Feedback):
            raise TypeError(f"feedback must be a metactl.Feedback, got {type(feedback).__name__}")
        elif kwargs:
            raise TypeError("pass the feedback as a Feedback or as keywords, not both")
        rule, store, per_context = self._rule, self._store, self._per_context
        if not per_context and (
            isinstance(decision, (DecisionBatch, list, tuple))
            or (isinstance(decision, Decision) and decision.context is not None)
        ):
            raise TypeError(
                f"a list of decisions needs a contextual rule; {rule.name} takes the one "
                "Decision of select()"
            )
        if not per_context and not isinstance(decision, Decision):
            raise TypeError(f"decision must be a metactl.Decision, got {type(decision).__name__}")
        keys, values, indices, features, propensities = decision_arrays(
            decision, self._id, self._step, self._candidates, rule.feature_dim
        )
        checked = self._checked_feedback(feedback)
        n = 1 if keys is None else len(keys)
        group_size = self._group_size(checked, n, contextual=per_context)
        if self._step + 1 >= MAX_STEP:
            raise ValueError(f"the policy has reached the largest step {MAX_STEP - 1}")
        if keys is None:
            unique: list[ContextKey] = []
            inverse = np.zeros(1, dtype=np.int64)
        elif len(set(keys)) == n:  # distinct keys (the usual batch): each its own context
            unique = list(keys)
            inverse = np.arange(n, dtype=np.int64)
        else:  # the distinct keys in order of first occurrence, and each key's position
            unique = list(dict.fromkeys(keys))
            position = dict(zip(unique, range(len(unique)), strict=True))
            inverse = np.fromiter(map(position.__getitem__, keys), dtype=np.int64, count=n)
        if len(unique) > rule.max_contexts:
            raise ValueError(
                f"decisions hold {len(unique)} distinct contexts, more than max_contexts = "
                f"{rule.max_contexts}"
            )
        unique_slots = None
        if keys is not None and store is not None and len(unique) < n:
            # the slots of the selected keys, if they were just looked up: each distinct
            # key's slot is that of its first occurrence
            looked_up = store.looked_up(keys)
            if looked_up is not None:
                unique_slots = looked_up[np.unique(inverse, return_index=True)[1]]
        ctx, slots = self._contexts(None if keys is None else tuple(unique), None, unique_slots)
        m = max(len(unique), 1)
        batch = Batch(
            n=n,
            group_size=group_size,
            inverse=inverse,
            m=m,
            counts=np.bincount(inverse, minlength=m),
            values=values,
            indices=indices,
            features=features,
            propensity_of=propensities,
        )
        with float64_guard(rule.name):
            new_state, new_rows, signal = rule.update(self._state, ctx, batch, checked)
        probs = check_new_state(
            rule,
            new_state,
            signal,
            self._candidates,
            self._step + 1,
            new_rows=new_rows or None,
            check_rows=(
                None
                if keys is None
                else lambda: rule.check_rows(new_rows, self._candidates, self._step + 1)
            ),
        )
        # commit: nothing above changed the policy
        evicted: list[ContextKey] = []
        if keys is not None and store is not None:
            evicted = store.write(unique, slots, new_rows)
        self._state = new_state
        self._step += 1
        return UpdateInfo(
            step=self._step - 1,
            # the new state's global probabilities, as validated (what self.probs gives)
            probs=probs,
            candidate_advantages=signal,
            contexts=None if keys is None else len(unique),
            evicted=tuple(evicted),
        )

    def _checked_feedback(self, feedback: Feedback) -> dict[str, Any]:
        given = feedback.given()
        missing = [name for name in self._rule.requires if name not in given]
        if missing:
            raise ValueError(f"{self._rule.name} needs feedback {missing} (got {sorted(given)})")
        k = self._candidates.shape[0]
        if feedback.loglik is not None and feedback.loglik.shape[1] != k:
            raise ValueError(f"loglik must have shape (N, K={k}), got {feedback.loglik.shape}")
        return {name: getattr(feedback, name) for name in given}

    def _group_size(self, checked: dict[str, Any], n: int, *, contextual: bool) -> int:
        """G, the rows per decision: the per-row feedback holds ``n * G`` rows (0 when the
        feedback has no per-row entry, which only a global rule may lack; its ``group_size``
        feedback is then its own, the prompts' group size)."""
        rule = self._rule
        row_counts = {name: checked[name].shape[0] for name in ROW_FEEDBACK if name in checked}
        if not row_counts:
            needed = [name for name in rule.requires if name in ROW_FEEDBACK]
            if contextual and needed:
                raise ValueError(f"{rule.name} needs per-row feedback {needed}")
            return 0
        if len(set(row_counts.values())) != 1:
            raise ValueError(
                f"per-row feedback must have the same number of rows, got {row_counts}"
            )
        rows_total = next(iter(row_counts.values()))
        name = next(iter(row_counts))
        if rows_total % n:
            raise ValueError(
                f"{name} has {rows_total} rows, not a multiple of the {n} decisions: each "
                "decision owns G consecutive rows (N = len(decisions) * G)"
            )
        group_size = rows_total // n
        if contextual and "group_size" in checked and checked["group_size"] != group_size:
            raise ValueError(
                f"group_size is {checked['group_size']} but {name} has {rows_total} rows for "
                f"{n} decisions (G = {group_size})"
            )
        return group_size

    # -- state -------------------------------------------------------------------------------
    def _candidates_state(self) -> Any:
        """The candidates as JSON: the list of values (ints for ``top_k``), or for a joint
        policy ``KnobGrid.to_state()`` (``{"version", "knobs", "candidates"}``)."""
        if self._grid is not None:
            return self._grid.to_state()
        if self._hyperparameter == "top_k":
            return [int(v) for v in self._candidates.tolist()]
        return self._candidates.tolist()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically, as plain JSON-safe values.

        The knobs are named by ``"hyperparameter"`` (the one knob, ``"joint"`` or
        ``"generic"``) and, for a joint policy, by ``"candidates"``: the grid's
        ``KnobGrid.to_state()``, ``{"version": 1, "knobs": [...], "candidates": [[...], ...]}``.
        """
        return {
            "schema_version": SCHEMA_VERSION,
            "hyperparameter": self._hyperparameter,
            "candidates": self._candidates_state(),
            "rule": {"type": self._rule.name, "config": self._rule.config()},
            "selector": {"type": self._selector.name, "config": self._selector.config()},
            "seed": self._seed,
            "step": self._step,
            "rule_state": state_to_json(self._state),
            "rng": self._rng.bit_generator.state,
            **({} if self._store is None else {"contexts": self._store.to_json()}),
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
        mine = {  # the configuration only (not the stored contexts, which may be millions)
            "hyperparameter": self._hyperparameter,
            "candidates": self._candidates_state(),
            "rule": {"type": self._rule.name, "config": self._rule.config()},
            "selector": {"type": self._selector.name, "config": self._selector.config()},
        }
        check_state_header(state, mine, contextual=self._store is not None)
        # Validate everything before assigning anything: a rejected state changes nothing.
        step = check.integer(state["step"], "state_dict['step']", minimum=0, below=MAX_STEP)
        seed = check.integer(state["seed"], "state_dict['seed']", minimum=0)
        rule_state = state_from_json(state["rule_state"], self._rule.init_state(self._candidates))
        self._rule.validate_state(rule_state, self._candidates, step)
        store = None
        if self._store is not None:
            rule = self._rule
            store, rows = ContextStore.from_json(
                state["contexts"],
                rule.row_fields(self._candidates),
                rule.max_contexts,
                "state_dict['contexts']",
            )
            rule.check_rows(rows, self._candidates, step)
        rng_state = check.pcg64_state(state["rng"], "state_dict['rng']")
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = rng_state
        self._seed, self._step, self._state, self._rng = seed, step, rule_state, rng
        if store is not None:
            self._store = store

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
            candidates = state["candidates"]
            if state["hyperparameter"] == "joint":
                candidates = KnobGrid.from_state(candidates)
            policy = cls(
                candidates,
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
        cands = (
            [
                ",".join(f"{knob}={v:g}" for knob, v in self._setting(i).items())
                for i in range(self.num_candidates)
            ]
            if self._grid is not None
            else self._candidates_state()
        )
        return (
            f"MetaPolicy({self._hyperparameter}, knobs={list(self._knobs)}, candidates={cands}, "
            f"rule={self._rule!r}, selector={self._selector!r}, step={self._step}, probs={probs})"
        )


def check_rule_fits(rule: Rule, hyperparameter: str, candidates: np.ndarray) -> None:
    """Refuse a rule that cannot decide over this kind of candidates (see
    ``Rule.candidate_use``): a joint grid has no numeric value per candidate, so it takes
    "indices" rules only, and global ones (no per-prompt joint decisions); an integer knob
    (top_k) cannot take the continuous values between its candidates."""
    use = rule.candidate_use
    if hyperparameter == "joint":
        if rule.row_fields(candidates) or rule.decides_per_context:
            raise ValueError(
                f"{rule.name} is a per-context rule: per-prompt decisions over a joint grid "
                "(hyperparameter='joint') are not supported; use a global rule (TAMPO, Hedge, "
                "EXP3, ...) or a policy over one knob"
            )
        if use == "continuous":
            raise ValueError(
                f"{rule.name} produces continuous values between the candidates, which exist "
                "for one knob only: it cannot run with a joint grid (hyperparameter='joint'); "
                "use a policy over one knob (e.g. hyperparameter='temperature')"
            )
        if use != "indices":
            raise ValueError(
                f"{rule.name} reads the candidate values as numbers, which a joint grid "
                "(hyperparameter='joint') does not have; use an index-only rule (TAMPO, Hedge, "
                "MetaGradient, EXP3, UCB1, ThompsonGaussian)"
            )
    if rule.knobs is not None and hyperparameter not in ("joint", "generic") and (
        hyperparameter not in rule.knobs
    ):
        raise ValueError(
            f"{rule.name} drives {' and '.join(rule.knobs)} only (its update moves the value "
            f"in a direction that means something for that knob alone): it cannot run over "
            f"hyperparameter={hyperparameter!r}"
        )
    if hyperparameter == "top_k" and use == "continuous":
        raise ValueError(
            f"{rule.name} produces continuous values between the candidates, but top_k is an "
            "integer knob (hyperparameter='top_k'); use a rule that decides on the grid"
        )
