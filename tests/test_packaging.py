"""What users install: the built wheel and sdist hold every module, the license and the marker
files, install ``adapters/`` only as ``metactl.adapters``, and the console script works.

The archives are built from the source tree (``METACTL_SOURCE_ROOT``, default: this checkout)
unless CI hands over the ones it built and installed (``METACTL_WHEEL``, ``METACTL_SDIST``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.paths import SOURCE_ROOT


def _source_modules() -> dict[str, Path]:
    """Every ``.py`` file of the two trees, keyed by its path inside an installed package."""
    if not (SOURCE_ROOT / "pyproject.toml").is_file():
        raise AssertionError(f"no source tree at {SOURCE_ROOT}: set METACTL_SOURCE_ROOT")
    modules = {}
    for tree, installed_as in (("metactl", "metactl"), ("adapters", "metactl/adapters")):
        for path in sorted((SOURCE_ROOT / tree).rglob("*.py")):
            rel = path.relative_to(SOURCE_ROOT / tree).as_posix()
            modules[f"{installed_as}/{rel}"] = path
    return modules


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The wheel and the sdist under test (built here unless CI names them)."""
    given = {kind: os.environ.get(f"METACTL_{kind.upper()}") for kind in ("wheel", "sdist")}
    if all(given.values()):
        return {kind: Path(path) for kind, path in given.items() if path}
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(SOURCE_ROOT)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    return {"wheel": next(out.glob("*.whl")), "sdist": next(out.glob("*.tar.gz"))}


def test_wheel_holds_every_module_at_its_installed_path(archives: dict[str, Path]) -> None:
    names = set(zipfile.ZipFile(archives["wheel"]).namelist())
    missing = sorted(set(_source_modules()) - names)
    assert not missing, f"modules of the source tree missing from the wheel: {missing}"
    extra = sorted(n for n in names if n.endswith(".py") and n not in _source_modules())
    assert not extra, f"wheel modules with no source file: {extra}"
    assert "metactl/py.typed" in names
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"metactl", next(t for t in tops if t.endswith(".dist-info"))}, tops
    dist_info = next(t for t in tops if t.endswith(".dist-info"))
    assert f"{dist_info}/licenses/LICENSE" in names
    top_level = zipfile.ZipFile(archives["wheel"]).read(f"{dist_info}/top_level.txt").decode()
    assert top_level.split() == ["metactl"]


def test_wheel_metadata_declares_the_shipped_license(archives: dict[str, Path]) -> None:
    wheel = zipfile.ZipFile(archives["wheel"])
    dist_info = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = wheel.read(dist_info).decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert "License-File: LICENSE" in metadata
    license_text = wheel.read(dist_info.replace("METADATA", "licenses/LICENSE")).decode()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert license_text == (SOURCE_ROOT / "LICENSE").read_text()
    entry_points = wheel.read(dist_info.replace("METADATA", "entry_points.txt")).decode()
    assert "metactl = metactl.cli:main" in entry_points


def test_sdist_builds_the_same_package_and_carries_tests_and_license(
    archives: dict[str, Path],
) -> None:
    with tarfile.open(archives["sdist"]) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    source_files = {path.relative_to(SOURCE_ROOT).as_posix() for path in _source_modules().values()}
    for folder in ("tests", "examples", "benchmarks"):
        source_files |= {p.relative_to(SOURCE_ROOT).as_posix()
                         for p in (SOURCE_ROOT / folder).rglob("*.py")}
    missing = sorted(source_files - names)
    assert not missing, f"files missing from the sdist: {missing}"
    for name in ("LICENSE", "README.md", "pyproject.toml", "setup.py", "metactl/py.typed",
                 "tests/data/replay.json", "docs/api.md"):
        assert name in names


def test_no_top_level_adapters_module(tmp_path: Path) -> None:
    # from a folder outside the source tree, so only the installed package can be found
    code = ("import importlib.util, metactl.adapters; "
            "assert importlib.util.find_spec('adapters') is None, 'top-level adapters'; "
            "print(metactl.adapters.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "metactl.adapters"


@pytest.mark.parametrize("args", [
    ["--help"], ["reproduce", "--help"], ["gym-study", "--help"], ["--version"],
])
def test_console_script_and_python_dash_m(tmp_path: Path, args: list[str]) -> None:
    script = Path(sys.executable).parent / "metactl"
    assert script.is_file(), f"console script not installed beside {sys.executable}"
    for command in ([str(script), *args], [sys.executable, "-m", "metactl", *args]):
        out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0, (command, out.stderr)
        assert "metactl" in out.stdout
