"""LoRA through TRL's ``peft_config=``: the temperature reaches every pass, the fast likelihoods go
through the PEFT wrapper, and checkpoints carry the adapter weights and ``metactl_state.json``.

With PEFT, TRL patches its fused log-prob head on the *base* model before wrapping it, and the
reference log-probs (``beta > 0``) come from the same model with the adapter disabled. The adapters
are initialised randomly (``init_lora_weights=False``), so they change the logits from the first
step on and a scoring path that skipped them would be caught.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from metactl.adapters.trl import META_STATE_NAME, MetaGRPOTrainer
from metactl.adapters.trl.testing import addition_dataset, digit_count_reward, tiny_grpo_config

import metactl
from tests.adapters.trl.helpers import (
    PassCheckingTrainer,
    completion_logits,
    logp_error,
    record_generate_temperatures,
)

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")


def _lora(*modules: str) -> Any:
    return peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(modules), init_lora_weights=False,
        lora_dropout=0.0, task_type="CAUSAL_LM",
    )  # fmt: skip


class CheckingTrainer(PassCheckingTrainer):
    """Records the temperature of every generate call and, for every log-prob pass TRL makes,
    the error of its numbers against ``log_softmax(logits / T)`` of a plain forward of the same
    model in the same adapter state; scores every batch on the configured path *and* exactly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[tuple[str, float, float]] = []
        self.comparisons: list[tuple[str | None, float, int]] = []
        record_generate_temperatures(self, self.events)

    def check_pass(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   logits_to_keep: int, got: torch.Tensor) -> None:
        # still inside TRL's caller: for the reference pass the adapter is disabled right now
        lora_layer = next(m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
        adapter_on = not lora_layer.disable_adapters
        kind = ("current" if torch.is_grad_enabled() else "old") if adapter_on else "ref"
        logits, tokens, mask = completion_logits(model, input_ids, attention_mask, logits_to_keep)

        def err(t: float) -> float:
            return logp_error(logits, tokens, mask, got, t)

        assert err(self.temperature * 1.2) > 1e-3, "the check would not notice a wrong temperature"
        self.events.append((kind, self.temperature, err(self.temperature)))

    def _score(self, decision, output, capture, path):  # type: ignore[no-untyped-def]
        result, used = super()._score(decision, output, capture, path)
        exact, _ = super()._score(decision, output, None, "exact")
        assert torch.equal(result.counts, exact.counts)
        self.comparisons.append(
            (used, float((result.loglik - exact.loglik).abs().max()), int(result.counts.sum()))
        )
        return result, used


def test_lora_every_pass_scores_at_the_sampling_temperature_and_fast_equals_exact(
    model_path, tmp_path
):
    trainer = CheckingTrainer(
        model=model_path,
        reward_funcs=digit_count_reward,
        args=tiny_grpo_config(
            tmp_path, max_steps=8, per_device_train_batch_size=4, steps_per_generation=2,
            num_iterations=2, beta=0.1, learning_rate=1e-2,
        ),
        train_dataset=addition_dataset(64, seed=4),
        meta_policy=metactl.tampo(seed=5),
        peft_config=_lora("q_proj", "v_proj"),
    )  # fmt: skip
    assert isinstance(trainer.model, peft.PeftModel)
    assert trainer.ref_model is None  # the reference is the policy with its adapter disabled
    lora_before = {
        n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n
    }
    trainer.train()

    values = [h["value"] for h in trainer.meta_history]
    assert len(values) == 2 and trainer.meta_policy.step == 2
    gens = [t for kind, t, _ in trainer.events if kind == "generate"]
    assert gens == values
    current_gen = None
    counts: dict[str, int] = {}
    for kind, temperature, error in trainer.events:
        if kind == "generate":
            current_gen = temperature
            continue
        counts[kind] = counts.get(kind, 0) + 1
        assert temperature == current_gen, (kind, temperature, current_gen)
        assert error < 1e-4, (kind, temperature, error)
    assert counts == {"old": 2, "ref": 2, "current": 8}
    # the fast path (hidden states of TRL's old-logprob pass through the PEFT model) == exact
    assert [used for used, _, _ in trainer.comparisons] == ["old", "old"]
    assert all(diff < 1e-5 and tokens > 0 for _, diff, tokens in trainer.comparisons)
    # only the adapters trained, and they did
    lora_after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(lora_after[n], p) for n, p in lora_before.items())
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)


# the tiny model ties its head to the embeddings; PEFT warns that a saved copy of a tied head
# breaks the tie when merging, which this test (what the fast path scores with) does not do
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
def test_trained_copy_of_the_lm_head_is_what_the_fast_path_scores_with(model_path, tmp_path):
    """``modules_to_save=["lm_head"]``: PEFT wraps the head and trains a copy of it (TRL refuses
    a LoRA layer on the head itself). Generation samples from the trained copy, so the fast path
    must read the wrapper's active weight, not the frozen original."""
    config = _lora("q_proj", "v_proj")
    config.modules_to_save = ["lm_head"]
    trainer = CheckingTrainer(
        model=model_path,
        reward_funcs=digit_count_reward,
        args=tiny_grpo_config(tmp_path, max_steps=4, learning_rate=3e-2),
        train_dataset=addition_dataset(32, seed=6),
        meta_policy=metactl.tampo(seed=1),
        peft_config=config,
    )  # fmt: skip
    head = trainer.model.get_base_model().get_output_embeddings()
    assert type(head).__name__ == "ModulesToSaveWrapper"
    trainer.train()
    original = head.original_module.weight
    trained = float((head.weight - original).detach().abs().max())
    assert trained > 1e-3, "the head copy did not train"
    assert [used for used, _, _ in trainer.comparisons] == ["generate"] * 4
    assert all(diff < 1e-5 and tokens > 0 for _, diff, tokens in trainer.comparisons)


def _resumable(model_path: str, output_dir: Any) -> MetaGRPOTrainer:
    return MetaGRPOTrainer(
        model=model_path,
        reward_funcs=digit_count_reward,
        args=tiny_grpo_config(
            output_dir, max_steps=4, save_strategy="steps", save_steps=2, learning_rate=1e-2
        ),
        train_dataset=addition_dataset(64, seed=8),
        meta_policy=metactl.tampo(seed=9),
        peft_config=_lora("q_proj", "v_proj"),
    )


def test_lora_checkpoint_round_trip_with_adapter_weights_and_meta_state(model_path, tmp_path):
    full = _resumable(model_path, tmp_path / "full")
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", META_STATE_NAME} <= files
    assert "model.safetensors" not in files  # a LoRA checkpoint holds the adapter only
    state = json.loads((checkpoint / META_STATE_NAME).read_text())
    assert state["policy"]["step"] == 2
    assert state["train_temperature"] == full.meta_history[1]["value"]
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert saved and all("lora_" in name for name in saved)

    resumed = _resumable(model_path, tmp_path / "resumed")
    loaded: dict[str, torch.Tensor] = {}
    original_load = resumed._load_optimizer_and_scheduler

    def snapshot_then_load(ckpt: Any) -> None:
        # TRL has loaded the adapter weights by now; the optimizer comes next
        loaded.update({n: p.detach().clone() for n, p in resumed.model.named_parameters()
                       if "lora_" in n})  # fmt: skip
        original_load(ckpt)

    resumed._load_optimizer_and_scheduler = snapshot_then_load  # type: ignore[method-assign]
    resumed.train(resume_from_checkpoint=str(checkpoint))
    # the adapter weights the resumed run started from are the saved ones
    by_suffix = {name.split("base_model.model.", 1)[-1]: t for name, t in saved.items()}
    assert len(loaded) == len(by_suffix)
    for name, value in loaded.items():
        key = name.split("base_model.model.", 1)[-1].replace(".default", "")
        torch.testing.assert_close(value, by_suffix[key], rtol=0, atol=0)
    # and the meta-policy continued where the checkpoint left it (its history restored first)
    assert resumed.meta_history[:2] == full.meta_history[:2]
    assert resumed.meta_history[2]["policy_step"] == 2
    new = resumed.meta_history[2:]
    assert [h["value"] for h in new] == [h["value"] for h in full.meta_history[2:]]
    assert resumed.meta_policy.state_dict() == full.meta_policy.state_dict()
