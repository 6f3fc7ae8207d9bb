"""The feedback names ``MetaPolicy.update`` accepts, and their validation and conversion."""

from __future__ import annotations

from typing import Any

from . import _validation as check
from .rules.base import Feedback

FEEDBACK_NAMES = (
    "loglik",
    "advantages",
    "reward",
    "entropy",
    "vocab_size",
    "rewards",
    "group_size",
)
ROW_FEEDBACK = ("loglik", "advantages", "rewards")  # one entry (row) per trajectory


def validate_feedback(feedback: dict[str, Any], k: int) -> Feedback:
    """Check every feedback value given (needed by the rule or not) and convert it."""
    unknown = sorted(set(feedback) - set(FEEDBACK_NAMES))
    if unknown:
        raise TypeError(f"unknown feedback {unknown}; accepted names are {list(FEEDBACK_NAMES)}")
    out: Feedback = {}
    if "loglik" in feedback:
        loglik = check.finite_array(feedback["loglik"], "loglik", ndim=2)
        if loglik.shape[1] != k:
            raise ValueError(f"loglik must have shape (N, K={k}), got {loglik.shape}")
        out["loglik"] = loglik
    if "advantages" in feedback:
        advantages = check.finite_array(feedback["advantages"], "advantages", ndim=1)
        if "loglik" in out and advantages.shape[0] != out["loglik"].shape[0]:
            raise ValueError(
                f"advantages has {advantages.shape[0]} entries but loglik has "
                f"{out['loglik'].shape[0]} rows: one advantage per trajectory"
            )
        out["advantages"] = advantages
    if "reward" in feedback:
        out["reward"] = check.finite_scalar(feedback["reward"], "reward")
    if "rewards" in feedback:  # one reward per trajectory, rows in the order of ``loglik``
        rewards = check.finite_array(feedback["rewards"], "rewards", ndim=1)
        if "loglik" in out and rewards.shape[0] != out["loglik"].shape[0]:
            raise ValueError(
                f"rewards has {rewards.shape[0]} entries but loglik has "
                f"{out['loglik'].shape[0]} rows: one reward per trajectory"
            )
        out["rewards"] = rewards
    if "group_size" in feedback:  # completions per prompt; groups are consecutive rows
        out["group_size"] = check.integer(feedback["group_size"], "group_size", minimum=1)
    if "entropy" in feedback:
        out["entropy"] = check.positive_scalar(feedback["entropy"], "entropy", allow_zero=True)
    if "vocab_size" in feedback:
        out["vocab_size"] = check.integer(feedback["vocab_size"], "vocab_size", minimum=2)
    return out
