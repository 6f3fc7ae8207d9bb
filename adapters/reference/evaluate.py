"""Benchmark evaluation: Pass@1 as avg@k at an evaluation temperature, greedy Pass@1, Pass@k.

Example:
    >>> pass_at_k(n=8, c=2, k=1), pass_at_k(n=8, c=0, k=8), pass_at_k(n=8, c=1, k=8)
    (0.25, 0.0, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .rollout import sample


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct (Chen et al., 2021)."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@torch.no_grad()
def generate_texts(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], *, temperature: float,
    max_new_tokens: int, generator: torch.Generator, top_p: float = 1.0,
    batch_size: int = 1024, add_special_tokens: bool = False, max_prompt_len: int = 0,
) -> list[str]:
    """Decode one completion per prompt (``temperature=0`` is greedy), in batches."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    out: list[str] = []
    kw: dict[str, Any] = {}
    if max_prompt_len:
        kw = {"truncation": True, "max_length": max_prompt_len}
    for s in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[s:s + batch_size]), return_tensors="pt", padding=True,
                        add_special_tokens=add_special_tokens, **kw)
        comp = sample(model, enc.input_ids.to(device), enc.attention_mask.to(device),
                      temperature=temperature, max_new_tokens=max_new_tokens,
                      eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, top_p=top_p,
                      generator=generator)
        out.extend(tokenizer.batch_decode(comp.tokens, skip_special_tokens=True))
    return out


def evaluate_benchmarks(
    model: torch.nn.Module,
    tokenizer: Any,
    benchmarks: Mapping[str, Sequence[Any]],
    reward_fn: Callable[[str, str], float],
    *,
    k: int = 8,
    temperature: float = 0.6,
    top_p: float = 1.0,
    max_new_tokens: int = 14,
    seed: int = 0,
    greedy: bool = True,
    batch_size: int = 1024,
    add_special_tokens: bool = False,
    max_prompt_len: int = 0,
) -> dict[str, dict[str, float]]:
    """Per benchmark: ``pass1`` (avg@k at ``temperature``), ``pass_at_k`` (unbiased, n = k),
    ``greedy`` (Pass@1 of greedy decoding). Adds an ``"avg"`` entry: the mean over benchmarks.

    Items need ``.prompt`` and ``.answer``. Sampling uses its own generator seeded by ``seed``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    common: dict[str, Any] = dict(max_new_tokens=max_new_tokens, generator=gen, top_p=top_p,
                  batch_size=batch_size, add_special_tokens=add_special_tokens,
                  max_prompt_len=max_prompt_len)
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, float]] = {}
    for name, items in benchmarks.items():
        prompts = [it.prompt for it in items]
        answers = [it.answer for it in items]
        texts = generate_texts(model, tokenizer, [p for p in prompts for _ in range(k)],
                               temperature=temperature, **common)
        repeated = [a for a in answers for _ in range(k)]
        correct = np.array([reward_fn(t, a) > 0.5 for t, a in zip(texts, repeated, strict=True)])
        correct = correct.reshape(-1, k)
        row = {
            "pass1": float(correct.mean()),
            "pass_at_k": float(np.mean([pass_at_k(k, int(c), k) for c in correct.sum(1)])),
        }
        if greedy:
            g = generate_texts(model, tokenizer, prompts, temperature=0.0, **common)
            hits = [reward_fn(t, a) > 0.5 for t, a in zip(g, answers, strict=True)]
            row["greedy"] = float(np.mean(hits))
        results[name] = row
    keys = list(next(iter(results.values())).keys())
    results["avg"] = {m: float(np.mean([results[b][m] for b in benchmarks])) for m in keys}
    model.train(was_training)
    return results
