"""``metactl scoreboard``: every controller on every testbed of the declared suite.

Examples:
    metactl scoreboard --quick                          # the quick suite, < 10 min on 2 cores
    metactl scoreboard --quick --testbeds development   # development testbeds only
    metactl scoreboard                                  # the full suite (~40 min on 2 cores)
    metactl scoreboard --testbeds gym-default,gym-sharp --controllers tampo,linear --seeds 5
    metactl scoreboard --report-only --out DIR         # the report of the runs already in DIR

The fixed grid 0.6..1.5 always runs (normalised regret needs it); ``--controllers`` adds the
adaptive controllers and schedules (default: every controller ``metactl gym-study`` knows, and
the bound rows). The bound rows (``bound-t1-10``, ``bound-t1-25``, ``bound-spread-10``,
``bound-spread-25``: T = 1.0 or the uniform mixture for the first steps, then the testbed's
best fixed temperature; oracles, never candidates) run in a second phase, once their testbed's
fixed grid has finished, on the same seeds; their records keep the arm they ran as.
Finished runs are reused, so an interrupted scoreboard resumes where it stopped. Runs are
keyed by configuration, controller and seed, not by the code: after changing a rule or a
learner, use a fresh --out.

Writes into --out: ``scoreboard.md`` / ``scoreboard.json`` (every number), ``regret_heatmap.png``,
and one page per testbed, ``testbeds/<name>.md``: its full table and, for every likelihood-rule
arm (TAMPO and its variants, Hedge, MetaGradient), the figure of its signal diagnostics
(``testbeds/<name>/signal-<controller>.png``: why the rule moved where it did).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from metactl.adapters.integrity import OutputInUseError

import metactl

from ..commands import OneLineErrorParser, check_writable_dir, output_lock, parse_name_list
from .report import format_summary, machines_of, off_protocol_note, write_report
from .runner import Job, gym_key, reference_key, run_jobs, scan_records
from .suite import (
    DEVELOPMENT,
    FIXED_GRID,
    HELD_OUT,
    TESTBEDS,
    Testbed,
    check_controller,
    default_controllers,
    is_bound,
    reference_controller_name,
    resolve_bound,
)

PROG = "metactl scoreboard"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (errors are one line, exit status 2)."""
    p = OneLineErrorParser(prog=PROG, description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="the quick suite: fewer seeds, reference-quick at 25 steps with a "
                        "smaller evaluation, no reference-full (see benchmarks/PROTOCOL.md)")
    p.add_argument("--out", default=None,
                   help="output folder (default runs/scoreboard or runs/scoreboard-quick)")
    p.add_argument("--controllers", default="all",
                   help="comma-separated controllers (gym-study names), or 'all'; the fixed "
                        "grid fixed-0.6..fixed-1.5 always runs")  # fmt: skip
    p.add_argument("--testbeds", default="all",
                   help=f"comma-separated testbeds from {','.join(TESTBEDS)}, or 'all', "
                        f"'{DEVELOPMENT}', '{HELD_OUT}'")  # fmt: skip
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per testbed (0..N-1) instead of the protocol's counts")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of every selected testbed instead of the protocol's "
                        "(for smoke tests; the report marks the budget as off-protocol)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--cache-dir", default=None,
                   help="reference warm-up cache (default $METACTL_CACHE or ~/.cache/metactl)")
    p.add_argument("--resamples", type=int, default=10_000,
                   help="bootstrap resamples of the regret CI (default 10000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true",
                   help="skip the PNGs (heat-map, per-testbed signal diagnostics)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rebuild the report from the finished runs in --out; a "
                        "controller with no run on a testbed is reported as 'not run' there "
                        "(the fixed grid must be complete, and no controller may have only "
                        "some of a testbed's seeds)")
    return p


def select_testbeds(text: str, quick: bool) -> list[Testbed]:
    """The testbeds named by ``--testbeds`` (suite order), validated."""
    suite = [t for t in TESTBEDS.values() if t.seeds(quick) is not None]
    spec = text.strip()
    if spec == "all":
        return suite
    if spec in (DEVELOPMENT, HELD_OUT):
        return [t for t in suite if t.split == spec]
    names = parse_name_list(text, "--testbeds", "testbed")
    for name in names:
        if name not in TESTBEDS:
            raise ValueError(f"unknown testbed {name!r}; choose from {', '.join(TESTBEDS)}")
        if TESTBEDS[name].seeds(quick) is None:
            raise ValueError(f"testbed {name!r} is not part of the --quick suite")
    return [t for t in suite if t.name in names]


def select_controllers(text: str, testbeds: Sequence[Testbed]) -> tuple[list[str], list[str]]:
    """(controllers in report order, notes): adaptive ones first, then the bound rows, then the
    whole fixed grid.

    Every named controller must be available on every selected testbed. With ``all``, a
    controller that some selected testbed does not know is left out, and a note says so.
    """
    notes: list[str] = []
    if text.strip() == "all":
        chosen = []
        for name in default_controllers():
            lacking = []
            for testbed in testbeds:
                try:
                    check_controller(name, testbed)
                except ValueError:
                    lacking.append(testbed.name)
            if lacking:
                notes.append(f"controller {name!r} left out: not available on {lacking}")
            else:
                chosen.append(name)
    else:
        chosen = parse_name_list(text, "--controllers", "controller")
        known = default_controllers()
        for name in chosen:
            if name not in known:
                raise ValueError(f"unknown controller {name!r}; choose from {', '.join(known)}")
            for testbed in testbeds:
                check_controller(name, testbed)
    adaptive = [c for c in chosen if c not in FIXED_GRID and not is_bound(c)]
    bound = [c for c in chosen if is_bound(c)]
    return [*adaptive, *bound, *FIXED_GRID], notes


def testbed_arms(testbed: Testbed, controllers: Sequence[str], default_arms: bool) -> list[str]:
    """The controllers of ``controllers`` planned on ``testbed``: all of them, or with
    ``default_arms`` (``--controllers all``) the fixed grid and `Testbed.default_arms`."""
    return testbed.default_plan(controllers) if default_arms else list(controllers)


def _testbed_jobs(testbed: Testbed, runs: Sequence[tuple[str, str | None, str | None]],
                  seed_list: Sequence[int], *, quick: bool, steps: int | None, out: Path,
                  cache_dir: str | None) -> tuple[Any, list[Job]]:  # fmt: skip
    """The run configuration and jobs of ``runs`` (``(controller, resolved, best fixed)``) on
    ``testbed``: every run keyed by the registry name it builds."""
    builds = [c if resolved is None else resolved for c, resolved, _ in runs]
    if testbed.kind == "gym":
        config: Any = testbed.gym_config(steps)
        key = lambda name, s: gym_key(config, name, s)  # noqa: E731
    else:
        base = testbed.reference_config(quick, steps)
        config = dataclasses.replace(
            base, out=str(out / "reference" / testbed.name),
            controllers=tuple(reference_controller_name(c) for c in builds),
            seeds=tuple(seed_list), workers=1, cache_dir=cache_dir,
        )
        key = lambda name, s: reference_key(config, name, s)  # noqa: E731
    jobs = [Job(testbed.name, c, s, key(name, s), resolved, best)
            for (c, resolved, best), name in zip(runs, builds, strict=True)
            for s in seed_list]  # fmt: skip
    return config, jobs


def build_plan(testbeds: Sequence[Testbed], controllers: Sequence[str], *, quick: bool,
               seeds: int | None, steps: int | None, out: Path, cache_dir: str | None,
               default_arms: bool = False) -> tuple[list[tuple[Testbed, Any, list[Job]]],
                                                    dict[str, list[int]]]:  # fmt: skip
    """Per testbed: its run configuration and its jobs (same seeds for every controller).

    ``default_arms`` (``--controllers all``): a testbed with `Testbed.default_arms` gets only
    the fixed grid and those arms. The bound rows are not in this plan: they run once the
    testbed's fixed grid has, from :func:`build_bound_plan`.
    """
    plan = []
    seed_lists: dict[str, list[int]] = {}
    for testbed in testbeds:
        n = seeds if seeds is not None else testbed.seeds(quick)
        assert n is not None
        seed_list = list(range(n))
        seed_lists[testbed.name] = seed_list
        runs = [(c, None, None) for c in testbed_arms(testbed, controllers, default_arms)
                if not is_bound(c)]  # fmt: skip
        config, jobs = _testbed_jobs(testbed, runs, seed_list, quick=quick, steps=steps,
                                     out=out, cache_dir=cache_dir)  # fmt: skip
        plan.append((testbed, config, jobs))
    return plan, seed_lists


def build_bound_plan(testbeds: Sequence[Testbed], bound: Mapping[str, Sequence[str]],
                     best_fixed: Mapping[str, str], seed_lists: Mapping[str, Sequence[int]], *,
                     quick: bool, steps: int | None, out: Path,
                     cache_dir: str | None) -> list[tuple[Testbed, Any, list[Job]]]:  # fmt: skip
    """The second phase (PROTOCOL section 16.2): on every testbed with bound rows planned
    (``bound``: ``{testbed: bound rows}``) and a best fixed arm (``best_fixed``: ``{testbed:
    fixed arm}``, from its finished grid), each bound row resolved to the registry name it runs
    as (`resolve_bound`), on the testbed's seeds (``seed_lists``). A testbed without a best
    fixed arm (its grid incomplete) gets no bound jobs."""
    plan = []
    for testbed in testbeds:
        rows = list(bound.get(testbed.name, ()))
        if not rows or testbed.name not in best_fixed:
            continue
        best = best_fixed[testbed.name]
        runs = [(c, resolve_bound(c, best), best) for c in rows]
        config, jobs = _testbed_jobs(testbed, runs, seed_lists[testbed.name], quick=quick,
                                     steps=steps, out=out, cache_dir=cache_dir)  # fmt: skip
        plan.append((testbed, config, jobs))
    return plan


def output_folder(path: str, report_only: bool) -> Path:
    """The ``--out`` folder, checked before any work: writable (created if needed) for a run;
    for ``--report-only`` an existing folder with a ``runs/`` folder, nothing created. Raises
    ``ValueError`` naming ``--out``."""
    out = Path(path).expanduser()
    if report_only and not (out / "runs").is_dir():
        raise ValueError(f"--out {out}: no runs to report (no folder {out / 'runs'}); "
                         "--report-only runs and creates nothing")  # fmt: skip
    return check_writable_dir(out, "--out")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``metactl scoreboard``; returns the exit status (2: refused before any
    work; 1: a run or the report failed; 130: interrupted)."""
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        for flag, value, low in (("--seeds", args.seeds, 1), ("--steps", args.steps, 2),
                                 ("--workers", args.workers, 1),
                                 ("--resamples", args.resamples, 1)):  # fmt: skip
            if value is not None and value < low:
                raise ValueError(f"{flag} must be >= {low}, got {value}")
        testbeds = select_testbeds(args.testbeds, args.quick)
        if any(t.kind == "reference" for t in testbeds):
            try:
                import torch  # noqa: F401
                import transformers  # noqa: F401
            except ImportError as exc:
                raise ValueError(f"the reference testbeds need pip install "
                                 f"'metactl[reference]' ({exc})") from None  # fmt: skip
        controllers, notes = select_controllers(args.controllers, testbeds)
        out = output_folder(args.out or ("runs/scoreboard-quick" if args.quick
                                         else "runs/scoreboard"), args.report_only)  # fmt: skip
        default_arms = args.controllers.strip() == "all"
        plan, seed_lists = build_plan(testbeds, controllers, quick=args.quick, seeds=args.seeds,
                                      steps=args.steps, out=out, cache_dir=args.cache_dir,
                                      default_arms=default_arms)
        bound = {t.name: [c for c in testbed_arms(t, controllers, default_arms) if is_bound(c)]
                 for t in testbeds}  # fmt: skip
    except (ValueError, TypeError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"{PROG}: {note}", file=sys.stderr)
    try:
        with output_lock(out):
            return _run_and_report(args, out, testbeds, controllers, plan, seed_lists, bound)
    except OutputInUseError as exc:  # another scoreboard on this folder: refused, not redone
        # (_run_and_report reports the errors of the runs themselves: only the lock's is here)
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2


def _run_and_report(args: argparse.Namespace, out: Path, testbeds: list[Testbed],
                    controllers: list[str], plan: list[tuple[Testbed, Any, list[Job]]],
                    seed_lists: dict[str, list[int]],
                    bound: Mapping[str, Sequence[str]]) -> int:  # fmt: skip
    """Run what is not finished (nothing under ``--report-only``), then write the report; the
    output folder's lock is held by the caller.

    Two phases: every planned arm but the bound rows, then, on each testbed, the bound rows
    ``bound`` resolved to the testbed's best fixed arm over its finished grid."""
    from tqdm.auto import tqdm

    from .report import best_fixed_arm

    planned = {testbed.name: sorted({job.controller for job in jobs} | set(bound[testbed.name]))
               for testbed, _, jobs in plan}  # fmt: skip
    total = sum(len(jobs) for _, _, jobs in plan) + sum(
        len(bound[t.name]) * len(seed_lists[t.name]) for t in testbeds)
    records: dict[tuple[str, str, int], dict[str, Any]] = {}
    bar = tqdm(total=total, desc="scoreboard runs", unit="run", disable=args.no_progress)
    started = time.perf_counter()

    def on_record(record: dict[str, Any]) -> None:
        records[(record["testbed"], record["controller"], record["seed"])] = record
        bar.update()

    def on_note(note: str) -> None:
        bar.write(f"{PROG}: {note}", file=sys.stderr)

    print(f"{PROG}: {len(testbeds)} testbeds x {len(controllers)} controllers, {total} runs, "
          f"{args.workers} worker(s); output -> {out}", flush=True)  # fmt: skip
    starts: dict[str, tuple[str | None, dict[str, Any]]] = {}
    start_info: dict[str, dict[str, Any]] = {}
    reused = 0
    for phase in ("arms", "bound"):
        if phase == "bound":  # each testbed's best fixed arm, from its finished grid
            best = {t.name: arm for t in testbeds if bound[t.name]
                    and (arm := best_fixed_arm(records, t, seed_lists[t.name])) is not None}
            phase_plan = build_bound_plan(testbeds, bound, best, seed_lists, quick=args.quick,
                                          steps=args.steps, out=out,
                                          cache_dir=args.cache_dir)  # fmt: skip
        else:
            phase_plan = plan
        scan = scan_records(out, phase_plan)
        reused += len(scan.finished)
        if args.report_only:
            if scan.damaged:  # never reported as 'not run', never summarised without them
                bar.close()
                for why in scan.damaged:
                    print(f"{PROG}: {why}", file=sys.stderr)
                print(f"{PROG}: cannot report: {len(scan.damaged)} record(s) above cannot be "
                      "used; the same command without --report-only recomputes exactly those "
                      "(a record of another configuration: pass the --quick, --seeds and "
                      "--steps that wrote it; a bound row resolved to another best fixed arm: "
                      "its testbed's grid has changed)", file=sys.stderr)  # fmt: skip
                return 1
            for payload in scan.finished:
                on_record(payload)
            continue
        try:
            start_info.update(run_jobs(out, phase_plan, workers=args.workers,
                                       on_record=on_record, on_note=on_note, scan=scan,
                                       starts=starts))  # fmt: skip
        except KeyboardInterrupt:
            bar.close()
            print(f"{PROG}: interrupted; finished runs are kept in {out}/runs and reused next "
                  "time", file=sys.stderr)  # fmt: skip
            return 130
        except (RuntimeError, OSError, ValueError) as exc:
            # a run that cannot proceed (e.g. the reference start model fails its quality
            # check): one clear line; the finished runs stay on disk and are reused next time
            bar.close()
            print(f"{PROG}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    bar.close()
    wall = time.perf_counter() - started

    from .report import analyse

    if args.report_only:  # an arm without any record on a testbed was not run there
        planned = {name: [c for c in arms if any((name, c, s) in records
                                                 for s in seed_lists[name])]
                   for name, arms in planned.items()}  # fmt: skip
    try:
        analysis = analyse(testbeds, controllers, records, seed_lists, resamples=args.resamples,
                           planned=planned)  # fmt: skip
    except ValueError as exc:  # --report-only over an incomplete folder
        print(f"{PROG}: cannot report: {exc}", file=sys.stderr)
        return 1
    off_protocol = args.seeds is not None or args.steps is not None
    meta = {
        "quick": args.quick,
        "off_protocol_budget": off_protocol,
        "seeds_override": args.seeds,
        "steps_override": args.steps,
        "runs": total,
        "reused": reused,
        "report_only": args.report_only,
        "workers": args.workers,
        "wall_seconds": wall,
        "start_models": start_info,
        "metactl_version": metactl.__version__,
        "machines": machines_of(records.values()),
    }
    from .pages import write_testbed_pages

    pages = write_testbed_pages(out, analysis, testbeds, records, plots=not args.no_plots,
                                workers=args.workers)
    paths = write_report(out, analysis, meta, plots=not args.no_plots, pages=pages)
    print(format_summary(analysis))
    if off_protocol:
        print(f"\n{off_protocol_note(meta)}")
    if args.report_only:
        print(f"\nreport only: {len(records)} finished runs of the {total} planned, nothing run; "
              f"report: {paths['markdown']}")  # fmt: skip
    else:
        print(f"\n{total} runs ({reused} reused) in {wall:.1f} s with "
              f"{args.workers} worker(s); report: {paths['markdown']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
