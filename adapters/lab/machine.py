"""The facts of the machine a lab run's numbers depend on, recorded with every report.

Each run is deterministic on one machine, but another machine may print other digits: a
different CPU vector extension (torch dispatches its kernels by ``torch.backends.cpu``'s
capability, and AVX2 and AVX-512 kernels sum in different orders), torch build, BLAS, or thread
count changes the last bits of a float, and one flipped sampled token sends a GRPO run down
another path (a different seed, in effect). Reports therefore say which machine made them.

Example:
    >>> facts = machine_facts()
    >>> sorted(facts)[:3]
    ['cpu_capability', 'cpu_flags', 'cpu_model']
    >>> line = describe_machine({"torch": "2.13.0+cpu", "cpu_capability": "AVX512",
    ...                          "threads": 1, "cpu_model": "X", "logical_cores": 2,
    ...                          "numpy": "2.3.0", "python": "3.11.7", "cpu_flags": ["avx2"]})
    >>> line.split(";")[0]
    'torch 2.13.0+cpu (CPU kernels: AVX512), 1 torch thread(s), numpy 2.3.0, Python 3.11.7'
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["VECTOR_FLAGS", "describe_machine", "machine_facts"]

#: The CPU flags (``/proc/cpuinfo``) that decide which kernels numerical libraries run.
VECTOR_FLAGS: tuple[str, ...] = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni",
                                 "avx512_bf16", "amx_tile", "asimd", "sve")  # fmt: skip


def _cpuinfo() -> tuple[str, list[str]]:
    """The CPU model name and the `VECTOR_FLAGS` it has (Linux; empty elsewhere)."""
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return platform.processor() or "unknown", []
    model, flags = "unknown", set()
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "CPU part") and model == "unknown":
            model = value.strip()
        elif key in ("flags", "Features"):
            flags |= set(value.split())
    return model, [flag for flag in VECTOR_FLAGS if flag in flags]


def machine_facts(include_torch: bool = True) -> dict[str, Any]:
    """What this process computes with: torch's version and build and the CPU kernels it
    dispatches (``ATEN_CPU_CAPABILITY`` can lower them), its thread count, numpy, Python, the
    CPU model, logical cores and vector flags. JSON-safe; torch only if it is installed and
    ``include_torch`` (a numpy-only run, such as the gym's, leaves it out: ``None``)."""
    model, flags = _cpuinfo()
    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu_model": model,
        "logical_cores": os.cpu_count(),
        "cpu_flags": flags,
        "torch": None,
        "cpu_capability": None,
        "threads": None,
    }
    if not include_torch:
        return facts
    try:
        import torch
    except ImportError:
        return facts
    facts["torch"] = torch.__version__
    facts["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    facts["threads"] = torch.get_num_threads()
    return facts


def describe_machine(facts: dict[str, Any]) -> str:
    """One line naming the facts of :func:`machine_facts`, for a report."""
    if not isinstance(facts, dict):
        raise TypeError(f"facts must be a dict, got {type(facts).__name__}")
    torch_part = (f"torch {facts['torch']} (CPU kernels: {facts['cpu_capability']}), "
                  f"{facts['threads']} torch thread(s)" if facts.get("torch") else "no torch")
    flags = " ".join(facts.get("cpu_flags") or []) or "none known"
    return (f"{torch_part}, numpy {facts.get('numpy')}, Python {facts.get('python')}; CPU: "
            f"{facts.get('cpu_model')}, {facts.get('logical_cores')} logical cores, flags {flags}")
