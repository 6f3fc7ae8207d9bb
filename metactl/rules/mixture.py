"""Temperature mixtures: every prompt group of a batch at its own value, the values spread over
the candidates by one global distribution (no per-prompt state).

* :class:`Spread`: the uniform mixture, a baseline that learns nothing: each step the groups
  are dealt evenly over the candidates.
* :class:`Mixture`: a learned mixture, exponential weights over the candidates fed by every
  candidate's groups each step (every candidate with groups is observed, unlike a bandit that
  plays one value per batch):
  ``p = (1 - floor) softmax(w) + floor / K`` and ``w_k += step_size * r_k``, where
  ``r_k = sum_{g at k} s_g / (n p_k)`` is the importance-weighted estimate of the mean signal
  ``s`` of a group sampled at candidate ``k`` (``n`` groups in the batch, ``p_k`` the
  propensity the groups were dealt with). The signal ``s_g`` is, by ``signal``:

  - ``"mixed"`` (default): 1 if the group's rewards are not all equal, else 0. A group whose
    completions all get the same reward has zero GRPO advantage and teaches nothing, so this is
    the share of the batch that carries gradient, a dimensionless signal that needs no target;
  - ``"pass_rate"``: the group's mean reward (rewards in [0, 1]);
  - ``"variance"``: ``4 p (1 - p)`` with ``p`` the group's mean reward (rewards in [0, 1]):
    1 at an even split, ``4 (G - 1) / G^2`` for one failure in ``G``, 0 for a settled group, so
    a nearly settled group counts little.

  With ``relative=True`` every estimate is divided by the batch's mean signal before the
  step, so the update is scale-free in the signal's level (a testbed where few groups are
  mixed at any value moves as fast as one where most are).

Dealing (both rules): systematic sampling. With ``n`` groups and probabilities ``p``, one
uniform ``u`` places the points ``(u + i) / n`` (``i = 0..n-1``) on the cumulative distribution,
so candidate ``k`` gets ``floor(n p_k)`` or ``ceil(n p_k)`` groups; a random permutation then
assigns the points to the groups, so each group's value is candidate ``k`` with probability
``p_k`` exactly (its propensity). Compared with drawing each group independently this keeps
the batch's mix close to ``p`` at every step.

Mixing temperatures within a batch follows Wu, Mirhoseini and Tambe (arXiv 2510.02611:
different temperatures solve different problems) and the ``temperature_spread`` practice of
giving rollouts different temperatures; the exponential-weights update is Hedge's (Freund and
Schapire, 1997) with EXP3's importance weighting and floor (Auer et al., 2002).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .._validation import finite_scalar, integer, one_of, positive_scalar, unit_interval
from ..sparsemax import softmax
from . import base
from .base import Draw, Rule, check_max_is_zero, nearest_index, one_hot

__all__ = ["SIGNALS", "Mixture", "Spread", "deal", "group_signal"]

#: The per-group signals :class:`Mixture` can learn from.
SIGNALS: tuple[str, ...] = ("mixed", "pass_rate", "variance")


def deal(probs: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Candidate indices for ``n`` groups by systematic sampling from ``probs`` (K,), then a
    random permutation: candidate ``k`` gets ``floor(n p_k)`` or ``ceil(n p_k)`` groups and each
    group is candidate ``k`` with probability ``p_k``. Draws one uniform and one permutation.

    Example:
        >>> import numpy as np
        >>> rng = np.random.Generator(np.random.PCG64(0))
        >>> np.bincount(deal(np.array([0.5, 0.25, 0.25]), 8, rng), minlength=3).tolist()
        [4, 2, 2]
    """
    cdf = np.cumsum(probs)
    cdf[-1] = 1.0  # rounding must not leave a point above the last candidate
    points = (rng.random() + np.arange(n)) / n
    indices = np.searchsorted(cdf, points, side="right").astype(np.int64)
    return rng.permutation(indices)


def group_signal(rewards: np.ndarray, signal: str) -> np.ndarray:
    """The per-group signal of rewards shaped (n, G): ``"mixed"``, 1.0 where a group's rewards
    are not all equal (else 0.0); ``"pass_rate"``, the group's mean reward ``p``;
    ``"variance"``, ``4 p (1 - p)``.

    Example:
        >>> import numpy as np
        >>> group_signal(np.array([[1.0, 0.0], [1.0, 1.0]]), "mixed").tolist()
        [1.0, 0.0]
    """
    if signal == "mixed":
        return (rewards.max(axis=1) > rewards.min(axis=1)).astype(np.float64)
    mean = rewards.mean(axis=1)
    if signal == "variance":
        return 4.0 * mean * (1.0 - mean)
    return mean


class _Dealt(Rule):
    """A rule that deals one global distribution over the prompt groups of a batch: it decides
    per context (``select(contexts=...)``) but keeps no per-context state."""

    decides_per_context: ClassVar[bool] = True
    candidate_use: ClassVar[str] = "indices"
    uses_selector: ClassVar[bool] = False

    def select(self, state: base.RuleState, ctx: base.Contexts, rng: np.random.Generator) -> Draw:
        probs = self.probs(state, ctx)[0]
        indices = deal(probs, ctx.n, rng)
        return Draw(ctx.candidates[indices], indices, probs[indices], np.ones(ctx.n, dtype=bool))


@dataclass(frozen=True)
class Spread(_Dealt):
    """The uniform mixture: each step the prompt groups are dealt evenly over the candidates
    (systematic sampling from the uniform distribution, see :func:`deal`). Learns nothing and
    needs no feedback; a baseline for the learned :class:`Mixture`.

    With ``then`` and ``after`` (both or neither), the mixture plays only for the steps
    ``0 .. after - 1``; from step ``after`` on every group gets the candidate ``then`` (one of
    the candidates), with propensity 1 and no random draw: a uniform exploration phase
    followed by a chosen fixed value (e.g. the best fixed value of a comparison, as an oracle
    bound). Without them the rule's configuration and state are those of the plain mixture.

    Example:
        >>> import metactl
        >>> policy = metactl.MetaPolicy([0.8, 1.0, 1.2], metactl.Spread(), seed=0)
        >>> sorted(policy.select(contexts=[0, 1, 2, 3, 4, 5]).values.tolist())
        [0.8, 0.8, 1.0, 1.0, 1.2, 1.2]
        >>> then = metactl.MetaPolicy([0.8, 1.0, 1.2], metactl.Spread(then=1.2, after=1), seed=0)
        >>> _ = then.update(then.select(contexts=[0, 1, 2]))          # step 0: the mixture
        >>> then.select(contexts=[0, 1, 2]).values.tolist()           # step 1 on: 1.2 only
        [1.2, 1.2, 1.2]
    """

    then: float | None = None
    after: int | None = None
    requires: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if (self.then is None) != (self.after is None):
            raise ValueError(
                f"then and after must be given together (the value and the step it starts "
                f"at), got then={self.then!r}, after={self.after!r}"
            )
        if self.then is not None:
            object.__setattr__(self, "then", finite_scalar(self.then, "then"))
            object.__setattr__(self, "after", integer(self.after, "after", minimum=0))

    def config(self) -> dict[str, Any]:
        """The settings; ``{}`` for the plain mixture (its configuration, and so its state
        dicts, are those of a `Spread` without ``then``)."""
        return {} if self.then is None else {"then": self.then, "after": self.after}

    def validate_candidates(self, candidates: np.ndarray) -> None:
        if self.then is not None and not np.any(
            np.isclose(candidates, self.then, rtol=1e-12, atol=0.0)
        ):
            raise ValueError(
                f"then={self.then} is not one of the candidates {candidates.tolist()}"
            )

    def _switched(self, step: int) -> bool:
        return self.after is not None and step >= self.after

    def init_state(self, candidates: np.ndarray) -> base.RuleState:
        return {}

    def probs(self, state: base.RuleState, ctx: base.Contexts) -> np.ndarray:
        k = ctx.candidates.shape[0]
        if self._switched(ctx.step):
            assert self.then is not None
            return one_hot(k, int(nearest_index(np.array([self.then]), ctx.candidates)[0]))
        return np.full((1, k), 1.0 / k)

    def select(self, state: base.RuleState, ctx: base.Contexts, rng: np.random.Generator) -> Draw:
        if not self._switched(ctx.step):
            return super().select(state, ctx, rng)
        assert self.then is not None
        index = int(nearest_index(np.array([self.then]), ctx.candidates)[0])
        indices = np.full(ctx.n, index, dtype=np.int64)
        return Draw(ctx.candidates[indices], indices, np.ones(ctx.n), np.ones(ctx.n, dtype=bool))

    def update(
        self, state: base.RuleState, ctx: base.Contexts, batch: base.Batch, feedback: base.Feedback
    ) -> tuple[base.RuleState, base.ContextRows, None]:
        return {}, {}, None


@dataclass(frozen=True)
class Mixture(_Dealt):
    """A learned temperature mixture (see the module docstring): the groups of each batch are
    dealt over the candidates with ``p = (1 - floor) softmax(w) + floor / K``, and after the
    batch ``w_k += step_size * r_k`` with ``r_k`` the importance-weighted mean signal of the
    groups sampled at candidate ``k``.

    Feedback: ``rewards`` (N,), ``G`` consecutive rows per decision (the per-prompt contract of
    :mod:`metactl.contexts`), in [0, 1] for ``signal="pass_rate"``.

    Args:
        floor: the share of the batch always dealt uniformly, in (0, 1] (keeps every candidate
            observed and bounds the importance weights by ``K / floor``).
        step_size: ``eta`` (> 0). With the signal in [0, 1], one step moves the log-odds of two
            candidates by at most ``step_size`` times the difference of their estimates.
        signal: ``"mixed"`` (default), ``"pass_rate"`` or ``"variance"`` (module docstring).
        relative: divide the estimates by the batch's mean signal before the step (no step
            when every group's signal is 0).

    The defaults (``floor=0.1``, ``step_size=1.0``, ``signal="mixed"``, ``relative=False``)
    are untuned: EXP3's floor and a unit step.

    Example:
        >>> import numpy as np, metactl
        >>> policy = metactl.MetaPolicy([0.8, 1.2], metactl.Mixture(), seed=0)
        >>> decisions = policy.select(contexts=[0, 1, 2, 3])
        >>> hot = (decisions.values == 1.2)[:, None]                 # G = 2 rows per group
        >>> rewards = np.where(hot, [1.0, 0.0], [1.0, 1.0])
        >>> info = policy.update(decisions, rewards=rewards.ravel())
        >>> bool(info.probs[1] > info.probs[0])                 # 1.2's groups were mixed
        True
    """

    floor: float = 0.1
    step_size: float = 1.0
    signal: str = "mixed"
    relative: bool = False
    requires: ClassVar[tuple[str, ...]] = ("rewards",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "floor", unit_interval(self.floor, "floor", low_open=True))
        object.__setattr__(self, "step_size", positive_scalar(self.step_size, "step_size"))
        object.__setattr__(self, "signal", one_of(self.signal, "signal", SIGNALS))
        if not isinstance(self.relative, (bool, np.bool_)):
            raise TypeError(f"relative must be a bool, got {type(self.relative).__name__}")
        object.__setattr__(self, "relative", bool(self.relative))

    def config(self) -> dict[str, Any]:
        """The settings; ``relative`` only when it is set (a state saved without the option
        loads into the rule with ``relative=False``)."""
        settings = super().config()
        if not self.relative:
            del settings["relative"]
        return settings

    def init_state(self, candidates: np.ndarray) -> base.RuleState:
        return {"log_weights": np.zeros(candidates.shape[0])}

    def check_state(self, state: base.RuleState, candidates: np.ndarray, step: int) -> None:
        check_max_is_zero(state, "log_weights")

    def probs(self, state: base.RuleState, ctx: base.Contexts) -> np.ndarray:
        k = ctx.candidates.shape[0]
        return ((1.0 - self.floor) * softmax(state["log_weights"]) + self.floor / k)[None, :]

    def update(
        self, state: base.RuleState, ctx: base.Contexts, batch: base.Batch, feedback: base.Feedback
    ) -> tuple[base.RuleState, base.ContextRows, np.ndarray]:
        rewards = feedback["rewards"]
        if self.signal != "mixed" and np.any((rewards < 0) | (rewards > 1)):
            raise ValueError(
                f"rewards must lie in [0, 1] for signal={self.signal!r} (the mean reward of a "
                "group is its pass rate); use signal='mixed' for other rewards"
            )
        base.check_groups(rewards.shape[0], batch.group_size)
        per_group = group_signal(batch.per_decision(rewards), self.signal)
        k = ctx.candidates.shape[0]
        weighted = per_group / (batch.n * batch.propensities)
        estimate: np.ndarray = np.bincount(batch.indices, weights=weighted, minlength=k)
        if self.relative:
            level = float(per_group.mean())
            estimate = estimate / level if level > 0.0 else np.zeros(k)
        log_weights = state["log_weights"] + self.step_size * estimate
        return {"log_weights": log_weights - log_weights.max()}, {}, estimate
