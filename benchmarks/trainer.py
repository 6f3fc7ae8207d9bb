"""Throughput of the reference GRPO trainer vs TRL's GRPOTrainer, and the cost of the TAMPO meta
step, measured side by side in one process.

Both trainers train the same tiny model (the CPU preset's warm-up checkpoint, built and cached on
first use) on the same task, with the same batch (prompts x group size), completion length,
learning rate and temperature; TRL runs its default loss ("dapo"), ours "sequence" (the cost is
the same). Ours by default leaves rows with advantage 0 out of the forward/backward pass (exactly
the same gradient without a KL term; TRL computes them); the table also shows ours with
``skip_zero_advantage=False``, which scores every row like TRL. Timed steps exclude the first
``--warmup-steps`` of each run; runs alternate (TRL, ours-fixed, ours-TAMPO, TRL, ...) so machine
load hits them alike. Reported: medians over
``--repeats`` runs of the per-step median time.

The TAMPO overhead is reported two ways: (a) the meta step's own time (select + candidate
likelihoods from the logits the trainer already has + update) as a share of the step time, which
is exact, and (b) the end-to-end step time of TAMPO vs a fixed temperature, which also moves with
the temperature TAMPO picks (hotter samples finish later), so it is only a sanity check.

Usage:
    python benchmarks/trainer.py                      # defaults: 3 repeats x 12 timed steps
    python benchmarks/trainer.py --repeats 5 --steps 20 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _chain_setup(cache_dir: str | None):
    from metactl.adapters.reference.model import TinyModelConfig
    from metactl.adapters.reference.sft import WarmupConfig, warmup
    from metactl.adapters.reference.tasks import ChainTask, heldout_prompts

    task = ChainTask()
    path = warmup(task, TinyModelConfig(), WarmupConfig(), cache_dir=cache_dir, progress=True)
    return task, path, heldout_prompts(task)


def time_reference(path: Path, task, exclude, policy_name: str, args,
                   skip: bool = True) -> tuple[float, float]:
    """Median step seconds and median meta-step seconds of our trainer over one run."""
    from metactl.adapters.lab.controllers import make_policy
    from metactl.adapters.reference.tasks import chain_reward
    from metactl.adapters.reference.trainer import GRPOConfig, GRPOTrainer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    n = args.warmup_steps + args.steps
    cfg = GRPOConfig(steps=n, prompts_per_step=args.prompts, group_size=args.group_size,
                     lr=1e-4, max_new_tokens=task.max_completion_tokens, checkpoint_every=0,
                     eval_every=0, seed=0, skip_zero_advantage=skip)
    trainer = GRPOTrainer(model, tok, cfg, make_policy(policy_name, n, 0),
                          prompts=lambda rng, k: task.sample(rng, k, exclude=exclude),
                          reward_fn=chain_reward)
    hist = trainer.train(progress_bar=False)[args.warmup_steps:]
    return (statistics.median(h["seconds"] for h in hist),
            statistics.median(h["meta_seconds"] for h in hist))


def time_trl(path: Path, task, exclude, args) -> float:
    """Median step seconds of TRL's GRPOTrainer over one run (same model, task and batch)."""
    import numpy as np
    from datasets import Dataset
    from metactl.adapters.reference.tasks import chain_reward
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    n = args.warmup_steps + args.steps
    problems = task.sample(np.random.default_rng(0), n * args.prompts, exclude=exclude)
    data = Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in problems])

    def reward(prompts, completions, answer, **kw):
        return [chain_reward(c, a) for c, a in zip(completions, answer, strict=True)]

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(
            output_dir=out, use_cpu=True, bf16=False, report_to="none", max_steps=n,
            per_device_train_batch_size=args.prompts * args.group_size,
            num_generations=args.group_size, max_completion_length=task.max_completion_tokens,
            temperature=1.0, learning_rate=1e-4, beta=0.0, logging_steps=10_000,
            save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data,
                              processing_class=tok, callbacks=[Clock()])
        trainer.train()
    return statistics.median(times[args.warmup_steps:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=12, help="timed steps per run")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--no-trl", action="store_true", help="only the TAMPO overhead")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    task, path, exclude = _chain_setup(args.cache_dir)
    trl_t: list[float] = []
    ours: dict[str, list[float]] = {k: [] for k in ("fixed", "tampo", "fixed+all",
                                                    "tampo+all")}
    meta: dict[str, list[float]] = {"tampo": [], "tampo+all": []}
    for r in range(args.repeats):
        if not args.no_trl:
            trl_t.append(time_trl(path, task, exclude, args))
        for key in ours:
            name = "tampo" if key.startswith("tampo") else "fixed-1.0"
            t, m = time_reference(path, task, exclude, name, args,
                                  skip=not key.endswith("all"))
            ours[key].append(t)
            if key in meta:
                meta[key].append(m / t)
        print(f"repeat {r + 1}/{args.repeats}: "
              + (f"TRL {trl_t[-1] * 1e3:.0f} ms, " if trl_t else "")
              + ", ".join(f"ours {k} {v[-1] * 1e3:.0f} ms" for k, v in ours.items()),
              flush=True)

    med = statistics.median
    batch = args.prompts * args.group_size
    print(f"\nsame model ({path.name}), {batch} completions/step (prompts {args.prompts} x G "
          f"{args.group_size}), <= {task.max_completion_tokens} completion tokens, "
          f"{args.threads} thread(s), medians of {args.repeats} runs x {args.steps} steps\n")
    base = med(trl_t) if trl_t else med(ours["fixed"])
    print("| trainer | s/step | steps/s | throughput vs " + ("TRL |" if trl_t else "ours |"))
    print("|---|---|---|---|")
    if trl_t:
        print(f"| TRL GRPOTrainer, T = 1.0 | {med(trl_t):.3f} | {1 / med(trl_t):.2f} | 1.00x |")
    labels = {"fixed": "metactl reference, T = 1.0 (default: A = 0 rows skipped)",
              "tampo": "metactl reference, TAMPO (default: A = 0 rows skipped)",
              "fixed+all": "metactl reference, T = 1.0, skip_zero_advantage=False",
              "tampo+all": "metactl reference, TAMPO, skip_zero_advantage=False"}
    for key, label in labels.items():
        v = med(ours[key])
        print(f"| {label} | {v:.3f} | {1 / v:.2f} | {base / v:.2f}x |")
    print("\n| TAMPO overhead | value |")
    print("|---|---|")
    print("| meta step (select + candidate likelihoods + update) / step time | "
          f"{100 * med(meta['tampo']):.2f}% |")
    print(f"| end-to-end TAMPO vs fixed step time (confounded by T) | "
          f"{100 * (med(ours['tampo']) / med(ours['fixed']) - 1):+.1f}% |")
    print("| skip_zero_advantage=False: meta step / step time | "
          f"{100 * med(meta['tampo+all']):.2f}% |")
    print(f"| skip_zero_advantage=False: end-to-end TAMPO vs fixed | "
          f"{100 * (med(ours['tampo+all']) / med(ours['fixed+all']) - 1):+.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
