"""``metactl.recommended``: the controller chosen by benchmarks/PROTOCOL.md section 16.6, the same
rule and configuration in the core factory, ``metactl gym-study``, ``metactl reproduce`` and
``metactl scoreboard``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from metactl.adapters.lab.controllers import STUDY_ARMS as CONTROLLERS
from metactl.adapters.lab.gym_study import StudyConfig, make_controller
from metactl.adapters.lab.gym_study import main as gym_study_main

import metactl
from metactl.recommended import CHOSEN_AS


def _drive(policy: metactl.MetaPolicy, steps: int, groups: int = 16, size: int = 4) -> list:
    """The temperatures ``policy`` deals over ``groups`` prompt groups of ``size`` completions
    when fed the same made-up rewards every time: a completion's success probability falls
    with the distance from T = 1.1, so the groups near 1.1 are mixed most often."""
    rng = np.random.default_rng(123)
    values = []
    for _ in range(steps):
        decisions = policy.select(contexts=list(range(groups)))
        values.append(decisions.values.tolist())
        p = np.clip(0.5 - np.abs(decisions.values - 1.1), 0.02, 1.0)[:, None]
        rewards = (rng.random((groups, size)) < p).astype(np.float64)
        policy.update(decisions, rewards=rewards.ravel())
    return values


def _same_policy(a: metactl.MetaPolicy, b: metactl.MetaPolicy) -> None:
    assert json.dumps(a.state_dict(), sort_keys=True) == json.dumps(b.state_dict(), sort_keys=True)
    assert _drive(a, 30) == _drive(b, 30)


def test_the_factory_builds_a_fresh_policy_of_the_chosen_rule():
    assert CHOSEN_AS == "mixture-relative"
    policy = metactl.recommended(seed=0)
    assert isinstance(policy, metactl.MetaPolicy)
    assert policy.rule == metactl.Mixture(floor=0.1, step_size=1.0, signal="mixed",
                                          relative=True)  # fmt: skip
    assert policy.spec.per_context and policy.num_contexts == 0
    assert policy.candidates.tolist() == list(metactl.PAPER_TEMPERATURES)
    assert policy.step == 0 and policy.requires == ("rewards",)
    other = metactl.recommended(seed=0)
    _drive(policy, 5)
    assert other.step == 0 and np.all(other.probs == 0.1)  # nothing is shared between calls
    # it learns: 1.1 keeps the most groups mixed and gets the largest share of the batch
    _drive(policy, 40)
    assert int(np.argmax(policy.probs)) == metactl.PAPER_TEMPERATURES.index(1.1)
    _same_policy(metactl.recommended(), metactl.recommended(seed=0))
    # the seed drives the draws: another seed picks another sequence of temperatures
    assert _drive(metactl.recommended(seed=0), 30) != _drive(metactl.recommended(seed=1), 30)


def test_it_is_the_scoreboard_arm_it_was_chosen_as():
    """Same rule, same configuration as the development run's arm, on every gym testbed."""
    from metactl.adapters.lab.scoreboard.suite import TESTBEDS, default_controllers

    assert CHOSEN_AS in CONTROLLERS and "recommended" in default_controllers()
    for steps in (200, 37):
        config = StudyConfig(steps=steps)
        _same_policy(make_controller("recommended", config, seed=3),
                     make_controller(CHOSEN_AS, config, seed=3))  # fmt: skip
        _same_policy(make_controller("recommended", config, seed=3),
                     metactl.recommended(seed=3))  # fmt: skip
    for testbed in TESTBEDS.values():
        if testbed.gym is not None:
            _same_policy(make_controller("recommended", testbed.gym, seed=1),
                         make_controller(CHOSEN_AS, testbed.gym, seed=1))  # fmt: skip


def test_the_reference_adapter_builds_the_same_policy():
    pytest.importorskip("torch")
    from metactl.adapters.lab.controllers import make_policy, validate_controller
    from metactl.adapters.lab.scoreboard.suite import reference_controller_name

    assert validate_controller("recommended") == "recommended"
    assert reference_controller_name("recommended") == "recommended"
    for steps in (150, 400):
        _same_policy(make_policy("recommended", steps=steps, seed=2), metactl.recommended(seed=2))
        _same_policy(make_policy("recommended", steps=steps, seed=2),
                     make_policy(CHOSEN_AS, steps=steps, seed=2))  # fmt: skip


def test_reproduce_accepts_recommended():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from metactl.adapters.lab.reproduce.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(
        ["--quick", "--controllers", "recommended,fixed-1.0", "--seeds", "1"]))  # fmt: skip
    assert cfg.controllers == ("recommended", "fixed-1.0")
    from metactl.adapters.lab.controllers import is_per_prompt

    assert is_per_prompt("recommended") and is_per_prompt(CHOSEN_AS)


def test_gym_study_runs_recommended(tmp_path):
    out = tmp_path / "study"
    rc = gym_study_main(["--seeds", "2", "--steps", "6", "--controllers",
                         f"recommended,{CHOSEN_AS}", "--workers", "1", "--out", str(out),
                         "--quiet", "--no-plots"])  # fmt: skip
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    text = json.dumps(results)
    assert "recommended" in text
    runs = np.load(out / "runs.npz", allow_pickle=False)
    names = [str(n) for n in runs["controller"]]
    rec = [i for i, n in enumerate(names) if n == "recommended"]
    chosen = [i for i, n in enumerate(names) if n == CHOSEN_AS]
    assert len(rec) == len(chosen) == 2
    # the alias is the same rule: identical curves, seed by seed
    np.testing.assert_array_equal(runs["temperature"][rec], runs["temperature"][chosen])
    np.testing.assert_array_equal(runs["success"][rec], runs["success"][chosen])


def test_scoreboard_runs_recommended(tmp_path, capsys):
    from metactl.adapters.lab.scoreboard.cli import main as scoreboard_main

    out = tmp_path / "board"
    rc = scoreboard_main(["--testbeds", "gym-default", "--controllers", "recommended",
                          "--seeds", "2", "--steps", "4", "--workers", "1", "--out", str(out),
                          "--no-progress", "--no-plots", "--resamples", "50"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "| recommended |" in (out / "scoreboard.md").read_text()
    records = sorted((out / "runs" / "gym-default" / "recommended").glob("seed*.json"))
    assert [p.name for p in records] == ["seed0.json", "seed1.json"]


@pytest.mark.parametrize("seed, error", [
    (-1, ValueError), (1.5, TypeError), (True, TypeError), (None, TypeError), ("0", TypeError),
])  # fmt: skip
def test_a_bad_seed_is_refused_with_the_argument_named(seed, error):
    with pytest.raises(error, match="seed"):
        metactl.recommended(seed=seed)


def test_the_docstring_example_runs():
    import doctest
    import sys

    result = doctest.testmod(sys.modules["metactl.recommended"])
    assert result.attempted >= 5 and result.failed == 0
