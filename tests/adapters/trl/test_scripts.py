"""The TRL example and the overhead benchmark run end to end (smallest settings)."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import ModuleType

import pytest

from tests.paths import ROOT


def _load(relative: str) -> ModuleType:
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")


def test_example_trains_with_tampo(tmp_path, capsys):
    example = _load("examples/trl_grpo.py")
    out = tmp_path / "run"
    argv = ["--steps", "4", "--sft-steps", "20", "--eval-prompts", "8", "--out", str(out)]
    assert example.main(argv) == 0
    history = json.loads((out / "meta_history.json").read_text())
    assert len(history) == 4
    assert all(h["likelihood_path"] == "generate" for h in history)
    assert list(out.glob("checkpoint-*/metactl_state.json"))
    assert "greedy accuracy on 8 held-out prompts" in capsys.readouterr().out


def test_example_sizes_the_real_model_run_for_a_cpu_unless_told(tmp_path):
    example = _load("examples/trl_grpo.py")
    smoke = example.parse_args(["--model", "smollm2"])
    assert (smoke.steps, smoke.prompts_per_step, smoke.num_generations) == (4, 2, 4)
    assert (smoke.max_completion_length, smoke.lora_rank) == (12, 8)
    longer = example.parse_args(["--model", "smollm2", "--steps", "200", "--lora-rank", "0"])
    assert (longer.steps, longer.lora_rank, longer.prompts_per_step) == (200, 0, 2)
    tiny = example.parse_args([])
    assert (tiny.steps, tiny.lora_rank, tiny.max_completion_length) == (300, 0, 4)
    assert example.chat_task_reward(["12 + 5 = 17.", "17 - 1 = 16"], answer=["17", "17"]) == [
        1.0, 0.0,
    ]  # fmt: skip


def test_example_reward_reads_the_first_number():
    example = _load("examples/trl_grpo.py")
    got = example.first_number_reward(
        ["46", " 46\n", "461", "-3", "x46"], answer=["46"] * 4 + ["46"]
    )
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_benchmark_prints_the_table(capsys):
    bench = _load("benchmarks/trl_overhead.py")
    assert bench.main(["--sizes", "tiny", "--repeats", "1", "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "plain ms" in out and "fast ms" in out and "exact ms" in out
    assert out.strip().splitlines()[-2].startswith("tiny")
