"""The docstring examples of the reference adapter run and hold."""

from __future__ import annotations

import doctest
import importlib

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

MODULES = ["tasks", "model", "rollout", "loss", "config", "trainer", "evaluate", "sft",
           "temperature_check", "__init__"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module("metactl.adapters.reference" + (
        "" if name == "__init__" else f".{name}"))
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
