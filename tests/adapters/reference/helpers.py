"""Miniature reference trainers for the tests: one-layer models on the shortest chain task.

Import after ``pytest.importorskip("torch")`` and ``pytest.importorskip("transformers")``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from metactl.adapters.char_tokenizer import build_char_tokenizer
from metactl.adapters.reference.model import TinyModelConfig, build_model
from metactl.adapters.reference.tasks import ALPHABET, ChainTask, chain_reward
from metactl.adapters.reference.trainer import GRPOConfig, GRPOTrainer

import metactl

#: sums of one or two numbers, graded on chains of length 1 and 2
TASK = ChainTask(ops=("+",), min_len=1, max_len=2, benchmark_lengths=(1, 2))
#: the model of the miniature comparisons, warm-ups and checkpoints
MINI = TinyModelConfig(hidden_size=32, num_layers=1, intermediate_size=64, max_positions=32)
#: the trainer tests' model, with grouped-query attention
TINY = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                       intermediate_size=64, max_positions=32)


#: the timings a run's history records (they differ between two runs of the same steps)
TIMES = ("seconds", "rollout_seconds", "meta_seconds", "check_seconds")


def fixed(t: float) -> metactl.MetaPolicy:
    """The paper's temperature grid, always at ``t``."""
    return metactl.MetaPolicy(metactl.PAPER_TEMPERATURES, metactl.Fixed(t))


def contains_seven(completion: str, answer: str) -> float:
    """A reward a random model earns sometimes, so advantages are not all zero."""
    return float("7" in completion)


def make_trainer(policy: metactl.MetaPolicy | None = None,
                 prompts: Callable[..., Any] | None = None, run_dir: Path | None = None,
                 **overrides: Any) -> GRPOTrainer:
    """A 3-step trainer of `TINY` (seeded) rewarded by `contains_seven`, at ``fixed(1.0)``
    unless a policy is given; ``overrides`` change its `GRPOConfig`, and a reference model is
    built when they set ``kl_beta > 0``."""
    torch.manual_seed(0)
    tok = build_char_tokenizer(ALPHABET)
    model = build_model(TINY, tok, seed=0)
    cfg = GRPOConfig(**{**dict(steps=3, prompts_per_step=4, group_size=4, lr=1e-3,
                               max_new_tokens=6, checkpoint_every=0, eval_every=0, seed=0),
                        **overrides})
    ref = build_model(TINY, tok, seed=0) if cfg.kl_beta > 0 else None
    return GRPOTrainer(model, tok, cfg, policy if policy is not None else fixed(1.0),
                       prompts=prompts if prompts is not None else
                       (lambda rng, n: TASK.sample(rng, n)),
                       reward_fn=contains_seven, ref_model=ref, run_dir=run_dir)


def checkpointing_trainer(run_dir: Path, steps: int = 4, group_size: int = 4,
                          evaluator: Callable[..., Any] | None = None) -> GRPOTrainer:
    """A TAMPO trainer of `MINI` on the chain task's own reward that writes a checkpoint into
    ``run_dir`` every 2 steps (and evaluates every 2 with ``evaluator``)."""
    tok = build_char_tokenizer(ALPHABET)
    model = build_model(MINI, tok, seed=0)
    cfg = GRPOConfig(steps=steps, prompts_per_step=2, group_size=group_size, lr=1e-3,
                     max_new_tokens=TASK.max_completion_tokens, checkpoint_every=2,
                     eval_every=2 if evaluator is not None else 0)
    return GRPOTrainer(model, tok, cfg, metactl.tampo(seed=0),
                       prompts=lambda rng, n: TASK.sample(rng, n), reward_fn=chain_reward,
                       run_dir=run_dir, evaluator=evaluator)


class Interrupted(Exception):
    """What `train_until` stops a run with."""


def train_until(trainer: GRPOTrainer, step: int) -> None:
    """Trains until the record of ``step`` (counted from 0) is logged, then stops the run by an
    exception out of its callback, as an interruption would; the checkpoints written so far
    stay."""

    def stop(record: dict[str, Any]) -> None:
        if record["step"] == step:
            raise Interrupted

    with pytest.raises(Interrupted):
        trainer.train(callback=stop, progress_bar=False)


def timeless(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A run's history without its `TIMES`."""
    return [{k: v for k, v in h.items() if k not in TIMES} for h in history]
