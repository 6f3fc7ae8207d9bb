"""The comparison pipeline end to end at miniature scale: warm-up cache, parallel arms, report
(markdown, JSON, figures), statistics, and arm-level resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from metactl.adapters.lab.reproduce.cli import build_parser, config_from_args
from metactl.adapters.lab.reproduce.experiment import (
    run_experiment,
)
from metactl.adapters.lab.reproduce.report import paired, sensitivity_check

from tests.adapters.lab.reproduce.helpers import miniature_config


def test_miniature_comparison_writes_the_report_and_resumes(tmp_path):
    cfg = miniature_config(
        str(tmp_path / "out"), ("fixed-0.9", "fixed-1.5", "linear-0.9-1.5", "tampo"), (0, 1),
        checkpoint_every=2, workers=2, cache_dir=str(tmp_path / "cache"),
    )
    md_path = run_experiment(cfg, progress=False)
    md = md_path.read_text()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for row in ("| start model, no RL |", "| GRPO, T = 0.9 |", "| GRPO, T = 1.5 |",
                "| GRPO, T linear 0.9 -> 1.5 |", "| TAMPO |"):
        assert row in md
    assert "| method | Avg | chain-1 | chain-2 |" in md
    assert "Task check" in md and "TAMPO vs the best fixed temperature" in md
    for fig in ("learning_curves", "temperature", "diagnostics", "meta_policy"):
        assert (tmp_path / "out" / report["figures"][fig]).stat().st_size > 1000
    summary = report["summary"]
    assert summary["tampo"]["seeds"] == [0, 1]
    runs = {(c, s): json.loads((tmp_path / "out" / "runs" / c / f"seed{s}" / "result.json")
                               .read_text()) for c in cfg.controllers for s in cfg.seeds}
    # the table is the runs' own numbers
    vals = [runs[("tampo", s)]["final"]["avg"]["pass1"] for s in (0, 1)]
    assert summary["tampo"]["benchmarks"]["avg"]["pass1"]["mean"] == pytest.approx(np.mean(vals))
    assert runs[("fixed-1.5", 0)]["temperature"] == [1.5] * 4
    assert runs[("linear-0.9-1.5", 0)]["temperature"][0] == pytest.approx(0.9)
    assert runs[("linear-0.9-1.5", 0)]["temperature"][-1] == pytest.approx(1.5)
    assert report["start"]["task_check"]["n"] == 50
    assert "tampo_vs_best_fixed" in report and report["tampo_vs_best_fixed"]["best_fixed"] in (
        "fixed-0.9", "fixed-1.5")
    # finished arms are not re-run: a second invocation only rebuilds the report
    stamp = {k: v["wall_seconds"] for k, v in runs.items()}
    run_experiment(cfg, progress=False)
    for (c, s), wall in stamp.items():
        again = json.loads((tmp_path / "out" / "runs" / c / f"seed{s}" / "result.json").read_text())
        assert again["wall_seconds"] == wall


def test_paired_statistics_and_sensitivity_verdict():
    r = paired([0.50, 0.55, 0.60, 0.52, 0.58], [0.40, 0.47, 0.50, 0.45, 0.49])
    assert r["wins"] == 5 and r["t_p"] < 0.01 and r["mean_diff"] == pytest.approx(0.088)

    def arm(values):
        return {"seeds": list(range(len(values))), "benchmarks": {"avg": {
            "pass1": {"values": values, "mean": float(np.mean(values)),
                      "std": float(np.std(values, ddof=1))}}}}

    clear = sensitivity_check({"fixed-0.9": arm([0.80, 0.81, 0.79]),
                               "fixed-1.5": arm([0.70, 0.71, 0.69])}, {})
    assert clear["temperature_matters"] and clear["metrics"]["pass1"]["best"] == "fixed-0.9"
    noisy = sensitivity_check({"fixed-0.9": arm([0.80, 0.70, 0.75]),
                               "fixed-1.5": arm([0.78, 0.72, 0.74])}, {})
    assert not noisy["temperature_matters"]


def test_cli_defaults_run_with_no_arguments():
    args = build_parser().parse_args([])
    cfg = config_from_args(args)
    assert cfg.preset == "cpu" and cfg.out == "runs/reproduce" and len(cfg.seeds) >= 5
    assert cfg.controllers == ("fixed-0.9", "fixed-1.2", "fixed-1.5", "linear-0.9-1.5", "tampo")
    quick = config_from_args(build_parser().parse_args(["--quick", "--controllers",
                                                        "tampo,exp3,entropy-0.3"]))
    assert quick.grpo.steps < cfg.grpo.steps and len(quick.seeds) < len(cfg.seeds)
    assert quick.controllers == ("tampo", "exp3", "entropy-0.3")
