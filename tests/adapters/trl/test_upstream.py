"""TRL's own GRPO trainer tests, run against ``MetaGRPOTrainer``.

Ported from ``tests/test_grpo_trainer.py`` of Hugging Face TRL (https://github.com/huggingface/trl,
Apache-2.0, (c) The HuggingFace Team; read at a main-branch revision that tests the same
``GRPOTrainer`` API as the 1.16 release): ``test_train``, ``test_train_multiple_iterations``,
``test_train_beta_non_zero``, ``test_train_with_sync_ref_model``, ``test_train_peft_model``,
``test_train_with_cast_lm_head_to_fp32``, ``test_train_sequence_importance_sampling``,
``test_train_with_generation_kwargs``, ``test_train_with_eval``, ``test_train_eval_on_start``,
``test_train_with_static_entropy``, ``test_train_with_adaptive_entropy``,
``test_train_with_entropy_filter`` and ``test_prepare_input_called_with_correct_data``.

What changed in the port: the hub fixtures are replaced by local ones (the tiny Qwen2 of
:func:`metactl.adapters.trl.testing.tiny_model_dir` for ``tiny-Qwen2ForCausalLM-2.5``, a reward
function for the ``tiny-Qwen2ForSequenceClassification-2.5`` reward model, and
``Dataset.from_dict`` with addition prompts for the ``zen`` data set), runs are cut to a few
steps (``max_steps``), and the sampling temperature is 0.9 instead of TRL's default 1.0, so that
a trainer that left the temperature at its default would be caught.

Every case runs three trainers on the same model, data and seed:

1. ``GRPOTrainer`` (TRL itself) at ``temperature=0.9``;
2. ``MetaGRPOTrainer`` with ``metactl.Fixed(0.9)``: its logged losses, rewards, KL, entropies and
   every trained parameter must equal TRL's to float tolerance, so the subclass provably changes
   nothing but the temperature;
3. ``MetaGRPOTrainer`` with TAMPO: the original test's assertions must hold.

``test_train_with_generation_kwargs`` samples with ``top_k=50`` and ``num_beams=2``; the TAMPO arm
is refused there with a ``ValueError`` by design (both reshape the sampling distribution, so the
candidate likelihoods would be wrong); the ``Fixed`` arm, which needs no likelihoods, runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from unittest.mock import patch

import pytest
import torch
from datasets import Dataset
from metactl.adapters.trl import MetaGRPOTrainer
from metactl.adapters.trl.testing import digit_count_reward
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

import metactl

T = 0.9
pytestmark = pytest.mark.usefixtures("one_thread")

# metrics that differ between runs for reasons other than the training itself
_VOLATILE = ("runtime", "per_second", "step_time", "metactl/")


def _prompts(n: int, offset: int = 0) -> list[str]:
    return [f"{(7 * i + offset) % 50}+{(3 * i + 11) % 40}=" for i in range(n)]


def _dataset(n: int = 12, offset: int = 0) -> Dataset:
    return Dataset.from_dict({"prompt": _prompts(n, offset)})


@dataclass
class Case:
    """One ported test: its GRPOConfig overrides and what the original asserts afterwards."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    with_eval: bool = False
    peft: bool = False
    tampo_refused: str | None = None  # the ValueError message of the TAMPO arm, if refused


CASES = [
    Case("test_train"),
    Case("test_train_multiple_iterations", {"num_iterations": 2}),
    Case("test_train_beta_non_zero", {"beta": 0.1}),
    Case("test_train_with_sync_ref_model",
         {"beta": 0.1, "sync_ref_model": True, "ref_model_sync_steps": 2}),
    Case("test_train_peft_model", peft=True),
    Case("test_train_with_cast_lm_head_to_fp32", {"cast_lm_head_to_fp32": True}),
    Case("test_train_sequence_importance_sampling",
         {"num_iterations": 2, "importance_sampling_level": "sequence"}),
    Case("test_train_with_generation_kwargs",
         {"generation_kwargs": {"do_sample": True, "top_k": 50, "num_beams": 2,
                                "length_penalty": -0.1}},
         tampo_refused="num_beams=2 reshapes the sampling distribution"),
    Case("test_train_with_eval",
         {"eval_strategy": "steps", "eval_steps": 2, "per_device_eval_batch_size": 3},
         with_eval=True),
    Case("test_train_eval_on_start",
         {"loss_type": "grpo", "eval_strategy": "steps", "eval_steps": 2, "eval_on_start": True,
          "per_device_eval_batch_size": 3}, with_eval=True),
    Case("test_train_with_static_entropy", {"entropy_coef": 0.1}),
    Case("test_train_with_adaptive_entropy",
         {"entropy_coef": 0.01, "use_adaptive_entropy": True, "entropy_target": 15.0}),
    Case("test_train_with_entropy_filter", {"top_entropy_quantile": 0.2}),
]  # fmt: skip


def _args(tmp_path: Any, name: str, **overrides: Any) -> GRPOConfig:
    kwargs: dict[str, Any] = {
        "output_dir": str(tmp_path / name),
        "learning_rate": 0.1,  # as the originals: gradients are tiny
        "per_device_train_batch_size": 3,
        "num_generations": 3,
        "max_completion_length": 8,
        "max_steps": 4,
        "temperature": T,
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "seed": 0,
        "disable_tqdm": True,
        "save_strategy": "no",
        "logging_steps": 1,
    }
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def _model(path: str, peft: bool) -> Any:
    if not peft:
        return path
    peft_lib = pytest.importorskip("peft")
    torch.manual_seed(0)  # the same LoRA initialisation in every arm
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return peft_lib.get_peft_model(model, peft_lib.LoraConfig())


def _trainer(arm: str, case: Case, model_path: str, tmp_path: Any) -> GRPOTrainer:
    kwargs: dict[str, Any] = {
        "model": _model(model_path, case.peft),
        "reward_funcs": digit_count_reward,
        "args": _args(tmp_path, f"{case.name}-{arm}", **case.overrides),
        "train_dataset": _dataset(),
    }
    if case.with_eval:
        kwargs["eval_dataset"] = _dataset(3, offset=5)
    if arm == "trl":
        return GRPOTrainer(**kwargs)
    policy = (
        metactl.MetaPolicy(metactl.PAPER_TEMPERATURES, metactl.Fixed(T))
        if arm == "fixed"
        else metactl.tampo(seed=0)
    )
    return MetaGRPOTrainer(**kwargs, meta_policy=policy)


def _logged(trainer: GRPOTrainer) -> list[dict[str, float]]:
    return [
        {k: v for k, v in log.items() if not any(s in k for s in _VOLATILE)}
        for log in trainer.state.log_history
    ]


def _check_original_assertions(case: Case, trainer: GRPOTrainer, before: dict[str, Any]) -> None:
    """What the original TRL test asserts after ``train()``."""
    assert trainer.state.log_history[-1]["train_loss"] is not None
    model: Any = trainer.model
    for name, param in before.items():
        new = model.get_parameter(name)
        if case.peft and "lora" not in name:
            torch.testing.assert_close(param, new, msg=f"Parameter {name} has changed.")
        else:
            assert not torch.equal(param, new), f"Parameter {name} has not changed."
    if case.name == "test_train_with_cast_lm_head_to_fp32":
        assert model.lm_head.weight.dtype == torch.float32
    if case.name == "test_train_with_adaptive_entropy":
        # the original reads these from the last log; with logging_steps=1 (here) TRL has
        # already flushed them into the last step's log, before the training summary
        last_step = [log for log in trainer.state.log_history if "policy_loss" in log][-1]
        assert last_step["policy_loss"] is not None
        assert last_step["entropy_coef"] is not None
        assert trainer.entropy_coef > 0.01  # type: ignore[attr-defined]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_trl_grpo_test_against_the_subclass(case: Case, model_path, tmp_path):
    runs = {}
    for arm in ("trl", "fixed"):
        trainer = _trainer(arm, case, model_path, tmp_path)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        _check_original_assertions(case, trainer, before)
        runs[arm] = trainer
    trl_run, fixed_run = runs["trl"], runs["fixed"]
    # Fixed(T): the same losses, rewards and parameters as TRL itself
    fixed_logs, trl_logs = _logged(fixed_run), _logged(trl_run)
    assert len(fixed_logs) == len(trl_logs)
    for got, want in zip(fixed_logs, trl_logs, strict=True):
        assert got.keys() == want.keys()
        assert got == pytest.approx(want, rel=1e-6, abs=1e-8)
    trl_params = dict(trl_run.model.named_parameters())
    for name, param in fixed_run.model.named_parameters():
        torch.testing.assert_close(param, trl_params[name], rtol=1e-6, atol=1e-7, msg=name)
    assert {h["value"] for h in fixed_run.meta_history} == {T}
    assert set(fixed_run.temperatures().values()) == {T}

    if case.tampo_refused is not None:
        with pytest.raises(ValueError, match=case.tampo_refused):
            _trainer("tampo", case, model_path, tmp_path)
        return
    tampo = _trainer("tampo", case, model_path, tmp_path)
    before = {n: p.detach().clone() for n, p in tampo.model.named_parameters()}
    tampo.train()
    _check_original_assertions(case, tampo, before)
    assert tampo.meta_policy.step == len(tampo.meta_history) > 0


def test_prepare_input_called_with_correct_data(model_path, tmp_path):
    """The generation batch (6 prompts x 4 generations) feeds ``steps_per_generation=4`` x
    ``num_iterations=2`` training steps unchanged: the window over which one temperature holds."""
    overrides = {
        "gradient_accumulation_steps": 3,
        "steps_per_generation": 4,
        "num_generations": 4,
        "per_device_train_batch_size": 6,
        "num_iterations": 2,
        "shuffle_dataset": False,
        "max_steps": -1,
        "num_train_epochs": 3,
    }
    prompts = _prompts(12)
    expected_first = [{"prompt": p} for p in prompts[:6] for _ in range(4)]
    expected_second = [{"prompt": p} for p in prompts[6:] for _ in range(4)]
    for arm in ("trl", "fixed", "tampo"):
        case = Case("test_prepare_input_called_with_correct_data", overrides)
        trainer = _trainer(arm, case, model_path, tmp_path)
        with patch.object(GRPOTrainer, "training_step", wraps=trainer.training_step) as spy:
            trainer.train()
        # 3 epochs * 2 iterations * 2 generation batches to cover the data * 4 steps_per_generation
        assert spy.call_count == 48
        batches = [call.args[1] for call in spy.call_args_list]
        for i in range(8):
            assert batches[i] == expected_first
        for i in range(8, 16):
            assert batches[i] == expected_second
        if arm != "trl":
            # one temperature per generation batch: 6 batches over 3 epochs
            assert len(trainer.meta_history) == 6  # type: ignore[attr-defined]
