"""Runs that cannot silently lie: damaged checkpoints, results and warm-up cache entries are
detected (real files truncated, emptied, garbled, bit-flipped); resume keys ignore bookkeeping;
Ctrl-C and SIGKILL of a real two-worker comparison stop it cleanly, leave no orphan process, and
a rerun resumes to the same per-arm results as a clean run; two runs on one folder are refused."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.paths import ROOT

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

import metactl.adapters.integrity as integrity  # noqa: E402
from metactl.adapters.integrity import (  # noqa: E402
    CorruptFileError,
    OutputInUseError,
)
from metactl.adapters.lab.reproduce.experiment import (  # noqa: E402
    EvalConfig,
    ReproduceConfig,
    StartModelError,
    arm_key,
    run_arm,
    run_dir_for,
    run_experiment,
)
from metactl.adapters.reference.sft import (  # noqa: E402
    verify_entry,
    warmup_entry,
)

from tests.adapters.lab.reproduce.helpers import WARMUP, miniature_config  # noqa: E402
from tests.adapters.reference.helpers import MINI, TASK, checkpointing_trainer  # noqa: E402

ARMS = ("fixed-0.9", "tampo")
SEEDS = (0, 1)
TIMINGS = ("train_seconds", "rollout_seconds", "meta_seconds", "check_seconds", "wall_seconds",
           "resumed_from_step", "content_sha256")  # the hash covers the timings too


def mini_config(out: str, cache: str, workers: int = 2, steps: int = 80,
                checkpoint_every: int = 5) -> ReproduceConfig:
    """A four-arm comparison of a 10k-parameter model (about a second per arm)."""
    return miniature_config(out, ARMS, SEEDS, steps=steps, checkpoint_every=checkpoint_every,
                            workers=workers, cache_dir=cache)


def arm_results(out: Path) -> dict:
    """Every arm's result.json without its timings."""
    return {(c, s): {k: v for k, v in json.loads(
        (out / "runs" / c / f"seed{s}" / "result.json").read_text()).items() if k not in TIMINGS}
        for c in ARMS for s in SEEDS}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def clean(tmp_path_factory, cache) -> tuple[Path, dict, str]:
    """One uninterrupted run in this process with one worker and progress off: its folder,
    per-arm results and what it wrote to stderr."""
    out = tmp_path_factory.mktemp("clean") / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        run_experiment(mini_config(str(out), str(cache), workers=1), progress=False)
    return out, arm_results(out), err.getvalue()


# ----------------------------------------------------------------------------------------------
# the warm-up cache
# ----------------------------------------------------------------------------------------------
def _safetensors_tensor(path: Path, name: str | None = None) -> tuple[int, int]:
    """(start, end) byte offsets of one float32 tensor's data in a safetensors file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8: 8 + n])
    name = name or max((k for k in header if k != "__metadata__"),
                       key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])
    assert header[name]["dtype"] == "F32"
    lo, hi = header[name]["data_offsets"]
    return 8 + n + lo, 8 + n + hi


def _flip_bits(path: Path, mask: int) -> None:
    """XOR ``mask`` into the high byte of every float32 of the largest tensor (0x80: the sign
    bit, 0x40: the top exponent bit)."""
    raw = bytearray(path.read_bytes())
    lo, hi = _safetensors_tensor(path)
    for i in range(lo + 3, hi, 4):
        raw[i] ^= mask
    path.write_bytes(bytes(raw))


def _garble_64_bytes_at(path: Path, at: int) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:at] + bytes(b ^ 0x5A for b in raw[at: at + 64]) + raw[at + 64:])


DAMAGES = {
    "truncated-weights": lambda e: (e / "model.safetensors").write_bytes(
        (e / "model.safetensors").read_bytes()[:1000]),
    "sign-bits-flipped": lambda e: _flip_bits(e / "model.safetensors", 0x80),
    "exponent-bits-flipped": lambda e: _flip_bits(e / "model.safetensors", 0x40),
    "64-bytes-garbled": lambda e: _garble_64_bytes_at(
        e / "model.safetensors", sum(_safetensors_tensor(e / "model.safetensors")) // 2),
    "warmup.json-deleted": lambda e: (e / "warmup.json").unlink(),
    "warmup.json-emptied": lambda e: (e / "warmup.json").write_text(""),
    "config-deleted": lambda e: (e / "config.json").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_warmup_entry_is_rebuilt_with_the_same_weights(tmp_path, cache, damage):
    good = warmup_entry(TASK, MINI, WARMUP, cache_dir=cache, progress=False)
    root = tmp_path / "cache"
    shutil.copytree(good.path, root / good.path.name)
    entry = root / good.path.name
    weights = (entry / "model.safetensors").read_bytes()
    DAMAGES[damage](entry)
    with pytest.raises(CorruptFileError):
        verify_entry(entry, good.key)
    again = warmup_entry(TASK, MINI, WARMUP, cache_dir=root, progress=False)
    assert again.path == entry and again.key == good.key
    assert again.rebuilt is not None and str(entry) in again.rebuilt
    assert (entry / "model.safetensors").read_bytes() == weights  # the warm-up is deterministic
    assert again.identity == good.identity
    verify_entry(entry, good.key)
    assert warmup_entry(TASK, MINI, WARMUP, cache_dir=root, progress=False).rebuilt is None
    assert sorted(p.name for p in root.iterdir()) == [good.path.name]  # nothing left behind


def test_a_rebuilt_warmup_is_named_in_the_report_and_keeps_every_finished_arm(tmp_path, clean):
    clean_out, clean_results, _ = clean
    out, cache = tmp_path / "out", tmp_path / "cache"
    shutil.copytree(clean_out, out)
    first = json.loads((clean_out / "report.json").read_text())["start"]["warmup"]
    shutil.copytree(first["path"], cache / Path(first["path"]).name)
    _flip_bits(cache / Path(first["path"]).name / "model.safetensors", 0x80)
    run_experiment(mini_config(str(out), str(cache), workers=1), progress=False)
    start = json.loads((out / "report.json").read_text())["start"]
    assert "model.safetensors: content hash mismatch" in start["warmup"]["rebuilt"]
    assert start["warmup"]["key"] == first["key"]
    assert start["warmup"]["identity"] == first["identity"]  # the same weights again
    assert start["base"] == json.loads((clean_out / "report.json").read_text())["start"]["base"]
    # the arms' keys name the start weights by content: every finished arm is reused
    assert arm_results(out) == clean_results


def test_a_start_model_outside_the_required_range_fails_the_run(tmp_path, cache, clean):
    clean_out = clean[0]
    greedy = json.loads((clean_out / "report.json").read_text())["start"]["task_check"]["greedy"]
    assert greedy < 0.10  # the miniature warm-up is outside the real range ...
    cfg = mini_config(str(tmp_path / "out"), str(cache))
    real = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval,
                                                             start_greedy_range=(0.10, 0.60)))
    assert EvalConfig().start_greedy_range == (0.10, 0.60)  # ... which is the default
    with pytest.raises(StartModelError, match=r"outside the required 10-60%"):
        run_experiment(real, progress=False)
    assert not (tmp_path / "out" / "runs").exists()  # no arm ran
    for bad in [(0.5, 0.4), (-0.1, 0.5), (0.0, float("nan")), (0.1,)]:
        with pytest.raises(ValueError, match="start_greedy_range"):
            EvalConfig(start_greedy_range=bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# damaged run files are refused before any work
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["result-truncated", "result-garbled", "checkpoint-empty",
                                    "checkpoint-truncated"])
def test_damaged_run_files_are_refused_before_the_warmup(tmp_path, clean, damage):
    out = tmp_path / "out"
    shutil.copytree(clean[0], out)
    arm = out / "runs" / "tampo" / "seed1"
    if damage.startswith("result"):
        path = arm / "result.json"
        text = path.read_text()
        path.write_text(text[:100] if damage == "result-truncated"
                        else text.replace('"seed": 1', '"seed": 7'))
    else:
        tr = checkpointing_trainer(tmp_path / "t", steps=2, group_size=2)
        tr.train(progress_bar=False)
        path = arm / "checkpoint.pt"
        data = tr.checkpoint_path.read_bytes()
        path.write_bytes(b"" if damage == "checkpoint-empty" else data[: len(data) // 2])
    empty_cache = tmp_path / "cache"
    with pytest.raises(CorruptFileError) as info:
        run_experiment(mini_config(str(out), str(empty_cache)), progress=False)
    assert str(path) in str(info.value) and "delete it" in str(info.value)
    assert not empty_cache.exists()  # refused before the warm-up started


# ----------------------------------------------------------------------------------------------
# resume keys and superseded files
# ----------------------------------------------------------------------------------------------
def test_resume_keys_ignore_path_spelling_and_bookkeeping(tmp_path, cache, clean):
    clean_out = clean[0]
    start = json.loads((clean_out / "report.json").read_text())["start"]["warmup"]["path"]
    base = mini_config(str(clean_out), str(cache))
    link = tmp_path / "cache-link"
    link.symlink_to(cache)
    same = [
        dataclasses.replace(base, cache_dir=str(link), workers=1, threads_per_worker=2,
                            out=str(tmp_path / "elsewhere"),
                            grpo=dataclasses.replace(base.grpo, checkpoint_every=7)),
        dataclasses.replace(base, cache_dir=str(cache) + "/../" + cache.name, seeds=(1,)),
    ]
    key = arm_key(base, "tampo", 1, start)
    for cfg in same:
        assert arm_key(cfg, "tampo", 1, start) == key
    other = dataclasses.replace(base, grpo=dataclasses.replace(base.grpo, lr=2e-3))
    assert arm_key(other, "tampo", 1, start) != key
    # a rerun with the cache folder spelled another way and another checkpoint interval reuses
    # every finished arm
    out = tmp_path / "out"
    shutil.copytree(clean_out, out)
    run_experiment(dataclasses.replace(same[0], out=str(out)), progress=False)
    for c in ARMS:
        for s in SEEDS:
            a = json.loads((out / "runs" / c / f"seed{s}" / "result.json").read_text())
            b = json.loads((clean_out / "runs" / c / f"seed{s}" / "result.json").read_text())
            assert a["wall_seconds"] == b["wall_seconds"]


def test_a_checkpoint_of_another_configuration_is_kept_aside_not_deleted(tmp_path, cache,
                                                                          clean, capsys):
    cfg = mini_config(str(tmp_path / "out"), str(cache), steps=4, checkpoint_every=2)
    start = json.loads((clean[0] / "report.json").read_text())["start"]["warmup"]["path"]
    run_dir = run_dir_for(cfg, "tampo", 0)
    tr = checkpointing_trainer(run_dir, steps=2, group_size=2)
    tr.train(progress_bar=False)
    theirs = tr.checkpoint_path.read_bytes()
    (run_dir / "key.txt").write_text("0123456789abcdef")
    integrity.write_json_checked(run_dir / "result.json", {"key": "fedcba9876543210"})
    result = run_arm(cfg, "tampo", 0, start, progress=False)
    assert result["resumed_from_step"] == 0 and result["key"] == arm_key(cfg, "tampo", 0, start)
    kept = run_dir / "superseded" / "checkpoint-0123456789abcdef.pt"
    assert kept.read_bytes() == theirs
    old_result = run_dir / "superseded" / "result-fedcba9876543210.json"
    assert integrity.read_json_checked(old_result, advice="") == {"key": "fedcba9876543210"}
    said = capsys.readouterr().err
    assert str(kept) in said and str(old_result) in said


# ----------------------------------------------------------------------------------------------
# processes: real subprocesses, real signals
# ----------------------------------------------------------------------------------------------
SCRIPT = """
import sys

if __name__ == "__main__":  # not in the spawned workers, which import this file too
    sys.path.insert(0, {root!r})
    from tests.adapters.lab.reproduce.test_integrity import mini_config
    from metactl.adapters.lab.reproduce.experiment import run_experiment

    try:
        run_experiment(mini_config(*sys.argv[1:3]), progress=False)
    except KeyboardInterrupt:
        sys.exit(130)
"""


def start_run(tmp_path: Path, out: Path, cache: Path) -> subprocess.Popen:
    """``run_experiment`` of `mini_config` in a new process (and process group); its stderr
    goes to ``tmp_path / "stderr.txt"``."""
    script = tmp_path / "run_mini.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    with open(tmp_path / "stderr.txt", "w") as err:
        return subprocess.Popen([sys.executable, str(script), str(out), str(cache)],
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=err)


def wait_until_training(proc: subprocess.Popen, out: Path, timeout: float = 60) -> None:
    """Until some arm has written a checkpoint (both workers are then in their first arm)."""
    deadline = time.monotonic() + timeout
    while not list((out / "runs").glob("*/*/checkpoint.pt")):
        if proc.poll() is not None:
            raise AssertionError("the run ended early: " + (
                out.parent / "stderr.txt").read_text()[-3000:])
        assert time.monotonic() < deadline, "no arm started training"
        time.sleep(0.02)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d.name))
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_all_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while [p for p in pids if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def stopped_arms(tmp_path: Path) -> dict[tuple[str, int], int]:
    """The arms the run says it stopped, with their step; each must have kept a checkpoint."""
    err = (tmp_path / "stderr.txt").read_text()
    found = {(m[1], int(m[2])): int(m[3]) for m in re.finditer(
        r"metactl: (\S+) seed (\d+): stopped after step (\d+) of", err)}
    out = tmp_path / "out"
    for (c, s) in found:
        assert (out / "runs" / c / f"seed{s}" / "checkpoint.pt").exists()
    return found


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


@needs_proc
def test_sigint_stops_a_two_worker_run_and_a_rerun_matches_a_clean_run(tmp_path, cache, clean,
                                                                       capsys):
    out = tmp_path / "out"
    proc = start_run(tmp_path, out, cache)
    try:
        wait_until_training(proc, out)
        workers = descendants(proc.pid)
        # a second run on the same folder is refused at once, before any work
        with pytest.raises(OutputInUseError, match="in use by another run"):
            run_experiment(mini_config(str(out), str(cache)), progress=False)
        proc.send_signal(signal.SIGINT)  # the main process only
        assert proc.wait(timeout=20) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "run the same command again" in (tmp_path / "stderr.txt").read_text()
    assert wait_all_gone(workers, timeout=10) == []
    assert not (out / "report.json").exists()
    started = [d for d in (out / "runs").glob("*/*") if (d / "key.txt").exists()]
    assert len(started) < len(ARMS) * len(SEEDS)  # queued arms never started
    stopped = stopped_arms(tmp_path)  # each with its checkpoint of the step it stopped after
    assert stopped
    capsys.readouterr()
    run_experiment(mini_config(str(out), str(cache), workers=1), progress=False)
    said = capsys.readouterr().err
    for (c, s), step in stopped.items():
        assert f"{c} seed {s}: resumed at step {step} of" in said
    assert arm_results(out) == clean[1]


@needs_proc
def test_sigint_to_the_process_group_stops_every_process_promptly(tmp_path, cache, clean):
    out = tmp_path / "out"
    proc = start_run(tmp_path, out, cache)
    try:
        wait_until_training(proc, out)
        workers = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert proc.wait(timeout=20) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert wait_all_gone(workers, timeout=10) == []
    started = [d for d in (out / "runs").glob("*/*") if (d / "key.txt").exists()]
    assert len(started) < len(ARMS) * len(SEEDS)
    assert stopped_arms(tmp_path)


@needs_proc
def test_sigkill_of_the_main_process_leaves_no_worker_and_a_rerun_resumes(tmp_path, cache,
                                                                          clean):
    out = tmp_path / "out"
    proc = start_run(tmp_path, out, cache)
    workers: list[int] = []
    try:
        wait_until_training(proc, out)
        workers = descendants(proc.pid)
        assert workers
        proc.kill()
        proc.wait(timeout=10)
        assert wait_all_gone(workers, timeout=10) == []  # no orphan keeps training
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in workers:
            if alive(p):
                os.kill(p, signal.SIGKILL)
    # the lock was released with the killed process; one worker: no process start-up to wait for
    run_experiment(mini_config(str(out), str(cache), workers=1), progress=False)
    assert arm_results(out) == clean[1]
    assert not list((out / "runs").glob("*/*/.*.tmp"))  # killed writers' leftovers removed


def test_no_progress_hides_the_arm_bar_with_one_worker(clean):
    assert "GRPO" not in clean[2]  # the per-arm bar's label
