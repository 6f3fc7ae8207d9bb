"""The verl adapter's parts against verl's real classes, without Ray: the agent loop's sampling
parameters (a real ``SingleTurnAgentLoop`` subclass; only the LLM server is a stand-in), the
trainer's configuration checks, selection and temperature stamping on real ``TensorDict`` /
``KVBatchMeta`` batches, and feedback from tensors laid out as verl's TransferQueue returns them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("verl", reason="verl is installed only in .ci/verl-env.sh's environment")
os.environ.setdefault("VERL_USE_EXTERNAL_MODULES", "metactl.adapters.verl.register")

import torch
import verl
from metactl.adapters.verl import (
    AGENT_LOOP_NAME,
    SAMPLED_TEMPERATURE_KEY,
    TEMPERATURE_FIELD,
    TRAINER_NAME,
)
from metactl.adapters.verl import feedback as fb
from metactl.adapters.verl.agent_loop import MetaSingleTurnAgentLoop, sampling_params_for
from metactl.adapters.verl.trainer import MetaPPOTrainer
from omegaconf import OmegaConf
from tensordict import TensorDict
from transfer_queue import KVBatchMeta
from transformers import AutoTokenizer
from verl.experimental.agent_loop.agent_loop import DictConfigWrap, _agent_loop_registry
from verl.trainer.ppo.v1 import get_trainer_cls
from verl.utils import tensordict_utils as tu
from verl.utils.dataset.rl_dataset import RLHFDataset
from verl.workers.rollout.replica import TokenOutput


def _config(**metactl: Any) -> Any:
    path = Path(verl.__file__).parent / "trainer" / "config" / "_generated_ppo_trainer.yaml"
    config = OmegaConf.load(path)
    OmegaConf.set_struct(config, False)
    config.actor_rollout_ref.rollout.agent.default_agent_loop = AGENT_LOOP_NAME
    config.trainer.v1.trainer_mode = TRAINER_NAME
    config.algorithm.adv_estimator = "grpo"
    config.metactl = metactl
    return config


def test_register_module_registers_trainer_and_agent_loop() -> None:
    assert get_trainer_cls(TRAINER_NAME) is MetaPPOTrainer
    assert _agent_loop_registry[AGENT_LOOP_NAME]["_target_"].endswith("MetaSingleTurnAgentLoop")


class _Server:
    """Stands in for verl's LLM server client: records the sampling parameters it was sent."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def generate(self, *, sampling_params: dict[str, Any], **_: Any) -> TokenOutput:
        self.sent.append(dict(sampling_params))
        return TokenOutput(token_ids=[5, 6, 7], log_probs=[-1.0, -1.0, -1.0])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from metactl.adapters.verl.testing import build_fixture

    folder = build_fixture(tmp_path_factory.mktemp("fx"), prompts=4)
    return AutoTokenizer.from_pretrained(folder / "model")


def _loop(tokenizer: Any, server: _Server) -> MetaSingleTurnAgentLoop:
    config = _config()
    return MetaSingleTurnAgentLoop(
        trainer_config=DictConfigWrap(config),
        server_manager=server,
        tokenizer=tokenizer,
        processor=None,
        dataset_cls=RLHFDataset,
        data_config=DictConfigWrap(config.data),
    )


def test_agent_loop_samples_at_the_prompt_field(tokenizer: Any) -> None:
    server = _Server()
    loop = _loop(tokenizer, server)
    params = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True}
    prompt = [{"role": "user", "content": "12+3="}]
    value = torch.tensor(0.7, dtype=torch.float64)  # what verl hands over per prompt
    # the loop runs its tokenizer work on the event loop it captured at construction
    run = loop.loop.run_until_complete
    output = run(loop.run(dict(params), raw_prompt=prompt, **{TEMPERATURE_FIELD: value}))
    assert server.sent[0]["temperature"] == 0.7
    assert {k: v for k, v in server.sent[0].items() if k != "temperature"} == {
        k: v for k, v in params.items() if k != "temperature"
    }
    assert output.extra_fields[SAMPLED_TEMPERATURE_KEY] == 0.7
    assert output.response_ids == [5, 6, 7]
    # validation batches carry no field: verl's val_kwargs temperature is left alone
    output = run(loop.run({**params, "temperature": 0.0}, raw_prompt=prompt))
    assert server.sent[1]["temperature"] == 0.0
    assert SAMPLED_TEMPERATURE_KEY not in output.extra_fields


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (float("nan"), ValueError, "finite"),
        (0.0, ValueError, "> 0"),
        (True, TypeError, "number"),
        ("0.7", TypeError, "number"),
        (torch.tensor([0.7, 0.8]), ValueError, "one value per prompt"),
    ],
)
def test_bad_temperature_fields_are_refused(value: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        sampling_params_for({"temperature": 1.0}, value)


def test_greedy_prompts_conflict_with_a_chosen_temperature() -> None:
    with pytest.raises(ValueError, match="greedy"):
        sampling_params_for({"temperature": 0}, 0.8)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda c: c.actor_rollout_ref.rollout.agent.update(
                default_agent_loop="single_turn_agent"
            ),
            "default_agent_loop",
        ),
        (lambda c: c.algorithm.filter_groups.update(enable=True, metric="acc"), "filter_groups"),
        (lambda c: c.trainer.v1.sampler.update(sync_refill_failed_groups=True), "sync_refill"),
    ],
)
def test_unsupported_configurations_are_refused(edit: Any, match: str) -> None:
    config = _config()
    edit(config)
    with pytest.raises(ValueError, match=match):
        MetaPPOTrainer(config)


def test_fused_kernels_are_refused_with_a_per_prompt_policy() -> None:
    config = _config(rule="PTGS", context_key="index")
    config.actor_rollout_ref.model.use_fused_kernels = True
    with pytest.raises(ValueError, match="use_fused_kernels=False"):
        MetaPPOTrainer(config)
    config.metactl = {"rule": "TAMPO"}
    MetaPPOTrainer(config)  # one scalar per step: fused kernels stay usable


def _batch(n: int) -> TensorDict:
    return tu.get_tensordict(
        {
            "uid": np.array([f"u{i}" for i in range(n)], dtype=object),
            "index": torch.arange(10, 10 + n),
            "raw_prompt": np.array([[{"role": "user", "content": "1+1="}]] * n, dtype=object),
        }
    )


def test_per_step_selection_stamps_the_batch_and_every_log_prob_pass() -> None:
    trainer = MetaPPOTrainer(_config(rule="Hedge", candidates=[0.6, 1.5], seed=0))
    assert trainer.trainer_mode == "sync"  # verl's sync replay buffer, refills and checkpoints
    batch = _batch(3)
    trainer.begin_submission(batch)
    value = trainer.meta_policy.candidates[trainer._pending.decision.index]
    assert batch[TEMPERATURE_FIELD].tolist() == [value] * 3
    calls: list[dict[str, Any]] = []

    class _Group:  # the worker group's entry points as verl binds them: plain attributes
        def compute_log_prob(self, meta: KVBatchMeta) -> None:
            calls.append(dict(meta.extra_info))

        def update_actor(self, meta: KVBatchMeta) -> None:
            calls.append(dict(meta.extra_info))

    group = _Group()
    trainer.wrap_worker_group(group)
    for method in (group.compute_log_prob, group.update_actor):
        meta = KVBatchMeta(partition_id="train", keys=["u0_0_0"], tags=[{}])
        meta.extra_info.update({"temperature": 1.0, "compute_loss": False})  # as verl stamps
        method(meta)
    assert [c["temperature"] for c in calls] == [value, value]
    with pytest.raises(RuntimeError, match="before the first one's feedback"):
        trainer.begin_submission(_batch(3))


def test_per_prompt_selection_leaves_the_engine_a_per_sample_field() -> None:
    trainer = MetaPPOTrainer(_config(rule="PTGS", seed=0, context_key="index"))
    batch = _batch(4)
    trainer.begin_submission(batch)
    decision = trainer._pending.decision
    assert list(decision.contexts) == [10, 11, 12, 13]
    assert batch[TEMPERATURE_FIELD].tolist() == decision.values.tolist()
    assert len(set(decision.values.tolist())) == 4
    meta = KVBatchMeta(partition_id="train", keys=["u0_0_0"], tags=[{}])
    meta.extra_info.update({"temperature": 1.0})
    trainer.stamp_temperature(meta)
    assert "temperature" not in meta.extra_info  # the (bsz,) TransferQueue field wins


def test_missing_context_field_is_an_error() -> None:
    trainer = MetaPPOTrainer(_config(rule="PTGS", context_key="prompt_id"))
    with pytest.raises(KeyError, match="prompt_id"):
        trainer.begin_submission(_batch(2))


def _nested_to_padded(rows: list[list[float]]) -> torch.Tensor:
    nested = torch.nested.as_nested_tensor([torch.tensor(r) for r in rows], layout=torch.jagged)
    return TensorDict({"x": nested}, batch_size=len(rows)).to_padded_tensor()["x"]


def test_feedback_from_transfer_queue_layout() -> None:
    # two trajectories of lengths 3 and 1, right-padded as to_padded_tensor() returns them
    mask = _nested_to_padded([[1.0, 1.0, 1.0], [1.0]]).long()
    advantages = _nested_to_padded([[0.5, 0.5, 0.5], [-0.5]])
    scores = _nested_to_padded([[0.0, 0.0, 1.0], [0.25]])
    entropy = _nested_to_padded([[1.0, 2.0, 3.0], [6.0]])
    assert fb.trajectory_advantages(advantages, mask).tolist() == [0.5, -0.5]
    assert fb.trajectory_rewards(scores, mask).tolist() == [1.0, 0.25]
    assert fb.mean_entropy(entropy, mask) == 3.0
    lp = [
        _nested_to_padded([[-1.0, -2.0, -3.0], [-4.0]]),
        _nested_to_padded([[0.0, 0.0, -3.0], [-1.0]]),
    ]
    assert fb.candidate_loglik(lp, mask).tolist() == [[-2.0, -1.0], [-4.0, -1.0]]
    with pytest.raises(ValueError, match="NaN or inf"):
        fb.trajectory_advantages(torch.where(mask.bool(), float("nan"), 0.0), mask)
    with pytest.raises(ValueError, match="shape"):
        fb.trajectory_rewards(scores[:, :2], mask)
    with pytest.raises(ValueError, match="no response token"):
        fb.mean_entropy(entropy, torch.zeros_like(mask))
