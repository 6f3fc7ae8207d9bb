"""Benchmark: one step of a per-prompt (contextual) meta-policy against the global one.

One step is ``select(contexts=...)`` for ``--prompts`` contexts (1024) plus the ``update``
with ``G = --group`` (8) rows per context; the global baseline is TAMPO's ``select()`` plus
``update`` of the same ``prompts * G`` rows. Each contextual rule is timed with ``--stored``
contexts already in memory (1e3 and 1e5 by default), so the table shows that the cost grows
with the prompts in the batch, not with the prompts ever seen; the batch's keys are drawn
from the stored ones (every context seen before). The ``evicting`` rows run at the memory
cap (``max_contexts`` = the stored count) with a batch of only new keys, so each update also
evicts ``prompts`` contexts. The ``mixture`` and ``spread`` rows (one distribution dealt over
the batch, no per-context state) do not depend on what was stored. Feedback is generated
before timing; times are medians over ``--repeats`` steps after ``--warmup`` steps. Target:
<= 2 ms per step for 1024 prompts.

Usage::

    python benchmarks/per_prompt.py                    # 1024 prompts x G = 8, 1e3 / 1e5 stored
    python benchmarks/per_prompt.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import metactl

K = 10


def _feedback(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    return {
        "loglik": rng.normal(-1.0, 0.3, size=(rows, K)),
        "advantages": rng.normal(size=rows),
        "rewards": (rng.random(rows) < 0.4).astype(np.float64),
    }


def _factories(capacity: int) -> dict[str, Callable[[], metactl.MetaPolicy]]:
    return {
        "ptgs": lambda: metactl.ptgs(seed=0, total_steps=1000, max_contexts=capacity),
        "tampo-per-prompt": lambda: metactl.tampo_per_prompt(seed=0, max_contexts=capacity),
        "linear-thompson": lambda: metactl.linear_thompson(seed=0, max_contexts=capacity),
    }


def _step_feedback(policy: metactl.MetaPolicy, fb: dict[str, np.ndarray]) -> dict[str, Any]:
    return {name: fb[name] for name in policy.requires}


def _fill(policy: metactl.MetaPolicy, stored: int, group: int, rng: np.random.Generator) -> None:
    chunk = 4096
    for start in range(0, stored, chunk):
        keys = np.arange(start, min(start + chunk, stored))
        batch = policy.select(contexts=keys)
        policy.update(batch, **_step_feedback(policy, _feedback(rng, keys.shape[0] * group)))


def _time_steps(
    policy: metactl.MetaPolicy,
    keys: Callable[[int], np.ndarray | None],
    feedback: list[dict[str, np.ndarray]],
    warmup: int,
) -> float:
    times = []
    for i, fb in enumerate(feedback):
        contexts = keys(i)
        needed = _step_feedback(policy, fb)
        start = time.perf_counter()
        if contexts is None:
            decision = policy.select()
            policy.update(decision, **needed)
        else:
            batch = policy.select(contexts=contexts)
            policy.update(batch, **needed)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=1024)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--stored", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n, g = args.prompts, args.group
    steps = args.warmup + args.repeats
    feedback = [_feedback(rng, n * g) for _ in range(steps)]
    results: list[dict[str, Any]] = []

    baseline = metactl.tampo(seed=0)
    ms = _time_steps(baseline, lambda i: None, feedback, args.warmup)
    results.append({"policy": "tampo (global)", "stored": 0, "mode": "-", "ms": ms})

    for stored in args.stored:
        for name, factory in _factories(max(stored, n)).items():
            policy = factory()
            _fill(policy, stored, g, rng)
            key_rng = np.random.default_rng(1)
            pool = np.arange(stored)
            seen_keys = [key_rng.choice(pool, size=n, replace=stored < n) for _ in range(steps)]
            ms = _time_steps(policy, lambda i, ks=seen_keys: ks[i], feedback, args.warmup)
            results.append({"policy": name, "stored": stored, "mode": "seen", "ms": ms})

    # the mixtures keep no per-context state: one row each, whatever was seen before
    for name, factory in (("mixture", lambda: metactl.mixture(seed=0)),
                          ("spread", lambda: metactl.spread(seed=0))):  # fmt: skip
        policy = factory()
        keys = np.arange(n)
        ms = _time_steps(policy, lambda i, ks=keys: ks, feedback, args.warmup)
        results.append({"policy": name, "stored": 0, "mode": "any", "ms": ms})

    stored = max(args.stored)
    for name, factory in _factories(stored).items():
        policy = factory()
        _fill(policy, stored, g, rng)
        fresh = [np.arange(stored + i * n, stored + (i + 1) * n) for i in range(steps)]
        ms = _time_steps(policy, lambda i, ks=fresh: ks[i], feedback, args.warmup)
        assert policy.num_contexts == stored
        results.append({"policy": name, "stored": stored, "mode": "evicting", "ms": ms})

    print(f"per-prompt meta-policy step: select + update, {n} prompts x G = {g} ({n * g} rows)")
    print(f"median of {args.repeats} steps after {args.warmup} warm-up steps")
    print(f"{'policy':<18} {'stored':>8} {'batch keys':>10} {'ms/step':>9}")
    for row in results:
        print(f"{row['policy']:<18} {row['stored']:>8} {row['mode']:>10} {row['ms']:>9.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"prompts": n, "group": g, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
