"""Miniature ``metactl reproduce`` comparisons for the tests (about a second per arm).

Import after ``pytest.importorskip("torch")`` and ``pytest.importorskip("transformers")``.
"""

from __future__ import annotations

from typing import Any

from metactl.adapters.lab.reproduce.experiment import EvalConfig, ReproduceConfig
from metactl.adapters.reference.sft import WarmupConfig
from metactl.adapters.reference.tasks import ChainTask
from metactl.adapters.reference.trainer import GRPOConfig

from tests.adapters.reference.helpers import MINI, TASK

#: a small evaluation; the start model's warm-up is far from the real 10-60% range, so it
#: declares a range of its own
EVAL = EvalConfig(n_per_benchmark=8, k=2, curve_n=4, curve_k=2, curve_points=2,
                  train_check_n=50, start_greedy_range=(0.0, 1.0))
WARMUP = WarmupConfig(steps=20, batch_size=32)


def miniature_config(out: str, controllers: tuple[str, ...], seeds: tuple[int, ...] = (0,), *,
                     steps: int = 4, prompts_per_step: int = 4, checkpoint_every: int = 0,
                     task: ChainTask = TASK, eval: EvalConfig = EVAL,
                     warmup: WarmupConfig = WARMUP, **options: Any) -> ReproduceConfig:
    """A comparison of `MINI` on ``task`` (groups of 4); ``options`` (``workers``,
    ``cache_dir``, ...) go to `ReproduceConfig` as they are."""
    return ReproduceConfig(
        preset="cpu", out=out, controllers=controllers, seeds=seeds,
        grpo=GRPOConfig(steps=steps, prompts_per_step=prompts_per_step, group_size=4, lr=1e-3,
                        max_new_tokens=task.max_completion_tokens,
                        checkpoint_every=checkpoint_every),
        eval=eval, task=task, model=MINI, warmup=warmup, **options,
    )
