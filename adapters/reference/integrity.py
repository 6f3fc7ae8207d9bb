"""Files a run can trust: atomic writes, content hashes checked on load, and the output lock.

Every file a comparison resumes from (a run's ``checkpoint.pt`` and ``result.json``, a warm-up
cache entry) is written to a temporary file with a unique name in the target's folder, flushed to
disk and renamed into place, so a reader sees the old file or the new one, never half of one, and
two writers never share a temporary file. Each carries a SHA-256 of its content, checked when it
is read back: a truncated, emptied or garbled file raises `CorruptFileError`, whose message names
the file and what to do about it, instead of loading wrong numbers or failing deep inside a
library.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> write_json_checked(folder / "result.json", {"pass1": 0.5})
    >>> read_json_checked(folder / "result.json", advice="delete it")["pass1"]
    0.5
    >>> _ = (folder / "result.json").write_text('{"pass1": 0.9, "content_sha256": "00"}')
    >>> read_json_checked(folder / "result.json", advice="delete it")
    Traceback (most recent call last):
    ...
    metactl.adapters.reference.integrity.CorruptFileError: ...result.json: content hash mismatch...
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

HASH_FIELD = "content_sha256"  # the key under which a JSON file or a checkpoint stores its hash


class RunRefusedError(RuntimeError):
    """A comparison cannot go on; the message says why and what to do (the CLI prints it)."""


class CorruptFileError(RunRefusedError):
    """A file does not hold what was written there (truncated, emptied, garbled, or no hash)."""

    def __init__(self, path: str | os.PathLike, problem: str, advice: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}; {advice}")


class OutputInUseError(RunRefusedError):
    """Another process holds the lock of an output folder."""


# ----------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------
def temp_prefix(path: Path) -> str:
    """Prefix of the temporary files `atomic_write` makes for ``path`` (``.<name>.``)."""
    return f".{path.name}."


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through ``write(file)`` into a uniquely named temporary file in the same
    folder, fsync it and rename it into place (then fsync the folder, so the rename survives a
    power cut). On any error the temporary file is removed and ``path`` is unchanged."""
    target = Path(path)
    if not target.name:
        raise ValueError(f"path must name a file, got {str(path)!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`atomic_write` of a bytes object."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    atomic_write(path, lambda f: f.write(data))


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (renames) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(folder: str | os.PathLike, name: str) -> int:
    """Delete temporary files `atomic_write` left for ``folder/name`` (a writer that was killed
    before its rename). Only safe while no other process writes there (hold the output lock).
    Returns how many were removed."""
    root = Path(folder)
    if not root.is_dir():
        return 0
    n = 0
    for p in root.glob(f"{temp_prefix(root / name)}*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n += 1
    return n


# ----------------------------------------------------------------------------------------------
# hashes
# ----------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def json_sha256(obj: Any) -> str:
    """SHA-256 of the canonical JSON text of ``obj`` (sorted keys, no spaces)."""
    return hashlib.sha256(_canonical_json(obj).encode()).hexdigest()


def tree_sha256(obj: Any) -> str:
    """SHA-256 of a nested structure of dicts, lists, tuples, scalars, strings, numpy arrays and
    torch tensors (dtype, shape and raw bytes of each array): the same value after a round trip
    through ``torch.save``/``torch.load``, and a different one when any element changed.

    Raises ``TypeError`` for any other type (its content could not be hashed reproducibly).
    """
    h = hashlib.sha256()
    _hash_into(h, obj)
    return h.hexdigest()


def _tag(h: Any, tag: bytes, payload: bytes = b"") -> None:
    h.update(tag + struct.pack("<Q", len(payload)) + payload)


def _hash_into(h: Any, obj: Any) -> None:
    if obj is None:
        _tag(h, b"N")
    elif isinstance(obj, bool):
        _tag(h, b"B", b"1" if obj else b"0")
    elif isinstance(obj, int):
        _tag(h, b"I", str(obj).encode())
    elif isinstance(obj, float):
        _tag(h, b"F", obj.hex().encode() if math.isfinite(obj) else repr(obj).encode())
    elif isinstance(obj, str):
        _tag(h, b"S", obj.encode("utf-8", "surrogatepass"))
    elif isinstance(obj, bytes | bytearray):
        _tag(h, b"Y", bytes(obj))
    elif isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            kh = hashlib.sha256()
            _hash_into(kh, k)
            items.append((kh.digest(), v))
        items.sort(key=lambda kv: kv[0])
        _tag(h, b"D", str(len(items)).encode())
        for kd, v in items:
            h.update(kd)
            _hash_into(h, v)
    elif isinstance(obj, list | tuple):
        _tag(h, b"L", str(len(obj)).encode())
        for v in obj:
            _hash_into(h, v)
    elif isinstance(obj, np.ndarray | np.generic):
        arr = np.ascontiguousarray(np.asarray(obj))
        if arr.dtype.hasobject:
            raise TypeError("tree_sha256 cannot hash numpy arrays of Python objects")
        _tag(h, b"A", f"{arr.dtype.str}{arr.shape}".encode())
        _tag(h, b"a", arr.tobytes())
    elif type(obj).__module__.startswith("torch") and hasattr(obj, "untyped_storage"):
        import torch

        t = obj.detach().cpu().contiguous()
        if t.is_sparse or t.is_quantized:
            raise TypeError("tree_sha256 cannot hash sparse or quantized tensors")
        _tag(h, b"T", f"{t.dtype}{tuple(t.shape)}".encode())
        raw = t.reshape(-1).view(torch.uint8).numpy()
        _tag(h, b"t", raw.tobytes())
    else:
        raise TypeError(f"tree_sha256 cannot hash a {type(obj).__module__}.{type(obj).__name__}")


# ----------------------------------------------------------------------------------------------
# JSON files that carry their own hash
# ----------------------------------------------------------------------------------------------
def write_json_checked(path: str | os.PathLike, obj: dict, *, indent: int | None = None) -> None:
    """Atomically write ``obj`` as JSON with its content hash stored under `HASH_FIELD`."""
    if not isinstance(obj, dict):
        raise TypeError(f"obj must be a dict, got {type(obj).__name__}")
    if HASH_FIELD in obj:
        raise ValueError(f"obj must not have a {HASH_FIELD!r} key (it is added here)")
    plain = json.loads(json.dumps(obj))  # the value a reader gets back (tuples -> lists, ...)
    text = json.dumps({**plain, HASH_FIELD: json_sha256(plain)}, indent=indent)
    atomic_write_bytes(path, text.encode())


def read_json_checked(path: str | os.PathLike, *, advice: str,
                      require_hash: bool = True) -> dict:
    """Read a file written by `write_json_checked` and check its hash.

    Raises `CorruptFileError` (message: the file, what is wrong with it, then ``advice``) when
    it is empty, not JSON (truncated or garbled), not an object, or its hash does not match;
    with ``require_hash`` also when it has no hash. ``FileNotFoundError`` when it is missing.
    Returns the object without the hash field.
    """
    p = Path(path)
    raw = p.read_bytes()
    if not raw.strip():
        raise CorruptFileError(p, "empty file", advice)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(p, f"not valid JSON, truncated or garbled ({exc})", advice) \
            from None
    if not isinstance(obj, dict):
        raise CorruptFileError(p, f"holds a JSON {type(obj).__name__}, not an object", advice)
    stored = obj.pop(HASH_FIELD, None)
    if stored is None:
        if require_hash:
            raise CorruptFileError(p, "has no content hash (written by hand or by an older "
                                      "metactl)", advice)
        return obj
    if stored != json_sha256(obj):
        raise CorruptFileError(p, "content hash mismatch (the file was changed or damaged "
                                  "after it was written)", advice)
    return obj


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`atomic_write` of a UTF-8 text."""
    atomic_write_bytes(path, text.encode())


# ----------------------------------------------------------------------------------------------
# the output folder's lock
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on ``path`` (created if missing; the holder's
    pid is written into it) for the ``with`` block. The kernel releases it when the holder exits,
    killed or not. Raises `OutputInUseError` naming ``what`` when another process holds it.
    A no-op on systems without ``fcntl``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock_path = Path(path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise OutputInUseError(
                f"{what} is in use by another run (pid {holder}, lock {lock_path}); wait for it "
                "to finish or stop it, or choose another output folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def shared_lock_fd(path: str | os.PathLike) -> int:
    """Take a shared ``flock`` on ``path`` (blocking) and return the open descriptor; the lock
    lasts until the descriptor is closed or the process exits. Worker processes hold one on
    their run's worker lock, so a new run can tell when the old run's workers are all gone.
    Without ``fcntl`` (Windows) the descriptor is returned unlocked."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return fd
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def wait_exclusive(path: str | os.PathLike, timeout: float, what: str) -> None:
    """Wait up to ``timeout`` seconds until no process holds any ``flock`` on ``path`` (the
    workers of an earlier run that are still exiting), then return; `OutputInUseError` if they
    are still there. A no-op without ``fcntl`` (Windows)."""
    import time

    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OutputInUseError(
                        f"{what}: worker processes of an earlier run still hold {path} after "
                        f"{timeout:.0f} s; stop them (they are children of a run that no longer "
                        "exists) and run again") from None
                time.sleep(0.1)
    finally:
        os.close(fd)
