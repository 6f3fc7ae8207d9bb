"""The examples in the TRL adapter's docstrings run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest
from metactl.adapters.trl.testing import torch_threads

MODULES = [
    "", ".checkpoint", ".fused", ".guards", ".scoring", ".seam", ".testing", ".trainer", ".window"
]


@pytest.mark.parametrize("suffix", MODULES)
def test_docstring_examples(suffix: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("METACTL_ALLOW_UNTESTED_TRL", raising=False)
    module = importlib.import_module("metactl.adapters.trl" + suffix)
    with torch_threads(1):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
