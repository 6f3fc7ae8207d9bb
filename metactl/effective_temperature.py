"""The temperature that sampled tokens actually came from, estimated from their logits.

A rollout can silently ignore the temperature a meta-policy chose: a generation config merged
over the trainer's settings samples near-greedily, an evaluation pass leaves the engine at
``T = 0``, a sampler ignores ``temperature`` altogether. Nothing fails; the controller learns
from data it did not ask for. The logits a trainer already holds for its sampled tokens tell.

For one token ``o`` drawn from ``softmax(z / T)`` the score of the temperature,

.. math::

    \\frac{\\partial}{\\partial T} \\log \\operatorname{softmax}(z / T)_o
      = \\frac{E_{p_T}[z] - z_o}{T^2},

has mean zero, and variance (the Fisher information) ``Var_{p_T}[z] / T^4``. Summed over the
batch's tokens (a martingale: each term has mean zero given the tokens before it), the score at
the intended temperature divided by the square root of the summed information is a z-statistic,
about standard normal when the tokens were drawn at that temperature; and the root of the summed
score is the batch's maximum-likelihood temperature. :func:`effective_temperature` returns both
(:class:`TemperatureEstimate`), and the signed root of the likelihood ratio between them
(``z_lr``, also about standard normal at the intended temperature, and far larger than the
score's z against a distant temperature such as greedy decoding, where the score is nearly
flat). :func:`check_effective_temperature` raises (or warns) when the estimate departs from the
intended value by more than a relative tolerance and ``|z_lr|`` exceeds a threshold.

With per-row settings (a temperature per prompt group, :class:`metactl.knobs.SettingRows`) the
estimate is the common factor ``r`` by which every row's temperature was off (row ``i`` sampled
at ``r * T_i``); with one setting that is ``T_hat / T``. The log-likelihood is concave in
``1 / r``, so the root is unique; it is found in float64 on ``log r`` by Newton steps kept
inside a sign-change bracket (a few passes over the logits).

Truncation (top-k, top-p, min-p): a truncated sampler draws from ``p_T`` restricted to its kept
set, so the score is taken inside the kept set: expectations over the kept set of the intended
setting (:func:`metactl.knobs.kept_mask`, the same kept sets the likelihoods use), held fixed
while ``T`` varies. At the intended setting this score has mean zero exactly (the z-statistics
keep their meaning); the estimate away from it is the maximum-likelihood temperature given those
kept sets (exact for top-k, whose kept set does not depend on ``T``). A sampled token outside its
kept set is impossible under the intended setting: it is scored with its kept set widened to
it, and counted (``outside``: the sampler ignored the truncation) when it lies beyond what float
rounding in the sampler can explain (:data:`BOUNDARY_LOGIT_MARGIN`, :data:`BOUNDARY_MASS_SLACK`).

Without logits (a trainer that keeps only each sampled token's log-probability and the
entropy of its distribution, as verl's log-prob pass does), the same score per token is
``-(H + log p_T(o)) / T`` (``H = log Z - E[z] / T``): the token's excess surprisal over the
entropy, divided by ``T``. Its variance (the varentropy) is unknown there, so
:func:`temperature_score` self-normalises: the summed score over the root of the summed squared
scores is about N(0, 1) for tokens drawn at the intended temperature (a martingale difference
sequence) and grows as the square root of the token count otherwise; the same ratio divided by
that square root (the mean score over its root mean square, in ``[-1, 1]``) is the departure's
size, ``effect``, which stays small for a sampler that differs only numerically from the scorer.
:func:`check_temperature_score` tests both. The temperature itself is not identified by one
temperature's log-probabilities and entropies: one Newton step from the intended value (the
result's ``temperature``) is right to first order for small drifts but saturates far away (tokens
drawn at 1.5 and scored at 0.6 read about 0.64 on SmolLM2), so the check never tests it.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(0.0, 3.0, size=(4000, 20))
    >>> p = np.exp(z / 0.7); p /= p.sum(axis=1, keepdims=True)
    >>> tokens = (p.cumsum(axis=1) < rng.random((4000, 1))).sum(axis=1)   # drawn at T = 0.7
    >>> est = effective_temperature(z, tokens, temperature=0.7)
    >>> abs(est.temperature - 0.7) < 0.03, abs(est.z) < 4
    (True, True)
    >>> check_effective_temperature(est)
    True
    >>> greedy = effective_temperature(z, z.argmax(axis=1), temperature=0.7)
    >>> greedy.temperature, greedy.z < -10
    (0.0, True)
    >>> logp = np.log(p[np.arange(4000), tokens])           # what a log-prob pass returns
    >>> entropy = -(p * np.log(p)).sum(axis=1)
    >>> score = temperature_score(logp, entropy, temperature=0.7)
    >>> abs(score.z) < 4, check_temperature_score(score)
    (True, True)
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ._validation import finite_scalar, one_of
from .knobs import (
    ORDERS,
    TEMPERATURE_RANGE,
    Setting,
    SettingRows,
    _is_tensor,
    check_float_logits,
    kept_mask,
)

__all__ = [
    "BOUNDARY_LOGIT_MARGIN",
    "BOUNDARY_MASS_SLACK",
    "CHECK_MODES",
    "DEFAULT_RTOL",
    "DEFAULT_SCORE_EFFECT",
    "DEFAULT_SCORE_Z",
    "DEFAULT_Z",
    "EffectiveTemperatureWarning",
    "TemperatureEstimate",
    "TemperatureScore",
    "check_effective_temperature",
    "check_temperature_score",
    "effective_temperature",
    "temperature_score",
]

#: What :func:`check_effective_temperature` does on a departure.
CHECK_MODES: tuple[str, ...] = ("error", "warn", "off")
#: Default relative tolerance on the temperature (``T_hat / T`` outside ``[0.8, 1.25]``).
DEFAULT_RTOL = 0.25
#: Default threshold on ``|z_lr|`` (the signed root of the log-likelihood ratio).
DEFAULT_Z = 5.0
#: Default largest share of tokens outside the intended kept set.
DEFAULT_OUTSIDE = 0.01
#: A sampled token counts as outside its kept set only when raising its own logit by this (raw
#: logit units) would not keep it, with ``top_p`` widened by :data:`BOUNDARY_MASS_SLACK`.
#: A sampler that decides its kept set in another precision (vLLM in bf16 against a float32
#: trainer) crosses the boundary by float rounding: on SmolLM2's own completions (bf16 against
#: float32 logits, median deviation 0.09) up to 1.73% of a correct bf16 sampler's tokens fell
#: just outside the exact kept sets, none beyond these tolerances; a sampler that ignores the
#: truncation still put 0.88% (top_p 0.95 at T 0.6) to 22.7% of its tokens beyond them
#: (``benchmarks/kept_set_precision.py``).
BOUNDARY_LOGIT_MARGIN = 0.5
#: Probability mass added to ``top_p`` before a token is counted outside the nucleus.
BOUNDARY_MASS_SLACK = 0.02
#: Default threshold on ``|z|`` of :func:`temperature_score`.
DEFAULT_SCORE_Z = 5.0
#: Default threshold on ``|effect|`` of :func:`temperature_score` (the mean score over its root
#: mean square).
DEFAULT_SCORE_EFFECT = 0.1
# log-probabilities above this, or entropies below its negative, are not float rounding
_ROUNDING = 1e-3
# Estimates beyond this factor of the intended temperature are reported as 0 or inf.
_RANGE = 1e3
# Excluded vocabulary entries get this shifted logit: exp(b * u) is exactly 0 for every b used
# here, and u * e, u**2 * e stay exactly 0 (no inf * 0).
_FLOOR = -1e150
# Torch kernels on CPU too (the tests' way to run them without an accelerator)
_TORCH_KERNELS_ON_CPU = False
# float64 logit entries per pass chunk (CPU; accelerators take larger chunks)
_CPU_CHUNK = 1 << 22
_ACCEL_CHUNK = 1 << 25


class EffectiveTemperatureWarning(UserWarning):
    """Sampled tokens look drawn at another temperature than the intended one."""


@dataclass(frozen=True)
class TemperatureEstimate:
    """What :func:`effective_temperature` found.

    Attributes:
        temperature: the maximum-likelihood temperature of the tokens (``ratio * intended``);
            ``0.0`` or ``inf`` when it lies beyond a factor 1000 of the intended one (``0.0``
            for greedy tokens), ``nan`` when the tokens carry no information (every kept set a
            single token, e.g. one-hot logits).
        intended: the intended temperature (with per-row settings, the geometric mean of the
            rows' temperatures weighted by their tokens).
        ratio: ``temperature / intended`` (the common factor of every row's temperature).
        z: the score at the intended setting over the square root of its Fisher information:
            about N(0, 1) for tokens drawn at the intended setting, positive when the tokens
            look hotter, negative when colder (``0.0`` without information).
        z_lr: the signed root of the log-likelihood ratio ``2 (loglik(T_hat) - loglik(T))``,
            signed as ``z``: also about N(0, 1) at the intended setting, and much larger than
            ``z`` against a distant temperature (greedy tokens), whose score is flat near the
            intended one. :func:`check_effective_temperature` tests it.
        tokens: the number of scored tokens (masked positions).
        outside: how many sampled tokens lie outside their intended kept set by more than
            float rounding explains (:data:`BOUNDARY_LOGIT_MARGIN`, :data:`BOUNDARY_MASS_SLACK`);
            always 0 without truncation.
    """

    temperature: float
    intended: float
    ratio: float
    z: float
    z_lr: float
    tokens: int
    outside: int = 0

    def to_dict(self) -> dict[str, float | int]:
        """The fields as a plain dict (for logs)."""
        return asdict(self)


@dataclass(frozen=True)
class TemperatureScore:
    """What :func:`temperature_score` found from sampled tokens' log-probabilities and entropies.

    Attributes:
        temperature: one Newton step from the intended temperature (``ratio * intended``):
            right to first order for a small drift, saturating for a large one (greedy
            SmolLM2 tokens scored at 1.0 read 0.52): a drift's size, never a failure's
            temperature;
            ``nan`` without information.
        intended: the intended temperature (with per-row temperatures, the geometric mean of
            the rows' temperatures weighted by their tokens).
        ratio: ``temperature / intended``, ``exp(sum(s) / sum(s**2))`` over the tokens' scores
            ``s = -(H + log p)``.
        z: the self-normalised score, ``sum(s) / sqrt(sum(s**2))``: about N(0, 1) for tokens
            drawn at the intended temperature, positive when they look hotter, negative when
            colder (``0.0`` without information).
        effect: ``z / sqrt(tokens)``, the mean score over its root mean square, in ``[-1, 1]``:
            about ``+-1 / sqrt(tokens)`` at the intended temperature, near -1 for greedy
            tokens; the size of a departure whatever the batch's size.
        excess: the tokens' mean excess surprisal, ``mean(-log p - H)`` in nats (0 in
            expectation at the intended temperature).
        tokens: the number of scored tokens (masked positions).
    """

    temperature: float
    intended: float
    ratio: float
    z: float
    effect: float
    excess: float
    tokens: int

    def to_dict(self) -> dict[str, float | int]:
        """The fields as a plain dict (for logs)."""
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def _setting_rows(setting: Any, n_rows: int) -> SettingRows:
    """The intended setting of each leading-axis row of the logits."""
    if isinstance(setting, SettingRows):
        if len(setting) != n_rows:
            raise ValueError(f"temperature: a SettingRows of {len(setting)} rows, but the logits "
                             f"have {n_rows} rows (their leading axis)")  # fmt: skip
        return setting
    if isinstance(setting, Setting):
        return setting.rows(n_rows)
    if isinstance(setting, (bool, np.bool_)) or not isinstance(setting, numbers.Real):
        raise TypeError(f"temperature must be a number, a metactl.knobs.Setting or a "
                        f"SettingRows, got {type(setting).__name__}")  # fmt: skip
    value = finite_scalar(setting, "temperature")
    lo, hi = TEMPERATURE_RANGE
    if not lo <= value <= hi:
        raise ValueError(f"temperature must lie in [{lo:g}, {hi:g}], got {value}")
    return Setting(temperature=value).rows(n_rows)


def _positions(logits: Any, tokens: Any, mask: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(flat_index, row, token)`` of the masked positions (``flat_index`` into the logits
    viewed as ``(N * L, V)``; ``row`` the leading-axis row of each)."""
    shape = check_float_logits(logits)
    if len(shape) not in (2, 3) or shape[-1] < 1:
        raise ValueError(f"logits must have shape (N, L, V) or (M, V), got {shape}")
    lead = shape[:-1]

    def host(x: Any, name: str) -> np.ndarray:
        if _is_tensor(x):
            x = x.detach().cpu().numpy()
        if isinstance(x, (str, bytes)) or x is None:
            raise TypeError(f"{name} must be an array or tensor, got {type(x).__name__}")
        arr = np.asarray(x)
        if arr.shape != lead:
            raise ValueError(f"{name} must have shape {lead} (the logits' without V), got "
                             f"{arr.shape}")  # fmt: skip
        return arr

    toks = host(tokens, "tokens")
    if toks.dtype == np.bool_ or not np.issubdtype(toks.dtype, np.integer):
        raise TypeError(f"tokens must hold integer token ids, got dtype {toks.dtype}")
    if mask is None:
        sel = np.ones(lead, dtype=bool)
    else:
        m = host(mask, "mask")
        if not (m.dtype == np.bool_ or np.issubdtype(m.dtype, np.number)):
            raise TypeError(f"mask must be boolean or 0/1, got dtype {m.dtype}")
        if m.dtype != np.bool_ and not np.isin(m, (0, 1)).all():
            raise ValueError("mask must hold only 0 and 1")
        sel = m.astype(bool)
    flat = np.flatnonzero(sel.reshape(-1))
    if flat.size == 0:
        raise ValueError("mask selects no position: nothing to estimate from")
    picked = toks.reshape(-1)[flat].astype(np.int64)
    vocab = shape[-1]
    if picked.min() < 0 or picked.max() >= vocab:
        bad = int(flat[np.flatnonzero((picked < 0) | (picked >= vocab))[0]])
        raise ValueError(f"tokens at masked positions must lie in [0, V) = [0, {vocab}); "
                         f"position {np.unravel_index(bad, lead)} holds "
                         f"{int(toks.reshape(-1)[bad])}")  # fmt: skip
    inner = 1 if len(shape) == 2 else shape[1]
    return flat, flat // inner, picked


# ----------------------------------------------------------------------------------------------
# passes over the logits (numpy or torch, float64)
# ----------------------------------------------------------------------------------------------
class _Backend:
    """Gathers chunks of masked logit rows as float64 and reduces them: with torch kernels on
    accelerators, with NumPy kernels on CPU (torch's float64 reductions are slower there)."""

    def __init__(self, logits: Any, flat: np.ndarray) -> None:
        self.source_torch = _is_tensor(logits)
        vocab = int(logits.shape[-1])
        self.flat_logits = logits.reshape(-1, vocab)
        accel = self.source_torch and logits.device.type != "cpu"
        self.torch = accel or (self.source_torch and _TORCH_KERNELS_ON_CPU)
        step = max(1, (_ACCEL_CHUNK if accel else _CPU_CHUNK) // vocab)
        self.chunks = [slice(s, min(s + step, flat.size)) for s in range(0, flat.size, step)]
        self.lib: Any = np
        self.index: Any = flat
        if self.source_torch:
            import torch

            self.device = logits.device
            self.index = torch.from_numpy(flat).to(self.device)
            if self.torch:
                self.lib = torch

    def rows(self, part: slice) -> Any:
        """The chunk's logit rows as a fresh float64 array (tensor) ``(c, V)``."""
        if self.source_torch:
            with _no_grad():
                rows = self.flat_logits.index_select(0, self.index[part]).detach()
            if self.torch:
                return rows.double()
            if str(rows.dtype) in ("torch.float32", "torch.float64"):
                return rows.numpy().astype(np.float64)  # numpy converts faster than torch
            return rows.double().numpy()
        return np.array(self.flat_logits[self.index[part]], dtype=np.float64)

    def lowest_kept(self, z: Any, setting: SettingRows, order: str) -> np.ndarray:
        """Each row's lowest kept logit (host, float64): kept sets from float32 logits for torch
        input (the precision a torch sampler decides in), from float64 for NumPy input."""
        if not self.source_torch:
            return np.where(kept_mask(z, setting, order=order), z, np.inf).min(axis=1)
        import torch

        if self.torch:
            kept = kept_mask(z.float(), setting, order=order)
            return self.host(torch.where(kept, z, torch.full_like(z, math.inf)).min(dim=1).values)
        kept = kept_mask(torch.from_numpy(z).float(), setting, order=order).numpy()
        return np.where(kept, z, np.inf).min(axis=1)

    def kept_raised(self, z: Any, rows: np.ndarray, toks: np.ndarray, setting: SettingRows,
                    order: str) -> np.ndarray:  # fmt: skip
        """Whether each of ``rows``' sampled token ``toks`` is kept under ``setting`` once its
        own logit is raised by :data:`BOUNDARY_LOGIT_MARGIN` (host bool), in the precision of
        :meth:`lowest_kept`."""
        if not self.source_torch:
            sub = np.array(z[rows], dtype=np.float64)
            sub[np.arange(rows.size), toks] += BOUNDARY_LOGIT_MARGIN
            kept = kept_mask(sub, setting, order=order)
            return np.asarray(kept[np.arange(rows.size), toks])
        import torch

        raised = (z[self.vec(rows)] if self.torch else torch.from_numpy(z[rows])).float().clone()
        at = torch.from_numpy(toks).to(raised.device).unsqueeze(1)
        raised.scatter_add_(1, at, torch.full_like(at, BOUNDARY_LOGIT_MARGIN, dtype=raised.dtype))
        return self.host(kept_mask(raised, setting, order=order).gather(1, at).squeeze(1))

    def vec(self, x: np.ndarray) -> Any:
        return self.lib.from_numpy(np.ascontiguousarray(x)).to(self.device) if self.torch else x

    def host(self, x: Any) -> np.ndarray:
        return x.detach().cpu().numpy() if self.torch else np.asarray(x)


@contextlib.contextmanager
def _no_grad() -> Iterator[None]:
    import torch

    with torch.no_grad():
        yield


def _prepare(be: _Backend, toks: np.ndarray, rows: SettingRows, row_of: np.ndarray,
             order: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:  # fmt: skip
    """Per position: the maximum logit, the shifted sampled logit ``z_o - max`` and the shifted
    kept-set threshold (``-inf`` without truncation); the count of tokens outside their kept
    set. Raises on NaN / +inf logits and on -inf at a sampled token."""
    n = toks.size
    top = np.empty(n)
    u_o = np.empty(n)
    thr = np.full(n, -np.inf)
    outside = 0
    truncated = rows.truncated[row_of]
    for part in be.chunks:
        z = be.rows(part)
        if be.torch:
            lib = be.lib
            m = z.max(dim=1).values
            bad = be.host(lib.isnan(z).any(dim=1) | lib.isposinf(z).any(dim=1) | ~lib.isfinite(m))
            z_o = z.gather(1, be.vec(toks[part]).unsqueeze(1)).squeeze(1)
        else:
            m = z.max(axis=1)
            bad = np.isnan(z).any(axis=1) | np.isposinf(z).any(axis=1) | ~np.isfinite(m)
            z_o = z[np.arange(z.shape[0]), toks[part]]
        if bad.any():
            i = part.start + int(np.flatnonzero(bad)[0])
            raise ValueError(f"logits at masked position {i} (in mask order) hold NaN or +inf, "
                             "or no finite entry")  # fmt: skip
        m_h, zo_h = be.host(m), be.host(z_o)
        if not np.all(np.isfinite(zo_h)):
            i = part.start + int(np.flatnonzero(~np.isfinite(zo_h))[0])
            raise ValueError(f"the sampled token at masked position {i} (in mask order) has "
                             "logit -inf (probability 0): it cannot have been sampled")  # fmt: skip
        top[part] = m_h
        u_o[part] = zo_h - m_h
        cut = truncated[part]
        if cut.any():
            idx = row_of[part]
            setting = SettingRows(rows.temperature[idx], rows.top_p[idx], rows.top_k[idx],
                                  rows.min_p[idx])  # fmt: skip
            low_h = np.where(cut, be.lowest_kept(z, setting, order), -np.inf)
            below = np.flatnonzero(cut & (zo_h < low_h))
            if below.size:  # outside only beyond what a sampler's float rounding can reach
                wide = SettingRows(setting.temperature[below],
                                   np.minimum(setting.top_p[below] + BOUNDARY_MASS_SLACK, 1.0),
                                   setting.top_k[below], setting.min_p[below])  # fmt: skip
                outside += int((~be.kept_raised(z, below, toks[part][below], wide, order)).sum())
            thr[part] = np.minimum(low_h, zo_h) - m_h
    return top, u_o, thr, outside


def _moments(be: _Backend, top: np.ndarray, thr: np.ndarray, beta: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Per position, ``E[u]``, ``Var[u]`` (``u = z - max``) and ``log sum exp(beta * u)`` under
    ``softmax(beta * z)`` restricted to the kept set (entries ``>= thr``). One pass over the
    masked logits, in place on each float64 chunk (two chunk-sized buffers)."""
    mean = np.empty(beta.size)
    var = np.empty(beta.size)
    log_norm = np.empty(beta.size)
    has_cut = bool(np.isfinite(thr).any())
    floor = np.maximum(thr, _FLOOR)  # below it: outside the kept set, or -inf
    for part in be.chunks:
        u = be.rows(part)  # a fresh float64 copy: modified in place below
        shift, b = be.vec(top[part])[:, None], be.vec(beta[part])[:, None]
        if be.torch:
            torch = be.lib
            u.sub_(shift)
            if has_cut:
                u.masked_fill_(u < be.vec(floor[part])[:, None], _FLOOR)
            else:
                u.clamp_(min=_FLOOR)  # -inf entries: weight exactly 0, no inf * 0
            e = torch.mul(u, b).exp_()
            s0 = e.sum(1)
            s1 = torch.linalg.vecdot(u, e)
            s2 = torch.linalg.vecdot(u.mul_(u), e)
        else:
            np.subtract(u, shift, out=u)
            if has_cut:
                u[u < floor[part][:, None]] = _FLOOR
            else:
                np.maximum(u, _FLOOR, out=u)
            e = np.exp(np.multiply(u, b))
            s0 = e.sum(1)
            s1 = np.einsum("ij,ij->i", u, e)
            s2 = np.einsum("ij,ij->i", np.multiply(u, u, out=u), e)
        s0_h = be.host(s0)
        m1 = be.host(s1) / s0_h
        mean[part] = m1
        var[part] = np.maximum(be.host(s2) / s0_h - m1 * m1, 0.0)
        log_norm[part] = np.log(s0_h)
    return mean, var, log_norm


def _solve(evaluate: Callable[[float], tuple[float, float]], h0: float, d0: float) -> float:
    """Root of the decreasing ``h(y)`` (``evaluate(y) -> (h, h')``) on ``|y| <= log(1000)``,
    by Newton steps kept inside a sign-change bracket; ``+-inf`` beyond the range."""
    limit = math.log(_RANGE)
    lo, hi = -math.inf, math.inf  # h(lo) > 0 > h(hi)
    y, h, d = 0.0, h0, d0
    for _ in range(100):
        if h == 0.0:
            return y
        if h > 0:
            lo = y
        else:
            hi = y
        if lo >= limit:
            return math.inf
        if hi <= -limit:
            return -math.inf
        step = -h / d if d < 0 else (1.0 if h > 0 else -1.0)
        nxt = y + step
        bounded = (max(lo, -limit), min(hi, limit))
        if not bounded[0] < nxt < bounded[1]:
            if math.isfinite(lo) and math.isfinite(hi):
                nxt = 0.5 * (lo + hi)
            elif h > 0:
                nxt = min(max(y + 2.0, nxt if math.isfinite(nxt) else y + 2.0), limit)
                nxt = limit if nxt >= hi else nxt
            else:
                nxt = max(min(y - 2.0, nxt if math.isfinite(nxt) else y - 2.0), -limit)
                nxt = -limit if nxt <= lo else nxt
        if abs(nxt - y) < 1e-12 * max(1.0, abs(y)) or (hi - lo) < 1e-12:
            return nxt
        y = nxt
        h, d = evaluate(y)
    return y


def effective_temperature(
    logits: Any,
    tokens: Any,
    mask: Any = None,
    *,
    temperature: float | Setting | SettingRows = 1.0,
    order: str = "hf",
) -> TemperatureEstimate:
    """Estimate the temperature that sampled tokens were drawn at, from their logits.

    Args:
        logits: ``(N, L, V)`` raw (un-tempered) logits aligned with ``tokens`` (``logits[:, t]``
            scores ``tokens[:, t]``), or ``(M, V)`` for ``M`` positions; a NumPy array or a
            torch tensor (any device and float dtype; computed in float64 on its device, in
            chunks of positions, never modified). Only masked positions are read: NaN and
            ``+inf`` there are errors, ``-inf`` (a banned entry) is allowed except at the
            sampled token.
        tokens: ``(N, L)`` (or ``(M,)``) sampled token ids, in ``[0, V)`` at masked positions.
        mask: same shape, boolean or 0/1: the completion tokens to use (default: all).
        temperature: the intended setting: a temperature, a :class:`metactl.knobs.Setting`
            (temperature plus truncation knobs), or a :class:`metactl.knobs.SettingRows` with
            one setting per row of the leading axis (``N``; e.g. a temperature per prompt).
        order: order of the truncations, ``"hf"`` or ``"vllm"`` (as
            :func:`metactl.knobs.kept_mask`).

    Returns:
        A :class:`TemperatureEstimate`: the maximum-likelihood temperature, the z-statistic of
        the score at the intended setting, the token count and the tokens outside their
        intended kept set.

    Raises:
        TypeError: a wrong type (names the argument).
        ValueError: wrong shapes, an empty mask, token ids out of range, NaN / +inf logits at a
            masked position or -inf at a sampled token, a temperature outside
            ``metactl.knobs.TEMPERATURE_RANGE``, a SettingRows of the wrong length, an unknown
            ``order``.

    Example:
        >>> import numpy as np
        >>> z = np.array([[2.0, 1.0, 0.0]] * 4)
        >>> est = effective_temperature(z, np.array([0, 0, 0, 1]), temperature=1.0)
        >>> round(est.temperature, 3), round(est.z, 2), est.tokens
        (0.661, -0.54, 4)
    """
    if order not in ORDERS:
        one_of(order, "order", ORDERS)
    flat, row_of, toks = _positions(logits, tokens, mask)
    rows = _setting_rows(temperature, int(logits.shape[0]))
    be = _Backend(logits, flat)
    top, u_o, thr, outside = _prepare(be, toks, rows, row_of, order)
    c = 1.0 / rows.temperature[row_of]  # per position 1 / T_i
    temps = rows.temperature[row_of]
    intended = float(temps[0]) if np.all(temps == temps[0]) else float(np.exp(-np.mean(np.log(c))))

    loglik: dict[float, float] = {}  # the log-likelihood at each evaluated y

    def evaluate(y: float) -> tuple[float, float]:
        beta = c * math.exp(y)  # 1 / (r * T_i), r = exp(-y)
        mean, var, log_norm = _moments(be, top, thr, beta)
        loglik[y] = float(np.sum(beta * u_o - log_norm))
        h = float(np.sum(c * (u_o - mean)))  # d loglik / d(1/r): decreasing in y = -log r
        d = -float(np.sum(c * c * var)) * math.exp(y)
        return h, d

    h0, d0 = evaluate(0.0)
    n = int(toks.size)
    if not d0 < 0.0:  # no information: every kept set is one token (or logits are flat ties)
        return TemperatureEstimate(math.nan, intended, math.nan, 0.0, 0.0, n, outside)
    z = -h0 / math.sqrt(-d0)  # score in r at r = 1 is -h0, its Fisher information -d0
    limit = math.log(_RANGE)
    if np.all(u_o == 0.0):  # every token is its row's argmax: the likelihood grows as T -> 0
        y = math.inf
        evaluate(limit)  # the likelihood ratio against T / 1000 (a lower bound of T -> 0's)
    else:
        y = _solve(evaluate, h0, d0)
    # the likelihood at the estimate: its last evaluation (converged, or at the range's bound)
    best = loglik[min(loglik, key=lambda v: abs(v - max(-limit, min(limit, y))))]
    z_lr = math.copysign(math.sqrt(max(0.0, 2.0 * (best - loglik[0.0]))), -y) if y else 0.0
    ratio = math.exp(-y) if math.isfinite(y) else (0.0 if y > 0 else math.inf)
    return TemperatureEstimate(ratio * intended, intended, ratio, z, z_lr, n, outside)


def check_effective_temperature(
    estimate: TemperatureEstimate,
    *,
    mode: str = "error",
    rtol: float = DEFAULT_RTOL,
    z_threshold: float = DEFAULT_Z,
    max_outside: float = DEFAULT_OUTSIDE,
) -> bool:
    """Whether sampled tokens match the intended temperature; raise or warn when they do not.

    A batch departs when its estimate is off by more than ``rtol`` in ratio (``T_hat / T``
    above ``1 + rtol`` or below ``1 / (1 + rtol)``) *and* the departure is significant: the
    likelihood-ratio statistic exceeds the threshold (``|z_lr| > z_threshold``). The first alone
    would flag small noisy batches, the second alone tiny practical differences (say bf16
    sampling, fp32 scoring) in huge ones. The defaults were calibrated on SmolLM2-135M-Instruct
    (``benchmarks/smollm2_start.py --calibrate``): no false alarm over normal batches of 16
    completions at T = 0.6, 1.0 and 1.5, while greedy batches, batches sampled at T = 1 (0.6)
    when 0.6 (1) was chosen and batches cut to generate's default top-50 are caught. It
    also departs when more than a share ``max_outside`` of the tokens lie outside the intended
    kept set (a sampler that ignored top-p, top-k or min-p). An estimate without information
    (``nan``) passes.

    Args:
        estimate: from :func:`effective_temperature`.
        mode: ``"error"`` (raise ``ValueError``), ``"warn"`` (warn with
            :class:`EffectiveTemperatureWarning`) or ``"off"`` (only return the verdict).
        rtol: relative tolerance on the temperature, ``> 0``.
        z_threshold: threshold on ``|z_lr|``, ``>= 0`` (about N(0, 1) at the intended setting:
            the default 5 is a false-alarm rate below 1e-6 per batch).
        max_outside: largest share of tokens outside their kept set, in ``[0, 1]``.

    Returns:
        True when the tokens are consistent with the intended setting, else False (in
        ``"warn"`` and ``"off"`` modes).

    Raises:
        ValueError: in ``"error"`` mode, a departure (the message names the intended and the
            estimated temperature); or a bad argument.
        TypeError: ``estimate`` is not a :class:`TemperatureEstimate`.

    Example:
        >>> est = TemperatureEstimate(temperature=1.02, intended=0.6, ratio=1.7, z=31.0,
        ...                           z_lr=22.0, tokens=512)
        >>> check_effective_temperature(est, mode="off")
        False
        >>> check_effective_temperature(est)
        Traceback (most recent call last):
        ...
        ValueError: sampled tokens look drawn at temperature 1.02, not the intended 0.6 ...
    """
    if not isinstance(estimate, TemperatureEstimate):
        raise TypeError(f"estimate must be a TemperatureEstimate (from effective_temperature), "
                        f"got {type(estimate).__name__}")  # fmt: skip
    mode, tol, zt = _check_arguments(mode, rtol, z_threshold)
    share = finite_scalar(max_outside, "max_outside")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"max_outside must lie in [0, 1], got {share}")
    problems = []
    ratio = estimate.ratio
    if (
        not math.isnan(ratio)
        and abs(estimate.z_lr) > zt
        and (ratio > 1.0 + tol or ratio < 1.0 / (1.0 + tol))
    ):
        problems.append(
            f"sampled tokens look drawn at temperature {estimate.temperature:.3g}, not the "
            f"intended {estimate.intended:.3g} (z = {estimate.z_lr:.1f} over {estimate.tokens} "
            "tokens): the sampler is not applying the chosen temperature (check the generation "
            "config, the engine's sampling parameters)"
        )
    if estimate.outside > share * estimate.tokens:
        problems.append(
            f"{estimate.outside} of {estimate.tokens} sampled tokens lie outside the intended "
            "kept set (top-k / top-p / min-p): the sampler is not applying the truncation"
        )
    if not problems:
        return True
    return _report("; ".join(problems), mode)


def _check_arguments(mode: Any, rtol: Any, z_threshold: Any) -> tuple[str, float, float]:
    """A check's validated ``mode``, ``rtol`` (``> 0``) and ``z_threshold`` (``>= 0``)."""
    mode = one_of(mode, "mode", CHECK_MODES)
    tol = finite_scalar(rtol, "rtol")
    if tol <= 0:
        raise ValueError(f"rtol must be > 0, got {tol}")
    zt = finite_scalar(z_threshold, "z_threshold")
    if zt < 0:
        raise ValueError(f"z_threshold must be >= 0, got {zt}")
    return mode, tol, zt


def _report(message: str, mode: str) -> bool:
    """A departure: raise in ``"error"`` mode, warn in ``"warn"`` mode; ``False``."""
    if mode == "error":
        raise ValueError(message)
    if mode == "warn":
        warnings.warn(message, EffectiveTemperatureWarning, stacklevel=3)
    return False


# ----------------------------------------------------------------------------------------------
# from log-probabilities and entropies (no logits)
# ----------------------------------------------------------------------------------------------
def _token_values(x: Any, name: str) -> np.ndarray:
    """``x`` (a NumPy array or torch tensor of floats) as a float64 array."""
    if _is_tensor(x):
        if not x.is_floating_point():
            raise TypeError(f"{name} must hold floating-point values, got {x.dtype}")
        x = x.detach().cpu().double().numpy()
    elif not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got "
                        f"{type(x).__name__}")  # fmt: skip
    elif not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must hold floating-point values, got {x.dtype}")
    if x.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape (N, L) or (M,), got {x.shape}")
    return np.asarray(x, dtype=np.float64)


def _row_temperatures(temperature: Any, n_rows: int) -> np.ndarray:
    """The intended temperature of each leading-axis row: a number, one per row (a sequence,
    an array or a tensor), or an untruncated :class:`Setting` / :class:`SettingRows`."""
    if isinstance(temperature, (Setting, SettingRows)):
        rows = _setting_rows(temperature, n_rows)
        if rows.truncated.any():
            raise ValueError(
                "temperature_score scores the full distribution (the entropy a log-prob pass "
                "returns is over every token): a truncated setting (top-p, top-k, min-p) needs "
                "the kept set's entropy; use effective_temperature on the logits"
            )
        return rows.temperature
    if _is_tensor(temperature) or isinstance(temperature, (list, tuple, np.ndarray)):
        if _is_tensor(temperature):
            temperature = temperature.detach().cpu().numpy()
        if np.ndim(temperature) == 0:
            return _setting_rows(float(np.asarray(temperature)), n_rows).temperature
        return Setting().rows(n_rows, temperature=temperature).temperature
    return _setting_rows(temperature, n_rows).temperature


def temperature_score(
    log_probs: Any,
    entropies: Any,
    mask: Any = None,
    *,
    temperature: Any = 1.0,
) -> TemperatureScore:
    """Test whether sampled tokens were drawn at the intended temperature, from each token's
    log-probability and its distribution's entropy at that temperature (no logits).

    Per token, ``s = -(H + log p_T(o))`` is the score of the temperature's factor (``T`` times
    ``d/dT log p_T(o)``): mean zero when the token was drawn at ``T``. The result's ``z`` is
    ``sum(s) / sqrt(sum(s**2))``; its ``ratio`` one Newton step ``exp(sum(s) / sum(s**2))``.
    Costs one pass over the tokens (no pass over a vocabulary).

    Args:
        log_probs: ``(N, L)`` (or ``(M,)``) log-probability of each sampled token under
            ``softmax(z / T)`` of its row's intended ``T`` (a NumPy array or torch tensor; read
            in float64). Finite and ``<= 0`` (up to rounding) at masked positions.
        entropies: same shape: the entropy of each position's distribution at that ``T``
            (nats), finite and ``>= 0`` (up to rounding) at masked positions.
        mask: same shape, boolean or 0/1: the positions to use (default: all). Values outside
            it are never read (NaN padding is fine).
        temperature: the intended temperature: a number, one per row of the leading axis
            (``N`` values: a sequence, an array or a tensor), or an untruncated
            :class:`metactl.knobs.Setting` / :class:`metactl.knobs.SettingRows`.

    Returns:
        A :class:`TemperatureScore`.

    Raises:
        TypeError: a wrong type (names the argument).
        ValueError: shapes that differ, an empty mask, a non-finite value or a positive
            log-probability / negative entropy at a masked position (names it), a temperature
            outside ``metactl.knobs.TEMPERATURE_RANGE`` or of the wrong length, a truncated
            setting (its entropy is not the full distribution's).

    Example:
        >>> import numpy as np
        >>> p = np.array([0.7, 0.2, 0.1])
        >>> entropy = np.full(4, -(p * np.log(p)).sum())
        >>> score = temperature_score(np.log(p[[0, 0, 1, 2]]), entropy, temperature=1.0)
        >>> round(score.z, 2), round(score.excess, 3), score.tokens
        (0.78, 0.355, 4)
    """
    lp = _token_values(log_probs, "log_probs")
    h = _token_values(entropies, "entropies")
    if h.shape != lp.shape:
        raise ValueError(f"entropies must have the shape of log_probs {lp.shape}, got {h.shape}")
    if mask is None:
        sel = np.ones(lp.shape, dtype=bool)
    else:
        m = mask.detach().cpu().numpy() if _is_tensor(mask) else np.asarray(mask)
        if m.shape != lp.shape:
            raise ValueError(f"mask must have the shape of log_probs {lp.shape}, got {m.shape}")
        if not (m.dtype == np.bool_ or np.issubdtype(m.dtype, np.number)):
            raise TypeError(f"mask must be boolean or 0/1, got dtype {m.dtype}")
        if m.dtype != np.bool_ and not np.isin(m, (0, 1)).all():
            raise ValueError("mask must hold only 0 and 1")
        sel = m.astype(bool)
    if not sel.any():
        raise ValueError("mask selects no position: nothing to score")
    temps = _row_temperatures(temperature, lp.shape[0])
    for name, values, bad in (
        ("log_probs", lp, lambda v: ~np.isfinite(v) | (v > _ROUNDING)),
        ("entropies", h, lambda v: ~np.isfinite(v) | (v < -_ROUNDING)),
    ):
        wrong = sel & bad(values)
        if wrong.any():
            at = tuple(int(i) for i in np.argwhere(wrong)[0])
            what = "<= 0" if name == "log_probs" else ">= 0"
            raise ValueError(f"{name} at masked position {at} is {float(values[at])!r}: it must be "
                             f"finite and {what}")  # fmt: skip
    rows = np.broadcast_to(np.arange(lp.shape[0]).reshape(-1, *([1] * (lp.ndim - 1))), lp.shape)
    s = -(h[sel] + lp[sel])
    per_token = temps[rows[sel]]
    intended = (float(per_token[0]) if np.all(per_token == per_token[0])
                else float(np.exp(np.mean(np.log(per_token)))))  # fmt: skip
    total, information, n = float(s.sum()), float(np.dot(s, s)), int(s.size)
    if information == 0.0:  # every token exactly as surprising as its entropy: no information
        return TemperatureScore(math.nan, intended, math.nan, 0.0, 0.0, 0.0, n)
    z = total / math.sqrt(information)
    ratio = math.exp(total / information)
    return TemperatureScore(ratio * intended, intended, ratio, z, z / math.sqrt(n), total / n, n)


def check_temperature_score(
    score: TemperatureScore,
    *,
    mode: str = "error",
    z_threshold: float = DEFAULT_SCORE_Z,
    min_effect: float = DEFAULT_SCORE_EFFECT,
) -> bool:
    """Whether sampled tokens match the intended temperature by :func:`temperature_score`;
    raise or warn when they do not.

    A batch departs when its departure is significant (``|z| > z_threshold``) *and* large
    (``|effect| > min_effect``): the first keeps small noisy batches from failing, the second
    tiny practical differences in huge ones (a bf16 sampler scored in fp32: ``|effect|``
    around 0.01). ``z`` is bounded by ``sqrt(tokens)`` (and ``|effect|`` by 1), so a batch needs
    more than ``z_threshold**2`` tokens to fail at all and a few hundred to catch a wrong
    temperature (tokens drawn at 1.0, scored at 0.6: ``effect`` about 0.42 on SmolLM2, so about
    140 tokens for ``z > 5``). The defaults were calibrated on SmolLM2-135M-Instruct (no false
    alarm over 90 normal batches at 0.6, 1.0 and 1.5; every greedy batch and every batch
    sampled at 1.0 (0.6) and scored at 0.6 (1.0) caught) and on the verl adapter's test model
    (see ``docs/verl.md``). No information (``nan``) passes.

    Args:
        score: from :func:`temperature_score`.
        mode: ``"error"`` (raise ``ValueError``), ``"warn"`` (warn with
            :class:`EffectiveTemperatureWarning`) or ``"off"`` (only return the verdict).
        z_threshold: threshold on ``|z|``, ``>= 0``.
        min_effect: threshold on ``|effect|``, in ``[0, 1)``.

    Returns:
        True when the tokens are consistent with the intended temperature, else False (in
        ``"warn"`` and ``"off"`` modes).

    Raises:
        ValueError: in ``"error"`` mode, a departure (the message names the intended
            temperature, the direction and the statistics); or a bad argument.
        TypeError: ``score`` is not a :class:`TemperatureScore`.

    Example:
        >>> score = TemperatureScore(temperature=0.27, intended=0.6, ratio=0.45, z=-19.0,
        ...                          effect=-0.84, excess=-0.8, tokens=512)
        >>> check_temperature_score(score, mode="off")
        False
        >>> check_temperature_score(score)
        Traceback (most recent call last):
        ...
        ValueError: sampled tokens look drawn colder than the intended temperature 0.6 ...
    """
    if not isinstance(score, TemperatureScore):
        raise TypeError(f"score must be a TemperatureScore (from temperature_score), got "
                        f"{type(score).__name__}")  # fmt: skip
    mode, _, zt = _check_arguments(mode, 1.0, z_threshold)
    effect = finite_scalar(min_effect, "min_effect")
    if not 0.0 <= effect < 1.0:
        raise ValueError(f"min_effect must lie in [0, 1), got {effect}")
    if math.isnan(score.ratio) or abs(score.z) <= zt or abs(score.effect) <= effect:
        return True
    side = "hotter" if score.z > 0 else "colder"
    return _report(
        f"sampled tokens look drawn {side} than the intended temperature {score.intended:.3g} "
        f"(score z = {score.z:.1f}, effect {score.effect:+.2f} over {score.tokens} tokens; "
        f"{score.excess:+.3f} nats of surprisal per token over the entropy): the sampler is "
        "not applying the chosen temperature (check the engine's sampling parameters, a "
        "greedy or evaluation setting left in place)",
        mode,
    )
