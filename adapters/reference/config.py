"""`GRPOConfig`: every hyperparameter of a reference GRPO run, validated on construction
(`trainer.GRPOTrainer` runs it; re-exported there)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from metactl.effective_temperature import CHECK_MODES
from metactl.knobs import Setting, check_knob

__all__ = ["GRPOConfig"]


@dataclass(frozen=True)
class GRPOConfig:
    """Every hyperparameter of a GRPO run (validated on construction).

    Example:
        >>> GRPOConfig(steps=10).rollouts_per_step
        128
        >>> GRPOConfig(group_size=1)
        Traceback (most recent call last):
        ...
        ValueError: group_size must be >= 2 (GRPO needs a group), got 1
    """

    # -- schedule
    steps: int = 300
    prompts_per_step: int = 16
    group_size: int = 8
    grad_accum_steps: int = 1
    ppo_epochs: int = 1
    # -- optimisation
    lr: float = 1e-4
    lr_floor_ratio: float = 0.1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.99)
    max_grad_norm: float = 1.0
    # -- loss (skip_zero_advantage: leave rows with advantage 0 out of the forward/backward pass;
    #    the same gradients when kl_beta == 0, less compute; False scores every row)
    clip_eps: float = 0.2
    kl_beta: float = 0.0
    skip_zero_advantage: bool = True
    loss_agg: str = "sequence"
    scale_rewards: bool = True
    adv_eps: float = 1e-4
    # -- rollouts
    max_new_tokens: int = 14
    max_prompt_len: int = 0
    # the sampler's fixed setting (a `metactl.knobs.Setting`): a policy's decision overrides the
    # knobs it sets; top_k 0, top_p 1 and min_p 0 are off, temperature 1 the untempered model
    rollout_temperature: float = 1.0
    rollout_top_p: float = 1.0
    rollout_top_k: int = 0
    rollout_min_p: float = 0.0
    rollout_chunk: int = 0
    add_special_tokens: bool = False
    # -- the effective-temperature check after every rollout (`temperature_check`): "error"
    #    raises, "warn" warns, "off" neither estimates nor logs; it reads the sampling loop's
    #    logits of at most temperature_check_rows rows (spread evenly over the batch) at at most
    #    temperature_check_positions decoding steps (evenly strided); 0: no limit
    temperature_check: str = "error"
    temperature_check_rows: int = 32
    temperature_check_positions: int = 64
    # -- runtime
    device: str = "cpu"
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 50
    eval_every: int = 50
    diagnostic_steps: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        positive = ("steps", "prompts_per_step", "grad_accum_steps", "ppo_epochs",
                    "max_new_tokens")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (GRPO needs a group), got {self.group_size}")
        if self.rollouts_per_step % self.grad_accum_steps:
            raise ValueError(
                f"grad_accum_steps={self.grad_accum_steps} must divide the "
                f"{self.rollouts_per_step} rollouts of a step"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (0.0 <= self.lr_floor_ratio <= 1.0):
            raise ValueError(f"lr_floor_ratio must be in [0, 1], got {self.lr_floor_ratio}")
        if not (0.0 <= self.warmup_ratio < 1.0):
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.clip_eps <= 0 or self.kl_beta < 0 or self.max_grad_norm <= 0 or self.adv_eps < 0:
            raise ValueError("need clip_eps > 0, kl_beta >= 0, max_grad_norm > 0, adv_eps >= 0")
        if self.loss_agg not in ("sequence", "token"):
            raise ValueError(f"loss_agg must be 'sequence' or 'token', got {self.loss_agg!r}")
        # the sampler's fixed setting, each knob checked as every sampler setting is
        check_knob("temperature", self.rollout_temperature, "rollout_temperature")
        check_knob("top_p", self.rollout_top_p, "rollout_top_p")
        if isinstance(self.rollout_top_k, bool) or self.rollout_top_k != 0:  # 0 is off
            check_knob("top_k", self.rollout_top_k, "rollout_top_k (0 is off)")
        check_knob("min_p", self.rollout_min_p, "rollout_min_p")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        for name in ("max_prompt_len", "rollout_chunk", "checkpoint_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 disables), got {getattr(self, name)}")
        if self.temperature_check not in CHECK_MODES:
            raise ValueError(f"temperature_check must be one of {list(CHECK_MODES)}, got "
                             f"{self.temperature_check!r}")
        for name in ("temperature_check_rows", "temperature_check_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (0: no limit), got {value!r}")

    @property
    def rollouts_per_step(self) -> int:
        """Completions per step: ``prompts_per_step * group_size``."""
        return self.prompts_per_step * self.group_size

    @property
    def optimizer_steps(self) -> int:
        """Total optimizer steps (one per PPO epoch per GRPO step)."""
        return self.steps * self.ppo_epochs

    def to_dict(self) -> dict:
        """JSON-safe dict of every field."""
        return dataclasses.asdict(self)

    @property
    def sampler_setting(self) -> Setting:
        """The fixed sampler setting (``rollout_temperature``, ``rollout_top_p``,
        ``rollout_top_k``, ``rollout_min_p``) that a policy's decision overrides."""
        return Setting(self.rollout_temperature, top_p=self.rollout_top_p,
                       top_k=self.rollout_top_k or None, min_p=self.rollout_min_p)
