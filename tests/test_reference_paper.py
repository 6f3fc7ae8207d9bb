"""The ``--preset paper`` path end to end on CPU: a tiny local model saved with save_pretrained,
a small local JSONL, a handful of steps; and clear failures for missing paths."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("math_verify")

from metactl.adapters.reference.cli import main
from metactl.adapters.reference.model import TinyModelConfig, build_model
from metactl.adapters.reference.paper import (
    format_prompt,
    load_math_dataset,
    resolve_model_path,
)
from metactl.adapters.reference.tokenizer import build_char_tokenizer

ALPHABET = "0123456789+-*/=.,()^ \n\\{}$abcdefghijklmnopqrstuvwxyz?"


@pytest.fixture(scope="module")
def local_model_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    tok = build_char_tokenizer(ALPHABET)
    model = build_model(TinyModelConfig(hidden_size=32, num_layers=1, intermediate_size=64,
                                        max_positions=64), tok, seed=0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = [{"question": f"what is {a}+{a}?", "final": str(2 * a)} for a in range(14)]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:4]) + "\n")
    return root


def test_loader_reads_configurable_fields_and_formats_prompts(local_model_and_data):
    root = local_model_and_data
    rows = load_math_dataset(str(root / "train.jsonl"), "question", "final")
    assert rows[3] == {"problem": "what is 3+3?", "answer": "6"}
    with pytest.raises(ValueError, match="--prompt-field"):
        load_math_dataset(str(root / "train.jsonl"), "problem", "final")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "model")
    assert format_prompt(tok, "1+1?", "") == "1+1?\n"  # no chat template: plain text


def test_missing_model_or_data_fails_clearly_without_downloading(local_model_and_data, capsys):
    root = local_model_and_data
    with pytest.raises(FileNotFoundError, match="--allow-download"):
        resolve_model_path(str(root / "nope"))
    rc = main(["--preset", "paper", "--model", str(root / "nope"), "--data",
               str(root / "train.jsonl"), "--out", str(root / "x"), "--device", "cpu"])
    assert rc == 2 and "--allow-download" in capsys.readouterr().err
    rc = main(["--preset", "paper", "--model", str(root / "model"), "--data",
               str(root / "missing.jsonl"), "--out", str(root / "x"), "--device", "cpu"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(["--preset", "paper", "--data", str(root / "train.jsonl")])
    assert rc == 2 and "--model" in capsys.readouterr().err
    assert not (root / "x" / "report.md").exists()


def test_paper_preset_runs_end_to_end_on_cpu(local_model_and_data):
    root = local_model_and_data
    out = root / "report"
    rc = main([
        "--preset", "paper", "--model", str(root / "model"), "--data", str(root / "train.jsonl"),
        "--prompt-field", "question", "--answer-field", "final", "--instruction", "",
        "--eval-data", f"small={root / 'eval.jsonl'}", "--out", str(out), "--device", "cpu",
        "--controllers", "tampo,fixed-0.9", "--steps", "2", "--prompts-per-step", "2",
        "--group-size", "2", "--grad-accum", "2", "--max-new-tokens", "6",
        "--max-prompt-len", "24", "--eval-n", "3", "--eval-k", "2", "--curve-points", "1",
        "--no-progress",
    ])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["grpo"]["lr"] == 1e-6  # the paper's hyperparameters, not the cpu's
    assert report["config"]["grpo"]["kl_beta"] == 0.04  # so the KL / reference path ran too
    assert set(report["summary"]) == {"tampo", "fixed-0.9"}
    assert set(report["summary"]["tampo"]["benchmarks"]) == {"small", "avg"}
    md = (out / "report.md").read_text()
    assert "| TAMPO |" in md and "| GRPO, T = 0.9 |" in md
    tampo_run = json.loads((out / "runs" / "tampo" / "seed0" / "result.json").read_text())
    assert len(tampo_run["temperature"]) == 2
    assert len(tampo_run["diagnostics"]) >= 1  # candidate likelihoods were recorded
    assert all(0.6 <= t <= 1.5 for t in tampo_run["temperature"])
