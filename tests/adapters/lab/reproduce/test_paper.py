"""The ``--preset paper`` path end to end on CPU: a tiny local model saved with save_pretrained,
a small local JSONL, a handful of steps; and clear failures for missing paths."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("math_verify")

from metactl.adapters.char_tokenizer import build_char_tokenizer
from metactl.adapters.lab.reproduce.cli import main
from metactl.adapters.lab.reproduce.paper import (
    format_prompt,
    load_math_dataset,
    resolve_model_path,
)
from metactl.adapters.reference.model import TinyModelConfig, build_model

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


# -- the data files are validated row by row before anything loads ------------------------------
GOOD = {"question": "what is 1+1?", "final": "2"}
BAD_JSONL = [
    # (lines of the file, what the error must say)
    ([GOOD, GOOD, {"question": "q"}], r"train\.jsonl:3: no field 'final' \(--answer-field\)"),
    ([GOOD, {"question": "q", "final": None}], r"train\.jsonl:2: field 'final' .* is null"),
    ([GOOD, GOOD, GOOD, {"final": "4"}], r"train\.jsonl:4: no field 'question' \(--prompt-field"),
    ([GOOD, {"question": None, "final": "1"}], r"train\.jsonl:2: field 'question' .* is null"),
    ([GOOD, {"question": 7, "final": "1"}], r"train\.jsonl:2: field 'question' .* must be a str"),
    ([GOOD, {"question": "q", "final": [1, 2]}], r":2: field 'final' .* string or a number"),
    ([GOOD, {"question": "q", "final": {"v": 1}}], r":2: field 'final' .* string or a number"),
    ([GOOD, {"question": "q", "final": True}], r":2: field 'final' .* string or a number"),
    ([GOOD, {"question": "q", "final": "  "}], r":2: field 'final' .* is empty"),
    ([GOOD, {"question": "", "final": "3"}], r":2: field 'question' .* is empty"),
    ([GOOD, [1, 2]], r"train\.jsonl:2: expected a JSON object"),
    ([GOOD, GOOD, '{"question": "q", "final": '], r"train\.jsonl:3: malformed JSON"),
    ([GOOD, '{"question": "q", "final": NaN}'], r":2: field 'final' .* not a finite number"),
]


def _write_jsonl(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n"
                            for ln in lines))
    return path


@pytest.fixture
def no_work(monkeypatch):
    from metactl.adapters.lab.reproduce import experiment, paper

    def started(*args, **kwargs):
        raise AssertionError("work started before the data was validated")

    for module, name in ((experiment, "run_experiment"), (experiment, "prepare_start"),
                         (paper, "load_model_and_tokenizer")):
        monkeypatch.setattr(module, name, started)


def _paper_argv(root, data, *extra):
    return ["--preset", "paper", "--model", str(root / "model"), "--data", str(data),
            "--prompt-field", "question", "--answer-field", "final", "--device", "cpu",
            "--out", str(data.parent / "out"), "--grad-accum", "1", "--prompts-per-step", "1",
            *extra]


@pytest.mark.parametrize(("lines", "message"), BAD_JSONL)
def test_a_bad_row_is_named_by_file_line_and_field(lines, message, local_model_and_data,
                                                   tmp_path, no_work, capsys):
    data = _write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(ValueError, match=message):
        load_math_dataset(str(data), "question", "final")
    rc = main(_paper_argv(local_model_and_data, data))
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().count("\n") == 0, err
    assert err.startswith("metactl reproduce: error: --data: ") and "None" not in err
    assert not (tmp_path / "out").exists()


def test_every_bad_row_is_counted_and_nothing_becomes_none(tmp_path):
    lines = [GOOD] * 200
    for i in range(0, 200, 20):
        lines[i] = {"question": "q"}  # 10 rows without the answer
    for i in range(5, 200, 20):
        lines[i] = {"question": "q", "final": None}  # 10 with a null one
    for i in range(7, 200, 20):
        lines[i] = {"final": "1"}  # 10 without the problem
    data = _write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(ValueError, match=r"train\.jsonl:1: no field 'final'.*\(29 more of 200 "):
        load_math_dataset(str(data), "question", "final")


@pytest.mark.parametrize(("name", "text", "message"), [
    ("empty.jsonl", "", r"empty\.jsonl: the file is empty"),
    ("blank.jsonl", "\n  \n\n", r"blank\.jsonl: the file is empty"),
    ("none.json", "[]", r"none\.json: no records"),
    ("scalar.json", "42", r"scalar\.json: expected a list of records"),
    ("bad.json", '[{"question": "q", "final": "1"}, {"question": "q"}]',
     r"bad\.json: record 2: no field 'final'"),
    ("ragged.json", '{"question": ["a", "b"], "final": ["1"]}', r"ragged\.json: a JSON object"),
    ("data.csv", "question,final\nq,1\n", r"data\.csv.*unsupported extension '\.csv'"),
    ("latin1.jsonl", None, r"latin1\.jsonl: not UTF-8"),
])
def test_empty_or_malformed_files_fail_clearly(name, text, message, tmp_path):
    path = tmp_path / name
    if text is None:
        path.write_bytes('{"question": "caf\xe9", "final": "1"}\n'.encode("latin-1"))
    else:
        path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_math_dataset(str(path), "question", "final")


def test_the_accepted_layouts_give_the_same_rows(tmp_path):
    records = [{"question": f"q{i}", "final": v} for i, v in enumerate(["1", 2, 0.75, "x"])]
    want = [{"problem": f"q{i}", "answer": a} for i, a in enumerate(["1", "2", "0.75", "x"])]
    _write_jsonl(tmp_path / "a.jsonl", records)
    (tmp_path / "b.json").write_text(json.dumps(records))
    (tmp_path / "c.json").write_text(json.dumps(
        {"question": [r["question"] for r in records], "final": [str(r["final"]) for r in records],
         "extra": [None] * 4}))
    _write_jsonl(tmp_path / "d.json", records)  # JSON lines in a .json file
    for name in ("a.jsonl", "b.json", "d.json"):
        assert load_math_dataset(str(tmp_path / name), "question", "final") == want, name
    assert load_math_dataset(str(tmp_path / "c.json"), "question", "final") == want


def test_parquet_rows_are_validated_too(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["q1", "q2"], "final": ["1", "2"]}),
                   tmp_path / "ok.parquet")
    assert load_math_dataset(str(tmp_path / "ok.parquet"), "question", "final")[1] == {
        "problem": "q2", "answer": "2"}
    pq.write_table(pa.table({"question": ["q1", "q2"], "final": ["1", None]}),
                   tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: row 2: field 'final' .* is null"):
        load_math_dataset(str(tmp_path / "bad.parquet"), "question", "final")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"junk\.parquet: not a readable parquet file"):
        load_math_dataset(str(tmp_path / "junk.parquet"), "question", "final")


def test_eval_data_and_row_counts_are_checked_before_the_model_loads(
        local_model_and_data, tmp_path, no_work, capsys):
    root = local_model_and_data
    bad_eval = _write_jsonl(tmp_path / "eval.jsonl", [GOOD, {"question": "q"}])
    rc = main(_paper_argv(root, root / "train.jsonl", "--eval-data", f"small={bad_eval}"))
    err = capsys.readouterr().err
    assert rc == 2 and "--eval-data: " in err and "eval.jsonl:2: no field 'final'" in err
    # 14 problems, 2 held out: 12 left for training, fewer than 13 prompts per step
    rc = main([*_paper_argv(root, root / "train.jsonl"), "--prompts-per-step", "13"])
    err = capsys.readouterr().err
    assert rc == 2 and "12 training problems" in err and "--prompts-per-step 13" in err
    rc = main(_paper_argv(root, root / "train.jsonl", "--eval-data", f"a={root / 'eval.jsonl'}",
                          "--eval-data", f"a={root / 'eval.jsonl'}"))
    err = capsys.readouterr().err
    assert rc == 2 and "--eval-data names ['a'] more than once" in err
