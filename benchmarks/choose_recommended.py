"""The mechanical steps of benchmarks/PROTOCOL.md section 16: the stage-2 shortlist (16.5,
point 2) and the choice of `recommended` (16.6), from a scoreboard's ``scoreboard.json``.

    python benchmarks/choose_recommended.py shortlist OUT/scoreboard.json
    python benchmarks/choose_recommended.py choice OUT/scoreboard.json

``shortlist`` reads the three development gym testbeds; ``choice`` the four development
testbeds (the report must hold all four: ``metactl scoreboard --report-only --testbeds
development --out OUT``). Both print a table and the result; nothing here is tuned or chosen
by hand. ``recommended`` is the registry's alias of today's choice (``exp3``, the same rule on
the same seeds): it is ranked once, under ``exp3``, after checking that their numbers agree.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from metactl.adapters.lab.controllers import FIXED_GRID
from metactl.adapters.lab.scoreboard.report import BASELINE

DEV_GYM = ("gym-default", "gym-sharp", "gym-flat")
DEV_ALL = (*DEV_GYM, "reference-quick")
TODAY = "exp3"  # `recommended` before this choice (PROTOCOL section 7)
ALWAYS = ("mixture", "spread", "entropy-e3", TODAY)  # shortlisted whatever their rank
SHORTLIST_TOP = 5
TIE = 0.05


def _regret(data: dict[str, Any], arm: str, testbed: str) -> float:
    value = data["summary"][arm]["regret"].get(testbed)
    if value is None or math.isnan(float(value)):
        raise ValueError(f"{arm} has no regret on {testbed}: run it there first")
    return float(value)


def _ranked_arms(data: dict[str, Any]) -> list[str]:
    """Non-fixed, non-bound arms, with `recommended` folded into `exp3`."""
    summary = data["summary"]
    arms = [a for a in summary if a not in FIXED_GRID and not summary[a]["bound"]]
    if "recommended" in arms:
        for testbed in summary["recommended"]["ran_on"]:
            same = (data["testbeds"][testbed]["controllers"]["recommended"]["values"]
                    == data["testbeds"][testbed]["controllers"][TODAY]["values"])  # fmt: skip
            if not same:
                raise ValueError(f"recommended and {TODAY} differ on {testbed}: not an alias")
        arms.remove("recommended")
    return arms


def _table(rows: list[tuple[str, list[float], float, float]], testbeds: tuple[str, ...],
           mark: dict[str, str]) -> str:  # fmt: skip
    head = ["arm", *testbeds, "worst", "mean", ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, values, worst, mean in rows:
        cells = [arm, *(f"{v:.3f}" for v in values), f"{worst:.3f}", f"{mean:.3f}",
                 mark.get(arm, "")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _scored(data: dict[str, Any], arms: list[str], testbeds: tuple[str, ...]
            ) -> list[tuple[str, list[float], float, float]]:  # fmt: skip
    rows = []
    for arm in arms:
        values = [_regret(data, arm, t) for t in testbeds]
        rows.append((arm, values, max(values), sum(values) / len(values)))
    return sorted(rows, key=lambda r: (r[2], r[0]))


def shortlist(data: dict[str, Any]) -> list[str]:
    """PROTOCOL 16.5, point 2: the five arms of lowest worst-case AUC regret over the
    development gym testbeds, then fixed-1.0 and the arms shortlisted whatever their rank."""
    rows = _scored(data, _ranked_arms(data), DEV_GYM)
    top = [r[0] for r in rows[:SHORTLIST_TOP]]
    chosen = [*top, BASELINE, *(a for a in ALWAYS if a not in top)]
    mark = {a: "top 5" for a in top} | {a: "always" for a in ALWAYS if a not in top}
    print("PROTOCOL 16.5 shortlist: normalised regret of AUC (point estimates), development gym")
    print(_table(rows, DEV_GYM, mark))
    print(f"shortlist: {','.join(chosen)}")
    return chosen


def choice(data: dict[str, Any], shortlisted: list[str]) -> str:
    """PROTOCOL 16.6: the lowest worst case over the four development testbeds; within 0.05 of
    it fixed-1.0 wins, else the lowest mean, then the name."""
    ranked = set(_ranked_arms(data))
    candidates = [a for a in shortlisted if a == BASELINE or a in ranked]
    rows = _scored(data, candidates, DEV_ALL)
    lowest = rows[0][2]
    tied = [r for r in rows if r[2] <= lowest + TIE]
    if any(r[0] == BASELINE for r in tied):
        chosen = BASELINE
    else:
        chosen = min(tied, key=lambda r: (r[3], r[0]))[0]
    mark = {r[0]: "tied" for r in tied} | {chosen: "CHOSEN"}
    print("PROTOCOL 16.6 choice: normalised regret of the primary metric (point estimates), "
          "development testbeds")  # fmt: skip
    print(_table(rows, DEV_ALL, mark))
    print(f"lowest worst case {lowest:.3f}; tied within {TIE}: {[r[0] for r in tied]}; "
          f"recommended: {chosen}")  # fmt: skip
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("shortlist", "choice"))
    parser.add_argument("scoreboard", type=Path, help="a scoreboard.json")
    parser.add_argument("--shortlist", help="choice: the comma-separated shortlist (default: "
                        "computed from the same report's gym testbeds)")  # fmt: skip
    args = parser.parse_args(argv)
    data = json.loads(args.scoreboard.read_text(encoding="utf-8"))
    if args.step == "shortlist":
        shortlist(data)
        return 0
    listed = args.shortlist.split(",") if args.shortlist else shortlist(data)
    choice(data, listed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
