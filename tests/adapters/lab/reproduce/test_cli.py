"""``metactl reproduce`` honours every flag or refuses it: preset values never override an
explicit flag, flags the preset does not use are errors, and every value (controller names and
output folders included) is checked before any work starts, with one line naming the flag and
exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from metactl.adapters.lab import controllers
from metactl.adapters.lab.reproduce import experiment
from metactl.adapters.lab.reproduce.cli import build_parser, config_from_args, main
from metactl.adapters.lab.reproduce.presets import cpu_config


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the run gets as far as the warm-up or the experiment: every refusal
    below must come before any work."""

    def started(*args, **kwargs):
        raise AssertionError("work started before the arguments were refused")

    monkeypatch.setattr(experiment, "run_experiment", started)
    monkeypatch.setattr(experiment, "prepare_start", started)


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """``main(argv)``'s exit status (argparse's SystemExit included) and its stderr."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = int(exc.code) if exc.code is not None else 0
    return rc, capsys.readouterr().err


def assert_refused(argv: list[str], flag: str, capsys, tmp_path: Path) -> str:
    out = tmp_path / "out"
    rc, err = run_main([*argv, "--out", str(out), "--cache-dir", str(tmp_path / "cache")], capsys)
    assert rc == 2, err
    assert err.strip().count("\n") == 0, f"not one line: {err!r}"
    assert flag in err, f"{flag!r} not named in {err!r}"
    assert not out.exists() and not (tmp_path / "cache").exists()  # nothing was created
    return err


def test_steps_and_other_flags_win_over_the_quick_preset():
    cfg = config_from_args(build_parser().parse_args(
        ["--quick", "--steps", "40", "--seeds", "1", "--workers", "1", "--threads", "3"]))
    assert cfg.grpo.steps == 40
    assert cfg.seeds == (0,) and cfg.workers == 1 and cfg.threads_per_worker == 3
    assert cpu_config(quick=True, grpo={"steps": 40}).grpo.steps == 40
    assert cpu_config(quick=True, steps=40).grpo.steps == 40
    assert cpu_config(quick=True, steps=40, grpo={"steps": 40}).grpo.steps == 40
    with pytest.raises(ValueError, match="disagree"):
        cpu_config(quick=True, steps=40, grpo={"steps": 30})
    default = config_from_args(build_parser().parse_args(["--quick"]))
    assert default.grpo.steps == 150 and default.seeds == (0, 1) and default.workers == 2


def test_train_pool_reaches_the_task_and_keeps_the_warmup_key():
    from metactl.adapters.reference.model import TinyModelConfig
    from metactl.adapters.reference.sft import WarmupConfig, cache_key

    cfg = config_from_args(build_parser().parse_args(["--quick", "--train-pool", "64"]))
    assert cfg.task.train_pool == 64
    default = config_from_args(build_parser().parse_args(["--quick"]))
    assert default.task.train_pool == 0
    # the pool only picks RL prompts: the cached warm-up is shared
    assert cache_key(cfg.task, TinyModelConfig(), WarmupConfig()) == cache_key(
        default.task, TinyModelConfig(), WarmupConfig())


BAD_VALUES = [
    (["--steps", "0"], "--steps"), (["--steps", "-5"], "--steps"), (["--steps", "abc"], "--steps"),
    (["--seeds", "0"], "--seeds"), (["--seeds", "-2"], "--seeds"),
    (["--workers", "0"], "--workers"), (["--workers", "-1"], "--workers"),
    (["--threads", "0"], "--threads"), (["--threads", "-3"], "--threads"),
    (["--prompts-per-step", "0"], "--prompts-per-step"),
    (["--group-size", "1"], "--group-size"), (["--grad-accum", "0"], "--grad-accum"),
    (["--grad-accum", "3"], "--grad-accum"),  # does not divide 16 x 8 rollouts
    (["--lr", "0"], "--lr"), (["--lr", "-1e-4"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--kl-beta", "-0.1"], "--kl-beta"), (["--kl-beta", "inf"], "--kl-beta"),
    (["--max-prompt-len", "-1"], "--max-prompt-len"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"),
    (["--train-pool", "-1"], "--train-pool"),
    (["--eval-n", "0"], "--eval-n"), (["--eval-n", "5000"], "--eval-n"),  # > held-out problems
    (["--eval-k", "0"], "--eval-k"),
    (["--eval-temperature", "-0.5"], "--eval-temperature"),
    (["--eval-temperature", "nan"], "--eval-temperature"),
    (["--eval-top-p", "0"], "--eval-top-p"), (["--eval-top-p", "1.5"], "--eval-top-p"),
    (["--curve-points", "-1"], "--curve-points"),
    (["--out", ""], "--out"), (["--cache-dir", " "], "--cache-dir"),
]


@pytest.mark.parametrize(("argv", "flag"), BAD_VALUES, ids=" ".join)
def test_a_bad_value_is_refused_in_one_line_before_any_work(argv, flag, no_work, capsys,
                                                            tmp_path):
    # the later --out / --cache-dir win in argparse, so test those two without them
    if flag in ("--out", "--cache-dir"):
        rc, err = run_main(argv, capsys)
        assert rc == 2 and flag in err and err.strip().count("\n") == 0
        return
    assert_refused(argv, flag, capsys, tmp_path)


BAD_CONTROLLERS = ["fixed-abc", "foo", "entropy-x", "linear-1", "fixed-1.7", "linear-0.9-2.0",
                   "entropy-0", "fixed-nan", "cosine-0.9-1.5-1.2", "tampo,,fixed-0.9",
                   "tampo,tampo", ",", "TAMPO"]


@pytest.mark.parametrize("controllers", BAD_CONTROLLERS)
def test_an_unknown_controller_is_refused_before_the_warm_up(controllers, no_work, capsys,
                                                             tmp_path):
    err = assert_refused(["--controllers", controllers], "--controllers", capsys, tmp_path)
    if "," not in controllers:
        assert repr(controllers) in err and "valid forms" in err and "fixed-T" in err


def test_validate_controller_accepts_every_documented_arm_and_names_the_bad_one():
    validate_controller = controllers.validate_controller
    for name in (*controllers.PAPER_ARMS, *controllers.OPTIONAL_ARMS, "fixed-0.6",
                 "cosine-1.5-0.6", "entropy-1.2"):
        assert validate_controller(name) == name
        # every knob value > 0 (a joint arm's decision value is its {knob: value} setting)
        setting = controllers.make_policy(name, steps=5, seed=0).select().setting
        assert setting and all(v > 0 for v in setting.values())
    for name in ("fixed-abc", "foo", "entropy-x", "linear-1", "fixed-", "linear-0.9-"):
        with pytest.raises(ValueError, match=f"'{name}'.*valid forms"):
            validate_controller(name)
    with pytest.raises(ValueError, match="steps"):
        validate_controller("tampo", steps=0)


UNUSED_BY_PRESET = [
    (["--model", "m"], "--model"), (["--data", "d.jsonl"], "--data"),
    (["--eval-data", "a=b.jsonl"], "--eval-data"), (["--eval-size", "5"], "--eval-size"),
    (["--prompt-field", "q"], "--prompt-field"), (["--answer-field", "a"], "--answer-field"),
    (["--instruction", "x"], "--instruction"), (["--allow-download"], "--allow-download"),
    (["--max-new-tokens", "3"], "--max-new-tokens"),
    (["--preset", "paper", "--model", "m", "--data", "d.jsonl", "--quick"], "--quick"),
    (["--preset", "paper", "--model", "m", "--data", "d.jsonl", "--cache-dir", "c"],
     "--cache-dir"),
    (["--preset", "paper", "--model", "m", "--data", "d.jsonl", "--workers", "2"], "--workers"),
    (["--preset", "paper", "--model", "m", "--data", "d.jsonl", "--train-pool", "8"],
     "--train-pool"),
    (["--preset", "paper", "--model", "m", "--data", "d.jsonl", "--eval-data", "a=b.jsonl",
      "--eval-size", "5"], "--eval-size"),
    (["--preset", "paper", "--model", "m", "--data", "d.jsonl", "--eval-data", "=b.jsonl"],
     "--eval-data"),
]


@pytest.mark.parametrize(("argv", "flag"), UNUSED_BY_PRESET, ids=" ".join)
def test_a_flag_the_preset_would_ignore_is_refused(argv, flag, no_work, capsys, tmp_path):
    out = tmp_path / "out"
    rc, err = run_main([*argv, "--out", str(out)], capsys)
    assert rc == 2 and err.strip().count("\n") == 0, err
    assert flag in err
    assert not out.exists()


def _fast_args() -> list[str]:
    return ["--controllers", "fixed-0.9", "--seeds", "1", "--steps", "1"]


def test_out_or_cache_dir_naming_a_file_is_refused(no_work, capsys, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for flag, other in (("--out", "--cache-dir"), ("--cache-dir", "--out")):
        for bad in (a_file, a_file / "below"):
            rc, err = run_main([*_fast_args(), flag, str(bad), other, str(tmp_path / "ok")], capsys)
            assert rc == 2 and err.strip().count("\n") == 0, err
            assert f"{flag} {bad}" in err
    assert a_file.read_text() == "not a folder"


def _unwritable_dirs() -> list[Path]:
    """Real folders this process cannot write in, even as root (sysfs refuses new files)."""
    found = []
    for candidate in (Path("/sys/kernel"), Path("/proc/1")):
        if candidate.is_dir():
            try:
                with tempfile.NamedTemporaryFile(dir=candidate):
                    pass
            except OSError:
                found.append(candidate)
    return found


@pytest.mark.parametrize("flag", ["--out", "--cache-dir"])
def test_an_unwritable_output_folder_is_refused_before_the_run(flag, no_work, capsys, tmp_path):
    dirs = _unwritable_dirs()
    if not dirs:
        pytest.skip("no unwritable folder on this machine")
    other = "--cache-dir" if flag == "--out" else "--out"
    for bad in (dirs[0], dirs[0] / "metactl-test-run"):  # existing, and to be created
        rc, err = run_main([*_fast_args(), flag, str(bad), other, str(tmp_path / "ok")], capsys)
        assert rc == 2 and err.strip().count("\n") == 0, err
        assert f"{flag} {bad}" in err and ("not writable" in err or "cannot create" in err)
        assert not bad.exists() or bad == dirs[0]


def test_the_write_check_leaves_no_file_behind(no_work, capsys, tmp_path):
    from metactl.adapters.lab.reproduce.cli import check_output_dirs

    out, cache = tmp_path / "o" / "deep", tmp_path / "c"
    cfg = config_from_args(build_parser().parse_args(
        [*_fast_args(), "--out", str(out), "--cache-dir", str(cache)]))
    check_output_dirs(cfg)
    assert list(out.iterdir()) == [] and list(cache.iterdir()) == []


@pytest.mark.parametrize(("argv", "flag"), [(["--steps", "0"], "--steps"),
                                            (["--controllers", "fixed-abc"], "--controllers")])
def test_the_real_command_exits_2_with_one_line(argv, flag, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "METACTL_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "metactl", "reproduce", *argv, "--out",
                           str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"metactl reproduce: error: argument {flag}:")
    assert proc.stderr.strip().count("\n") == 0 and proc.stdout == ""
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_no_progress_is_passed_on_and_quiets_the_hub_bars(tmp_path, monkeypatch, capsys):
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    seen = {}

    class Reached(Exception):
        pass

    def record(cfg, progress):
        seen.update(progress=progress, env=os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"),
                    bars=hf_logging.is_progress_bar_enabled())
        raise Reached

    monkeypatch.setattr(experiment, "run_experiment", record)
    try:
        with pytest.raises(Reached):
            main([*_fast_args(), "--no-progress", "--out", str(tmp_path / "o"),
                  "--cache-dir", str(tmp_path / "c")])
    finally:
        hf_logging.enable_progress_bar()
    assert seen == {"progress": False, "env": "1", "bars": False}


def test_no_progress_hides_every_progress_bar_with_one_worker(tmp_path, capfd, monkeypatch):
    from metactl.adapters.lab.reproduce.cli import quiet_progress_bars
    from metactl.adapters.reference.model import TinyModelConfig
    from metactl.adapters.reference.sft import WarmupConfig
    from metactl.adapters.reference.tasks import ChainTask
    from metactl.adapters.reference.trainer import GRPOConfig
    from transformers.utils import logging as hf_logging

    pytest.importorskip("matplotlib")
    task = ChainTask(ops=("+",), min_len=1, max_len=1, benchmark_lengths=(1,))
    cfg = experiment.ReproduceConfig(
        preset="cpu", out=str(tmp_path / "out"), controllers=("fixed-0.9",), seeds=(0,),
        grpo=GRPOConfig(steps=2, prompts_per_step=2, group_size=2, lr=1e-3,
                        max_new_tokens=task.max_completion_tokens, checkpoint_every=0),
        eval=experiment.EvalConfig(n_per_benchmark=4, k=1, curve_n=2, curve_k=1,
                                   curve_points=0, train_check_n=8,
                                   start_greedy_range=(0.0, 1.0)),  # a 2-step warm-up
        workers=1, task=task,
        model=TinyModelConfig(hidden_size=16, num_layers=1, intermediate_size=32,
                              max_positions=32),
        warmup=WarmupConfig(steps=2, batch_size=8), cache_dir=str(tmp_path / "cache"),
    )
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)  # restored afterwards
    quiet_progress_bars()
    try:
        experiment.run_experiment(cfg, progress=False)
    finally:
        hf_logging.enable_progress_bar()
    err = capfd.readouterr().err
    assert "it/s" not in err and "%|" not in err, err  # no tqdm bar of any kind
