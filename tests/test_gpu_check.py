"""``benchmarks/gpu_check.sh`` and its Python stages, in their CPU mode (toy sizes).

The GPU run itself needs a CUDA machine; here the exactness checks run on the CPU through the
same code, the fused TRL check on the tiny model, the GRPO summary on a made-up output folder,
and the script's refusal where torch has no CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.paths import load_script, project_file

torch = pytest.importorskip("torch")


def _gpu_check() -> ModuleType:
    return load_script("benchmarks/gpu_check.py")


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    return _gpu_check()


def test_exactness_every_family_float32_and_bf16_on_cpu(gpu_check, tmp_path, capsys):
    key = tmp_path / "exactness.key"
    argv = ["exactness", "--device", "cpu", "--sequences", "3", "--length", "16",
            "--vocab", "512", "--key", str(key)]
    assert gpu_check.main(argv) == 0
    out = capsys.readouterr().out
    for label in gpu_check.CASES:
        assert f"{label} " in out
    rows = [line for line in out.splitlines()
            if line.split()[-1:] in (["ok"], ["FAIL"]) and not line.startswith("family ")]
    assert len(rows) == 2 * len(gpu_check.CASES)  # float32 and bf16, one path each on the CPU
    assert all(line.endswith("  ok") for line in rows)
    summary = key.read_text().strip()
    assert summary.startswith(f"{2 * len(gpu_check.CASES)} checks, max err f32 ")
    assert "FAILED" not in summary


def test_exactness_fails_when_a_result_is_off(gpu_check, monkeypatch, capsys):
    """A backend that is off by more than the tolerance is reported and fails the stage."""
    real = gpu_check.candidate_loglik

    def off(logits, *args, **kwargs):
        out = real(logits, *args, **kwargs)
        return out + 1e-3 if isinstance(out, torch.Tensor) else out

    monkeypatch.setattr(gpu_check, "candidate_loglik", off)
    argv = ["exactness", "--device", "cpu", "--sequences", "2", "--length", "8", "--vocab", "64"]
    assert gpu_check.main(argv) == 1
    assert "FAILED: temperature/float32/default" in capsys.readouterr().out


def test_fused_trl_fold_equals_exact_on_cpu(gpu_check, tmp_path, capsys):
    pytest.importorskip("trl")
    from metactl.adapters.trl.testing import torch_threads

    key = tmp_path / "fused.key"
    with torch_threads(1):
        assert gpu_check.main(["fused-trl", "--device", "cpu", "--no-real-model",
                               "--key", str(key)]) == 0
    out = capsys.readouterr().out
    assert "TRL fold torch tiles" in out and "SmolLM2" not in out
    assert key.read_text().startswith("3 batches (torch tiles), max err fused vs exact ")


def test_grpo_summary_reads_finished_arms(gpu_check, tmp_path, capsys):
    run = tmp_path / "runs" / "tampo" / "seed0"
    run.mkdir(parents=True)
    result = {"steps": 3, "final": {"avg": {"pass1": 0.25, "greedy": 0.5, "pass_at_k": 0.75}},
              "temperature": [0.6, 0.9, 1.2], "train_seconds": 4.0, "meta_seconds": 0.5}
    (run / "result.json").write_text(json.dumps(result))
    key = tmp_path / "grpo.key"
    assert gpu_check.main(["grpo-summary", str(tmp_path), "--controllers", "tampo",
                           "--key", str(key)]) == 0
    assert key.read_text().strip() == "pass@1 after 3 steps: tampo 0.250"
    # an arm that did not finish inside the time box is named, and the stage fails
    assert gpu_check.main(["grpo-summary", str(tmp_path), "--controllers", "fixed-1.0,tampo",
                           "--key", str(key)]) == 1
    assert key.read_text().strip().endswith("; not finished: fixed-1.0")
    assert "(not finished)" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_script_refuses_without_cuda(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path / "out")}
    script = Path(project_file("benchmarks/gpu_check.sh"))
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env,
                          check=False, timeout=120)
    assert proc.returncode == 2
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refused: no CUDA device")
    assert not (tmp_path / "out").exists()  # refused before any stage
