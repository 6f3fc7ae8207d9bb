"""Feedback for ``policy.update`` from the tensors of a verl batch (after advantages).

verl keeps per-token fields, right-padded after ``to_padded_tensor()``: ``advantages`` (GRPO:
the trajectory's advantage on every response token), ``rm_scores`` (token-level scores, the
reward on the last token), ``entropy`` (the old-log-prob pass, at the stamped temperature) and
``response_mask``. These functions turn them into metactl's per-trajectory feedback.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["candidate_loglik", "mean_entropy", "trajectory_advantages", "trajectory_rewards"]


def _check(name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
    if values.shape != mask.shape or values.ndim != 2:
        raise ValueError(
            f"{name} must have the shape of response_mask (N, L) = {tuple(mask.shape)}, got "
            f"{tuple(values.shape)}"
        )
    if not bool(torch.isfinite(values[mask.bool()]).all()):
        raise ValueError(f"{name} holds NaN or inf at response tokens")


def trajectory_advantages(advantages: torch.Tensor, response_mask: torch.Tensor) -> np.ndarray:
    """One advantage per trajectory: the value at its first response token (verl's own reading
    in ``compute_advantage_for_multi_trajectories``); 0 for a row with no response token."""
    _check("advantages", advantages, response_mask)
    mask = response_mask.bool()
    first = mask.float().argmax(dim=1)
    values = advantages[torch.arange(advantages.shape[0]), first]
    return torch.where(mask.any(dim=1), values, 0.0).double().cpu().numpy()


def trajectory_rewards(rm_scores: torch.Tensor, response_mask: torch.Tensor) -> np.ndarray:
    """One reward per trajectory: the sum of its token-level scores (verl puts the sequence
    reward on the last response token)."""
    _check("rm_scores", rm_scores, response_mask)
    return (rm_scores * response_mask.to(rm_scores.dtype)).sum(dim=1).double().cpu().numpy()


def mean_entropy(entropy: torch.Tensor, response_mask: torch.Tensor) -> float:
    """The batch's mean per-token entropy over all response tokens."""
    _check("entropy", entropy, response_mask)
    mask = response_mask.to(entropy.dtype)
    tokens = float(mask.sum())
    if tokens == 0:
        raise ValueError("the batch has no response token: no entropy to report")
    return float((entropy * mask).sum()) / tokens


def candidate_loglik(log_probs: list[torch.Tensor], response_mask: torch.Tensor) -> np.ndarray:
    """``(N, K)`` length-normalised log-likelihoods (metactl's ``loglik``) from one ``(N, L)``
    per-token log-prob tensor per candidate; rows without a response token get 0 (and weight 0
    through their advantage)."""
    if not log_probs:
        raise ValueError("log_probs is empty: one tensor per candidate")
    mask = response_mask.double()
    counts = mask.sum(dim=1).clamp(min=1.0)
    columns = []
    for k, lp in enumerate(log_probs):
        _check(f"log_probs[{k}]", lp, response_mask)
        columns.append((lp.double() * mask).sum(dim=1) / counts)
    return torch.stack(columns, dim=1).cpu().numpy()
