"""The worker-process machinery of the comparison: the spawn-based worker pool that runs arms in
parallel, worker start-up (threads, the shared ``<out>/.workers.lock``), dying with the parent,
Ctrl-C handling (the first stops every arm after its current step, a second at once), and the
per-process state through which an arm reports progress and sees a stop request.

The state lives here (set by :func:`_init_worker` in each worker, and by
``experiment.run_all_arms`` around its in-process loop); ``experiment.run_arm`` reads it.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .experiment import ReproduceConfig

# Set in each worker by _init_worker (and around the in-process loop of run_all_arms):
_PROGRESS: Any = None  # a multiprocessing queue: ("step", n) and ("note", text) for the parent
_STOP: Any = None  # an event: once set, every arm stops after its current step (checkpointed)
_PARENT_PID: int | None = None  # a worker exits as soon as its parent is gone
_WORKER_LOCK_FD: int | None = None  # a shared flock on <out>/.workers.lock while a worker lives

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class ArmStopped(Exception):
    """An arm stopped early on request (Ctrl-C, or another arm failed); its checkpoint is kept
    and a rerun resumes it."""


def _init_worker(progress_queue: Any, stop_event: Any, threads: int, parent_pid: int,
                 worker_lock: str | None) -> None:
    global _PROGRESS, _STOP, _PARENT_PID, _WORKER_LOCK_FD
    # Ctrl-C reaches the whole process group; the parent alone decides, and tells the workers
    # through stop_event, so they stop between steps instead of dying mid-arm
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent_pid)
    import torch

    torch.set_num_threads(threads)
    _PROGRESS, _STOP, _PARENT_PID = progress_queue, stop_event, parent_pid
    if worker_lock is not None:
        from .integrity import shared_lock_fd

        _WORKER_LOCK_FD = shared_lock_fd(worker_lock)


def _exit_with_parent(parent_pid: int) -> None:
    """Make this process die with ``parent_pid`` (its parent): ``PR_SET_PDEATHSIG`` on Linux,
    and everywhere a watcher thread that polls the parent pid. A worker orphaned by a killed
    parent would otherwise train on, race the next run on the same files, then idle forever."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the watcher remains
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="metactl-parent-watch", daemon=True).start()


def _note(text: str) -> None:
    """One line for the user: sent to the parent from a worker, printed to stderr otherwise."""
    if _PROGRESS is not None:
        _PROGRESS.put(("note", text))
    else:
        print(f"metactl: {text}", file=sys.stderr, flush=True)


def _stop_requested() -> bool:
    if _PARENT_PID is not None and os.getppid() != _PARENT_PID:
        os._exit(1)  # the parent is gone (the watcher thread may not have run yet)
    return _STOP is not None and _STOP.is_set()


class _Interrupts:
    """While active (main thread only): the first Ctrl-C sets ``stop`` (every arm ends after its
    current step, keeping a checkpoint) and records ``interrupted``; a second one raises
    ``KeyboardInterrupt`` at once."""

    def __init__(self, stop: Any) -> None:
        self.stop = stop
        self.interrupted = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        self.stop.set()
        print("\nmetactl: interrupted, stopping every arm after its current step (their "
              "checkpoints are kept; Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _interrupted_exit(stopped: list[str]) -> KeyboardInterrupt:
    for line in stopped:
        print(f"metactl: {line}", file=sys.stderr, flush=True)
    print("metactl: stopped; run the same command again to resume", file=sys.stderr, flush=True)
    return KeyboardInterrupt()


def _run_arm_job(args: tuple) -> dict:
    from .experiment import run_arm  # here: experiment imports this module

    cfg, controller, seed, start_path = args
    return run_arm(cfg, controller, seed, start_path, progress=False)


def _run_parallel(cfg: ReproduceConfig, pending: list[tuple], progress: bool) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()  # a plain queue and event: no manager process that could outlive us
    stop = ctx.Event()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pending) * cfg.grpo.steps, desc=f"{len(pending)} runs, "
                   f"{cfg.workers} workers", unit="step")

    def drain(timeout: float) -> None:
        try:
            kind, value = q.get(timeout=timeout)
            while True:
                if kind == "step" and bar is not None:
                    bar.update(value)
                elif kind == "note":
                    (bar.write if bar is not None else print)(f"metactl: {value}",
                                                              file=sys.stderr)
                kind, value = q.get_nowait()
        except queue.Empty:
            pass

    out: dict[tuple[str, int], dict] = {}
    stopped: list[str] = []
    error: BaseException | None = None
    worker_lock = str(Path(cfg.out) / ".workers.lock")
    pool = cf.ProcessPoolExecutor(max_workers=min(cfg.workers, len(pending)), mp_context=ctx,
                                  initializer=_init_worker,
                                  initargs=(q, stop, cfg.threads_per_worker, os.getpid(),
                                            worker_lock))
    ctl = _Interrupts(stop)
    finished_cleanly = False
    try:
        with ctl:
            # the workers start during these submits: with SIGINT blocked here they inherit it
            # blocked, so a Ctrl-C to the process group cannot kill one while it starts up
            # (before _init_worker ignores it); here it stays pending until the unblock
            masked = hasattr(signal, "pthread_sigmask")
            if masked:
                old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                futures = {pool.submit(_run_arm_job, j): (j[1], j[2]) for j in pending}
            finally:
                if masked:
                    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            remaining = set(futures)
            while remaining:
                drain(0.2)
                if stop.is_set():
                    for fut in remaining:
                        fut.cancel()  # queued arms never start
                for fut in [f for f in remaining if f.done()]:
                    remaining.discard(fut)
                    if fut.cancelled():
                        continue
                    exc = fut.exception()
                    if exc is None:
                        out[futures[fut]] = fut.result()
                        if bar is not None:
                            bar.set_postfix(done=f"{len(out)}/{len(pending)}")
                    elif isinstance(exc, ArmStopped):
                        stopped.append(str(exc))
                    elif isinstance(exc, cf.process.BrokenProcessPool) and stop.is_set():
                        stopped.append(f"{futures[fut][0]} seed {futures[fut][1]}: its worker "
                                       "ended while stopping")
                    elif error is None:
                        error = exc
                        stop.set()  # the other arms stop after their current step
            drain(0)
        finished_cleanly = True
    finally:
        if not finished_cleanly:  # a second Ctrl-C, or an error here: stop the workers now
            stop.set()
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
        q.close()
    if error is not None:
        raise error
    if ctl.interrupted:
        raise _interrupted_exit(stopped)
    return out
