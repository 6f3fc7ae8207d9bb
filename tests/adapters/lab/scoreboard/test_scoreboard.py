"""``metactl scoreboard`` at a tiny budget: the table, JSON, heat-map, resume and bad inputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.paths import ROOT

pytest.importorskip("matplotlib")

from metactl.adapters.lab.scoreboard.cli import main, select_controllers, select_testbeds
from metactl.adapters.lab.scoreboard.stats import normalised_regret, paired_bootstrap_regret
from metactl.adapters.lab.scoreboard.suite import (
    BOUND_ARMS,
    DEVELOPMENT,
    FIXED_GRID,
    HELD_OUT,
    TESTBEDS,
    check_controller,
    default_controllers,
)

TINY = ["--testbeds", "gym-default,gym-flat", "--controllers", "tampo,linear", "--seeds", "2",
        "--steps", "5", "--resamples", "200"]  # fmt: skip


def _cli(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.run(
        [sys.executable, "-m", "metactl", "scoreboard", *TINY, "--out", str(out),
         "--workers", "2", "--no-progress", *extra],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip


def _records(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): p.read_text() for p in sorted((out / "runs").rglob("*.json"))}


def test_smoke_run_writes_table_json_heatmap_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "board"
    first = _cli(out)
    assert first.returncode == 0, first.stderr
    controllers = ["tampo", "linear", *FIXED_GRID]
    # the printed summary tables (primary and final metric): one row per controller, one
    # column per testbed (marked when below the resolution of the claim)
    header = re.compile(r"^\| controller \| gym-default†? \(dev\) \| gym-flat†? \(dev\) \| "
                        r"worst \(dev\) \| worst \(all\) \|", flags=re.MULTILINE)
    assert len(header.findall(first.stdout)) == 2
    for c in controllers:
        assert f"\n| {c} |" in first.stdout
    assert "48 runs (0 reused)" in first.stdout
    report = json.loads((out / "scoreboard.json").read_text())
    assert report["order"] == ["gym-default", "gym-flat"]
    assert report["controllers"] == controllers
    assert report["off_protocol_budget"] is True
    png = (out / "regret_heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = (out / "scoreboard.md").read_text()
    assert re.search(r"^### gym-default†? \(development", md, flags=re.MULTILINE)
    assert "regret [95% CI]" in md
    records = _records(out)
    assert len(records) == 2 * 12 * 2
    # every run keeps the facts of its machine (numpy-only gym runs: no torch), and the report
    # names the machines
    facts = {json.dumps(json.loads(text)["payload"]["machine"], sort_keys=True)
             for text in records.values()}  # fmt: skip
    assert len(facts) == 1 and json.loads(facts.pop())["torch"] is None
    assert report["machines"] == [{"machine": report["machines"][0]["machine"], "runs": 48}]
    assert "no torch, numpy" in report["machines"][0]["machine"]
    assert f"Machines: 48 runs on {report['machines'][0]['machine']}." in md
    # a page per testbed, with the likelihood rule's signal diagnostics
    for name in ("gym-default", "gym-flat"):
        assert f"(testbeds/{name}.md)" in md
        assert "![tampo: signal diagnostics]" in (out / "testbeds" / f"{name}.md").read_text()
        assert (out / "testbeds" / name / "signal-tampo.png").read_bytes()[:8] == png[:8]

    # the JSON's numbers are the records' numbers
    tb = report["testbeds"]["gym-flat"]
    def auc(c: str) -> np.ndarray:
        return np.array([json.loads(records[f"runs/gym-flat/{c}/seed{s}.json"])["payload"]
                         ["metrics"]["auc"] for s in (0, 1)])  # fmt: skip
    fixed = np.stack([auc(c) for c in FIXED_GRID], axis=1)
    assert tb["controllers"]["tampo"]["regret"]["regret"] == pytest.approx(
        normalised_regret(auc("tampo"), fixed))
    expected = paired_bootstrap_regret(auc("tampo"), fixed, resamples=200)
    assert tb["controllers"]["tampo"]["regret"]["low"] == pytest.approx(expected["low"])
    assert tb["best_fixed"] == FIXED_GRID[int(np.argmax(fixed.mean(axis=0)))]
    assert report["summary"]["tampo"]["worst_all"] == pytest.approx(max(
        report["summary"]["tampo"]["regret"].values()))
    # the same seeds for every arm: fixed-1.0 vs itself ties on every seed
    assert tb["controllers"]["fixed-1.0"]["vs_fixed_1.0"]["ties"] == 2
    # the final metric's regret beside the AUC's: against the grid's final success, its own
    # best and worst fixed arm (PROTOCOL 16.4)
    def final(c: str) -> np.ndarray:
        return np.array([json.loads(records[f"runs/gym-flat/{c}/seed{s}.json"])["payload"]
                         ["metrics"]["final"] for s in (0, 1)])  # fmt: skip
    fixed_final = np.stack([final(c) for c in FIXED_GRID], axis=1)
    tampo_final = tb["controllers"]["tampo"]["regrets"]["final"]
    assert tampo_final == pytest.approx(paired_bootstrap_regret(final("tampo"), fixed_final,
                                                                resamples=200), nan_ok=True)
    assert report["summary"]["tampo"]["final"]["regret"]["gym-flat"] == pytest.approx(
        normalised_regret(final("tampo"), fixed_final))
    assert tb["controllers"]["tampo"]["regrets"]["auc"] == tb["controllers"]["tampo"]["regret"]
    assert "regret final [95% CI]" in md

    # resume: nothing is recomputed, the records and the numbers do not change
    second = _cli(out)
    assert second.returncode == 0, second.stderr
    assert "48 runs (48 reused)" in second.stdout
    assert _records(out) == records
    again = json.loads((out / "scoreboard.json").read_text())
    assert again["summary"] == report["summary"]

    # a truncated record and a deleted one are recomputed (and said so), the others reused
    truncated = out / "runs" / "gym-flat" / "tampo" / "seed1.json"
    truncated.write_text(truncated.read_text()[:40])
    (out / "runs" / "gym-default" / "fixed-0.6" / "seed0.json").unlink()
    third = _cli(out)
    assert third.returncode == 0, third.stderr
    assert "48 runs (46 reused)" in third.stdout
    assert f"{truncated}: unreadable record" in third.stderr
    rerun = _records(out)
    for path, text in records.items():  # deterministic: the same metrics as before
        assert json.loads(rerun[path])["payload"]["metrics"] == json.loads(text)["payload"][
            "metrics"], path
    assert json.loads((out / "scoreboard.json").read_text())["summary"] == report["summary"]


def test_garbled_record_with_valid_json_is_detected(tmp_path: Path, capsys) -> None:
    out = tmp_path / "board"
    argv = [*TINY, "--testbeds", "gym-default", "--seeds", "1", "--out", str(out),
            "--workers", "1", "--no-progress", "--no-plots"]  # fmt: skip
    assert main(argv) == 0
    path = out / "runs" / "gym-default" / "tampo" / "seed0.json"
    data = json.loads(path.read_text())
    data["payload"]["metrics"]["auc"] += 0.25  # a plausible but wrong number
    path.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "checksum mismatch" in captured.err
    assert "12 runs (11 reused)" in captured.out
    fixed = json.loads(path.read_text())["payload"]["metrics"]["auc"]
    assert fixed == pytest.approx(data["payload"]["metrics"]["auc"] - 0.25)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (["--controllers", "tampo,nonsense"], "unknown controller 'nonsense'"),
        (["--controllers", "tampo,,linear"], "empty name"),
        (["--controllers", "tampo,tampo"], "each controller once"),
        (["--testbeds", "gym-nope"], "unknown testbed 'gym-nope'"),
        (["--testbeds", "gym-default,gym-default"], "each testbed once"),
        (["--quick", "--testbeds", "reference-full"], "not part of the --quick suite"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--seeds", "-3"], "--seeds must be >= 1"),
        (["--steps", "1"], "--steps must be >= 2"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--resamples", "0"], "--resamples must be >= 1"),
        (["--seeds", "many"], "invalid int value"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_give_one_line_errors_and_exit_2(bad: list[str], message: str,
                                                       tmp_path: Path, capsys) -> None:  # fmt: skip
    out = tmp_path / "never"
    assert main(["--testbeds", "gym-default", *bad, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metactl scoreboard: ") and err.count("\n") == 1, err
    assert message in err
    assert not (out / "runs").exists()


def test_out_naming_a_file_is_refused_before_any_run(tmp_path: Path, capsys) -> None:
    out = tmp_path / "a-file"
    out.write_text("x")
    assert main([*TINY, "--out", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is not a directory" in err and err.count("\n") == 1


def test_suite_matches_the_protocol() -> None:
    protocol = (ROOT / "benchmarks" / "PROTOCOL.md").read_text()
    dev = [t.name for t in TESTBEDS.values() if t.split == DEVELOPMENT]
    held = [t.name for t in TESTBEDS.values() if t.split == HELD_OUT]
    assert dev == ["gym-default", "gym-sharp", "gym-flat", "reference-quick"]
    assert len([n for n in held if n.startswith("gym-")]) >= 4 and "reference-full" in held
    for testbed in TESTBEDS.values():  # every testbed is declared in the protocol, split included
        split = "DEVELOPMENT" if testbed.split == DEVELOPMENT else "HELD OUT"
        assert f"| `{testbed.name}` | {split} |" in protocol, testbed.name
    assert TESTBEDS["gym-sharp"].gym.prior_margin == 7.0  # type: ignore[union-attr]
    assert TESTBEDS["gym-flat"].gym.prior_margin == 2.5  # type: ignore[union-attr]
    # the quick suite: every testbed but reference-full
    assert [t.name for t in select_testbeds("all", quick=True)] == [
        n for n in TESTBEDS if n != "reference-full"]
    assert [t.name for t in select_testbeds("development", quick=False)] == dev
    # the whole fixed grid always runs, after the adaptive controllers
    chosen, notes = select_controllers("tampo", select_testbeds("gym-default", quick=False))
    assert chosen == ["tampo", *FIXED_GRID] and notes == []
    assert FIXED_GRID == tuple(f"fixed-{t:.1f}" for t in np.arange(0.6, 1.55, 0.1))


def test_gym_study_controller_names_are_the_scoreboards() -> None:
    from metactl.adapters.lab.controllers import STUDY_ARMS as CONTROLLERS

    assert set(default_controllers()) == set(CONTROLLERS) | set(BOUND_ARMS)
    for name in default_controllers():
        for testbed in TESTBEDS.values():
            if testbed.kind == "gym":
                check_controller(name, testbed)


def test_reference_testbed_runs_through_the_reference_adapter(tmp_path: Path) -> None:
    """A miniature reference testbed, end to end through the reference adapter's own warm-up,
    ``run_arm`` and checkpoints (nothing of GRPO re-implemented), with 2 worker processes."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from metactl.adapters.lab.reproduce.experiment import EvalConfig, ReproduceConfig
    from metactl.adapters.lab.scoreboard.cli import build_bound_plan, build_plan
    from metactl.adapters.lab.scoreboard.pages import write_testbed_pages
    from metactl.adapters.lab.scoreboard.report import analyse, best_fixed_arm, format_summary
    from metactl.adapters.lab.scoreboard.runner import run_jobs
    from metactl.adapters.lab.scoreboard.signal_record import decode_signal
    from metactl.adapters.lab.scoreboard.suite import Testbed
    from metactl.adapters.reference.sft import WarmupConfig

    from metactl.diagnostics import stack_diagnostics
    from tests.adapters.lab.reproduce.helpers import miniature_config

    def miniature(quick: bool) -> ReproduceConfig:
        return miniature_config(
            "unset", ("fixed-1.0",), steps=2, checkpoint_every=2,
            eval=EvalConfig(n_per_benchmark=8, k=2, curve_n=4, curve_k=2, curve_points=1,
                            train_check_n=20, start_greedy_range=(0.0, 1.0)),
            warmup=WarmupConfig(steps=10, batch_size=16), workers=1,
        )  # fmt: skip

    testbed = Testbed("reference-mini", DEVELOPMENT, "miniature", 1, 1, reference=miniature)
    controllers = ["linear", "tampo", *FIXED_GRID]
    out = tmp_path / "board"
    plan, seeds = build_plan([testbed], controllers, quick=True, seeds=1, steps=None, out=out,
                             cache_dir=str(tmp_path / "cache"))  # fmt: skip
    records: dict = {}
    notes: list[str] = []

    def keep(record: dict) -> None:
        records[(record["testbed"], record["controller"], record["seed"])] = record

    starts: dict = {}
    start = run_jobs(out, plan, workers=2, on_record=keep, on_note=notes.append, starts=starts)
    assert starts["reference-mini"][1] == start["reference-mini"]  # kept for a second phase
    assert len(records) == 12 and notes == []
    assert "base" in start["reference-mini"]  # the start model's scores, from prepare_start
    linear = records[("reference-mini", "linear", 0)]
    assert linear["temperature"][0] == pytest.approx(0.9)  # linear-0.9-1.5 of the reference
    # the reference adapter's own result files, under its own names
    result = json.loads((out / "reference" / "reference-mini" / "runs" / "linear-0.9-1.5" /
                         "seed0" / "result.json").read_text())  # fmt: skip
    assert result["final"]["avg"]["pass1"] == linear["metrics"]["pass1"]
    # the learning curve's area beside the final Pass@1 (two curve points: steps 0 and 2)
    assert set(linear["metrics"]) == {"pass1", "greedy", "pass_at_k", "curve_auc"}
    assert [e["step"] for e in result["curve"]] == [0, 2]
    assert linear["metrics"]["curve_auc"] == pytest.approx(
        (result["curve"][0]["avg"]["pass1"] + result["curve"][1]["avg"]["pass1"]) / 2)
    # the second phase: a bound row resolved to the grid's best fixed arm, run on the same
    # seeds with the start model prepared once (no second warm-up or check)
    best = best_fixed_arm(records, testbed, seeds["reference-mini"])
    assert best is not None
    bound_plan = build_bound_plan([testbed], {"reference-mini": ["bound-spread-10"]},
                                  {"reference-mini": best}, seeds, quick=True, steps=None,
                                  out=out, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert [j.resolved for j in bound_plan[0][2]] == [f"spread-then-{best[6:]}-10"]
    again_start = run_jobs(out, bound_plan, workers=1, on_record=keep, on_note=notes.append,
                           starts=starts)  # fmt: skip
    assert again_start == {"reference-mini": start["reference-mini"]} and notes == []
    bound_record = records[("reference-mini", "bound-spread-10", 0)]
    assert bound_record["resolved"] == f"spread-then-{best[6:]}-10"
    assert bound_record["best_fixed"] == best
    assert (out / "reference" / "reference-mini" / "runs" / bound_record["resolved"] / "seed0"
            / "result.json").is_file()  # the reference adapter ran the concrete arm
    controllers = ["linear", "tampo", "bound-spread-10", *FIXED_GRID]
    analysis = analyse([testbed], controllers, records, seeds, resamples=100)
    assert "| linear |" in format_summary(analysis)
    assert "curve_auc" in analysis["testbeds"]["reference-mini"]["secondary_metrics"]
    assert analysis["bound_rows"] == ["bound-spread-10"]
    # the likelihood rule's record keeps the reference trainer's per-step signal diagnostics
    assert linear["signal"] is None
    tampo_result = json.loads((out / "reference" / "reference-mini" / "runs" / "tampo" /
                               "seed0" / "result.json").read_text())  # fmt: skip
    arrays, candidates = decode_signal(records[("reference-mini", "tampo", 0)]["signal"])
    assert candidates.tolist() == tampo_result["candidates"]
    np.testing.assert_array_equal(arrays["step"], [0, 1])
    expected = stack_diagnostics(tampo_result["signal"])
    for field in ("signal", "signal_spread", "support_mean", "signal_rows"):
        np.testing.assert_array_equal(arrays[field], expected[field], err_msg=field)
    pages = write_testbed_pages(out, analysis, [testbed], records)
    assert pages["reference-mini"]["signal"] == {"tampo": {
        "seeds_with_diagnostics": [0], "figure": "testbeds/reference-mini/signal-tampo.png",
        "notes": []}}  # fmt: skip
    assert (out / "testbeds" / "reference-mini" / "signal-tampo.png").read_bytes()[:4] == (
        b"\x89PNG")
    # resume: the finished records are reused without running anything
    again: dict = {}
    run_jobs(out, plan, workers=2, on_record=lambda r: again.setdefault(r["controller"], r),
             on_note=notes.append)  # fmt: skip
    assert again["linear"] == linear and notes == []


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_sigint_stops_a_two_worker_run_at_once_and_the_rerun_resumes(tmp_path: Path) -> None:
    import signal
    import time

    out = tmp_path / "board"
    argv = [sys.executable, "-m", "metactl", "scoreboard", "--testbeds", "gym-default",
            "--controllers", "tampo", "--seeds", "12", "--steps", "60", "--resamples", "100",
            "--workers", "2", "--no-progress", "--no-plots", "--out", str(out)]  # fmt: skip
    # SIGINT as a terminal delivers it, whoever started the tests: a shell without job control
    # starts background jobs with SIGINT ignored, and Python then installs no handler for it
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 90
    while len(list((out / "runs").rglob("*.json"))) < 4:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    workers = _children(process.pid)
    assert len(workers) >= 2
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)  # to the main process only: it must stop its workers
    _, err = process.communicate(timeout=30)
    assert time.monotonic() - sent < 15
    assert process.returncode == 130 and "interrupted" in err, err
    time.sleep(0.5)
    assert not [pid for pid in workers if _alive(pid)], "worker processes outlived the run"
    kept = _records(out)
    assert 4 <= len(kept) < 132
    assert not list((out / "runs").rglob("*.tmp"))  # no half-written record left behind

    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert f"132 runs ({len(kept)} reused)" in rerun.stdout
    after = _records(out)
    assert len(after) == 132 and all(after[path] == text for path, text in kept.items())


def test_report_only_marks_arms_not_run_and_refuses_incomplete_folders(
        tmp_path: Path, capsys) -> None:  # fmt: skip
    """--report-only runs nothing; an arm with no run on a testbed is 'not run' there (its
    worst cases cover the other testbeds); partial seeds or a missing fixed arm are refused."""
    out = tmp_path / "board"
    tiny = ["--seeds", "2", "--steps", "5", "--resamples", "200", "--workers", "1",
            "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(["--testbeds", "gym-default,gym-flat", "--controllers", "tampo", *tiny]) == 0
    assert main(["--testbeds", "gym-flat", "--controllers", "linear", *tiny]) == 0
    before = _records(out)
    capsys.readouterr()
    assert main(["--testbeds", "gym-default,gym-flat", "--controllers", "tampo,linear",
                 "--report-only", *tiny]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert _records(out) == before  # nothing was run or rewritten
    linear_row = next(line for line in printed.splitlines() if line.startswith("| linear |"))
    cells = [c.strip() for c in linear_row.split("|")[1:-1]]
    assert cells[1] == "not run" and cells[2] != "not run"
    assert cells[-1] == "0/1" or cells[-1] == "1/1"  # 'beats' counts the testbed it ran on
    assert "Not run (no record" in printed and "linear on gym-default" in printed
    assert "report only: 46 finished runs of the 48 planned" in printed
    report = json.loads((out / "scoreboard.json").read_text())
    assert report["summary"]["linear"]["regret"]["gym-default"] is None
    assert report["summary"]["linear"]["ran_on"] == ["gym-flat"]
    assert report["summary"]["linear"]["worst_all"] == report["summary"]["linear"]["regret"][
        "gym-flat"]
    assert report["not_run"] == {"linear": ["gym-default"]}
    assert (out / "testbeds" / "gym-default.md").is_file()
    # one seed of an arm missing: never summarised as if complete
    (out / "runs" / "gym-flat" / "linear" / "seed1.json").unlink()
    assert main(["--testbeds", "gym-default,gym-flat", "--controllers", "tampo,linear",
                 "--report-only", *tiny]) == 1  # fmt: skip
    assert "cannot report" in capsys.readouterr().err
    # a fixed arm missing: no regret can be computed
    (out / "runs" / "gym-flat" / "fixed-1.2" / "seed0.json").unlink()
    assert main(["--testbeds", "gym-default,gym-flat", "--controllers", "tampo",
                 "--report-only", *tiny]) == 1  # fmt: skip
    assert "cannot report" in capsys.readouterr().err


def test_reference_full_runs_the_fixed_grid_and_recommended_by_default(tmp_path: Path) -> None:
    """PROTOCOL sections 15 and 16.5: ``--controllers all`` plans only the fixed grid,
    `recommended`, the mixtures and the bound rows on reference-full (every arm elsewhere), at
    6 seeds; named controllers run on every selected testbed; the arms not planned are
    reported as not run, never as missing runs."""
    pytest.importorskip("torch")
    from metactl.adapters.lab.scoreboard.cli import build_plan, testbed_arms
    from metactl.adapters.lab.scoreboard.report import analyse
    from metactl.adapters.lab.scoreboard.suite import GYM_FULL_SEEDS

    testbeds = [TESTBEDS["gym-flat"], TESTBEDS["reference-full"]]
    every, _ = select_controllers("all", testbeds)
    plan, seeds = build_plan(testbeds, every, quick=False, seeds=None, steps=None,
                             out=tmp_path, cache_dir=None, default_arms=True)  # fmt: skip
    assert seeds == {"gym-flat": list(range(GYM_FULL_SEEDS)), "reference-full": list(range(6))}
    planned = {t.name: sorted({j.controller for j in jobs}) for t, _, jobs in plan}
    # the bound rows are planned, but run in the second phase (after the grid)
    assert planned["gym-flat"] == sorted(c for c in every if c not in BOUND_ARMS)
    assert planned["reference-full"] == sorted([*FIXED_GRID, "recommended", "mixture",
                                                "spread"])  # fmt: skip
    assert testbed_arms(TESTBEDS["reference-full"], every, True) == [
        "mixture", "spread", "recommended", *BOUND_ARMS, *FIXED_GRID]
    # stage 2 (PROTOCOL 16.5): the new arms and the bound rows by name on reference-quick
    stage2, _ = select_controllers("exp3,mixture,spread,entropy-e3,bound-t1-10,bound-spread-25",
                                   [TESTBEDS["reference-quick"]])  # fmt: skip
    assert stage2 == ["exp3", "mixture", "spread", "entropy-e3", "bound-t1-10",
                      "bound-spread-25", *FIXED_GRID]  # fmt: skip
    named, _ = build_plan(testbeds, ["tampo", *FIXED_GRID], quick=False, seeds=None,
                          steps=None, out=tmp_path, cache_dir=None)  # fmt: skip
    assert {j.controller for j in named[1][2]} == {"tampo", *FIXED_GRID}
    # synthetic records of exactly the planned runs: tampo is 'not run' on reference-full
    rng = np.random.default_rng(0)
    records = {}
    for _, _, jobs in plan:
        for job in jobs:
            metrics = {m: float(rng.uniform()) for m in ("auc", "final", "final_greedy",
                                                          "pass1", "greedy", "pass_at_k")}
            records[(job.testbed, job.controller, job.seed)] = {
                "metrics": metrics, "temperature": [1.0], "wall_seconds": 0.0}
    controllers = ["tampo", "recommended", *FIXED_GRID]
    analysis = analyse(testbeds, controllers, records, seeds, resamples=50, planned=planned)
    assert analysis["not_run"] == {"tampo": ["reference-full"]}
    assert analysis["summary"]["tampo"]["regret"]["reference-full"] is None
    assert analysis["summary"]["recommended"]["regret"]["reference-full"] is not None
    # a planned run that is missing is still an error
    del records[("reference-full", "recommended", 0)]
    with pytest.raises(ValueError, match="runs missing"):
        analyse(testbeds, controllers, records, seeds, resamples=50, planned=planned)


def _synthetic(testbeds, controllers, seeds, *, spread_of: float, best: str = "fixed-1.2",
               rng_seed: int = 0) -> dict:
    """Records of every run: a concave grid peaking at ``best``, noise of ``spread_of``; the
    bound rows resolved to ``best``."""
    from metactl.adapters.lab.scoreboard.suite import resolve_bound

    rng = np.random.default_rng(rng_seed)
    peak = float(best[6:])
    records = {}
    for testbed in testbeds:
        for c in controllers:
            for s in seeds[testbed.name]:
                centre = 0.5 - (float(c[6:]) - peak) ** 2 if c in FIXED_GRID else 0.45
                metrics = {m: float(centre + spread_of * rng.standard_normal())
                           for m in ("auc", "final", "final_greedy", "pass1", "greedy",
                                     "pass_at_k")}  # fmt: skip
                record = {"metrics": metrics, "temperature": [1.0], "wall_seconds": 0.0}
                if c in BOUND_ARMS:
                    record.update(resolved=resolve_bound(c, best), best_fixed=best)
                records[(testbed.name, c, s)] = record
    return records


def test_bound_rows_are_reported_apart_and_the_noise_floor_is_marked() -> None:
    """Synthetic records: the bound rows get their own block in every table and no worst case;
    a record resolved to another best fixed arm is refused; the final-metric regret is the
    final success's; a testbed whose median non-fixed regret CI is wider than 0.10 is marked
    in every table, the others not."""
    from metactl.adapters.lab.scoreboard.report import (
        NOISE_MARK,
        analyse,
        best_fixed_arm,
        format_summary,
        format_testbed,
    )

    testbeds = [TESTBEDS["gym-default"], TESTBEDS["gym-flat"]]
    seeds = {"gym-default": list(range(6)), "gym-flat": list(range(6))}
    controllers = ["exp3", "spread", "bound-t1-10", "bound-spread-25", *FIXED_GRID]
    records = _synthetic(testbeds[:1], controllers, seeds, spread_of=0.0005)  # resolved
    records |= _synthetic(testbeds[1:], controllers, seeds, spread_of=0.5, rng_seed=1)  # noisy
    best_noisy = best_fixed_arm(records, testbeds[1], seeds["gym-flat"])
    for c in ("bound-t1-10", "bound-spread-25"):  # resolved to the noisy grid's own best arm
        for s in seeds["gym-flat"]:
            from metactl.adapters.lab.scoreboard.suite import resolve_bound

            records[("gym-flat", c, s)].update(resolved=resolve_bound(c, best_noisy),
                                               best_fixed=best_noisy)  # fmt: skip
    analysis = analyse(testbeds, controllers, records, seeds, resamples=300)
    assert best_fixed_arm(records, testbeds[0], seeds["gym-default"]) == "fixed-1.2"
    assert analysis["bound_rows"] == ["bound-t1-10", "bound-spread-25"]
    row = analysis["testbeds"]["gym-default"]["controllers"]["bound-t1-10"]
    assert row["bound"] == {"runs_as": "switch-1.0-1.2-10", "best_fixed": "fixed-1.2"}
    assert analysis["summary"]["bound-t1-10"]["bound"] is True
    assert analysis["summary"]["exp3"]["bound"] is False
    # noise floor: marked on the noisy testbed only, in every table
    noise = {t: analysis["testbeds"][t]["noise"] for t in analysis["order"]}
    assert noise["gym-flat"]["below_resolution"] and noise["gym-flat"]["median_half_width"] > 0.1
    assert not noise["gym-default"]["below_resolution"]
    assert noise["gym-default"]["arms"] == 4  # exp3, spread and the two bound rows
    summary = format_summary(analysis)
    tables = [line for line in summary.splitlines() if line.startswith("| controller |")]
    assert len(tables) == 4  # primary and final, each candidates + bound rows
    assert all(f"gym-flat{NOISE_MARK} (dev)" in t and f"gym-default{NOISE_MARK}" not in t
               for t in tables)  # fmt: skip
    assert f"{NOISE_MARK} below the resolution" in summary and "Marked: gym-flat (" in summary
    assert format_testbed("gym-flat", analysis["testbeds"]["gym-flat"]).startswith(
        f"### gym-flat{NOISE_MARK} (")
    assert format_testbed("gym-default", analysis["testbeds"]["gym-default"]).startswith(
        "### gym-default (")
    # the bound rows: in their own block after the candidates, without worst-case columns
    lines = summary.splitlines()
    block = lines.index(next(line for line in lines if line.startswith("Bound rows")))
    assert all(not line.startswith("| bound-") for line in lines[:block])
    bound_line = next(line for line in lines[block:] if line.startswith("| bound-t1-10 |"))
    assert bound_line.count("|") == len(testbeds) + 3  # name, testbeds, beats: no worst case
    assert "| exp3 |" in "\n".join(lines[:block])
    # every regret with its CI: "0.12 [0.05, 0.20]"
    cell = bound_line.split("|")[2].strip()
    assert re.fullmatch(r"-?\d+\.\d\d \[-?\d+\.\d\d, -?\d+\.\d\d\]", cell), cell
    # the final metric's regret is the final success's, not the AUC's
    exp3 = analysis["testbeds"]["gym-default"]["controllers"]["exp3"]
    finals = np.array([[records[("gym-default", c, s)]["metrics"]["final"] for c in FIXED_GRID]
                       for s in seeds["gym-default"]])  # fmt: skip
    mine = [records[("gym-default", "exp3", s)]["metrics"]["final"] for s in range(6)]
    assert exp3["regrets"]["final"]["regret"] == pytest.approx(normalised_regret(mine, finals))
    assert analysis["summary"]["exp3"]["final"]["regret"]["gym-default"] == pytest.approx(
        normalised_regret(mine, finals))
    # a bound row resolved to another grid's best arm is never reported as this one's
    records[("gym-default", "bound-t1-10", 3)]["resolved"] = "switch-1.0-0.9-10"
    with pytest.raises(ValueError, match="bound row bound-t1-10 ran as"):
        analyse(testbeds, controllers, records, seeds, resamples=50)


def test_bound_phase_resolves_to_the_best_fixed_arm_and_follows_the_grid(
        tmp_path: Path, capsys) -> None:  # fmt: skip
    """The scoreboard runs the bound rows after the fixed grid, on the same seeds, as the
    concrete arm of the best fixed temperature (recorded), and reruns them when the grid's
    best arm changes; --report-only refuses bound records of another grid."""
    from metactl.adapters.lab.scoreboard.runner import record_path, write_record

    out = tmp_path / "board"
    argv = ["--testbeds", "gym-default", "--controllers", "spread,bound-t1-10,bound-spread-10",
            "--seeds", "2", "--steps", "14", "--resamples", "100", "--workers", "1",
            "--no-progress", "--no-plots", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "26 runs (0 reused)" in capsys.readouterr().out
    report = json.loads((out / "scoreboard.json").read_text())
    tb = report["testbeds"]["gym-default"]
    best = tb["best_fixed"]

    def payload(c: str, s: int) -> dict:
        return json.loads(record_path(out, "gym-default", c, s).read_text())["payload"]

    means = [np.mean([payload(c, s)["metrics"]["auc"] for s in (0, 1)]) for c in FIXED_GRID]
    assert best == FIXED_GRID[int(np.argmax(means))]
    t_best = float(best[6:])
    for s in (0, 1):  # the same seeds as every arm; T = 1.0 for 10 steps, then the best
        rec = payload("bound-t1-10", s)
        assert rec["resolved"] == f"switch-1.0-{best[6:]}-10" and rec["best_fixed"] == best
        assert rec["temperature"] == [1.0] * 10 + [t_best] * 4
        # the per-prompt arm logs the mean of its groups' temperatures: all t_best
        assert payload("bound-spread-10", s)["temperature"][10:] == pytest.approx([t_best] * 4)
    assert tb["controllers"]["bound-t1-10"]["bound"]["runs_as"] == f"switch-1.0-{best[6:]}-10"
    assert report["bound_rows"] == ["bound-t1-10", "bound-spread-10"]
    assert report["summary"]["bound-t1-10"]["bound"] is True

    # another grid (a fixed arm's records now best): the bound rows follow it
    other = "fixed-1.5" if best != "fixed-1.5" else "fixed-0.6"
    for s in (0, 1):
        changed = payload(other, s)
        changed["metrics"]["auc"] = 1.0
        write_record(record_path(out, "gym-default", other, s), changed)
    assert main([*argv, "--report-only"]) == 1  # stale bound records: never reported
    assert "made by another configuration" in capsys.readouterr().err
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "26 runs (22 reused)" in captured.out  # only the 4 bound runs again
    assert payload("bound-t1-10", 0)["resolved"] == f"switch-1.0-{other[6:]}-10"
    assert payload("bound-spread-10", 1)["temperature"][10:] == pytest.approx(
        [float(other[6:])] * 4)


def test_recommended_runs_are_keyed_by_what_it_was_chosen_as(monkeypatch) -> None:
    """A new choice of `recommended` never reuses the runs of the old one (the name stays)."""
    import importlib

    recommended_module = importlib.import_module("metactl.recommended")  # not the factory
    from metactl.adapters.lab.scoreboard.runner import gym_key, run_identity

    config = TESTBEDS["gym-default"].gym_config()
    before = gym_key(config, "recommended", 0)
    assert run_identity("recommended") == f"recommended={recommended_module.CHOSEN_AS}"
    assert gym_key(config, "exp3", 0) == gym_key(config, "exp3", 0)
    monkeypatch.setattr(recommended_module, "CHOSEN_AS", "exp3")
    assert run_identity("recommended") == "recommended=exp3"
    assert gym_key(config, "recommended", 0) != before
