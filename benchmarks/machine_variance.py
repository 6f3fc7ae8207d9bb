"""How far another machine moves the reference task's numbers, emulated on this one.

Each variant runs in a fresh process with ``ATEN_CPU_CAPABILITY`` set, which makes torch
dispatch another family of CPU kernels (AVX-512, AVX2, or the portable default): the same code
and seeds with other last bits, as on a machine with another CPU. For each variant the script
trains the warm-up of ``metactl reproduce --quick`` into its own cache folder, checks the start
model, and runs one GRPO arm (``fixed-1.0``, seed 0, the quick preset's 150 steps), then prints
one table: SFT steps and final loss, the start model's greedy accuracy on fresh problems, its
benchmark Pass@1 before RL, and the arm's final Pass@1.

Two warm-up rules are compared: the preset's (stop once the mean loss of the last 50 steps is
below 0.05, at most 2,000 steps) and a fixed number of steps (``--fixed-steps``, no loss
threshold), to see whether the threshold turns a last-bit difference into another start model.

Usage::

    python benchmarks/machine_variance.py                       # AVX512 and AVX2, both rules
    python benchmarks/machine_variance.py --capabilities avx2,default --fixed-steps 800
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def _variant(rule: str, fixed_steps: int, out: Path) -> dict[str, Any]:
    """Warm-up, start check and one arm in this process (its capability set by the parent)."""
    import torch
    from metactl.adapters.lab.machine import machine_facts
    from metactl.adapters.lab.reproduce.experiment import prepare_start, run_arm
    from metactl.adapters.lab.reproduce.presets import cpu_config

    cfg = cpu_config(quick=True, out=str(out / "runs"), controllers=("fixed-1.0",), seeds=(0,),
                     workers=1, cache_dir=str(out / "cache"))  # fmt: skip
    if rule == "fixed":
        assert cfg.warmup is not None
        cfg = dataclasses.replace(
            cfg, warmup=dataclasses.replace(cfg.warmup, steps=fixed_steps, stop_loss=0.0))
    torch.set_num_threads(cfg.threads_per_worker)  # as metactl reproduce runs its warm-up
    start_path, info = prepare_start(cfg, progress=False)
    result = run_arm(cfg, "fixed-1.0", 0, start_path, progress=False)
    return {
        "capability": machine_facts()["cpu_capability"],
        "rule": rule,
        "sft_steps": info["warmup"]["steps"],
        "sft_final_loss": info["warmup"]["final_loss"],
        "start_greedy": info["task_check"]["greedy"],
        "start_pass1": info["base"]["avg"]["pass1"],
        "arm_pass1": result["final"]["avg"]["pass1"],
        "arm_greedy": result["final"]["avg"]["greedy"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capabilities", default="avx512,avx2",
                        help="comma-separated ATEN_CPU_CAPABILITY values (default avx512,avx2)")
    parser.add_argument("--rules", default="stop,fixed", help="warm-up rules: stop, fixed")
    parser.add_argument("--fixed-steps", type=int, default=800)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", nargs=2, metavar=("RULE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        rule, out = args.worker
        print(json.dumps(_variant(rule, args.fixed_steps, Path(out))))
        return 0
    rows = []
    for rule in args.rules.split(","):
        for capability in args.capabilities.split(","):
            with tempfile.TemporaryDirectory(prefix="machine-variance-") as tmp:
                env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
                done = subprocess.run(
                    [sys.executable, __file__, "--worker", rule, tmp,
                     "--fixed-steps", str(args.fixed_steps)],
                    env=env, capture_output=True, text=True, check=False)  # fmt: skip
                if done.returncode != 0:
                    print(done.stderr[-3000:], file=sys.stderr)
                    return done.returncode
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"done: {rule} {row['capability']}", file=sys.stderr, flush=True)
    stop_rule = "mean loss of the last 50 steps < 0.05 (at most 2,000 steps)"
    print(f"warm-up rules: stop = {stop_rule}; fixed = {args.fixed_steps} steps, no threshold")
    print("| warm-up rule | CPU kernels | SFT steps | SFT final loss | start greedy | "
          "start Pass@1 | fixed-1.0 seed 0 final Pass@1 | final greedy |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rule']} | {r['capability']} | {r['sft_steps']} | {r['sft_final_loss']:.5f} "
              f"| {100 * r['start_greedy']:.1f}% | {100 * r['start_pass1']:.1f} | "
              f"{100 * r['arm_pass1']:.1f} | {100 * r['arm_greedy']:.1f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
