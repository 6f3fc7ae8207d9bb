"""The one contract every update rule follows, for the global policy and per-prompt policies alike.

A rule is a small frozen config (validated in ``__post_init__``) plus pure functions of an
explicit state. :class:`metactl.MetaPolicy` owns the state, the step counter, the RNG and the
stored contexts, and calls three hooks on a batch of ``n`` contexts (``n = 1`` and no per-context
rows for the global policy, which is the special case of one context):

* ``init_state(candidates)``: the rule's global state (numpy float64 arrays and floats);
* ``probs(state, ctx)``: the distribution of each context's choice, shape (n, K);
* ``update(state, ctx, batch, feedback)``: ``(new state, new rows, signal)``.

``select(state, ctx, rng)`` defaults to the policy's selector over ``probs``; rules that choose
their value themselves (deterministic controllers, Thompson draws, continuous values) override
it. Per-prompt rules also declare ``row_fields`` (the per-context state), ``prior_rows`` (an
unseen context) and ``global_rows`` (the global state seen as one context).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..selectors import Sample, Selector

__all__ = [
    "DEFAULT_MAX_CONTEXTS",
    "STATE_FIELD",
    "Batch",
    "ContextRows",
    "Contexts",
    "Draw",
    "Feedback",
    "Rule",
    "RuleState",
    "check_counts",
    "check_max_is_zero",
    "nearest_index",
    "state_field",
]

RuleState = dict[str, Any]
"""A rule's state: numpy float64 arrays and Python scalars only (so it serialises to JSON)."""

Feedback = dict[str, Any]
"""The validated feedback a rule reads, by name (``loglik`` (N, K), ``advantages`` (N,),
``rewards`` (N,) arrays, ``reward``/``entropy`` floats, ``vocab_size``/``group_size`` ints)."""

ContextRows = dict[str, np.ndarray]
"""Per-context state rows: field name -> float64 array of shape (m,) or (m, width)."""

DEFAULT_MAX_CONTEXTS = 1_000_000


@dataclass(frozen=True)
class Contexts:
    """What a hook sees besides the rule's state: the policy's candidates, step and selector,
    and the ``n`` contexts it works on (their per-context ``rows`` and ``features``)."""

    candidates: np.ndarray
    step: int
    selector: Selector
    n: int = 1
    rows: ContextRows = field(default_factory=dict)
    features: np.ndarray | None = None


@dataclass(frozen=True)
class Draw:
    """One choice per context, each array of shape (n,): the values to apply, the candidate
    indices, their propensities (or a function computing them on first access, when they cost
    more than the draw) and whether each value is exactly its candidate."""

    values: np.ndarray
    indices: np.ndarray
    probs: np.ndarray | Callable[[], np.ndarray]
    on_grid: np.ndarray


@dataclass(frozen=True)
class Batch:
    """The decisions of one update and how the feedback rows map onto them.

    Attributes:
        n: number of decisions; group_size: rows per decision (``N = n * G``; 0 when the
            feedback has no per-row entry).
        inverse: (n,) the distinct-context position of each decision.
        m: number of distinct contexts; counts: (m,) decisions per distinct context.
        values, indices: (n,) the decisions' values and candidate indices.
        features: (n, d) the decisions' features, or None.
        propensities: (n,) the decisions' probabilities, computed on first access.
    """

    n: int
    group_size: int
    inverse: np.ndarray
    m: int
    counts: np.ndarray
    values: np.ndarray
    indices: np.ndarray
    features: np.ndarray | None
    propensity_of: Callable[[], np.ndarray]

    @property
    def propensities(self) -> np.ndarray:
        return self.propensity_of()

    @property
    def index(self) -> int:
        """The candidate index of a one-decision batch (the global policy's decision)."""
        return int(self.indices[0])

    def per_decision(self, row_values: np.ndarray) -> np.ndarray:
        """Reshape per-row values (N, ...) to (n, G, ...)."""
        return row_values.reshape((self.n, self.group_size, *row_values.shape[1:]))

    def pool(self, per_decision: np.ndarray) -> np.ndarray:
        """Sum per-decision values (n, ...) over the decisions of each distinct context: (m, ...)
        (exactly the values themselves when every context occurs once)."""
        if self.m == self.n:
            out = np.empty_like(per_decision)
            out[self.inverse] = per_decision
            return out
        out = np.zeros((self.m, *per_decision.shape[1:]))
        np.add.at(out, self.inverse, per_decision)
        return out


class Rule:
    """Base class of the update rules and controllers (see the module docstring).

    Declarations (class attributes): ``requires`` (the feedback names ``update`` needs),
    ``zero_advantage_rows_ignored``, ``candidate_use``, ``knobs`` and ``loglik_reduction``;
    per-prompt rules also have the fields ``feature_dim`` and ``max_contexts``.
    """

    requires: ClassVar[tuple[str, ...]] = ()
    # True when the update depends on ``loglik`` only through advantage-weighted terms, so a
    # trajectory with advantage 0 contributes exactly nothing whatever its likelihoods: a trainer
    # may skip scoring such rows and pass any finite ``loglik`` values for them (e.g. zeros).
    zero_advantage_rows_ignored: ClassVar[bool] = False
    # How the rule uses the candidates (checked by MetaPolicy against its hyperparameter):
    # "indices": only K and the chosen index (any candidates work, a joint KnobGrid too);
    # "values": reads the candidate values as numbers (the candidate nearest a configured value)
    # but decides on the grid; "continuous": produces off-grid values between the candidates
    # (schedules, entropy controllers, PTGS). A joint policy takes "indices" rules only, an
    # integer knob (top_k) refuses "continuous" ones. The default is the cautious "values".
    candidate_use: ClassVar[str] = "values"
    # The sampler knobs the rule can drive: None for any knob (the rule ranks candidates without
    # reading a direction into their values); ("temperature",) for rules whose update moves the
    # value in a direction that only means something for a temperature (heat / cool).
    knobs: ClassVar[tuple[str, ...] | None] = None
    # Whether ``select`` uses the policy's selector; rules that draw their own values (PTGS,
    # LinearThompson) refuse any selector other than their default.
    uses_selector: ClassVar[bool] = True
    # Whether the rule decides per prompt group (``select(contexts=...)``) while keeping no
    # per-context state (a mixture dealt over the groups); rules with ``row_fields`` decide
    # per context anyway.
    decides_per_context: ClassVar[bool] = False
    # Per-prompt rules redeclare these as dataclass fields.
    feature_dim: int = 0
    max_contexts: int = DEFAULT_MAX_CONTEXTS

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def loglik_reduction(self) -> str:
        """How the rule expects ``loglik`` rows reduced over tokens: ``"mean"`` (per-token
        mean, TAMPO's paper form) or ``"sum"`` (the whole completion)."""
        return "mean"

    def config(self) -> dict[str, Any]:
        """The rule's settings as a JSON-safe dict (its dataclass fields)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def default_selector(self) -> Selector:
        return Sample()

    def validate_candidates(self, candidates: np.ndarray) -> None:
        """Raise if the rule cannot work on this candidate grid (default: any grid works)."""

    # -- the hooks ---------------------------------------------------------------------------
    def init_state(self, candidates: np.ndarray) -> RuleState:
        raise NotImplementedError

    def probs(self, state: RuleState, ctx: Contexts) -> np.ndarray:
        """The distribution of each context's ``Decision.index``, shape (n, K)."""
        raise NotImplementedError

    def select(self, state: RuleState, ctx: Contexts, rng: np.random.Generator) -> Draw:
        """One choice per context. Default: the policy's selector draws each context's
        candidate from :meth:`probs` (one uniform draw per context, in order)."""
        indices, chosen = ctx.selector.select_rows(self.probs(state, ctx), rng)
        return Draw(ctx.candidates[indices], indices, chosen, np.ones(ctx.n, dtype=bool))

    def update(
        self, state: RuleState, ctx: Contexts, batch: Batch, feedback: Feedback
    ) -> tuple[RuleState, ContextRows, np.ndarray | None]:
        """The new global state, the new rows of the ``ctx.n`` distinct contexts of the batch
        (``{}`` for a rule without per-context state) and the per-candidate signal of this batch
        (or None)."""
        raise NotImplementedError

    # -- per-context state (per-prompt rules) ------------------------------------------------
    def row_fields(self, candidates: np.ndarray) -> dict[str, int]:
        """The per-context state: field name -> width (0 for a scalar per context); ``{}`` for
        a rule that keeps one global state."""
        return {}

    def prior_rows(self, state: RuleState, candidates: np.ndarray, m: int) -> ContextRows:
        """The rows of ``m`` unseen contexts (the rule's documented prior)."""
        return {}

    def global_rows(self, state: RuleState, candidates: np.ndarray) -> ContextRows:
        """The global state seen as one context's rows (``select()`` without contexts)."""
        return {}

    # -- validation ---------------------------------------------------------------------------
    def check_state(self, state: RuleState, candidates: np.ndarray, step: int) -> None:
        """Raise ``ValueError`` naming the field if ``state`` cannot be this rule's state after
        ``step`` updates. ``state`` already has the keys and shapes of :meth:`init_state`,
        every entry finite. Rules with further invariants (counts, bounds) override this."""

    def check_rows(self, rows: ContextRows, candidates: np.ndarray, step: int) -> None:
        """Raise ``ValueError`` naming the field if stored ``rows`` (finite, of the right
        shapes) break the rule's invariants. Default: no further invariant."""

    def global_probs(self, state: RuleState, candidates: np.ndarray, step: int) -> np.ndarray:
        """The global policy's distribution, shape (K,)."""
        ctx = Contexts(
            candidates, step, self.default_selector(), 1, self.global_rows(state, candidates)
        )
        return self.probs(state, ctx)[0]

    def validate_state(self, state: RuleState, candidates: np.ndarray, step: int) -> np.ndarray:
        """:meth:`check_state`, then check that the global probabilities are computed without
        a floating-point overflow or invalid operation and form a distribution (finite,
        non-negative, summing to 1). Used on every load and after every update. Returns those
        probabilities (what :meth:`global_probs` gives for this state, bit for bit)."""
        self.check_state(state, candidates, step)
        try:
            with np.errstate(over="raise", invalid="raise", divide="raise"):
                probs = np.asarray(self.global_probs(state, candidates, step), dtype=np.float64)
        except FloatingPointError as exc:
            raise ValueError(f"{STATE_FIELD}: its probabilities overflow float64 ({exc})") from exc
        k = candidates.shape[0]
        if (
            probs.shape != (k,)
            or not np.all(np.isfinite(probs))
            or np.any(probs < 0)
            or abs(float(probs.sum()) - 1.0) > 1e-9
        ):
            raise ValueError(f"{STATE_FIELD} gives no probability distribution: {probs.tolist()}")
        return probs


STATE_FIELD = "state_dict['rule_state']"

# Counts are stored as float64: below 2**53 every integer, and every increment by 1, is exact.
MAX_COUNT = 2**53


def state_field(key: str) -> str:
    """How errors name one entry of a rule's state."""
    return f"{STATE_FIELD}[{key!r}]"


def check_counts(state: RuleState, key: str, step: int) -> np.ndarray:
    """``state[key]`` holds per-candidate counts: non-negative integers (below ``MAX_COUNT``)
    that sum to ``step``, since every update adds 1 to one count. Returns the counts."""
    counts = np.asarray(state[key])
    name = state_field(key)
    if np.any(counts < 0) or np.any(counts != np.floor(counts)) or np.any(counts >= MAX_COUNT):
        raise ValueError(
            f"{name} must hold non-negative integers below 2**53, got {counts.tolist()}"
        )
    if float(counts.sum()) != step:
        raise ValueError(
            f"{name} sums to {float(counts.sum())} but the policy made {step} update(s): "
            "each update adds one count"
        )
    return counts


def check_max_is_zero(state: RuleState, key: str) -> None:
    """Logits or log-weights are stored shifted so that their maximum is exactly 0 (the same
    softmax, and bounded values)."""
    values = np.asarray(state[key])
    if float(values.max()) != 0.0:
        raise ValueError(
            f"{state_field(key)} must have maximum exactly 0 (stored shifted), got "
            f"{float(values.max())}"
        )


def check_groups(n: int, group_size: int) -> None:
    """``n`` completions form prompt groups of ``group_size >= 2`` consecutive rows."""
    if group_size < 2:
        raise ValueError(
            f"group_size must be >= 2 (a group of one has no variance), got {group_size}"
        )
    if n % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide the batch of {n} completions: groups are "
            "consecutive rows of equal size"
        )


def nearest_index(values: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Index of the candidate nearest to each value (smallest ``|value - candidate|``, ties to
    the lower index), shape (n,), int64."""
    return np.argmin(np.abs(values[:, None] - candidates[None, :]), axis=1).astype(np.int64)


def one_hot(k: int, index: int) -> np.ndarray:
    """The distribution that puts all mass on ``index``, shape (1, K)."""
    out = np.zeros((1, k))
    out[0, index] = 1.0
    return out


def one_value(ctx: Contexts, value: float, index: int | None = None) -> Draw:
    """The draw of a deterministic global controller: ``value`` (default: the candidate at
    ``index``), at the candidate ``index`` (default: the one nearest ``value``), propensity 1."""
    candidates = ctx.candidates
    if index is None:
        index = int(np.argmin(np.abs(candidates - value)))
    return Draw(
        values=np.array([value], dtype=np.float64),
        indices=np.array([index], dtype=np.int64),
        probs=np.ones(1),
        on_grid=np.array([value == candidates[index]]),
    )
