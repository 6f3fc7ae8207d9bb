"""The GRPO trainer's pure building blocks: group-normalised advantages, the LR schedule and
the clipped policy-gradient loss (unit-tested on their own; `trainer.GRPOTrainer` uses them)."""

from __future__ import annotations

import math

import torch

__all__ = ["cosine_with_floor", "group_advantages", "policy_loss"]


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """GRPO advantages: reward minus its group mean, divided by the group std (+ eps) if
    ``scale``. ``rewards`` is (N,) with the groups contiguous.

    Example:
        >>> [round(a, 3) for a in group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 2).tolist()]
        [0.707, -0.707, 0.0, 0.0]
    """
    r = rewards.view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def cosine_with_floor(step: int, total: int, warmup: int, floor: float) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine from 1 down to ``floor``.

    Example:
        >>> [round(cosine_with_floor(s, 10, 2, 0.1), 3) for s in (0, 1, 2, 10)]
        [0.5, 1.0, 1.0, 0.1]
    """
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float,
    ref_logp: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    agg: str = "sequence",
    total_rows: int | None = None,
    total_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy-gradient loss (plus ``kl_beta`` times the k3 KL estimator to a reference).

    ``agg="sequence"``: mean over each completion's tokens, then sum over rows / ``total_rows``;
    ``agg="token"``: sum over all tokens / ``total_tokens``. Passing the *whole batch's* totals
    makes the sum of micro-batch losses equal the full-batch loss (exact gradient accumulation).

    Example:
        >>> lp = torch.zeros(1, 2, requires_grad=True)
        >>> loss, _ = policy_loss(lp, lp.detach(), torch.tensor([1.0]), torch.ones(1, 2),
        ...                       clip_eps=0.2)
        >>> loss.backward(); lp.grad.tolist()   # gradient descent raises the logprobs
        [[-0.5, -0.5]]
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(logp.dtype)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if ref_logp is not None and kl_beta > 0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1.0
        per_token = per_token + kl_beta * kl
    if agg == "token":
        denom = total_tokens if total_tokens is not None else mask.sum()
        loss = (per_token * mask).sum() / denom
    else:
        denom = total_rows if total_rows is not None else logp.shape[0]
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / denom
    with torch.no_grad():
        n_tok = mask.sum().clamp(min=1)
        stats = {
            "clip_frac": float((((ratio - 1).abs() > clip_eps) * mask).sum() / n_tok),
            "kl": float((kl * mask).sum() / n_tok),
        }
    return loss, stats
