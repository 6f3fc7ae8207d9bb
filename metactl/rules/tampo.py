"""TAMPO: the paper's meta-policy update (arXiv 2602.11779), exactly as in ``spec/tampo.md``.

Per step, from the trajectories the inner loop already sampled:

1. ``lhat(i) = normalizer(l_1(i), ..., l_K(i))`` (sparsemax by default) for each trajectory;
2. ``a_k = mean_i lhat_k(i) * A_i`` over the whole batch;
3. ``Abar <- (1 - alpha) * Abar + alpha * a``;
4. ``pi_k = (Abar_k - min Abar) / (max Abar - min Abar)``, then ``pi <- pi / sum(pi)``;
   uniform when ``max Abar == min Abar`` (the first step, or all advantages zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .._validation import one_of, unit_interval
from ..decision import Decision
from ..selectors import Nucleus, Selector
from ..sparsemax import softmax, sparsemax
from .base import Feedback, Rule, RuleState

__all__ = ["NORMALIZERS", "TAMPO", "candidate_advantages", "minmax_probs"]

NORMALIZERS = ("sparsemax", "softmax")

# Abar values closer together than this (relative to their magnitude) are rounding noise, not a
# ranking: treat the spread as zero. Relative, so the rule stays invariant to the scale of Abar.
_RELATIVE_SPREAD_FLOOR = 64 * np.finfo(np.float64).eps


def candidate_advantages(
    loglik: np.ndarray, advantages: np.ndarray, normalizer: str = "sparsemax"
) -> np.ndarray:
    """The batch's temperature-specific advantages ``a_k = mean_i lhat_k(i) * A_i``, shape (K,).

    A row with ``A_i == 0`` adds exactly 0 to every ``a_k`` whatever its (finite) likelihoods, but
    still counts in the mean's ``N``.

    Example:
        >>> import numpy as np
        >>> ll = np.array([[-1.0, -1.2], [-1.0, -0.4]])
        >>> # sparsemax rows: [0.6, 0.4] and [0.2, 0.8]
        >>> candidate_advantages(ll, np.array([1.0, -1.0])).round(12).tolist()
        [0.2, -0.2]
    """
    normalize = sparsemax if normalizer == "sparsemax" else softmax
    weights = normalize(loglik, axis=1)
    return np.mean(weights * advantages[:, None], axis=0)


def minmax_probs(ema: np.ndarray) -> np.ndarray:
    """Min-max normalise, then renormalise to sum 1; uniform when all entries are equal.

    Example:
        >>> minmax_probs(np.array([0.0, 1.0, 3.0])).tolist()
        [0.0, 0.25, 0.75]
    """
    spread = float(np.max(ema) - np.min(ema))
    if spread <= _RELATIVE_SPREAD_FLOOR * float(np.max(np.abs(ema))) or spread == 0.0:
        return np.full(ema.shape[0], 1.0 / ema.shape[0])
    scaled = (ema - np.min(ema)) / spread
    return scaled / scaled.sum()


@dataclass(frozen=True)
class TAMPO(Rule):
    """The TAMPO meta-policy rule: EMA of likelihood-weighted advantages, min-max normalised.

    Args:
        alpha: EMA coefficient in (0, 1] (paper: 0.05; ablated 0.01 / 0.10).
        normalizer: ``"sparsemax"`` (paper) or ``"softmax"`` across candidates.

    Feedback: ``loglik`` (N, K) and ``advantages`` (N,). Default selector: ``Nucleus(0.7)``.

    Example:
        >>> import metactl, numpy as np
        >>> policy = metactl.MetaPolicy([0.8, 1.0, 1.2], metactl.TAMPO(alpha=0.5), seed=0)
        >>> d = policy.select()
        >>> ll = np.array([[-1.0, -0.9, -1.1], [-1.3, -1.0, -0.8]])
        >>> policy.update(d, loglik=ll, advantages=np.array([1.0, -1.0])).probs.round(3).tolist()
        [0.6, 0.4, 0.0]
    """

    alpha: float = 0.05
    normalizer: str = "sparsemax"
    requires: ClassVar[tuple[str, ...]] = ("loglik", "advantages")
    zero_advantage_rows_ignored: ClassVar[bool] = True  # loglik enters only via a_k

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", unit_interval(self.alpha, "alpha", low_open=True))
        one_of(self.normalizer, "normalizer", NORMALIZERS)

    def default_selector(self) -> Selector:
        return Nucleus(top_p=0.7)

    def init_state(self, candidates: np.ndarray) -> RuleState:
        return {"ema": np.zeros(candidates.shape[0])}

    def probs(self, state: RuleState, candidates: np.ndarray, step: int) -> np.ndarray:
        return minmax_probs(state["ema"])

    def update(
        self, state: RuleState, candidates: np.ndarray, decision: Decision, feedback: Feedback
    ) -> tuple[RuleState, np.ndarray]:
        signal = candidate_advantages(feedback["loglik"], feedback["advantages"], self.normalizer)
        ema = (1.0 - self.alpha) * state["ema"] + self.alpha * signal
        return {"ema": ema}, signal
