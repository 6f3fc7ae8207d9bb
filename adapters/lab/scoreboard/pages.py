"""The scoreboard's per-testbed pages: ``<out>/testbeds/<name>.md``.

Each page holds the testbed's full table (:func:`.report.format_testbed`) and, for every
likelihood-rule arm (TAMPO and its variants, Hedge, MetaGradient: the arms whose logs hold signal
diagnostics), the figure of :func:`metactl.adapters.lab.signal_plot.plot_signal_diagnostics` drawn
from the diagnostics its run records keep (``<out>/testbeds/<name>/signal-<controller>.png``):
why the rule moved where it did. A seed whose record has no diagnostics (written before the
scoreboard kept them), or whose diagnostics do not cover every step, is left out of the figure
and the page says so; nothing is drawn for an arm without any seed to draw.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .report import format_testbed
from .signal_record import NOT_RECORDED, decode_signal
from .suite import Testbed, is_likelihood_rule

__all__ = ["page_path", "write_testbed_pages"]

# one figure to draw: ({arm: [stacked diagnostics per seed]}, candidates, path, title)
_Figure = tuple[dict[str, list[dict[str, np.ndarray]]], np.ndarray, Path, str]

_PANELS = (
    "Each figure shows one arm, every seed of this testbed whose run record keeps the "
    "diagnostics: (a) the first drawn seed's sampling T per step and the candidate each step's "
    "signal a_k favoured (dot area ~ the step's spread max a - min a); (b) the spread against "
    "the sampling T, coloured by the favoured candidate; (c) the vote: the centred signal "
    "summed over steps, by sampling T (rows) and candidate (columns); (d) the sparsemax support "
    "size over training (K = not sparse); (e) the within-group correlation of T* and the "
    "advantage (> 0: the successes were the more random rollouts)."
)


def page_path(name: str) -> str:
    """The page of testbed ``name``, relative to the scoreboard's folder."""
    return f"testbeds/{name}.md"


def _figure_path(name: str, controller: str) -> str:
    return f"testbeds/{name}/signal-{controller}.png"


def _seeds_text(seeds: Sequence[int]) -> str:
    """``seed 1`` or ``seeds 0, 1``."""
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(str(s) for s in seeds)}"


def _arm_diagnostics(testbed: Testbed, controller: str, seeds: Sequence[int],
                     records: Mapping[tuple[str, str, int], Mapping[str, Any]]
                     ) -> tuple[bool, list[tuple[int, dict[str, np.ndarray]]], np.ndarray | None,
                                list[str]]:  # fmt: skip
    """(is a likelihood-rule arm, drawable ``(seed, arrays)``, candidates, notes)."""
    drawable: list[tuple[int, dict[str, np.ndarray]]] = []
    candidates: np.ndarray | None = None
    notes: list[str] = []
    absent: list[int] = []
    diagnosed = False
    for seed in seeds:
        payload = records[(testbed.name, controller, seed)]
        if "signal" not in payload:  # a record written before the scoreboard kept them
            absent.append(seed)
            continue
        block = payload["signal"]
        if block is None:  # the run's log had none: not a likelihood rule
            continue
        diagnosed = True
        try:
            arrays, cands = decode_signal(block)
        except ValueError as exc:
            notes.append(f"seed {seed}: diagnostics unreadable ({exc}); left out")
            continue
        steps = len(payload["temperature"])
        if not np.array_equal(arrays["step"], np.arange(steps)):
            notes.append(f"seed {seed}: diagnostics cover {arrays['step'].shape[0]} of {steps} "
                         "steps; left out of the figure (its panels align the seeds by step)")
            continue
        if candidates is None:
            candidates = cands
        elif not np.array_equal(cands, candidates):
            notes.append(f"seed {seed}: other candidates {cands.tolist()} than the first drawn "
                         f"seed's {candidates.tolist()}; left out")  # fmt: skip
            continue
        drawable.append((seed, arrays))
        settings = block.get("candidate_settings")
        if settings is not None and len(drawable) == 1:  # a joint grid: say what k stands for
            notes.append("candidate k is an index into the joint grid: " + ", ".join(
                f"{k} = {setting}" for k, setting in enumerate(settings)))
    if absent:
        if not diagnosed:
            try:  # an old record says nothing about the rule: ask the controller itself
                diagnosed = is_likelihood_rule(controller, testbed)
            except ValueError:
                diagnosed = False
        if diagnosed:
            notes.append(f"{_seeds_text(absent)}: "
                         f"{NOT_RECORDED} (a record written before the scoreboard kept them, "
                         "reused as it is)")  # fmt: skip
    return diagnosed, drawable, candidates, notes


def write_testbed_pages(out: Path, analysis: Mapping[str, Any], testbeds: Sequence[Testbed],
                        records: Mapping[tuple[str, str, int], Mapping[str, Any]], *,
                        plots: bool = True,
                        workers: int = 1) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Write one page per testbed of ``analysis`` (and its figures when ``plots``).

    Args:
        out: the scoreboard's folder (the pages go to ``out/testbeds/``).
        analysis: :func:`.report.analyse`'s result for ``testbeds`` and ``records``.
        testbeds: the testbeds analysed (by name: every one of ``analysis["order"]``).
        records: ``{(testbed, controller, seed): run record payload}``, every run analysed.
        plots: draw the signal-diagnostics PNGs (else the pages say they were skipped).
        workers: processes that draw the PNGs (>= 1).

    Returns:
        JSON-safe ``{testbed: {"page": path, "signal": {controller: {"seeds_with_diagnostics":
        [...], "figure": path or None, "notes": [...]}}}}`` (paths relative to ``out``; the
        figure is None when not drawn), one entry per likelihood-rule arm.

    Raises:
        ValueError: a testbed of ``analysis`` missing from ``testbeds``, a run missing from
            ``records``, ``workers < 1``.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    by_name = {t.name: t for t in testbeds}
    missing = [name for name in analysis["order"] if name not in by_name]
    if missing:
        raise ValueError(f"testbeds lacks {missing}, which analysis reports")
    for name in analysis["order"]:
        seeds = analysis["testbeds"][name]["seeds"]
        absent = [(c, s) for c in analysis["testbeds"][name]["controllers"] for s in seeds
                  if (name, c, s) not in records]  # fmt: skip
        if absent:
            raise ValueError(f"records lack {len(absent)} runs of testbed {name}, e.g. {absent[0]}")
    index: dict[str, dict[str, Any]] = {}
    texts: dict[str, str] = {}
    figures: list[_Figure] = []
    (out / "testbeds").mkdir(parents=True, exist_ok=True)
    for name in analysis["order"]:
        testbed, data = by_name[name], analysis["testbeds"][name]
        lines = [f"# Testbed {name}", "",
                 f"[Back to the scoreboard](../scoreboard.md). {data['description']}; "
                 f"{data['split']} testbed; primary metric {data['metric']}.", "",
                 format_testbed(name, data), "",
                 "## Signal diagnostics of the likelihood rules", "", _PANELS, ""]  # fmt: skip
        arms: dict[str, Any] = {}
        for controller in data["controllers"]:  # the arms run on this testbed
            diagnosed, drawable, candidates, notes = _arm_diagnostics(
                testbed, controller, data["seeds"], records)
            if not diagnosed:
                continue
            figure = _figure_path(name, controller)
            drawn = [seed for seed, _ in drawable]
            figure_entry: str | None = None
            lines += [f"### {controller}", ""]
            if drawable and plots:
                assert candidates is not None  # set with the first drawable seed
                figures.append(({controller: [arrays for _, arrays in drawable]}, candidates,
                                out / figure,
                                f"{name}: why {controller} moved where it did (signal a_k of "
                                f"every step; {_seeds_text(drawn)})"))  # fmt: skip
                figure_entry = figure
                lines += [f"![{controller}: signal diagnostics]({name}/signal-{controller}.png)",
                          "", f"Drawn: {_seeds_text(drawn)} (panel a: seed {drawn[0]})."]
            else:
                if plots:  # a figure of an earlier invocation would contradict this page
                    (out / figure).unlink(missing_ok=True)
                if drawable:
                    lines.append(f"Figure not drawn (--no-plots); the diagnostics of "
                                 f"{_seeds_text(drawn)} are in their run records "
                                 f"(runs/{name}/{controller}/seed<s>.json, field \"signal\").")
                else:
                    lines.append("No figure: no seed of this arm has diagnostics to draw.")
            lines += [*(f"- {note}" for note in notes), ""]
            arms[controller] = {"seeds_with_diagnostics": drawn, "figure": figure_entry,
                                "notes": notes}  # fmt: skip
        if not arms:
            lines += ["No likelihood-rule arm ran on this testbed (no controller of this "
                      "scoreboard scores the candidate likelihoods).", ""]
        texts[name] = "\n".join(lines)
        index[name] = {"page": page_path(name), "signal": arms}
    _draw(figures, workers)
    for name, text in texts.items():  # after the figures: a page never links a missing one
        (out / page_path(name)).write_text(text, encoding="utf-8")
    return index


def _draw_one(figure: _Figure) -> None:
    from ..signal_plot import plot_signal_diagnostics

    arms, candidates, path, title = figure
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_signal_diagnostics(arms, candidates, path, title=title)


def _draw(figures: list[_Figure], workers: int) -> None:
    """Draw the figures, in ``workers`` processes when there are enough of them (one figure
    takes about 0.7 s; a full scoreboard has some 80)."""
    if workers == 1 or len(figures) < 2 * workers:
        for figure in figures:
            _draw_one(figure)
        return
    context = mp.get_context("spawn")  # as the runs: no fork of a process holding threads
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for _ in pool.map(_draw_one, figures):
            pass
