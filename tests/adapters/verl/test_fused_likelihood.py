"""``metactl.candidate_likelihood=fused`` against ``passes`` in verl's real FSDP engine.

verl's actor ``TrainingWorker`` (FSDP2 on gloo, one rank, the test model of
:func:`metactl.adapters.verl.testing.build_fixture`) runs in a subprocess without Ray (the CPU
platform must be chosen before verl first starts, so not in this pytest process). Per
trajectory, the candidate log-likelihood sums that the engine hook computes inside verl's
old-log-prob pass must equal those of one log-prob pass per candidate (the paper's 10
temperatures) to 1e-5, with float32 FSDP (verl's default bf16 computes the passes'
log-softmax in bf16, so they differ by bf16 rounding), with and without remove-padding (the
packed and the padded logits layouts) and with verl's dynamic batch sizes (rows regrouped by
length, outputs put back in order), over several micro-batches of ragged prompts and
responses sampled from the model (as a rollout draws them), at two old-pass temperatures.
Also a row whose response tokens are all masked. (1e-5 is near float32's resolution for these
sums: both ways score each token in float32, and one unit in the last place of a float32 sum is
3.8e-6 below 64 in magnitude, 7.6e-6 from 64 to 128. Responses of at most 12 tokens keep the
sums where two such units stay under 1e-5 on any CPU; longer sums are compared, with their
float64 reference, in ``benchmarks/verl_likelihood.py``.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("verl", reason="verl is installed only in .ci/verl-env.sh's environment")

from metactl.adapters.verl.testing import CPU_ENV, build_fixture

_SCRIPT = """
import json, sys
import torch
from metactl.adapters.verl import testing

torch.set_num_threads(1)
model, layout = sys.argv[1], sys.argv[2]
worker = testing.log_prob_worker(
    model,
    use_remove_padding=layout != "padded",
    max_token_len=48 if layout == "dynamic" else None,
    port=int(sys.argv[3]),
)
candidates = [0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
rows = testing.response_batch(12, 300, seed=1, response=(1, 12), model=model)
rows[5] = (rows[5][0], torch.zeros_like(rows[5][1]))  # no response token counted
rows[7][1][::2] = 0  # every other response token not counted
passes = testing.candidate_sums(worker, rows, candidates, "passes")
report = {"passes": passes.tolist(), "counts": [int(m.sum()) for _, m in rows]}
for t in (1.0, 0.7):
    fused = testing.candidate_sums(worker, rows, candidates, "fused", temperature=t)
    report[f"fused_{t}"] = fused.tolist()
print("RESULT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fixture(tmp_path_factory.mktemp("fx"), prompts=4) / "model"


@pytest.mark.parametrize("layout", ["packed", "padded", "dynamic"])
def test_fused_sums_equal_one_pass_per_candidate(model_dir: Path, layout: str) -> None:
    env = dict(os.environ, **CPU_ENV)
    env.pop("VERL_USE_EXTERNAL_MODULES", None)  # the script imports the testing module itself
    port = {"packed": "29541", "padded": "29542", "dynamic": "29543"}[layout]
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(model_dir), layout, port],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    report = json.loads(line[len("RESULT ") :])
    passes = report["passes"]
    assert len(passes) == 12 and all(len(row) == 10 for row in passes)
    assert passes[5] == [0.0] * 10  # nothing counted: nothing summed
    assert all(row[0] < -1.0 for i, row in enumerate(passes) if i != 5)  # real sums
    for t in (1.0, 0.7):  # the old pass's own temperature does not enter the candidates
        fused = report[f"fused_{t}"]
        worst = max(
            abs(a - b)
            for f_row, p_row in zip(fused, passes, strict=True)
            for a, b in zip(f_row, p_row, strict=True)
        )
        print(f"fused at old-pass T={t}: worst |fused - passes| = {worst:.2e}, largest |sum| "
              f"{max(abs(x) for row in passes for x in row):.1f}")
        assert worst <= 1e-5, (t, worst, fused, passes)
