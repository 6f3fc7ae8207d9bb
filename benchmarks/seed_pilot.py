"""Pilot of benchmarks/PROTOCOL.md section 16.3: how many gym seeds a regret CI of +-0.10 needs.

Runs the fixed grid and a few typical arms on the DEVELOPMENT gym testbeds of the scoreboard,
on seeds outside the suite (``task_seed_offset = 1000``), then prints, per testbed and arm, the
normalised regret of the primary metric (AUC) with its 95% paired-bootstrap CI at the pilot's
seed count, the half-width projected to 30..100 seeds (``h * sqrt(n_pilot / n)``), and the seed
count the protocol's rule picks (the smallest multiple of 10, at least 30 and at most 100, at
which the median arm's projected half-width is at most 0.10 on every testbed).

Usage::

    python benchmarks/seed_pilot.py                 # 40 seeds, 2 workers
    python benchmarks/seed_pilot.py --seeds 10      # a smoke run (not the protocol's pilot)
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
from metactl.adapters.lab.controllers import FIXED_GRID
from metactl.adapters.lab.gym_study import run_one
from metactl.adapters.lab.scoreboard.stats import paired_bootstrap_regret
from metactl.adapters.lab.scoreboard.suite import DEVELOPMENT, TESTBEDS
from tqdm import tqdm

PILOT_OFFSET = 1000
ARMS = ("exp3", "tampo", "spread")
TARGET = 0.10
COUNTS = tuple(range(30, 101, 10))


def _job(args: tuple[str, str, int, Any]) -> tuple[str, str, int, float]:
    testbed, arm, seed, config = args
    return testbed, arm, seed, float(run_one((arm, seed, config))["auc"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the pilot's numbers here")
    args = parser.parse_args(argv)
    testbeds = [t for t in TESTBEDS.values() if t.split == DEVELOPMENT and t.kind == "gym"]
    jobs = [
        (t.name, arm, seed, dataclasses.replace(t.gym_config(), task_seed_offset=PILOT_OFFSET))
        for t in testbeds
        for arm in (*FIXED_GRID, *ARMS)
        for seed in range(args.seeds)
    ]
    auc: dict[tuple[str, str, int], float] = {}
    with cf.ProcessPoolExecutor(args.workers) as pool:
        for testbed, arm, seed, value in tqdm(pool.map(_job, jobs, chunksize=8), total=len(jobs),
                                              desc="pilot runs", unit="run"):  # fmt: skip
            auc[(testbed, arm, seed)] = value
    seeds = range(args.seeds)
    rows = []
    needed: dict[str, int] = {}
    for t in testbeds:
        fixed = np.array([[auc[(t.name, f, s)] for f in FIXED_GRID] for s in seeds])
        widths = []
        for arm in ARMS:
            method = np.array([auc[(t.name, arm, s)] for s in seeds])
            r = paired_bootstrap_regret(method, fixed)
            half = (r["high"] - r["low"]) / 2
            widths.append(half)
            rows.append((t.name, arm, r["regret"], r["low"], r["high"], half))
        typical = statistics.median(widths)
        fits = [n for n in COUNTS if typical * math.sqrt(args.seeds / n) <= TARGET]
        needed[t.name] = fits[0] if fits else COUNTS[-1]
        rows.append((t.name, "median arm", math.nan, math.nan, math.nan, typical))
    print(f"pilot: {args.seeds} seeds (task_seed_offset={PILOT_OFFSET}), AUC regret, 95% paired "
          "bootstrap CI (10,000 resamples); half-width projected as h * sqrt(n_pilot / n)")
    header = ["testbed", "arm", "regret", "95% CI", "half-width",
              *(f"n={n}" for n in (30, 50, 100))]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, arm, regret, low, high, half in rows:
        ci = "" if math.isnan(low) else f"[{low:.3f}, {high:.3f}]"
        reg = "" if math.isnan(regret) else f"{regret:.3f}"
        proj = [f"{half * math.sqrt(args.seeds / n):.3f}" for n in (30, 50, 100)]
        print(f"| {name} | {arm} | {reg} | {ci} | {half:.3f} | " + " | ".join(proj) + " |")
    count = max(needed.values())
    print(f"seeds needed per testbed (median arm <= {TARGET}): {needed}; gym seed count: {count}")
    if args.json is not None:
        args.json.write_text(json.dumps({"seeds": args.seeds, "rows": rows, "needed": needed,
                                         "count": count}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
