"""The names the reference trainer and its config use for the sampler setting.

The setting itself, its validation and the truncated distribution the rollout samples from and
every log-prob of a GRPO batch is scored with are :mod:`metactl.knobs`' (`Setting`,
`truncated_probs`, `log_probs`): with a truncation on, every log-prob is the smoothed
``log q = log((1 - eps) p_trunc + eps p)`` (``eps = metactl.knobs.SMOOTHING_EPS``), exactly
what `metactl.likelihood.candidate_loglik` scores a candidate with. On a kept token (every
sampled token, at the rollout policy) ``q(o) = p_trunc(o) (1 - eps (1 - Z))``, ``Z`` the kept
mass, so PPO's log-ratio differs from the exact sampling log-ratio by at most ``-log(1 - eps)``
(1.0e-3) in absolute value; in exchange ``q`` is finite on a token outside the kept set (after
an update, or where the scoring pass's logits round a boundary token differently from the
sampling loop's), where ``log p_trunc`` would be ``-inf`` and the ratio's gradient NaN. With no
truncation ``q = p`` and the trainer takes its plain ``log_softmax(z / T)`` path.

`SamplerSetting` and `Truncation` are `metactl.knobs.Setting` under the names the trainer and
its config use (a temperature plus a truncation, ``top_k=0`` off).

Example:
    >>> SamplerSetting(0.8, Truncation(top_p=0.9)).with_values({"top_k": 5}).as_dict()
    {'temperature': 0.8, 'top_p': 0.9, 'top_k': 5, 'min_p': 0.0}
    >>> Truncation(top_p=0.9).active, Truncation().active
    (True, False)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from metactl.knobs import SMOOTHING_EPS, Setting, log_probs

__all__ = ["SamplerSetting", "Truncation", "setting_logprobs"]


class Truncation(Setting):
    """The truncation knobs of a `metactl.knobs.Setting` (at temperature 1): ``top_k=0``,
    ``top_p=1`` and ``min_p=0`` are off.

    Example:
        >>> Truncation(top_p=1.5)
        Traceback (most recent call last):
        ...
        ValueError: top_p must lie in (0, 1], got 1.5
    """

    def __init__(self, top_p: float = 1.0, top_k: int | None = 0, min_p: float = 0.0) -> None:
        off = top_k is None or (top_k == 0 and not isinstance(top_k, bool))
        super().__init__(1.0, top_p, None if off else top_k, min_p)

    @property
    def active(self) -> bool:
        """Whether any truncation is on (`metactl.knobs.Setting.truncated`)."""
        return self.truncated


class SamplerSetting(Setting):
    """A `metactl.knobs.Setting` built from a temperature and a `Truncation`."""

    def __init__(self, temperature: float = 1.0, truncation: Setting | None = None) -> None:
        cut = Truncation() if truncation is None else truncation
        if not isinstance(cut, Setting):
            raise TypeError(f"truncation must be a knobs.Truncation, got {truncation!r}")
        super().__init__(temperature, cut.top_p, cut.top_k, cut.min_p)

    @property
    def truncation(self) -> Truncation:
        """This setting's truncation knobs."""
        return Truncation(self.top_p, self.top_k, self.min_p)

    def with_values(self, values: Mapping[str, Any]) -> SamplerSetting:
        new = Setting.with_values(self, values)
        return SamplerSetting(new.temperature, Truncation(new.top_p, new.top_k, new.min_p))


def setting_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                     temperature: float | torch.Tensor, truncation: Setting,
                     eps: float | None = None) -> torch.Tensor:
    """``log q(tokens)`` (N, C) under ``truncation``'s knobs at ``temperature`` (a float > 0 or
    one per row, (N,)): `metactl.knobs.log_probs` of the tokens, differentiable in ``logits``
    (N, C, V); ``log_softmax(logits / T)`` exactly with no truncation on."""
    if not isinstance(truncation, Setting):
        raise TypeError(f"truncation must be a knobs.Truncation, got {truncation!r}")
    return log_probs(logits, truncation.at_temperature(temperature), tokens,
                     epsilon=SMOOTHING_EPS if eps is None else eps)
