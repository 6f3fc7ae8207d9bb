"""Full-information alternatives to TAMPO: every candidate gets a reward each step.

Both read the same per-candidate signal as TAMPO (``a_k = mean_i lhat_k(i) * A_i``, from the
likelihoods of the batch under every candidate) but keep softmax logits instead of an EMA:

* :class:`Hedge`: exponentiated gradient, ``w <- w + step_size * a``; ``pi = softmax(w)``.
* :class:`MetaGradient`: policy gradient on the logits of ``J(w) = E_{k ~ pi}[a_k]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._validation import one_of, positive_scalar, unit_interval
from ..sparsemax import softmax
from . import base
from .base import check_max_is_zero
from .tampo import NORMALIZERS, CandidateSignalRule

__all__ = ["Hedge", "MetaGradient"]


class _SoftmaxLogits(CandidateSignalRule):
    """A rule whose state is softmax logits (``logits``, shifted so their max is 0): the
    policy is ``softmax(logits)``."""

    def check_state(self, state: base.RuleState, candidates: np.ndarray, step: int) -> None:
        check_max_is_zero(state, "logits")

    def probs(self, state: base.RuleState, ctx: base.Contexts) -> np.ndarray:
        return softmax(state["logits"])[None, :]


@dataclass(frozen=True)
class Hedge(_SoftmaxLogits):
    """Exponentiated-gradient (Hedge) update on softmax logits from TAMPO's signal.

    Args:
        step_size: learning rate ``eta`` of the exponentiated gradient (> 0). The signal ``a_k``
            is a batch mean of advantage times a weight in [0, 1], typically a few hundredths.
        normalizer: ``"sparsemax"`` or ``"softmax"`` across candidates, as in TAMPO.

    Example:
        >>> import metactl, numpy as np
        >>> policy = metactl.MetaPolicy([0.8, 1.2], metactl.Hedge(step_size=1.0), seed=0)
        >>> d = policy.select()
        >>> info = policy.update(d, loglik=np.array([[-1.0, -1.5]]), advantages=np.array([1.0]))
        >>> bool(info.probs[0] > 0.5)
        True
    """

    step_size: float = 1.0
    normalizer: str = "sparsemax"

    def __post_init__(self) -> None:
        object.__setattr__(self, "step_size", positive_scalar(self.step_size, "step_size"))
        one_of(self.normalizer, "normalizer", NORMALIZERS)

    def init_state(self, candidates: np.ndarray) -> base.RuleState:
        return {"logits": np.zeros(candidates.shape[0])}

    def update(
        self, state: base.RuleState, ctx: base.Contexts, batch: base.Batch, feedback: base.Feedback
    ) -> tuple[base.RuleState, base.ContextRows, np.ndarray]:
        signal = self.candidate_signal(feedback)
        logits = state["logits"] + self.step_size * signal
        return {"logits": logits - logits.max()}, {}, signal  # shift: same softmax, bounded


@dataclass(frozen=True)
class MetaGradient(_SoftmaxLogits):
    """REINFORCE-style policy gradient on the meta-policy's softmax logits.

    The objective is the expected candidate advantage ``J(w) = sum_k pi_k(w) a_k``.

    * ``estimator="expected"`` (default) uses the exact gradient, available because every
      candidate is scored each step: ``dJ/dw_k = pi_k (a_k - sum_j pi_j a_j)``.
    * ``estimator="sampled"`` is the textbook score-function estimator from the chosen candidate
      only: ``(a_chosen - b) (onehot(chosen) - pi)``, with ``b`` an EMA baseline of
      ``a_chosen`` (coefficient ``baseline_decay``).

    Args:
        lr: gradient-ascent step size (> 0).
        estimator: ``"expected"`` or ``"sampled"``.
        baseline_decay: in [0, 1), weight of the old baseline (sampled estimator only).
        normalizer: ``"sparsemax"`` or ``"softmax"``, as in TAMPO.

    Example:
        >>> import metactl, numpy as np
        >>> policy = metactl.MetaPolicy([0.8, 1.2], metactl.MetaGradient(lr=5.0), seed=0)
        >>> d = policy.select()
        >>> info = policy.update(d, loglik=np.array([[-1.0, -1.5]]), advantages=np.array([1.0]))
        >>> bool(info.probs[0] > 0.5)
        True
    """

    lr: float = 5.0
    estimator: str = "expected"
    baseline_decay: float = 0.9
    normalizer: str = "sparsemax"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", positive_scalar(self.lr, "lr"))
        one_of(self.estimator, "estimator", ("expected", "sampled"))
        decay = unit_interval(self.baseline_decay, "baseline_decay", high_open=True)
        object.__setattr__(self, "baseline_decay", decay)
        one_of(self.normalizer, "normalizer", NORMALIZERS)

    def init_state(self, candidates: np.ndarray) -> base.RuleState:
        return {"logits": np.zeros(candidates.shape[0]), "baseline": 0.0}

    def update(
        self, state: base.RuleState, ctx: base.Contexts, batch: base.Batch, feedback: base.Feedback
    ) -> tuple[base.RuleState, base.ContextRows, np.ndarray]:
        signal = self.candidate_signal(feedback)
        pi = softmax(state["logits"])
        baseline = float(state["baseline"])
        if self.estimator == "expected":
            grad = pi * (signal - pi @ signal)
        else:
            chosen = signal[batch.index]
            score = -pi
            score[batch.index] += 1.0
            grad = (chosen - baseline) * score
            baseline = self.baseline_decay * baseline + (1.0 - self.baseline_decay) * chosen
        logits = state["logits"] + self.lr * grad
        return {"logits": logits - logits.max(), "baseline": baseline}, {}, signal
