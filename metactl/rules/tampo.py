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
from typing import Any, ClassVar

import numpy as np

from .._validation import one_of, positive_scalar, unit_interval
from ..selectors import Nucleus, Selector
from ..sparsemax import softmax, sparsemax_rows
from . import base
from .base import Rule

__all__ = [
    "LIKELIHOOD_NORMALIZATIONS",
    "NORMALIZERS",
    "STANDARDIZATIONS",
    "TAMPO",
    "CandidateSignalRule",
    "candidate_advantages",
    "minmax_probs",
    "standardized_signal",
]

NORMALIZERS = ("sparsemax", "softmax")
# Variants (not in the paper): how each step's signal is scaled before the EMA, and which
# trajectory log-likelihoods the rule expects in ``loglik``.
STANDARDIZATIONS = ("none", "std", "max_abs")
LIKELIHOOD_NORMALIZATIONS = ("mean", "sum")

# Abar values closer together than this (relative to their magnitude) are rounding noise, not a
# ranking: treat the spread as zero. Relative, so the rule stays invariant to the scale of Abar.
_RELATIVE_SPREAD_FLOOR = 64 * np.finfo(np.float64).eps


def candidate_advantages(
    loglik: np.ndarray,
    advantages: np.ndarray,
    normalizer: str = "sparsemax",
    *,
    tau: float = 1.0,
) -> np.ndarray:
    """The batch's temperature-specific advantages ``a_k = mean_i lhat_k(i) * A_i``, shape (K,).

    ``lhat(i) = normalizer(l(i) / tau)``; ``tau = 1`` is the paper (``l / 1.0`` is exact, so
    the result is bit-identical to no scaling). A row with ``A_i == 0`` adds exactly 0 to every
    ``a_k`` whatever its (finite) likelihoods, but still counts in the mean's ``N``. Overflow-
    safe: when the batch sum would overflow float64, the advantages are scaled by a power of two
    before the mean (ValueError only if the mean itself lies beyond the float64 range).

    Example:
        >>> import numpy as np
        >>> ll = np.array([[-1.0, -1.2], [-1.0, -0.4]])
        >>> # sparsemax rows: [0.6, 0.4] and [0.2, 0.8]
        >>> candidate_advantages(ll, np.array([1.0, -1.0])).round(12).tolist()
        [0.2, -0.2]
    """
    tau = positive_scalar(tau, "tau")
    if tau != 1.0:
        with np.errstate(over="ignore"):
            scaled = loglik / tau
        if not np.all(np.isfinite(scaled)):
            raise ValueError(
                f"loglik / tau overflows float64 (tau = {tau}, largest |loglik| = "
                f"{float(np.max(np.abs(loglik)))}): use a larger tau"
            )
        loglik = scaled
    # the products overwrite the weights (a new array, in the layout the product would have):
    # one large array fewer, the same bits
    weighted = normalized_rows(loglik, normalizer)
    with np.errstate(over="ignore", invalid="ignore"):  # checked just below
        signal = np.mean(np.multiply(weighted, advantages[:, None], out=weighted), axis=0)
    if np.all(np.isfinite(signal)):
        return signal
    weights = normalized_rows(loglik, normalizer)
    # The batch sum overflowed float64 (advantages near 1e308 / N). Scale the advantages by a
    # power of two first, so that every term is below 1 in magnitude, and scale the mean back:
    # exact up to the rounding of the (negligible) entries that underflow. Only this fallback
    # is scaled, so ordinary batches keep their bits.
    _, exponent = np.frexp(np.max(np.abs(advantages)))
    with np.errstate(over="ignore", invalid="ignore"):
        scaled_mean = np.mean(weights * np.ldexp(advantages, -exponent)[:, None], axis=0)
        signal = np.ldexp(scaled_mean, exponent)
    if not np.all(np.isfinite(signal)):  # only a mean at the very edge of float64 gets here
        raise ValueError(
            "the candidate advantages a_k = mean_i lhat_k(i) A_i exceed the float64 range "
            f"(largest |advantage| = {float(np.max(np.abs(advantages)))}); rescale advantages"
        )
    return signal


def normalized_rows(loglik: np.ndarray, normalizer: str) -> np.ndarray:
    """``lhat``: each row of ``loglik`` (N, K) normalised across candidates, a new array."""
    if normalizer == "sparsemax":
        return sparsemax_rows(loglik)  # no validating copy of an already validated array
    return softmax(loglik, axis=1)


def minmax_probs(ema: np.ndarray) -> np.ndarray:
    """Min-max normalise, then renormalise to sum 1; uniform when all entries are equal.

    Overflow-safe: every finite ``ema`` gives finite probabilities summing to 1 (also one
    whose ``max - min`` exceeds the float64 range, such as ``[1e308, -1e308]``).

    Example:
        >>> minmax_probs(np.array([0.0, 1.0, 3.0])).tolist()
        [0.0, 0.25, 0.75]
    """
    with np.errstate(over="ignore"):
        spread = float(np.max(ema) - np.min(ema))
    if not np.isfinite(spread):
        # max - min exceeds the float64 range (entries of opposite signs near 1e308): halving
        # every entry is exact and leaves every ratio below unchanged, so any finite EMA gives
        # a distribution. Ordinary EMAs never take this branch and keep their bits.
        ema = ema * 0.5
        spread = float(np.max(ema) - np.min(ema))
    if spread <= _RELATIVE_SPREAD_FLOOR * float(np.max(np.abs(ema))) or spread == 0.0:
        return np.full(ema.shape[0], 1.0 / ema.shape[0])
    scaled = (ema - np.min(ema)) / spread
    return scaled / scaled.sum()


def standardized_signal(signal: np.ndarray, how: str) -> np.ndarray | None:
    """``signal / std_k(signal)`` (``how="std"``) or ``signal / max_k |signal_k|``
    (``"max_abs"``); None when that spread is zero up to rounding (see :class:`TAMPO`).

    Example:
        >>> standardized_signal(np.array([0.0, 2.0, 4.0]), "max_abs").tolist()
        [0.0, 0.5, 1.0]
        >>> standardized_signal(np.zeros(3), "std") is None
        True
    """
    one_of(how, "how", ("std", "max_abs"))
    magnitude = float(np.max(np.abs(signal)))
    if how == "std":
        # scale first so the variance cannot overflow for |signal| near the float64 limit
        spread = float(np.std(signal / magnitude)) * magnitude if magnitude > 0 else 0.0
    else:
        spread = magnitude
    if spread == 0.0 or spread <= _RELATIVE_SPREAD_FLOOR * magnitude:
        return None
    return signal / spread


class CandidateSignalRule(Rule):
    """Base of the rules moved by TAMPO's per-candidate signal ``a_k``
    (:func:`candidate_advantages`, the batch's likelihoods normalised across candidates by the
    rule's ``normalizer``): the feedback enters only through ``a_k``, so a zero-advantage row
    adds nothing, and only K and the chosen index matter (any candidates, a joint grid too)."""

    normalizer: str
    requires: ClassVar[tuple[str, ...]] = ("loglik", "advantages")
    candidate_use: ClassVar[str] = "indices"
    zero_advantage_rows_ignored: ClassVar[bool] = True  # loglik enters only via a_k

    def candidate_signal(self, feedback: base.Feedback, *, tau: float = 1.0) -> np.ndarray:
        """This batch's ``a_k``, shape (K,)."""
        return candidate_advantages(
            feedback["loglik"], feedback["advantages"], self.normalizer, tau=tau
        )


@dataclass(frozen=True)
class TAMPO(CandidateSignalRule):
    """The TAMPO meta-policy rule: EMA of likelihood-weighted advantages, min-max normalised.

    Args:
        alpha: EMA coefficient in (0, 1] (paper: 0.05; ablated 0.01 / 0.10).
        normalizer: ``"sparsemax"`` (paper) or ``"softmax"`` across candidates.
        standardize: (variant, not in the paper) how each step's signal ``a`` is scaled before
            the EMA. ``"none"`` (paper): raw ``a``. ``"std"``: ``a / std_k(a)`` (population
            standard deviation over the K candidates); ``"max_abs"``: ``a / max_k |a_k|``. Both
            give every step the same weight in the EMA whatever its scale, so one step sampled
            at a high temperature (whose ``a`` is typically several times larger) no longer
            outvotes many low-temperature steps. A step whose spread is zero (``std_k(a)`` or
            ``max_k |a_k|`` at most ``64 eps`` times ``max_k |a_k|``, e.g. all advantages 0)
            carries no ranking: it leaves the EMA unchanged (no decay either), since the scaled
            signal is undefined. The min-max step is shift- and scale-invariant, so ``a``'s
            offset does not matter.
        tau: (variant) a scale inside the normaliser, ``lhat(i) = sparsemax(l(i) / tau)`` (or
            softmax), ``tau > 0``. ``tau = 1`` is the paper; ``tau -> 0`` tends to the one-hot
            of each trajectory's likelihood-optimal candidate ``T*(i) = argmax_k l_k(i)``, so
            the update concentrates on ``T*``; a large ``tau`` tends to uniform weights (no
            ranking). ``loglik / tau`` must stay finite (ValueError otherwise).
        likelihood_normalization: (variant) which trajectory log-likelihoods the rule expects in
            ``loglik``: ``"mean"`` (paper: length-normalised, what
            :func:`metactl.likelihood.candidate_loglik` returns) or ``"sum"`` (the summed
            log-likelihood of the whole completion, i.e. the mean times the number of completion
            tokens). The update math is the same; adapters read this attribute to decide what to
            pass (the rule cannot tell the two apart from the numbers).

    ``config()`` (and so ``state_dict()['rule']``) lists a variant field only when it differs
    from the paper's default, so states of the paper rule are unchanged. In every variant the
    update returns (as ``UpdateInfo.candidate_advantages``) the batch's unscaled ``a_k``.

    base.Feedback: ``loglik`` (N, K) and ``advantages`` (N,). Default selector: ``Nucleus(0.7)``.

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
    standardize: str = "none"
    tau: float = 1.0
    likelihood_normalization: str = "mean"

    @property
    def loglik_reduction(self) -> str:
        return self.likelihood_normalization

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", unit_interval(self.alpha, "alpha", low_open=True))
        one_of(self.normalizer, "normalizer", NORMALIZERS)
        one_of(self.standardize, "standardize", STANDARDIZATIONS)
        object.__setattr__(self, "tau", positive_scalar(self.tau, "tau"))
        one_of(self.likelihood_normalization, "likelihood_normalization", LIKELIHOOD_NORMALIZATIONS)

    _VARIANT_DEFAULTS: ClassVar[dict[str, Any]] = {
        "standardize": "none",
        "tau": 1.0,
        "likelihood_normalization": "mean",
    }

    def config(self) -> dict[str, Any]:
        """The settings as a JSON-safe dict; variant fields only where they are not the paper's
        defaults (so paper-rule states saved before the variants existed still load)."""
        return {
            key: value
            for key, value in super().config().items()
            if key not in self._VARIANT_DEFAULTS or value != self._VARIANT_DEFAULTS[key]
        }

    def default_selector(self) -> Selector:
        return Nucleus(top_p=0.7)

    def init_state(self, candidates: np.ndarray) -> base.RuleState:
        return {"ema": np.zeros(candidates.shape[0])}

    def probs(self, state: base.RuleState, ctx: base.Contexts) -> np.ndarray:
        return minmax_probs(state["ema"])[None, :]

    def update(
        self, state: base.RuleState, ctx: base.Contexts, batch: base.Batch, feedback: base.Feedback
    ) -> tuple[base.RuleState, base.ContextRows, np.ndarray]:
        signal = self.candidate_signal(feedback, tau=self.tau)
        if self.standardize == "none":
            ema = (1.0 - self.alpha) * state["ema"] + self.alpha * signal
            return {"ema": ema}, {}, signal
        scaled = standardized_signal(signal, self.standardize)
        if scaled is None:  # zero spread: no ranking this step, the EMA is left as it was
            return {"ema": state["ema"].copy()}, {}, signal
        return {"ema": (1.0 - self.alpha) * state["ema"] + self.alpha * scaled}, {}, signal
