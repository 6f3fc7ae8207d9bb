"""Supervised warm-up of the tiny model on the biased teacher's demonstrations, cached on disk.

The checkpoint is keyed by a hash of everything that determines it (task, model, warm-up config,
library versions), so every arm and seed of a comparison starts from the same weights and a
second run finds it in the cache.

Example:
    >>> from metactl.adapters.reference.tasks import ChainTask
    >>> cfg = WarmupConfig(steps=2, batch_size=8)
    >>> path = warmup(ChainTask(max_len=2, benchmark_lengths=(1, 2)), TinyModelConfig(
    ...     hidden_size=32, num_layers=1), cfg, cache_dir="/tmp/metactl-doctest")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .model import TinyModelConfig, build_model, n_parameters
from .tasks import ALPHABET, ChainTask, heldout_prompts
from .tokenizer import build_char_tokenizer

WARMUP_FORMAT = 3  # bump when the warm-up code changes what it produces


@dataclass(frozen=True)
class WarmupConfig:
    """Hyperparameters of the supervised warm-up (AdamW, linear warm-up then cosine decay).

    Training stops early once the mean loss of the last ``stop_window`` steps is below
    ``stop_loss`` (the loss floor of the biased teacher is about 0.03 nats/token, the entropy of
    its trap choices), so ``steps`` is an upper bound; ``stop_loss=0`` disables early stopping.

    Example:
        >>> WarmupConfig(steps=100).lr
        0.003
    """

    steps: int = 2000
    batch_size: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.0
    seed: int = 0
    stop_loss: float = 0.05
    stop_window: int = 50

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if not (self.lr > 0) or not (0 <= self.min_lr_ratio <= 1):
            raise ValueError("lr must be > 0 and min_lr_ratio in [0, 1]")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        if self.stop_loss < 0 or self.stop_window < 1:
            raise ValueError("stop_loss must be >= 0 and stop_window >= 1")


def cache_key(task: ChainTask, model_cfg: TinyModelConfig, cfg: WarmupConfig) -> str:
    """Stable hash of everything that determines the warm-up checkpoint."""
    import transformers

    blob = json.dumps(
        {"task": task.to_dict(), "model": model_cfg.to_dict(), "warmup": dataclasses.asdict(cfg),
         "alphabet": ALPHABET, "format": WARMUP_FORMAT, "torch": torch.__version__.split("+")[0],
         "transformers": transformers.__version__},
        sort_keys=True, default=list,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$METACTL_CACHE`` or ``~/.cache/metactl``."""
    return Path(os.environ.get("METACTL_CACHE", Path.home() / ".cache" / "metactl"))


def encode_demos(tokenizer, prompts: list[str], completions: list[str]) -> tuple[torch.Tensor, ...]:
    """Token ids, attention mask and loss mask for ``prompt + completion + <eos>`` (right pad)."""
    p_ids = tokenizer(prompts, add_special_tokens=False).input_ids
    c_ids = tokenizer(completions, add_special_tokens=False).input_ids
    rows = [p + c + [tokenizer.eos_token_id] for p, c in zip(p_ids, c_ids, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(p_ids, rows, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
        loss_mask[i, len(p): len(r)] = True
    return ids, attn, loss_mask


def train_warmup(
    task: ChainTask, model_cfg: TinyModelConfig, cfg: WarmupConfig,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[Any, Any, dict]:
    """Train a fresh tiny model on biased demonstrations. Returns (model, tokenizer, stats)."""
    tokenizer = build_char_tokenizer(ALPHABET)
    model = build_model(model_cfg, tokenizer, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    exclude = heldout_prompts(task)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(
            math.pi * frac)))

    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(cfg.steps):
        problems = task.sample(rng, cfg.batch_size, exclude=exclude)
        demos = [task.demonstration(p, rng) for p in problems]
        ids, attn, loss_mask = encode_demos(tokenizer, [p.prompt for p in problems], demos)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        target, m = ids[:, 1:], loss_mask[:, 1:]
        loss = F.cross_entropy(logits[m], target[m])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, losses[-1])
        if cfg.stop_loss and len(losses) >= cfg.stop_window and (
                np.mean(losses[-cfg.stop_window:]) < cfg.stop_loss):
            break
    model.eval()
    stats = {"steps": len(losses), "final_loss": float(np.mean(losses[-cfg.stop_window:])),
             "seconds": time.perf_counter() - t0, "n_parameters": n_parameters(model)}
    return model, tokenizer, stats


def warmup(
    task: ChainTask, model_cfg: TinyModelConfig, cfg: WarmupConfig,
    cache_dir: str | os.PathLike | None = None, progress: bool = True,
    extra_stats: Callable[[Any, Any], dict] | None = None,
) -> Path:
    """Return the directory of the cached warm-up checkpoint, training it first if missing.

    The directory holds the model and tokenizer (``save_pretrained``) and ``warmup.json`` (the
    configs, the key and the stats, plus ``extra_stats(model, tokenizer)`` when given).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cache_key(task, model_cfg, cfg)
    path = root / f"warmup-{key}"
    if (path / "warmup.json").exists():
        return path
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="warm-up (SFT)", leave=False)

    def tick(step: int, loss: float) -> None:
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss:.3f}")

    model, tokenizer, stats = train_warmup(task, model_cfg, cfg, progress=tick)
    if bar is not None:
        bar.close()
    if extra_stats is not None:
        stats.update(extra_stats(model, tokenizer))
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".warmup-{key}-", dir=root))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    meta = {"key": key, "task": task.to_dict(), "model": model_cfg.to_dict(),
            "warmup": dataclasses.asdict(cfg), "stats": stats}
    (tmp / "warmup.json").write_text(json.dumps(meta, indent=2, default=list))
    try:
        os.replace(tmp, path)  # atomic publish; a concurrent writer may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
