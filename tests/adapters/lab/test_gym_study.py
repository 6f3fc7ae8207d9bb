"""The multi-seed study (``metactl gym-study``) end to end on a tiny setting."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from metactl.adapters.lab.controllers import STUDY_ARMS
from metactl.adapters.lab.gym_study import (
    StudyConfig,
    main,
    make_controller,
    mean_ci,
    summarise,
)

from tests.paths import ROOT

TINY = ["--seeds", "2", "--steps", "6", "--group-size", "4", "--num-tasks", "3"]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_main_runs_end_to_end_and_writes_its_files(tmp_path: Path, workers: str, capsys) -> None:
    out = tmp_path / "study"
    argv = [*TINY, "--controllers", "tampo,exp3,fixed-0.6,fixed-1.2", "--workers", workers,
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| controller |" in printed and "Best fixed temperature" in printed
    for name in ("results.md", "results.json", "runs.npz", "learning_curves.png",
                 "temperature.png", "meta_probs.png"):  # fmt: skip
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    result = json.loads((out / "results.json").read_text())
    assert [row["controller"] for row in result["rows"]] == ["tampo", "exp3", "fixed-0.6",
                                                             "fixed-1.2"]  # fmt: skip
    assert result["seeds"] == [0, 1]
    assert result["best_fixed"] in ("fixed-0.6", "fixed-1.2")
    runs = np.load(out / "runs.npz")
    assert runs["success"].shape == (8, 7) and runs["probs"].shape == (8, 6, 10)
    fixed = runs["temperature"][runs["controller"] == "fixed-1.2"]
    assert np.all(fixed == 1.2)
    assert "tampo" in (out / "results.md").read_text()


def test_example_script_delegates_to_main(tmp_path: Path, monkeypatch) -> None:
    script = ROOT / "examples" / "gym_study.py"
    argv = [str(script), *TINY, "--controllers", "linear,fixed-1.0", "--workers", "1",
            "--out", str(tmp_path), "--no-plots", "--quiet"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 0
    assert (tmp_path / "results.json").is_file()
    assert not (tmp_path / "learning_curves.png").exists()


@pytest.mark.parametrize(
    "bad",
    [
        ["--controllers", "tampo,nonsense"],
        ["--controllers", "tampo,tampo"],
        ["--seeds", "0"],
        ["--workers", "0"],
        ["--steps", "1"],
        ["--families", "shoulder,nope"],
        ["--vocab-size", "1"],
    ],
)
def test_bad_arguments_exit_with_status_2(bad: list[str], tmp_path: Path, capsys) -> None:
    assert main([*bad, "--out", str(tmp_path), "--quiet"]) == 2
    assert "metactl gym-study:" in capsys.readouterr().err


def test_every_controller_builds_and_the_grid_is_complete() -> None:
    config = StudyConfig(steps=10)
    sizes = {"top-p": 5, "tampo-joint": 20}  # the arms over other knobs
    for name in STUDY_ARMS:
        assert len(make_controller(name, config, seed=0).candidates) == sizes.get(name, 10)
    assert make_controller("top-p", config, seed=0).knobs == ("top_p",)
    assert make_controller("tampo-joint", config, seed=0).knobs == ("temperature", "top_p")
    assert {f"fixed-{t / 10:.1f}" for t in range(6, 16)} <= set(STUDY_ARMS)
    assert {"tampo", "tampo-softmax", "hedge", "metagradient", "exp3", "entropy",
            "linear"} <= set(STUDY_ARMS)  # fmt: skip


def test_summary_picks_the_best_fixed_arm_by_mean_auc_and_pairs_by_seed() -> None:
    def run(name: str, seed: int, auc: float) -> dict:
        return {"controller": name, "seed": seed, "auc": auc, "final": auc,
                "greedy": np.array([0.0, auc]), "temperature": np.arange(10.0)}  # fmt: skip

    aucs = {
        "fixed-0.6": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        "fixed-1.0": [0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
        "tampo": [0.6, 0.7, 0.8, 0.9, 1.0, 1.1],
    }
    results = [run(n, s, a) for n, values in aucs.items() for s, a in enumerate(values)]
    summary = summarise(results, list(aucs))
    assert summary["best_fixed"] == "fixed-1.0"
    tampo = summary["rows"][2]
    assert tampo["delta_auc"][0] == pytest.approx(0.1)
    assert tampo["delta_auc"][1] == pytest.approx(0.0, abs=1e-12)  # constant paired difference
    assert 0.0 < tampo["p_auc"] < 0.05
    assert "delta_auc" not in summary["rows"][1]  # the reference row itself
    assert tampo["final_greedy"][0] == pytest.approx(0.85)
    assert tampo["temperature_first_tenth"] == 0.0 and tampo["temperature_last_tenth"] == 9.0
    mean, half = mean_ci(np.array(aucs["tampo"]))
    assert mean == pytest.approx(0.85) and half > 0


# ---------------------------------------------------------------------------------- bad input
def _unwritable_dir(tmp_path: Path) -> Path:
    """A real directory that no file can be created in: a read-only folder for a normal user;
    root ignores permission bits, so for root a folder of the read-only sysfs."""
    import os

    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    return Path("/sys/kernel")


@pytest.mark.parametrize("kind", ["file", "unwritable", "under-a-file"])
def test_bad_out_is_refused_before_any_run(kind: str, tmp_path: Path, capsys,
                                           monkeypatch) -> None:  # fmt: skip
    import metactl.adapters.lab.gym_study as study

    if kind == "file":
        out = tmp_path / "results.txt"
        out.write_text("not a folder")
    elif kind == "under-a-file":
        (tmp_path / "plain").write_text("x")
        out = tmp_path / "plain" / "sub"
    else:
        out = _unwritable_dir(tmp_path)
    calls: list[object] = []
    real_run_one = study.run_one
    monkeypatch.setattr(study, "run_one", lambda job: calls.append(job) or real_run_one(job))
    assert main([*TINY, "--controllers", "fixed-1.0", "--workers", "1", "--out", str(out),
                 "--quiet", "--no-plots"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("metactl gym-study: --out") and err.count("\n") == 1, err
    assert calls == []  # refused before the first run, not after the whole study


@pytest.mark.parametrize(
    "bad",
    [
        ["--prior-margin", "nan"],
        ["--prior-margin", "-1"],
        ["--shoulder-gap", "inf"],
        ["--noise-scale", "-0.1"],
        ["--task-seed-offset", "-1"],
        ["--lr", "nan"],
        ["--eval-temperature", "0"],
        ["--entropy-target", "nan"],
        ["--group-size", "1"],
        ["--length", "1"],  # too short for the 'double' family
        ["--num-tasks", "0"],
        ["--families", "shoulder,,tail"],
        ["--controllers", ""],
        ["--optimizer", "rmsprop"],
        ["--seeds", "two"],
        ["--reward", "dense"],
        ["--no-such-flag"],
    ],
)
def test_every_argument_is_validated_with_a_one_line_error(bad: list[str], tmp_path: Path,
                                                           capsys) -> None:  # fmt: skip
    assert main([*bad, "--out", str(tmp_path / "never"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metactl gym-study: ") and err.count("\n") == 1, err
    assert not (tmp_path / "never" / "results.json").exists()


def test_every_tokensearch_option_reaches_the_environment(tmp_path: Path) -> None:
    import dataclasses

    from metactl.adapters.gym.env import TokenSearchConfig
    from metactl.adapters.lab.gym_study import _parse, config_from_args

    args = _parse(["--vocab-size", "9", "--length", "5", "--num-tasks", "4",
                   "--families", "tail,double", "--reward", "partial", "--no-deceptive",
                   "--prior-margin", "7", "--shoulder-gap", "2", "--noise-scale", "0.1",
                   "--task-seed-offset", "100", "--optimizer", "sgd"])  # fmt: skip
    config = config_from_args(args)
    env = config.env_config(task_seed=3)
    assert env == TokenSearchConfig(vocab_size=9, length=5, num_tasks=4,
                                    families=("tail", "double"), reward="partial",
                                    deceptive=False, prior_margin=7.0, shoulder_gap=2.0,
                                    noise_scale=0.1, task_seed=103)  # fmt: skip
    assert config.learner_config().optimizer == "sgd"
    # every field of the environment's config is a StudyConfig field or the per-seed task seed
    study_fields = {f.name for f in dataclasses.fields(StudyConfig)}
    env_fields = {f.name for f in dataclasses.fields(TokenSearchConfig)}
    assert env_fields - study_fields == {"task_seed"}


def test_prior_margin_sharpens_the_starting_policy_of_a_run(tmp_path: Path) -> None:
    from metactl.adapters.lab.gym_study import run_one

    # a sharper prior starts (step 0, T_eval = 1) with a higher or lower success, not the same
    soft = run_one(("fixed-1.0", 0, StudyConfig(steps=2, prior_margin=2.5)))
    sharp = run_one(("fixed-1.0", 0, StudyConfig(steps=2, prior_margin=7.0)))
    default = run_one(("fixed-1.0", 0, StudyConfig(steps=2)))
    assert len({soft["success"][0], sharp["success"][0], default["success"][0]}) == 3
    out = tmp_path / "study"
    assert main([*TINY, "--controllers", "fixed-1.0", "--workers", "1", "--prior-margin", "7",
                 "--out", str(out), "--quiet", "--no-plots"]) == 0  # fmt: skip
    assert json.loads((out / "results.json").read_text())["config"]["prior_margin"] == 7.0
