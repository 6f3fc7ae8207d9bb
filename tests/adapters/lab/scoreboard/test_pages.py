"""The scoreboard's per-testbed pages: the testbed's table and the signal diagnostics of its
likelihood-rule arms, drawn from what the run records keep (and records written without them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from metactl.adapters.lab.gym_study import run_one
from metactl.adapters.lab.scoreboard.cli import main
from metactl.adapters.lab.scoreboard.runner import load_record, write_record
from metactl.adapters.lab.scoreboard.signal_record import (
    COUNT_FIELDS,
    FLOAT_FIELDS,
    NOT_RECORDED,
    decode_signal,
    encode_signal,
    from_reference_result,
)
from metactl.adapters.lab.scoreboard.suite import TESTBEDS, is_likelihood_rule

from metactl.diagnostics import signal_diagnostics, stack_diagnostics

STEPS = 8
PNG = b"\x89PNG\r\n\x1a\n"


def _board(out: Path, controllers: str, *extra: str) -> int:
    return main(["--testbeds", "gym-default,gym-sharp", "--controllers", controllers,
                 "--seeds", "2", "--steps", str(STEPS), "--resamples", "200", "--workers", "1",
                 "--no-progress", "--out", str(out), *extra])  # fmt: skip


def _record_path(out: Path, testbed: str, controller: str, seed: int) -> Path:
    return out / "runs" / testbed / controller / f"seed{seed}.json"


def _payload(out: Path, testbed: str, controller: str, seed: int) -> dict:
    return json.loads(_record_path(out, testbed, controller, seed).read_text())["payload"]


def _rewrite(out: Path, testbed: str, controller: str, seed: int, change) -> None:
    """Rewrite a record through the runner's own writer (a valid checksum, the same key)."""
    payload = _payload(out, testbed, controller, seed)
    change(payload)
    write_record(_record_path(out, testbed, controller, seed), payload)


def _testbed_section(markdown: str, name: str) -> str:
    import re

    found = re.search(rf"^### {re.escape(name)}†? \(", markdown, flags=re.MULTILINE)
    assert found is not None, name
    start = found.start()
    return markdown[start:markdown.index("paired bootstrap over seeds", start)]


def test_tiny_scoreboard_writes_a_page_per_testbed_with_the_signal_figure(tmp_path: Path,
                                                                         capsys) -> None:
    out = tmp_path / "board"
    assert _board(out, "tampo,linear") == 0
    assert "48 runs (0 reused)" in capsys.readouterr().out
    board = (out / "scoreboard.md").read_text()
    index = json.loads((out / "scoreboard.json").read_text())["testbed_pages"]
    for name in ("gym-default", "gym-sharp"):
        page = (out / "testbeds" / f"{name}.md").read_text()
        assert f"[testbeds/{name}.md](testbeds/{name}.md)" in board  # linked from the board
        assert "[Back to the scoreboard](../scoreboard.md)" in page
        assert _testbed_section(board, name) in page  # the testbed's full table, as printed
        # one figure for the likelihood rule, none for the schedule (it has no signal)
        assert "### tampo" in page and "### linear" not in page
        assert f"![tampo: signal diagnostics]({name}/signal-tampo.png)" in page
        assert "Drawn: seeds 0, 1 (panel a: seed 0)." in page
        png = (out / "testbeds" / name / "signal-tampo.png").read_bytes()
        assert png[:8] == PNG and len(png) > 20_000
        assert index[name] == {"page": f"testbeds/{name}.md", "signal": {"tampo": {
            "seeds_with_diagnostics": [0, 1], "figure": f"testbeds/{name}/signal-tampo.png",
            "notes": []}}}  # fmt: skip
    assert sorted(p.name for p in (out / "testbeds").rglob("*.png")) == ["signal-tampo.png"] * 2

    # the record keeps the learner's own per-step diagnostics, exactly (every step, every seed)
    config = TESTBEDS["gym-sharp"].gym_config(STEPS)
    for seed in (0, 1):
        logged = run_one(("tampo", seed, config))["signal"]
        arrays, candidates = decode_signal(_payload(out, "gym-sharp", "tampo", seed)["signal"])
        assert candidates.tolist() == [0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
        np.testing.assert_array_equal(arrays["step"], np.arange(STEPS))
        for field in (*FLOAT_FIELDS, *COUNT_FIELDS, "signal"):
            np.testing.assert_array_equal(arrays[field], logged[field], err_msg=field)
    # an arm without a likelihood signal says so (None), unlike an old record (no key)
    assert _payload(out, "gym-default", "linear", 0)["signal"] is None
    assert _payload(out, "gym-default", "fixed-1.0", 1)["signal"] is None


def test_records_without_diagnostics_are_reused_and_marked(tmp_path: Path, capsys) -> None:
    out = tmp_path / "board"
    # two workers for the runs and the four figures (drawn in two processes)
    assert _board(out, "tampo,hedge", "--workers", "2") == 0
    figures = sorted(str(p.relative_to(out)) for p in (out / "testbeds").rglob("*.png"))
    assert figures == [f"testbeds/{t}/signal-{c}.png" for t in ("gym-default", "gym-sharp")
                       for c in ("hedge", "tampo")]  # fmt: skip

    def old(payload: dict) -> None:  # what the scoreboard wrote before it kept diagnostics
        del payload["signal"]

    _rewrite(out, "gym-default", "tampo", 0, old)
    _rewrite(out, "gym-sharp", "tampo", 0, old)
    _rewrite(out, "gym-sharp", "tampo", 1, old)
    # checksum-valid blocks this code cannot draw: another format, fewer steps than the run
    _rewrite(out, "gym-default", "hedge", 0, lambda p: p["signal"].update(format=99))

    def half(payload: dict) -> None:
        block = payload["signal"]
        for field in ("step", *FLOAT_FIELDS, *COUNT_FIELDS, "signal"):
            block[field] = block[field][: STEPS // 2]

    _rewrite(out, "gym-default", "hedge", 1, half)
    before = {p: p.read_text() for p in (out / "runs").rglob("*.json")}
    capsys.readouterr()

    assert _board(out, "tampo,hedge") == 0
    captured = capsys.readouterr()
    assert "48 runs (48 reused)" in captured.out  # old records are reused, not recomputed
    assert {p: p.read_text() for p in (out / "runs").rglob("*.json")} == before
    for name, seed in (("gym-default", 0), ("gym-sharp", 0), ("gym-sharp", 1)):
        payload, why = load_record(_record_path(out, name, "tampo", seed),
                                   _payload(out, name, "tampo", seed)["key"])  # fmt: skip
        assert why is None and payload is not None and "signal" not in payload

    index = json.loads((out / "scoreboard.json").read_text())["testbed_pages"]
    default = (out / "testbeds" / "gym-default.md").read_text()
    # one old record of two: the figure draws the other seed only, and the page says why
    assert "Drawn: seed 1 (panel a: seed 1)." in default
    assert f"- seed 0: {NOT_RECORDED} (a record written before" in default
    assert index["gym-default"]["signal"]["tampo"]["seeds_with_diagnostics"] == [1]
    # hedge: nothing drawable, nothing invented, no figure
    hedge = index["gym-default"]["signal"]["hedge"]
    assert hedge["figure"] is None and hedge["seeds_with_diagnostics"] == []
    assert "seed 0: diagnostics unreadable (the signal block has format 99" in hedge["notes"][0]
    assert hedge["notes"][1].startswith(f"seed 1: diagnostics cover {STEPS // 2} of {STEPS} steps")
    assert not (out / "testbeds" / "gym-default" / "signal-hedge.png").exists()
    # every record of the arm is old: no figure (the one of the first invocation is removed)
    sharp = (out / "testbeds" / "gym-sharp.md").read_text()
    assert f"- seeds 0, 1: {NOT_RECORDED}" in sharp
    assert "No figure: no seed of this arm has diagnostics to draw." in sharp
    assert not (out / "testbeds" / "gym-sharp" / "signal-tampo.png").exists()
    assert index["gym-sharp"]["signal"]["tampo"]["figure"] is None
    assert (out / "testbeds" / "gym-sharp" / "signal-hedge.png").exists()
    board = (out / "scoreboard.md").read_text()
    assert "(this table; signal diagnostics of tampo)" in board  # gym-default: tampo drawn
    assert "(this table; signal diagnostics of hedge)" in board  # gym-sharp: hedge only


def test_no_plots_writes_the_pages_without_any_png(tmp_path: Path) -> None:
    out = tmp_path / "board"
    assert _board(out, "tampo,linear", "--no-plots") == 0
    assert list(out.rglob("*.png")) == []
    page = (out / "testbeds" / "gym-default.md").read_text()
    assert ("Figure not drawn (--no-plots); the diagnostics of seeds 0, 1 are in their run "
            "records") in page
    assert "![" not in page
    index = json.loads((out / "scoreboard.json").read_text())["testbed_pages"]
    assert index["gym-default"]["signal"]["tampo"] == {
        "seeds_with_diagnostics": [0, 1], "figure": None, "notes": []}


def _step(rng: np.random.Generator, temperature: float) -> dict:
    loglik = rng.normal(size=(8, 3))
    advantages = rng.permutation([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0])
    return signal_diagnostics(loglik, advantages, [0.8, 1.0, 1.2], temperature, group_size=4)


def test_reference_result_blocks_keep_the_steps_that_have_diagnostics() -> None:
    rng = np.random.default_rng(3)
    steps = [_step(rng, 1.0), None, _step(rng, 1.2)]
    block = from_reference_result({"signal": steps, "candidates": [0.8, 1.0, 1.2]})
    assert block is not None and block["step"] == [0, 2]
    arrays, candidates = decode_signal(json.loads(json.dumps(block)))  # through JSON, as stored
    expected = stack_diagnostics([steps[0], steps[2]])
    for field in (*FLOAT_FIELDS, *COUNT_FIELDS, "signal"):
        np.testing.assert_array_equal(arrays[field], expected[field], err_msg=field)
    assert candidates.tolist() == [0.8, 1.0, 1.2]
    # a joint grid of knobs: settings per candidate, the signal over the candidate indices
    settings = [{"temperature": t, "top_p": 0.9} for t in (0.8, 1.0, 1.2)]
    joint = from_reference_result({"signal": steps, "candidates": settings})
    assert joint is not None and joint["candidates"] == [0.0, 1.0, 2.0]
    assert joint["candidate_settings"] == settings
    assert decode_signal(joint)[0]["signal"].tolist() == block["signal"]
    assert from_reference_result({"signal": [None, None], "candidates": [1.0]}) is None
    assert from_reference_result({"temperature": [1.0]}) is None  # not a likelihood rule


def test_signal_blocks_are_validated() -> None:
    rng = np.random.default_rng(4)
    stacked = stack_diagnostics([_step(rng, 1.0), _step(rng, 0.8)])
    good = encode_signal(stacked, [0.8, 1.0, 1.2], [0, 1])
    decode_signal(good)
    with pytest.raises(ValueError, match="steps must not be empty"):
        encode_signal(stacked, [0.8, 1.0, 1.2], [])
    with pytest.raises(ValueError, match="strictly increasing"):
        encode_signal(stacked, [0.8, 1.0, 1.2], [1, 1])
    with pytest.raises(ValueError, match=r"stacked\['signal'\] has shape \(2, 3\), expected"):
        encode_signal(stacked, [0.8, 1.0], [0, 1])
    with pytest.raises(ValueError, match="lacks the fields"):
        encode_signal({k: v for k, v in stacked.items() if k != "support_mean"}, [0.8, 1, 1.2],
                      [0, 1])  # fmt: skip
    with pytest.raises(ValueError, match="signal_rows must be a non-negative integer"):
        encode_signal({**stacked, "signal_rows": np.array([8.0, 2.5])}, [0.8, 1.0, 1.2], [0, 1])
    with pytest.raises(ValueError, match="must be finite"):
        encode_signal({**stacked, "signal": np.full((2, 3), np.nan)}, [0.8, 1.0, 1.2], [0, 1])
    with pytest.raises(TypeError, match="stacked must be a mapping"):
        encode_signal([1.0], [1.0], [0])  # type: ignore[arg-type]
    for bad in ({**good, "signal": good["signal"][:1]}, {**good, "format": 2},
                {k: v for k, v in good.items() if k != "step"},
                {**good, "support_mean": ["x", 1.0]}, [good]):  # fmt: skip
        with pytest.raises(ValueError, match="signal block"):
            decode_signal(bad)


def test_likelihood_rules_are_the_arms_with_diagnostics() -> None:
    gym = TESTBEDS["gym-default"]
    assert is_likelihood_rule("tampo", gym) and is_likelihood_rule("hedge", gym)
    assert not is_likelihood_rule("linear", gym) and not is_likelihood_rule("fixed-1.0", gym)
    with pytest.raises(ValueError, match="unknown controller"):
        is_likelihood_rule("nonsense", gym)
