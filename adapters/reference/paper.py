"""The full-scale (``--preset paper``) pieces: a local model, a local math data set read with
`datasets`, prompt formatting, and the `math-verify` reward.

Nothing here downloads anything unless ``allow_download=True``: a missing model directory or data
file is a clear `FileNotFoundError`.

Example:
    >>> math_reward("so the answer is \\\\boxed{3/4}", "0.75")
    1.0
    >>> math_reward("0.75", "3/4"), math_reward("3/4", "\\\\frac{3}{4}"), math_reward("4/3", "3/4")
    (1.0, 1.0, 0.0)
"""

from __future__ import annotations

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


def load_math_dataset(
    path: str, prompt_field: str = "problem", answer_field: str = "answer"
) -> list[dict[str, str]]:
    """Rows ``{"problem", "answer"}`` from a local JSON / JSONL / parquet file via `datasets`."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {path!r} does not exist (expected a local "
                                ".json, .jsonl or .parquet file)")
    from datasets import load_dataset

    suffix = p.suffix.lower()
    kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(suffix)
    if kind is None:
        raise ValueError(f"data file {path!r}: unsupported extension {suffix!r} "
                         "(use .json, .jsonl or .parquet)")
    ds = load_dataset(kind, data_files=str(p), split="train")
    for field_name, flag in ((prompt_field, "--prompt-field"), (answer_field, "--answer-field")):
        if field_name not in ds.column_names:
            raise ValueError(f"{path}: no field {field_name!r} ({flag}); fields are "
                             f"{ds.column_names}")
    return [{"problem": str(r[prompt_field]), "answer": str(r[answer_field])} for r in ds]


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
