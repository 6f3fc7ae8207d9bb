"""The scoreboard's numbers and report: per-testbed tables, the regret summary, heat-map, JSON.

Everything is computed from the run records alone (:func:`analyse`), so a resumed scoreboard and
a fresh one with the same records give the same report.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..machine import describe_machine
from .runner import CURVE_AUC
from .stats import mean_ci, paired_bootstrap_regret, paired_difference
from .suite import DEVELOPMENT, FIXED_GRID, Testbed, is_bound, resolve_bound

__all__ = ["NOISE_MARK", "RESOLUTION", "analyse", "best_fixed_arm", "format_summary",
           "format_testbed", "heatmap", "noise_floor", "off_protocol_note",
           "write_report"]  # fmt: skip

BASELINE = "fixed-1.0"
SECONDARY = {"gym": ("final", "final_greedy"), "reference": ("greedy", "pass_at_k")}
#: The metrics whose normalised regret (with its paired bootstrap CI) is computed, primary
#: first (PROTOCOL section 16.4): the gym's AUC and final success; the reference's final
#: average Pass@1 (its final metric is the primary one).
REGRET_METRICS = {"gym": ("auc", "final"), "reference": ("pass1",)}
#: The final metric of each testbed kind (gym: final success; reference: final Pass@1).
FINAL_METRIC = {"gym": "final", "reference": "pass1"}
#: A testbed whose median non-fixed arm has a regret CI half-width above this is below the
#: resolution of the claim "regret <= 0.10" (PROTOCOL section 16.3) and is marked.
RESOLUTION = 0.10
#: The mark of such a testbed in every table.
NOISE_MARK = "†"


def best_fixed_arm(records: Mapping[tuple[str, str, int], Mapping[str, Any]], testbed: Testbed,
                   seeds: Sequence[int]) -> str | None:  # fmt: skip
    """The fixed arm of highest mean primary metric on ``testbed`` over ``seeds`` (the first of
    the grid on a tie, as :func:`analyse` picks it); ``None`` while a run of the grid is
    missing. The bound rows of PROTOCOL section 16.2 switch to it.

    Raises ``ValueError`` naming the run when a record's metric is not a finite number.
    """
    if not isinstance(testbed, Testbed):
        raise TypeError(f"testbed must be a Testbed, got {type(testbed).__name__}")
    if len(seeds) == 0:
        raise ValueError("seeds must name at least one seed")
    if any((testbed.name, c, s) not in records for c in FIXED_GRID for s in seeds):
        return None
    means = [np.mean([_metric(records, testbed.name, c, s, testbed.metric) for s in seeds])
             for c in FIXED_GRID]  # fmt: skip
    return FIXED_GRID[int(np.argmax(means))]


def _half_width(regret: Mapping[str, Any]) -> float:
    """Half the width of a regret's CI (inf when it is undefined: nothing is resolved)."""
    low, high = regret["low"], regret["high"]
    if not (math.isfinite(low) and math.isfinite(high)):
        return float("inf")
    return (high - low) / 2


def noise_floor(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The noise floor of one testbed (PROTOCOL section 16.3) from its analysed ``rows``: the
    median over the non-fixed arms (bound rows included) of the primary regret's CI half-width
    (an undefined CI counts as infinitely wide), and whether it exceeds `RESOLUTION`.

    >>> noise_floor({"a": {"regret": {"low": 0.0, "high": 0.3}},
    ...              "fixed-1.0": {"regret": {"low": 0.0, "high": 0.0}}})
    {'median_half_width': 0.15, 'arms': 1, 'below_resolution': True}
    """
    widths = [_half_width(row["regret"]) for c, row in rows.items() if c not in FIXED_GRID]
    if not widths:
        return {"median_half_width": float("nan"), "arms": 0, "below_resolution": False}
    median = float(np.median(widths))
    return {"median_half_width": median, "arms": len(widths),
            "below_resolution": bool(median > RESOLUTION)}  # fmt: skip


def analyse(
    testbeds: Sequence[Testbed],
    controllers: Sequence[str],
    records: dict[tuple[str, str, int], dict[str, Any]],
    seeds: dict[str, list[int]],
    *,
    resamples: int = 10_000,
    planned: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Every number of the scoreboard from the records ``{(testbed, controller, seed): record}``.

    ``controllers`` must include the whole fixed grid. Raises ``ValueError`` when a run is
    missing (a partial scoreboard is never summarised as if it were complete). ``planned``
    (``{testbed: controllers}``, default every controller everywhere): a non-fixed controller
    not planned on a testbed (`Testbed.default_arms`, or no record at all under ``metactl
    scoreboard --report-only``) is reported as *not run* there (``None`` in the summary, listed
    under ``"not_run"``; its worst cases cover the testbeds it ran on); the fixed grid and every
    planned controller must be complete.

    Bound rows (PROTOCOL section 16.2) are analysed like every arm, with the registry name they
    ran as and the best fixed arm they switched to (from their records, which must agree with
    the testbed's best fixed arm: ``ValueError`` otherwise); they are listed under
    ``"bound_rows"``, never among the candidates. Each row holds the normalised regret of the
    primary metric (``"regret"``) and of every metric of `REGRET_METRICS` (``"regrets"``); each
    testbed its noise floor (:func:`noise_floor`) and, for a reference testbed, whether every
    run recorded a learning curve (then its area, ``curve_auc``, is a secondary metric).
    """
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be an int >= 1, got {resamples!r}")
    missing = [g for g in FIXED_GRID if g not in controllers]
    if missing:
        raise ValueError(f"controllers must include the whole fixed grid; missing {missing}")
    per_testbed: dict[str, Any] = {}
    not_run: dict[str, list[str]] = {}
    bound_rows = [c for c in controllers if is_bound(c)]
    for testbed in testbeds:
        tb_seeds = seeds[testbed.name]
        if planned is not None:
            for c in sorted(controllers):
                if c not in planned[testbed.name] and c not in FIXED_GRID:
                    not_run.setdefault(c, []).append(testbed.name)
        absent = [(c, s) for c in controllers for s in tb_seeds
                  if (testbed.name, c, s) not in records
                  and testbed.name not in not_run.get(c, ())]  # fmt: skip
        if absent:
            raise ValueError(f"testbed {testbed.name}: {len(absent)} runs missing, e.g. "
                             f"{absent[0]}")  # fmt: skip
        ran = [c for c in controllers if testbed.name not in not_run.get(c, ())]

        def values(controller: str, metric: str, tb: Testbed = testbed,
                   sd: list[int] = tb_seeds) -> np.ndarray:  # fmt: skip
            return np.array([_metric(records, tb.name, controller, s, metric) for s in sd])

        metric = testbed.metric
        regret_metrics = REGRET_METRICS[testbed.kind]
        fixed = {m: np.stack([values(c, m) for c in FIXED_GRID], axis=1)  # (seeds, arms)
                 for m in regret_metrics}  # fmt: skip
        fixed_means = fixed[metric].mean(axis=0)
        best = FIXED_GRID[int(np.argmax(fixed_means))]
        worst = FIXED_GRID[int(np.argmin(fixed_means))]
        secondary = list(SECONDARY[testbed.kind])
        curve_missing = 0
        if testbed.kind == "reference":
            curve_missing = sum(1 for c in ran for s in tb_seeds
                                if CURVE_AUC not in (records[(testbed.name, c, s)].get("metrics")
                                                     or {}))  # fmt: skip
            if curve_missing == 0:
                secondary.append(CURVE_AUC)
        rows: dict[str, Any] = {}
        for c in ran:
            primary = values(c, metric)
            temps = np.array([records[(testbed.name, c, s)]["temperature"] for s in tb_seeds])
            regrets = {m: paired_bootstrap_regret(primary if m == metric else values(c, m),
                                                  fixed[m], resamples=resamples)
                       for m in regret_metrics}  # fmt: skip
            row: dict[str, Any] = {
                "values": primary.tolist(),
                "mean_ci": mean_ci(primary),
                "secondary": {m: mean_ci(values(c, m)) for m in secondary},
                "secondary_values": {m: values(c, m).tolist() for m in secondary},
                "regret": regrets[metric],
                "regrets": regrets,
                "vs_fixed_1.0": paired_difference(primary, values(BASELINE, metric)),
                "vs_best_fixed": paired_difference(primary, values(best, metric)),
                "mean_temperature": float(temps.mean()),
                "wall_seconds": float(
                    sum(records[(testbed.name, c, s)]["wall_seconds"] for s in tb_seeds)
                ),
            }
            if is_bound(c):
                row["bound"] = _bound_resolution(records, testbed.name, c, tb_seeds, best)
            vs = row["vs_fixed_1.0"]
            row["beats_fixed_1.0"] = bool(vs["mean"] > 0 and vs["wilcoxon_p"] < 0.05)
            rows[c] = row
        per_testbed[testbed.name] = {
            **testbed.describe(),
            "seeds": tb_seeds,
            "best_fixed": best,
            "worst_fixed": worst,
            "fixed_span": float(fixed_means.max() - fixed_means.min()),
            "final_metric": FINAL_METRIC[testbed.kind],
            "regret_metrics": list(regret_metrics),
            "secondary_metrics": secondary,
            "curve_runs_missing": curve_missing,
            "noise": noise_floor(rows),
            "controllers": rows,
        }
    summary: dict[str, Any] = {}
    dev = [t.name for t in testbeds if t.split == DEVELOPMENT]
    for c in controllers:
        ran_on = [t.name for t in testbeds if c in per_testbed[t.name]["controllers"]]
        dev_ran = [t for t in dev if t in ran_on]
        entry: dict[str, Any] = {"ran_on": ran_on, "bound": is_bound(c)}
        for label, pick in (("primary", lambda tb: tb["metric"]),
                            ("final", lambda tb: tb["final_metric"])):  # fmt: skip
            cells = {t.name: (per_testbed[t.name]["controllers"][c]["regrets"][
                pick(per_testbed[t.name])] if t.name in ran_on else None) for t in testbeds}
            block = {
                "regret": {t: None if r is None else r["regret"] for t, r in cells.items()},
                "ci": {t: None if r is None else [r["low"], r["high"]] for t, r in cells.items()},
                "worst_all": _worst(cells[t]["regret"] for t in ran_on),  # type: ignore[index]
                "worst_development": _worst(cells[t]["regret"] for t in dev_ran)  # type: ignore[index]
                if dev_ran else float("nan"),
            }
            if label == "primary":
                entry.update(block)
            else:
                entry["final"] = block
        entry["beats_fixed_1.0_on"] = [t for t in ran_on
                                       if per_testbed[t]["controllers"][c]["beats_fixed_1.0"]]
        summary[c] = entry
    return {"testbeds": per_testbed, "summary": summary, "controllers": list(controllers),
            "bound_rows": bound_rows, "order": [t.name for t in testbeds],
            "not_run": not_run}  # fmt: skip


def _bound_resolution(records: Mapping[tuple[str, str, int], Mapping[str, Any]], testbed: str,
                      controller: str, seeds: Sequence[int], best: str) -> dict[str, str]:
    """What bound row ``controller`` ran as on ``testbed``: the same resolution in every seed's
    record, to the testbed's best fixed arm ``best``; ``ValueError`` naming the run otherwise
    (a record of another grid's resolution is never reported as this one's)."""
    found = {(records[(testbed, controller, s)].get("resolved"),
              records[(testbed, controller, s)].get("best_fixed")) for s in seeds}  # fmt: skip
    expected = (resolve_bound(controller, best), best)
    if found != {expected}:
        raise ValueError(f"testbed {testbed}: bound row {controller} ran as "
                         f"{sorted(map(str, found))}, but the best fixed arm is {best} "
                         f"({expected[0]}): rerun it (its records are of another grid)")
    return {"runs_as": expected[0], "best_fixed": best}


def _metric(records: Mapping[tuple[str, str, int], Mapping[str, Any]], testbed: str,
            controller: str, seed: int, metric: str) -> float:  # fmt: skip
    """One run's metric; ``ValueError`` naming the run when its record lacks it or it is not a
    finite number (a summary over seeds would fail later with no run named)."""
    metrics = records[(testbed, controller, seed)].get("metrics")
    value = metrics.get(metric) if isinstance(metrics, dict) else None
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value)):  # fmt: skip
        what = "no metrics" if not isinstance(metrics, dict) else f"metric {metric!r} = {value!r}"
        raise ValueError(f"testbed {testbed}: {controller} seed {seed}: {what}, not a finite "
                         "number")  # fmt: skip
    return float(value)


def _worst(values: Any) -> float:
    """Largest regret; NaN if any is undefined (a worst case cannot skip an undefined one)."""
    items = [float(v) for v in values]
    if not items or any(math.isnan(v) for v in items):
        return float("nan")
    return max(items)


def _nan_if_none(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def _num(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _ci(pair: Sequence[float], digits: int = 3) -> str:
    mean, half = pair
    return f"{_num(mean, digits)} ± {_num(half, digits)}"


def _p(p: float) -> str:
    return "n/a" if not math.isfinite(p) else f"{p:.2g}"


def _regret_cell(regret: Mapping[str, Any] | None) -> str:
    """``0.12 [0.05, 0.20]``: a regret with its 95% CI (``not run`` for none)."""
    if regret is None:
        return "not run"
    return f"{_num(regret['regret'])} [{_num(regret['low'])}, {_num(regret['high'])}]"


def _marked(name: str, data: Mapping[str, Any]) -> str:
    """The testbed's name, with `NOISE_MARK` when it is below the resolution of the claim."""
    return name + (NOISE_MARK if data["noise"]["below_resolution"] else "")


def noise_note(analysis: Mapping[str, Any]) -> str:
    """The footnote of `NOISE_MARK` (what it means, the testbeds it marks, their noise)."""
    tbs = analysis["testbeds"]
    marked = [f"{t} ({_num(tbs[t]['noise']['median_half_width'], 3)})" for t in analysis["order"]
              if tbs[t]["noise"]["below_resolution"]]  # fmt: skip
    return (f"{NOISE_MARK} below the resolution of the claim 'regret <= {RESOLUTION:.2f}': the "
            f"median non-fixed arm's regret CI half-width exceeds {RESOLUTION:.2f} "
            f"(PROTOCOL 16.3; nothing is dropped). Marked: "
            f"{', '.join(marked) if marked else 'none'}.")


def _testbed_table(data: Mapping[str, Any], arms: Sequence[str], bound: bool) -> list[str]:
    metric = data["metric"]
    second = data.get("secondary_metrics", SECONDARY[data["kind"]])
    extra_regrets = [m for m in data.get("regret_metrics", (metric,)) if m != metric]
    head = (f"| controller | {'runs as | ' if bound else ''}{metric} (mean ± 95% CI) | "
            f"{' | '.join(second)} | regret [95% CI] | "
            + "".join(f"regret {m} [95% CI] | " for m in extra_regrets)
            + "Δ vs T=1.0 | p Wilcoxon | p t-test | W/T/L vs T=1.0 | W/T/L vs best fixed "
            "| mean T |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in arms:
        row = data["controllers"][c]
        label = c + (" (best fixed)" if c == data["best_fixed"] else "") + (
            " (worst fixed)" if c == data["worst_fixed"] else "")
        runs_as = f"{row['bound']['runs_as']} | " if bound else ""
        vs, vb = row["vs_fixed_1.0"], row["vs_best_fixed"]
        sec = " | ".join(_ci(row["secondary"][m]) for m in second)
        regrets = row.get("regrets", {metric: row["regret"]})
        more = "".join(f"{_regret_cell(regrets[m])} | " for m in extra_regrets)
        lines.append(
            f"| {label} | {runs_as}{_ci(row['mean_ci'])} | {sec} | "
            f"{_regret_cell(row['regret'])} | {more}{_ci((vs['mean'], vs['half_width']))} "
            f"| {_p(vs['wilcoxon_p'])} | {_p(vs['t_p'])} "
            f"| {vs['wins']}/{vs['ties']}/{vs['losses']} "
            f"| {vb['wins']}/{vb['ties']}/{vb['losses']} | {row['mean_temperature']:.2f} |"
        )
    return lines


def format_testbed(name: str, data: dict[str, Any]) -> str:
    """Markdown tables of one testbed: the arms, then the bound rows in their own block."""
    arms = [c for c in data["controllers"] if not is_bound(c)]
    bound = [c for c in data["controllers"] if is_bound(c)]
    noise = data.get("noise", {"below_resolution": False, "median_half_width": float("nan")})
    lines = [
        f"### {name}{NOISE_MARK if noise['below_resolution'] else ''} ({data['split']}; "
        f"{data['description']}; {len(data['seeds'])} seeds)",
        "",
        *_testbed_table(data, arms, bound=False),
    ]
    if bound:
        lines += ["", f"Bound rows (oracles, never candidates: the first phase, then the best "
                      f"fixed arm {data['best_fixed']} of this run's grid; PROTOCOL 16.2):", "",
                  *_testbed_table(data, bound, bound=True)]  # fmt: skip
    lines.append("")
    lines.append(
        f"Best fixed {data['best_fixed']}, worst fixed {data['worst_fixed']} (span of the fixed "
        f"means {_num(data['fixed_span'], 4)}). Regret = (best fixed - method) / (best fixed - "
        "worst fixed) of the metric named, paired bootstrap over seeds (best and worst re-picked "
        "per metric and resample). Median non-fixed regret CI half-width "
        f"{_num(noise['median_half_width'], 3)}"
        + (f": {NOISE_MARK} below the resolution of the claim 'regret <= {RESOLUTION:.2f}'."
           if noise["below_resolution"] else ".")
    )
    if data["kind"] == "reference":
        missing = data.get("curve_runs_missing", 0)
        lines.append(
            f"Learning-curve AUC ({CURVE_AUC}: mean Pass@1 over training on the curve subsets) "
            "beside the final Pass@1." if not missing else
            f"No learning-curve AUC: {missing} run(s) here recorded fewer than two curve points "
            "(--quick evaluates only the end of training; records written before the scoreboard "
            "kept the curve have none), so only the final Pass@1 is reported.")
    return "\n".join(lines)


def _summary_table(analysis: Mapping[str, Any], arms: Sequence[str], block: str,
                   worst: bool) -> list[str]:
    order = analysis["order"]
    tbs = analysis["testbeds"]
    head = [f"{_marked(t, tbs[t])}{' (dev)' if tbs[t]['split'] == DEVELOPMENT else ''}"
            for t in order]  # fmt: skip
    tail = " | worst (dev) | worst (all) | beats T=1.0 on |" if worst else " | beats T=1.0 on |"
    lines = ["| controller | " + " | ".join(head) + tail,
             "|---|" + "---|" * len(order) + ("---|---|---|" if worst else "---|")]
    for c in arms:
        s = analysis["summary"][c]
        b = s if block == "primary" else s["final"]
        cells = " | ".join(
            "not run" if b["regret"][t] is None else
            _regret_cell({"regret": b["regret"][t], "low": _nan_if_none(b["ci"][t][0]),
                          "high": _nan_if_none(b["ci"][t][1])}) for t in order)  # fmt: skip
        ran = s.get("ran_on", order)
        worst_cells = (f" {_num(b['worst_development'])} | {_num(b['worst_all'])} |"
                       if worst else "")  # fmt: skip
        lines.append(f"| {c} | {cells} |{worst_cells} "
                     f"{len(s['beats_fixed_1.0_on'])}/{len(ran)} |")
    return lines


def format_summary(analysis: dict[str, Any]) -> str:
    """The summary: controllers x testbeds of normalised regret with its 95% CI, of the primary
    metric and of the final one, each with the candidates' worst cases and the bound rows in
    their own block (no worst case: they are never candidates)."""
    order = analysis["order"]
    tbs = analysis["testbeds"]
    bound = [c for c in analysis["controllers"] if is_bound(c)]
    arms = [c for c in analysis["controllers"] if not is_bound(c)]
    lines: list[str] = []
    blocks = [("primary", "Primary metric (gym: AUC of success; reference: final average "
                          "Pass@1):")]  # fmt: skip
    if any(tbs[t].get("final_metric", tbs[t]["metric"]) != tbs[t]["metric"] for t in order):
        # (on reference testbeds alone the final metric is the primary one: no second table)
        blocks.append(("final", "Final metric (gym: final success; reference: final average "
                                "Pass@1, the primary metric):"))  # fmt: skip
    for block, title in blocks:
        lines += [title, "", *_summary_table(analysis, arms, block, worst=True), ""]
        if bound:
            lines += ["Bound rows (oracles: the best fixed arm of each testbed's grid, known "
                      "after the run; never candidates, in no worst case):", "",
                      *_summary_table(analysis, bound, block, worst=False), ""]
    best = " · ".join(f"{t}: {tbs[t]['best_fixed']}" for t in order)
    lines += [f"Best fixed arm per testbed (primary metric): {best}.",
              "Normalised regret (0 = best fixed arm of the grid 0.6..1.5, 1 = worst; < 0 beats "
              "the best) [paired bootstrap 95% CI]; worst cases are the maxima of the point "
              "estimates; 'beats T=1.0': primary metric, mean > 0 and Wilcoxon p < 0.05, paired "
              "by seed, no correction across testbeds.", noise_note(analysis)]  # fmt: skip
    not_run = analysis.get("not_run") or {}
    if not_run:
        lines.append("Not run (no record; worst cases and 'beats' cover the testbeds each "
                     "controller ran on): " + "; ".join(
                         f"{c} on {', '.join(t)}" for c, t in not_run.items()) + ".")
    return "\n".join(lines)


def heatmap(analysis: dict[str, Any], path: Path) -> Path:
    """Heat-map PNG of the regret table (numbers written in every cell)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = analysis["order"]
    # the bound rows last, below a line: they are never candidates
    controllers = sorted(analysis["controllers"], key=is_bound)
    bound_from = sum(not is_bound(c) for c in controllers)
    cols = [*order, "worst (all)"]
    grid = np.array([[_nan_if_none(analysis["summary"][c]["regret"][t]) for t in order]
                     # a bound row has no worst case (never a candidate): a grey cell
                     + [float("nan") if is_bound(c) else analysis["summary"][c]["worst_all"]]
                     for c in controllers],
                    dtype=float)  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(1.1 * len(cols) + 3.0, 6.0),
                                    0.42 * len(controllers) + 2.0))
    # undefined regrets and arms not run are grey cells, never a colour of the scale
    shown = np.ma.masked_invalid(np.clip(grid, -0.5, 1.0))
    cmap = plt.get_cmap("RdYlGn_r").with_extremes(bad="lightgrey")
    image = ax.imshow(shown, cmap=cmap, vmin=-0.5, vmax=1.0, aspect="auto")
    for i, c in enumerate(controllers):
        for j in range(grid.shape[1]):
            not_run = j < len(order) and analysis["summary"][c]["regret"][order[j]] is None
            oracle = j == len(order) and is_bound(c)
            text = "not run" if not_run else "oracle" if oracle else _num(grid[i, j])
            ax.text(j, i, text, ha="center", va="center",
                    fontsize=7 if not_run or oracle else 8)
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(controllers)), controllers, fontsize=8)
    ax.axvline(len(order) - 0.5, color="black", linewidth=1.5)
    if bound_from < len(controllers):
        ax.axhline(bound_from - 0.5, color="black", linewidth=1.5)
    fig.colorbar(image, ax=ax, label="normalised regret (colour clipped to [-0.5, 1])")
    ax.set_title("Normalised regret vs the best fixed temperature\n"
                 "(0 = best fixed arm, 1 = worst; lower is better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _finite(obj: Any) -> Any:
    """NaN/inf -> None, tuples -> lists (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def off_protocol_note(meta: dict[str, Any]) -> str:
    """The line that marks a budget overridden by ``--seeds``/``--steps`` (stdout and markdown).

    >>> off_protocol_note({"seeds_override": 1, "steps_override": 3})
    "Budget overridden (--seeds 1, --steps 3): off protocol, not the protocol's scoreboard."
    """
    flags = [f"{flag} {meta[key]}" for flag, key in (("--seeds", "seeds_override"),
                                                     ("--steps", "steps_override"))
             if meta.get(key) is not None]  # fmt: skip
    return (f"Budget overridden ({', '.join(flags)}): off protocol, not the protocol's "
            "scoreboard.")


def machines_of(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The machines that made ``records``: ``[{"machine": line, "runs": count}]``, most runs
    first; records written before runs kept their machine's facts count as ``"not recorded"``.

    >>> machines_of([{"machine": {"python": "3.11.9", "torch": None}}, {}])[1]
    {'machine': 'not recorded', 'runs': 1}
    """
    counts = Counter(describe_machine(r["machine"]) if "machine" in r else "not recorded"
                     for r in records)  # fmt: skip
    return [{"machine": m, "runs": n} for m, n in sorted(counts.items(), key=lambda x: -x[1])]


def write_report(out: Path, analysis: dict[str, Any], meta: dict[str, Any],
                 *, plots: bool = True,
                 pages: dict[str, dict[str, Any]] | None = None) -> dict[str, Path]:  # fmt: skip
    """Write ``scoreboard.md``, ``scoreboard.json`` and ``regret_heatmap.png`` into ``out``.

    ``pages``: :func:`.pages.write_testbed_pages`'s index; each testbed's section then links to
    its page, and the JSON holds the index under ``"testbed_pages"``.
    """
    if pages is not None:
        absent = [name for name in analysis["order"] if name not in pages]
        if absent:
            raise ValueError(f"pages lacks the testbeds {absent}")
    paths = {"markdown": out / "scoreboard.md", "json": out / "scoreboard.json"}
    if plots:
        paths["heatmap"] = heatmap(analysis, out / "regret_heatmap.png")
    parts = [
        "# metactl scoreboard",
        "",
        f"Suite: {'quick' if meta['quick'] else 'full'}; protocol: benchmarks/PROTOCOL.md. "
        f"{meta['runs']} runs ({meta['reused']} reused), wall time {meta['wall_seconds']:.0f} s "
        f"with {meta['workers']} worker(s).",
        "",
    ]
    if meta.get("machines"):
        lines = "; ".join(
            f"{m['runs']} runs whose machine was not recorded" if m["machine"] == "not recorded"
            else f"{m['runs']} runs on {m['machine']}" for m in meta["machines"])  # fmt: skip
        parts += [f"Machines: {lines}. Each run is deterministic on its machine; another "
                  "machine moves the numbers (docs/results.md, machine variance): compare arms "
                  "within one report.", ""]  # fmt: skip
    if meta.get("off_protocol_budget"):
        parts += [f"**{off_protocol_note(meta)}**", ""]
    parts += [
        "## Normalised regret",
        "",
        format_summary(analysis),
        "",
    ]
    if plots:
        parts += ["![regret heat-map](regret_heatmap.png)", ""]
    if pages is not None:
        links = " · ".join(f"[{name}]({pages[name]['page']})" for name in analysis["order"])
        parts += [f"Per-testbed pages (full table, signal diagnostics of the likelihood rules): "
                  f"{links}.", ""]  # fmt: skip
    parts += ["## Per testbed", ""]
    for name in analysis["order"]:
        parts += [format_testbed(name, analysis["testbeds"][name]), ""]
        if pages is not None:
            arms = pages[name]["signal"]
            drawn = [c for c, arm in arms.items() if arm["figure"] is not None]
            what = (f"signal diagnostics of {', '.join(drawn)}" if drawn else
                    "no signal-diagnostics figure")  # fmt: skip
            parts += [f"Page: [{pages[name]['page']}]({pages[name]['page']}) (this table; "
                      f"{what}).", ""]  # fmt: skip
    paths["markdown"].write_text("\n".join(parts), encoding="utf-8")
    extra = {} if pages is None else {"testbed_pages": pages}
    blob = json.dumps(_finite({**meta, **analysis, **extra}), indent=1, allow_nan=False)
    paths["json"].write_text(blob, encoding="utf-8")
    return paths
