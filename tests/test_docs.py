"""Every Python code block of ``docs/*.md`` runs as written.

The blocks of one page run in order in one namespace, as a reader would paste them into one
session, from an empty working folder; a page's distributed block runs inside a real one-process
gloo group. A block whose fence reads ```` ```python no-run ```` is shown but not run (it needs
what no test environment has); every other Python block runs.

The pages are read beside this file (``../docs``), or from ``METACTL_SOURCE_ROOT`` when the tests
run from a copy that left them behind.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.paths import project_file

DOCS = project_file("docs")

#: The pages the README links to; each must exist.
PAGES = ("api.md", "trl.md", "verl.md", "gym.md", "reference.md", "results.md", "development.md")

_FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```$", re.M | re.S)


def _blocks(page: Path) -> list[tuple[str, str]]:
    """The page's Python blocks as ``(info string, code)``, in order."""
    return [(info.strip(), code) for info, code in _FENCE.findall(page.read_text())]


def _check_api(ns: dict, out: str) -> None:
    # one step in "One step", one in "The trainer contract", one in the distributed block
    assert ns["policy"].step == 3
    assert ns["feedback"].loglik.shape == (32, 10)
    assert ns["estimate"].tokens == 32 * 12 and abs(ns["estimate"].ratio - 1.0) < 0.25
    assert ns["joint"].step == 1 and len(ns["joint_loglik"][0]) == 6
    assert ns["per_prompt"].step == 1
    assert ns["restored"].step == 2  # restored after "One step" and "The trainer contract"


def _check_trl(ns: dict, out: str) -> None:
    assert len(ns["trainer"].meta_history) == 2  # max_steps=2: one decision per generation batch
    assert ns["trainer"].meta_policy.step == 2
    assert ns["joint_trainer"].meta_policy is ns["joint"]
    assert ns["per_prompt_trainer"].meta_context_column == "prompt_id"


def _check_gym(ns: dict, out: str) -> None:
    assert ns["env"].get_wrapper_attr("temperature") == 1.3


#: What each page needs installed, how many blocks of it must run, and what must hold after.
EXPECTED: dict[str, tuple[tuple[str, ...], int, Callable[[dict, str], None] | None]] = {
    "api.md": (("torch",), 8, _check_api),
    "trl.md": (("torch", "trl"), 3, _check_trl),
    "gym.md": (("gymnasium",), 1, _check_gym),
}


def test_every_linked_page_exists() -> None:
    assert DOCS.is_dir(), f"no docs folder at {DOCS}: set METACTL_SOURCE_ROOT"
    missing = [name for name in PAGES if not (DOCS / name).is_file()]
    assert not missing, f"pages missing from {DOCS}: {missing}"


def test_relative_links_resolve() -> None:
    """Every relative link of a page names a file of the source tree, and its anchor a heading."""
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        for target, anchor in re.findall(r"\]\(([^)#:]*)(?:#([^)]*))?\)", text):
            path = (page.parent / target).resolve() if target else page
            assert path.exists(), f"{page.name}: broken link {target!r}"
            if anchor and path.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", path.read_text(), re.M)
                slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
                assert anchor in slugs, f"{page.name}: no heading for #{anchor} in {path.name}"


def test_only_known_info_strings() -> None:
    for page in sorted(DOCS.glob("*.md")):
        for info, _ in _blocks(page):
            assert info in ("", "no-run"), f"{page.name}: unknown fence info {info!r}"


@pytest.mark.parametrize("name", PAGES)
def test_page_python_blocks_run_as_written(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    page = DOCS / name
    needs, runnable, check = EXPECTED.get(name, ((), 0, None))
    blocks = [code for info, code in _blocks(page) if info != "no-run"]
    assert len(blocks) == runnable, f"{name}: {len(blocks)} runnable Python blocks"
    if not blocks:
        return
    for module in needs:
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"__docs_{page.stem}__"}
    group = any("torch_collectives" in code for code in blocks)
    if group:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                                world_size=1)
    try:
        for code in blocks:
            exec(compile(code, str(page), "exec"), namespace)
    finally:
        if group:
            dist.destroy_process_group()
    if check is not None:
        check(namespace, capsys.readouterr().out)
