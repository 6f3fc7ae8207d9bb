"""Files a run can trust: atomic writes, content hashes checked on load, and the output lock.

Every file a comparison resumes from (a run's ``checkpoint.pt`` and ``result.json``, a warm-up
cache entry) is written to a temporary file with a unique name in the target's folder, flushed to
disk and renamed into place, so a reader sees the old file or the new one, never half of one, and
two writers never share a temporary file. Each carries a SHA-256 of its content, checked when it
is read back: a truncated, emptied or garbled file raises `CorruptFileError`, whose message names
the file and what to do about it, instead of loading wrong numbers or failing deep inside a
library.

A torch file (a checkpoint) is a pickle, and unpickling can run any function the file names, so
a run folder someone hands over could run code when it is resumed. `read_torch_checked` never
lets that happen: it first reads the pickle's opcodes without executing them (`check_torch_file`)
and refuses any file that names anything but tensors, storages and dtypes, then loads it with
``torch.load(weights_only=True)``, and only then checks the content hash. `plain_tree` turns
what a writer stores into values such a load reads back exactly.

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
    metactl.adapters.integrity.CorruptFileError: ...result.json: content hash mismatch...
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickletools
import re
import struct
import tempfile
import zipfile
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
# torch files read without running code
# ----------------------------------------------------------------------------------------------
# torch.save's default protocol, pinned by writers: `check_torch_file` accepts what it writes
TORCH_PICKLE_PROTOCOL = 2

# The opcodes a protocol-2 pickle of dicts, lists, tuples, numbers, strings and tensors uses.
# Left out on purpose: the ones that import or build objects other than through a ``GLOBAL``
# this module checks (STACK_GLOBAL, INST, OBJ, NEWOBJ, NEWOBJ_EX, EXT1/2/4, BUILD, PERSID), and
# bytes, sets and buffers, which such a file never holds.
_DATA_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP", "NONE", "NEWTRUE", "NEWFALSE",
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE",
    "BINUNICODE8", "EMPTY_LIST", "APPEND", "APPENDS", "LIST", "EMPTY_TUPLE", "TUPLE", "TUPLE1",
    "TUPLE2", "TUPLE3", "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "GET", "BINGET",
    "LONG_BINGET", "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE",
    "GLOBAL",  # checked against `_torch_global_allowed`
    "REDUCE",  # calls what a checked GLOBAL (or torch's storage loader) put on the stack
    "BINPERSID",  # a tensor's storage, resolved by torch's loader
})
_TORCH_REBUILDERS = frozenset({"_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter"})
_STORAGE_NAME = re.compile(r"[A-Za-z0-9_]+Storage")


def _torch_global_allowed(module: str, name: str) -> bool:
    """Whether a pickle ``GLOBAL`` is one that `torch.save` writes for tensors: the tensor and
    parameter rebuilders, a storage class, a dtype, or ``collections.OrderedDict`` (a module's
    ``state_dict``). Looked up in the modules' ``__dict__``, so nothing is imported."""
    if (module, name) == ("collections", "OrderedDict"):
        return True
    if module == "torch._utils":
        return name in _TORCH_REBUILDERS
    if module == "torch.storage":
        return name == "UntypedStorage"
    if module != "torch":
        return False
    import torch

    obj = vars(torch).get(name)
    if isinstance(obj, torch.dtype):
        return True
    return (_STORAGE_NAME.fullmatch(name) is not None and isinstance(obj, type)
            and issubclass(obj, torch.storage.TypedStorage | torch.storage.UntypedStorage))


def check_torch_file(path: str | os.PathLike, *, advice: str) -> None:
    """Refuse a torch file whose loading could run code, before anything in it is loaded.

    Reads the file as the zip archive `torch.save` writes and walks its pickle's opcodes with
    `pickletools.genops` (which parses, never executes): every object the pickle names must be a
    tensor rebuilder, a storage, a dtype or ``OrderedDict`` (`_torch_global_allowed`), and every
    opcode one that builds plain data. Raises `CorruptFileError` (the file, the problem, then
    ``advice``) for an empty, truncated or garbled file, torch's legacy non-zip format, an
    archive not laid out as `torch.save` lays it out, or a pickle naming anything else (for
    instance ``builtins.exec`` or ``posix.system``: a crafted file; or numpy objects)."""
    p = Path(path)
    if p.stat().st_size == 0:
        raise CorruptFileError(p, "empty file", advice)
    try:
        with zipfile.ZipFile(p) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1 or len(set(names)) != len(names):
                raise CorruptFileError(
                    p, "is not laid out as torch.save writes a file (one data.pkl, no repeated "
                       "entries); it was not loaded", advice)
            prefix = pickles[0][: -len("data.pkl")]
            if not all(n.startswith(prefix) for n in names):
                raise CorruptFileError(
                    p, "is not laid out as torch.save writes a file (entries outside its "
                       f"{prefix!r} folder); it was not loaded", advice)
            data = archive.read(pickles[0])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
        raise CorruptFileError(
            p, f"not a torch zip archive: truncated, garbled, or torch's legacy format "
               f"({type(exc).__name__}: {exc}); it was not loaded", advice) from None
    names_seen: set[str] = set()
    opcodes_seen: set[str] = set()
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name not in _DATA_OPCODES:
                opcodes_seen.add(op.name)
            elif op.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                if not _torch_global_allowed(module, name):
                    names_seen.add(f"{module}.{name}")
    except (ValueError, EOFError) as exc:  # genops: an unknown opcode, data cut short
        raise CorruptFileError(p, f"its pickle is truncated or garbled ({exc}); it was not "
                                  "loaded", advice) from None
    if not names_seen and not opcodes_seen:
        return
    listed = ", ".join(sorted(names_seen))
    # numpy scalars and arrays pickle as numpy's reconstructors, a dtype set up by BUILD, and
    # their raw bytes as _codecs.encode (protocol 2)
    numpy_only = any(n.startswith("numpy.") for n in names_seen) and all(
        n.startswith("numpy.") or n == "_codecs.encode" for n in names_seen) and (
        opcodes_seen <= {"BUILD"})
    if numpy_only:
        problem = (f"holds numpy objects ({listed}), which loading would have to import and "
                   "call; a checkpoint holds only tensors, numbers, strings, lists and dicts, "
                   "so it was refused unread (one written before this check could hold numpy "
                   "values; it cannot be read safely)")
    elif names_seen:
        problem = (f"names {listed}, which a checkpoint never holds (only tensors, numbers, "
                   "strings, lists and dicts); it was refused unread and nothing in it ran "
                   "(it may have been crafted to run code)")
    else:
        problem = (f"its pickle uses the {', '.join(sorted(opcodes_seen))} opcode(s), which "
                   "can build arbitrary objects and which torch.save never writes for a "
                   "checkpoint; it was refused unread and nothing in it ran (it may have been "
                   "crafted to run code)")
    raise CorruptFileError(p, problem, advice)


def read_torch_checked(path: str | os.PathLike, *, advice: str) -> dict:
    """Load a dict written with `torch.save` (tensors on the CPU) and check its content hash
    (stored under `HASH_FIELD`, over the rest of the dict: `tree_sha256`), without ever running
    code named in the file: `check_torch_file` first, then ``torch.load(weights_only=True)``,
    then the hash.

    Raises `CorruptFileError` (the file, the problem, then ``advice``) when the file is refused
    by `check_torch_file`, does not load, is not a dict, has no hash or a wrong one. Returns the
    dict without the hash field.
    """
    import torch

    p = Path(path)
    check_torch_file(p, advice=advice)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CorruptFileError(p, f"does not load, truncated or garbled ({type(exc).__name__}: "
                                  f"{first})", advice) from None
    if not isinstance(state, dict) or HASH_FIELD not in state:
        raise CorruptFileError(p, "has no content hash (not written by this trainer, or by an "
                                  "older metactl)", advice)
    stored = state.pop(HASH_FIELD)
    try:
        actual = tree_sha256(state)
    except TypeError as exc:
        raise CorruptFileError(p, f"holds an unexpected object ({exc})", advice) from None
    if stored != actual:
        raise CorruptFileError(p, "content hash mismatch (the file was changed or damaged "
                                  "after it was written)", advice)
    return state


def plain_tree(obj: Any, where: str = "state") -> Any:
    """A copy of ``obj`` that ``torch.load(weights_only=True)`` reads back as the same values:
    dicts (``OrderedDict`` kept), lists, tuples, ``None``, bools, ints, floats, strings and
    torch tensors (or parameters) stay; subclasses of the scalars (``np.float64``, ``np.str_``,
    an ``IntEnum``) become the plain scalar of the same value; other numpy scalars become their
    ``.item()`` and numpy arrays nested lists of the same numbers (exact: float32, float64 and
    integer values all survive the conversion). Anything else raises ``TypeError`` naming where
    it is (``where``, then the keys and indices down to it), because loading it back would mean
    running code the file names."""
    import collections

    kind = type(obj)
    if obj is None or kind in (bool, int, float, str):
        return obj
    if isinstance(obj, np.ndarray | np.generic):
        if obj.dtype.kind not in ("biuf" if isinstance(obj, np.ndarray) else "biufU"):
            raise TypeError(f"{where} is a numpy {obj.dtype} value; a checkpoint stores only "
                            "numbers, strings, lists, dicts and tensors (convert it first)")
        return plain_tree(obj.tolist() if isinstance(obj, np.ndarray) else obj.item(), where)
    if isinstance(obj, int | float | str):  # IntEnum, a str or float subclass: its plain value
        return (int if isinstance(obj, int) else float if isinstance(obj, float) else str)(obj)
    if isinstance(obj, dict):
        items = [(plain_tree(k, f"{where} key {k!r}"), plain_tree(v, f"{where}[{k!r}]"))
                 for k, v in obj.items()]
        return (collections.OrderedDict(items) if isinstance(obj, collections.OrderedDict)
                else dict(items))
    if isinstance(obj, list | tuple):
        seq = [plain_tree(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return seq if isinstance(obj, list) else tuple(seq)
    if kind.__module__.startswith("torch"):
        import torch

        if kind in (torch.Tensor, torch.nn.Parameter):
            return obj
    raise TypeError(f"{where} is a {kind.__module__}.{kind.__qualname__}; a checkpoint stores "
                    "only numbers, strings, lists, tuples, dicts and torch tensors, so that it "
                    "can be loaded without running code (convert it first)")


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
