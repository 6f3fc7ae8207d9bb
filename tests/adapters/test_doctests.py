"""The docstring examples of the modules every adapter shares (``metactl.adapters.<module>``)
run and hold."""

from __future__ import annotations

import doctest
import importlib

import pytest

# module of metactl.adapters -> the optional packages its examples need
MODULES: dict[str, tuple[str, ...]] = {
    "char_tokenizer": ("tokenizers", "transformers"),
}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    for package in MODULES[name]:
        pytest.importorskip(package)
    result = doctest.testmod(importlib.import_module(f"metactl.adapters.{name}"),
                             optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
