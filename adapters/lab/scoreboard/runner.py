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

A bound row's record (filed under the bound row's name) also keeps ``resolved``, the registry
name it ran as, and ``best_fixed``, the fixed arm it switched to; its key is that of the
resolved arm, so a bound row resolved against another grid is recomputed. A reference record
keeps, when the run recorded a learning curve of two points or more, the metric
``curve_auc`` (:func:`curve_auc`; optional: a record without it is still a finished run's).

The record of a likelihood-rule run (TAMPO and its variants, Hedge, MetaGradient: any run whose
log has signal diagnostics) keeps, under ``"signal"``, every step's diagnostics of its signal
(:mod:`.signal_record`; ``None`` for a run without them), for the per-testbed pages. A record
written before that field existed has the same key and is reused as it is: its page says that
its diagnostics were not recorded.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import hashlib
import importlib
import itertools
import json
import math
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metactl.adapters.integrity import atomic_write_bytes

import metactl

from ..gym_study import StudyConfig, make_controller, run_one
from ..machine import machine_facts
from .signal_record import from_gym_run, from_reference_result
from .suite import Testbed, reference_controller_name

__all__ = ["CURVE_AUC", "METRICS", "RECORD_FORMAT", "Job", "RecordScan", "curve_auc",
           "load_record", "record_path", "run_jobs", "scan_records", "write_record"]  # fmt: skip

# part of every run's key: a change here recomputes every record. The optional "signal" field
# (signal_record.SIGNAL_FORMAT) is not: it adds diagnostics without changing any metric.
RECORD_FORMAT = 1
#: The metrics a finished run's record holds, by testbed kind.
METRICS: dict[str, tuple[str, ...]] = {"gym": ("auc", "final", "final_greedy"),
                                       "reference": ("pass1", "greedy", "pass_at_k")}
#: An optional metric of a reference record: the area under the run's learning curve (average
#: Pass@1 on the curve subsets), kept when the run recorded at least two curve points.
CURVE_AUC = "curve_auc"


def curve_auc(curve: Sequence[Mapping[str, Any]]) -> float | None:
    """The normalised area under a reference run's learning curve: the trapezoid over the
    steps of the curve points' average Pass@1, divided by the steps it spans (the mean Pass@1
    over training, as the gym's AUC is the mean success over its evaluations). ``None`` when
    the run recorded fewer than two points (``--quick`` evaluates only the end).

    >>> curve_auc([{"step": 0, "avg": {"pass1": 0.2}}, {"step": 10, "avg": {"pass1": 0.6}},
    ...            {"step": 30, "avg": {"pass1": 0.6}}])
    0.5333333333333333
    >>> curve_auc([{"step": 25, "avg": {"pass1": 0.7}}]) is None
    True
    """
    if isinstance(curve, (str, bytes)) or not isinstance(curve, Sequence):
        raise TypeError(f"curve must be a list of evaluations, got {type(curve).__name__}")
    if len(curve) < 2:
        return None
    try:
        steps = [float(point["step"]) for point in curve]
        values = [float(point["avg"]["pass1"]) for point in curve]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"curve: every point needs a step and avg.pass1 ({exc!r})") from None
    span = steps[-1] - steps[0]
    if span <= 0 or any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"curve: steps must increase, got {steps}")
    area = sum((b - a) * (u + v) / 2 for a, b, u, v in zip(steps, steps[1:], values,
                                                            values[1:], strict=False))
    return area / span


@dataclass(frozen=True)
class Job:
    """One run of the scoreboard. ``resolved``: the registry name the run builds when it is
    not ``controller`` itself (a bound row, resolved after its testbed's fixed grid); its
    record keeps ``controller`` (where it is filed and reported) and ``resolved``."""

    testbed: str
    controller: str
    seed: int
    key: str
    resolved: str | None = None
    best_fixed: str | None = None

    @property
    def builds(self) -> str:
        """The registry name of the controller this run builds."""
        return self.controller if self.resolved is None else self.resolved

    @property
    def extra(self) -> dict[str, str]:
        """What the record keeps besides the run's results: a bound row's resolution."""
        if self.resolved is None:
            return {}
        return {"resolved": self.resolved, "best_fixed": str(self.best_fixed)}


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


def run_identity(controller: str) -> str:
    """What a controller name stands for in a run's key: the name, except that `recommended`
    names whatever the protocol chose (`metactl.recommended.CHOSEN_AS`), so a new choice
    never reuses the runs of the old one.

    >>> run_identity("tampo")
    'tampo'
    >>> run_identity("recommended") == f"recommended={_chosen()}"
    True
    """
    if controller == "recommended":
        return f"recommended={_chosen()}"
    return controller


def _chosen() -> str:
    # the module, not the factory function of the same name that metactl exports
    return str(importlib.import_module("metactl.recommended").CHOSEN_AS)


def gym_key(config: StudyConfig, controller: str, seed: int) -> str:
    """Key of a gym run: everything that determines its result."""
    return _hash({"format": RECORD_FORMAT, "kind": "gym", "config": dataclasses.asdict(config),
                  "controller": run_identity(controller), "seed": seed})  # fmt: skip


def reference_key(cfg: Any, controller: str, seed: int) -> str:
    """Key of a reference run (not where it runs, how fast, or how the cache path is spelled)."""
    d = cfg.to_dict()
    for name in ("out", "workers", "threads_per_worker", "controllers", "seeds", "cache_dir"):
        d.pop(name, None)
    return _hash({"format": RECORD_FORMAT, "kind": "reference", "config": d,
                  "controller": run_identity(controller), "seed": seed})  # fmt: skip


# ---------------------------------------------------------------------------------- workers
@functools.cache
def _machine(with_torch: bool) -> dict[str, Any]:
    """This worker's machine facts (torch's only where the run computes with torch)."""
    return machine_facts(include_torch=with_torch)


def _record(job: Job, start: float, metrics: dict[str, float], temperature: Any,
            signal: Any, *, with_torch: bool, **timings: float) -> dict[str, Any]:  # fmt: skip
    """The record of one finished run of ``job``, started at ``start``
    (``time.perf_counter()``): what every testbed's worker returns, with the facts of the
    machine that ran it (torch's where the run computed with torch)."""
    return {
        "key": job.key,
        "testbed": job.testbed,
        "controller": job.controller,
        **job.extra,
        "seed": job.seed,
        "metrics": metrics,
        "temperature": [float(t) for t in temperature],
        "signal": signal,
        **timings,
        "wall_seconds": time.perf_counter() - start,
        "metactl_version": metactl.__version__,
        "machine": _machine(with_torch),
    }


def _gym_task(job: Job, config: StudyConfig) -> dict[str, Any]:
    start = time.perf_counter()
    run = run_one((job.builds, job.seed, config))
    metrics = {"auc": float(run["auc"]), "final": float(run["final"]),
               "final_greedy": float(run["greedy"][-1])}  # fmt: skip
    # the columns of the signal are the controller's candidates (run_one does not return the
    # policy; building it again is cheap and draws nothing from the run's RNGs)
    signal = from_gym_run(run["signal"],
                          make_controller(job.builds, config, job.seed).candidates)
    return _record(job, start, metrics, run["temperature"], signal, with_torch=False)


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


def _reference_task(job: Job, cfg: Any, start_path: str | None) -> dict[str, Any]:
    from ..reproduce.experiment import run_arm

    start = time.perf_counter()
    # no per-arm progress bar: the scoreboard draws one bar over all runs
    result = run_arm(cfg, reference_controller_name(job.builds), job.seed, start_path,
                     progress=False)  # fmt: skip
    avg = result["final"]["avg"]
    metrics = {name: float(avg[name]) for name in ("pass1", "greedy", "pass_at_k")}
    area = curve_auc(result.get("curve") or [])
    if area is not None:
        metrics[CURVE_AUC] = float(area)
    return _record(job, start, metrics, result["temperature"],
                   from_reference_result(result), with_torch=True,
                   train_seconds=float(result["train_seconds"]),
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
    starts: dict[str, tuple[str | None, dict[str, Any]]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every job of ``plan`` (``(testbed, config, jobs)`` per testbed) not already finished.

    Returns ``{testbed name: start info}`` of the reference testbeds (the start model's scores).
    ``starts``: ``{testbed: (start path, start info)}`` of reference testbeds prepared already
    (their warm-up and checks are not run again); the testbeds prepared here are added to it,
    so a second phase of the same scoreboard passes the same dict.
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
    if starts is None:
        starts = {}
    todo = set(scan.todo)
    kinds = {testbed.name: testbed.kind for testbed, _, _ in plan}
    gym_jobs: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
    prepares: deque[tuple[Testbed, Any, list[Job]]] = deque()
    ready: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()  # reference, prepared
    start_info: dict[str, dict[str, Any]] = {}
    for testbed, config, jobs in plan:
        pending = [job for job in jobs if job in todo]
        if not pending:
            continue
        if testbed.kind == "gym":
            gym_jobs.extend((_gym_task, (j, config)) for j in pending)
        elif testbed.name in starts:
            start_path, start_info[testbed.name] = starts[testbed.name]
            ready.extend((_reference_task, (j, config, start_path)) for j in pending)
        else:
            prepares.append((testbed, config, pending))
    if not gym_jobs and not prepares and not ready:
        return start_info
    with_torch = bool(prepares) or bool(ready)

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
        starts[testbed.name] = (start_path, info)
        return [(_reference_task, (j, config, start_path)) for j in pending]

    if workers == 1:  # in this process (the torch thread count restored)
        threads = 1
        if with_torch:
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(1)
        try:
            while ready:
                fn, args = ready.popleft()
                finish("record", fn(*args), None)
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
    reference_jobs = ready
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
