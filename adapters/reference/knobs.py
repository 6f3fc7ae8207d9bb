"""The reference trainer's sampler settings: which knobs a meta-policy sets, the truncated
distribution the rollout samples from, and the exact log-probability of a sampled token under
it (what every log-prob of a GRPO batch is computed with).

A sampler setting is a temperature and a truncation (`Truncation`: top-k, top-p, min-p; each off
by default). The trainer's `GRPOConfig` holds the fixed setting (``rollout_temperature``,
``rollout_top_p``, ``rollout_top_k``, ``rollout_min_p``); each step the policy's decision
overrides the knobs the policy sets (``decision.setting``): a temperature policy sets the
temperature, a top-p policy the nucleus (at the configured temperature), a joint policy every
knob of its grid.

The distribution is `metactl.likelihood`'s definition, in HF ``generate``'s order of operations
(temperature, then top-k, then top-p on the top-k survivors, then min-p; see
`metactl.likelihood.families`): with ``p = softmax(z / T)``, the kept set is a prefix of the
tokens sorted by logit, ties kept together (top-k keeps every logit ``>=`` the ``k``-th; top-p
keeps a token when the mass strictly more likely than it is ``< top_p`` times the top-k
survivors' mass; min-p keeps ``p_v >= min_p * max p``). The rollout draws from
``p_trunc = p [kept] / Z`` (`truncated_probs`), ``Z`` the kept mass; every log-prob of the batch
is the family's smoothed log-probability (`setting_logprobs`)::

    log q(o) = log p(o) + log((1 - eps) [o kept] / Z + eps),      eps = SMOOTHING_EPS

i.e. ``q = (1 - eps) p_trunc + eps p``, exactly what `metactl.likelihood.candidate_loglik`
scores a candidate with (same ``eps``), so the loss and the meta-policy's candidate likelihoods
use one definition. On a kept token (every sampled token, at the rollout policy)
``q(o) = p_trunc(o) (1 - eps (1 - Z))``, so PPO's log-ratio ``log q_new(o) - log q_old(o)``
equals the exact sampling log-ratio ``log p_trunc,new(o) - log p_trunc,old(o)`` up to
``log((1 - eps (1 - Z_new)) / (1 - eps (1 - Z_old)))``, at most ``-log(1 - eps)`` (1.0e-3) in
absolute value. In exchange ``q`` is finite on a token outside the kept set: after an update
(the current policy's nucleus may no longer hold a token the old one sampled), or when the
scoring pass's logits round a boundary token differently from the sampling loop's KV-cache
logits; the unsmoothed ``log p_trunc`` would be ``-inf`` there and the ratio's gradient NaN.
With no truncation ``q = p`` exactly and the trainer takes its plain temperature path
(``log_softmax(z / T)``, `rollout.token_logprobs`), unchanged.

Example:
    >>> import torch
    >>> z = torch.tensor([[[3.0, 2.0, 0.0, -1.0]]])
    >>> cut = Truncation(top_p=0.8)
    >>> kept_mask(z[0] / 1.0, cut).tolist()   # the nucleus of mass 0.8: the top two tokens
    [[True, True, False, False]]
    >>> q = setting_logprobs(z, torch.tensor([[2]]), 1.0, cut)   # a token outside it
    >>> bool(torch.isfinite(q).all()) and float(q) < float(torch.log_softmax(z, -1)[0, 0, 2])
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from metactl.knobs import check_knob

__all__ = [
    "SAMPLER_KNOBS",
    "SMOOTHING_EPS",
    "SamplerSetting",
    "Truncation",
    "check_policy_knobs",
    "kept_mask",
    "setting_logprobs",
    "truncated_probs",
]

#: The knobs the reference sampler can set (`metactl.knobs.KNOBS`, all of them).
SAMPLER_KNOBS: tuple[str, ...] = ("temperature", "top_p", "top_k", "min_p")
#: The smoothing weight of truncated distributions: `metactl.likelihood.candidate_loglik`'s
#: default ``epsilon``, so the loss and the candidate likelihoods use the same ``q``.
SMOOTHING_EPS = 1e-3
# kept-set scratch per call, in logit entries (a sort's values and int64 indices): 64 MiB
_CHUNK_ENTRIES = 1 << 23


@dataclass(frozen=True)
class Truncation:
    """Top-k, top-p and min-p of the sampler; ``top_k=0``, ``top_p=1``, ``min_p=0`` are off.

    Example:
        >>> Truncation().active, Truncation(top_k=5).active
        (False, True)
        >>> Truncation(top_p=1.5)
        Traceback (most recent call last):
        ...
        ValueError: top_p must lie in (0, 1], got 1.5
    """

    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "top_p", float(check_knob("top_p", self.top_p)))
        if self.top_k != 0 or isinstance(self.top_k, bool):  # 0 = off; else an int >= 1
            object.__setattr__(self, "top_k", int(check_knob("top_k", self.top_k)))
        object.__setattr__(self, "min_p", float(check_knob("min_p", self.min_p)))

    @property
    def active(self) -> bool:
        """Whether any truncation is on."""
        return self.top_p < 1.0 or self.top_k > 0 or self.min_p > 0.0


@dataclass(frozen=True)
class SamplerSetting:
    """A full sampler setting: ``temperature`` (> 0) and a `Truncation`.

    Example:
        >>> base = SamplerSetting(1.0)
        >>> base.with_values({"top_p": 0.9}).as_dict()
        {'temperature': 1.0, 'top_p': 0.9, 'top_k': None, 'min_p': 0.0}
    """

    temperature: float = 1.0
    truncation: Truncation = Truncation()

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperature",
                           float(check_knob("temperature", self.temperature)))
        if not isinstance(self.truncation, Truncation):
            raise TypeError(f"truncation must be a Truncation, got {self.truncation!r}")

    def with_values(self, values: dict[str, Any]) -> SamplerSetting:
        """This setting with the knobs in ``values`` (``{knob: value}``, e.g. a decision's
        ``setting``) replaced; an unknown knob raises `ValueError`."""
        unknown = sorted(set(values) - set(SAMPLER_KNOBS))
        if unknown:
            raise ValueError(f"the reference sampler has no knob {unknown}; it sets "
                             f"{list(SAMPLER_KNOBS)}")
        cut = self.truncation
        top_k = values.get("top_k", cut.top_k)
        return SamplerSetting(
            float(values.get("temperature", self.temperature)),
            Truncation(top_p=values.get("top_p", cut.top_p),
                       top_k=0 if top_k is None else top_k,
                       min_p=values.get("min_p", cut.min_p)))

    def as_dict(self) -> dict[str, Any]:
        """Every knob's value (``top_k`` ``None`` when off), JSON-safe."""
        cut = self.truncation
        return {"temperature": self.temperature, "top_p": cut.top_p,
                "top_k": cut.top_k or None, "min_p": cut.min_p}

    def fixed_knobs(self, varied: tuple[str, ...]) -> dict[str, Any]:
        """`metactl.likelihood.candidate_loglik`'s fixed-knob keywords: every knob the
        candidates do not set (``varied``), at this setting's value."""
        return {k: v for k, v in self.as_dict().items() if k not in varied}


def check_policy_knobs(policy: Any) -> tuple[str, ...]:
    """The knobs ``policy`` sets (``policy.knobs``); raises `ValueError` for a policy the
    reference trainer cannot apply: one that sets no sampler knob (``"generic"``), a knob the
    sampler does not have, or a per-prompt policy over anything but the temperature."""
    hyper = getattr(policy, "hyperparameter", "temperature")
    knobs = tuple(getattr(policy, "knobs", (hyper,)))
    if hyper == "generic" or not knobs:
        raise ValueError(
            "the reference trainer cannot apply a policy over hyperparameter='generic': it sets "
            f"no sampler knob; use one of {list(SAMPLER_KNOBS)} or a joint grid "
            "(metactl.grid(...))")
    unknown = [k for k in knobs if k not in SAMPLER_KNOBS]
    if unknown:
        raise ValueError(f"the reference sampler has no knob {unknown}; it sets "
                         f"{list(SAMPLER_KNOBS)}")
    if getattr(policy, "contextual", False) and knobs != ("temperature",):
        raise ValueError(
            f"a per-prompt policy over {list(knobs)} is not supported by the reference trainer "
            "(per-prompt policies set one temperature per prompt group); use a global policy "
            "over that knob, or a per-prompt policy over the temperature")
    return knobs


def _check_truncation(truncation: object) -> None:
    if not isinstance(truncation, Truncation):
        raise TypeError(f"truncation must be a knobs.Truncation, got {truncation!r}")


def _divide(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """``logits`` (N, ...) in float32 divided by the float, or row ``i`` by ``temperature[i]``
    (the same arithmetic as `rollout`'s)."""
    if isinstance(temperature, torch.Tensor):
        shape = (-1,) + (1,) * (logits.ndim - 1)
        return logits.float() / temperature.to(device=logits.device,
                                               dtype=torch.float32).reshape(shape)
    return logits.float() / temperature


@torch.no_grad()
def kept_mask(scaled: torch.Tensor, truncation: Truncation) -> torch.Tensor:
    """Boolean mask of the kept tokens (HF order: top-k, top-p on its survivors, min-p) of
    every row of ``scaled`` (..., V), the tempered logits ``z / T`` in float32.

    Rows are processed in chunks (a sort's values and indices of ``2**23`` logits at most).
    ``-inf`` logits (banned tokens) have probability 0 and are kept only when nothing truncates.
    """
    _check_truncation(truncation)
    if not scaled.is_floating_point() or scaled.ndim < 1 or scaled.shape[-1] < 1:
        raise ValueError(f"scaled must be a floating tensor (..., V), got {scaled.dtype} "
                         f"{tuple(scaled.shape)}")
    vocab = scaled.shape[-1]
    flat = scaled.reshape(-1, vocab).float()
    if not truncation.active:
        return torch.ones_like(flat, dtype=torch.bool).reshape(scaled.shape)
    out = torch.empty_like(flat, dtype=torch.bool)
    rows = max(1, _CHUNK_ENTRIES // vocab)
    for s in range(0, flat.shape[0], rows):
        out[s:s + rows] = _kept_rows(flat[s:s + rows], truncation)
    return out.reshape(scaled.shape)


def _kept_rows(s: torch.Tensor, cut: Truncation) -> torch.Tensor:
    """`kept_mask` of a chunk (R, V) of float32 tempered logits."""
    r, vocab = s.shape
    vals = s.sort(dim=-1, descending=True).values
    w = torch.exp(vals - vals[:, :1])  # p / p_max, sorted descending
    cum = w.cumsum(-1)
    full = torch.full((r,), vocab, dtype=torch.long, device=s.device)
    if cut.top_k:  # ties at the k-th logit are kept (HF, vLLM)
        kth = vals[:, min(cut.top_k, vocab) - 1:min(cut.top_k, vocab)]
        n_k = (vals >= kth).sum(-1)
    else:
        n_k = full
    n = torch.minimum(n_k, (w >= cut.min_p).sum(-1) if cut.min_p > 0 else full)
    if cut.top_p < 1.0:
        # the mass strictly more likely than each token: cum before its tie group's first
        # entry (equal for the whole group, so a tie at the boundary is kept or dropped whole)
        idx = torch.arange(vocab, device=s.device).expand(r, vocab)
        new_group = torch.ones_like(vals, dtype=torch.bool)
        new_group[:, 1:] = vals[:, 1:] != vals[:, :-1]
        first = torch.where(new_group, idx, torch.zeros_like(idx)).cummax(-1).values
        above = (cum - w).gather(-1, first)
        base_mass = cum.gather(-1, (n_k - 1)[:, None])  # top-p measures the top-k survivors
        n = torch.minimum(n, (above < cut.top_p * base_mass).sum(-1))
    threshold = vals.gather(-1, (n.clamp(min=1) - 1)[:, None])  # the last kept logit
    return s >= threshold


def truncated_probs(logits: torch.Tensor, temperature: float | torch.Tensor,
                    truncation: Truncation) -> torch.Tensor:
    """The sampling distribution ``p_trunc`` (N, V): ``softmax(logits / T)`` restricted to the
    kept set and renormalised; ``temperature`` a float > 0 or one per row (N,)."""
    _check_truncation(truncation)
    probs = torch.softmax(_divide(logits, temperature), dim=-1)
    if not truncation.active:
        return probs
    kept = kept_mask(_divide(logits, temperature), truncation)
    probs = probs * kept
    return probs / probs.sum(-1, keepdim=True)


def setting_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                     temperature: float | torch.Tensor, truncation: Truncation,
                     eps: float = SMOOTHING_EPS) -> torch.Tensor:
    """``log q(tokens)`` (N, C) float32 under the smoothed truncated distribution (the module
    docstring's ``q``), differentiable in ``logits`` (N, C, V); ``temperature`` a float > 0 or
    one per row (N,). With no active truncation it is ``log_softmax(logits / T)`` exactly."""
    _check_truncation(truncation)
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    if logits.ndim != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (N, C, V) and tokens (N, C), got "
                         f"{tuple(logits.shape)} and {tuple(tokens.shape)}")
    scaled = _divide(logits, temperature)
    logp = torch.log_softmax(scaled, dim=-1)
    logp_o = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if not truncation.active:
        return logp_o
    kept = kept_mask(scaled.detach(), truncation)
    kept_o = kept.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    # the kept mass Z (differentiable; the kept set itself is piecewise constant in the logits)
    frac = (logp.exp() * kept).sum(-1).clamp(min=1e-38, max=1.0)
    ratio = torch.where(kept_o, (1.0 - eps) / frac + eps, torch.full_like(frac, eps))
    # q(o) <= 1 exactly; the clamp removes rounding only (as candidate_loglik does)
    return (logp_o + ratio.log()).clamp(max=0.0)
