"""The examples in the gym adapter's docstrings run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["", ".env", ".wrappers", ".learner", ".sampling", ".training"]


@pytest.mark.parametrize("suffix", MODULES)
def test_docstring_examples(suffix: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module("metactl.adapters.gym" + suffix)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
