"""Running the scoreboard: one record per (testbed, controller, seed), reused when finished.

A record is a small JSON file ``<out>/runs/<testbed>/<controller>/seed<s>.json`` written
atomically (a uniquely named temporary file renamed into place) with a key (hash of everything
that determines the run's result) and a checksum of its content. A record whose key differs (the
testbed's configuration changed), that does not verify (truncated, garbled) or whose content is
not a finished run's (no metrics, a metric that is not a finite number) is recomputed, and the
runner says so; a fresh run whose metrics are not finite is an error naming it, and no record
is written. Gym runs call ``metactl gym-study``'s :func:`run_one`; reference runs call
``metactl reproduce``'s ``prepare_start`` (cached warm-up) and ``run_arm`` (its own resumable
checkpoints under ``<out>/reference/<testbed>/``).

The record of a likelihood-rule run (TAMPO and its variants, Hedge, MetaGradient: any run whose
log has signal diagnostics) keeps, under ``"signal"``, every step's diagnostics of its signal
(:mod:`.signal_record`; ``None`` for a run without them), for the per-testbed pages. A record
written before that field existed has the same key and is reused as it is: its page says that
its diagnostics were not recorded.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metactl.adapters.integrity import atomic_write_bytes

import metactl

from ..gym_study import StudyConfig, make_controller, run_one
from .signal_record import from_gym_run, from_reference_result
from .suite import Testbed, reference_controller_name

__all__ = ["METRICS", "RECORD_FORMAT", "Job", "RecordScan", "load_record", "record_path",
           "run_jobs", "scan_records", "write_record"]  # fmt: skip

# part of every run's key: a change here recomputes every record. The optional "signal" field
# (signal_record.SIGNAL_FORMAT) is not: it adds diagnostics without changing any metric.
RECORD_FORMAT = 1
#: The metrics a finished run's record holds, by testbed kind.
METRICS: dict[str, tuple[str, ...]] = {"gym": ("auc", "final", "final_greedy"),
                                       "reference": ("pass1", "greedy", "pass_at_k")}


@dataclass(frozen=True)
class Job:
    """One run of the scoreboard."""

    testbed: str
    controller: str
    seed: int
    key: str


def record_path(out: Path, testbed: str, controller: str, seed: int) -> Path:
    """``<out>/runs/<testbed>/<controller>/seed<seed>.json``."""
    return out / "runs" / testbed / controller / f"seed{seed}.json"


def _checksum(payload: dict[str, Any]) -> str:
    blob = json.dumps(payload, sort_keys=True, allow_nan=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_record(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` with its checksum atomically (unique temporary name, then rename)."""
    text = json.dumps({"payload": payload, "sha256": _checksum(payload)})
    atomic_write_bytes(path, text.encode("utf-8"))


def _finite_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))  # fmt: skip


def record_problem(payload: dict[str, Any], metrics: Sequence[str] = ()) -> str | None:
    """What keeps ``payload`` from being a finished run's record, ``None`` if nothing: the run's
    identity (``testbed``, ``controller``, ``seed``), its ``metrics`` (every name of ``metrics``
    a finite number), its per-step ``temperature`` and its ``wall_seconds``.

    >>> record_problem({"testbed": "t", "controller": "c", "seed": 0, "metrics": {"auc": 0.5},
    ...                 "temperature": [1.0], "wall_seconds": 1.0}, ["auc"]) is None
    True
    >>> record_problem({"testbed": "t", "controller": "c", "seed": 0, "metrics": {"auc": None},
    ...                 "temperature": [1.0], "wall_seconds": 1.0}, ["auc"])
    "t c seed 0: metric 'auc' is None, not a finite number"
    """
    testbed, controller, seed = (payload.get(k) for k in ("testbed", "controller", "seed"))
    if (not isinstance(testbed, str) or not isinstance(controller, str)
            or isinstance(seed, bool) or not isinstance(seed, int)):  # fmt: skip
        return "no testbed, controller and seed"
    run = f"{testbed} {controller} seed {seed}"
    values = payload.get("metrics")
    if not isinstance(values, dict):
        return f"{run}: no metrics"
    for name in metrics:
        if name not in values:
            return f"{run}: no metric {name!r}"
        if not _finite_number(values[name]):
            return f"{run}: metric {name!r} is {values[name]!r}, not a finite number"
    temperature = payload.get("temperature")
    if (not isinstance(temperature, list) or not temperature
            or not all(_finite_number(t) for t in temperature)):  # fmt: skip
        return f"{run}: no finite per-step temperature"
    if not _finite_number(payload.get("wall_seconds")):
        return f"{run}: no finite wall_seconds"
    return None


def load_record(path: Path, key: str, *, metrics: Sequence[str] = ()
                ) -> tuple[dict[str, Any] | None, str | None]:  # fmt: skip
    """``(payload, None)`` for a finished run with this ``key`` (and every name of ``metrics`` a
    finite number); ``(None, why)`` otherwise, ``why`` naming the file and what is wrong with it
    (``None`` when there is simply no record yet). Whoever reads it says what happens next (a
    run recomputes the record; ``--report-only`` refuses to report)."""
    if not path.exists():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        payload, digest = data["payload"], data["sha256"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        return None, f"{path}: unreadable record ({type(exc).__name__})"
    if not isinstance(payload, dict) or _checksum(payload) != digest:
        return None, f"{path}: checksum mismatch (corrupted record)"
    if payload.get("key") != key:
        return None, f"{path}: made by another configuration"
    problem = record_problem(payload, metrics)
    if problem is not None:
        return None, f"{path}: {problem} (damaged record)"
    return payload, None


@dataclass(frozen=True)
class RecordScan:
    """The records found for a plan: the finished runs' payloads, the jobs still to run, and
    one line per record that was found but cannot be used (see :func:`load_record`)."""

    finished: list[dict[str, Any]]
    todo: list[Job]
    damaged: list[str]


def scan_records(out: Path, plan: Sequence[tuple[Testbed, Any, Sequence[Job]]]) -> RecordScan:
    """Read the record of every job of ``plan`` once (nothing is written)."""
    finished: list[dict[str, Any]] = []
    todo: list[Job] = []
    damaged: list[str] = []
    for testbed, _, jobs in plan:
        for job in jobs:
            payload, why = load_record(record_path(out, job.testbed, job.controller, job.seed),
                                       job.key, metrics=METRICS[testbed.kind])  # fmt: skip
            if why is not None:
                damaged.append(why)
            if payload is not None:
                finished.append(payload)
            else:
                todo.append(job)
    return RecordScan(finished, todo, damaged)


def _hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def gym_key(config: StudyConfig, controller: str, seed: int) -> str:
    """Key of a gym run: everything that determines its result."""
    return _hash({"format": RECORD_FORMAT, "kind": "gym", "config": dataclasses.asdict(config),
                  "controller": controller, "seed": seed})  # fmt: skip


def reference_key(cfg: Any, controller: str, seed: int) -> str:
    """Key of a reference run (not where it runs, how fast, or how the cache path is spelled)."""
    d = cfg.to_dict()
    for name in ("out", "workers", "threads_per_worker", "controllers", "seeds", "cache_dir"):
        d.pop(name, None)
    return _hash({"format": RECORD_FORMAT, "kind": "reference", "config": d,
                  "controller": controller, "seed": seed})  # fmt: skip


# ---------------------------------------------------------------------------------- workers
def _record(job: tuple[str, str, int, str], start: float, metrics: dict[str, float],
            temperature: Any, signal: Any, **timings: float) -> dict[str, Any]:  # fmt: skip
    """The record of one finished run of ``job`` (testbed, controller, seed, key), started at
    ``start`` (``time.perf_counter()``): what every testbed's worker returns."""
    testbed, controller, seed, key = job
    return {
        "key": key,
        "testbed": testbed,
        "controller": controller,
        "seed": seed,
        "metrics": metrics,
        "temperature": [float(t) for t in temperature],
        "signal": signal,
        **timings,
        "wall_seconds": time.perf_counter() - start,
        "metactl_version": metactl.__version__,
    }


def _gym_task(testbed: str, controller: str, seed: int, key: str,
              config: StudyConfig) -> dict[str, Any]:  # fmt: skip
    start = time.perf_counter()
    run = run_one((controller, seed, config))
    metrics = {"auc": float(run["auc"]), "final": float(run["final"]),
               "final_greedy": float(run["greedy"][-1])}  # fmt: skip
    # the columns of the signal are the controller's candidates (run_one does not return the
    # policy; building it again is cheap and draws nothing from the run's RNGs)
    signal = from_gym_run(run["signal"], make_controller(controller, config, seed).candidates)
    return _record((testbed, controller, seed, key), start, metrics, run["temperature"], signal)


def _init_worker(threads: int, with_torch: bool) -> None:
    if with_torch:
        import torch

        torch.set_num_threads(threads)
        try:  # the model loads of every arm would print a progress bar each
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
        except ImportError:
            pass


def _prepare_task(cfg: Any) -> tuple[str | None, dict[str, Any]]:
    from ..reproduce.experiment import prepare_start

    # The start model's task check samples 1,000 problems at every fixed temperature of the
    # comparison: over the whole grid that is ten times the work of the check at T = 1.0 and
    # changes nothing about the arms (the warm-up, its greedy-accuracy gate and the base scores
    # are the same), so the check runs at T = 1.0 only.
    return prepare_start(dataclasses.replace(cfg, controllers=("fixed-1.0",)), progress=False)


def _reference_task(testbed: str, controller: str, seed: int, key: str, cfg: Any,
                    start_path: str | None) -> dict[str, Any]:  # fmt: skip
    from ..reproduce.experiment import run_arm

    start = time.perf_counter()
    # no per-arm progress bar: the scoreboard draws one bar over all runs
    result = run_arm(cfg, reference_controller_name(controller), seed, start_path, progress=False)
    avg = result["final"]["avg"]
    metrics = {name: float(avg[name]) for name in ("pass1", "greedy", "pass_at_k")}
    return _record((testbed, controller, seed, key), start, metrics, result["temperature"],
                   from_reference_result(result), train_seconds=float(result["train_seconds"]),
                   meta_seconds=float(result.get("meta_seconds", 0.0)))  # fmt: skip


# ---------------------------------------------------------------------------------- scheduler
def run_jobs(
    out: Path,
    plan: list[tuple[Testbed, Any, list[Job]]],
    *,
    workers: int,
    on_record: Callable[[dict[str, Any]], None],
    on_note: Callable[[str], None],
    scan: RecordScan | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every job of ``plan`` (``(testbed, config, jobs)`` per testbed) not already finished.

    Returns ``{testbed name: start info}`` of the reference testbeds (the start model's scores).
    Finished records are passed to ``on_record`` (reused ones first); notes (recomputed
    records) to ``on_note``. ``scan``: :func:`scan_records` of this plan when the caller has
    read the records already. Reference arms are scheduled before gym runs, so the long runs
    start early; each reference testbed's warm-up and checks run once, one testbed at a time
    (they share the warm-up cache). A run whose metrics are not finite numbers raises
    ``ValueError`` naming it (no record is written).
    """
    if scan is None:
        scan = scan_records(out, plan)
    for why in scan.damaged:
        on_note(f"{why}; recomputing it")
    for payload in scan.finished:
        on_record(payload)
    todo = set(scan.todo)
    kinds = {testbed.name: testbed.kind for testbed, _, _ in plan}
    gym_jobs: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
    prepares: deque[tuple[Testbed, Any, list[Job]]] = deque()
    for testbed, config, jobs in plan:
        pending = [job for job in jobs if job in todo]
        if not pending:
            continue
        if testbed.kind == "gym":
            gym_jobs.extend((_gym_task, (j.testbed, j.controller, j.seed, j.key, config))
                            for j in pending)  # fmt: skip
        else:
            prepares.append((testbed, config, pending))
    start_info: dict[str, dict[str, Any]] = {}
    if not gym_jobs and not prepares:
        return start_info
    with_torch = bool(prepares)

    def finish(kind: str, value: Any, context: Any) -> list[tuple[Callable[..., Any], tuple]]:
        if kind == "record":
            problem = record_problem(value, METRICS[kinds[value["testbed"]]])
            if problem is not None:
                raise ValueError(f"the run {problem}; no record written")
            write_record(record_path(out, value["testbed"], value["controller"], value["seed"]),
                         value)  # fmt: skip
            on_record(value)
            return []
        testbed, config, pending = context  # a finished prepare: its arms become runnable
        start_path, info = value
        start_info[testbed.name] = info
        return [(_reference_task, (j.testbed, j.controller, j.seed, j.key, config, start_path))
                for j in pending]  # fmt: skip

    if workers == 1:  # in this process (the torch thread count restored)
        threads = 1
        if with_torch:
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(1)
        try:
            while prepares:
                context = prepares.popleft()
                for fn, args in finish("prepare", _prepare_task(context[1]), context):
                    finish("record", fn(*args), None)
            while gym_jobs:
                fn, args = gym_jobs.popleft()
                finish("record", fn(*args), None)
        finally:
            if with_torch:
                torch.set_num_threads(threads)
        return start_info

    context_mp = mp.get_context("spawn")
    reference_jobs: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
    in_flight: dict[cf.Future[Any], tuple[str, Any]] = {}
    preparing = False
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=context_mp,
                                initializer=_init_worker,
                                initargs=(1, with_torch)) as pool:  # fmt: skip
        try:
            while True:
                if not preparing and prepares:
                    context = prepares.popleft()
                    in_flight[pool.submit(_prepare_task, context[1])] = ("prepare", context)
                    preparing = True
                # keep the workers busy, plus one queued job each, long reference arms first
                while len(in_flight) < 2 * workers and (reference_jobs or gym_jobs):
                    fn, args = (reference_jobs or gym_jobs).popleft()
                    in_flight[pool.submit(fn, *args)] = ("record", None)
                if not in_flight:
                    break
                # a timeout, so that Ctrl-C is seen within a second in any case
                done, _ = cf.wait(in_flight, timeout=1.0, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    kind, context = in_flight.pop(future)
                    if kind == "prepare":
                        preparing = False
                    reference_jobs.extend(finish(kind, future.result(), context))
        except BaseException:
            # Ctrl-C or a failed run: stop now, not after the queued and running jobs (finished
            # records are on disk; a reference arm keeps its last checkpoint)
            _stop_workers(pool)
            raise
    return start_info


def _stop_workers(pool: cf.ProcessPoolExecutor) -> None:
    """Cancel what is queued and terminate the worker processes (running jobs included)."""
    pool.shutdown(wait=False, cancel_futures=True)
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    processes = getattr(pool, "_processes", None) or {}
    for process in list(processes.values()):
        if process.is_alive():
            process.terminate()
    for process in list(processes.values()):
        process.join(timeout=10)
