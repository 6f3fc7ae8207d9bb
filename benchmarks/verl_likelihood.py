"""The verl trainer's meta-step cost of TAMPO's candidate likelihoods: ``passes`` (one extra
no-grad log-prob pass per candidate temperature) against ``fused`` (the candidates scored
inside verl's own old-log-prob pass, from the logits it already holds).

Runs verl's actor ``TrainingWorker`` (FSDP2 on gloo, one rank, no Ray) on the CPU test model of
:func:`metactl.adapters.verl.testing.build_fixture` (2-layer Qwen2, hidden 128, 300-token
vocabulary), one torch thread, on responses sampled from that model. For each configuration,
every repeat times, in an order that alternates between repeats: verl's old-log-prob pass
alone (at T = 1, with the entropy, as ``_compute_old_log_prob`` runs it), the same pass
carrying the candidates (``fused``), and the ``K`` scoring passes (``passes``). The meta
cost is the ``K`` passes for ``passes`` and the fused pass minus verl's own pass for
``fused``. Medians of the repeats; the last column is the largest difference between the
two ways' per-trajectory sums. Needs the verl environment
(``.ci/verl-env.sh``)::

    .venv-verl/bin/python benchmarks/verl_likelihood.py [--repeats 11]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from metactl import PAPER_TEMPERATURES

# (rows, longest response, candidates, FSDP param dtype, remove padding)
CONFIGS = [
    (16, 32, list(PAPER_TEMPERATURES), "fp32", True),
    (16, 32, list(PAPER_TEMPERATURES), "fp32", False),
    (16, 32, [0.6, 1.5], "fp32", True),
    (64, 128, list(PAPER_TEMPERATURES), "fp32", True),
    (16, 32, list(PAPER_TEMPERATURES), "bf16", True),
]


def _seconds(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    from metactl.adapters.verl.testing import CPU_ENV

    if os.environ.get("VERL_PLATFORM") != "cpu":  # verl picks its platform once: start afresh
        env = {**os.environ, **CPU_ENV}
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)
    import torch
    from metactl.adapters.verl import testing

    torch.set_num_threads(1)
    folder = tempfile.mkdtemp(prefix="verl_likelihood_")
    model = testing.build_fixture(folder, prompts=4) / "model"
    workers: dict[tuple[str, bool], Any] = {}
    header = (
        "| rows x response tokens | K | FSDP dtype | layout | verl's old-log-prob pass (s) "
        "| passes: meta cost (s) | fused: meta cost (s) | passes / fused "
        "| max abs sum difference |"
    )
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for rows_n, longest, candidates, dtype, packed in CONFIGS:
        key = (dtype, packed)
        if key not in workers:  # one gloo process group serves them all
            with contextlib.redirect_stdout(sys.stderr):  # verl's set-up prints: off the table
                workers[key] = testing.log_prob_worker(
                    model, param_dtype=dtype, use_remove_padding=packed, micro_batch_size=16
                )
        worker = workers[key]
        with contextlib.redirect_stdout(sys.stderr):
            rows = testing.response_batch(
                rows_n, 300, seed=rows_n, response=(longest // 2, longest), model=model
            )
        score = functools.partial(testing.candidate_sums, worker, rows, candidates)
        runs: dict[str, Callable[[], Any]] = {
            "old": functools.partial(testing.old_log_prob_pass, worker, rows),
            "fused": functools.partial(score, "fused"),
            "passes": functools.partial(score, "passes"),
        }
        for run in runs.values():  # warm-up (first-call compilation, allocator)
            run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for repeat in range(args.repeats):
            order = names if repeat % 2 == 0 else names[::-1]
            for name in order:
                times[name].append(_seconds(runs[name]))
        old = statistics.median(times["old"])
        fused_cost = statistics.median(times["fused"]) - old
        passes_cost = statistics.median(times["passes"])
        diff = float((runs["fused"]() - runs["passes"]()).abs().max())
        tokens = sum(int(m.sum()) for _, m in rows)
        print(
            f"| {rows_n} x {longest // 2}-{longest} ({tokens} tokens) | {len(candidates)} "
            f"| {dtype} | {'packed' if packed else 'padded'} | {old:.4f} | {passes_cost:.4f} "
            f"| {fused_cost:.4f} | {passes_cost / max(fused_cost, 1e-9):.1f}x | {diff:.1e} |",
            flush=True,
        )
    print(f"medians of {args.repeats} repeats; torch {torch.__version__}, 1 thread")


if __name__ == "__main__":
    main()
