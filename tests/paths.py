"""Where the tests find the project's files.

``ROOT`` is the folder that holds ``tests/``: the checkout, or the copy CI runs the tests from
(``tests``, ``examples``, ``benchmarks``, ``README.md`` and ``pyproject.toml`` travel with it).
``SOURCE_ROOT`` is the source tree (``metactl/``, ``adapters/``, ``docs/``): ``METACTL_SOURCE_ROOT``
when set (CI sets it when it runs the tests from a copy outside the tree), else ``ROOT``.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOT = Path(os.environ.get("METACTL_SOURCE_ROOT") or ROOT)


def project_file(relative: str) -> Path:
    """``relative`` beside the tests if it travelled with them, else in the source tree."""
    here = ROOT / relative
    return here if here.exists() else SOURCE_ROOT / relative
