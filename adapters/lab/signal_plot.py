"""One figure that shows why a likelihood rule (TAMPO) moved where it did.

Input: for each arm, one :func:`metactl.diagnostics.stack_diagnostics` result per seed (the
gym learner's ``TrainLog.signal``, or the reference trainer's per-step ``record["signal"]``
stacked). One row of five panels per arm:

a. one seed's timeline: the sampling value per step (line) and the candidate the step's signal
   favoured (dots, area proportional to the step's signal spread: the loud steps are big);
b. the signal spread against the sampling value, every step of every seed, coloured by the
   favoured candidate (sequential colour map): which sampling values shout, and for what;
c. the vote: the sum over steps of the centred signal ``a_k - mean_k a_k`` (TAMPO's min-max is
   shift-invariant, so only the centred part ranks), split by the sampling value (rows) over the
   candidates (columns), bottom row the total; the EMA is a (decayed) sum of these;
d. the sparsemax support size over training (mean and 10-90% over seeds; K = not sparse);
e. the within-group correlation of T* and the advantage over training (mean over seeds,
   smoothed): > 0 when the successes of a prompt were its more random rollouts.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_signal_diagnostics", "stack_runs"]


def stack_runs(per_step: Sequence[dict[str, Any] | None]) -> dict[str, np.ndarray] | None:
    """Stack one run's per-step ``signal_diagnostics`` dicts (None entries: steps without
    one); None when the run has none."""
    from metactl.diagnostics import stack_diagnostics

    records = [r for r in per_step if r is not None]
    return stack_diagnostics(records) if records else None


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    if width <= 1 or x.shape[0] < width:
        return x
    return np.convolve(x, np.ones(width) / width, mode="valid")


def plot_signal_diagnostics(
    arms: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
    candidates: Sequence[float] | np.ndarray,
    path: str | Path,
    title: str = "Why the likelihood rule moved where it did",
) -> Path:
    """Write the figure (see the module docstring) to ``path``; returns the path.

    Args:
        arms: arm name -> one stacked diagnostics dict per seed (at least one arm, one seed).
        candidates: the K candidate values (the columns of ``signal``).
        path: the PNG to write.
        title: the figure's title.

    Raises:
        ValueError: no arm, an arm without seeds, or a ``signal`` whose width is not K.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    cands = np.asarray(candidates, dtype=np.float64)
    k = cands.shape[0]
    if not arms:
        raise ValueError("arms is empty: nothing to plot")
    for name, seeds in arms.items():
        if not seeds:
            raise ValueError(f"arm {name!r} has no seeds")
        for run in seeds:
            if run["signal"].ndim != 2 or run["signal"].shape[1] != k:
                raise ValueError(
                    f"arm {name!r}: signal has shape {run['signal'].shape}, expected (steps, {k})"
                )
    cmap = plt.get_cmap("viridis")
    norm = Normalize(vmin=float(cands.min()), vmax=float(cands.max()))
    step_t = float(np.min(np.diff(np.sort(cands))))
    rows = len(arms)
    fig, axes = plt.subplots(rows, 5, figsize=(22, 3.7 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [1.3, 1.0, 1.1, 1.0, 1.0]})  # fmt: skip
    for row, (name, seeds) in enumerate(arms.items()):
        ax_time, ax_scatter, ax_vote, ax_support, ax_corr = axes[row]

        # a. one seed's timeline: where it sampled, and what each step voted for
        run = seeds[0]
        steps = np.arange(run["sampling_value"].shape[0])
        ax_time.plot(steps, run["sampling_value"], color="0.2", lw=1.0, label="sampling T")
        spread = run["signal_spread"]
        loudest = float(spread.max()) if spread.size and spread.max() > 0 else 1.0
        voted = ~np.isnan(run["favoured_candidate"])
        ax_time.scatter(steps[voted], run["favoured_candidate"][voted],
                        s=4 + 60 * spread[voted] / loudest, color="tab:red", alpha=0.55,
                        lw=0, label="favoured (area ~ spread)")  # fmt: skip
        ax_time.set_ylim(cands.min() - step_t, cands.max() + step_t)
        ax_time.set_ylabel(f"{name}\nT")
        ax_time.set_title("a. first seed: sampling T and the favoured candidate", fontsize=9)
        ax_time.legend(fontsize=7, loc="best")  # the sampled values may fill any corner

        # b. spread vs sampling T (all seeds), coloured by the favoured candidate
        rng = np.random.default_rng(0)  # jitter only, for legibility
        xs = np.concatenate([r["sampling_value"] for r in seeds])
        ys = np.concatenate([r["signal_spread"] for r in seeds])
        fav = np.concatenate([r["favoured_candidate"] for r in seeds])
        loud = ~np.isnan(fav)
        jitter = np.asarray(rng.uniform(-0.25, 0.25, xs.shape[0])) * step_t
        points = ax_scatter.scatter(xs[loud] + jitter[loud], ys[loud], c=fav[loud], cmap=cmap,
                                    norm=norm, s=9, alpha=0.7, lw=0)  # fmt: skip
        values = np.unique(np.round(xs, 9))
        if values.shape[0] <= 2 * k:  # one value per step (global rule): the mean per value
            # over every step at that value, flat ones included (their vote is 0 too); values
            # sampled fewer than 3 times are too noisy to draw
            counts = np.array([np.isclose(xs, v).sum() for v in values])
            means = np.array([ys[np.isclose(xs, v)].mean() for v in values])
            ax_scatter.plot(values[counts >= 3], means[counts >= 3], "k-o", ms=3, lw=1,
                            label="mean spread (>= 3 steps)")  # fmt: skip
            ax_scatter.legend(fontsize=7, loc="upper left")
        ax_scatter.set_xlabel("sampling T")
        ax_scatter.set_ylabel("spread of a_k (max - min)")
        ax_scatter.set_title("b. how loud each step is, and for what", fontsize=9)
        fig.colorbar(points, ax=ax_scatter, label="favoured candidate")

        # c. the vote: centred signal summed over steps, by sampling T
        signal = np.concatenate([r["signal"] for r in seeds])
        centred = signal - signal.mean(axis=1, keepdims=True)
        nearest = np.argmin(np.abs(xs[:, None] - cands[None, :]), axis=1)
        vote = np.zeros((k + 1, k))
        for j in range(k):
            vote[j] = centred[nearest == j].sum(axis=0)
        # the total is larger than any row: drawn on the rows' scale it would saturate, so it
        # is rescaled to the largest row entry (its pattern, not its size, is the point)
        scale = float(np.max(np.abs(vote[:k]))) or 1.0
        total = centred.sum(axis=0)
        vote[k] = total / (float(np.max(np.abs(total))) or 1.0) * scale
        image = ax_vote.imshow(vote, cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto")
        ax_vote.set_xticks(range(k), [f"{c:g}" for c in cands], fontsize=6)
        ax_vote.set_yticks(range(k + 1), [f"{c:g}" for c in cands] + ["total\n(rescaled)"],
                           fontsize=6)  # fmt: skip
        ax_vote.axhline(k - 0.5, color="k", lw=1)
        ax_vote.set_xlabel("candidate k")
        ax_vote.set_ylabel("steps sampled at T (nearest)")
        ax_vote.set_title("c. vote: sum of a_k - mean a (red: pushed up)", fontsize=9)
        fig.colorbar(image, ax=ax_vote)

        # d. support size over training (steps without a signal row left out)
        support = np.array([r["support_mean"] for r in seeds])
        support = np.where(np.array([r["signal_rows"] for r in seeds]) > 0, support, np.nan)
        shown = ~np.all(np.isnan(support), axis=0)  # steps where some seed had a signal row
        if shown.any():
            mean = np.nanmean(support[:, shown], axis=0)
            low, high = np.nanpercentile(support[:, shown], [10, 90], axis=0)
            x = np.flatnonzero(shown)
            ax_support.fill_between(x, low, high, color="tab:blue", alpha=0.2, lw=0,
                                    label="10-90%")  # fmt: skip
            ax_support.plot(x, mean, color="tab:blue", lw=1, label="mean over seeds")
        else:
            ax_support.text(0.5, 0.5, "no step had a row with A != 0", ha="center",
                            transform=ax_support.transAxes)  # fmt: skip
        ax_support.axhline(k, color="0.5", ls="--", lw=0.8, label=f"K = {k} (not sparse)")
        ax_support.set_ylim(0.5, k + 0.5)
        ax_support.set_xlabel("step")
        ax_support.set_ylabel("candidates sparsemax keeps")
        ax_support.set_title("d. sparsemax support size", fontsize=9)
        ax_support.legend(fontsize=7, loc="lower right")  # the K line is always there

        # e. within-group corr(T*, A) over training; steps without an informative group left out
        corr = np.array([r["tstar_advantage_correlation"] for r in seeds])
        corr = np.where(np.array([r["informative_groups"] for r in seeds]) > 0, corr, np.nan)
        with warnings.catch_warnings():  # steps with no informative group in any seed: NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            per_step = np.nanmean(corr, axis=0)
        seen = ~np.isnan(per_step)
        ax_corr.axhline(0.0, color="0.5", lw=0.8)
        if seen.any():
            width = max(1, int(seen.sum()) // 25)
            x = np.flatnonzero(seen)
            ax_corr.plot(x, per_step[seen], color="tab:purple", lw=0.5, alpha=0.35)
            ax_corr.plot(x[width - 1 :], _smooth(per_step[seen], width), color="tab:purple",
                         lw=1.5, label=f"moving mean ({width} steps)" if width > 1 else
                         "mean over seeds")  # fmt: skip
            ax_corr.legend(fontsize=7, loc="lower right")
        else:
            ax_corr.text(0.5, 0.5, "no informative group", ha="center",
                         transform=ax_corr.transAxes)  # fmt: skip
        ax_corr.set_ylim(-1.05, 1.05)
        ax_corr.set_xlabel("step")
        ax_corr.set_ylabel("corr(T*, A) within groups")
        ax_corr.set_title("e. > 0: successes were the more random rollouts", fontsize=9)
    for ax in axes[-1, :1]:
        ax.set_xlabel("step")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
