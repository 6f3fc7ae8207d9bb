"""What the lab's commands (``metactl reproduce``, ``gym-study``, ``scoreboard``) share: an
argument parser whose errors are one line, the check that an output folder can be written, and
the lock that keeps two runs out of one output folder.

Example
-------
>>> import tempfile
>>> from pathlib import Path
>>> folder = Path(tempfile.mkdtemp()) / "new"
>>> check_writable_dir(folder, "--out") == folder, folder.is_dir()
(True, True)
>>> with output_lock(folder):
...     (folder / ".lock").is_file()
True
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from metactl.adapters.integrity import exclusive_lock

__all__ = ["OneLineErrorParser", "check_writable_dir", "output_lock", "parse_name_list"]


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr, exit status 2:
    ``prog: error: message (see prog --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def check_writable_dir(path: str | os.PathLike[str], flag: str) -> Path:
    """Create folder ``path`` if needed and prove that a file can be written into it; returns it
    as a `Path` (``~`` is not expanded: the run uses the path as given).

    The probe writes and removes a uniquely named temporary file: permission bits alone do not
    say whether a write succeeds (as root, on a read-only mount). Raises ``ValueError`` naming
    ``flag`` and the path when ``path`` is a file, cannot be created, or cannot be written into.
    """
    if not isinstance(flag, str) or not flag:
        raise TypeError(f"flag must be a non-empty str, got {flag!r}")
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(f"{flag} must name a folder, got {path!r}")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {folder}: exists and is not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{flag} {folder}: cannot create the folder "
                         f"({exc.strerror or exc})") from None  # fmt: skip
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".metactl-write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"{flag} {folder}: the folder is not writable "
                         f"({exc.strerror or exc})") from None  # fmt: skip
    return folder


@contextmanager
def output_lock(out: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the exclusive lock of output folder ``out`` (``<out>/.lock``) for the ``with`` block:
    a second run on the same folder is refused at once with
    `metactl.adapters.integrity.OutputInUseError` naming the holder's pid, instead of
    redoing and overwriting the first one's work. The kernel releases the lock when the holder
    exits, killed or not."""
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a path, got {type(out).__name__}")
    folder = Path(out)
    with exclusive_lock(folder / ".lock", f"output folder {folder}"):
        yield


def parse_name_list(text: str, flag: str, what: str) -> list[str]:
    """A comma-separated list of distinct, non-empty names (spaces around names ignored).

    Raises ``ValueError`` naming ``flag`` on an empty name or a repeated one (``what`` names the
    kind of thing listed: ``"controller"``, ``"testbed"``).

    >>> parse_name_list("tampo, fixed-1.0", "--controllers", "controller")
    ['tampo', 'fixed-1.0']
    """
    if not isinstance(text, str):
        raise TypeError(f"{flag} must be a str, got {type(text).__name__}")
    names = [name.strip() for name in text.split(",")]
    if any(not name for name in names):
        raise ValueError(f"{flag} has an empty name in {text!r}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{flag} must name each {what} once (repeated: {', '.join(repeated)})")
    return names
