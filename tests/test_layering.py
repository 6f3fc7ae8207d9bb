"""The layers, read from the import statements of the source tree: the library ``metactl/``
imports nothing from ``metactl.adapters``; the integrations (``metactl.adapters`` outside
``lab``) never import the lab; the lab imports no private name of another module.

The ``metactl`` command reaches the lab by module name at run time (``metactl.cli``'s lazy
dispatch), not by an import statement, so ``pip install metactl`` alone can run ``--help``."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.paths import SOURCE_ROOT


def _modules(tree: str, installed_as: str) -> Iterator[tuple[str, Path, bool]]:
    """(dotted module name as installed, file, is a package ``__init__``) of the tree."""
    for path in sorted((SOURCE_ROOT / tree).rglob("*.py")):
        parts = list(path.relative_to(SOURCE_ROOT / tree).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        yield ".".join([installed_as, *parts]), path, is_package


def _imports(module: str, path: Path, is_package: bool) -> Iterator[tuple[str, list[str], int]]:
    """(absolute module imported, names imported from it, line) of every import statement,
    relative imports resolved against ``module``."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            yield target, [alias.name for alias in node.names], node.lineno


def _within(target: str, package: str) -> bool:
    return target == package or target.startswith(package + ".")


def test_the_library_imports_no_adapter() -> None:
    found = [f"{path.relative_to(SOURCE_ROOT)}:{line}: {target}"
             for module, path, is_package in _modules("metactl", "metactl")
             for target, names, line in _imports(module, path, is_package)
             if _within(target, "metactl.adapters")
             or (target == "metactl" and "adapters" in names)]  # fmt: skip
    assert not found, found


def test_no_integration_imports_the_lab() -> None:
    found = [f"{path.relative_to(SOURCE_ROOT)}:{line}: {target}"
             for module, path, is_package in _modules("adapters", "metactl.adapters")
             if not _within(module, "metactl.adapters.lab")
             for target, names, line in _imports(module, path, is_package)
             if _within(target, "metactl.adapters.lab")
             or (target == "metactl.adapters" and "lab" in names)]  # fmt: skip
    assert not found, found
    assert any(_within(m, "metactl.adapters.lab") for m, _, _ in _modules("adapters",
                                                                        "metactl.adapters"))


def test_the_lab_imports_no_private_name_of_another_module() -> None:
    found = [f"{path.relative_to(SOURCE_ROOT)}:{line}: {name} from {target}"
             for module, path, is_package in _modules("adapters/lab", "metactl.adapters.lab")
             for target, names, line in _imports(module, path, is_package)
             for name in names
             if name.startswith("_") and not name.startswith("__")]  # fmt: skip
    assert not found, found


def test_the_checks_see_a_violation(tmp_path: Path) -> None:
    """The helpers resolve relative imports and imported names, so the checks above can fail."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ..lab.commands import _hidden\nimport metactl.adapters.lab\n")
    seen = list(_imports("metactl.adapters.gym.probe", probe, is_package=False))
    assert seen == [("metactl.adapters.lab.commands", ["_hidden"], 1),
                    ("metactl.adapters.lab", [], 2)]  # fmt: skip
