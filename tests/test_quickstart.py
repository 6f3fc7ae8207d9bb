"""The quick-start demo: TAMPO follows a useful temperature that drifts from high to low."""

from __future__ import annotations

import importlib.util

import numpy as np

import metactl
from tests.paths import ROOT


def _load_quickstart():
    path = ROOT / "examples" / "quickstart.py"
    spec = importlib.util.spec_from_file_location("quickstart", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tampo_tracks_the_drifting_temperature() -> None:
    demo = _load_quickstart()
    chosen = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        policy = metactl.tampo(seed=seed)
        for step in range(demo.STEPS):
            decision = policy.select()
            loglik, adv = demo.simulate_batch(rng, decision.value, step, policy.candidates)
            policy.update(decision, loglik=loglik, advantages=adv)
            chosen.append((seed, step, decision.value))
    values = np.array([v for _, _, v in chosen]).reshape(3, demo.STEPS)
    early, late = values[:, 20:70].mean(), values[:, -50:].mean()
    assert early > late + 0.15  # the useful temperature falls by 0.5 over training


def test_quickstart_runs(capsys) -> None:
    _load_quickstart().main()
    assert "most probable T" in capsys.readouterr().out
