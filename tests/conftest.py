"""Test-wide settings. Under CI (the ``CI`` variable set) Hypothesis draws the same examples on
every run (``derandomize``), so a CI result can be reproduced; elsewhere it explores new
examples each run and keeps the failing ones in ``.hypothesis/``."""

from __future__ import annotations

import importlib.util
import os

# the vLLM and verl environments run their tests without Hypothesis
if importlib.util.find_spec("hypothesis") is not None:
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")
