"""The machine facts every lab report records (``metactl.adapters.lab.machine``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from metactl.adapters.lab.machine import describe_machine, machine_facts


def test_machine_facts_are_json_safe_and_name_torch_and_the_cpu() -> None:
    facts = machine_facts()
    assert json.loads(json.dumps(facts)) == facts
    import torch

    assert facts["torch"] == torch.__version__ and facts["threads"] == torch.get_num_threads()
    assert facts["logical_cores"] == os.cpu_count()
    line = describe_machine(facts)
    assert facts["torch"] in line and str(facts["cpu_capability"]) in line
    with pytest.raises(TypeError, match="facts"):
        describe_machine([])  # type: ignore[arg-type]


def test_the_recorded_capability_is_the_one_torch_dispatches() -> None:
    """``ATEN_CPU_CAPABILITY=default`` lowers torch's kernels; the facts must say so."""
    code = "import json; from metactl.adapters.lab.machine import machine_facts as f; " \
           "print(json.dumps(f()))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout  # fmt: skip
    assert json.loads(out.strip().splitlines()[-1])["cpu_capability"] == "DEFAULT"
