"""The temperature that sampled a batch scores it everywhere; evaluation never moves the policy.

A spy infers, for every log-prob pass TRL makes (old, reference, current), the temperature from
the numbers themselves (comparing with ``log_softmax(logits / T)`` of a plain forward), and records
the temperature of every ``generate`` call. Buffered window: ``steps_per_generation=2``,
``num_iterations=2`` (each generation batch feeds 4 optimisation steps), ``beta > 0`` (a reference
model exists), and evaluation runs every 3 steps, i.e. also in the middle of buffered windows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from metactl.adapters.trl import MetaGRPOTrainer
from metactl.adapters.trl.seam import FusedHead, unwrap
from metactl.adapters.trl.testing import (
    addition_dataset,
    digit_count_reward,
    tiny_grpo_config,
)

import metactl
from tests.adapters.trl.helpers import (
    PassCheckingTrainer,
    completion_logits,
    logp_error,
    pass_kind,
    record_generate_temperatures,
)

EVAL_T = 0.55  # not a candidate: evaluation passes are recognisable


class SpyTrainer(PassCheckingTrainer):
    """Records ("generate", T) per generate call and (kind, T_used, err) per log-prob pass."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[tuple[str, float, float]] = []
        record_generate_temperatures(self, self.events)

    def check_pass(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   logits_to_keep: int, got: torch.Tensor) -> None:
        kind, base = pass_kind(self, model)
        logits, tokens, mask = completion_logits(base, input_ids, attention_mask, logits_to_keep)

        def err(t: float) -> float:
            return logp_error(logits, tokens, mask, got, t)

        used = self.temperature  # the temperature the adapter says is in force
        # The inferred temperature: the used one must fit, and a 20% different one must not.
        assert err(used * 1.2) > 1e-3, "the check would not notice a wrong temperature"
        self.events.append((kind, used, err(used)))


pytestmark = pytest.mark.usefixtures("one_thread")


def test_sampling_temperature_scores_every_pass_of_the_buffered_window(model_path, tmp_path):
    args = tiny_grpo_config(
        tmp_path,
        max_steps=12,
        per_device_train_batch_size=4,
        num_generations=4,
        steps_per_generation=2,
        num_iterations=2,
        beta=0.1,
        temperature=EVAL_T,
        eval_strategy="steps",
        eval_steps=3,  # after steps 3, 6, 9 (inside windows 1-4, 5-8, 9-12) and 12
        per_device_eval_batch_size=4,
    )
    trainer = SpyTrainer(
        model=model_path,
        reward_funcs=digit_count_reward,
        args=args,
        train_dataset=addition_dataset(64, seed=1),
        eval_dataset=addition_dataset(1, seed=2),  # x 4 generations = one eval batch
        meta_policy=metactl.tampo(seed=3),
    )
    trainer.train()

    # 12 optimiser steps / (2 x 2) steps per generation batch = 3 batches, 3 policy updates,
    # although evaluation generated 4 more batches.
    assert trainer.meta_policy.step == 3
    values = [h["value"] for h in trainer.meta_history]
    assert len(set(values)) >= 2, "the test needs windows with different temperatures"
    assert all(h["likelihood_path"] == "old" for h in trainer.meta_history)

    current_gen: float | None = None
    seen: dict[str, int] = {}
    train_gens = []
    for kind, temperature, error in trainer.events:
        if kind == "generate":
            current_gen = temperature
            if temperature != EVAL_T:
                train_gens.append(temperature)
            continue
        seen[kind] = seen.get(kind, 0) + 1
        assert error < 1e-4, (kind, temperature, error)
        assert current_gen is not None
        if kind.startswith("eval_"):
            assert temperature == EVAL_T
        elif kind in ("old", "ref"):
            assert temperature == current_gen  # scored right after this batch was sampled
        else:  # current: the batch in the buffer, possibly sampled before an evaluation
            assert temperature == train_gens[-1]
    assert train_gens == values
    assert seen["old"] == 3 and seen["ref"] == 3 and seen["current"] == 12
    # 4 evaluations, each: old-logprob pass, reference pass, and the loss (under no_grad)
    assert seen["eval_old"] == 8 and seen["eval_ref"] == 4
    # after training the trainer holds one temperature everywhere
    assert set(trainer.temperatures().values()) == {values[-1]}


def test_evaluation_does_not_update_the_policy(model_path, tmp_path):
    trainer = MetaGRPOTrainer(
        model=model_path,
        reward_funcs=digit_count_reward,
        args=tiny_grpo_config(
            tmp_path, max_steps=2, temperature=EVAL_T, per_device_eval_batch_size=8
        ),
        train_dataset=addition_dataset(32),
        eval_dataset=addition_dataset(16, seed=5),
        meta_policy=metactl.tampo(seed=0),
    )
    trainer.train()
    before = trainer.meta_policy.state_dict()
    train_t = trainer.temperature
    metrics = trainer.evaluate()
    assert trainer.meta_policy.state_dict() == before
    assert metrics["eval_metactl/temperature"] == pytest.approx(EVAL_T)
    # back at the training temperature of the buffered batch afterwards
    assert set(trainer.temperatures().values()) == {train_t}
    logged = [log for log in trainer.state.log_history if "metactl/temperature" in log]
    assert len(logged) == 2
    assert all(
        np.isclose(sum(log[f"metactl/prob/{v:g}"] for v in trainer.meta_policy.candidates), 1.0)
        for log in logged
    )


def test_temperature_reaches_heads_behind_accelerate_mixed_precision_wrappers(model_path, tmp_path):
    """With bf16 autocast (CPU here), accelerate wraps the policy's and the reference model's
    patched forward; the adapter must keep those wrappers and still set the head's temperature."""
    trainer = MetaGRPOTrainer(
        model=model_path,
        reward_funcs=digit_count_reward,
        args=tiny_grpo_config(tmp_path, max_steps=3, bf16=True, beta=0.1),
        train_dataset=addition_dataset(32),
        meta_policy=metactl.tampo(seed=0),
    )
    trainer.train()
    ids = torch.randint(4, 20, (4, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    used = trainer.temperature
    assert set(trainer.temperatures().values()) == {used}
    for model in (trainer.model, unwrap(trainer.ref_model)):
        # accelerate's autocast wrapper is still the forward, around TRL's fused head
        assert "_original_forward" in model.__dict__
        assert model.__dict__["forward"].__func__ is not FusedHead.find(model).function
        with torch.no_grad():
            logps = model(input_ids=ids, attention_mask=mask, labels=ids, fused_lm_head=True)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()

        def err(t: float, logps=logps.log_probs, logits=logits) -> float:
            ref = torch.log_softmax(logits / t, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            return float((ref - logps).abs().max())

        assert err(used) < 1e-4
        assert err(used * 1.2) > 1e-2
