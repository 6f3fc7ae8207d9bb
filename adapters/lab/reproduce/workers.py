"""The worker-process machinery of the comparison: the spawn-based worker pool that runs arms in
parallel, worker start-up (threads, the shared ``<out>/.workers.lock``), dying with the parent,
Ctrl-C handling (the first stops every arm after its current step, a second at once), and
`RunControl`, the object through which a running arm reports progress and notes and sees a stop
request. Whoever runs an arm builds its `RunControl` and passes it to ``experiment.run_arm``:
the in-process loop of ``experiment.run_all_arms`` (around its Ctrl-C handler's stop event) and
each worker process (around the parent's queue and stop event); the scoreboard runs its arms
with the default control (notes on stderr, no stop) and no per-arm progress bar.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class StopSignal(Protocol):
    """What a stop request is read from: a `threading.Event` or a multiprocessing one."""

    def is_set(self) -> bool: ...


def print_note(text: str) -> None:
    """One line for the user on stderr (the default of `RunControl.on_note`)."""
    print(f"metactl: {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class RunControl:
    """How a running arm talks to whoever runs it.

    ``on_steps(n)`` is told each time ``n`` more steps are done (``None``: nobody counts, and
    the arm may draw its own progress bar); ``on_note(text)`` gets the lines meant for the user
    (resumed from a checkpoint, a result of another configuration set aside); once ``stop`` is
    set, the arm stops after its current step, keeping a checkpoint. ``parent_pid``: in a worker
    process, the parent's pid; the arm exits as soon as that parent is gone.

    Example:
        >>> import threading
        >>> done = []
        >>> control = RunControl(on_steps=done.append, stop=threading.Event())
        >>> control.steps_done(3); control.stop_requested()
        False
        >>> control.stop.set(); done, control.stop_requested()
        ([3], True)
    """

    on_steps: Callable[[int], None] | None = None
    on_note: Callable[[str], None] = print_note
    stop: StopSignal | None = None
    parent_pid: int | None = None

    def __post_init__(self) -> None:
        for name in ("on_steps", "on_note"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be callable, got {type(value).__name__}")
        if self.stop is not None and not callable(getattr(self.stop, "is_set", None)):
            raise TypeError(f"stop must have is_set(), got {type(self.stop).__name__}")
        pid = self.parent_pid
        if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid < 1):
            raise ValueError(f"parent_pid must be an int >= 1 or None, got {pid!r}")

    @property
    def counts_steps(self) -> bool:
        """Whether someone counts the steps (then the arm draws no progress bar of its own)."""
        return self.on_steps is not None

    def steps_done(self, n: int) -> None:
        """Tell the runner that ``n`` more steps are done."""
        if self.on_steps is not None:
            self.on_steps(n)

    def note(self, text: str) -> None:
        """A line for the user."""
        self.on_note(text)

    def stop_requested(self) -> bool:
        """Whether the arm must stop after its current step. In a worker whose parent is gone,
        exits at once (the watcher thread may not have run yet)."""
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            os._exit(1)
        return self.stop is not None and self.stop.is_set()


class _QueueCallbacks:
    """The callbacks of a worker's `RunControl`: steps and notes go to the parent's queue as
    ``("step", n)`` and ``("note", text)``."""

    def __init__(self, progress_queue: Any) -> None:
        self.queue = progress_queue

    def steps(self, n: int) -> None:
        self.queue.put(("step", n))

    def note(self, text: str) -> None:
        self.queue.put(("note", text))


@dataclass
class _WorkerProcess:
    """What a worker process keeps from its start-up for the arms it runs: their control, and
    the shared lock on ``<out>/.workers.lock`` (held while the process lives)."""

    control: RunControl
    lock_fd: int | None


# A worker process's own state, set once by _init_worker in that process (the pool hands the
# parent's queue and event over only at process start, so jobs cannot carry them).
_worker: _WorkerProcess | None = None


class ArmStopped(Exception):
    """An arm stopped early on request (Ctrl-C, or another arm failed); its checkpoint is kept
    and a rerun resumes it."""


def _init_worker(progress_queue: Any, stop_event: Any, threads: int, parent_pid: int,
                 worker_lock: str | None) -> None:
    global _worker
    # Ctrl-C reaches the whole process group; the parent alone decides, and tells the workers
    # through stop_event, so they stop between steps instead of dying mid-arm
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent_pid)
    import torch

    torch.set_num_threads(threads)
    callbacks = _QueueCallbacks(progress_queue)
    control = RunControl(on_steps=callbacks.steps, on_note=callbacks.note, stop=stop_event,
                         parent_pid=parent_pid)
    lock_fd = None
    if worker_lock is not None:
        from metactl.adapters.integrity import shared_lock_fd

        lock_fd = shared_lock_fd(worker_lock)
    _worker = _WorkerProcess(control, lock_fd)


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


class Interrupts:
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

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def interrupted_exit(stopped: list[str]) -> KeyboardInterrupt:
    """Print why each stopped arm stopped and how to resume; the exception to raise."""
    for line in stopped:
        print(f"metactl: {line}", file=sys.stderr, flush=True)
    print("metactl: stopped; run the same command again to resume", file=sys.stderr, flush=True)
    return KeyboardInterrupt()


def run_in_workers(cfg: Any, pending: list[tuple], progress: bool,
                   run_arm: Callable[..., dict]) -> dict:
    """Run the arms ``pending`` (``(cfg, controller, seed, start_path)`` each, ``cfg`` the
    comparison's ``experiment.ReproduceConfig``) with
    ``run_arm(cfg, controller, seed, start_path, progress=False, control=...)`` in
    ``cfg.workers`` spawned worker processes; returns ``{(controller, seed): result}``.

    ``run_arm`` must be a module-level function (it is pickled to the workers). Ctrl-C stops
    every arm after its current step and raises ``KeyboardInterrupt``; an arm's error stops the
    others the same way and is raised. ``progress``: one bar over every arm's steps."""
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
    ctl = Interrupts(stop)
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
                futures = {pool.submit(_run_arm_job, run_arm, j): (j[1], j[2]) for j in pending}
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
        raise interrupted_exit(stopped)
    return out


def _run_arm_job(run_arm: Callable[..., dict], args: tuple) -> dict:
    """One arm in a worker process, under the control its start-up built."""
    assert _worker is not None, "a worker runs its jobs after _init_worker"
    cfg, controller, seed, start_path = args
    return run_arm(cfg, controller, seed, start_path, progress=False, control=_worker.control)
