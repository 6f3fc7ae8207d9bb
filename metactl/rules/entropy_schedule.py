"""An entropy-schedule controller: the E3 entropy-targeting rule with a target entropy that
follows a schedule over training (e.g. linear annealing, as Entrocraft found to work best),
instead of one fixed ``H*``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .._validation import integer, one_of, positive_scalar
from ..selectors import Greedy, Selector
from . import base
from .base import Draw, Rule
from .controllers import EntropyTarget, Schedule

__all__ = ["EntropySchedule"]


@dataclass(frozen=True)
class EntropySchedule(Rule):
    """E3 entropy targeting toward a scheduled target:
    ``T <- T * (1 + T * ln(H*(t) / H) / (ln V + ln ln V))``.

    ``H*(t)`` moves from ``start_entropy`` to ``end_entropy`` over ``total_steps`` steps and then
    stays at ``end_entropy``, exactly like :class:`Schedule` (``kind="linear"``:
    ``H0 + (H1 - H0) f``; ``"cosine"``: ``H0 + (H1 - H0) (1 - cos(pi f)) / 2``, with
    ``f = min(t / max(total_steps - 1, 1), 1)``; so ``total_steps = 1`` gives ``H0`` at step 0
    and ``H1`` from step 1 on). The batch sampled at step ``t`` is compared with
    ``H*(t)``. Each update is the :class:`EntropyTarget` update with ``target_entropy = H*(t)``
    (the same code, so the same bounds: the temperature stays inside the candidate range).
    With ``start_entropy == end_entropy`` it is :class:`EntropyTarget` bit for bit.

    Args:
        start_entropy: ``H0`` in nats (> 0), the target of the first step.
        end_entropy: ``H1`` in nats (> 0), the target from step ``max(total_steps - 1, 1)`` on.
        total_steps: steps over which the target moves (>= 1).
        initial: the temperature of the first step (inside the candidate range).
        kind: ``"linear"`` (default) or ``"cosine"``.

    base.Feedback: ``entropy`` (mean token entropy of the batch, nats, > 0) and ``vocab_size``
    (>= 3), as for :class:`EntropyTarget`.

    Example:
        >>> import metactl
        >>> rule = metactl.EntropySchedule(start_entropy=2.0, end_entropy=0.5, total_steps=3)
        >>> policy = metactl.MetaPolicy([0.5, 1.0, 1.5], rule)
        >>> [round(rule.target_at(t), 3) for t in range(4)]
        [2.0, 1.25, 0.5, 0.5]
        >>> d = policy.select()
        >>> _ = policy.update(d, entropy=1.0, vocab_size=1000)  # below H*(0) = 2: heat up
        >>> policy.select().value > 1.0
        True
    """

    start_entropy: float
    end_entropy: float
    total_steps: int
    initial: float = 1.0
    kind: str = "linear"
    requires: ClassVar[tuple[str, ...]] = EntropyTarget.requires
    candidate_use: ClassVar[str] = "continuous"
    knobs: ClassVar[tuple[str, ...] | None] = ("temperature",)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "start_entropy", positive_scalar(self.start_entropy, "start_entropy")
        )
        object.__setattr__(self, "end_entropy", positive_scalar(self.end_entropy, "end_entropy"))
        object.__setattr__(self, "total_steps", integer(self.total_steps, "total_steps", minimum=1))
        object.__setattr__(self, "initial", positive_scalar(self.initial, "initial"))
        one_of(self.kind, "kind", ("linear", "cosine"))

    def target_at(self, step: int) -> float:
        """The target entropy ``H*(step)`` in nats."""
        schedule = Schedule(self.kind, self.start_entropy, self.end_entropy, self.total_steps)
        return schedule.at(integer(step, "step", minimum=0))

    def _controller(self, step: int) -> EntropyTarget:
        return EntropyTarget(self.target_at(step), initial=self.initial)

    def default_selector(self) -> Selector:
        return Greedy()

    def validate_candidates(self, candidates: np.ndarray) -> None:
        self._controller(0).validate_candidates(candidates)

    def init_state(self, candidates: np.ndarray) -> base.RuleState:
        return self._controller(0).init_state(candidates)

    def check_state(self, state: base.RuleState, candidates: np.ndarray, step: int) -> None:
        self._controller(step).check_state(state, candidates, step)

    def probs(self, state: base.RuleState, ctx: base.Contexts) -> np.ndarray:
        return self._controller(ctx.step).probs(state, ctx)

    def select(self, state: base.RuleState, ctx: base.Contexts, rng: np.random.Generator) -> Draw:
        return self._controller(ctx.step).select(state, ctx, rng)

    def update(
        self, state: base.RuleState, ctx: base.Contexts, batch: base.Batch, feedback: base.Feedback
    ) -> tuple[base.RuleState, base.ContextRows, None]:
        return self._controller(ctx.step).update(state, ctx, batch, feedback)
