"""Diagnostics of the likelihood rules: what one step's TAMPO signal said, and why.

TAMPO moves the meta-policy by the batch signal ``a_k = mean_i lhat_k(i) A_i`` with
``lhat(i) = sparsemax(l(i) / tau)`` (see :mod:`metactl.rules.tampo`). Whether that moves the
temperature up or down, and how hard, is decided by a few numbers that the rule never shows:

- ``signal_spread = max_k a_k - min_k a_k``: how loud the step is. The EMA adds raw ``a_k``, so a
  step with ten times the spread has ten times the say (steps sampled at a high temperature
  typically have the largest spreads).
- the candidate the step favours, ``argmax_k a_k``, and its value ``max_k a_k``;
- the sparsemax support size of every trajectory (how many of the K candidates keep a non-zero
  weight): close to K means sparsemax is not sparse and ``a_k`` is nearly linear in the
  candidate, so its arg-max lands at an end of the grid;
- the within-group correlation of the likelihood-optimal candidate ``T*(i) = argmax_k l_k(i)``
  and the advantage: positive when the successful rollouts of a prompt were the "more random"
  ones (the signal pushes up), negative when failures were the random slips (it pushes down).

:func:`signal_diagnostics` computes them from exactly the ``(N, K)`` likelihoods and ``(N,)``
advantages the rule received, with no model call, so a trainer can record them every step.

Rows with ``A_i == 0`` add exactly nothing to ``a_k``, and trainers may leave their
likelihoods unscored (the reference trainer stores 0 there): they are left out of every per-row
statistic (support size, ``T*``, the correlations). Every value returned is finite (NaN-free):
a statistic over an empty set of rows, or a correlation of a constant, is defined below.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._validation import candidate_values, finite_array, finite_scalar, integer, one_of
from .rules import TAMPO, ContextualTAMPO, Hedge, MetaGradient, Rule
from .rules.tampo import _RELATIVE_SPREAD_FLOOR, NORMALIZERS, candidate_advantages
from .sparsemax import softmax, sparsemax

__all__ = ["SCALAR_FIELDS", "signal_diagnostics", "signal_options", "stack_diagnostics"]

#: the scalar entries of :func:`signal_diagnostics`'s result (one float or int per step)
SCALAR_FIELDS: tuple[str, ...] = (
    "sampling_value",
    "signal_spread",
    "favoured_index",
    "favoured_candidate",
    "favoured_signal",
    "support_mean",
    "tstar_advantage_correlation",
    "informative_groups",
    "signal_rows",
    "tstar_gap",
)


def _group_correlations(tstar: np.ndarray, adv: np.ndarray, group: int) -> tuple[
    np.ndarray, np.ndarray
]:
    """Per group (contiguous rows), the Pearson correlation of ``tstar`` and ``adv`` over the
    rows with ``adv != 0``, and whether it is defined (at least two such rows, neither side
    constant); 0.0 where it is not. Vectorised over the groups (one call per step)."""
    x, y = tstar.reshape(-1, group), adv.reshape(-1, group)
    rows = y != 0.0
    count = rows.sum(axis=1)
    x_high, x_low = np.where(rows, x, -np.inf).max(axis=1), np.where(rows, x, np.inf).min(axis=1)
    y_high, y_low = np.where(rows, y, -np.inf).max(axis=1), np.where(rows, y, np.inf).min(axis=1)
    defined = (count >= 2) & (x_high > x_low) & (y_high > y_low)
    # r is scale-invariant: scale each group to a largest |entry| of 1 first, so advantages near
    # the float64 limit overflow neither the means nor the products (1 where undefined: unused)
    x_scale = np.where(defined, np.maximum(np.abs(x_high), np.abs(x_low)), 1.0)
    y_scale = np.where(defined, np.maximum(np.abs(y_high), np.abs(y_low)), 1.0)
    xs = np.where(rows, x / x_scale[:, None], 0.0)
    ys = np.where(rows, y / y_scale[:, None], 0.0)
    n = np.maximum(count, 1)[:, None]
    dx = np.where(rows, xs - xs.sum(axis=1, keepdims=True) / n, 0.0)
    dy = np.where(rows, ys - ys.sum(axis=1, keepdims=True) / n, 0.0)
    # > 0 where defined: after the scaling some entry is 1 in magnitude and another differs
    # from it by at least one ulp, so each sum of squares is at least ~1e-32
    denom = np.sqrt(np.sum(dx * dx, axis=1) * np.sum(dy * dy, axis=1))
    r = np.divide(np.sum(dx * dy, axis=1), denom, out=np.zeros(denom.shape[0]), where=defined)
    # |r| <= 1 exactly in real arithmetic; the clip only removes a rounding excess (~1e-16)
    return np.clip(r, -1.0, 1.0), defined


def signal_options(rule: Rule) -> dict[str, Any]:
    """The keywords of :func:`signal_diagnostics` for ``rule``'s signal: the normaliser of the
    likelihood rules that declare one (TAMPO, ContextualTAMPO, Hedge, MetaGradient) and TAMPO's
    scale ``tau``; none (the defaults) for any other rule.

    Example:
        >>> import metactl
        >>> signal_options(metactl.TAMPO(normalizer="softmax", tau=0.5))
        {'normalizer': 'softmax', 'tau': 0.5}
    """
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a metactl rule, got {type(rule).__name__}")
    if isinstance(rule, TAMPO):
        return {"normalizer": rule.normalizer, "tau": rule.tau}
    if isinstance(rule, (ContextualTAMPO, Hedge, MetaGradient)):
        return {"normalizer": rule.normalizer}
    return {}


def signal_diagnostics(
    loglik: Any,
    advantages: Any,
    candidates: Any,
    sampling_value: Any,
    group_size: int,
    *,
    normalizer: str = "sparsemax",
    tau: float = 1.0,
) -> dict[str, Any]:
    """Diagnose one step of a likelihood rule (TAMPO's signal) from the feedback it received.

    Args:
        loglik: ``(N, K)`` candidate log-likelihoods, the rule's ``loglik`` feedback (NumPy
            array, list or torch tensor; finite).
        advantages: ``(N,)`` advantages, rows as in ``loglik`` (finite).
        candidates: the ``K`` candidate values, column ``k`` scoring ``candidates[k]``.
        sampling_value: the value the step sampled at: a number, or ``(N,)`` (one per row, a
            per-prompt policy), reported as the mean over the rows.
        group_size: rows per group (the groups are contiguous: group ``g`` is rows
            ``g G .. (g + 1) G - 1``); must divide ``N``, ``>= 2``.
        normalizer: ``"sparsemax"`` (the paper) or ``"softmax"``, as in the rule.
        tau: the scale inside the normaliser (``lhat = normalizer(l / tau)``), as in the rule.

    Returns:
        A JSON-safe dict (plain floats, ints and lists):

        - ``signal``: the K values ``a_k`` (exactly :func:`metactl.candidate_advantages`);
        - ``signal_spread``: ``max a - min a`` (>= 0);
        - ``favoured_index`` / ``favoured_candidate``: ``argmax_k a_k`` (the first on ties) and
          its candidate value; ``-1`` / ``None`` when the signal is flat (spread 0 up to the
          rounding floor TAMPO uses: the step ranks nothing, e.g. every advantage 0);
        - ``favoured_signal``: ``max_k a_k``;
        - ``support_mean``: mean over the signal rows (``A_i != 0``) of how many candidates the
          normaliser keeps (non-zero weight); ``support_histogram``: K counts, entry ``s - 1``
          the number of signal rows whose support has size ``s``; ``support_mean`` is 0.0 when
          there is no signal row;
        - ``tstar_advantage_correlation``: the mean over the informative groups of the
          within-group Pearson correlation of ``T*`` and ``A`` (over the group's signal rows). A
          group is informative when both its ``T*`` and its ``A`` vary (at least two signal
          rows); any other group's correlation is undefined and counts as 0.0 in
          ``group_correlations`` (one per group), and the mean is 0.0 when no group is
          informative. ``informative_groups``: how many there are;
        - ``signal_rows``: the number of rows with ``A_i != 0``;
        - ``tstar_gap``: mean ``T*`` of the rows with ``A > 0`` minus that of the rows with
          ``A < 0`` (positive: successes were likelier at higher values); 0.0 when either set is
          empty;
        - ``sampling_value``: the sampling value (mean over rows when one per row).

    Raises:
        TypeError: non-numeric arrays, a non-integer ``group_size``, a non-string
            ``normalizer``.
        ValueError: wrong shapes, ``N = 0``, NaN/inf, bad candidates, ``group_size`` not
            dividing ``N`` or below 2, an unknown ``normalizer``, ``tau <= 0``.

    Example:
        >>> import numpy as np
        >>> ll = np.array([[-1.0, -1.2], [-1.0, -0.4]])   # sparsemax rows [0.6, 0.4], [0.2, 0.8]
        >>> d = signal_diagnostics(ll, [1.0, -1.0], [0.8, 1.2], 1.0, group_size=2)
        >>> round(d["signal_spread"], 12), d["favoured_candidate"], d["support_mean"]
        (0.4, 0.8, 2.0)
        >>> d["tstar_advantage_correlation"]   # the success has T* = 0.8, the failure 1.2
        -1.0
    """
    cands = candidate_values(candidates, "generic", "candidates")
    k = cands.shape[0]
    ll = finite_array(loglik, "loglik")
    if ll.ndim != 2:
        raise ValueError(f"loglik must have shape (N, K), got shape {ll.shape}")
    if ll.shape[1] != k:
        raise ValueError(f"loglik has {ll.shape[1]} columns but candidates has {k} values")
    n = ll.shape[0]
    adv = finite_array(advantages, "advantages")
    if adv.shape != (n,):
        raise ValueError(f"advantages must have shape ({n},) to match loglik, got {adv.shape}")
    if isinstance(sampling_value, (int, float, np.integer, np.floating)) and not isinstance(
        sampling_value, (bool, np.bool_)
    ):
        sampled = finite_scalar(sampling_value, "sampling_value")
    else:
        values = finite_array(sampling_value, "sampling_value")
        if values.size == 1:
            sampled = float(values.reshape(()))
        elif values.shape == (n,):
            sampled = float(values.mean())
        else:
            raise ValueError(
                f"sampling_value must be a number or have shape ({n},), got {values.shape}"
            )
    group = integer(group_size, "group_size", minimum=2)
    if n % group:
        raise ValueError(f"group_size {group} must divide the {n} rows of loglik")
    one_of(normalizer, "normalizer", NORMALIZERS)

    signal = candidate_advantages(ll, adv, normalizer, tau=tau)  # validates tau
    magnitude = float(np.max(np.abs(signal)))
    # finite: max a - min a = mean_i (w_i,max - w_i,min) A_i with weights in [0, 1], so it is
    # at most mean_i |A_i| <= max |A_i| in magnitude (no overflow for any finite advantages)
    spread = float(np.max(signal) - np.min(signal))
    flat = spread == 0.0 or spread <= _RELATIVE_SPREAD_FLOOR * magnitude
    best = int(np.argmax(signal))

    rows = adv != 0.0
    scaled = ll if tau == 1.0 else ll / tau  # finite: candidate_advantages checked it
    normalize = sparsemax if normalizer == "sparsemax" else softmax
    support = np.count_nonzero(normalize(scaled[rows], axis=1) > 0.0, axis=1) if rows.any() else (
        np.zeros(0, dtype=np.int64)
    )
    histogram = np.bincount(support, minlength=k + 1)[1:]

    tstar = cands[np.argmax(ll, axis=1)]  # first index on ties, as metactl.likelihood_optimal
    correlations, defined = _group_correlations(tstar, adv, group)
    positive, negative = tstar[adv > 0], tstar[adv < 0]
    gap = float(positive.mean() - negative.mean()) if positive.size and negative.size else 0.0

    return {
        "sampling_value": sampled,
        "signal": [float(v) for v in signal],
        "signal_spread": spread,
        "favoured_index": -1 if flat else best,
        "favoured_candidate": None if flat else float(cands[best]),
        "favoured_signal": float(signal[best]),
        "support_mean": float(support.mean()) if support.size else 0.0,
        "support_histogram": [int(c) for c in histogram],
        "tstar_advantage_correlation": float(correlations[defined].mean()) if defined.any()
        else 0.0,
        "group_correlations": [float(r) for r in correlations],
        "informative_groups": int(defined.sum()),
        "signal_rows": int(rows.sum()),
        "tstar_gap": gap,
    }


def stack_diagnostics(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Stack per-step :func:`signal_diagnostics` results into arrays (one row per step).

    Scalars become ``(steps,)`` float arrays (``favoured_candidate`` is NaN on flat steps, so
    plots leave a gap there), ``signal`` and ``support_histogram`` ``(steps, K)``. The per-group
    correlations are left out (their number may change between steps).

    Raises:
        ValueError: an empty list, or records of different K.
    """
    if not isinstance(records, list) or not records:
        raise ValueError("records must be a non-empty list of signal_diagnostics results")
    out: dict[str, np.ndarray] = {}
    for name in SCALAR_FIELDS:
        out[name] = np.array(
            [np.nan if r[name] is None else float(r[name]) for r in records], dtype=np.float64
        )
    for name in ("signal", "support_histogram"):
        widths = {len(r[name]) for r in records}
        if len(widths) != 1:
            raise ValueError(f"records disagree on the number of candidates: {sorted(widths)}")
        out[name] = np.array([r[name] for r in records], dtype=np.float64)
    return out
