"""``metactl.adapters.integrity``, the file integrity every adapter shares: its examples, an
atomic write that fails leaves the old file and no temporary, a damaged JSON file is named in one
error, and the tree hash sees every element and survives ``torch.save``."""

from __future__ import annotations

import doctest
import json

import pytest

torch = pytest.importorskip("torch")

import metactl.adapters.integrity as integrity  # noqa: E402
from metactl.adapters.integrity import CorruptFileError  # noqa: E402


def test_integrity_docstring_examples():
    assert doctest.testmod(integrity, optionflags=doctest.ELLIPSIS).failed == 0


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    integrity.write_json_checked(target, {"a": 1})

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        integrity.atomic_write(target, fail)
    assert integrity.read_json_checked(target, advice="x") == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


@pytest.mark.parametrize("damage", ["truncate", "empty", "garble", "no-hash", "not-object"])
def test_a_damaged_json_file_raises_one_error_naming_it(tmp_path, damage):
    path = tmp_path / "result.json"
    integrity.write_json_checked(path, {"final": {"avg": {"pass1": 0.563}}, "steps": [1, 2]})
    text = path.read_text()
    path.write_text({"truncate": text[: len(text) // 2], "empty": "",
                     "garble": text.replace("0.563", "0.041"),
                     "no-hash": json.dumps({"final": 1}), "not-object": "[1, 2]"}[damage])
    with pytest.raises(CorruptFileError, match="delete it") as info:
        integrity.read_json_checked(path, advice="delete it")
    assert str(path) in str(info.value)


def test_tree_hash_sees_every_element_and_survives_torch_save(tmp_path):
    state = {"w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), 3: [1.5, None, (True,)],
             "rng": {"state": 2**100, "name": "PCG64"}, "s": torch.tensor(7)}
    torch.save(state, tmp_path / "s.pt")
    again = torch.load(tmp_path / "s.pt", weights_only=True)  # as checkpoints are read
    assert integrity.tree_sha256(again) == integrity.tree_sha256(state)
    again["w"][1, 2] = -again["w"][1, 2]
    assert integrity.tree_sha256(again) != integrity.tree_sha256(state)
    with pytest.raises(TypeError, match="cannot hash"):
        integrity.tree_sha256({"f": object()})
