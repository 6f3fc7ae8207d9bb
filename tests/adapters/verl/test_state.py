"""The verl adapter's checkpoint file (``metactl_state.json``): the policy's state and the
bounded ``meta_history``, written atomically and durably, every field validated on read, a
rejected file changing nothing. Needs no verl."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from metactl.adapters.verl import META_HISTORY_LIMIT, META_STATE_NAME
from metactl.adapters.verl.state import (
    STATE_FORMAT,
    meta_state,
    read_meta_state,
    write_meta_state,
)

import metactl


def _policy() -> metactl.MetaPolicy:
    return metactl.MetaPolicy([0.7, 1.0], metactl.EXP3(), seed=0)


def _entry(step: int) -> dict[str, Any]:
    return {"global_step": step, "policy_step": step, "temperatures": [0.7], "probs": [0.5, 0.5]}


def _stepped() -> metactl.MetaPolicy:
    policy = _policy()
    for reward in (1.0, 0.0, 1.0):
        policy.update(policy.select(), reward=reward)
    return policy


def test_state_round_trip_restores_policy_and_history(tmp_path: Path) -> None:
    policy = _stepped()
    history = [_entry(i) for i in range(3)]
    path = tmp_path / META_STATE_NAME
    write_meta_state(path, meta_state(policy, history))
    restored, entries = read_meta_state(path, _policy())
    assert restored.state_dict() == policy.state_dict()
    assert entries == history
    assert restored.select().index == policy.select().index  # the RNG came back too


def test_history_is_bounded_to_the_documented_limit() -> None:
    history = [_entry(i) for i in range(META_HISTORY_LIMIT + 5)]
    state = meta_state(_policy(), history)
    assert state["format"] == STATE_FORMAT
    assert [e["global_step"] for e in state["history"]] == list(range(5, META_HISTORY_LIMIT + 5))


def test_format_1_files_still_load_with_an_empty_history(tmp_path: Path) -> None:
    policy = _stepped()
    path = tmp_path / META_STATE_NAME
    path.write_text(json.dumps({"format": 1, "policy": policy.state_dict()}))
    restored, entries = read_meta_state(path, _policy())
    assert restored.state_dict() == policy.state_dict() and entries == []


def _state(**changes: Any) -> dict[str, Any]:
    state = meta_state(_stepped(), [_entry(1)])
    state.update(changes)
    return state


@pytest.mark.parametrize(
    ("state", "match"),
    [
        (_state(format=True), "format must be an int version"),
        (_state(format=1.0), "format must be an int version"),
        (_state(format="2"), "format must be an int version"),
        (_state(format=3), "format must be one of"),
        ([1, 2], "JSON object"),
        ({"format": 2, "policy": {}}, "keys"),
        (_state(extra=1), "keys"),
        (_state(history={}), "history must be a list"),
        (_state(history=[_entry(1)] * (META_HISTORY_LIMIT + 1)), "more than the"),
        (_state(history=[{"global_step": 1}]), r"history\[0\] must be an object"),
        (_state(history=[{**_entry(1), "global_step": True}]), r"history\[0\]\.global_step"),
        (_state(history=[{**_entry(1), "probs": [1.0]}]), r"history\[0\]\.probs must hold 2"),
        (_state(history=[{**_entry(1), "temperatures": ["x"]}]), r"temperatures\[0\]"),
        (_state(policy={"rule": "nope"}), "not a valid metactl state"),
    ],
)
def test_bad_states_are_refused_naming_the_file(tmp_path: Path, state: Any, match: str) -> None:
    path = tmp_path / META_STATE_NAME
    path.write_text(json.dumps(state))
    policy = _policy()
    before = policy.state_dict()
    with pytest.raises(ValueError, match=match) as error:
        read_meta_state(path, policy)
    assert str(path) in str(error.value)
    assert policy.state_dict() == before


def test_missing_and_garbled_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="resuming would restart"):
        read_meta_state(tmp_path / META_STATE_NAME, _policy())
    path = tmp_path / META_STATE_NAME
    path.write_text('{"format": 2, "pol')
    with pytest.raises(ValueError, match="not a valid metactl state"):
        read_meta_state(path, _policy())


def test_write_fsyncs_the_file_and_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    path = tmp_path / META_STATE_NAME
    write_meta_state(path, meta_state(_policy(), []))
    assert len(synced) == 2
    assert Path(synced[0]).parent == tmp_path.resolve()  # the temporary file, before the rename
    assert synced[0].endswith(".tmp")
    assert synced[1] == str(tmp_path.resolve())  # the folder, after it
    assert sorted(p.name for p in tmp_path.iterdir()) == [META_STATE_NAME]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / META_STATE_NAME
    write_meta_state(path, meta_state(_policy(), [_entry(1)]))
    before = path.read_bytes()
    with pytest.raises(ValueError, match="JSON compliant"):
        write_meta_state(path, {"format": 2, "policy": float("nan")})

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_meta_state(path, meta_state(_stepped(), [_entry(2)]))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [META_STATE_NAME]
