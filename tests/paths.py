"""Where the tests find the project's files.

``ROOT`` is the folder that holds ``tests/``: the checkout, or the copy CI runs the tests from
(``tests``, ``examples``, ``benchmarks``, ``README.md`` and ``pyproject.toml`` travel with it).
``SOURCE_ROOT`` is the source tree (``metactl/``, ``adapters/``, ``docs/``): ``METACTL_SOURCE_ROOT``
when set (CI sets it when it runs the tests from a copy outside the tree), else ``ROOT``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOT = Path(os.environ.get("METACTL_SOURCE_ROOT") or ROOT)


def project_file(relative: str) -> Path:
    """``relative`` beside the tests if it travelled with them, else in the source tree."""
    here = ROOT / relative
    return here if here.exists() else SOURCE_ROOT / relative


def load_script(relative: str) -> ModuleType:
    """The project script at ``relative`` (e.g. ``benchmarks/gpu_check.py``) imported as a
    module named after its path, so its functions can be tested without running it."""
    name = relative.removesuffix(".py").replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, project_file(relative))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module
