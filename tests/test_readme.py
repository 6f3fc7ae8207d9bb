"""Every code block of the README runs as written.

The Python blocks run in order in one namespace, as a reader would paste them into one session;
the distributed block runs inside a real one-process gloo group. The quick start's two shell
commands are run verbatim by CI itself (`.ci/run`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", README.read_text(), re.M | re.S)


def test_readme_python_blocks_run_as_written(tmp_path: Path, capsys) -> None:
    pytest.importorskip("torch")
    import torch.distributed as dist

    blocks = _blocks("python")
    assert len(blocks) >= 2
    namespace: dict = {"__name__": "__readme__"}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    finally:
        dist.destroy_process_group()
    out = capsys.readouterr().out
    assert out.count("step ") == 5 and "T = " in out
    assert namespace["policy"].step == 6  # five steps in the loop, one in the distributed block

