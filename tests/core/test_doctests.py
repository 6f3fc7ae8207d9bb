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


#: Modules whose docstrings must hold examples: every one of them runs, and there is one at least.
WITH_EXAMPLES = [
    "metactl.contexts",
    "metactl.policy",
    "metactl.rules.contextual_tampo",
    "metactl.rules.counterfactual",
    "metactl.rules.entropy_schedule",
    "metactl.rules.linear_thompson",
    "metactl.rules.ptgs",
    "metactl.rules.tampo",
    "metactl.rules.uncertainty",
    "metactl.selectors",
]


@pytest.mark.parametrize("module", WITH_EXAMPLES)
def test_these_modules_have_examples_and_they_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
