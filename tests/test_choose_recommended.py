"""``benchmarks/choose_recommended.py``: PROTOCOL 16.5's shortlist and 16.6's choice, on
made-up scoreboard summaries whose answers are known by hand."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from tests.paths import load_script

DEV = ("gym-default", "gym-sharp", "gym-flat", "reference-quick")


def _module() -> ModuleType:
    return load_script("benchmarks/choose_recommended.py")


def _board(regrets: dict[str, list[float]], bound: tuple[str, ...] = ()) -> dict:
    """A scoreboard.json with these regrets on the four development testbeds."""
    fixed = {f"fixed-{t / 10:.1f}": [0.5] * 4 for t in range(6, 16)}
    summary = {arm: {"regret": dict(zip(DEV, values, strict=True)), "bound": arm in bound,
                     "ran_on": list(DEV)}
               for arm, values in {**fixed, **regrets}.items()}  # fmt: skip
    values = {t: {"controllers": {a: {"values": [1.0]} for a in summary}} for t in DEV}
    return {"summary": summary, "testbeds": values}


ALWAYS = {"mixture": [0.9] * 4, "spread": [0.8] * 4, "entropy-e3": [0.7] * 4, "exp3": [0.6] * 4}


def test_shortlist_is_the_top_five_by_worst_gym_regret_then_the_named_arms(capsys) -> None:
    cr = _module()
    arms = {f"arm{i}": [0.1 * i, 0.0, 0.0, 9.0] for i in range(1, 8)}  # reference not counted
    board = _board({**arms, **ALWAYS, "recommended": [0.6] * 4,
                    "bound-t1-10": [0.0] * 4}, bound=("bound-t1-10",))  # fmt: skip
    assert cr.shortlist(board) == ["arm1", "arm2", "arm3", "arm4", "arm5", "fixed-1.0",
                                   "mixture", "spread", "entropy-e3", "exp3"]  # fmt: skip
    out = capsys.readouterr().out
    assert "| recommended |" not in out and "| bound-t1-10 |" not in out  # alias, oracle


def test_recommended_must_be_exp3_s_alias() -> None:
    cr = _module()
    board = _board({**ALWAYS, "recommended": [0.6] * 4})
    board["testbeds"]["gym-flat"]["controllers"]["recommended"]["values"] = [0.0]
    with pytest.raises(ValueError, match="not an alias"):
        cr.shortlist(board)


@pytest.mark.parametrize(
    ("fixed_one", "expected"),
    [
        ([0.45] * 4, "fixed-1.0"),  # within 0.05 of the lowest worst case: fixed-1.0 wins
        ([0.46] * 4, "b"),  # outside: among the tied a and b, b has the lower mean
    ],
)
def test_choice_by_worst_case_then_ties(fixed_one: list[float], expected: str, capsys) -> None:
    cr = _module()
    board = _board({**ALWAYS, "a": [0.40, 0.40, 0.40, 0.40], "b": [0.44, 0.0, 0.0, 0.0]})
    board["summary"]["fixed-1.0"]["regret"] = dict(zip(DEV, fixed_one, strict=True))
    assert cr.choice(board, ["a", "b", "fixed-1.0", *ALWAYS]) == expected
    assert f"recommended: {expected}" in capsys.readouterr().out


def test_choice_refuses_an_arm_not_run_on_a_development_testbed(tmp_path: Path) -> None:
    cr = _module()
    board = _board({**ALWAYS, "a": [0.1] * 4})
    board["summary"]["a"]["regret"]["reference-quick"] = None
    path = tmp_path / "scoreboard.json"
    path.write_text(json.dumps(board))
    with pytest.raises(ValueError, match="a has no regret on reference-quick"):
        cr.main(["choice", str(path), "--shortlist", "a,fixed-1.0"])
