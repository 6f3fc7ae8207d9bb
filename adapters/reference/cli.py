"""``metactl reproduce``: run the paper's comparison and write a report.

Examples:
    metactl reproduce --quick                    # CPU preset, < 10 min on 2 cores
    metactl reproduce                            # CPU preset, full (5 seeds per arm)
    metactl reproduce --controllers fixed-0.9,fixed-1.5 --seeds 3   # the temperature check alone
    metactl reproduce --preset paper --model /models/R1-Distill-1.5B --data open-s1.jsonl \\
        --eval-data aime24=aime24.jsonl --eval-data math500=math500.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``metactl reproduce``."""
    p = argparse.ArgumentParser(
        prog="metactl reproduce",
        description="GRPO with fixed, scheduled and TAMPO-learned rollout temperatures; writes a "
                    "markdown + JSON + PNG report into --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", choices=("cpu", "paper"), default="cpu",
                   help="cpu: built-in tiny task and model; paper: the paper's hyperparameters "
                        "on --model and --data")
    p.add_argument("--quick", action="store_true",
                   help="cpu preset: fewer steps, seeds and evaluation problems (< 10 min)")
    p.add_argument("--out", default=None,
                   help="report directory (default runs/reproduce[-quick|-paper])")
    p.add_argument("--controllers", default=None,
                   help="comma-separated arms, default: fixed-0.9,fixed-1.2,fixed-1.5,"
                        "linear-0.9-1.5,tampo; more: tampo-softmax, hedge, metagrad, exp3, ucb1, "
                        "thompson, entropy-H, cosine-A-B, fixed-T")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per arm (0..N-1); default 5 (cpu), 2 (--quick), 1 (paper)")
    p.add_argument("--workers", type=int, default=2,
                   help="parallel worker processes (each uses --threads torch threads)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--cache-dir", default=None,
                   help="warm-up checkpoint cache (default $METACTL_CACHE or ~/.cache/metactl)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("training overrides (default: the preset's values)")
    g.add_argument("--steps", type=int)
    g.add_argument("--prompts-per-step", type=int)
    g.add_argument("--group-size", type=int)
    g.add_argument("--grad-accum", type=int, dest="grad_accum_steps")
    g.add_argument("--lr", type=float)
    g.add_argument("--kl-beta", type=float)
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--max-prompt-len", type=int)
    g.add_argument("--checkpoint-every", type=int)
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on CUDA for the paper preset, else fp32")
    e = p.add_argument_group("evaluation overrides")
    e.add_argument("--eval-n", type=int, dest="n_per_benchmark",
                   help="problems per benchmark")
    e.add_argument("--eval-k", type=int, dest="k", help="samples per problem (avg@k, Pass@k)")
    e.add_argument("--eval-temperature", type=float, dest="temperature")
    e.add_argument("--eval-top-p", type=float, dest="top_p")
    e.add_argument("--curve-points", type=int, help="evaluations during training")
    a = p.add_argument_group("paper preset")
    a.add_argument("--model", help="local model directory (save_pretrained format)")
    a.add_argument("--data", help="local training data: .json, .jsonl or .parquet")
    a.add_argument("--eval-data", action="append", default=[], metavar="NAME=FILE",
                   help="an evaluation set (repeatable); default: hold out --eval-size problems")
    a.add_argument("--eval-size", type=int, default=100)
    a.add_argument("--prompt-field", default="problem")
    a.add_argument("--answer-field", default="answer")
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
        raise SystemExit("metactl reproduce: --device cuda but torch sees no CUDA device")
    return choice


def config_from_args(args: argparse.Namespace):
    """Build the `ReproduceConfig` the arguments describe (validates paths for --preset paper)."""
    from .controllers import PAPER_ARMS
    from .presets import cpu_config, paper_config

    controllers = tuple(c.strip() for c in args.controllers.split(",") if c.strip()) \
        if args.controllers else PAPER_ARMS
    grpo = {k: getattr(args, k) for k in ("steps", "prompts_per_step", "group_size",
                                          "grad_accum_steps", "lr", "kl_beta", "max_new_tokens",
                                          "max_prompt_len", "checkpoint_every")}
    ev = {k: getattr(args, k) for k in ("n_per_benchmark", "k", "temperature", "top_p",
                                        "curve_points")}
    device = _device(args.device)
    if args.dtype != "auto":
        grpo["precision"] = args.dtype
    if args.preset == "cpu":
        grpo["device"] = device
        return cpu_config(
            quick=args.quick, out=args.out or ("runs/reproduce-quick" if args.quick
                                               else "runs/reproduce"),
            controllers=controllers,
            seeds=tuple(range(args.seeds)) if args.seeds else None,
            workers=args.workers, cache_dir=args.cache_dir, grpo=grpo, eval_overrides=ev,
        )
    from .paper import resolve_model_path

    if not args.model or not args.data:
        raise SystemExit("metactl reproduce --preset paper needs --model PATH and --data FILE")
    try:
        resolve_model_path(args.model, args.allow_download)
    except FileNotFoundError as exc:
        raise SystemExit(f"metactl reproduce: {exc}") from None
    for path in [args.data] + [spec.split("=", 1)[-1] for spec in args.eval_data]:
        if not Path(path).is_file():
            raise SystemExit(f"metactl reproduce: data file {path!r} does not exist")
    eval_data = []
    for spec in args.eval_data:
        name, _, path = spec.partition("=")
        if not path:
            name, path = Path(spec).stem, spec
        eval_data.append((name, path))
    return paper_config(
        model_path=args.model, data=args.data, out=args.out or "runs/reproduce-paper",
        device=device, controllers=controllers,
        seeds=tuple(range(args.seeds)) if args.seeds else (0,),
        grpo=grpo, eval_overrides=ev, eval_data=tuple(eval_data), eval_size=args.eval_size,
        prompt_field=args.prompt_field, answer_field=args.answer_field,
        instruction=args.instruction, allow_download=args.allow_download,
        threads_per_worker=args.threads,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``metactl reproduce``; returns the exit status."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError) as exc:
        print(f"metactl reproduce: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        raise
    if cfg.preset == "cpu" and args.threads != 1:
        import dataclasses

        cfg = dataclasses.replace(cfg, threads_per_worker=args.threads)
    from .experiment import run_experiment

    t0 = time.perf_counter()
    print(f"metactl reproduce: preset {cfg.preset}{' (quick)' if args.quick else ''}, "
          f"{len(cfg.controllers)} arms x {len(cfg.seeds)} seeds x {cfg.grpo.steps} steps, "
          f"{cfg.workers} worker(s); report -> {cfg.out}", flush=True)
    try:
        report = run_experiment(cfg, progress=not args.no_progress)
    except FileNotFoundError as exc:
        print(f"metactl reproduce: {exc}", file=sys.stderr)
        return 2
    text = report.read_text()
    start = text.find("## 2.")
    end = text.find("## 3.")
    print(text[start:end].strip() if start >= 0 else text)
    print(f"\nreport: {report} ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
