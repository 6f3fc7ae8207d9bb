"""Spies shared by the TRL adapter tests: every log-prob pass TRL makes, checked against a plain
forward of the same model at the temperature the batch was sampled at."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from metactl.adapters.trl import MetaGRPOTrainer
from metactl.adapters.trl.seam import unwrap


class PassCheckingTrainer(MetaGRPOTrainer):
    """Shows every log-prob pass TRL makes to `check_pass` (inside TRL's caller, so the model is
    in the state the pass used) and returns the pass's numbers unchanged."""

    def _get_per_token_logps_and_entropies(
        self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        logits_to_keep: int, *args: Any, **kwargs: Any,
    ) -> Any:  # fmt: skip
        out = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
        )
        self.check_pass(model, input_ids, attention_mask, logits_to_keep, out[0].detach())
        return out

    def check_pass(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   logits_to_keep: int, logps: torch.Tensor) -> None:
        raise NotImplementedError


def digit_fraction_reward(completions: Sequence[str], **_: Any) -> list[float]:
    """A reward in [0, 1] (PTGS counts successes): the fraction of digit characters of the
    completion."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def record_generate_temperatures(trainer: MetaGRPOTrainer,
                                 events: list[tuple[str, float, float]]) -> None:
    """Appends ``("generate", T, 0.0)`` to ``events`` for every ``generate`` call of the
    trainer's model, ``T`` the temperature of its generation config."""
    original = trainer.model.generate

    def spy_generate(*a: Any, **kw: Any) -> Any:
        events.append(("generate", float(kw["generation_config"].temperature), 0.0))
        return original(*a, **kw)

    trainer.model.generate = spy_generate


def pass_kind(trainer: MetaGRPOTrainer, model: Any) -> tuple[str, Any]:
    """Which pass TRL makes with ``model``: ``"ref"``, ``"old"`` (no gradient) or ``"current"``,
    prefixed ``"eval_"`` during evaluation; and the unwrapped model."""
    base = unwrap(model)
    kind = "ref" if base is unwrap(trainer.ref_model) else "policy"
    if kind == "policy":
        kind = "current" if torch.is_grad_enabled() else "old"
    if not trainer.model.training:
        kind = "eval_" + kind
    return kind, base


def completion_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      logits_to_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A plain forward's float32 logits at the last ``logits_to_keep`` tokens (the completion),
    those tokens and their mask."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, -(logits_to_keep + 1) : -1].float()
    return logits, input_ids[:, -logits_to_keep:], attention_mask[:, -logits_to_keep:].bool()


def logp_error(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
               logps: torch.Tensor, temperature: float | torch.Tensor) -> float:
    """The largest difference, over the masked tokens, between ``logps`` and
    ``log_softmax(logits / T)`` of the tokens (``T`` one number or one per row)."""
    t = temperature.view(-1, 1, 1) if isinstance(temperature, torch.Tensor) else temperature
    ref = torch.log_softmax(logits / t, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return float((ref - logps).abs()[mask].max())
