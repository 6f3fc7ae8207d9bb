"""Ready-made meta-policies with published defaults: :func:`tampo`, :func:`ptgs` (and its grid
:func:`ptgs_candidates`), :func:`tampo_per_prompt` and :func:`linear_thompson`; the temperature
mixtures :func:`mixture` and :func:`spread`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import _validation as check
from .contexts import DEFAULT_MAX_CONTEXTS
from .knobs import KnobGrid
from .policy import MetaPolicy
from .rules import PTGS, TAMPO, ContextualTAMPO, LinearThompson, Mixture, Spread
from .selectors import Nucleus

__all__ = [
    "PAPER_TEMPERATURES",
    "linear_thompson",
    "mixture",
    "ptgs",
    "ptgs_candidates",
    "spread",
    "tampo",
    "tampo_per_prompt",
]

#: The paper's candidate temperatures, 0.6 to 1.5 in steps of 0.1.
PAPER_TEMPERATURES: tuple[float, ...] = tuple(round(0.6 + 0.1 * i, 1) for i in range(10))


def tampo(
    candidates: Sequence[float] | np.ndarray | KnobGrid = PAPER_TEMPERATURES,
    *,
    alpha: float = 0.05,
    normalizer: str = "sparsemax",
    top_p: float = 0.7,
    seed: int = 0,
    hyperparameter: str | None = None,
) -> MetaPolicy:
    """A TAMPO meta-policy with the paper's defaults: temperatures 0.6..1.5 (step 0.1),
    ``alpha = 0.05``, sparsemax, nucleus selection with ``top_p = 0.7`` (the selector's
    nucleus over the candidates, not a sampler knob).

    ``hyperparameter`` (see :class:`MetaPolicy`) defaults to ``"joint"`` when ``candidates``
    is a joint grid (a :class:`metactl.KnobGrid` or a list of knob mappings), else to
    ``"temperature"``.

    Example:
        >>> import metactl
        >>> policy = metactl.tampo(seed=0)
        >>> policy.probs.round(2).tolist() == [0.1] * 10   # uniform before the first update
        True
        >>> metactl.tampo(metactl.grid(temperature=[0.8, 1.0], top_p=[0.9, 1.0])).knobs
        ('temperature', 'top_p')
    """
    if hyperparameter is None:
        hyperparameter = "joint" if check.is_joint_like(candidates) else "temperature"
    return MetaPolicy(
        candidates,
        TAMPO(alpha=alpha, normalizer=normalizer),
        Nucleus(top_p),
        seed,
        hyperparameter=hyperparameter,
    )


def ptgs_candidates(tau: float = 1.5, t_ref: float = 1.0, k: int = 11) -> np.ndarray:
    """The default grid of a PTGS policy: ``t_ref * tau ** h`` for ``k`` evenly spaced ``h`` in
    [-1, 1] (log-spaced over PTGS's range ``[t_ref / tau, tau t_ref]``, ``t_ref`` included for
    odd ``k``). PTGS's values are continuous; the grid only names the nearest candidate
    (``Decision.index``) and the cells of ``probs``.

    Example:
        >>> ptgs_candidates(1.5, 1.0, 3).round(4).tolist()
        [0.6667, 1.0, 1.5]
    """
    rule = PTGS(tau=tau, t_ref=t_ref)  # validates tau and t_ref
    count = check.integer(k, "k", minimum=2)
    low, high = rule.bounds
    grid = rule.t_ref * rule.tau ** np.linspace(-1.0, 1.0, count)
    grid[0], grid[-1] = low, high  # the range's ends exactly
    return grid


def ptgs(
    candidates: Sequence[float] | np.ndarray | None = None,
    *,
    tau: float = 1.5,
    gamma: float = 0.95,
    t_ref: float = 1.0,
    pivot_start: float = 0.25,
    pivot_end: float = 0.5,
    total_steps: int | None = None,
    max_contexts: int = DEFAULT_MAX_CONTEXTS,
    seed: int = 0,
) -> MetaPolicy:
    """A PTGS policy (:class:`metactl.PTGS`, the note's defaults): a temperature per context
    from a Thompson draw of its success rate. ``total_steps=None`` keeps the pivot at
    ``pivot_start`` (no ramp); give the run's number of updates to ramp it geometrically to
    ``pivot_end``. ``candidates`` default: :func:`ptgs_candidates` (11 points over the range).

    Example:
        >>> import metactl
        >>> policy = metactl.ptgs(seed=0, total_steps=100)
        >>> policy.rule.pivot(0), policy.rule.pivot(100)
        (0.25, 0.5)
    """
    rule = PTGS(
        tau=tau,
        gamma=gamma,
        t_ref=t_ref,
        pivot_start=pivot_start,
        pivot_end=pivot_end,
        total_steps=total_steps,
        max_contexts=max_contexts,
    )
    grid = ptgs_candidates(rule.tau, rule.t_ref) if candidates is None else candidates
    return MetaPolicy(grid, rule, seed=seed)


def tampo_per_prompt(
    candidates: Sequence[float] | np.ndarray = PAPER_TEMPERATURES,
    *,
    alpha: float = 0.05,
    normalizer: str = "sparsemax",
    prior_weight: float = 4.0,
    top_p: float = 0.7,
    max_contexts: int = DEFAULT_MAX_CONTEXTS,
    seed: int = 0,
) -> MetaPolicy:
    """A per-prompt TAMPO policy (:class:`metactl.ContextualTAMPO`) with the paper's defaults
    (temperatures 0.6..1.5, ``alpha = 0.05``, sparsemax, nucleus ``top_p = 0.7``); each
    context's EMA is shrunk toward the global one with weight ``n / (n + prior_weight)``."""
    rule = ContextualTAMPO(
        alpha=alpha, normalizer=normalizer, prior_weight=prior_weight, max_contexts=max_contexts
    )
    return MetaPolicy(candidates, rule, Nucleus(top_p), seed)


def linear_thompson(
    candidates: Sequence[float] | np.ndarray = PAPER_TEMPERATURES,
    *,
    gamma: float = 0.95,
    ridge: float = 1.0,
    noise_std: float = 0.5,
    feature_dim: int = 0,
    max_contexts: int = DEFAULT_MAX_CONTEXTS,
    seed: int = 0,
) -> MetaPolicy:
    """A :class:`metactl.LinearThompson` policy over ``candidates`` (default 0.6..1.5)."""
    rule = LinearThompson(
        gamma=gamma,
        ridge=ridge,
        noise_std=noise_std,
        feature_dim=feature_dim,
        max_contexts=max_contexts,
    )
    return MetaPolicy(candidates, rule, seed=seed)


def mixture(
    candidates: Sequence[float] | np.ndarray = PAPER_TEMPERATURES,
    *,
    floor: float = 0.1,
    step_size: float = 1.0,
    signal: str = "mixed",
    relative: bool = False,
    seed: int = 0,
) -> MetaPolicy:
    """A learned temperature mixture (:class:`metactl.Mixture`) over ``candidates`` (default
    0.6..1.5): each prompt group of a batch at its own temperature, dealt from one learned
    distribution; decide with ``select(contexts=...)``, one context per prompt group.

    Example:
        >>> import metactl
        >>> metactl.mixture(seed=0).select(contexts=list(range(10))).values.size
        10
    """
    return MetaPolicy(
        candidates,
        Mixture(floor=floor, step_size=step_size, signal=signal, relative=relative),
        seed=seed,
    )


def spread(
    candidates: Sequence[float] | np.ndarray = PAPER_TEMPERATURES, *, seed: int = 0
) -> MetaPolicy:
    """The uniform temperature mixture (:class:`metactl.Spread`) over ``candidates`` (default
    0.6..1.5): each step the prompt groups are dealt evenly over the candidates.

    Example:
        >>> import metactl
        >>> decisions = metactl.spread(seed=0).select(contexts=list(range(10)))
        >>> sorted(decisions.values.tolist()) == list(metactl.PAPER_TEMPERATURES)
        True
    """
    return MetaPolicy(candidates, Spread(), seed=seed)
