"""The records a meta-policy hands out: one :class:`Decision` per rollout batch, one
:class:`UpdateInfo` per update."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Decision", "UpdateInfo"]


@dataclass(frozen=True)
class Decision:
    """The value chosen for one rollout batch.

    Attributes:
        index: position of the chosen candidate in ``policy.candidates`` (for controllers with a
            continuous output, such as schedules, the nearest candidate).
        value: the value to sample with (and to score the batch with).
        prob: the probability with which the selector picked ``index`` (its propensity).
        step: the policy step this decision belongs to; ``update`` accepts it only at that step.
        policy_id: identifies the policy that made it; another policy refuses it.
    """

    index: int
    value: float
    prob: float
    step: int
    policy_id: str


@dataclass(frozen=True)
class UpdateInfo:
    """What an update did, for logging.

    Attributes:
        step: the step that was updated (the decision's step).
        probs: the meta-policy probabilities after the update, shape (K,).
        candidate_advantages: the per-candidate signal of this batch, shape (K,), for rules that
            compute one (TAMPO, Hedge, MetaGradient: ``a_k = mean_i lhat_k(i) * A_i``); else None.
    """

    step: int
    probs: np.ndarray
    candidate_advantages: np.ndarray | None = None
