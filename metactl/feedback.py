"""The trainer contract: what a rule needs (:class:`FeedbackSpec`), what a trainer can give
(:class:`TrainerSupport`), the one check between the two (:func:`check_trainer`), and the typed
feedback of an update (:class:`Feedback`, built from a trainer's tensors by
:func:`build_feedback`).

An adapter reads ``policy.spec`` once, calls :func:`check_trainer` at construction (so a rule it
cannot feed or a knob it cannot sample is refused before any rollout), computes only the
feedback in ``spec.feedback`` and hands its tensors to :func:`build_feedback`, which reduces the
per-trajectory log-likelihoods the way the rule expects and validates everything.

Example:
    >>> import metactl, numpy as np
    >>> policy = metactl.tampo(seed=0)
    >>> spec = policy.spec
    >>> spec.feedback, spec.loglik, spec.per_context
    (('loglik', 'advantages'), 'mean', False)
    >>> trainer = TrainerSupport("my-trainer", feedback=("loglik", "advantages", "rewards"),
    ...                          knobs=("temperature",))
    >>> check_trainer(policy, trainer)      # raises ValueError when it cannot feed the rule
    >>> fb = build_feedback(spec, loglik_sum=np.full((2, 10), -6.0), token_counts=[3, 6],
    ...                     advantages=[1.0, -1.0])
    >>> fb.loglik[:, 0].tolist()            # length-normalised, as TAMPO reads it
    [-2.0, -1.0]
    >>> info = policy.update(policy.select(), fb)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from . import _validation as check
from .knobs import KNOBS

__all__ = [
    "FEEDBACK_NAMES",
    "LOGLIK_REDUCTIONS",
    "ROW_FEEDBACK",
    "Feedback",
    "FeedbackSpec",
    "TrainerSupport",
    "build_feedback",
    "check_trainer",
]

#: Every feedback name ``MetaPolicy.update`` accepts.
FEEDBACK_NAMES = (
    "loglik",
    "advantages",
    "reward",
    "entropy",
    "vocab_size",
    "rewards",
    "group_size",
)
#: The feedback with one entry (row) per trajectory.
ROW_FEEDBACK = ("loglik", "advantages", "rewards")
#: How a trajectory's per-token log-probabilities are reduced into ``loglik``.
LOGLIK_REDUCTIONS = ("mean", "sum")

LoglikReduction = Literal["mean", "sum"]


@dataclass(frozen=True)
class FeedbackSpec:
    """What a policy's rule needs from the trainer (``policy.spec``).

    Attributes:
        feedback: the feedback names ``update`` needs (compute only these).
        loglik: ``"mean"`` (length-normalised, TAMPO's paper form) or ``"sum"`` (the whole
            completion's log-likelihood): how ``loglik`` rows are reduced over tokens.
        zero_advantage_rows_free: the update depends on ``loglik`` only through
            advantage-weighted terms, so a row with advantage 0 may be left unscored (any finite
            value, e.g. 0).
        per_context: the rule decides per prompt group (``select(contexts=...)``); each
            decision then owns G consecutive rows of the feedback.
        feature_dim: features per context the rule needs at ``select`` (0: none).
        knobs: the sampler knobs the decisions set (``policy.knobs``); the trainer samples and
            scores at them.
    """

    feedback: tuple[str, ...]
    loglik: LoglikReduction = "mean"
    zero_advantage_rows_free: bool = False
    per_context: bool = False
    feature_dim: int = 0
    knobs: tuple[str, ...] = ("temperature",)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.feedback) - set(FEEDBACK_NAMES))
        if unknown:
            raise ValueError(f"feedback: unknown names {unknown}; known: {list(FEEDBACK_NAMES)}")
        check.one_of(self.loglik, "loglik", LOGLIK_REDUCTIONS)
        check.integer(self.feature_dim, "feature_dim", minimum=0)
        for knob in self.knobs:
            check.one_of(knob, "knobs", KNOBS)

    @property
    def needs_loglik(self) -> bool:
        return "loglik" in self.feedback

    @property
    def needs_scoring(self) -> bool:
        """Whether the trainer must score the completions (candidate likelihoods or the
        entropy at the sampled temperature)."""
        return bool({"loglik", "entropy"} & set(self.feedback))


@dataclass(frozen=True)
class TrainerSupport:
    """What a trainer (an adapter) can give a rule; see :func:`check_trainer`.

    Attributes:
        name: the trainer's name, for errors (``"MetaGRPOTrainer"``).
        feedback: the feedback names it can compute.
        knobs: the sampler knobs it can set and score at.
        per_context: whether it can sample each prompt group at its own value.
        features: whether it can pass per-context features to ``select``.
        loglik: the log-likelihood reductions it can compute.
    """

    name: str
    feedback: tuple[str, ...] = FEEDBACK_NAMES
    knobs: tuple[str, ...] = KNOBS
    per_context: bool = False
    features: bool = False
    loglik: tuple[str, ...] = LOGLIK_REDUCTIONS


def check_trainer(policy: Any, trainer: TrainerSupport) -> None:
    """Refuse, before any rollout, a policy the trainer cannot feed or sample.

    Raises:
        TypeError: ``policy`` is not a :class:`metactl.MetaPolicy` or ``trainer`` not a
            :class:`TrainerSupport`.
        ValueError: naming what is missing: a sampler knob (a ``"generic"`` policy sets none,
            so a trainer that applies knobs cannot sample it), a feedback name, a
            log-likelihood reduction, a knob, per-prompt decisions or features.
    """
    spec = getattr(policy, "spec", None)  # a MetaPolicy (not imported: it imports this module)
    if not isinstance(spec, FeedbackSpec):
        raise TypeError(f"meta_policy must be a metactl.MetaPolicy, got {type(policy).__name__}")
    if not isinstance(trainer, TrainerSupport):
        raise TypeError(f"trainer must be a TrainerSupport, got {type(trainer).__name__}")
    if not spec.knobs and trainer.knobs:
        raise ValueError(
            f"{trainer.name} cannot apply a policy over hyperparameter='generic', which is no "
            f"sampling knob: it sets {list(trainer.knobs)}"
        )
    rule = policy.rule.name
    missing = [name for name in spec.feedback if name not in trainer.feedback]
    if missing:
        raise ValueError(
            f"{trainer.name} cannot feed {rule}: it needs feedback {missing}, which "
            f"{trainer.name} does not compute (it gives {list(trainer.feedback)})"
        )
    if spec.needs_loglik and spec.loglik not in trainer.loglik:
        raise ValueError(
            f"{trainer.name} cannot feed {rule}: it needs {spec.loglik!r} log-likelihoods, "
            f"{trainer.name} computes {list(trainer.loglik)}"
        )
    unsupported = [knob for knob in spec.knobs if knob not in trainer.knobs]
    if unsupported:
        raise ValueError(
            f"{trainer.name} cannot sample the policy's knobs {unsupported} (it sets "
            f"{list(trainer.knobs)})"
        )
    if spec.per_context and not trainer.per_context:
        raise ValueError(
            f"{rule} decides per prompt group, which {trainer.name} cannot sample: use a "
            "global rule (one value per batch)"
        )
    if spec.feature_dim and not trainer.features:
        raise ValueError(
            f"{rule} needs {spec.feature_dim} feature(s) per context at select, which "
            f"{trainer.name} does not provide: use feature_dim=0"
        )


@dataclass(frozen=True)
class Feedback:
    """The validated feedback of one update (every field optional; the rule's
    ``policy.spec.feedback`` names those it needs). Arrays are float64 copies.

    Attributes:
        loglik: (N, K) each trajectory's log-likelihood under every candidate (reduced over
            tokens as ``spec.loglik`` says).
        advantages: (N,) each trajectory's advantage.
        rewards: (N,) each trajectory's reward.
        reward: the batch's scalar reward (bandits).
        entropy: the mean per-token entropy (nats) at the sampled temperature.
        vocab_size: the vocabulary size (>= 2).
        group_size: completions per prompt; groups are consecutive rows.
    """

    loglik: np.ndarray | None = None
    advantages: np.ndarray | None = None
    rewards: np.ndarray | None = None
    reward: float | None = None
    entropy: float | None = None
    vocab_size: int | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__
        rows: dict[str, int] = {}
        if self.loglik is not None:
            loglik = check.finite_array(self.loglik, "loglik", ndim=2)
            put(self, "loglik", loglik)
            rows["loglik"] = loglik.shape[0]
        for name in ("advantages", "rewards"):
            value = getattr(self, name)
            if value is not None:
                array = check.finite_array(value, name, ndim=1)
                put(self, name, array)
                if "loglik" in rows and array.shape[0] != rows["loglik"]:
                    raise ValueError(
                        f"{name} has {array.shape[0]} entries but loglik has {rows['loglik']} "
                        f"rows: one {name[:-1]} per trajectory"
                    )
                rows[name] = array.shape[0]
        if len(set(rows.values())) > 1:
            raise ValueError(f"per-row feedback must have the same number of rows, got {rows}")
        if self.reward is not None:
            put(self, "reward", check.finite_scalar(self.reward, "reward"))
        if self.entropy is not None:
            put(self, "entropy", check.positive_scalar(self.entropy, "entropy", allow_zero=True))
        if self.vocab_size is not None:
            put(self, "vocab_size", check.integer(self.vocab_size, "vocab_size", minimum=2))
        if self.group_size is not None:
            put(self, "group_size", check.integer(self.group_size, "group_size", minimum=1))

    @classmethod
    def from_kwargs(cls, feedback: dict[str, Any]) -> Feedback:
        """From ``update``'s keyword feedback (unknown names raise ``TypeError``)."""
        unknown = sorted(set(feedback) - set(FEEDBACK_NAMES))
        if unknown:
            raise TypeError(
                f"unknown feedback {unknown}; accepted names are {list(FEEDBACK_NAMES)}"
            )
        return cls(**feedback)

    def given(self) -> tuple[str, ...]:
        """The names of the fields that are set."""
        return tuple(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    @property
    def rows(self) -> int | None:
        """N, the number of trajectories of the per-row feedback (None when none is given)."""
        for name in ROW_FEEDBACK:
            value = getattr(self, name)
            if value is not None:
                return int(value.shape[0])
        return None


def _numpy(x: Any, name: str) -> np.ndarray:
    return check.to_numpy(x, name).astype(np.float64)


def build_feedback(
    spec: FeedbackSpec,
    *,
    loglik_sum: Any = None,
    loglik_mean: Any = None,
    token_counts: Any = None,
    advantages: Any = None,
    rewards: Any = None,
    reward: float | None = None,
    entropy_sum: float | None = None,
    entropy_tokens: float | None = None,
    vocab_size: int | None = None,
    group_size: int | None = None,
) -> Feedback:
    """Turn a trainer's tensors (numpy arrays or torch tensors on any device) into the
    :class:`Feedback` that ``spec`` asks for; the rest is not computed.

    Args:
        spec: ``policy.spec``.
        loglik_sum: (N, K) summed per-token log-probabilities of each trajectory under every
            candidate; reduced to ``spec.loglik`` (``"mean"``: divided by ``token_counts``,
            rows with no token give 0).
        loglik_mean: instead of ``loglik_sum``, the per-token means (N, K) (what
            :func:`metactl.likelihood.candidate_loglik` returns); multiplied by
            ``token_counts`` when the rule wants sums, passed on exactly when it wants means.
        token_counts: (N,) completion tokens per trajectory (needed to convert between the
            two).
        advantages, rewards: (N,) one per trajectory.
        reward: the batch's scalar reward; default the mean of ``rewards``.
        entropy_sum, entropy_tokens: the summed per-token entropy and the number of tokens it
            covers; ``entropy = entropy_sum / entropy_tokens``.
        vocab_size, group_size: as in :class:`Feedback`.

    Raises:
        ValueError: a needed input is missing, or an input is malformed (named).
    """
    if not isinstance(spec, FeedbackSpec):
        raise TypeError(f"spec must be a FeedbackSpec (policy.spec), got {type(spec).__name__}")
    needs = set(spec.feedback)
    if loglik_sum is not None and loglik_mean is not None:
        raise ValueError("build_feedback: give loglik_sum or loglik_mean, not both")
    given = {
        "loglik": loglik_sum if loglik_sum is not None else loglik_mean,
        "advantages": advantages,
        "rewards": rewards,
        "entropy": entropy_sum,
        "vocab_size": vocab_size,
        "group_size": group_size,
    }
    given["reward"] = reward if reward is not None else rewards  # the mean of rewards will do
    missing = [name for name in spec.feedback if given.get(name) is None]
    if missing:
        raise ValueError(f"build_feedback: the rule needs {missing}, which were not given")
    out: dict[str, Any] = {}
    if "loglik" in needs:
        given_as = "sum" if loglik_sum is not None else "mean"
        name = f"loglik_{given_as}"
        loglik = _numpy(given["loglik"], name)
        if loglik.ndim != 2:
            raise ValueError(f"{name} must have shape (N, K), got {loglik.shape}")
        if spec.loglik != given_as:
            if token_counts is None:
                raise ValueError(
                    f"build_feedback: the rule wants {spec.loglik!r} log-likelihoods; turning "
                    f"{name} into them needs token_counts"
                )
            counts = _numpy(token_counts, "token_counts")
            if counts.shape != (loglik.shape[0],) or np.any(counts < 0):
                raise ValueError(
                    f"token_counts must hold {loglik.shape[0]} non-negative counts, got shape "
                    f"{counts.shape}"
                )
            if spec.loglik == "mean":
                loglik = loglik / np.maximum(counts, 1.0)[:, None]
            else:
                loglik = loglik * counts[:, None]
        out["loglik"] = loglik
    if "advantages" in needs:
        out["advantages"] = advantages
    if "rewards" in needs:
        out["rewards"] = rewards
    if "reward" in needs:
        out["reward"] = (
            reward if reward is not None else float(np.mean(_numpy(rewards, "rewards")))
        )
    if "entropy" in needs:
        if entropy_tokens is None:
            raise ValueError("build_feedback: the entropy needs entropy_tokens")
        tokens = check.positive_scalar(entropy_tokens, "entropy_tokens")
        out["entropy"] = check.finite_scalar(entropy_sum, "entropy_sum") / tokens
    if "vocab_size" in needs:
        out["vocab_size"] = vocab_size
    if "group_size" in needs:
        out["group_size"] = group_size
    return Feedback(**out)

