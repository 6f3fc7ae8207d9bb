"""Files a user may be handed never run code when they are read: a crafted ``checkpoint.pt`` in
a run folder (a pickle whose ``__reduce__`` calls ``exec`` or ``os.system``, in every form a
torch file can take) is refused before anything in it loads, and its payload never runs; a
checkpoint holding numpy objects (as older ones could) is refused with what to do; a warm-up
cache entry holding a pickled weight file or custom code is refused and rebuilt. An honest
checkpoint still resumes bit-identically, numpy values in its history included. A damaged
checkpoint (truncated, emptied, a weight garbled) is refused with the file named, and two writers
at once never share a temporary file."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shlex
import shutil
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import metactl.adapters.integrity as integrity  # noqa: E402
from metactl.adapters.integrity import (  # noqa: E402
    HASH_FIELD,
    CorruptFileError,
    check_torch_file,
    plain_tree,
    read_torch_checked,
    tree_sha256,
    write_json_checked,
)
from metactl.adapters.reference.sft import (  # noqa: E402
    META_FILE,
    WarmupConfig,
    verify_entry,
    warmup_entry,
)
from metactl.adapters.reference.trainer import (  # noqa: E402
    CHECKPOINT_ADVICE,
    GRPOTrainer,
    read_checkpoint,
)

from tests.adapters.reference.helpers import (  # noqa: E402
    MINI,
    TASK,
    checkpointing_trainer,
    timeless,
    train_until,
)


# ----------------------------------------------------------------------------------------------
# payloads: objects whose unpickling writes a marker file
# ----------------------------------------------------------------------------------------------
class ExecPayload:
    """Unpickles as ``exec("open(marker, 'w').write('ran')")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


class SystemPayload:
    """Unpickles as ``os.system("touch marker")`` (the reported attack)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def crafted_state(payload: object) -> dict:
    """What a crafted checkpoint looks like: the fields a resume reads, the payload hidden in
    the history, a made-up hash (it is checked only after loading)."""
    return {"step": 2, "history": [{"step": 0, "note": payload}], HASH_FIELD: "0" * 64}


def save_to(path: Path, obj: object, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path, **kwargs)


def duplicate_data_pkl(path: Path, marker: Path, honest: bytes) -> None:
    """A zip holding an honest checkpoint's entries plus a second ``archive/data.pkl`` that
    carries the payload (which entry a reader takes depends on the zip reader)."""
    evil = pickle.dumps(crafted_state(ExecPayload(marker)), protocol=2)
    with zipfile.ZipFile(io.BytesIO(honest)) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        prefix = next(n for n in src.namelist() if n.endswith("/data.pkl"))
        with pytest.warns(UserWarning, match="Duplicate name"):
            dst.writestr(prefix, evil)


def _unsafe_torch_load(path: Path) -> None:
    torch.load(path, map_location="cpu", weights_only=False)


def _unsafe_last_data_pkl(path: Path) -> None:
    with zipfile.ZipFile(path) as z:
        pickle.loads(z.read(z.infolist()[-1]))


# name -> (plant(path, marker, honest checkpoint bytes), what an unsafe reader does with it)
PLANTS: dict[str, tuple[Callable[[Path, Path, bytes], None], Callable[[Path], None]]] = {
    "exec-in-history": (lambda p, m, h: save_to(p, crafted_state(ExecPayload(m))),
                        _unsafe_torch_load),
    "os-system-in-history": (lambda p, m, h: save_to(p, crafted_state(SystemPayload(m))),
                             _unsafe_torch_load),
    "exec-at-pickle-protocol-4": (
        lambda p, m, h: save_to(p, crafted_state(ExecPayload(m)), pickle_protocol=4),
        _unsafe_torch_load),
    "exec-in-torch-legacy-format": (
        lambda p, m, h: save_to(p, crafted_state(ExecPayload(m)),
                                _use_new_zipfile_serialization=False),
        _unsafe_torch_load),
    "plain-pickle-file": (
        lambda p, m, h: p.write_bytes(pickle.dumps(crafted_state(ExecPayload(m)))),
        lambda p: pickle.loads(p.read_bytes())),
    "second-data.pkl-beside-an-honest-one": (duplicate_data_pkl, _unsafe_last_data_pkl),
}


@pytest.fixture(scope="module")
def honest_checkpoint(tmp_path_factory) -> bytes:
    """The bytes of a real checkpoint after two steps."""
    run_dir = tmp_path_factory.mktemp("honest")
    tr = checkpointing_trainer(run_dir, steps=2)
    tr.train(progress_bar=False)
    return tr.checkpoint_path.read_bytes()


# ----------------------------------------------------------------------------------------------
# crafted checkpoints
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("plant", list(PLANTS))
def test_a_crafted_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, plant,
                                                                     honest_checkpoint):
    run_dir, marker = tmp_path / "run", tmp_path / "payload-ran"
    ckpt = run_dir / "checkpoint.pt"
    run_dir.mkdir()
    write, unsafe_read = PLANTS[plant]
    write(ckpt, marker, honest_checkpoint)
    with pytest.raises(CorruptFileError, match="delete it to restart") as info:
        checkpointing_trainer(run_dir)  # the trainer resumes from its run folder's checkpoint
    assert not marker.exists()
    assert str(ckpt) in str(info.value)
    with pytest.raises(CorruptFileError):
        read_checkpoint(ckpt)
    assert not marker.exists()
    # the plant is live: a reader that unpickles it as before runs the payload
    unsafe_read(ckpt)
    assert marker.exists()


@pytest.mark.parametrize("payload", [ExecPayload, SystemPayload])
def test_the_refusal_names_the_smuggled_function_and_says_nothing_ran(tmp_path, payload):
    ckpt, marker = tmp_path / "checkpoint.pt", tmp_path / "payload-ran"
    save_to(ckpt, crafted_state(payload(marker)))
    with pytest.raises(CorruptFileError) as info:
        read_checkpoint(ckpt)
    # (a protocol-2 pickle spells the builtins module by its Python 2 name)
    named = r"(builtins|__builtin__)\.exec" if payload is ExecPayload else r"(posix|os)\.system"
    assert re.search(named, str(info.value))
    assert "refused unread and nothing in it ran" in str(info.value)
    assert info.value.path == ckpt
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
@pytest.mark.parametrize("plant", ["exec-in-history", "os-system-in-history",
                                   "exec-at-pickle-protocol-4", "exec-in-torch-legacy-format"])
def test_without_the_opcode_check_torchs_safe_load_still_refuses(tmp_path, monkeypatch, plant,
                                                                 honest_checkpoint):
    """The two layers are independent: with `check_torch_file` disabled, the load itself
    (``weights_only=True``) refuses the payload."""
    ckpt, marker = tmp_path / "checkpoint.pt", tmp_path / "payload-ran"
    PLANTS[plant][0](ckpt, marker, honest_checkpoint)
    monkeypatch.setattr(integrity, "check_torch_file", lambda path, *, advice: None)
    with pytest.raises(CorruptFileError, match="does not load"):
        read_checkpoint(ckpt)
    assert not marker.exists()


def test_a_checkpoint_holding_numpy_objects_is_refused_with_what_to_do(tmp_path):
    """A checkpoint written before values were stored plainly could hold numpy scalars; it
    cannot be loaded without importing and calling what it names, so it is refused (never
    loaded unsafely), and the message says how to go on."""
    run_dir = tmp_path / "run"
    tr = checkpointing_trainer(run_dir, steps=2)
    tr.train(progress_bar=False)
    state = read_checkpoint(tr.checkpoint_path)
    state["history"][0]["reward"] = np.float64(state["history"][0]["reward"])
    state["evals"] = [{"step": 2, "avg": np.float32(0.25)}]
    state[HASH_FIELD] = tree_sha256(state)  # an intact file, as the old writer produced it
    torch.save(state, tr.checkpoint_path)
    with pytest.raises(CorruptFileError) as info:
        checkpointing_trainer(run_dir, steps=2)
    message = str(info.value)
    assert "numpy" in message and "cannot be read safely" in message
    assert message.endswith(CHECKPOINT_ADVICE)


@pytest.mark.parametrize("missing", ["model", "rng_sampling"])
def test_a_checkpoint_without_a_field_a_resume_needs_is_refused(tmp_path, missing):
    tr = checkpointing_trainer(tmp_path, steps=2)
    tr.train(progress_bar=False)
    state = read_checkpoint(tr.checkpoint_path)
    del state[missing]
    state[HASH_FIELD] = tree_sha256(state)
    torch.save(state, tr.checkpoint_path)
    with pytest.raises(CorruptFileError, match=f"lacks the field.*{missing}"):
        read_checkpoint(tr.checkpoint_path)


# ----------------------------------------------------------------------------------------------
# honest checkpoints
# ----------------------------------------------------------------------------------------------
def numpy_evaluator(model, step: int) -> dict:
    """An evaluator returning numpy values, as users' evaluators do."""
    return {"score": np.float64(step / 7), "n": np.int64(step), "name": np.str_(f"s{step}"),
            "per_length": np.arange(3, dtype=np.float32) / 3, "ok": np.bool_(step % 2 == 0)}


def test_an_honest_checkpoint_resumes_bit_identically(tmp_path):
    full = checkpointing_trainer(tmp_path / "full", steps=4, evaluator=numpy_evaluator)
    full.train(progress_bar=False)

    part = checkpointing_trainer(tmp_path / "part", steps=4, evaluator=numpy_evaluator)
    train_until(part, 1)  # two steps done; the checkpoint of step 2 is on disk
    ckpt = part.checkpoint_path
    check_torch_file(ckpt, advice="x")  # only tensors, storages, dtypes and plain data
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)  # torch's safe load reads it
    assert raw[HASH_FIELD] == tree_sha256({k: v for k, v in raw.items() if k != HASH_FIELD})
    # numpy values were stored as the same Python values
    saved_eval = raw["evals"][-1]
    assert saved_eval == {"step": 2, "score": 2 / 7, "n": 2, "name": "s2",
                          "per_length": [float(x) for x in np.arange(3, dtype=np.float32) / 3],
                          "ok": True}
    assert [type(v) for v in saved_eval.values()] == [int, float, int, str, list, bool]

    resumed = checkpointing_trainer(tmp_path / "part", steps=4, evaluator=numpy_evaluator)
    assert resumed.step_idx == 2
    resumed.train(progress_bar=False)

    assert timeless(resumed.history) == timeless(full.history)
    assert plain_tree(resumed.evals) == plain_tree(full.evals)
    assert resumed.policy.state_dict() == full.policy.state_dict()
    assert resumed.rng.bit_generator.state == full.rng.bit_generator.state
    assert torch.equal(resumed.generator.get_state(), full.generator.get_state())
    pairs = zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True)
    for (name, a), b in pairs:
        assert torch.equal(a, b), name
    for a, b in zip(full.optimizer.state_dict()["state"].values(),
                    resumed.optimizer.state_dict()["state"].values(), strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    # both final checkpoints hold the same content (but for the timings)
    assert timeless(read_checkpoint(full.checkpoint_path)["history"]) == \
        timeless(read_checkpoint(resumed.checkpoint_path)["history"])


def test_saving_something_a_safe_load_cannot_read_back_names_the_field(tmp_path):
    tr = checkpointing_trainer(tmp_path, steps=2, evaluator=lambda model, step: {"bad": {1, 2}})
    with pytest.raises(TypeError, match=r"checkpoint\['evals'\]\[0\]\['bad'\] is a builtins.set"):
        tr.train(progress_bar=False)
    assert not tr.checkpoint_path.exists()


def test_plain_tree_keeps_values_and_refuses_what_needs_code_to_load():
    state = {"a": np.float64(0.1), np.str_("k"): [np.int32(-3), (np.float32(0.7), None)],
             "m": np.arange(4, dtype=np.float64).reshape(2, 2), "t": torch.arange(3),
             "big": 2**100, "nan": float("nan")}
    plain = plain_tree(state)
    assert plain["a"] == 0.1 and type(plain["a"]) is float
    assert list(plain) == ["a", "k", "m", "t", "big", "nan"] and type(list(plain)[1]) is str
    assert plain["k"] == [-3, (float(np.float32(0.7)), None)]
    assert plain["m"] == [[0.0, 1.0], [2.0, 3.0]]
    assert plain["t"] is state["t"] and plain["big"] == 2**100
    buffer = io.BytesIO()
    torch.save(plain, buffer, pickle_protocol=integrity.TORCH_PICKLE_PROTOCOL)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=True)
    assert tree_sha256(again) == tree_sha256(plain)
    for bad, where in [({"x": b"raw"}, r"state\['x'\] is a builtins.bytes"),
                       ({"x": [np.array(["a"])]}, r"state\['x'\]\[0\] is a numpy <U1"),
                       ({"x": 1j}, "builtins.complex"), ({"x": object()}, "builtins.object")]:
        with pytest.raises(TypeError, match=where):
            plain_tree(bad)


def test_read_torch_checked_still_checks_the_hash_after_a_safe_load(tmp_path):
    path = tmp_path / "s.pt"
    state = plain_tree({"w": torch.ones(3), "n": 1})
    torch.save({**state, HASH_FIELD: tree_sha256(state)}, path)
    assert read_torch_checked(path, advice="x")["n"] == 1
    torch.save({**state, "n": 2, HASH_FIELD: tree_sha256(state)}, path)
    with pytest.raises(CorruptFileError, match="content hash mismatch"):
        read_torch_checked(path, advice="x")


# ----------------------------------------------------------------------------------------------
# the warm-up cache
# ----------------------------------------------------------------------------------------------
WARMUP = WarmupConfig(steps=2, batch_size=8)


@pytest.fixture(scope="module")
def good_entry(tmp_path_factory):
    return warmup_entry(TASK, MINI, WARMUP, cache_dir=tmp_path_factory.mktemp("cache"),
                        progress=False)


def _pickled_weights(entry: Path, marker: Path) -> set[str]:
    (entry / "model.safetensors").unlink()
    torch.save({"weight": ExecPayload(marker)}, entry / "pytorch_model.bin")
    return {"pytorch_model.bin"}


def _custom_code(entry: Path, marker: Path) -> set[str]:
    (entry / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((entry / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (entry / "config.json").write_text(json.dumps(config))
    return {"modeling_evil.py", "config.json"}


def _auto_map_only(entry: Path, marker: Path) -> set[str]:
    config = json.loads((entry / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["someone/else--tokenization.Evil", None]}
    (entry / "tokenizer_config.json").write_text(json.dumps(config))
    return {"tokenizer_config.json"}


CACHE_PLANTS = {"pickled-weights": _pickled_weights, "custom-code": _custom_code,
                "auto-map-only": _auto_map_only}


@pytest.mark.parametrize("plant", list(CACHE_PLANTS))
def test_a_crafted_warmup_entry_is_refused_and_rebuilt_unloaded(tmp_path, good_entry, plant):
    """The crafted entry's ``warmup.json`` lists its files with their true hashes (anyone can
    compute them), so only the check of what the files are catches it."""
    root, marker = tmp_path / "cache", tmp_path / "payload-ran"
    entry = root / good_entry.path.name
    shutil.copytree(good_entry.path, entry)
    planted = CACHE_PLANTS[plant](entry, marker)
    meta = json.loads((entry / META_FILE).read_text())
    del meta[HASH_FIELD]
    meta["files"] = {p.name: integrity.sha256_file(p)
                     for p in sorted(entry.iterdir()) if p.name != META_FILE}
    write_json_checked(entry / META_FILE, meta, indent=2)
    with pytest.raises(CorruptFileError) as info:
        verify_entry(entry, good_entry.key)
    assert info.value.path.parent == entry and info.value.path.name in planted
    again = warmup_entry(TASK, MINI, WARMUP, cache_dir=root, progress=False)
    assert again.rebuilt is not None and str(info.value.path) in again.rebuilt
    assert again.identity == good_entry.identity  # the honest weights again
    assert sorted(p.name for p in entry.iterdir()) == sorted(
        p.name for p in good_entry.path.iterdir())
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# damaged checkpoints and concurrent writers
# ----------------------------------------------------------------------------------------------
def two_step_trainer(run_dir: Path) -> GRPOTrainer:
    return checkpointing_trainer(run_dir, steps=2, group_size=2)


def garble_64_bytes_of_a_weight(path: Path, weight: torch.Tensor) -> None:
    """Overwrite 64 bytes inside ``weight``'s data where it is stored in ``path``."""
    raw = path.read_bytes()
    needle = weight.detach().contiguous().numpy().tobytes()
    at = raw.find(needle)
    assert at >= 0 and len(needle) >= 128
    patch = bytes((b ^ 0x5A) for b in raw[at + 32: at + 96])
    path.write_bytes(raw[: at + 32] + patch + raw[at + 96:])


@pytest.mark.parametrize("damage", ["truncate", "empty", "garble-weight"])
def test_a_damaged_checkpoint_is_refused_with_the_file_named(tmp_path, damage):
    tr = two_step_trainer(tmp_path)
    tr.train(progress_bar=False)
    ckpt = tr.checkpoint_path
    assert ckpt.exists()
    if damage == "truncate":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif damage == "empty":
        ckpt.write_bytes(b"")
    else:
        garble_64_bytes_of_a_weight(ckpt, tr.model.state_dict()["model.embed_tokens.weight"])
    with pytest.raises(CorruptFileError, match="delete it to restart") as info:
        two_step_trainer(tmp_path)
    assert str(ckpt) in str(info.value)


def test_two_checkpoint_writers_at_once_never_share_a_temporary_file(tmp_path, monkeypatch):
    a, b = two_step_trainer(tmp_path), two_step_trainer(tmp_path)
    both_writing = threading.Barrier(2, timeout=20)
    real_save = torch.save

    def save_when_both_write(obj, f, *args, **kwargs):
        both_writing.wait()  # both writers are now between opening their file and renaming it
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_when_both_write)
    errors: list[BaseException] = []

    def save(tr):
        try:
            tr.save_checkpoint()
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(t,)) for t in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    assert errors == []
    assert two_step_trainer(tmp_path).step_idx == 0  # the checkpoint on disk loads and verifies
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
