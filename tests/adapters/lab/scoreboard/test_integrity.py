"""The scoreboard's output folder and run records under damage and contention: a damaged record
is named in every mode (recomputed by a run, refused by ``--report-only``), a record that holds
no finished run's numbers is damaged too, a run whose metrics are not finite writes nothing, one
scoreboard at a time works in an ``--out``, ``--report-only`` creates nothing, and an overridden
budget is marked in ``scoreboard.md``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")

from metactl.adapters.lab.commands import output_lock
from metactl.adapters.lab.scoreboard import runner
from metactl.adapters.lab.scoreboard.cli import main
from metactl.adapters.lab.scoreboard.report import analyse
from metactl.adapters.lab.scoreboard.runner import record_path, write_record
from metactl.adapters.lab.scoreboard.suite import FIXED_GRID, TESTBEDS

TINY = ["--testbeds", "gym-default", "--controllers", "tampo", "--seeds", "1", "--steps", "3",
        "--resamples", "50", "--workers", "1", "--no-progress", "--no-plots"]  # fmt: skip


def _board(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A finished tiny scoreboard (11 runs) in ``tmp_path / "board"``."""
    out = tmp_path / "board"
    assert main([*TINY, "--out", str(out)]) == 0
    capsys.readouterr()
    return out


def _record(out: Path, controller: str) -> Path:
    return record_path(out, "gym-default", controller, 0)


def _payload(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())["payload"]


def _damage(path: Path, how: str) -> None:
    """Damage a record: ``checksum`` (a plausible number changed), ``truncated``, or, through
    the runner's own writer (a valid checksum), ``no-metrics`` and ``nan``."""
    if how == "checksum":
        data = json.loads(path.read_text())
        data["payload"]["metrics"]["auc"] += 0.25
        path.write_text(json.dumps(data))
    elif how == "truncated":
        path.write_text(path.read_text()[:40])
    elif how == "no-metrics":
        payload = _payload(path)
        del payload["metrics"]
        write_record(path, payload)
    elif how == "nan":
        payload = _payload(path)
        payload["metrics"]["auc"] = float("nan")
        write_record(path, payload)
    else:
        raise AssertionError(how)


WHAT_IS_NAMED = {"checksum": "checksum mismatch", "truncated": "unreadable record",
                 "no-metrics": "gym-default tampo seed 0: no metrics",
                 "nan": "gym-default tampo seed 0: metric 'auc' is nan"}  # fmt: skip


def _damaged_board(tmp_path: Path, capsys: pytest.CaptureFixture[str], controller: str,
                   how: str) -> tuple[Path, Path, Any]:
    """A finished tiny scoreboard whose seed-0 record of ``controller`` is then damaged
    (`_damage`): the folder, the record and the record's metrics before the damage."""
    out = _board(tmp_path, capsys)
    path = _record(out, controller)
    before = _payload(path)["metrics"]
    _damage(path, how)
    return out, path, before


@pytest.mark.parametrize("how", list(WHAT_IS_NAMED))
def test_report_only_names_a_damaged_record_and_reports_nothing(
        how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out, path, _ = _damaged_board(tmp_path, capsys, "tampo", how)
    report = (out / "scoreboard.md").read_text()
    assert main([*TINY, "--out", str(out), "--report-only"]) == 1
    captured = capsys.readouterr()
    assert f"{path}: " in captured.err and WHAT_IS_NAMED[how] in captured.err, captured.err
    assert "cannot report" in captured.err and "Traceback" not in captured.err
    assert "not run" not in captured.out
    assert (out / "scoreboard.md").read_text() == report  # no report of the damaged folder


@pytest.mark.parametrize("how", ["checksum", "truncated"])
def test_a_damaged_fixed_arm_record_is_named_in_every_mode(
        how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out, path, before = _damaged_board(tmp_path, capsys, "fixed-1.2", how)
    assert main([*TINY, "--out", str(out), "--report-only"]) == 1
    err = capsys.readouterr().err
    assert f"{path}: {WHAT_IS_NAMED[how]}" in err and "runs missing" not in err, err
    assert main([*TINY, "--out", str(out)]) == 0  # a run recomputes it, and says so
    captured = capsys.readouterr()
    assert f"{path}: {WHAT_IS_NAMED[how]}" in captured.err and "recomputing it" in captured.err
    assert "11 runs (10 reused)" in captured.out
    assert _payload(path)["metrics"] == before


@pytest.mark.parametrize("how", ["no-metrics", "nan"])
def test_a_record_without_finite_metrics_is_recomputed_once_not_on_every_rerun(
        how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out, path, before = _damaged_board(tmp_path, capsys, "tampo", how)
    assert main([*TINY, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"{path}: {WHAT_IS_NAMED[how]}" in captured.err and "recomputing it" in captured.err
    assert "Traceback" not in captured.err and "11 runs (10 reused)" in captured.out
    assert _payload(path)["metrics"] == before
    assert main([*TINY, "--out", str(out)]) == 0
    assert "11 runs (11 reused)" in capsys.readouterr().out


def test_a_run_with_a_non_finite_metric_is_an_error_naming_it_and_writes_no_record(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    real_run_one = runner.run_one

    def diverging(job: tuple[str, int, Any]) -> dict[str, Any]:
        run = real_run_one(job)
        return {**run, "auc": float("nan")} if job[0] == "tampo" else run

    monkeypatch.setattr(runner, "run_one", diverging)
    out = tmp_path / "board"
    assert main([*TINY, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "gym-default tampo seed 0: metric 'auc' is nan" in err and err.count("\n") == 1, err
    assert not _record(out, "tampo").exists()


def test_analyse_names_the_run_of_a_missing_or_non_finite_metric() -> None:
    testbed = TESTBEDS["gym-default"]
    records = {("gym-default", c, 0): {"metrics": {"auc": 0.5, "final": 0.5,
                                                   "final_greedy": 0.5},
                                       "temperature": [1.0], "wall_seconds": 0.0}
               for c in ("tampo", *FIXED_GRID)}  # fmt: skip
    records[("gym-default", "tampo", 0)]["metrics"]["auc"] = float("nan")
    with pytest.raises(ValueError, match="gym-default: tampo seed 0: metric 'auc' = nan"):
        analyse([testbed], ["tampo", *FIXED_GRID], records, {"gym-default": [0]}, resamples=10)
    del records[("gym-default", "fixed-0.7", 0)]["metrics"]
    with pytest.raises(ValueError, match=r"gym-default: fixed-0\.7 seed 0: no metrics"):
        analyse([testbed], ["tampo", *FIXED_GRID], records, {"gym-default": [0]}, resamples=10)


@pytest.mark.parametrize("report_only", [False, True])
def test_a_second_scoreboard_on_the_same_out_is_refused_while_the_first_runs(
        report_only: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "board"
    if report_only:
        out = _board(tmp_path, capsys)
    records = sorted(p.read_text() for p in out.rglob("seed*.json"))
    with output_lock(out):  # another scoreboard holds the folder
        assert main([*TINY, "--out", str(out), *(["--report-only"] if report_only else [])]) == 2
    err = capsys.readouterr().err
    assert "in use by another run" in err and str(out) in err and err.count("\n") == 1, err
    assert sorted(p.read_text() for p in out.rglob("seed*.json")) == records  # nothing run
    assert main([*TINY, "--out", str(out)]) == 0  # the lock went with its holder


def test_report_only_refuses_a_folder_without_runs_and_creates_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "new" / "deep" / "path"
    assert main([*TINY, "--out", str(out), "--report-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metactl scoreboard: --out ") and "no runs to report" in err, err
    assert err.count("\n") == 1
    assert not (tmp_path / "new").exists()


def test_an_overridden_budget_is_marked_in_the_markdown_report(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "board"
    assert main([*TINY, "--out", str(out)]) == 0
    marker = "Budget overridden (--seeds 1, --steps 3): off protocol"
    markdown = (out / "scoreboard.md").read_text()
    assert marker in markdown.split("## Normalised regret")[0]  # before the first table
    assert marker in capsys.readouterr().out
    assert json.loads((out / "scoreboard.json").read_text())["off_protocol_budget"] is True
