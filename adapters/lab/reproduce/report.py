"""The comparison report: markdown + JSON + PNG plots, computed from the runs' results only.

Example:
    >>> method_name("fixed-0.9"), method_name("linear-0.9-1.5"), method_name("tampo")
    ('GRPO, T = 0.9', 'GRPO, T linear 0.9 -> 1.5', 'TAMPO')
    >>> fmt(0.4123, 0.0131)
    '41.2 ± 1.3'
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from metactl.adapters.integrity import write_text_atomic

from ..machine import describe_machine, machine_facts

METRICS = {"pass1": "Pass@1 (avg@k at the evaluation temperature)", "greedy": "greedy Pass@1",
           "pass_at_k": "Pass@k"}


def method_name(controller: str) -> str:
    """Human-readable row label of a controller."""
    parts = controller.split("-")
    if parts[0] == "fixed":
        return f"GRPO, T = {parts[1]}"
    if parts[0] in ("linear", "cosine") and len(parts) == 3:
        return f"GRPO, T {parts[0]} {parts[1]} -> {parts[2]}"
    if controller == "tampo":
        return "TAMPO"
    if controller == "top-p":
        return "TAMPO over top-p"
    if controller == "tampo-joint":
        return "TAMPO over T x top-p"
    return f"GRPO + {controller}"


def fmt(mean: float, std: float | None = None) -> str:
    """Percent with one decimal, ``mean ± std`` when a std is given."""
    if std is None or not math.isfinite(std):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


# ----------------------------------------------------------------------------------------------
# aggregation and statistics
# ----------------------------------------------------------------------------------------------
def aggregate(results: Sequence[dict]) -> dict[str, Any]:
    """Per controller and benchmark: per-seed values, mean and std (ddof=1) of each metric."""
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["controller"], []).append(r)
    out: dict[str, Any] = {}
    for ctrl, runs in by.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        benches = list(runs[0]["final"].keys())
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "benchmarks": {}}
        for b in benches:
            entry["benchmarks"][b] = {}
            for m in runs[0]["final"][b]:
                vals = [r["final"][b][m] for r in runs]
                entry["benchmarks"][b][m] = {
                    "values": vals, "mean": float(np.mean(vals)),
                    "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan"),
                }
        temps = np.array([r["temperature"] for r in runs])
        q = max(1, temps.shape[1] // 4)
        entry["temperature_quarters"] = [float(temps[:, i:i + q].mean())
                                         for i in range(0, temps.shape[1], q)][:4]
        # the other sampler knobs of an arm that sets them (top-p, joint arms), likewise
        knobs = sorted({k for r in runs for k in r.get("settings", {})})
        if knobs:
            entry["knob_quarters"] = {}
            for k in knobs:
                per_step = np.array([r["settings"][k] for r in runs], dtype=float)
                entry["knob_quarters"][k] = [float(per_step[:, i:i + q].mean())
                                             for i in range(0, per_step.shape[1], q)][:4]
        entry["train_seconds"] = float(np.mean([r["train_seconds"] for r in runs]))
        entry["steps_per_second"] = float(np.mean([r["steps"] / r["train_seconds"] for r in runs]))
        if all("meta_seconds" in r for r in runs):
            entry["meta_share"] = float(np.mean([r["meta_seconds"] / r["train_seconds"]
                                                 for r in runs]))
        entry.update(_temperature_check(runs))
        out[ctrl] = entry
    return out


def _temperature_check(runs: Sequence[dict]) -> dict[str, float]:
    """What the trainer's effective-temperature check measured over an arm's runs: the median
    over steps of ``effective / chosen temperature`` (per-prompt arms: against the mean of the
    step's temperatures), the largest ``|z|`` and the check's share of the training time.
    Empty for runs without the check (it was off, or they predate it)."""
    ratios, zs = [], []
    for r in runs:
        effective = r.get("effective_temperature") or []
        for t, e, z in zip(r["temperature"], effective, r.get("effective_temperature_z") or [],
                           strict=False):
            if e is not None and z is not None and t:
                ratios.append(e / t)
                zs.append(abs(z))
    if not ratios:
        return {}
    out = {"effective_ratio_median": float(np.median(ratios)), "effective_max_abs_z":
           float(np.max(zs))}
    if all("check_seconds" in r for r in runs):
        out["check_share"] = float(np.mean([r["check_seconds"] / r["train_seconds"]
                                            for r in runs]))
    return out


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Paired comparison of per-seed values ``a - b``: mean, std, t-test and Wilcoxon p-values.

    Example:
        >>> r = paired([0.5, 0.6, 0.7], [0.4, 0.5, 0.5])
        >>> round(r["mean_diff"], 3), r["n"]
        (0.133, 3)
    """
    from scipy import stats

    a_, b_ = np.asarray(a, float), np.asarray(b, float)
    d = a_ - b_
    res: dict[str, Any] = {"n": len(d), "diffs": d.tolist(), "mean_diff": float(d.mean()),
                           "std_diff": float(d.std(ddof=1)) if len(d) > 1 else float("nan"),
                           "wins": int((d > 0).sum()), "losses": int((d < 0).sum())}
    res["t_p"] = float("nan")
    res["wilcoxon_p"] = float("nan")
    if len(d) > 1 and np.any(d != d[0]):
        res["t_p"] = float(stats.ttest_rel(a_, b_).pvalue)
    if len(d) > 1 and np.any(d != 0):
        res["wilcoxon_p"] = float(stats.wilcoxon(a_, b_).pvalue)
    return res


def _avg(summary: dict, ctrl: str, metric: str) -> dict:
    return summary[ctrl]["benchmarks"]["avg"][metric]


def sensitivity_check(summary: dict, start_info: dict) -> dict[str, Any]:
    """Does a fixed temperature change the result by more than seed noise? Compares the best and
    the worst fixed-T arm on each Avg metric: the gap between their means against twice the
    larger of their seed stds, with a paired t-test (seeds pair up: same prompts and RNG seed)."""
    fixed = [c for c in summary if c.startswith("fixed-")]
    out: dict[str, Any] = {"fixed_arms": fixed}
    tc = start_info.get("task_check")
    if tc:
        out["warmup_greedy_train"] = tc["greedy"]
        out["warmup_greedy_in_range"] = tc["greedy_in_range"]
    if len(fixed) < 2:
        out["verdict"] = "not checked (fewer than two fixed-temperature arms)"
        return out
    per_metric = {}
    for m in ("pass1", "greedy", "pass_at_k"):
        if m not in summary[fixed[0]]["benchmarks"]["avg"]:
            continue
        ranked = sorted(fixed, key=lambda c: _avg(summary, c, m)["mean"])
        worst, best = ranked[0], ranked[-1]
        gap = _avg(summary, best, m)["mean"] - _avg(summary, worst, m)["mean"]
        noise = max(_avg(summary, best, m)["std"], _avg(summary, worst, m)["std"])
        common = sorted(set(summary[best]["seeds"]) & set(summary[worst]["seeds"]))
        vb = dict(zip(summary[best]["seeds"], _avg(summary, best, m)["values"], strict=True))
        vw = dict(zip(summary[worst]["seeds"], _avg(summary, worst, m)["values"], strict=True))
        test = paired([vb[s] for s in common], [vw[s] for s in common])
        per_metric[m] = {"best": best, "worst": worst, "gap": gap, "max_seed_std": noise,
                         "beyond_noise": bool(math.isfinite(noise) and gap > 2 * noise),
                         "paired_t_p": test["t_p"]}
    out["metrics"] = per_metric
    ok = per_metric.get("pass1", {}).get("beyond_noise", False) or per_metric.get(
        "greedy", {}).get("beyond_noise", False)
    out["temperature_matters"] = bool(ok)
    return out


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------
def _smooth(x: np.ndarray, w: int) -> np.ndarray:
    if w <= 1 or len(x) < w:
        return x
    return np.convolve(x, np.ones(w) / w, mode="valid")


#: up to this many distinct contexts get a line each in the per-context temperature plot
CONTEXT_LINES = 12


def context_temperature_table(steps: Sequence[dict]) -> tuple[list, np.ndarray]:
    """From a run's ``context_temperatures`` (per step: ``contexts`` and their
    ``temperatures``): the distinct keys (first appearance order) and an (steps, keys) array of
    each key's temperature at each step (the mean of its decisions that step; NaN where the
    key was not in the batch).

    Example:
        >>> keys, table = context_temperature_table([
        ...     {"contexts": [1, 2, 1], "temperatures": [0.8, 1.2, 1.0]},
        ...     {"contexts": [2], "temperatures": [1.4]}])
        >>> keys, table.round(2).tolist()
        ([1, 2], [[0.9, 1.2], [nan, 1.4]])
    """
    keys: dict[Any, int] = {}
    for entry in steps:
        for key in entry["contexts"]:
            keys.setdefault(key, len(keys))
    total = np.zeros((len(steps), len(keys)))
    count = np.zeros((len(steps), len(keys)))
    for i, entry in enumerate(steps):
        if len(entry["contexts"]) != len(entry["temperatures"]):
            raise ValueError(f"context_temperatures[{i}]: {len(entry['contexts'])} contexts "
                             f"but {len(entry['temperatures'])} temperatures")
        for key, value in zip(entry["contexts"], entry["temperatures"], strict=True):
            total[i, keys[key]] += value
            count[i, keys[key]] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        table = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return list(keys), table


def _plot_context_temperatures(ax: Any, steps: Sequence[dict]) -> None:
    """A line per context (few contexts), else the median and the 10-90% band over the
    step's contexts plus the three most frequent contexts."""
    keys, table = context_temperature_table(steps)
    x = np.arange(table.shape[0])
    if len(keys) <= CONTEXT_LINES:
        order = sorted(range(len(keys)), key=lambda j: (type(keys[j]).__name__, keys[j]))
        for j in order:
            key = keys[j]
            seen = ~np.isnan(table[:, j])
            ax.plot(x[seen], table[seen, j], lw=1, label=f"context {key}")
        ax.legend(fontsize=6, ncol=2)
        return
    lo, mid, hi = (np.array([np.quantile(row[~np.isnan(row)], q) for row in table])
                   for q in (0.1, 0.5, 0.9))
    ax.fill_between(x, lo, hi, alpha=0.25, color="tab:blue", label="10-90% over contexts")
    ax.plot(x, mid, color="tab:blue", label=f"median over the step's contexts "
                                            f"({len(keys)} distinct)")
    frequent = np.argsort(-np.sum(~np.isnan(table), axis=0), kind="stable")[:3]
    for j in frequent:
        seen = ~np.isnan(table[:, j])
        ax.plot(x[seen], table[seen, j], lw=0.8, alpha=0.8, label=f"context {keys[j]}")
    ax.legend(fontsize=6)


def make_plots(out: Path, results: Sequence[dict], controllers: Sequence[str]) -> dict[str, str]:
    """Write the PNG figures; returns {figure id: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metactl.likelihood import likelihood_optimal

    figs: dict[str, str] = {}
    by = {c: [r for r in results if r["controller"] == c] for c in controllers}
    colors = {c: plt.cm.tab10(i % 10) for i, c in enumerate(controllers)}

    # learning curves (curve subsets, evaluated during training)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, m in zip(axes, ("greedy", "pass1"), strict=True):
        for c, runs in by.items():
            if not runs or not runs[0]["curve"]:
                continue
            steps = [e["step"] for e in runs[0]["curve"]]
            vals = np.array([[e["avg"][m] for e in r["curve"]] for r in runs])
            mu, sd = vals.mean(0), vals.std(0)
            ax.plot(steps, 100 * mu, label=method_name(c), color=colors[c])
            ax.fill_between(steps, 100 * (mu - sd), 100 * (mu + sd), alpha=0.15, color=colors[c])
        ax.set_xlabel("GRPO step")
        ax.set_ylabel(f"Avg {METRICS[m].split(' (')[0]} (%)")
        ax.set_title(f"learning curves: {METRICS[m]}", fontsize=9)
    if axes[0].get_legend_handles_labels()[0]:  # no curve points: nothing to name
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=110)
    plt.close(fig)
    figs["learning_curves"] = "learning_curves.png"

    # chosen temperature and training reward over training, then one panel per other knob
    # that an arm sets (top_p, ...), showing those arms only
    extra = sorted({k for r in results for k in r.get("settings", {})})
    fig, axes = plt.subplots(1, 2 + len(extra), figsize=(5.5 * (2 + len(extra)), 4))
    for j, knob in enumerate(extra):
        ax = axes[2 + j]
        for c, runs in by.items():
            with_knob = [r for r in runs if knob in r.get("settings", {})]
            if not with_knob:
                continue
            vals = np.array([r["settings"][knob] for r in with_knob], dtype=float)
            w = max(1, vals.shape[1] // 30)
            ax.plot(_smooth(vals.mean(0), w), label=method_name(c), color=colors[c])
            for v in vals:
                ax.plot(_smooth(v, w), color=colors[c], alpha=0.25, lw=0.7)
        ax.set_title(f"chosen {knob} (arms that set it; mean over seeds)", fontsize=9)
        ax.set_xlabel("GRPO step")
        ax.set_ylabel(knob)
        ax.legend(fontsize=7)
    for c, runs in by.items():
        if not runs:
            continue
        temps = np.array([r["temperature"] for r in runs])
        w = max(1, temps.shape[1] // 30)
        axes[0].plot(_smooth(temps.mean(0), w), label=method_name(c), color=colors[c])
        if not c.startswith("fixed-") and not c.startswith(("linear", "cosine")):
            for t in temps:
                axes[0].plot(_smooth(t, w), color=colors[c], alpha=0.25, lw=0.7)
        rew = np.array([r["reward"] for r in runs]).mean(0)
        axes[1].plot(_smooth(rew, w), label=method_name(c), color=colors[c])
    axes[0].set_title("chosen temperature (mean over seeds; thin: single seeds)", fontsize=9)
    axes[0].set_xlabel("GRPO step")
    axes[0].set_ylabel("T")
    axes[1].set_title("training reward (at the sampling temperature)", fontsize=9)
    axes[1].set_xlabel("GRPO step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "temperature.png", dpi=110)
    plt.close(fig)
    figs["temperature"] = "temperature.png"

    # per-prompt arms: the temperature of every context (prompt or bucket) over training
    per_prompt = [c for c in controllers if any(r.get("context_temperatures") for r in by[c])]
    if per_prompt:
        fig, axes = plt.subplots(1, len(per_prompt), figsize=(5.5 * len(per_prompt), 4),
                                 squeeze=False)
        for ax, c in zip(axes[0], per_prompt, strict=True):
            run = min((r for r in by[c] if r.get("context_temperatures")),
                      key=lambda r: r["seed"])
            _plot_context_temperatures(ax, run["context_temperatures"])
            ax.set_title(f"{method_name(c)}: temperature per context (seed {run['seed']})",
                         fontsize=9)
            ax.set_xlabel("GRPO step")
            ax.set_ylabel("T")
        fig.tight_layout()
        fig.savefig(out / "context_temperature.png", dpi=110)
        plt.close(fig)
        figs["context_temperature"] = "context_temperature.png"

    # the paper's diagnostics, from every run that recorded likelihoods (TAMPO first)
    # (temperature arms first; a joint arm's candidates are settings, not points on one axis,
    # so its likelihoods are in its result.json but not in this figure)
    diag_runs = [r for r in results
                 if r.get("diagnostics") and len(r.get("knobs", ["temperature"])) == 1]
    diag_runs.sort(key=lambda r: (r.get("knobs", ["temperature"]) != ["temperature"],
                                  r["controller"] != "tampo", r["controller"], r["seed"]))
    if diag_runs:
        ctrl = diag_runs[0]["controller"]
        runs = [r for r in diag_runs if r["controller"] == ctrl]
        cands = np.asarray(runs[0]["candidates"])
        knob = runs[0].get("knobs", ["temperature"])[0]
        symbol = "T" if knob == "temperature" else knob
        n_d = len(runs[0]["diagnostics"])
        fig, axes = plt.subplots(2, n_d, figsize=(4 * n_d, 7), squeeze=False)
        for j, d in enumerate(runs[0]["diagnostics"]):
            ax = axes[0, j]
            ll, adv = np.asarray(d["loglik"]), np.asarray(d["advantages"])
            pos, neg = np.flatnonzero(adv > 0)[:3], np.flatnonzero(adv < 0)[:3]
            for i in pos:
                ax.plot(cands, ll[i], "-o", ms=3, color="tab:green", lw=1)
            for i in neg:
                ax.plot(cands, ll[i], "-o", ms=3, color="tab:red", lw=1)
            ax.set_title(f"{method_name(ctrl)} seed {runs[0]['seed']}, step {d['step']} "
                         f"({symbol} = {d.get(knob, d['temperature']):.2f})", fontsize=8)
            ax.set_xlabel(f"candidate {knob}")
            ax.set_ylabel("length-normalised log-likelihood")
            ax.plot([], [], color="tab:green", label="A > 0")
            ax.plot([], [], color="tab:red", label="A < 0")
            ax.legend(fontsize=7)
            ax = axes[1, j]
            tpos, tneg = [], []
            for r in runs:
                dd = r["diagnostics"][j]
                ll, adv = np.asarray(dd["loglik"]), np.asarray(dd["advantages"])
                ts = likelihood_optimal(ll, cands)
                tpos += list(ts[adv > 0])
                tneg += list(ts[adv < 0])
            half = float(np.min(np.diff(np.sort(cands)))) / 2  # 0.05 on the paper grid
            bins = np.concatenate([np.sort(cands) - half, [float(cands.max()) + half]])
            ax.hist([tpos, tneg], bins=bins, label=[f"A > 0 (n={len(tpos)})",
                                                     f"A < 0 (n={len(tneg)})"],
                    color=["tab:green", "tab:red"])
            ax.set_xlabel(f"likelihood-optimal {knob} {symbol}*")
            ax.set_ylabel("trajectories")
            ax.set_title(f"{symbol}* by advantage sign, step {d['step']} (all seeds)",
                         fontsize=8)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "diagnostics.png", dpi=110)
        plt.close(fig)
        figs["diagnostics"] = "diagnostics.png"

        # the meta-policy's probabilities over training (first seed)
        probs = np.asarray(runs[0]["probs"])
        fig, ax = plt.subplots(figsize=(7, 3.5))
        im = ax.imshow(probs.T, aspect="auto", origin="lower", cmap="viridis",
                       extent=(0, runs[0]["steps"], -0.5, len(cands) - 0.5))
        ax.set_yticks(range(len(cands)), [f"{c:g}" for c in cands])
        ax.set_xlabel("GRPO step")
        ax.set_ylabel(f"candidate {symbol}")
        ax.set_title(f"{method_name(ctrl)} meta-policy probabilities (seed {runs[0]['seed']})",
                     fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / "meta_policy.png", dpi=110)
        plt.close(fig)
        figs["meta_policy"] = "meta_policy.png"

    # why the likelihood rules moved where they did: their signal, every step (TAMPO first)
    from ..signal_plot import plot_signal_diagnostics, stack_runs

    signal_arms: dict[str, list] = {}
    # (its axes are temperatures: arms over other knobs keep their signal in result.json)
    for c in sorted(controllers, key=lambda c: (c != "tampo", c)):
        stacked = [stack_runs(r["signal"]) for r in sorted(by[c], key=lambda r: r["seed"])
                   if r.get("signal") and "knobs" not in r]
        kept = [run for run in stacked if run is not None]
        if kept and len(kept) == len(stacked):
            signal_arms[method_name(c)] = kept
    if signal_arms:
        cands = next(np.asarray(r["candidates"]) for r in results
                     if r.get("signal") and "knobs" not in r)
        plot_signal_diagnostics(signal_arms, cands, out / "signal_diagnostics.png",
                                title="Why the likelihood rules moved where they did "
                                      "(reference task; signal a_k of every step)")
        figs["signal_diagnostics"] = "signal_diagnostics.png"
    return figs


# ----------------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------------
def results_table(summary: dict, start_info: dict, metric: str,
                  controllers: Sequence[str]) -> str:
    """The paper-shaped table: rows = methods, columns = benchmarks + Avg (mean ± std, %)."""
    first = summary[controllers[0]]["benchmarks"]
    benches = [b for b in first if b != "avg"]
    lines = ["| method | Avg | " + " | ".join(benches) + " |",
             "|---|---|" + "---|" * len(benches)]
    base = start_info.get("base")
    if base and metric in base.get("avg", {}):
        lines.append("| start model, no RL | " + fmt(base["avg"][metric]) + " | "
                     + " | ".join(fmt(base[b][metric]) for b in benches) + " |")
    for c in controllers:
        bm = summary[c]["benchmarks"]
        cells = [fmt(bm[b][metric]["mean"], bm[b][metric]["std"]) for b in ["avg", *benches]]
        lines.append(f"| {method_name(c)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _p(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.3g}"


def write_report(out: Path, cfg: Any, start_info: dict, results: Sequence[dict],
                 wall_seconds: float) -> Path:
    """Write ``report.md``, ``report.json`` and the figures into ``out``; return the md path."""
    out = Path(out)
    controllers = [c for c in cfg.controllers if any(r["controller"] == c for r in results)]
    summary = aggregate(results)
    check = sensitivity_check(summary, start_info)
    fixed = [c for c in controllers if c.startswith("fixed-")]
    comparisons: dict[str, Any] = {}
    if "tampo" in summary and fixed:
        best = max(fixed, key=lambda c: _avg(summary, c, "pass1")["mean"])
        common = sorted(set(summary["tampo"]["seeds"]) & set(summary[best]["seeds"]))
        comparisons = {"best_fixed": best, "metrics": {}}
        for m in ("pass1", "greedy", "pass_at_k"):
            ta = dict(zip(summary["tampo"]["seeds"], _avg(summary, "tampo", m)["values"],
                          strict=True))
            fb = dict(zip(summary[best]["seeds"], _avg(summary, best, m)["values"], strict=True))
            comparisons["metrics"][m] = paired([ta[s] for s in common], [fb[s] for s in common])
        comparisons["vs_each"] = {}
        for c in controllers:
            if c == "tampo":
                continue
            ta = dict(zip(summary["tampo"]["seeds"], _avg(summary, "tampo", "pass1")["values"],
                          strict=True))
            cc = dict(zip(summary[c]["seeds"], _avg(summary, c, "pass1")["values"], strict=True))
            cs = sorted(set(ta) & set(cc))
            comparisons["vs_each"][c] = paired([ta[s] for s in cs], [cc[s] for s in cs])
    figs = make_plots(out, results, controllers)
    k = cfg.eval.k
    short = {"pass1": "Pass@1", "greedy": "greedy Pass@1", "pass_at_k": f"Pass@{k}"}

    md: list[str] = [f"# metactl reproduce: {cfg.preset} preset", ""]
    md.append(f"{len(controllers)} methods x {len(cfg.seeds)} seeds, {cfg.grpo.steps} GRPO steps "
              f"each ({cfg.grpo.prompts_per_step} prompts x G={cfg.grpo.group_size}); "
              f"evaluation: {cfg.eval.n_per_benchmark} problems per benchmark, Pass@1 = avg@{k} "
              f"at T = {cfg.eval.temperature:g}, Pass@{k} from the same {k} samples, greedy "
              f"Pass@1. Wall time {wall_seconds / 60:.1f} min with {cfg.workers} worker(s). "
              "All numbers are computed by this run; mean ± std over seeds (std with ddof=1).")
    md.append("")
    md.append("## 1. Task check (before judging controllers)")
    if "model" in start_info:
        mi = start_info["model"]
        md.append(f"Start model: {mi['description']} as packaged, no warm-up (the pretrained "
                  f"model). Task: {mi['task']} in the model's chat template; "
                  f"{mi['heldout']} of its {mi['distinct_problems']} distinct problems are held "
                  "out for evaluation, training draws from the rest.")
    if "warmup" in start_info:
        w = start_info["warmup"]
        md.append(f"Warm-up checkpoint `{w['key']}` ({w['n_parameters']:,} parameters, "
                  f"{w['steps']} SFT steps, final loss {w['final_loss']:.3f}).")
    tc = start_info.get("task_check")
    if tc:
        rng_ok = "inside" if tc["greedy_in_range"] else "OUTSIDE"
        lo, hi = tc.get("greedy_range", (0.10, 0.60))
        md.append(f"- Greedy accuracy of the warm-up model on {tc['n']} fresh training-distribution"
                  f" problems: **{100 * tc['greedy']:.1f}%** ({rng_ok} the required "
                  f"{100 * lo:g}-{100 * hi:g}%).")
        samp = ", ".join(f"T={key.split('@')[1]}: {100 * v:.1f}%" for key, v in tc.items()
                         if key.startswith("sampled@"))
        md.append(f"- Sampled accuracy (avg@4) at each temperature before RL: {samp}.")
    if "metrics" in check:
        md.append("- Does a fixed temperature change the RL result by more than seed noise? "
                  "Best vs worst fixed-T arm (gap of means vs twice the larger seed std; paired "
                  "t-test over seeds):")
        md.append("")
        md.append("| metric (Avg) | best fixed | worst fixed | gap (points) | 2 x max seed std "
                  "| paired t p | beyond noise |")
        md.append("|---|---|---|---|---|---|---|")
        for m, v in check["metrics"].items():
            md.append(f"| {short[m]} | {method_name(v['best'])} | "
                      f"{method_name(v['worst'])} | {100 * v['gap']:.1f} | "
                      f"{200 * v['max_seed_std']:.1f} | {_p(v['paired_t_p'])} | "
                      f"{'yes' if v['beyond_noise'] else 'no'} |")
        md.append("")
        if check["temperature_matters"]:
            md.append("Verdict: the fixed temperature changes the result by more than seed noise "
                      "on this task at this budget.")
        else:
            md.append("Verdict: the fixed temperature does NOT change the result by more than "
                      "seed noise here, so the controller comparison below is not informative.")
    else:
        md.append(f"- {check.get('verdict', '')}")
    md.append("")
    for i, m in enumerate(("pass1", "greedy", "pass_at_k"), start=2):
        label = METRICS[m].replace("avg@k", f"avg@{k}").replace("Pass@k", f"Pass@{k}")
        md.append(f"## {i}. {label} (%)")
        md.append(results_table(summary, start_info, m, controllers))
        md.append("")
    md.append("## 5. TAMPO vs the best fixed temperature (paired over seeds)")
    if comparisons:
        best_name = method_name(comparisons["best_fixed"])
        md.append(f"Best fixed arm by mean Avg Pass@1: **{best_name}**.")
        md.append("")
        md.append("| metric (Avg) | TAMPO - best fixed (points) | std of diff | wins/losses | "
                  "paired t p | Wilcoxon p |")
        md.append("|---|---|---|---|---|---|")
        for m, v in comparisons["metrics"].items():
            md.append(f"| {short[m]} | {100 * v['mean_diff']:+.1f} | "
                      f"{100 * v['std_diff']:.1f} | {v['wins']}/{v['losses']} | {_p(v['t_p'])} | "
                      f"{_p(v['wilcoxon_p'])} |")
        md.append("")
        md.append("TAMPO vs every arm, Avg Pass@1: " + "; ".join(
            f"{method_name(c)} {100 * v['mean_diff']:+.1f} (p={_p(v['t_p'])})"
            for c, v in comparisons["vs_each"].items()) + ".")
    else:
        md.append("Not available (needs a `tampo` arm and at least one fixed arm).")
    md.append("")
    md.append("## 6. Temperature over training and speed")
    md.append("| method | mean T per quarter of training (other knobs an arm sets, likewise) | "
              "steps/s (per worker) | meta step share of step time | effective T / chosen T "
              "(median; max abs z) | temperature check share |")
    md.append("|---|---|---|---|---|---|")
    for c in controllers:
        q = ", ".join(f"{t:.2f}" for t in summary[c]["temperature_quarters"])
        for knob, quarters in summary[c].get("knob_quarters", {}).items():
            q += f"; {knob} " + ", ".join(f"{v:.2f}" for v in quarters)
        share = summary[c].get("meta_share")
        share_s = "n/a" if share is None else f"{100 * share:.2f}%"
        ratio = summary[c].get("effective_ratio_median")
        ratio_s = "n/a" if ratio is None else (
            f"{ratio:.2f} ({summary[c]['effective_max_abs_z']:.1f})")
        check = summary[c].get("check_share")
        check_s = "n/a" if check is None else f"{100 * check:.2f}%"
        md.append(f"| {method_name(c)} | {q} | {summary[c]['steps_per_second']:.2f} | "
                  f"{share_s} | {ratio_s} | {check_s} |")
    md.append("")
    md.append("Effective T: the temperature the sampled tokens came from, estimated after every "
              "rollout from the sampling loop's own logits (metactl.effective_temperature; "
              "per-prompt arms against the mean of the step's temperatures); 1.00 means the "
              "sampler applied the chosen temperature, and a run whose tokens departed from it "
              "(beyond the calibrated tolerance) stops with an error.")
    md.append("")
    md.append("## 7. Figures")
    captions = {
        "learning_curves": "Learning curves (Avg over the benchmarks' curve subsets).",
        "temperature": "Chosen temperature (per-prompt arms: the mean over the step's prompts) "
                       "and training reward over training.",
        "diagnostics": "Paper diagnostics: likelihood-vs-temperature curves of a few trajectories"
                       " (top) and histograms of each trajectory's likelihood-optimal temperature "
                       "split by advantage sign (bottom).",
        "meta_policy": "Meta-policy probabilities over training.",
        "signal_diagnostics": "Why the likelihood rules moved where they did, from every step's "
                              "signal a_k: (a) sampling T and the candidate each step favoured "
                              "(area ~ the step's spread), (b) spread vs sampling T, (c) the "
                              "summed centred signal by sampling T, (d) the sparsemax support "
                              "size, (e) the within-group correlation of T* and advantage.",
        "context_temperature": "Per-prompt arms: the temperature of each context (a pool "
                               "prompt, or a chain-length bucket) over training, first seed.",
    }
    for key, fname in figs.items():
        md.append(f"{captions[key]}\n\n![{key}]({fname})\n")
    machine = machine_facts()
    md.append(f"Machine: {describe_machine(machine)}. Each run is deterministic on one machine; "
              "another machine (other CPU kernels, torch build or BLAS) changes the last bits of "
              "the arithmetic, which sends each run down another path, as another seed would: "
              "compare arms within one report, not digits across machines. Timings are this "
              "machine's; on a shared machine they are pessimistic.")
    path = out / "report.md"
    write_text_atomic(path, "\n".join(md) + "\n")
    payload = {"config": cfg.to_dict(), "start": start_info, "summary": summary,
               "task_check": check, "tampo_vs_best_fixed": comparisons,
               "wall_seconds": wall_seconds, "figures": figs, "machine": machine}
    write_text_atomic(out / "report.json", json.dumps(_finite(payload), indent=2,
                                                      default=_json_default, allow_nan=False))
    return path


def _finite(o: Any) -> Any:
    """Replace NaN/inf floats (e.g. the std of a single seed) by None, so the JSON is strict."""
    if isinstance(o, np.ndarray):
        return _finite(o.tolist())
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, (float, np.floating)) and not math.isfinite(float(o)):
        return None
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (tuple, set, frozenset)):
        return list(o)
    return str(o)
