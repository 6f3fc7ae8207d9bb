"""GRPO with a learned rollout temperature (TAMPO) in Hugging Face TRL, on CPU in a few minutes.

By default the script builds everything locally (no hub access): a character-level tokenizer, a
small Qwen2 model from a config, a short supervised warm-up on 2-digit addition (so that sampled
answers are sometimes right and GRPO gets non-zero advantages), and then GRPO with
``MetaGRPOTrainer`` choosing the temperature of every rollout batch with TAMPO.

    python examples/trl_grpo.py                         # tiny local model, under a minute on CPU
    python examples/trl_grpo.py --steps 40 --sft-steps 200   # quicker smoke run
    python examples/trl_grpo.py --model /path/to/local/model --max-completion-length 8
    python examples/trl_grpo.py --fixed-temperature 1.0 # the same run at a fixed temperature

``--model PATH`` loads any local causal LM with ``from_pretrained`` (e.g. a downloaded
Qwen2.5-0.5B-Instruct); the task, the reward and the TAMPO setup stay the same.

Outputs (in ``--out``): ``meta_history.json`` (the chosen temperature and the meta-policy's
probabilities per generation batch) and the TRL checkpoints with ``metactl_state.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from metactl.adapters.trl import MetaGRPOTrainer
from metactl.adapters.trl.testing import (
    addition_dataset,
    build_char_tokenizer,
    build_tiny_model,
    greedy_accuracy,
    sft_warmup,
    tiny_grpo_config,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

import metactl

_NUMBER = re.compile(r"\s*(-?\d+)")


def first_number_reward(completions: Sequence[str], answer: Sequence[str], **_: Any) -> list[float]:
    """1.0 when the completion starts with the right number (``"46"``, ``" 46\\n..."``), else 0.

    >>> first_number_reward(["46", " 46 is it", "461", "x"], answer=["46"] * 4)
    [1.0, 1.0, 0.0, 0.0]
    """
    out = []
    for text, ans in zip(completions, answer, strict=True):
        match = _NUMBER.match(text)
        out.append(float(match is not None and match.group(1) == ans))
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", default=None, help="local model directory (default: build a tiny one)"
    )
    p.add_argument("--out", default="runs/trl_grpo", help="output directory")
    p.add_argument("--steps", type=int, default=300, help="GRPO steps (generation batches)")
    p.add_argument("--sft-steps", type=int, default=500, help="warm-up steps (tiny model only)")
    p.add_argument("--digits", type=int, default=2, help="operand digits of the addition task")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--num-generations", type=int, default=8, help="GRPO group size")
    p.add_argument("--max-completion-length", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (> 0: reference model)")
    p.add_argument("--likelihood", choices=("fast", "exact"), default="fast")
    p.add_argument("--fixed-temperature", type=float, default=None,
                   help="baseline: always this temperature (must be a candidate)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (small models: 1)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    p.add_argument("--eval-prompts", type=int, default=200)
    return p.parse_args(argv)


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """The policy and its tokenizer: a local checkpoint, or a freshly built, warmed-up tiny one."""
    if args.model is not None:
        tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True,
                                                     dtype=torch.float32)  # fmt: skip
        return model, tok
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=64, num_layers=2, seed=args.seed)
    t0 = time.perf_counter()
    steps = sft_warmup(model, tok, seconds=1e9, max_steps=args.sft_steps, digits=args.digits,
                       seed=args.seed)  # fmt: skip
    print(f"warm-up: {steps} SFT steps in {time.perf_counter() - t0:.1f}s")
    return model, tok


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    model, tok = load_model(args)

    held_out = addition_dataset(args.eval_prompts, digits=args.digits, seed=10_000 + args.seed)
    max_new = args.max_completion_length
    acc_before = greedy_accuracy(model, tok, held_out["prompt"], held_out["answer"],
                                 max_new_tokens=max_new)  # fmt: skip

    if args.fixed_temperature is None:
        policy = metactl.tampo(seed=args.seed)
    else:
        policy = metactl.MetaPolicy(metactl.PAPER_TEMPERATURES,
                                    metactl.Fixed(args.fixed_temperature))  # fmt: skip
    config = tiny_grpo_config(
        out,
        use_cpu=not torch.cuda.is_available(),
        bf16=args.bf16,
        max_steps=args.steps,
        per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        num_generations=args.num_generations,
        max_completion_length=max_new,
        learning_rate=args.lr,
        beta=args.beta,
        temperature=1.0,  # the evaluation temperature; training temperatures come from the policy
        logging_steps=10,
        save_strategy="steps",
        save_steps=max(1, args.steps // 2),
        save_total_limit=1,
        seed=args.seed,
    )
    trainer = MetaGRPOTrainer(
        model=model,
        reward_funcs=first_number_reward,
        args=config,
        train_dataset=addition_dataset(50_000, digits=args.digits, seed=args.seed),
        processing_class=tok,
        meta_policy=policy,
        likelihood=args.likelihood,
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    acc_after = greedy_accuracy(trainer.model, tok, held_out["prompt"], held_out["answer"],
                                max_new_tokens=max_new)  # fmt: skip

    history = trainer.meta_history
    print(f"\nGRPO: {len(history)} generation batches in {seconds:.1f}s "
          f"(meta-policy work {trainer.meta_seconds:.2f}s)")  # fmt: skip
    print("batches      mean T   mean reward")
    chunk = max(1, len(history) // 5)
    for i in range(0, len(history), chunk):
        part = history[i : i + chunk]
        mean_t = statistics.fmean(h["value"] for h in part)
        mean_r = statistics.fmean(h["reward"] for h in part)
        print(f"{i + 1:4d}-{i + len(part):<4d}    {mean_t:.3f}    {mean_r:.3f}")
    probs = ", ".join(f"{t:g}: {p:.2f}" for t, p in zip(policy.candidates, policy.probs,
                                                         strict=True))  # fmt: skip
    print(f"final meta-policy: {probs}")
    print(
        f"greedy accuracy on {len(held_out)} held-out prompts: {acc_before:.3f} -> {acc_after:.3f}"
    )

    out.mkdir(parents=True, exist_ok=True)
    (out / "meta_history.json").write_text(json.dumps(history, indent=1))
    print(f"wrote {out / 'meta_history.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
