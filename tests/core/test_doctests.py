"""Every docstring example of the library runs as written (``doctest`` over each module of
``metactl``, the lab and the adapters excluded: their own tests run theirs)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import metactl

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(metactl.__path__, "metactl.")
    if not info.name.startswith("metactl.adapters") and info.name != "metactl.__main__"
)


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(
        importlib.import_module(module),
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
    )
    assert result.failed == 0
