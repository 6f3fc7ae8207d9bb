"""Which sampling knobs a meta-policy sets in TRL, and how its candidates are scored there.

A :class:`metactl.MetaPolicy` over the temperature, ``top_p``, ``top_k``, ``min_p`` or a joint
grid of them (``hyperparameter="joint"``, :func:`metactl.grid`) *owns* those knobs: the trainer
writes the chosen setting wherever TRL keeps each knob (:mod:`.patching`). Every knob it does not
own stays at the user's value (``GRPOConfig.temperature``, ``top_p``, ``top_k``, ``min_p``,
possibly overridden by ``generation_kwargs``) and is held fixed when the candidates are scored,
in the engine's order of operations (``order="hf"`` for transformers ``generate``, ``"vllm"``
for vLLM), exactly as :func:`metactl.likelihood.candidate_loglik` defines the families.

Example:
    >>> import metactl
    >>> knobs = PolicyKnobs.from_policy(metactl.MetaPolicy([0.9, 1.0], metactl.EXP3(),
    ...                                                    hyperparameter="top_p"))
    >>> knobs.knobs, knobs.family, knobs.settings
    (('top_p',), 'top_p', [{'top_p': 0.9}, {'top_p': 1.0}])
    >>> scoring = knobs.scoring({"temperature": 0.8, "top_k": 0, "min_p": None}, order="hf")
    >>> scoring.temperature, scoring.top_k, scoring.min_p
    (0.8, None, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from metactl.knobs import KNOBS, check_knob
from metactl.likelihood import candidate_loglik

__all__ = ["SETTABLE_KNOBS", "CandidateScoring", "PolicyKnobs", "fixed_knob", "knob_label"]

#: The sampling knobs ``MetaGRPOTrainer`` can set, in canonical order.
SETTABLE_KNOBS: tuple[str, ...] = KNOBS

KnobValue = float | int


def fixed_knob(knob: str, value: Any) -> KnobValue | None:
    """A user's (not meta-controlled) value of ``knob`` as the likelihood families take it.

    TRL and the engines spell "off" in several ways (``top_k=0`` or ``-1``, ``min_p=None``,
    ``top_p=None``); they all become the family's off value (``top_k=None``, ``min_p=0.0``,
    ``top_p=1.0``).

    Raises:
        ValueError / TypeError: a value outside the knob's range (names the knob).

    Example:
        >>> fixed_knob("top_k", 0), fixed_knob("top_k", 40), fixed_knob("min_p", None)
        (None, 40, 0.0)
    """
    if knob == "top_k":
        if value is None or (
            isinstance(value, int) and not isinstance(value, bool) and value in (0, -1)
        ):
            return None
        return check_knob("top_k", value)
    if value is None:
        return {"temperature": 1.0, "top_p": 1.0, "min_p": 0.0}[knob]
    return check_knob(knob, value)


def knob_label(setting: Mapping[str, KnobValue]) -> str:
    """The metric label of one candidate: ``'0.9'`` for one knob, ``'temperature=0.9,top_p=1'``
    for a joint setting (the labels of :meth:`metactl.knobs.KnobGrid.labels`).

    Example:
        >>> knob_label({"top_p": 0.95}), knob_label({"temperature": 0.7, "top_k": 20})
        ('0.95', 'temperature=0.7,top_k=20')
    """
    if len(setting) == 1:
        return f"{next(iter(setting.values())):g}"
    return ",".join(f"{k}={v:g}" for k, v in setting.items())


def _as_setting_value(knob: str, value: Any) -> KnobValue:
    if knob == "top_k":
        return int(value)
    return float(value)


@dataclass(frozen=True)
class CandidateScoring:
    """How the candidates of one policy are scored on one engine: the family, the candidates
    (values of the owned knob, or joint mappings), the fixed knobs and the order.

    :meth:`loglik` is :func:`metactl.likelihood.candidate_loglik` with exactly these arguments.
    A plain list of temperatures (the scoring functions' old argument) is
    ``CandidateScoring.of([0.7, 1.0])``.

    Example:
        >>> import numpy as np
        >>> s = CandidateScoring(candidates=(0.8, 1.2), family="temperature", top_p=0.9)
        >>> s.loglik(np.zeros((1, 2, 4)), np.array([[0, 3]]), np.ones((1, 2))).shape
        (1, 2)
        >>> s.plain_temperatures is None, CandidateScoring.of([0.8, 1.2]).plain_temperatures
        (True, [0.8, 1.2])
    """

    candidates: tuple[Any, ...]
    family: str = "temperature"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    order: str = "hf"

    @classmethod
    def of(cls, candidates: Sequence[float] | CandidateScoring) -> CandidateScoring:
        """``candidates`` itself, or the plain temperature family over a list of temperatures."""
        if isinstance(candidates, CandidateScoring):
            return candidates
        values = tuple(float(c) for c in candidates)
        if len(values) < 1:
            raise ValueError("candidates must not be empty")
        return cls(candidates=values)

    def __len__(self) -> int:
        return len(self.candidates)

    @property
    def plain_temperatures(self) -> list[float] | None:
        """The candidate temperatures when nothing but the temperature shapes the distribution
        (the case TRL's fused head tiles can be folded online), else ``None``."""
        if self.family != "temperature":
            return None
        if self.top_p != 1.0 or self.top_k is not None or self.min_p != 0.0:
            return None
        return [float(c) for c in self.candidates]

    def loglik(self, logits: Any, tokens: Any, mask: Any) -> Any:
        """``(N, K)`` length-normalised log-likelihoods (see ``candidate_loglik``)."""
        return candidate_loglik(
            logits,
            tokens,
            mask,
            list(self.candidates),
            self.family,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            order=self.order,
        )


@dataclass(frozen=True)
class PolicyKnobs:
    """The knobs a policy sets, its likelihood family and every candidate's setting.

    Attributes:
        knobs: the owned knobs (``("temperature",)``, ``("top_p",)``, ... or a joint grid's).
        family: the likelihood family (``"temperature"``, ``"top_p"``, ``"top_k"``,
            ``"min_p"`` or ``"joint"``).
        settings: candidate ``k``'s setting ``{knob: value}``, for every ``k``.
    """

    knobs: tuple[str, ...]
    family: str
    settings: list[dict[str, KnobValue]]

    @classmethod
    def from_policy(cls, policy: Any) -> PolicyKnobs:
        """Read ``policy.knobs``, ``policy.family`` and ``policy.setting(k)``.

        Raises:
            ValueError: a policy over a hyperparameter TRL's samplers have no knob for
                (``"generic"``). Every knob of :data:`metactl.knobs.KNOBS` can be set.
        """
        knobs = tuple(policy.knobs)
        if not knobs:
            raise ValueError(
                f"meta_policy controls {policy.hyperparameter!r}, which is no sampling knob of "
                f"TRL's generation; MetaGRPOTrainer sets {list(SETTABLE_KNOBS)} (one of them, or "
                "a joint grid: hyperparameter='joint')"
            )
        settings = [
            {knob: _as_setting_value(knob, policy.setting(k)[knob]) for knob in knobs}
            for k in range(len(policy.probs))
        ]
        return cls(knobs=knobs, family=str(policy.family), settings=settings)

    def setting(self, value: Any) -> dict[str, KnobValue]:
        """The sampler setting of a decision value (a number for one knob, a mapping for a
        joint decision); checked against each knob's range.

        Raises:
            ValueError: a mapping that does not set exactly :attr:`knobs`, or a value out of
                range (names the knob).
        """
        if isinstance(value, Mapping):
            if set(value) != set(self.knobs):
                raise ValueError(
                    f"the decision sets {sorted(value)}, the policy owns {list(self.knobs)}"
                )
            items = {knob: value[knob] for knob in self.knobs}
        else:
            if len(self.knobs) != 1:
                raise ValueError(f"a decision over {list(self.knobs)} needs a mapping value")
            items = {self.knobs[0]: value}
        out: dict[str, KnobValue] = {}
        for knob, v in items.items():
            # Decision.value carries a top_k as the float of the integer
            if knob == "top_k" and isinstance(v, float):
                if not (math.isfinite(v) and v == int(v)):
                    raise ValueError(f"top_k must be an integer, got {v!r}")
                v = int(v)
            out[knob] = check_knob(knob, v)
        return out

    @property
    def scored_candidates(self) -> tuple[Any, ...]:
        """The candidates as ``candidate_loglik`` takes them for :attr:`family`."""
        if self.family == "joint":
            return tuple(dict(s) for s in self.settings)
        knob = self.knobs[0]
        return tuple(s[knob] for s in self.settings)

    def labels(self) -> list[str]:
        """One metric label per candidate (:func:`knob_label`)."""
        return [knob_label(s) for s in self.settings]

    def scoring(self, settings: Mapping[str, Any], *, order: str) -> CandidateScoring:
        """The :class:`CandidateScoring` of these candidates with every knob not owned held at
        its value in ``settings`` (the engine's effective sampling settings)."""
        fixed: dict[str, Any] = {
            knob: fixed_knob(knob, settings.get(knob))
            for knob in SETTABLE_KNOBS
            if knob not in self.knobs
        }
        return CandidateScoring(
            candidates=self.scored_candidates, family=self.family, order=order, **fixed
        )
