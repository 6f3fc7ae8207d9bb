"""The examples in the lab's docstrings run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest

# module of metactl.adapters.lab -> the optional packages its examples need
MODULES: dict[str, tuple[str, ...]] = {
    "": (),
    ".controllers": (),
    ".commands": (),
    ".gym_study": ("gymnasium", "scipy"),
    ".reproduce.workers": (),
    ".reproduce.experiment": ("torch", "transformers"),
    ".reproduce.presets": ("torch", "transformers"),
    ".reproduce.report": ("torch", "transformers"),
    ".reproduce.paper": ("torch", "transformers", "math_verify"),
    ".scoreboard.runner": ("gymnasium", "scipy"),
    ".scoreboard.report": ("gymnasium", "scipy"),
}


@pytest.mark.parametrize("suffix", MODULES)
def test_docstring_examples(suffix: str, tmp_path, monkeypatch) -> None:
    for package in MODULES[suffix]:
        pytest.importorskip(package)
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    module = importlib.import_module("metactl.adapters.lab" + suffix)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
