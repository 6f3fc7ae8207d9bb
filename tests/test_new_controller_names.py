"""Issue 9: the new rules and TAMPO variants under the controller names of the gym study and of
the reference adapter (the same names, so the scoreboard maps them unchanged)."""

from __future__ import annotations

import numpy as np
import pytest
from metactl.adapters.gym.study import CONTROLLERS, StudyConfig, make_controller, run_one

import metactl

NEW_NAMES = ("tampo-std", "tampo-sharp", "tampo-sum", "counterfactual", "uncertainty",
             "entropy-schedule")  # fmt: skip

# the rule each name stands for (untuned: the rules' own defaults, tau = 0.1 for "sharp")
EXPECTED_RULES = {
    "tampo-std": metactl.TAMPO(standardize="std"),
    "tampo-sharp": metactl.TAMPO(tau=0.1),
    "tampo-sum": metactl.TAMPO(likelihood_normalization="sum"),
    "counterfactual": metactl.Counterfactual(),
    "uncertainty": metactl.Uncertainty(),
}


@pytest.mark.parametrize("name", NEW_NAMES)
def test_gym_study_names_build_the_documented_rules_and_run(name: str) -> None:
    config = StudyConfig(steps=3)
    policy = make_controller(name, config, seed=0)
    assert policy.candidates.tolist() == list(metactl.PAPER_TEMPERATURES)
    if name == "entropy-schedule":  # 2 H* -> H* / 2 over the run, H* = entropy's target
        assert policy.rule == metactl.EntropySchedule(0.6, 0.15, total_steps=3)
    else:
        assert policy.rule == EXPECTED_RULES[name]
    if name.startswith("tampo"):  # the paper's selector, as metactl.tampo()
        assert policy.selector == metactl.tampo().selector
    run = run_one((name, 0, config))
    assert run["temperature"].shape == (3,) and np.all(np.isfinite(run["success"]))
    # a different entropy target moves the schedule with it
    other = make_controller("entropy-schedule", StudyConfig(steps=5, entropy_target=1.0), 0)
    assert other.rule == metactl.EntropySchedule(2.0, 0.5, total_steps=5)


@pytest.mark.parametrize("name", NEW_NAMES)
def test_reference_names_match_the_gym_names(name: str) -> None:
    pytest.importorskip("torch")
    from metactl.adapters.reference.controllers import (
        OPTIONAL_ARMS,
        make_policy,
        validate_controller,
    )

    assert name in CONTROLLERS and name in OPTIONAL_ARMS
    assert validate_controller(name) == name
    policy = make_policy(name, steps=3, seed=0)
    assert policy.rule == make_controller(name, StudyConfig(steps=3), seed=0).rule
    assert policy.selector == make_controller(name, StudyConfig(steps=3), seed=0).selector


def test_reference_parameterised_forms_of_the_new_names() -> None:
    pytest.importorskip("torch")
    from metactl.adapters.reference.controllers import make_policy, validate_controller

    rule = make_policy("entropy-schedule-2-0.5", steps=7, seed=0).rule
    assert rule == metactl.EntropySchedule(2.0, 0.5, total_steps=7)
    assert make_policy("tampo-tau-0.25", steps=7, seed=0).rule == metactl.TAMPO(tau=0.25)
    # the longest prefix decides: entropy-H is still the fixed-target E3 rule
    assert make_policy("entropy-0.3", steps=7, seed=0).rule == metactl.EntropyTarget(0.3)
    for bad in ("entropy-schedule-1", "entropy-schedule-x-0.1", "entropy-schedule-0-0.1",
                "entropy-schedule-1-2-3", "tampo-tau", "tampo-tau-0", "tampo-tau-1-2",
                "tampo-tau-inf", "tampo-sharper", "counterfactual-2"):  # fmt: skip
        with pytest.raises(ValueError, match=f"'{bad}'.*valid forms"):
            validate_controller(bad)
