"""The scoreboard's numbers and report: per-testbed tables, the regret summary, heat-map, JSON.

Everything is computed from the run records alone (:func:`analyse`), so a resumed scoreboard and
a fresh one with the same records give the same report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .stats import mean_ci, paired_bootstrap_regret, paired_difference
from .suite import DEVELOPMENT, FIXED_GRID, Testbed

__all__ = ["analyse", "format_summary", "format_testbed", "heatmap", "off_protocol_note",
           "write_report"]  # fmt: skip

BASELINE = "fixed-1.0"
SECONDARY = {"gym": ("final", "final_greedy"), "reference": ("greedy", "pass_at_k")}


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
    """
    missing = [g for g in FIXED_GRID if g not in controllers]
    if missing:
        raise ValueError(f"controllers must include the whole fixed grid; missing {missing}")
    per_testbed: dict[str, Any] = {}
    not_run: dict[str, list[str]] = {}
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

        def values(controller: str, metric: str, tb: Testbed = testbed,
                   sd: list[int] = tb_seeds) -> np.ndarray:  # fmt: skip
            return np.array([_metric(records, tb.name, controller, s, metric) for s in sd])

        metric = testbed.metric
        fixed = np.stack([values(c, metric) for c in FIXED_GRID], axis=1)  # (seeds, arms)
        fixed_means = fixed.mean(axis=0)
        best = FIXED_GRID[int(np.argmax(fixed_means))]
        worst = FIXED_GRID[int(np.argmin(fixed_means))]
        rows: dict[str, Any] = {}
        for c in controllers:
            if testbed.name in not_run.get(c, ()):
                continue
            primary = values(c, metric)
            temps = np.array([records[(testbed.name, c, s)]["temperature"] for s in tb_seeds])
            row: dict[str, Any] = {
                "values": primary.tolist(),
                "mean_ci": mean_ci(primary),
                "secondary": {m: mean_ci(values(c, m)) for m in SECONDARY[testbed.kind]},
                "secondary_values": {m: values(c, m).tolist() for m in SECONDARY[testbed.kind]},
                "regret": paired_bootstrap_regret(primary, fixed, resamples=resamples),
                "vs_fixed_1.0": paired_difference(primary, values(BASELINE, metric)),
                "vs_best_fixed": paired_difference(primary, values(best, metric)),
                "mean_temperature": float(temps.mean()),
                "wall_seconds": float(
                    sum(records[(testbed.name, c, s)]["wall_seconds"] for s in tb_seeds)
                ),
            }
            vs = row["vs_fixed_1.0"]
            row["beats_fixed_1.0"] = bool(vs["mean"] > 0 and vs["wilcoxon_p"] < 0.05)
            rows[c] = row
        per_testbed[testbed.name] = {
            **testbed.describe(),
            "seeds": tb_seeds,
            "best_fixed": best,
            "worst_fixed": worst,
            "fixed_span": float(fixed_means.max() - fixed_means.min()),
            "controllers": rows,
        }
    summary: dict[str, Any] = {}
    dev = [t.name for t in testbeds if t.split == DEVELOPMENT]
    for c in controllers:
        ran = [t.name for t in testbeds if c in per_testbed[t.name]["controllers"]]
        regrets = {t.name: (per_testbed[t.name]["controllers"][c]["regret"]["regret"]
                            if t.name in ran else None) for t in testbeds}  # fmt: skip
        dev_ran = [t for t in dev if t in ran]
        summary[c] = {
            "regret": regrets,
            "ran_on": ran,
            "worst_all": _worst(regrets[t] for t in ran),
            "worst_development": _worst(regrets[t] for t in dev_ran) if dev_ran
            else float("nan"),
            "beats_fixed_1.0_on": [t for t in ran
                                   if per_testbed[t]["controllers"][c]["beats_fixed_1.0"]],
        }  # fmt: skip
    return {"testbeds": per_testbed, "summary": summary, "controllers": list(controllers),
            "order": [t.name for t in testbeds], "not_run": not_run}  # fmt: skip


def _metric(records: dict[tuple[str, str, int], dict[str, Any]], testbed: str, controller: str,
            seed: int, metric: str) -> float:  # fmt: skip
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


def format_testbed(name: str, data: dict[str, Any]) -> str:
    """Markdown table of one testbed."""
    metric = data["metric"]
    second = SECONDARY[data["kind"]]
    lines = [
        f"### {name} ({data['split']}; {data['description']}; {len(data['seeds'])} seeds)",
        "",
        f"| controller | {metric} (mean ± 95% CI) | {' | '.join(second)} | regret [95% CI] "
        f"| Δ vs T=1.0 | p Wilcoxon | p t-test | W/T/L vs T=1.0 | W/T/L vs best fixed "
        f"| mean T |",
        "|---|---|" + "---|" * len(second) + "---|---|---|---|---|---|---|",
    ]
    for c, row in data["controllers"].items():
        label = c + (" (best fixed)" if c == data["best_fixed"] else "") + (
            " (worst fixed)" if c == data["worst_fixed"] else "")
        reg = row["regret"]
        vs, vb = row["vs_fixed_1.0"], row["vs_best_fixed"]
        sec = " | ".join(_ci(row["secondary"][m]) for m in second)
        lines.append(
            f"| {label} | {_ci(row['mean_ci'])} | {sec} | {_num(reg['regret'])} "
            f"[{_num(reg['low'])}, {_num(reg['high'])}] | {_ci((vs['mean'], vs['half_width']))} "
            f"| {_p(vs['wilcoxon_p'])} | {_p(vs['t_p'])} "
            f"| {vs['wins']}/{vs['ties']}/{vs['losses']} "
            f"| {vb['wins']}/{vb['ties']}/{vb['losses']} | {row['mean_temperature']:.2f} |"
        )
    lines.append("")
    lines.append(
        f"Best fixed {data['best_fixed']}, worst fixed {data['worst_fixed']} (span of the fixed "
        f"means {_num(data['fixed_span'], 4)}). Regret = (best fixed - method) / (best fixed - "
        "worst fixed), paired bootstrap over seeds."
    )
    return "\n".join(lines)


def format_summary(analysis: dict[str, Any]) -> str:
    """The summary table: controllers x testbeds of normalised regret, worst cases."""
    order = analysis["order"]
    tbs = analysis["testbeds"]
    head = [f"{t}{' (dev)' if tbs[t]['split'] == DEVELOPMENT else ''}" for t in order]
    lines = [
        "| controller | " + " | ".join(head) + " | worst (dev) | worst (all) | beats T=1.0 on |",
        "|---|" + "---|" * len(order) + "---|---|---|",
    ]
    for c in analysis["controllers"]:
        s = analysis["summary"][c]
        cells = " | ".join("not run" if s["regret"][t] is None else _num(s["regret"][t])
                           for t in order)  # fmt: skip
        ran = s.get("ran_on", order)
        lines.append(
            f"| {c} | {cells} | {_num(s['worst_development'])} | {_num(s['worst_all'])} | "
            f"{len(s['beats_fixed_1.0_on'])}/{len(ran)} |"
        )
    best = " · ".join(f"{t}: {tbs[t]['best_fixed']}" for t in order)
    lines += ["", f"Best fixed arm per testbed: {best}.",
              "Normalised regret (0 = best fixed arm of the grid 0.6..1.5, 1 = worst; < 0 beats "
              "the best); 'beats T=1.0': mean > 0 and Wilcoxon p < 0.05, paired by seed, no "
              "correction across testbeds."]  # fmt: skip
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
    controllers = analysis["controllers"]
    cols = [*order, "worst (all)"]
    grid = np.array([[_nan_if_none(analysis["summary"][c]["regret"][t]) for t in order]
                     + [analysis["summary"][c]["worst_all"]] for c in controllers],
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
            ax.text(j, i, "not run" if not_run else _num(grid[i, j]), ha="center",
                    va="center", fontsize=7 if not_run else 8)
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(controllers)), controllers, fontsize=8)
    ax.axvline(len(order) - 0.5, color="black", linewidth=1.5)
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
