"""Multi-seed study: every sampling controller on ``TokenSearch`` under one GRPO learner.

Runs each controller (TAMPO with the paper's defaults, TAMPO with a softmax normaliser, Hedge,
MetaGradient, EXP3, the E3 entropy controller, a fixed temperature at every candidate 0.6..1.5,
the linear 0.9 -> 1.5 schedule, ..., and two arms over other knobs: ``top-p``, TAMPO (paper
defaults) over top-p in (0.8, 0.85, 0.9, 0.95, 1.0) at T = 1.0, and ``tampo-joint``, TAMPO over
the joint grid temperature 0.6..1.5 x top-p (0.9, 1.0), K = 20) for ``--seeds`` seeds. Seed
``s`` fixes the task set (``task_seed = s``), the rollout sampler and the meta-policy's own RNG,
so runs with the same seed are paired across controllers (``--task-seed-offset`` shifts the
task sets: ``task_seed = offset + s``). Every option of the environment (``--prior-margin``
for the sharpness of the starting policy included) and of the learner is a flag; every
argument, ``--out`` included, is validated before any run starts (one-line error, exit
status 2).

Reported per controller: final success rate and area under the learning curve (exact success rate
of the learned policy at ``T_eval = 1``, averaged over the evaluations before every step and after
the last), each as mean +- 95% CI (Student t over seeds), and a paired Wilcoxon signed-rank test of
the AUC against the best fixed temperature (chosen post hoc by mean AUC). The table also gives
the final greedy (argmax) success, which no evaluation temperature can favour, the mean
temperature over the first and the last tenth of training and, for an arm that sets another
knob (top-p, ...), that knob's mean over the first and the last tenth.

Writes into ``--out``: ``results.md`` and ``results.json`` (the table), ``runs.npz`` (every run's
curves: ``temperature``, ``top_p``, ``top_k`` (0: off) and ``min_p`` per step; ``probs`` when
every arm has the same K, else ``probs/<controller>``), ``learning_curves.png``,
``temperature.png`` (every knob an arm sets) and ``meta_probs.png``; for the
likelihood rules (TAMPO and its variants, Hedge, MetaGradient), ``signal.npz`` (every step's
:func:`metactl.diagnostics.signal_diagnostics`, keys ``<controller>/<field>``, one row per seed
as in ``<controller>/seed``) and, for the TAMPO arms, ``signal_diagnostics.png`` (why TAMPO
moved where it did: :mod:`metactl.adapters.lab.signal_plot`).

Example
-------
>>> import tempfile
>>> from metactl.adapters.lab.gym_study import main
>>> out = tempfile.mkdtemp()
>>> main(["--seeds", "2", "--steps", "5", "--controllers", "tampo,fixed-1.0",
...       "--workers", "1", "--out", out, "--quiet", "--no-plots"])
0
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from metactl.adapters.gym.env import FAMILIES, TokenSearchConfig, TokenSearchEnv
from metactl.adapters.gym.learner import GRPOConfig
from metactl.adapters.gym.training import train

import metactl

from .commands import OneLineErrorParser, check_writable_dir, parse_name_list
from .controllers import GRID, STUDY_ARMS, make_policy

__all__ = ["StudyConfig", "main", "make_controller", "run_one", "summarise"]


@dataclass(frozen=True)
class StudyConfig:
    """Everything one run needs besides the controller and the seed (validated)."""

    steps: int = 200
    group_size: int = 8
    lr: float = 0.1
    optimizer: str = "adam"
    vocab_size: int = 16
    length: int = 6
    num_tasks: int = 6
    families: tuple[str, ...] = FAMILIES
    reward: str = "exact"
    deceptive: bool = True
    prior_margin: float = 4.0
    prior_margins: tuple[float, ...] | None = None
    """Mixed sharpness: task ``i``'s margin ``prior_margins[i % len]``."""
    prior_margin_range: tuple[float, float] | None = None
    """Mixed sharpness: each task's margin drawn from ``[low, high]``."""
    shoulder_gap: float = 1.5
    noise_scale: float = 0.3
    task_seed_offset: int = 0
    """Run ``seed`` uses the task set ``task_seed = task_seed_offset + seed``."""
    entropy_target: float = 0.3
    eval_temperature: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 2:
            raise ValueError(f"steps must be an int >= 2, got {self.steps!r}")
        offset = self.task_seed_offset
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"task_seed_offset must be an int >= 0, got {offset!r}")
        for name in ("entropy_target", "eval_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(value).__name__}")
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be finite and > 0, got {value}")
        self.env_config()  # validates the environment's fields
        self.learner_config()  # validates the learner's fields

    def env_config(self, task_seed: int = 0) -> TokenSearchConfig:
        """The environment configuration of run seed ``task_seed`` (plus the offset): every
        other field of :class:`TokenSearchConfig` is this config's field of the same name."""
        shared = {f.name: getattr(self, f.name) for f in fields(TokenSearchConfig)
                  if f.name != "task_seed"}
        shared["families"] = tuple(self.families)
        return TokenSearchConfig(**shared, task_seed=self.task_seed_offset + task_seed)

    def learner_config(self) -> GRPOConfig:
        """The learner configuration."""
        return GRPOConfig(
            group_size=self.group_size,
            lr=self.lr,
            optimizer=self.optimizer,  # type: ignore[arg-type]
            eval_temperature=self.eval_temperature,
        )


#: The arms that get a panel in ``temperature.png`` (their setting changes over a run), and
#: whose meta-policy probabilities ``meta_probs.png`` draws (all but ``entropy``).
ADAPTIVE = ("tampo", "tampo-softmax", "hedge", "metagradient", "exp3", "entropy", "top-p",
            "tampo-joint")  # fmt: skip
#: The knobs a run's log records per step (TrainLog.knobs), as ``runs.npz`` keys.
KNOB_KEYS: tuple[str, ...] = ("temperature", "top_p", "top_k", "min_p")


def candidate_labels(policy: metactl.MetaPolicy) -> list[str]:
    """One label per candidate: ``"1.2"`` for a one-knob policy, ``"temperature=1.2,top_p=0.9"``
    for a joint one.

    >>> candidate_labels(make_controller("tampo-joint", StudyConfig(), seed=0))[:2]
    ['temperature=0.6,top_p=0.9', 'temperature=0.6,top_p=1']
    """
    return [
        ",".join(f"{k}={v:g}" for k, v in policy.setting(i).items()) if len(policy.knobs) > 1
        else f"{next(iter(policy.setting(i).values())):g}"
        for i in range(policy.num_candidates)
    ]  # fmt: skip


def make_controller(name: str, config: StudyConfig, seed: int) -> metactl.MetaPolicy:
    """Build controller ``name`` (a name of :mod:`metactl.adapters.lab.controllers`) for one run
    of ``config``: its steps, and its entropy target for ``entropy`` and ``entropy-schedule``.

    >>> make_controller("fixed-1.2", StudyConfig(), seed=0).select().value
    1.2
    """
    if not isinstance(config, StudyConfig):
        raise TypeError(f"config must be a StudyConfig, got {type(config).__name__}")
    return make_policy(name, steps=config.steps, seed=seed, entropy_target=config.entropy_target)


def run_one(job: tuple[str, int, StudyConfig]) -> dict[str, Any]:
    """Run controller ``name`` with ``seed``; returns the run's curves as arrays."""
    name, seed, config = job
    env = TokenSearchEnv(config.env_config(task_seed=seed))
    policy = make_controller(name, config, seed)
    log = train(policy, env, config.steps, config.learner_config(), seed=seed)
    return {
        "controller": name,
        "seed": seed,
        "knobs": policy.knobs,
        "candidate_labels": candidate_labels(policy),
        "success": log.success,
        "greedy": log.greedy,
        "temperature": log.temperature,
        **{knob: log.knobs[knob] for knob in KNOB_KEYS if knob != "temperature"},
        "probs": log.probs,
        "reward": log.reward,
        "entropy": log.entropy,
        "auc": log.auc,
        "final": log.final_success,
        "signal": log.signal,  # a likelihood rule's per-step signal diagnostics, else None
    }


# ---------------------------------------------------------------------------------- statistics
def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the Student-t confidence interval of the mean.

    >>> m, h = mean_ci(np.array([1.0, 2.0, 3.0]))
    >>> round(m, 3), round(h, 3)
    (2.0, 2.484)
    """
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    if n < 2:
        return float(values.mean()), float("nan")
    sem = values.std(ddof=1) / np.sqrt(n)
    return float(values.mean()), float(stats.t.ppf(0.5 + level / 2, n - 1) * sem)


def paired_pvalue(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of ``a - b`` (1.0 when all differences are 0)."""
    from scipy import stats

    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diff.shape[0] < 2 or np.allclose(diff, 0.0):
        return 1.0
    return float(stats.wilcoxon(diff).pvalue)


def summarise(results: list[dict[str, Any]], controllers: list[str]) -> dict[str, Any]:
    """Aggregate runs into the comparison table (rows in ``controllers`` order)."""
    from scipy import stats

    by_name: dict[str, dict[int, dict[str, Any]]] = {}
    for run in results:
        by_name.setdefault(run["controller"], {})[run["seed"]] = run
    seeds = sorted(set.intersection(*(set(v) for v in by_name.values())))
    auc = {c: np.array([by_name[c][s]["auc"] for s in seeds]) for c in controllers}
    final = {c: np.array([by_name[c][s]["final"] for s in seeds]) for c in controllers}
    greedy = {c: np.array([by_name[c][s]["greedy"][-1] for s in seeds]) for c in controllers}
    fixed = [c for c in controllers if c.startswith("fixed-")]
    best_fixed = max(fixed, key=lambda c: auc[c].mean()) if fixed else None
    rows = []
    for c in controllers:
        temps = np.array([by_name[c][s]["temperature"] for s in seeds])
        tenth = max(temps.shape[1] // 10, 1)
        row: dict[str, Any] = {
            "controller": c,
            "final": mean_ci(final[c]),
            "auc": mean_ci(auc[c]),
            "final_greedy": mean_ci(greedy[c]),
            "mean_temperature": float(temps.mean()),
            "temperature_first_tenth": float(temps[:, :tenth].mean()),
            "temperature_last_tenth": float(temps[:, -tenth:].mean()),
        }
        # the other knobs the arm sets (a top-p or joint arm): first and last tenth
        knobs = by_name[c][seeds[0]].get("knobs", ("temperature",)) if seeds else ()
        other: dict[str, dict[str, float]] = {}
        for knob in knobs:
            if knob != "temperature":
                values = np.array([by_name[c][s][knob] for s in seeds])
                other[knob] = {
                    "mean": float(values.mean()),
                    "first_tenth": float(values[:, :tenth].mean()),
                    "last_tenth": float(values[:, -tenth:].mean()),
                }
        row["knobs"] = list(knobs)
        row["other_knobs"] = other
        if best_fixed is not None and c != best_fixed:
            row["delta_auc"] = mean_ci(auc[c] - auc[best_fixed])
            row["p_auc"] = paired_pvalue(auc[c], auc[best_fixed])
            row["p_final"] = paired_pvalue(final[c], final[best_fixed])
        rows.append(row)
    spread: dict[str, Any] = {}
    if len(fixed) >= 3 and len(seeds) >= 2:
        worst = min(fixed, key=lambda c: auc[c].mean())
        spread = {
            "best": best_fixed,
            "worst": worst,
            "delta_auc": mean_ci(auc[best_fixed] - auc[worst]),  # type: ignore[index]
            "friedman_p": float(stats.friedmanchisquare(*(auc[c] for c in fixed)).pvalue),
        }
    return {"seeds": seeds, "best_fixed": best_fixed, "rows": rows, "fixed_spread": spread}


def _fmt(pair: tuple[float, float]) -> str:
    mean, half = pair
    return f"{mean:.3f} ± {half:.3f}"


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a markdown table plus notes."""
    best = summary["best_fixed"]
    lines = [
        "| controller | final success | AUC | ΔAUC vs best fixed | p (AUC) | p (final) "
        "| final greedy | mean T | T first → last 10% | other knobs first → last 10% |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        name = row["controller"] + (" (best fixed)" if row["controller"] == best else "")
        delta = _fmt(row["delta_auc"]) if "delta_auc" in row else "-"
        p_auc = f"{row['p_auc']:.3g}" if "p_auc" in row else "-"
        p_fin = f"{row['p_final']:.3g}" if "p_final" in row else "-"
        others = "; ".join(
            f"{knob} {v['first_tenth']:.3g} → {v['last_tenth']:.3g}"
            for knob, v in row.get("other_knobs", {}).items()
        )
        lines.append(
            f"| {name} | {_fmt(row['final'])} | {_fmt(row['auc'])} | {delta} | {p_auc} | "
            f"{p_fin} | {_fmt(row['final_greedy'])} | {row['mean_temperature']:.2f} | "
            f"{row['temperature_first_tenth']:.2f} → {row['temperature_last_tenth']:.2f} | "
            f"{others or '-'} |"
        )
    n = len(summary["seeds"])
    lines += [
        "",
        f"{n} seeds; mean ± 95% CI (Student t). Success = exact probability that the learned "
        f"policy writes the target at T_eval = {summary.get('eval_temperature', 1.0):g} (mean "
        "over tasks); AUC = mean success over training; final greedy = fraction of tasks that "
        "argmax decoding solves at the end (independent of any temperature). p: two-sided "
        "Wilcoxon signed-rank test, paired by seed, against the best fixed temperature.",
    ]
    if best is not None:
        lines.append(
            f"Best fixed temperature chosen post hoc by mean AUC: {best}. Picking the best of "
            "the fixed arms on the same seeds biases the comparison in its favour (winner's curse)."
        )
    spread = summary["fixed_spread"]
    if spread:
        lines.append(
            f"Fixed temperatures differ: best ({spread['best']}) - worst ({spread['worst']}) "
            f"AUC = {_fmt(spread['delta_auc'])}; Friedman test across the fixed arms "
            f"p = {spread['friedman_p']:.3g}."
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- plots
def make_plots(
    results: list[dict[str, Any]], controllers: list[str], best_fixed: str | None, out: Path
) -> list[Path]:
    """Write the learning curves, the temperature trajectories and the meta-policy heat maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict[str, list[dict[str, Any]]] = {}
    for run in results:
        runs.setdefault(run["controller"], []).append(run)
    shown = [c for c in controllers if not c.startswith("fixed-") or c == best_fixed]
    for extra in ("fixed-0.6", "fixed-1.0", "fixed-1.5"):
        if extra in controllers and extra not in shown:
            shown.append(extra)
    paths = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for c in shown:
        curves = np.array([r["success"] for r in runs[c]])
        mean = curves.mean(axis=0)
        half = curves.std(axis=0, ddof=1) / np.sqrt(len(curves)) * 1.96 if len(curves) > 1 else 0
        style = "--" if c.startswith("fixed-") or c == "linear" else "-"
        label = c + (" (best fixed)" if c == best_fixed else "")
        (line,) = ax.plot(mean, style, label=label)
        ax.fill_between(np.arange(mean.shape[0]), mean - half, mean + half,
                        color=line.get_color(), alpha=0.15)  # fmt: skip
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("success rate at T_eval = 1")
    ax.set_title("Learning curves (mean ± 95% CI over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "learning_curves.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # one panel per (arm, knob it sets): a joint arm gets one per knob
    panels = [
        (c, knob)
        for c in controllers
        if c in ADAPTIVE or c == "linear"
        for knob in runs[c][0].get("knobs", ("temperature",))
    ]
    cols = min(max(len(panels), 1), 4)
    rows = -(-max(len(panels), 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), sharex=True,
                             squeeze=False)  # fmt: skip
    for ax, (c, knob) in zip(axes.flat, panels, strict=False):
        values = np.array([r[knob] for r in runs[c]])
        steps = np.arange(values.shape[1])
        low, high = np.percentile(values, [10, 90], axis=0)
        ax.fill_between(steps, low, high, alpha=0.25, label="10-90%")
        ax.plot(steps, values.mean(axis=0), label="mean")
        ax.set_title(c if knob == "temperature" else f"{c}: {knob}", fontsize=9)
        ax.set_ylabel(knob, fontsize=8)
        if knob == "temperature":
            ax.set_ylim(GRID[0] - 0.05, GRID[-1] + 0.05)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("GRPO step")
    if panels:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle("Chosen sampler setting over training (mean and 10-90% band over seeds)")
    fig.tight_layout()
    paths.append(out / "temperature.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    learned = [c for c in controllers if c in ADAPTIVE and c != "entropy"]
    fig, axes = plt.subplots(max(len(learned), 1), 1, figsize=(8, 2.2 * max(len(learned), 1)),
                             squeeze=False)  # fmt: skip
    for ax, c in zip(axes[:, 0], learned, strict=False):
        probs = np.array([r["probs"] for r in runs[c]]).mean(axis=0)  # (steps, K)
        labels = runs[c][0].get("candidate_labels", [f"{t:.1f}" for t in GRID])
        image = ax.imshow(probs.T, aspect="auto", origin="lower", cmap="viridis",
                          extent=(0, probs.shape[0], -0.5, len(labels) - 0.5))  # fmt: skip
        ax.set_yticks(range(len(labels)), labels, fontsize=7 if len(labels) <= 10 else 4)
        knobs = runs[c][0].get("knobs", ("temperature",))
        ax.set_ylabel(f"{c}\n{'T' if knobs == ('temperature',) else ' x '.join(knobs)}")
        fig.colorbar(image, ax=ax, label="mean prob")
    axes[-1, 0].set_xlabel("GRPO step")
    fig.suptitle("Meta-policy probabilities (mean over seeds)")
    fig.tight_layout()
    paths.append(out / "meta_probs.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # why the TAMPO arms moved where they did, from their per-step signal diagnostics
    tampo_arms = {
        c: [r["signal"] for r in sorted(runs[c], key=lambda r: r["seed"])]
        for c in controllers
        if c.startswith("tampo") and all(r.get("signal") is not None for r in runs[c])
    }
    if tampo_arms:
        from .signal_plot import plot_signal_diagnostics

        paths.append(plot_signal_diagnostics(
            tampo_arms, GRID, out / "signal_diagnostics.png",
            title="Why TAMPO moved where it did (TokenSearch; signal a_k of every step)"))
    return paths


# ---------------------------------------------------------------------------------- CLI
def add_environment_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of :class:`TokenSearchConfig` and of the learner, with StudyConfig defaults."""
    defaults = StudyConfig()
    env = parser.add_argument_group("TokenSearch environment")
    env.add_argument("--vocab-size", type=int, default=defaults.vocab_size,
                     help=f"vocabulary size V (default {defaults.vocab_size})")
    env.add_argument("--length", type=int, default=defaults.length,
                     help=f"answer length L (default {defaults.length})")
    env.add_argument("--num-tasks", type=int, default=defaults.num_tasks,
                     help=f"number of tasks (default {defaults.num_tasks})")
    env.add_argument("--families", default=",".join(defaults.families),
                     help=f"comma-separated target families from {','.join(FAMILIES)}")
    env.add_argument("--reward", choices=("exact", "partial"), default=defaults.reward)
    env.add_argument("--no-deceptive", action="store_true", help="no decoy mode in the prior")
    env.add_argument("--prior-margin", type=float, default=defaults.prior_margin,
                     help="logit of the prior's mode above the bulk: larger is a sharper "
                          f"starting policy (default {defaults.prior_margin})")
    env.add_argument("--prior-margins", default=None, metavar="M1,M2,...",
                     help="mixed sharpness: task i gets margin M[i mod count] (e.g. 2.5,7), "
                          "instead of --prior-margin")
    env.add_argument("--prior-margin-range", default=None, metavar="LOW,HIGH",
                     help="mixed sharpness: each task's margin drawn uniformly from [LOW, HIGH]")
    env.add_argument("--shoulder-gap", type=float, default=defaults.shoulder_gap,
                     help="a shoulder target's logit below the mode "
                          f"(default {defaults.shoulder_gap})")
    env.add_argument("--noise-scale", type=float, default=defaults.noise_scale,
                     help=f"std of the prior's bulk logits (default {defaults.noise_scale})")
    env.add_argument("--task-seed-offset", type=int, default=defaults.task_seed_offset,
                     help="run seed s uses the task set task_seed = offset + s (default 0)")
    learner = parser.add_argument_group("GRPO learner")
    learner.add_argument("--group-size", type=int, default=defaults.group_size,
                         help=f"GRPO group size G (default {defaults.group_size})")
    learner.add_argument("--lr", type=float, default=defaults.lr,
                         help=f"learner learning rate (default {defaults.lr})")
    learner.add_argument("--optimizer", choices=("adam", "sgd"), default=defaults.optimizer)
    learner.add_argument("--entropy-target", type=float, default=defaults.entropy_target,
                         help="H* of the entropy controller in nats "
                              f"(default {defaults.entropy_target})")
    learner.add_argument("--eval-temperature", type=float, default=defaults.eval_temperature,
                         help="temperature of the success evaluation "
                              f"(default {defaults.eval_temperature})")


def _float_list(text: str | None, flag: str) -> tuple[float, ...] | None:
    """``"2.5,7"`` -> ``(2.5, 7.0)``; ``None`` stays ``None``; raises ``ValueError`` naming
    ``flag``."""
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """The :class:`StudyConfig` of parsed arguments (raises ``ValueError``/``TypeError``): the
    options parsed from text here, every other field the argument of the same name."""
    parsed: dict[str, Any] = {
        "families": tuple(f.strip() for f in args.families.split(",")),
        "deceptive": not args.no_deceptive,
        "prior_margins": _float_list(args.prior_margins, "--prior-margins"),
        "prior_margin_range": _float_list(args.prior_margin_range, "--prior-margin-range"),
    }
    same = {f.name: getattr(args, f.name) for f in fields(StudyConfig) if f.name not in parsed}
    return StudyConfig(**same, **parsed)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineErrorParser(
        prog="metactl gym-study",
        description="Compare sampling controllers (temperature, top-p, joint grids) on "
        "metactl/TokenSearch-v0 over many seeds.",
    )
    parser.add_argument("--seeds", type=int, default=30, help="number of seeds (default 30)")
    parser.add_argument("--steps", type=int, default=200, help="GRPO steps per run (default 200)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--controllers",
        default="all",
        help=f"comma-separated controllers, or 'all' (default): {','.join(STUDY_ARMS)}; any "
        "other name of the controller registry too (linear-A-B, entropy-H, ucb1, ...)",
    )
    parser.add_argument("--out", default="runs/gym_study", help="output folder")
    add_environment_arguments(parser)
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the study; returns the exit status (0 on success, 2 on bad arguments)."""
    try:
        args = _parse(argv)
    except SystemExit as exc:  # argparse: --help (0) or a one-line usage error (2)
        return int(exc.code or 0)
    try:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        names = (list(STUDY_ARMS) if args.controllers.strip() == "all"
                 else parse_name_list(args.controllers, "--controllers", "controller"))
        config = config_from_args(args)
        for name in names:  # the checks a run would apply, before any run
            make_controller(name, config, seed=0)
        out = check_writable_dir(Path(args.out).expanduser(), "--out")
    except (ValueError, TypeError) as exc:
        print(f"metactl gym-study: {exc}", file=sys.stderr)
        return 2

    jobs = [(name, seed, config) for seed in range(args.seeds) for name in names]
    from tqdm.auto import tqdm

    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(jobs), desc="gym-study runs", unit="run", disable=args.quiet)
    if args.workers == 1:
        for job in jobs:
            results.append(run_one(job))
            bar.update()
    else:
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        context = multiprocessing.get_context(method)
        with context.Pool(args.workers) as pool:
            for result in pool.imap_unordered(run_one, jobs, chunksize=4):
                results.append(result)
                bar.update()
    bar.close()
    wall = time.perf_counter() - start

    summary = summarise(results, names)
    summary["eval_temperature"] = config.eval_temperature
    table = format_table(summary)
    meta = {
        "config": asdict(config),
        "controllers": names,
        "seeds": args.seeds,
        "workers": args.workers,
        "wall_seconds": wall,
        "metactl_version": metactl.__version__,
    }
    (out / "results.md").write_text(
        f"# gym-study: controllers on metactl/TokenSearch-v0\n\n{table}\n\n"
        f"Config: `{json.dumps(meta['config'])}`; wall time {wall:.1f} s with "
        f"{args.workers} worker(s).\n",
        encoding="utf-8",
    )
    (out / "results.json").write_text(json.dumps({**meta, **summary}, indent=2), encoding="utf-8")
    ordered = sorted(results, key=lambda r: (names.index(r["controller"]), r["seed"]))
    arrays: dict[str, Any] = {
        key: np.array([r[key] for r in ordered])
        for key in ("controller", "seed", "success", "greedy", *KNOB_KEYS, "reward",
                    "entropy", "auc", "final")
    }  # fmt: skip
    # probs is (runs, steps, K): one array when every arm has the same K, else one per arm
    if len({r["probs"].shape for r in ordered}) == 1:
        arrays["probs"] = np.array([r["probs"] for r in ordered])
    else:
        for name in names:
            arrays[f"probs/{name}"] = np.array(
                [r["probs"] for r in ordered if r["controller"] == name]
            )
    np.savez_compressed(out / "runs.npz", **arrays)
    signal_arrays: dict[str, Any] = {}  # (Any: numpy's stubs type **kwargs as allow_pickle)
    for name in names:
        diagnosed = [r for r in ordered if r["controller"] == name and r["signal"] is not None]
        if diagnosed:
            signal_arrays[f"{name}/seed"] = np.array([r["seed"] for r in diagnosed])
            for key in diagnosed[0]["signal"]:
                signal_arrays[f"{name}/{key}"] = np.array([r["signal"][key] for r in diagnosed])
    if signal_arrays:
        np.savez_compressed(out / "signal.npz", **signal_arrays)
    if not args.no_plots:
        make_plots(results, names, summary["best_fixed"], out)
    if not args.quiet:
        print(table)
        print(f"\n{len(jobs)} runs in {wall:.1f} s with {args.workers} worker(s); wrote {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
