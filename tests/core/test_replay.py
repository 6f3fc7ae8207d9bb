"""Replays decision streams and state dicts recorded from an earlier version of the core, bit for
bit: every rule, selector, knob and per-context path, through the public API only.

``python tests/core/test_replay.py --record`` rewrites ``tests/data/replay.json`` from the
installed metactl (only ever run to record a new reference on purpose, before a change that must
keep behaviour).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import metactl

RECORD = Path(__file__).resolve().parent.parent / "data" / "replay.json"
STEPS = 7
GROUP = 3  # rollouts per decision


def _policy(name: str) -> metactl.MetaPolicy:
    temps = list(metactl.PAPER_TEMPERATURES)
    m = metactl
    table: dict[str, Any] = {
        "tampo": lambda: m.tampo(seed=3),
        "tampo-softmax-std": lambda: m.MetaPolicy(
            temps, m.TAMPO(normalizer="softmax", standardize="std"), m.Nucleus(0.5), seed=4),
        "tampo-sum-tau": lambda: m.MetaPolicy(
            temps, m.TAMPO(likelihood_normalization="sum", tau=2.0, standardize="max_abs"),
            m.Sample(), seed=5),
        "tampo-greedy": lambda: m.MetaPolicy(temps, m.TAMPO(), m.Greedy(), seed=1),
        "hedge": lambda: m.MetaPolicy(temps, m.Hedge(step_size=2.0), seed=6),
        "metagradient-expected": lambda: m.MetaPolicy(temps, m.MetaGradient(), seed=7),
        "metagradient-sampled": lambda: m.MetaPolicy(
            temps, m.MetaGradient(estimator="sampled", normalizer="softmax"), seed=8),
        "exp3": lambda: m.MetaPolicy(temps, m.EXP3(), seed=9),
        "ucb1": lambda: m.MetaPolicy(temps, m.UCB1(), seed=10),
        "thompson": lambda: m.MetaPolicy(temps, m.ThompsonGaussian(mc_samples=256), seed=11),
        "fixed": lambda: m.MetaPolicy(temps, m.Fixed(1.2), seed=12),
        "schedule-linear": lambda: m.MetaPolicy(temps, m.Schedule("linear", 0.6, 1.5, 5)),
        "schedule-cosine": lambda: m.MetaPolicy(temps, m.Schedule("cosine", 1.5, 0.7, 4)),
        "entropy-target": lambda: m.MetaPolicy(temps, m.EntropyTarget(2.0)),
        "entropy-schedule": lambda: m.MetaPolicy(temps, m.EntropySchedule(3.0, 1.0, 5)),
        "counterfactual": lambda: m.MetaPolicy(temps, m.Counterfactual(), seed=13),
        "uncertainty": lambda: m.MetaPolicy(temps, m.Uncertainty(), seed=14),
        "ptgs": lambda: m.ptgs(seed=15, total_steps=5),
        "ptgs-global": lambda: m.ptgs(seed=16),
        "tampo-per-prompt": lambda: m.tampo_per_prompt(seed=17, max_contexts=3),
        "tampo-per-prompt-sample": lambda: m.MetaPolicy(
            temps, m.ContextualTAMPO(prior_weight=1.0), m.Sample(), seed=18),
        "linear-thompson": lambda: m.linear_thompson(seed=19),
        "linear-thompson-features": lambda: m.linear_thompson(seed=20, feature_dim=2),
        "top-p-tampo": lambda: m.tampo([0.5, 0.7, 0.9, 1.0], seed=21, hyperparameter="top_p"),
        "top-k-exp3": lambda: m.MetaPolicy([5, 20, 50], m.EXP3(), seed=22, hyperparameter="top_k"),
        "min-p-hedge": lambda: m.MetaPolicy(
            [0.0, 0.05, 0.1], m.Hedge(), seed=23, hyperparameter="min_p"),
        "joint-tampo": lambda: m.tampo(
            m.grid(temperature=[0.7, 1.0, 1.3], top_p=[0.9, 1.0]), seed=24),
        "generic-ucb1": lambda: m.MetaPolicy(
            [-1.0, 0.0, 2.5], m.UCB1(), seed=25, hyperparameter="generic"),
    }
    return table[name]()


SCENARIOS = [
    ("tampo", None), ("tampo-softmax-std", None), ("tampo-sum-tau", None),
    ("tampo-greedy", None), ("hedge", None), ("metagradient-expected", None),
    ("metagradient-sampled", None), ("exp3", None), ("ucb1", None), ("thompson", None),
    ("fixed", None), ("schedule-linear", None), ("schedule-cosine", None),
    ("entropy-target", None), ("entropy-schedule", None), ("counterfactual", None),
    ("uncertainty", None), ("ptgs", "contexts"), ("ptgs-global", None),
    ("ptgs", "mixed"), ("tampo-per-prompt", "contexts"), ("tampo-per-prompt", None),
    ("tampo-per-prompt-sample", "contexts"), ("linear-thompson", "contexts"),
    ("linear-thompson-features", "contexts"), ("linear-thompson", None),
    ("top-p-tampo", None), ("top-k-exp3", None), ("min-p-hedge", None), ("joint-tampo", None),
    ("generic-ucb1", None),
]


def _feedback(policy: metactl.MetaPolicy, n: int, rng: np.random.Generator) -> dict[str, Any]:
    rows = n * GROUP
    k = policy.num_candidates
    out: dict[str, Any] = {}
    for name in policy.requires:
        if name == "loglik":
            out[name] = rng.normal(-1.5, 0.4, size=(rows, k))
        elif name == "advantages":
            out[name] = rng.normal(0.0, 1.0, size=rows)
        elif name == "reward":
            out[name] = float(rng.random())
        elif name == "rewards":
            out[name] = (rng.random(rows) < 0.4).astype(float)
        elif name == "group_size":
            out[name] = GROUP
        elif name == "entropy":
            out[name] = float(rng.uniform(0.5, 4.0))
        elif name == "vocab_size":
            out[name] = 1000
    return out


def _plain(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda v: v.tolist() if hasattr(v, "tolist") else v))


def run_scenario(name: str, mode: str | None) -> dict[str, Any]:
    """Play one policy for STEPS steps (save/load through JSON half way) and record every
    decision, update and state dict."""
    policy = _policy(name)
    rng = np.random.default_rng(len(name) * 7 + 1)
    trace: list[dict[str, Any]] = []
    for step in range(STEPS):
        if step == STEPS // 2:  # a JSON round trip, then continue from the rebuilt policy
            policy = metactl.MetaPolicy.from_state_dict(json.loads(json.dumps(policy.state_dict())))
        per_context = mode == "contexts" or (mode == "mixed" and step % 2 == 0)
        if per_context:
            keys = [step % 3, (step + 1) % 4, "x", step % 3][: 2 + step % 3]
            dim = getattr(policy.rule, "feature_dim", 0)
            features = rng.normal(size=(len(keys), dim)) if dim else None
            batch = policy.select(contexts=keys, features=features)
            record: dict[str, Any] = {
                "values": batch.values.tolist(),
                "indices": batch.indices.tolist(),
                "probs": batch.probs.tolist(),
                "on_grid": batch.on_grid.tolist(),
            }
            info = policy.update(batch, **_feedback(policy, len(keys), rng))
            record["context_probs"] = policy.context_probs(keys, features=features).tolist()
            record["evicted"] = list(info.evicted)
        else:
            d = policy.select()
            record = {"index": d.index, "value": d.value, "prob": d.prob, "on_grid": d.on_grid}
            info = policy.update(d, **_feedback(policy, 1, rng))
        record["info_probs"] = info.probs.tolist()
        adv = info.candidate_advantages
        record["signal"] = None if adv is None else adv.tolist()
        record["state"] = policy.state_dict()
        trace.append(_plain(record))
    return {"name": name, "mode": mode, "trace": trace}


def record() -> None:
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    data = [run_scenario(name, mode) for name, mode in SCENARIOS]
    RECORD.write_text(json.dumps(data, sort_keys=True) + "\n")
    print(f"recorded {len(data)} scenarios to {RECORD}")


def _recorded() -> dict[tuple[str, str | None], dict[str, Any]]:
    return {(s["name"], s["mode"]): s for s in json.loads(RECORD.read_text())}


@pytest.mark.parametrize(("name", "mode"), SCENARIOS, ids=[f"{n}-{m}" for n, m in SCENARIOS])
def test_replays_recorded_stream_bit_for_bit(name: str, mode: str | None) -> None:
    expected = _recorded()[(name, mode)]["trace"]
    got = run_scenario(name, mode)["trace"]
    assert len(got) == len(expected)
    for step, (g, e) in enumerate(zip(got, expected, strict=True)):
        g_state, e_state = g.pop("state"), e.pop("state")
        assert g == e, f"{name} step {step}: decisions or update differ"
        # the recorded states load, and a policy rebuilt from them states the same thing
        loaded = metactl.MetaPolicy.from_state_dict(e_state).state_dict()
        assert _plain(loaded)["rule_state"] == e_state["rule_state"]
        for key in ("rule_state", "rng", "step", "candidates", "rule", "selector", "seed"):
            assert g_state[key] == e_state[key], f"{name} step {step}: state[{key!r}] differs"
        assert g_state.get("contexts") == e_state.get("contexts")


if __name__ == "__main__" and "--record" in sys.argv:
    record()
