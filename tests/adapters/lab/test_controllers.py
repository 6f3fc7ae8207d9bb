"""The one registry of controller names (``metactl.adapters.lab.controllers``): every name
builds the documented rule, and ``metactl reproduce``, ``metactl gym-study`` and ``metactl
scoreboard`` build the same policy for a name, because all three parse it there."""

from __future__ import annotations

import json

import numpy as np
import pytest
from metactl.adapters.lab.controllers import (
    FIXED_GRID,
    OPTIONAL_ARMS,
    PAPER_ARMS,
    STUDY_ARMS,
    canonical_name,
    is_per_prompt,
    make_policy,
    validate_controller,
)
from metactl.adapters.lab.gym_study import StudyConfig, make_controller, run_one

import metactl

SIGNAL_RULE_NAMES = ("tampo-std", "tampo-sharp", "tampo-sum", "counterfactual", "uncertainty",
                     "entropy-schedule", "mixture", "mixture-variance", "mixture-relative",
                     "spread", "entropy-e3")  # fmt: skip

# the rule each name stands for (untuned: the rules' own defaults, tau = 0.1 for "sharp")
EXPECTED_RULES = {
    "tampo-std": metactl.TAMPO(standardize="std"),
    "tampo-sharp": metactl.TAMPO(tau=0.1),
    "tampo-sum": metactl.TAMPO(likelihood_normalization="sum"),
    "counterfactual": metactl.Counterfactual(),
    "uncertainty": metactl.Uncertainty(),
    "mixture": metactl.Mixture(),
    "mixture-variance": metactl.Mixture(signal="variance"),
    "mixture-relative": metactl.Mixture(relative=True),
    "spread": metactl.Spread(),
    "entropy-e3": metactl.EntropyTarget(),
}


def _state(policy: metactl.MetaPolicy) -> str:
    return json.dumps(policy.state_dict(), sort_keys=True)


@pytest.mark.parametrize("name", SIGNAL_RULE_NAMES)
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


@pytest.mark.parametrize("name", SIGNAL_RULE_NAMES)
def test_reproduce_builds_the_gym_study_policy_of_a_name(name: str) -> None:
    assert name in STUDY_ARMS and name in OPTIONAL_ARMS
    assert validate_controller(name) == name
    policy = make_policy(name, steps=3, seed=0)
    assert policy.rule == make_controller(name, StudyConfig(steps=3), seed=0).rule
    assert policy.selector == make_controller(name, StudyConfig(steps=3), seed=0).selector


@pytest.mark.parametrize("name", STUDY_ARMS)
def test_the_scoreboards_reference_spelling_builds_the_same_policy(name: str) -> None:
    """The scoreboard runs a study name on a reference testbed under its spelled-out name
    (``linear`` as ``linear-0.9-1.5``): the same policy, draw for draw."""
    spelled = canonical_name(name)
    assert validate_controller(spelled) == spelled
    gym = make_controller(name, StudyConfig(steps=7), seed=3)
    assert _state(make_policy(spelled, steps=7, seed=3)) == _state(gym)
    assert _state(make_policy(name, steps=7, seed=3)) == _state(gym)


def test_the_short_names_and_their_spelled_out_forms() -> None:
    assert canonical_name("metagradient") == "metagrad"
    assert canonical_name("linear") == "linear-0.9-1.5"
    assert canonical_name("entropy") == "entropy-0.3"
    assert canonical_name("entropy", entropy_target=0.5) == "entropy-0.5"
    assert canonical_name("tampo") == "tampo" and canonical_name("fixed-0.9") == "fixed-0.9"
    # the run's entropy target reaches entropy and entropy-schedule, not entropy-H
    assert make_policy("entropy", 5, 0, entropy_target=0.5).rule == metactl.EntropyTarget(0.5)
    assert make_policy("entropy-0.3", 5, 0, entropy_target=0.5).rule == (
        metactl.EntropyTarget(0.3))
    assert make_policy("entropy-schedule", 5, 0, entropy_target=0.5).rule == (
        metactl.EntropySchedule(1.0, 0.25, total_steps=5))
    with pytest.raises(ValueError, match="unknown controller 'nonsense'"):
        canonical_name("nonsense")


def test_the_arm_lists_name_valid_controllers() -> None:
    for name in (*PAPER_ARMS, *OPTIONAL_ARMS, *STUDY_ARMS):
        assert validate_controller(name, steps=5) == name
    assert FIXED_GRID == tuple(f"fixed-{t:.1f}" for t in metactl.PAPER_TEMPERATURES)
    assert set(FIXED_GRID) <= set(STUDY_ARMS)


def test_parameterised_forms_of_the_signal_rules() -> None:
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


def test_two_phase_names_build_the_step_schedule_and_the_switching_spread() -> None:
    switch = make_policy("switch-1.0-1.2-3", steps=8, seed=0)
    assert switch.rule == metactl.Schedule("step", 1.0, 1.2, total_steps=3)
    then = make_policy("spread-then-1.3-2", steps=8, seed=0)
    assert then.rule == metactl.Spread(then=1.3, after=2) and then.spec.per_context
    assert is_per_prompt("spread-then-1.3-2") and not is_per_prompt("switch-1.0-1.2-3")
    # after the switch, the run is exactly the fixed arm's (same value, same candidate)
    fixed = make_policy("fixed-1.2", steps=8, seed=0)
    played = []
    for _ in range(5):
        d = switch.select()
        played.append(d.value)
        switch.update(d)
    assert played == [1.0, 1.0, 1.0, fixed.select().value, 1.2]
    assert "10.0" not in canonical_name("switch-1.0-1.2-10")  # names are kept as written
    for bad in ("switch-1.0-1.2", "switch-1.0-1.2-2.5", "switch-1.0-1.2-0", "switch-0.5-1.2-3",
                "spread-then-1.25-3", "spread-then-1.2-1.5", "spread-then-1.2",
                "spread-then-x-3"):  # fmt: skip
        with pytest.raises(ValueError, match=f"'{bad}'.*valid forms"):
            validate_controller(bad)


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda: make_policy(3, steps=5, seed=0), TypeError, "controller name must be a str"),
    (lambda: make_policy("tampo", steps=0, seed=0), ValueError, "steps must be"),
    (lambda: make_policy("tampo", steps=5, seed=-1), ValueError, "seed must be"),
    (lambda: make_policy("tampo", steps=5.0, seed=0), TypeError, "steps must be an int"),
    (lambda: make_policy("entropy", 5, 0, entropy_target=float("nan")), ValueError,
     "entropy_target"),
    (lambda: make_policy("entropy", 5, 0, entropy_target=True), TypeError, "entropy_target"),
])  # fmt: skip
def test_bad_arguments_name_the_argument(call, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()


def test_every_command_accepts_the_registrys_names(tmp_path, capsys) -> None:
    """gym-study takes any registry name (not only its default arms); reproduce takes the
    study's short names; both refuse what the registry refuses."""
    from metactl.adapters.lab.gym_study import main as gym_study

    out = tmp_path / "study"
    assert gym_study(["--seeds", "1", "--steps", "3", "--controllers", "cosine-0.9-1.5,ucb1",
                      "--workers", "1", "--out", str(out), "--quiet", "--no-plots"]) == 0
    assert json.loads((out / "results.json").read_text())["controllers"] == [
        "cosine-0.9-1.5", "ucb1"]
    assert gym_study(["--controllers", "fixed-1.7", "--out", str(out), "--quiet"]) == 2
    assert "controller 'fixed-1.7'" in capsys.readouterr().err
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from metactl.adapters.lab.reproduce.cli import build_parser

    args = build_parser().parse_args(["--controllers", "metagradient,linear,entropy"])
    assert args.controllers == ("metagradient", "linear", "entropy")
