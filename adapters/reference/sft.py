"""Supervised warm-up of the tiny model on the biased teacher's demonstrations, cached on disk.

The checkpoint is keyed by a hash of everything that determines it (task, model, warm-up config,
library versions), so every arm and seed of a comparison starts from the same weights and a
second run finds it in the cache. Each entry's ``warmup.json`` records the SHA-256 of every
other file of the entry (and of itself), checked whenever the entry is used: a truncated or
bit-flipped weight file, or a half-written entry, is rebuilt instead of trusted.

A cache folder can come from elsewhere (a shared drive, a copied cache), and its hashes prove
only that its files are consistent, not who wrote them. So an entry may hold only the files
``save_pretrained`` writes for this model, safetensors weights and JSON, none of which can run
code when loaded: a pickled weight file (``pytorch_model.bin``, ``*.pt``), a Python file, or a
JSON configuration that points ``from_pretrained`` at custom code (``auto_map``) makes the entry
refused and rebuilt, before anything loads it.

Example:
    >>> from metactl.adapters.reference.tasks import ChainTask
    >>> cfg = WarmupConfig(steps=2, batch_size=8)
    >>> path = warmup(ChainTask(max_len=2, benchmark_lengths=(1, 2)), TinyModelConfig(
    ...     hidden_size=32, num_layers=1), cfg, cache_dir="/tmp/metactl-doctest")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
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

from ..char_tokenizer import build_char_tokenizer
from ..integrity import (
    CorruptFileError,
    fsync_dir,
    json_sha256,
    read_json_checked,
    sha256_file,
    write_json_checked,
)
from .model import TinyModelConfig, build_model, n_parameters
from .tasks import ALPHABET, ChainTask, heldout_prompts

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

    task_fields = task.to_dict()
    task_fields.pop("train_pool", None)  # the pool picks RL prompts; the warm-up never sees it
    blob = json.dumps(
        {"task": task_fields, "model": model_cfg.to_dict(), "warmup": dataclasses.asdict(cfg),
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


@dataclass(frozen=True)
class WarmupEntry:
    """A verified warm-up cache entry: its folder, key, content identity and metadata.

    ``identity`` is a hash of the entry's model and tokenizer files (not of its timing stats):
    it names the starting weights themselves, wherever the cache lives. ``rebuilt`` says why
    the entry was (re)built by this call: ``None`` when an existing entry was reused,
    ``"missing"`` for a first build, else what was wrong with the entry found in the cache.
    """

    path: Path
    key: str
    identity: str
    meta: dict
    rebuilt: str | None


META_FILE = "warmup.json"
_CACHE_ADVICE = "the entry is rebuilt automatically"
# what save_pretrained writes for the tiny model and its tokenizer: formats that hold only data
_ENTRY_SUFFIXES = (".json", ".safetensors")


def _check_entry_file(folder: Path, name: str) -> None:
    """Refuse (`CorruptFileError`) a file a warm-up entry never holds and whose loading could
    run code: one in a subfolder, of another format than JSON or safetensors, or a JSON
    configuration with an ``auto_map`` (custom model or tokenizer code)."""
    path = folder / name
    if "/" in name or not name.endswith(_ENTRY_SUFFIXES):
        raise CorruptFileError(path, "is not a file a warm-up entry holds (only the "
                                     "safetensors weights and JSON files save_pretrained "
                                     "writes; a pickled or code file is never loaded)",
                               _CACHE_ADVICE)
    if name.endswith(".json") and name != META_FILE:
        try:
            obj = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptFileError(path, f"not valid JSON ({exc})", _CACHE_ADVICE) from None
        if isinstance(obj, dict) and "auto_map" in obj:
            raise CorruptFileError(path, "names custom code (auto_map), which a warm-up entry "
                                         "never does; it is not loaded", _CACHE_ADVICE)


def _entry_files(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of an entry folder except ``warmup.json``, by relative path."""
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != META_FILE}


def entry_identity(files: dict[str, str]) -> str:
    """The identity of a warm-up entry: a hash of its files' hashes (see `WarmupEntry`)."""
    return json_sha256(files)[:16]


def verify_entry(path: str | os.PathLike, key: str | None = None) -> WarmupEntry:
    """Check a warm-up cache entry: ``warmup.json`` intact (its own hash), for ``key`` when
    given, every model and tokenizer file present with the hash recorded there, no unrecorded
    file, and every file one that loads without running code (safetensors or JSON without
    ``auto_map``; see the module docstring). Raises `CorruptFileError` saying what is wrong."""
    folder = Path(path)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise CorruptFileError(meta_path, "missing (a half-written or damaged cache entry)",
                               _CACHE_ADVICE)
    meta = read_json_checked(meta_path, advice=_CACHE_ADVICE)
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise CorruptFileError(meta_path, "lists no file hashes (an entry of an older metactl)",
                               _CACHE_ADVICE)
    if key is not None and meta.get("key") != key:
        raise CorruptFileError(meta_path, f"is for key {meta.get('key')!r}, not {key!r}",
                               _CACHE_ADVICE)
    actual = _entry_files(folder)
    for name, digest in files.items():
        if name not in actual:
            raise CorruptFileError(folder / name, "missing from the cache entry", _CACHE_ADVICE)
        if actual[name] != digest:
            raise CorruptFileError(folder / name, "content hash mismatch (the file was changed "
                                                  "or damaged after it was written)",
                                   _CACHE_ADVICE)
    extra = sorted(set(actual) - set(files))
    if extra:
        raise CorruptFileError(folder / extra[0], "is not part of the cache entry as written",
                               _CACHE_ADVICE)
    for name in sorted(actual):  # the hashes show the files are consistent, not who wrote them
        _check_entry_file(folder, name)
    return WarmupEntry(path=folder, key=str(meta["key"]), identity=entry_identity(files),
                       meta=meta, rebuilt=None)


def warmup(
    task: ChainTask, model_cfg: TinyModelConfig, cfg: WarmupConfig,
    cache_dir: str | os.PathLike | None = None, progress: bool = True,
    extra_stats: Callable[[Any, Any], dict] | None = None,
) -> Path:
    """Return the directory of the cached warm-up checkpoint, training it first if missing or
    damaged (see `warmup_entry`).

    The directory holds the model and tokenizer (``save_pretrained``) and ``warmup.json`` (the
    configs, the key, the stats, plus ``extra_stats(model, tokenizer)`` when given, and the
    SHA-256 of every other file).
    """
    return warmup_entry(task, model_cfg, cfg, cache_dir=cache_dir, progress=progress,
                        extra_stats=extra_stats).path


def warmup_entry(
    task: ChainTask, model_cfg: TinyModelConfig, cfg: WarmupConfig,
    cache_dir: str | os.PathLike | None = None, progress: bool = True,
    extra_stats: Callable[[Any, Any], dict] | None = None,
) -> WarmupEntry:
    """The verified cache entry for these configs, trained and published first when it is
    missing or fails `verify_entry` (truncated or garbled weights, a deleted ``warmup.json``,
    an entry of an older metactl): a damaged entry never blocks a run, it is replaced.

    Publishing is atomic (a complete folder renamed into place); when several processes build
    the same entry at once, the first complete one wins and the others use it.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(task, model_cfg, cfg)
    path = root / f"warmup-{key}"
    reason = "missing"
    if path.exists():
        try:
            return verify_entry(path, key)
        except CorruptFileError as exc:
            reason = str(exc)
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
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = _entry_files(tmp)
        meta = {"key": key, "task": task.to_dict(), "model": model_cfg.to_dict(),
                "warmup": dataclasses.asdict(cfg), "stats": stats, "files": files}
        write_json_checked(tmp / META_FILE, json.loads(json.dumps(meta, default=list)),
                           indent=2)
        for name in [*files, META_FILE]:  # the folder is renamed into place: flush it first
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        for _ in range(3):
            try:
                os.replace(tmp, path)  # atomic publish
                fsync_dir(root)
                return WarmupEntry(path=path, key=key, identity=entry_identity(files),
                                   meta=verify_entry(path, key).meta, rebuilt=reason)
            except OSError:
                pass  # the name is taken: a concurrent writer's entry, or the damaged one
            try:
                winner = verify_entry(path, key)  # a concurrent writer won the race
                return dataclasses.replace(winner, rebuilt=reason)
            except CorruptFileError:
                # set the damaged entry aside under a unique name, then delete it; a rename is
                # atomic, so a reader sees the damaged entry or none, never a mix
                aside = Path(tempfile.mkdtemp(prefix=f".warmup-{key}-damaged-", dir=root))
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path, aside / "entry")
                shutil.rmtree(aside, ignore_errors=True)
        raise RuntimeError(f"could not publish the warm-up cache entry {path} (another process "
                           "keeps replacing it); retry, or use another --cache-dir")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
