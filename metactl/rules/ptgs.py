"""PTGS, posterior-tempered group sampling ("Sharpening Tax in Post-Training", 2026): a
temperature per prompt from a Thompson draw of that prompt's success rate.

Exactly the rule of ``research/controllers-2026.md`` (section 3), for each context (prompt) x:

* discounted counts ``s_x <- gamma s_x + successes``, ``f_x <- gamma f_x + failures``, fed by
  every rollout group of x (all-fail groups included);
* the posterior ``Beta(2 p~ + s_x, 2 (1 - p~) + f_x)``: a prior of mass 2 centred on the
  current pivot ``p~``;
* a Thompson draw ``p^`` from it (the policy's generator, one ``beta`` draw per context in
  the order of ``contexts``);
* ``T_x = t_ref * tau ** h`` with ``h = (p~ - p^) / p~`` if ``p^ <= p~`` else
  ``(p~ - p^) / (1 - p~)``: ``T(0) = tau t_ref``, ``T(p~) = t_ref``, ``T(1) = t_ref / tau``
  (log T piecewise linear in ``p^``: easy prompts cool, hard prompts heat);
* the pivot ramps geometrically, ``p~(u) = pivot_start (pivot_end / pivot_start) ** u`` with
  ``u = step / total_steps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy.special import betainc

from .._validation import integer, positive_scalar, unit_interval
from ..knobs import TEMPERATURE_RANGE
from ..selectors import Greedy, Selector
from . import base
from .base import DEFAULT_MAX_CONTEXTS, Draw, Rule, nearest_index, state_field

__all__ = ["PTGS", "check_unit_rewards"]


def check_unit_rewards(rewards: np.ndarray) -> None:
    """PTGS-style counts need rewards in [0, 1] (1 = success; a fractional reward r adds r
    successes and 1 - r failures)."""
    bad = (rewards < 0) | (rewards > 1)
    if np.any(bad):
        raise ValueError(
            f"rewards must lie in [0, 1] (1 = success), got {int(bad.sum())} value(s) outside, "
            f"e.g. {float(rewards[bad][0])}"
        )


def check_pass_counts(state: base.RuleState) -> None:
    """The global discounted pass counts of a state are non-negative."""
    for key in ("successes", "failures"):
        if float(state[key]) < 0:
            raise ValueError(f"{state_field(key)} must be >= 0, got {state[key]}")


class PassCountRows:
    """Per-context rows of discounted pass counts (``successes``, ``failures``), shared by the
    rules that estimate a prompt's pass rate (PTGS, LinearThompson): an unseen context has none,
    and the global state's counts form a one-row table."""

    def prior_rows(self, state: base.RuleState, candidates: np.ndarray, m: int) -> base.ContextRows:
        return {"successes": np.zeros(m), "failures": np.zeros(m)}

    def global_rows(self, state: base.RuleState, candidates: np.ndarray) -> base.ContextRows:
        return {
            "successes": np.array([float(state["successes"])]),
            "failures": np.array([float(state["failures"])]),
        }

    def check_rows(self, rows: base.ContextRows, candidates: np.ndarray, step: int) -> None:
        for key in ("successes", "failures"):
            if np.any(rows[key] < 0):
                raise ValueError(f"state_dict['contexts']['rows'][{key!r}] must be >= 0")


@dataclass(frozen=True)
class PTGS(PassCountRows, Rule):
    """Posterior-tempered group sampling: a temperature per context (see the module docstring).

    Args:
        tau: the temperature range factor, ``> 1`` (note: 1.2 to 1.5); temperatures lie in
            ``[t_ref / tau, tau t_ref]``.
        gamma: discount of the per-context counts per update of that context, in (0, 1].
        t_ref: the reference temperature (the temperature at ``p^ = p~``), ``> 0``.
        pivot_start, pivot_end: the pivot at the start (``u = 0``) and the end (``u = 1``) of
            training, in (0, 1).
        total_steps: the length of training in updates, for ``u = step / total_steps``; after
            ``total_steps`` updates ``u`` stays 1 (the pivot stays at ``pivot_end``).
            ``None`` (default): no schedule, the pivot stays at ``pivot_start``.
        max_contexts: the most contexts stored; beyond, the least recently updated ones are
            evicted (see :mod:`metactl.contexts`).

    Unseen (or evicted) contexts have zero counts: the prior ``Beta(2 p~, 2 (1 - p~))``. The
    global policy (``select()`` without contexts) is one context whose counts pool every row
    of every update.

    Values are continuous: ``Decision.on_grid`` is False, ``Decision.index`` is the nearest
    candidate and ``Decision.prob`` the posterior probability that the draw falls nearest to
    that candidate (the candidate grid's cells mapped back through the tempering rule);
    ``probs`` gives those cell probabilities for the global context. base.Feedback: ``rewards``
    (N,) in [0, 1], G per decision. The selector is not used.

    Example:
        >>> import metactl
        >>> policy = metactl.ptgs(seed=0)
        >>> batch = policy.select(contexts=[7, 8])
        >>> bool(all(1 / 1.5 <= t <= 1.5 for t in batch.values))
        True
        >>> info = policy.update(batch, rewards=[1, 1, 1, 1, 0, 0, 0, 0])   # G = 4
        >>> policy.num_contexts
        2
    """

    tau: float = 1.5
    gamma: float = 0.95
    t_ref: float = 1.0
    pivot_start: float = 0.25
    pivot_end: float = 0.5
    total_steps: int | None = None
    max_contexts: int = DEFAULT_MAX_CONTEXTS
    requires: ClassVar[tuple[str, ...]] = ("rewards",)
    candidate_use: ClassVar[str] = "continuous"
    knobs: ClassVar[tuple[str, ...] | None] = ("temperature",)
    uses_selector: ClassVar[bool] = False

    def __post_init__(self) -> None:
        tau = positive_scalar(self.tau, "tau")
        if tau <= 1.0:
            raise ValueError(f"tau must be > 1 (the range is [t_ref / tau, tau t_ref]), got {tau}")
        object.__setattr__(self, "tau", tau)
        object.__setattr__(self, "gamma", unit_interval(self.gamma, "gamma", low_open=True))
        object.__setattr__(self, "t_ref", positive_scalar(self.t_ref, "t_ref"))
        for name in ("pivot_start", "pivot_end"):
            value = unit_interval(getattr(self, name), name, low_open=True, high_open=True)
            object.__setattr__(self, name, value)
        if self.total_steps is not None:
            object.__setattr__(
                self, "total_steps", integer(self.total_steps, "total_steps", minimum=1)
            )
        object.__setattr__(
            self, "max_contexts", integer(self.max_contexts, "max_contexts", minimum=1)
        )
        low, high = TEMPERATURE_RANGE
        if not low <= self.t_ref / self.tau <= self.t_ref * self.tau <= high:
            raise ValueError(
                f"PTGS's temperatures [t_ref / tau, tau t_ref] = [{self.t_ref / self.tau:g}, "
                f"{self.t_ref * self.tau:g}] must lie inside [{low:g}, {high:g}]: use a smaller "
                "tau or another t_ref"
            )

    # -- the rule's math ----------------------------------------------------------------------
    def pivot(self, step: int) -> float:
        """``p~(u) = pivot_start (pivot_end / pivot_start) ** u``, ``u = min(step /
        total_steps, 1)`` (``u = 0`` when ``total_steps`` is None)."""
        if self.total_steps is None:
            return self.pivot_start
        u = min(step / self.total_steps, 1.0)
        return self.pivot_start * (self.pivot_end / self.pivot_start) ** u

    @property
    def bounds(self) -> tuple[float, float]:
        """``(t_ref / tau, tau t_ref)``: every temperature lies in this closed interval."""
        return self.t_ref / self.tau, self.t_ref * self.tau

    def temperature(self, p_hat: np.ndarray, pivot: float) -> np.ndarray:
        """The tempering rule ``T = t_ref * tau ** h`` for draws ``p_hat`` in [0, 1]."""
        h = np.where(p_hat <= pivot, (pivot - p_hat) / pivot, (pivot - p_hat) / (1.0 - pivot))
        low, high = self.bounds
        # tau ** +-1 may round one ulp past t_ref * tau or t_ref / tau: keep the documented range
        return np.minimum(np.maximum(self.t_ref * self.tau**h, low), high)

    def _success_rate_of(self, temperatures: np.ndarray, pivot: float) -> np.ndarray:
        """The inverse of :meth:`temperature` (``p^`` giving each temperature; 0 above the
        range, 1 below it)."""
        h = np.clip(np.log(temperatures / self.t_ref) / math.log(self.tau), -1.0, 1.0)
        return np.where(h >= 0, pivot * (1.0 - h), pivot - h * (1.0 - pivot))

    def _posterior(self, rows: base.ContextRows, step: int) -> tuple[np.ndarray, np.ndarray, float]:
        pivot = self.pivot(step)
        return 2.0 * pivot + rows["successes"], 2.0 * (1.0 - pivot) + rows["failures"], pivot

    def _edges(self, candidates: np.ndarray, pivot: float) -> tuple[np.ndarray, np.ndarray]:
        """The cells of the candidates (sorted, each value's nearest candidate) mapped to
        success rates: ``p_edge`` (K + 1,) with ``T >= edge_j  <=>  p^ <= p_edge[j]`` (edge 0 is
        -inf, so 1.0; edge K is +inf, so 0.0), and each candidate's rank in sorted order."""
        order = np.argsort(candidates, kind="stable")
        ordered = candidates[order]
        midpoints = 0.5 * (ordered[:-1] + ordered[1:])
        p_edge = np.concatenate([[1.0], self._success_rate_of(midpoints, pivot), [0.0]])
        rank = np.empty_like(order)
        rank[order] = np.arange(order.shape[0])
        return p_edge, rank

    def _cell_probs(
        self, a: np.ndarray, b: np.ndarray, candidates: np.ndarray, pivot: float
    ) -> np.ndarray:
        """``P(index = k)`` for every context and candidate, (n, K): sorted cell j holds
        ``T`` in ``[edge_j, edge_{j+1})``, so its mass is ``F(p_edge[j]) - F(p_edge[j+1])``
        with ``F`` the posterior's CDF (the masses telescope to 1)."""
        p_edge, rank = self._edges(candidates, pivot)
        cdf = betainc(a[:, None], b[:, None], p_edge[None, :])
        cells = np.maximum(cdf[:, :-1] - cdf[:, 1:], 0.0)
        return cells[:, rank]

    # -- the rule contract ---------------------------------------------------------------------
    def default_selector(self) -> Selector:
        return Greedy()  # not used: PTGS draws its own values

    def validate_candidates(self, candidates: np.ndarray) -> None:
        if np.any(candidates <= 0):
            raise ValueError(
                f"PTGS needs temperatures > 0 as candidates, got {candidates.tolist()}"
            )
        low, high = self.bounds
        if np.any(candidates < low) or np.any(candidates > high):
            raise ValueError(
                f"PTGS draws temperatures in [t_ref / tau, tau t_ref] = [{low:g}, {high:g}]; the "
                f"candidates name the nearest value, so they must lie in that range too, got "
                f"{candidates.tolist()} (metactl.ptgs_candidates(tau, t_ref) makes a grid)"
            )

    def row_fields(self, candidates: np.ndarray) -> dict[str, int]:
        return {"successes": 0, "failures": 0}

    def init_state(self, candidates: np.ndarray) -> base.RuleState:
        return {"successes": 0.0, "failures": 0.0}

    def check_state(self, state: base.RuleState, candidates: np.ndarray, step: int) -> None:
        check_pass_counts(state)

    def probs(self, state: base.RuleState, ctx: base.Contexts) -> np.ndarray:
        a, b, pivot = self._posterior(ctx.rows, ctx.step)
        return self._cell_probs(a, b, ctx.candidates, pivot)

    def select(self, state: base.RuleState, ctx: base.Contexts, rng: np.random.Generator) -> Draw:
        candidates = ctx.candidates
        a, b, pivot = self._posterior(ctx.rows, ctx.step)
        p_hat = rng.beta(a, b)
        values = self.temperature(p_hat, pivot)
        indices = nearest_index(values, candidates)
        p_edge, rank = self._edges(candidates, pivot)
        r = rank[indices]

        def probs() -> np.ndarray:  # on first access: two incomplete-beta calls per context
            return np.maximum(betainc(a, b, p_edge[r]) - betainc(a, b, p_edge[r + 1]), 0.0)

        return Draw(values, indices, probs, values == candidates[indices])

    def update(
        self, state: base.RuleState, ctx: base.Contexts, batch: base.Batch, feedback: base.Feedback
    ) -> tuple[base.RuleState, base.ContextRows, None]:
        rows, groups = ctx.rows, batch
        rewards = feedback["rewards"]
        check_unit_rewards(rewards)
        per_decision = groups.per_decision(rewards)
        successes = per_decision.sum(axis=1)
        failures = (1.0 - per_decision).sum(axis=1)
        new_rows = {
            "successes": self.gamma * rows["successes"] + groups.pool(successes),
            "failures": self.gamma * rows["failures"] + groups.pool(failures),
        }
        new_state = {
            "successes": self.gamma * float(state["successes"]) + float(successes.sum()),
            "failures": self.gamma * float(state["failures"]) + float(failures.sum()),
        }
        return new_state, new_rows, None
