"""The full-scale (``--preset paper``) pieces: a local model, a local math data set (JSON, JSON
lines or parquet, validated row by row), prompt formatting, and the `math-verify` reward.

Nothing here downloads anything unless ``allow_download=True``: a missing model directory or data
file is a clear `FileNotFoundError`.

Example:
    >>> math_reward("so the answer is \\\\boxed{3/4}", "0.75")
    1.0
    >>> math_reward("0.75", "3/4"), math_reward("3/4", "\\\\frac{3}{4}"), math_reward("4/3", "3/4")
    (1.0, 1.0, 0.0)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_INSTRUCTION = (
    "Please reason step by step, and put your final answer within \\boxed{}."
)


@dataclass(frozen=True)
class MathProblem:
    """A math problem: the formatted ``prompt`` text and the reference ``answer``."""

    prompt: str
    answer: str


def math_reward(completion: str, answer: str) -> float:
    """1.0 when `math_verify` finds the completion's final answer equal to ``answer``, else 0.0.

    The gold answer is parsed as given and, failing that, wrapped in ``$...$``; any parser error
    or timeout counts as wrong.
    """
    from math_verify import parse, verify

    try:
        gold = parse(answer) or parse(f"${answer}$")
        pred = parse(completion)
        return 1.0 if gold and pred and verify(gold, pred) else 0.0
    except Exception:  # math-verify raises on malformed LaTeX or times out: not a correct answer
        return 0.0


def resolve_model_path(model: str, allow_download: bool = False) -> str:
    """Return ``model`` if it is a local directory; otherwise raise a clear error, unless
    ``allow_download`` (then the name is passed on to `from_pretrained` as a hub id)."""
    if Path(model).is_dir():
        if not (Path(model) / "config.json").exists():
            raise FileNotFoundError(f"--model {model}: directory has no config.json "
                                    "(save the model with save_pretrained)")
        return model
    if allow_download:
        return model
    raise FileNotFoundError(
        f"--model {model!r} is not a local directory. Point --model at a model saved with "
        "save_pretrained, or pass --allow-download to fetch it from the Hugging Face hub."
    )


DATA_EXTENSIONS = (".json", ".jsonl", ".parquet")


class DataFileError(ValueError):
    """A data file that cannot be used as it is; the message names the file, the line (or row)
    and the field."""


def _read_records(p: Path) -> list[tuple[str, Any]]:
    """The raw records of a JSON / JSONL / parquet file, each with its location for messages
    (``"<file>:<line>"`` for JSON lines, ``"<file>: row <i>"`` otherwise)."""
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError types
            raise DataFileError(f"{p}: not a readable parquet file ({exc})") from None
        return [(f"{p}: row {i}", r) for i, r in enumerate(table.to_pylist(), start=1)]
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{p}: not UTF-8 text ({exc})") from None
    if not text.strip():
        raise DataFileError(f"{p}: the file is empty")
    if suffix == ".json":
        # a .json file holds a list of records, a dict of equally long columns, or (as `datasets`
        # also accepts) JSON lines
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
            if "\n" not in text.strip():  # one line that is not JSON: report it as such
                return _json_lines(p, text)
        if isinstance(whole, list):
            return [(f"{p}: record {i}", r) for i, r in enumerate(whole, start=1)]
        if isinstance(whole, dict):
            columns = list(whole.values())
            if columns and all(isinstance(c, list) for c in columns) and len(
                    {len(c) for c in columns}) == 1:
                return [(f"{p}: row {i}", dict(zip(whole, values, strict=True)))
                        for i, values in enumerate(zip(*columns, strict=True), start=1)]
            if not columns or all(isinstance(c, list) for c in columns):
                raise DataFileError(f"{p}: a JSON object must map field names to equally long "
                                    "lists (columns)")
            return [(f"{p}: record 1", whole)]
        if whole is not None:
            raise DataFileError(f"{p}: expected a list of records, got a JSON "
                                f"{type(whole).__name__}")
    return _json_lines(p, text)


def _json_lines(p: Path, text: str) -> list[tuple[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{p}:{number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{p}:{number}: malformed JSON ({exc.msg} at column "
                                f"{exc.colno})") from None
    return records


def _field_value(where: str, record: dict, name: str, flag: str, answer: bool) -> str:
    if name not in record:
        raise DataFileError(f"{where}: no field {name!r} ({flag}); its fields are "
                            f"{sorted(record)}")
    value = record[name]
    if value is None:
        raise DataFileError(f"{where}: field {name!r} ({flag}) is null")
    if answer and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise DataFileError(f"{where}: field {name!r} ({flag}) is {value}, not a finite "
                                "number")
        return str(value)
    if not isinstance(value, str):
        kind = "a string or a number" if answer else "a string"
        raise DataFileError(f"{where}: field {name!r} ({flag}) must be {kind}, got "
                            f"{type(value).__name__} {value!r:.60}")
    if not value.strip():
        raise DataFileError(f"{where}: field {name!r} ({flag}) is empty")
    return value


def load_math_dataset(
    path: str, prompt_field: str = "problem", answer_field: str = "answer"
) -> list[dict[str, str]]:
    """Rows ``{"problem", "answer"}`` from a local JSON / JSONL / parquet file, validated row by
    row: every record must be an object whose ``prompt_field`` is a non-empty string and whose
    ``answer_field`` is a non-empty string or a finite number (stored as its ``str``). Nothing is
    coerced or skipped: the first bad record raises `DataFileError` (a `ValueError`) naming the
    file, its line (JSON lines) or row, and the field, plus how many records are bad in all.

    Example (a record without an answer):
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "d.jsonl"
        >>> _ = f.write_text('{"problem": "1+1?", "answer": 2}\\n{"problem": "2+2?"}\\n')
        >>> load_math_dataset(str(f))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        metactl.adapters.lab.reproduce.paper.DataFileError: .../d.jsonl:2: no field 'answer' ...
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {path!r} does not exist (expected a local "
                                ".json, .jsonl or .parquet file)")
    suffix = p.suffix.lower()
    if suffix not in DATA_EXTENSIONS:
        raise DataFileError(f"data file {path!r}: unsupported extension {suffix!r} "
                            "(use .json, .jsonl or .parquet)")
    if prompt_field == answer_field:
        raise ValueError(f"--prompt-field and --answer-field are both {prompt_field!r}")
    records = _read_records(p)
    if not records:
        raise DataFileError(f"{p}: no records (the file holds no problems)")
    rows: list[dict[str, str]] = []
    errors: list[str] = []
    for where, record in records:
        try:
            if not isinstance(record, dict):
                raise DataFileError(f"{where}: expected a JSON object with fields "
                                    f"{prompt_field!r} and {answer_field!r}, got "
                                    f"{type(record).__name__}")
            rows.append({
                "problem": _field_value(where, record, prompt_field, "--prompt-field", False),
                "answer": _field_value(where, record, answer_field, "--answer-field", True),
            })
        except DataFileError as exc:
            errors.append(str(exc))
    if errors:
        more = f" ({len(errors) - 1} more of {len(records)} records are bad)" if len(
            errors) > 1 else ""
        raise DataFileError(errors[0] + more)
    return rows


def heldout_size(n_rows: int, eval_size: int) -> int:
    """How many of a training file's ``n_rows`` problems are held out for evaluation when no
    evaluation set is given: ``eval_size``, but at most a fifth of the file (and at least 1).

    Example:
        >>> heldout_size(1000, 100), heldout_size(200, 100), heldout_size(3, 100)
        (100, 40, 1)
    """
    if n_rows < 2 or eval_size < 1:
        raise ValueError(f"need n_rows >= 2 and eval_size >= 1, got {n_rows} and {eval_size}")
    return min(eval_size, max(1, n_rows // 5))


def format_prompt(tokenizer: Any, problem: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The user turn ``problem + instruction``, through the tokenizer's chat template if it has
    one (with the generation prompt), else as plain text followed by a newline."""
    content = f"{problem}\n{instruction}" if instruction else problem
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             tokenize=False, add_generation_prompt=True)
    return content + "\n"


def load_model_and_tokenizer(
    model: str, *, device: str, allow_download: bool = False
) -> tuple[Any, Any]:
    """Load a causal LM (float32 master weights; bf16 comes from autocast) and its tokenizer.
    Adds a pad token (= eos) when the tokenizer has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model_path(model, allow_download)
    local = not allow_download or Path(src).is_dir()
    if local:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(src, local_files_only=local)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    lm = AutoModelForCausalLM.from_pretrained(src, local_files_only=local).float().to(device)
    return lm, tok
