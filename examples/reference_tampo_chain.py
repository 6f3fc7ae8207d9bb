"""One TAMPO-controlled GRPO run with the reference trainer, written out step by step.

Uses the CPU preset's pieces: the biased modular-chain task, the cached warm-up checkpoint (built
on first use, about 1-2 minutes on a laptop core), and `GRPOTrainer` with `metactl.tampo()`.
Prints the temperature TAMPO picks and the accuracy before and after.

    python examples/reference_tampo_chain.py --steps 100
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from metactl.adapters.reference.evaluate import evaluate_benchmarks
from metactl.adapters.reference.model import TinyModelConfig
from metactl.adapters.reference.sft import WarmupConfig, warmup
from metactl.adapters.reference.tasks import ChainTask, chain_reward, heldout_prompts
from metactl.adapters.reference.trainer import GRPOConfig, GRPOTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer

import metactl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)  # tiny models run fastest on one thread

    task = ChainTask()
    start = warmup(task, TinyModelConfig(), WarmupConfig(), cache_dir=args.cache_dir)
    model = AutoModelForCausalLM.from_pretrained(start)
    tok = AutoTokenizer.from_pretrained(start)
    bench = task.benchmarks(100)
    exclude = heldout_prompts(task)

    def accuracy() -> float:
        r = evaluate_benchmarks(model, tok, bench, chain_reward, k=4,
                                max_new_tokens=task.max_completion_tokens)
        return r["avg"]["greedy"]

    print(f"greedy accuracy before RL: {accuracy():.3f}")
    cfg = GRPOConfig(steps=args.steps, prompts_per_step=16, group_size=8, lr=1e-4,
                     max_new_tokens=task.max_completion_tokens, seed=args.seed,
                     checkpoint_every=0, eval_every=0)
    trainer = GRPOTrainer(model, tok, cfg, metactl.tampo(seed=args.seed),
                          prompts=lambda rng, n: task.sample(rng, n, exclude=exclude),
                          reward_fn=chain_reward)
    history = trainer.train()
    temps = np.array([h["temperature"] for h in history])
    quarters = np.array_split(temps, 4)
    print("TAMPO temperature, mean per quarter:", [round(float(q.mean()), 2) for q in quarters])
    print("final meta-policy:", dict(zip(trainer.policy.candidates.round(1).tolist(),
                                         np.round(trainer.policy.probs, 2).tolist(),
                                         strict=True)))
    print(f"greedy accuracy after {args.steps} steps: {accuracy():.3f}")


if __name__ == "__main__":
    main()
