"""The verl adapter's parts against verl's real classes, without Ray: the agent loop's sampling
parameters (a real ``SingleTurnAgentLoop`` subclass; only the LLM server is a stand-in), the
trainer's configuration checks, selection and temperature stamping on real ``TensorDict`` /
``KVBatchMeta`` batches, and feedback from tensors laid out as verl's TransferQueue returns them.
"""

from __future__ import annotations

import json
import os
import types
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
    META_STATE_NAME,
    SAMPLED_TEMPERATURE_KEY,
    TEMPERATURE_FIELD,
    TRAINER_NAME,
)
from metactl.adapters.verl import feedback as fb
from metactl.adapters.verl import trainer as trainer_module
from metactl.adapters.verl.agent_loop import MetaSingleTurnAgentLoop, sampling_params_for
from metactl.adapters.verl.engine_hook import CANDIDATES_KEY, LOGLIK_FIELD
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

import metactl
import metactl.effective_temperature
import metactl.likelihood


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
    config.metactl = {"rule": "TAMPO", "candidate_likelihood": "passes"}
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
    assert fb.entropy_totals(entropy, mask) == (12.0, 4)  # a mean of 3.0 nats per token
    lp = [
        _nested_to_padded([[-1.0, -2.0, -3.0], [-4.0]]),
        _nested_to_padded([[0.0, 0.0, -3.0], [-1.0]]),
    ]
    feedback = metactl.build_feedback(
        metactl.tampo().spec,
        loglik_sum=fb.candidate_loglik_sums(lp, mask),
        token_counts=fb.token_counts(mask),
        advantages=[0.5, -0.5],
    )
    assert feedback.loglik.tolist() == [[-2.0, -1.0], [-4.0, -1.0]]
    with pytest.raises(ValueError, match="NaN or inf"):
        fb.trajectory_advantages(torch.where(mask.bool(), float("nan"), 0.0), mask)
    with pytest.raises(ValueError, match="shape"):
        fb.trajectory_rewards(scores[:, :2], mask)


# ---------------------------------------------------------------- construction-time refusals


@pytest.mark.parametrize(
    ("group", "rollout", "match"),
    [
        ({"rule": "TAMPO"}, {"top_p": 0.9}, r"rollout\.top_p=0\.9: TAMPO"),
        ({"rule": "TAMPO"}, {"top_k": 50}, r"rollout\.top_k=50: TAMPO"),
        ({"rule": "Counterfactual"}, {"top_k": 50, "n": 2}, r"rollout\.top_k=50: Counterfactual"),
        ({"rule": "Counterfactual"}, {"n": 1}, r"rollout\.n=1: Counterfactual"),
        (
            {"rule": "Uncertainty", "candidates": [0.5, 1.0, 1.5]},
            {"n": 1},
            r"rollout\.n=1: Uncertainty",
        ),
        (
            {"rule": "LinearThompson", "rule_kwargs": {"feature_dim": 2}, "context_key": "index"},
            {"n": 2},
            "feature_dim=0",
        ),
    ],
)
def test_rules_the_trainer_cannot_feed_are_refused_at_construction(
    group: dict[str, Any], rollout: dict[str, Any], match: str
) -> None:
    config = _config(**group)
    config.actor_rollout_ref.rollout.update(rollout)
    with pytest.raises(ValueError, match=match):
        MetaPPOTrainer(config)


def test_truncated_rollouts_stay_allowed_for_rules_without_likelihoods() -> None:
    config = _config(rule="PTGS", context_key="index", temperature_check="off")
    config.actor_rollout_ref.rollout.update(top_p=0.9, top_k=50)
    MetaPPOTrainer(config)


@pytest.mark.parametrize(
    ("group", "edit", "error", "match"),
    [
        ({"temperature_check": "strict"}, None, ValueError, r"temperature_check must be one of"),
        ({"temperature_check": True}, None, ValueError, r"temperature_check must be one of"),
        (
            {"temperature_check_kwargs": {"rtol": 0.1}},
            None,
            TypeError,
            r"temperature_check_kwargs do not fit",
        ),
        (
            {"temperature_check_kwargs": {"min_effect": 1.5}},
            None,
            ValueError,
            r"min_effect must lie in \[0, 1\)",
        ),
        (
            {"rule": "PTGS", "context_key": "index"},
            lambda c: c.actor_rollout_ref.rollout.update(top_p=0.9),
            ValueError,
            r"rollout\.top_p=0\.9: metactl\.temperature_check .*\+metactl\.temperature_check=off",
        ),
        (
            {"candidate_likelihood": "passes"},  # the fused likelihoods need that pass too
            lambda c: c.algorithm.rollout_correction.update(bypass_mode=True),
            ValueError,
            r"bypass_mode=True skips verl's old-log-prob pass",
        ),
    ],
)
def test_temperature_checks_that_cannot_run_are_refused_at_construction(
    group: dict[str, Any], edit: Any, error: type[Exception], match: str
) -> None:
    config = _config(**group)
    if edit is not None:
        edit(config)
    with pytest.raises(error, match=match):
        MetaPPOTrainer(config)
    config.metactl = {k: v for k, v in group.items() if not k.startswith("temperature_check")}
    config.metactl.temperature_check = "off"
    MetaPPOTrainer(config)  # without the check the same run is accepted


# ---------------------------------------------------------------- feedback through the trainer

_VOCAB = 6
_PROMPT_LEN = 2


def _nested(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


class _TransferQueue:
    """Stands in for verl's TransferQueue client (``kv_batch_get``/``kv_batch_put``): one
    step's trajectories, returned as verl returns them (per-token fields as jagged nested
    tensors, ``log_probs`` over prompt and response with NaN outside the response, the rest
    as ``NonTensorStack``). ``log_probs`` are those of the last ``compute_log_prob`` call's
    temperature, computed as verl's engine does (float32 ``log_softmax(z / T)``)."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: dict[str, dict[str, Any]] = {}
        self.temperature: float | None = None
        self.scored: list[float] = []

    def add(self, key: str, uid: str, sampled: float, length: int, reward: float) -> None:
        logits = torch.randn(length, _VOCAB, generator=self.generator, dtype=torch.float64) * 2
        tokens = torch.randint(0, _VOCAB, (length,), generator=self.generator)
        advantage = float(torch.randn((), generator=self.generator, dtype=torch.float64))
        self.rows[key] = {
            "uid": uid,
            "extra_fields": {SAMPLED_TEMPERATURE_KEY: sampled},
            TEMPERATURE_FIELD: torch.tensor(sampled, dtype=torch.float64),
            "response_mask": torch.ones(length, dtype=torch.int64),
            "advantages": torch.full((length,), advantage, dtype=torch.float32),
            "rm_scores": torch.cat([torch.zeros(length - 1), torch.tensor([reward])]),
            "entropy": torch.rand(length, generator=self.generator),
            "logits": logits,
            "tokens": tokens,
        }

    def compute_log_prob(self, meta: KVBatchMeta) -> None:
        self.temperature = float(meta.extra_info["temperature"])
        self.scored.append(self.temperature)

    def _log_probs(self, row: dict[str, Any]) -> torch.Tensor:
        assert self.temperature is not None
        z = (row["logits"] / self.temperature).float()
        response = torch.log_softmax(z, dim=-1).gather(1, row["tokens"][:, None])[:, 0]
        nan = torch.full((_PROMPT_LEN - 1,), float("nan"))
        return torch.cat([nan, response, torch.tensor([float("nan")])])

    def kv_batch_get(self, keys: list[str], partition_id: str, select_fields: list[str]) -> Any:
        rows = [self.rows[k] for k in keys]
        fields: dict[str, Any] = {}
        for name in select_fields:
            if name in ("uid", "extra_fields"):
                values = [r[name] for r in rows]
                fields[name] = np.array(values, dtype=object) if name == "uid" else values
            elif name == "log_probs":
                fields[name] = _nested([self._log_probs(r) for r in rows])
            elif name == TEMPERATURE_FIELD:
                fields[name] = torch.stack([r[name] for r in rows])
            else:
                fields[name] = _nested([r[name] for r in rows])
        return tu.get_tensordict(fields)

    def kv_batch_put(self, **kwargs: Any) -> None:
        raise AssertionError("a per-step policy writes no per-row temperatures")

    def reference_loglik_sums(self, keys: list[str], candidates: list[float]) -> np.ndarray:
        """``(N, K)`` summed log-likelihoods from metactl's own scoring."""
        rows = [self.rows[k] for k in keys]
        length = max(len(r["tokens"]) for r in rows)
        logits = np.zeros((len(rows), length, _VOCAB))
        tokens = np.zeros((len(rows), length), dtype=np.int64)
        mask = np.zeros((len(rows), length), dtype=bool)
        for i, r in enumerate(rows):
            n = len(r["tokens"])
            logits[i, :n], tokens[i, :n], mask[i, :n] = r["logits"], r["tokens"], True
        means = metactl.likelihood.candidate_loglik(logits, tokens, mask, candidates)
        return means * mask.sum(axis=1, keepdims=True)


class _Updates:
    """Records every ``MetaPolicy.update`` (decision, feedback) and runs it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[Any, metactl.Feedback]] = []
        original = metactl.MetaPolicy.update

        def update(policy: Any, decision: Any, feedback: Any = None, /, **kwargs: Any) -> Any:
            given = feedback if feedback is not None else metactl.Feedback.from_kwargs(kwargs)
            self.calls.append((decision, given))
            return original(policy, decision, feedback, **kwargs)

        monkeypatch.setattr(metactl.MetaPolicy, "update", update)


@pytest.fixture
def queue(monkeypatch: pytest.MonkeyPatch) -> _TransferQueue:
    fake = _TransferQueue()
    monkeypatch.setattr(trainer_module, "tq", fake)
    return fake


def _trainer(queue: _TransferQueue, n: int, **group: Any) -> MetaPPOTrainer:
    group.setdefault("candidate_likelihood", "passes")  # the stand-in scores pass by pass
    config = _config(**group)
    config.actor_rollout_ref.rollout.n = n
    trainer = MetaPPOTrainer(config)
    trainer.actor_rollout_wg = queue  # the worker group: only compute_log_prob is called
    trainer.wrap_worker_group(queue)
    trainer.global_steps = 1
    return trainer


def _step(
    trainer: MetaPPOTrainer,
    queue: _TransferQueue,
    groups: list[int],
    *,
    lengths: list[int] | None = None,
    rewards: list[float] | None = None,
) -> list[str]:
    """Submit ``len(groups)`` prompts, let prompt ``p`` return ``groups[p]`` trajectories (in
    an interleaved order, as verl's replay buffer may), run the feedback and the update;
    returns the trajectory keys in decision order."""
    trainer.begin_submission(_batch(len(groups)))
    pending = trainer._pending
    queue.rows.clear()
    keys = []
    for p, count in enumerate(groups):
        for j in range(count):
            keys.append(f"u{p}_{j}")
    i = 0
    for key in keys:
        p = int(key[1:].split("_")[0])
        length = lengths[i % len(lengths)] if lengths else 1 + i % 3
        reward = rewards[i % len(rewards)] if rewards else float(i % 2)
        queue.add(key, f"u{p}", float(pending.temperatures[p]), length, reward)
        i += 1
    interleaved = sorted(keys, key=lambda k: (k.split("_")[1], k))
    meta = KVBatchMeta(partition_id="train", keys=interleaved, tags=[{} for _ in interleaved])
    trainer._update_policy(meta, {})
    trainer.global_steps += 1
    return keys


@pytest.mark.parametrize("normalization", ["sum", "mean"])
def test_candidate_likelihoods_follow_the_rules_normalization(
    queue: _TransferQueue, monkeypatch: pytest.MonkeyPatch, normalization: str
) -> None:
    updates = _Updates(monkeypatch)
    candidates = [0.5, 1.0, 1.5]
    trainer = _trainer(
        queue,
        2,
        rule="TAMPO",
        rule_kwargs={"likelihood_normalization": normalization},
        candidates=candidates,
    )
    keys = _step(trainer, queue, [2, 2], lengths=[3, 1, 2, 5])
    assert queue.scored == candidates  # one log-prob pass per candidate temperature
    ((_, feedback),) = updates.calls
    sums = queue.reference_loglik_sums(keys, candidates)
    counts = np.array([len(queue.rows[k]["tokens"]) for k in keys])[:, None]
    expected = sums if normalization == "sum" else sums / counts
    np.testing.assert_allclose(feedback.loglik, expected, rtol=1e-5, atol=1e-5)
    assert feedback.advantages.tolist() == [float(queue.rows[k]["advantages"][0]) for k in keys]
    assert trainer.meta_policy.step == 1


def test_counterfactual_gets_summed_likelihoods_rewards_and_the_group_size(
    queue: _TransferQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    updates = _Updates(monkeypatch)
    candidates = [0.5, 1.0, 1.5]
    trainer = _trainer(queue, 2, rule="Counterfactual", candidates=candidates)
    keys = _step(trainer, queue, [2, 2, 2], rewards=[1.0, 0.0, 0.0])
    ((_, feedback),) = updates.calls
    np.testing.assert_allclose(
        feedback.loglik, queue.reference_loglik_sums(keys, candidates), rtol=1e-5, atol=1e-5
    )
    assert feedback.rewards.tolist() == [float(queue.rows[k]["rm_scores"][-1]) for k in keys]
    assert feedback.group_size == 2
    assert trainer.meta_policy.step == 1


def test_uncertainty_gets_rewards_and_the_group_size_without_scoring(
    queue: _TransferQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    updates = _Updates(monkeypatch)
    trainer = _trainer(queue, 3, rule="Uncertainty", candidates=[0.5, 1.0, 1.5])
    for _ in range(2):
        keys = _step(trainer, queue, [3, 3], rewards=[1.0, 0.0])
    assert queue.scored == []  # no likelihood pass for a rule that reads none
    _, feedback = updates.calls[-1]
    assert feedback.given() == ("rewards", "group_size")
    assert feedback.rewards.tolist() == [float(queue.rows[k]["rm_scores"][-1]) for k in keys]
    assert feedback.group_size == 3 and trainer.meta_policy.step == 2


def test_entropy_and_bandit_rules_get_batch_means_without_scoring(
    queue: _TransferQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    updates = _Updates(monkeypatch)
    trainer = _trainer(queue, 2, rule="EntropyTarget", rule_kwargs={"target_entropy": 1.0},
                       candidates=[0.5, 1.0, 1.5])  # fmt: skip
    trainer.tokenizer = types.SimpleNamespace(vocab_size=_VOCAB)
    keys = _step(trainer, queue, [2, 2], lengths=[3, 1, 2, 5])
    ((_, feedback),) = updates.calls
    entropies = torch.cat([queue.rows[k]["entropy"] for k in keys]).double()
    assert feedback.entropy == pytest.approx(float(entropies.mean()), rel=1e-12)
    assert feedback.vocab_size == _VOCAB and feedback.given() == ("entropy", "vocab_size")
    bandit = _trainer(queue, 2, rule="EXP3", candidates=[0.5, 1.0])
    _step(bandit, queue, [2, 2], rewards=[1.0, 0.0, 0.0, 0.0])
    assert updates.calls[-1][1].reward == 0.25
    assert queue.scored == []


def test_incomplete_prompt_groups_are_left_out_of_grouped_feedback(
    queue: _TransferQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    updates = _Updates(monkeypatch)
    trainer = _trainer(queue, 2, rule="Counterfactual", candidates=[0.5, 1.0, 1.5])
    keys = _step(trainer, queue, [2, 1, 0, 2], rewards=[1.0, 0.0, 0.0])
    ((_, feedback),) = updates.calls
    kept = [k for k in keys if k.startswith(("u0_", "u3_"))]
    assert feedback.rewards.tolist() == [float(queue.rows[k]["rm_scores"][-1]) for k in kept]
    with pytest.raises(RuntimeError, match="no prompt of this step came back with all"):
        _step(trainer, queue, [1, 1])


def test_per_prompt_feedback_updates_the_complete_groups_only(
    queue: _TransferQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    updates = _Updates(monkeypatch)
    trainer = _trainer(queue, 2, rule="PTGS", context_key="index")
    keys = _step(trainer, queue, [2, 0, 2])
    ((decision, feedback),) = updates.calls
    assert [d.context for d in decision] == [10, 12]
    assert feedback.rewards.tolist() == [float(queue.rows[k]["rm_scores"][-1]) for k in keys]


# ---------------------------------------------------------------- history and checkpoints


def test_meta_history_is_bounded_saved_and_restored(
    queue: _TransferQueue, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(trainer_module, "META_HISTORY_LIMIT", 3, raising=False)
    monkeypatch.setattr(trainer_module.PPOTrainerSync, "_save_checkpoint", lambda self: None)
    trainer = _trainer(queue, 2, rule="EXP3", candidates=[0.5, 1.0], seed=0)
    trainer.config.trainer.default_local_dir = str(tmp_path)
    for _ in range(5):
        _step(trainer, queue, [2, 2])
    assert [h["global_step"] for h in trainer.meta_history] == [3, 4, 5]
    trainer.global_steps = 5
    trainer._save_checkpoint()
    path = tmp_path / "global_step_5" / META_STATE_NAME
    resumed = _trainer(queue, 2, rule="EXP3", candidates=[0.5, 1.0], seed=0)
    resumed.load_meta_state(str(path))
    assert list(resumed.meta_history) == list(trainer.meta_history)
    assert resumed.meta_history.maxlen == 3
    assert resumed.meta_policy.state_dict() == trainer.meta_policy.state_dict()


def test_checkpoint_file_is_fsynced_before_verl_writes_its_own(
    queue: _TransferQueue, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    events: list[str] = []
    fsync = os.fsync

    def spy(fd: int) -> None:
        events.append("fsync " + os.path.realpath(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    monkeypatch.setattr(
        trainer_module.PPOTrainerSync, "_save_checkpoint", lambda self: events.append("verl")
    )
    trainer = _trainer(queue, 2, rule="EXP3", candidates=[0.5, 1.0])
    trainer.config.trainer.default_local_dir = str(tmp_path)
    trainer._save_checkpoint()
    folder = tmp_path / "global_step_1"
    assert len(events) == 3 and events[-1] == "verl"
    assert events[0].startswith(f"fsync {folder.resolve()}/") and events[0].endswith(".tmp")
    assert events[1] == f"fsync {folder.resolve()}"
    assert sorted(p.name for p in folder.iterdir()) == [META_STATE_NAME]


@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_a_state_whose_format_is_no_int_version_is_refused(tmp_path: Path, version: Any) -> None:
    trainer = MetaPPOTrainer(_config(rule="EXP3", candidates=[0.5, 1.0]))
    path = tmp_path / META_STATE_NAME
    path.write_text(json.dumps({"format": version, "policy": trainer.meta_policy.state_dict()}))
    policy = trainer.meta_policy
    with pytest.raises(ValueError, match="format must be an int version"):
        trainer.load_meta_state(str(path))
    assert trainer.meta_policy is policy


# ---------------------------------------------------------------- the sampled-temperature check


class _OldLogProbQueue:
    """Stands in for verl's TransferQueue and actor worker group around verl's own
    ``_compute_old_log_prob``: trajectories whose tokens were drawn from known logits, and a
    ``compute_log_prob`` that scores them as verl's engine does (float32 ``logits / T``, verl's
    ``logprobs_from_logits`` and ``entropy_from_logits``, at the stamped scalar or else at each
    row's ``temperature`` field), stored over prompt and response like verl's output."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.tags: dict[str, dict[str, Any]] = {}
        self.fetched: list[list[str]] = []
        self.candidates: list[Any] = []  # CANDIDATES_KEY of every compute_log_prob batch

    def fill(
        self, pending: Any, sampled: Any, *, samples: int = 2, length: int = 24, seed: int = 0
    ) -> KVBatchMeta:
        """``samples`` trajectories per submitted prompt, each token drawn from
        ``softmax(logits / sampled(T))`` of its prompt's chosen ``T`` (``sampled`` returning
        0 draws the argmax: greedy); the batch's ``KVBatchMeta``."""
        generator = torch.Generator().manual_seed(seed)
        self.rows.clear()
        for p, (uid, chosen) in enumerate(zip(pending.uids, pending.temperatures, strict=True)):
            for j in range(samples):
                scale = 1.0 + 4.0 * torch.rand(length, 1, generator=generator, dtype=torch.float64)
                logits = torch.randn(length, _VOCAB_CHECK, generator=generator).double() * scale
                value = float(sampled(float(chosen)))
                if value == 0.0:
                    tokens = logits.argmax(dim=1)
                else:
                    probs = torch.softmax(logits / value, dim=1)
                    tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
                self.rows[f"u{p}_{j}"] = {
                    "uid": uid,
                    TEMPERATURE_FIELD: torch.tensor(float(chosen), dtype=torch.float64),
                    "response_mask": torch.ones(length, dtype=torch.int64),
                    "logits": logits,
                    "tokens": tokens,
                }
        keys = sorted(self.rows, key=lambda k: (k.split("_")[1], k))  # interleaved, as verl may
        self.tags = {k: {} for k in keys}
        return KVBatchMeta(partition_id="train", keys=keys, tags=[{} for _ in keys])

    def compute_log_prob(self, meta: KVBatchMeta) -> KVBatchMeta:
        from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

        assert meta.extra_info["calculate_entropy"]  # verl's old-log-prob pass asks for it
        self.candidates.append(meta.extra_info.get(CANDIDATES_KEY))
        nan = torch.full((_PROMPT_LEN - 1,), float("nan"))
        for key in meta.keys:
            row = self.rows[key]
            value = meta.extra_info.get("temperature", None)
            if value is None:  # per prompt: the field _write_row_temperatures put
                value = row["temperature"]
            z = (row["logits"] / float(value)).float()
            lp = logprobs_from_logits(z, row["tokens"])
            for name, values in (("log_probs", lp), ("entropy", entropy_from_logits(z))):
                row[name] = torch.cat([nan, values, nan[:1]])
        return meta

    def kv_batch_get(self, keys: list[str], partition_id: str, select_fields: list[str]) -> Any:
        self.fetched.append(list(select_fields))
        fields: dict[str, Any] = {}
        for name in select_fields:
            values = [self.rows[k][name] for k in keys]
            if name == "uid":
                fields[name] = np.array(values, dtype=object)
            elif values[0].ndim == 0:
                fields[name] = torch.stack(values)
            else:
                fields[name] = _nested(values)
        return tu.get_tensordict(fields)

    def kv_batch_put(self, keys: list[str], partition_id: str, fields: Any) -> KVBatchMeta:
        for name in fields.keys():
            column = fields[name]
            values = column.unbind() if column.is_nested else list(column)
            for key, value in zip(keys, values, strict=True):
                self.rows[key][name] = value
        return KVBatchMeta(partition_id=partition_id, keys=keys, tags=[self.tags[k] for k in keys])


_VOCAB_CHECK = 32


@pytest.fixture
def old_pass(monkeypatch: pytest.MonkeyPatch) -> _OldLogProbQueue:
    from verl.trainer.ppo.v1 import trainer_base

    fake = _OldLogProbQueue()
    monkeypatch.setattr(trainer_module, "tq", fake)
    monkeypatch.setattr(trainer_base, "tq", fake)
    return fake


def _checking_trainer(queue: _OldLogProbQueue, prompts: int, **group: Any) -> Any:
    """A trainer with the fake worker group, its decision for ``prompts`` prompts in flight."""
    config = _config(**group)
    config.actor_rollout_ref.rollout.calculate_log_probs = False  # no rollout log-probs here
    trainer = MetaPPOTrainer(config)
    trainer.actor_rollout_wg = queue
    trainer.wrap_worker_group(queue)
    trainer.global_steps = 1
    trainer.begin_submission(_batch(prompts))
    return trainer


_AT_06 = {"rule": "Fixed", "rule_kwargs": {"value": 0.6}, "candidates": [0.6, 1.0]}
_PER_PROMPT = {
    "rule": "PTGS",
    "rule_kwargs": {"t_ref": 0.6, "tau": 1.2},  # per-prompt values in [0.5, 0.72]
    "context_key": "index",
    "seed": 0,
}


@pytest.mark.parametrize("group", [_AT_06, _PER_PROMPT], ids=["per-step", "per-prompt"])
def test_tokens_sampled_at_the_chosen_temperature_pass_verls_old_log_prob_pass(
    old_pass: _OldLogProbQueue, group: dict[str, Any]
) -> None:
    trainer = _checking_trainer(old_pass, 8, **group)
    chosen = trainer._pending.temperatures
    assert len(set(chosen.tolist())) == (8 if "context_key" in group else 1)
    meta = old_pass.fill(trainer._pending, lambda t: t)
    if "context_key" in group:
        trainer._write_row_temperatures(meta)  # what _balance_batch does per prompt
    metrics: dict[str, Any] = {}
    trainer._compute_old_log_prob(meta, metrics)  # verl's own pass, then the check
    assert "actor/entropy" in metrics  # verl's pass ran (and computed the entropy)
    assert abs(metrics["metactl/effective_temperature_z"]) < 3
    assert abs(metrics["metactl/effective_temperature_effect"]) < 3 / np.sqrt(8 * 2 * 24)
    assert metrics["metactl/effective_temperature_departed"] == 0.0
    # the check read what verl's pass wrote back (response-aligned), each row at its own value
    rows = [old_pass.rows[k] for k in meta.keys]
    score = metactl.effective_temperature.temperature_score(
        _nested([r["old_log_probs"] for r in rows]).to_padded_tensor(0.0),
        _nested([r["entropy"] for r in rows]).to_padded_tensor(0.0),
        temperature=[float(r[TEMPERATURE_FIELD]) for r in rows],
    )
    assert metrics["metactl/effective_temperature_z"] == pytest.approx(score.z, rel=1e-12)


@pytest.mark.parametrize(
    ("group", "sampled", "match"),
    [
        (_AT_06, lambda t: 0.0, r"step 1: sampled tokens look drawn colder than .* 0\.6 "),
        (_AT_06, lambda t: 1.0, r"step 1: sampled tokens look drawn hotter than .* 0\.6 "),
        (_PER_PROMPT, lambda t: 0.0, "colder"),
        (_PER_PROMPT, lambda t: 1.0, "hotter"),
    ],
    ids=["greedy", "T=1 stamped 0.6", "per-prompt greedy", "per-prompt T=1"],
)
def test_tokens_sampled_greedily_or_at_another_temperature_stop_the_step(
    old_pass: _OldLogProbQueue, group: dict[str, Any], sampled: Any, match: str
) -> None:
    trainer = _checking_trainer(old_pass, 8, **group)
    meta = old_pass.fill(trainer._pending, sampled)
    if "context_key" in group:
        trainer._write_row_temperatures(meta)
    with pytest.raises(ValueError, match=match) as caught:
        trainer._compute_old_log_prob(meta, {})
    assert "metactl.temperature_check=error" in str(caught.value)


def test_warn_mode_warns_logs_the_departure_and_trains_on(old_pass: _OldLogProbQueue) -> None:
    trainer = _checking_trainer(old_pass, 8, **_AT_06, temperature_check="warn")
    metrics: dict[str, Any] = {}
    with pytest.warns(metactl.effective_temperature.EffectiveTemperatureWarning, match="colder"):
        trainer._compute_old_log_prob(old_pass.fill(trainer._pending, lambda t: 0.0), metrics)
    assert metrics["metactl/effective_temperature_departed"] == 1.0
    assert metrics["metactl/effective_temperature_z"] < -10
    assert metrics["metactl/effective_temperature_effect"] < -0.5


def test_thresholds_from_the_config_group_reach_the_check(old_pass: _OldLogProbQueue) -> None:
    kwargs = {"z_threshold": 1000.0}  # more than sqrt(tokens): nothing can fail
    trainer = _checking_trainer(old_pass, 8, **_AT_06, temperature_check_kwargs=kwargs)
    metrics: dict[str, Any] = {}
    trainer._compute_old_log_prob(old_pass.fill(trainer._pending, lambda t: 0.0), metrics)
    assert metrics["metactl/effective_temperature_departed"] == 0.0


def test_the_check_off_reads_nothing(old_pass: _OldLogProbQueue) -> None:
    trainer = _checking_trainer(old_pass, 4, **_AT_06, temperature_check="off")
    metrics: dict[str, Any] = {}
    trainer._compute_old_log_prob(old_pass.fill(trainer._pending, lambda t: 0.0), metrics)
    assert "actor/entropy" in metrics
    assert not any(k.startswith("metactl/effective_temperature") for k in metrics)
    assert all("old_log_probs" not in fields for fields in old_pass.fetched)


def test_fused_candidates_ride_on_the_old_log_prob_pass_only(old_pass: _OldLogProbQueue) -> None:
    trainer = _checking_trainer(old_pass, 4, rule="TAMPO", candidates=[0.6, 1.0])
    assert trainer.fused_likelihoods  # the default for a likelihood rule
    meta = old_pass.fill(trainer._pending, lambda t: t)
    trainer._compute_old_log_prob(meta, {})
    assert old_pass.candidates == [(0.6, 1.0)]
    assert CANDIDATES_KEY not in meta.extra_info  # the later passes get the batch without them
    passes = _checking_trainer(old_pass, 4, rule="TAMPO", candidate_likelihood="passes")
    assert not passes.fused_likelihoods
    passes._compute_old_log_prob(old_pass.fill(passes._pending, lambda t: t), {})
    assert old_pass.candidates[-1] is None


def test_a_worker_without_the_engine_hook_is_an_error() -> None:
    returned = KVBatchMeta(partition_id="train", keys=[], tags=[], fields=["log_probs"])
    with pytest.raises(RuntimeError, match="VERL_USE_EXTERNAL_MODULES"):
        trainer_module._check_scored(returned)
    trainer_module._check_scored(
        KVBatchMeta(partition_id="train", keys=[], tags=[], fields=["log_probs", LOGLIK_FIELD])
    )


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c.actor_rollout_ref.model.update(use_fused_kernels=True), "use_fused_kernels"),
        (lambda c: c.actor_rollout_ref.actor.update(strategy="megatron"), "strategy='megatron'"),
        (
            lambda c: c.actor_rollout_ref.actor.update(ulysses_sequence_parallel_size=2),
            "ulysses_sequence_parallel_size=2",
        ),
    ],
)
def test_fused_likelihoods_that_cannot_run_are_refused_at_construction(
    edit: Any, match: str
) -> None:
    config = _config(rule="TAMPO")
    edit(config)
    with pytest.raises(ValueError, match=f"metactl.candidate_likelihood=fused .*{match}"):
        MetaPPOTrainer(config)
    config.metactl = {"rule": "TAMPO", "candidate_likelihood": "passes"}
    MetaPPOTrainer(config)  # one log-prob pass per candidate runs there
