"""Per-trajectory feedback tensors from a verl batch (after advantages), for
:func:`metactl.build_feedback`.

verl keeps per-token fields, right-padded after ``to_padded_tensor()``: ``advantages`` (GRPO:
the trajectory's advantage on every response token), ``rm_scores`` (token-level scores, the
reward on the last token), ``entropy`` (the old-log-prob pass, at the stamped temperature),
``log_probs`` (one pass per candidate temperature) and ``response_mask``. These functions
reduce them over each trajectory's response tokens; the fused candidate likelihoods arrive
already summed per trajectory (``(N, K)``) and are only checked.

Only response tokens are read: padding is selected away with ``torch.where`` (never multiplied
by the mask, since ``NaN * 0`` is NaN), and a NaN or infinity at a response token is an error
naming the field, the row and the position.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "candidate_loglik_rows",
    "candidate_loglik_sums",
    "entropy_totals",
    "token_counts",
    "trajectory_advantages",
    "trajectory_rewards",
]


def _response_values(name: str, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` as float64 with every non-response position set to 0, after checking that
    it has the mask's ``(N, L)`` shape and is finite at every response token."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if values.shape != mask.shape or values.ndim != 2:
        raise ValueError(
            f"{name} must have the shape of response_mask (N, L) = {tuple(mask.shape)}, got "
            f"{tuple(values.shape)}"
        )
    keep = mask.bool()
    bad = keep & ~torch.isfinite(values)
    if bool(bad.any()):
        row, position = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} holds NaN or inf at {int(bad.sum())} response token(s) (first: row {row}, "
            f"position {position})"
        )
    return torch.where(keep, values.double(), 0.0)


def _check_mask(mask: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        raise ValueError("response_mask must be an (N, L) torch.Tensor")


def token_counts(response_mask: torch.Tensor) -> np.ndarray:
    """``(N,)`` response tokens per trajectory (float64)."""
    _check_mask(response_mask)
    return response_mask.bool().sum(dim=1).double().cpu().numpy()


def trajectory_advantages(advantages: torch.Tensor, response_mask: torch.Tensor) -> np.ndarray:
    """One advantage per trajectory: the value at its first response token (verl's own reading
    in ``compute_advantage_for_multi_trajectories``); 0 for a row with no response token."""
    _check_mask(response_mask)
    values = _response_values("advantages", advantages, response_mask)
    mask = response_mask.bool()
    first = mask.to(torch.uint8).argmax(dim=1)
    return values[torch.arange(values.shape[0]), first].cpu().numpy()


def trajectory_rewards(rm_scores: torch.Tensor, response_mask: torch.Tensor) -> np.ndarray:
    """One reward per trajectory: the sum of its token-level scores (verl puts the sequence
    reward on the last response token)."""
    _check_mask(response_mask)
    return _response_values("rm_scores", rm_scores, response_mask).sum(dim=1).cpu().numpy()


def entropy_totals(entropy: torch.Tensor, response_mask: torch.Tensor) -> tuple[float, int]:
    """The per-token entropy summed over every response token of the batch, and the number of
    those tokens (``build_feedback``'s ``entropy_sum`` and ``entropy_tokens``)."""
    _check_mask(response_mask)
    total = float(_response_values("entropy", entropy, response_mask).sum())
    return total, int(response_mask.bool().sum())


def candidate_loglik_sums(
    log_probs: list[torch.Tensor], response_mask: torch.Tensor
) -> np.ndarray:
    """``(N, K)`` summed log-likelihoods of each trajectory's response tokens, from one
    ``(N, L)`` per-token log-prob tensor per candidate (``build_feedback``'s ``loglik_sum``:
    it reduces them to the rule's mean or sum)."""
    _check_mask(response_mask)
    if not log_probs:
        raise ValueError("log_probs is empty: one tensor per candidate")
    columns = [
        _response_values(f"log_probs[{k}]", lp, response_mask).sum(dim=1)
        for k, lp in enumerate(log_probs)
    ]
    return torch.stack(columns, dim=1).cpu().numpy()


def candidate_loglik_rows(sums: torch.Tensor, response_mask: torch.Tensor) -> np.ndarray:
    """``(N, K)`` summed log-likelihoods as the old-log-prob pass returned them (one row per
    trajectory, one column per candidate), checked: one row per row of ``response_mask``, at
    least two candidates, finite in every row that has a response token."""
    _check_mask(response_mask)
    if not isinstance(sums, torch.Tensor) or sums.ndim != 2 or sums.shape[1] < 2:
        raise ValueError(
            f"the candidate log-likelihood sums must be an (N, K >= 2) tensor, got "
            f"{getattr(sums, 'shape', type(sums).__name__)}"
        )
    if sums.shape[0] != response_mask.shape[0]:
        raise ValueError(
            f"{sums.shape[0]} rows of candidate log-likelihood sums for "
            f"{response_mask.shape[0]} trajectories"
        )
    scored = response_mask.bool().any(dim=1)
    bad = scored.unsqueeze(1) & ~torch.isfinite(sums)
    if bool(bad.any()):
        row, column = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"the candidate log-likelihood sums hold NaN or inf (first: row {row}, candidate "
            f"{column})"
        )
    return torch.where(scored.unsqueeze(1), sums.double(), 0.0).cpu().numpy()
