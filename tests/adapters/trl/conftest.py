"""Fixtures shared by the TRL adapter tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a module's tests with one torch thread (small models; the 2 cores are shared)."""
    from metactl.adapters.trl.testing import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model_path() -> str:
    """A tiny warmed-up Qwen2 model saved with save_pretrained (cached on disk)."""
    from metactl.adapters.trl.testing import tiny_model_dir

    return str(tiny_model_dir())
