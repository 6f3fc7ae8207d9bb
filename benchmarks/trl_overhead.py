"""Step-time overhead of ``MetaGRPOTrainer`` + TAMPO over plain TRL ``GRPOTrainer``.

Four arms on the same locally built model (same seed, same initial weights, same data):

* ``plain``: ``trl.GRPOTrainer`` at a fixed temperature (1.0),
* ``fused``: ``MetaGRPOTrainer`` with TAMPO, ``likelihood="fused"`` (candidates folded into the
  logit tiles of TRL's own fused log-prob head during its old-logprob pass: no extra matmul;
  without an old-logprob pass it scores like ``fast``),
* ``fast``:  ``MetaGRPOTrainer`` with TAMPO, ``likelihood="fast"`` (no extra transformer forward:
  captured hidden states times the LM head),
* ``exact``: ``MetaGRPOTrainer`` with TAMPO, ``likelihood="exact"`` (one extra scoring forward).

Sizes: ``tiny``/``small``/``medium`` use the character tokenizer (21 tokens) and TRL's on-policy
default (no old-logprob pass); ``bpe32k`` is shaped like a real model's head: a byte-level BPE
tokenizer of 32,000 tokens trained locally, hidden size 256, and ``steps_per_generation=2`` (so
TRL makes an old-logprob pass, as with buffered or vLLM runs, and ``fused`` has one to use).

Generation stops only at the padding token (``eos_token_id`` in ``generation_kwargs``, a token
the model all but never samples), so every arm generates full-length completions whatever
temperature it samples at; unlike ``min_new_tokens``, this leaves the sampling distribution (and so
the candidate likelihoods) as they are. Arms run interleaved, ``--repeats`` times each
(rotating their order); each run times ``--steps`` optimizer steps after ``--warmup`` untimed
ones. The table shows the median of all timed step times of an arm (pooled over repeats), the
overhead relative to ``plain`` from those medians, and the meta-policy's own work per step as
measured inside the trainer (selection, scoring, gathering, update, and for ``fused`` the fold
that runs inside TRL's pass; median over runs), which is much less noisy than a difference of two
noisy step times: ``meta %`` is that work relative to the plain step.

    python benchmarks/trl_overhead.py        # two model sizes, ~2-4 minutes on 2 CPU cores
    python benchmarks/trl_overhead.py --sizes small --repeats 5 --steps 20
    python benchmarks/trl_overhead.py --sizes bpe32k --repeats 2 --steps 4   # ~10 minutes

Timings on a shared machine are noisy: compare arms within one run of this script only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from metactl.adapters.trl import MetaGRPOTrainer
from metactl.adapters.trl.testing import (
    TinyModelSpec,
    addition_dataset,
    digit_count_reward,
    tiny_grpo_config,
    tiny_model_dir,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOTrainer

import metactl

ARMS = ("plain", "fused", "fast", "exact")


@dataclass(frozen=True)
class Size:
    """One benchmark configuration."""

    name: str
    hidden_size: int
    num_layers: int
    completion_tokens: int
    prompts: int = 8
    generations: int = 8
    vocab_size: int = 0  # BPE vocabulary (0: the character tokenizer)
    steps_per_generation: int = 1  # > 1: TRL makes an old-logprob pass over every batch
    num_heads: int = 4


SIZES = {
    "tiny": Size("tiny", hidden_size=64, num_layers=2, completion_tokens=4),
    "small": Size("small", hidden_size=256, num_layers=4, completion_tokens=16),
    "medium": Size("medium", hidden_size=512, num_layers=6, completion_tokens=24),
    "bpe32k": Size(
        "bpe32k",
        hidden_size=256,
        num_layers=4,
        completion_tokens=16,
        vocab_size=32_000,
        steps_per_generation=2,
    ),
}


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (generation + scoring + meta work + backward)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


def run_arm(arm: str, size: Size, model_dir: Path, steps: int, warmup: int, seed: int,
            out_dir: Path) -> tuple[list[float], float]:  # fmt: skip
    """One training run; returns (timed step seconds, meta-policy seconds per step)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    n = size.completion_tokens
    config = tiny_grpo_config(
        out_dir / arm,
        max_steps=warmup + steps,
        per_device_train_batch_size=size.prompts * size.generations,
        num_generations=size.generations,
        max_completion_length=n,
        generation_kwargs={"eos_token_id": tok.pad_token_id},  # equal work in every arm
        steps_per_generation=size.steps_per_generation,
        learning_rate=1e-4,
        logging_steps=10_000,
        seed=seed,
    )
    timer = StepTimer()
    kwargs: dict[str, Any] = {
        "model": model,
        "reward_funcs": digit_count_reward,
        "args": config,
        "train_dataset": addition_dataset(4096, seed=seed),
        "processing_class": tok,
        "callbacks": [timer],
    }
    if arm == "plain":
        trainer: GRPOTrainer = GRPOTrainer(**kwargs)
    else:
        trainer = MetaGRPOTrainer(**kwargs, meta_policy=metactl.tampo(seed=seed), likelihood=arm)
    trainer.train()
    times = timer.times[warmup:]
    meta = getattr(trainer, "meta_seconds", 0.0) / max(1, len(timer.times))
    return times, meta


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "small"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--repeats and --steps must be >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="metactl_bench_") as tmp:
        for name in args.sizes:
            size = SIZES[name]
            bpe = {"tokenizer": "bpe", "bpe_vocab_size": size.vocab_size} if size.vocab_size else {}
            spec = TinyModelSpec(hidden_size=size.hidden_size, num_layers=size.num_layers,
                                 num_heads=size.num_heads, max_positions=64, seed=args.seed,
                                 **bpe)  # fmt: skip
            model_dir = tiny_model_dir(spec)
            loaded = AutoModelForCausalLM.from_pretrained(model_dir)
            params = sum(p.numel() for p in loaded.parameters())
            vocab = int(loaded.config.vocab_size)
            pooled: dict[str, list[float]] = {arm: [] for arm in ARMS}
            metas: dict[str, list[float]] = {arm: [] for arm in ARMS}
            for rep in range(args.repeats):
                order = ARMS[rep % len(ARMS) :] + ARMS[: rep % len(ARMS)]
                for arm in order:
                    times, meta_step = run_arm(arm, size, model_dir, args.steps, args.warmup,
                                              args.seed, Path(tmp) / f"{name}-{rep}")  # fmt: skip
                    pooled[arm].extend(times)
                    metas[arm].append(meta_step)
                    median = statistics.median(times) * 1e3
                    print(f"  {name} repeat {rep} {arm:5s}: {median:8.1f} ms/step", flush=True)
            rows.append((size, vocab, params, {a: statistics.median(v) for a, v in pooled.items()},
                         {a: statistics.median(v) for a, v in metas.items()}))  # fmt: skip

    print()
    print(f"threads={args.threads}, repeats={args.repeats}, timed steps/run={args.steps}, "
          f"torch {torch.__version__}")  # fmt: skip
    head = f"{'model':<7} {'vocab':>6} {'params':>8} {'batch':>8} | {'plain ms':>9}"
    for arm in ARMS[1:]:
        head += f" | {arm + ' ms':>8} {'overhead':>8} {'meta ms':>8} {'meta %':>7}"
    print(head)
    print("-" * len(head))
    for size, vocab, params, med, meta in rows:
        base = med["plain"]
        batch = f"{size.prompts * size.generations}x{size.completion_tokens}"
        line = f"{size.name:<7} {vocab:>6} {params / 1e6:7.2f}M {batch:>8} | {base * 1e3:9.1f}"
        for arm in ARMS[1:]:
            line += (
                f" | {med[arm] * 1e3:8.1f} {100 * (med[arm] / base - 1):+7.1f}% "
                f"{meta[arm] * 1e3:8.2f} {100 * meta[arm] / base:6.2f}%"
            )
        print(line)
    print("overhead: median step time vs plain GRPOTrainer at T=1.0; meta ms: meta-policy work per "
          "step measured inside MetaGRPOTrainer")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
