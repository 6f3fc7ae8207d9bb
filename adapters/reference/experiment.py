"""The comparison: every (controller, seed) arm is one GRPO run from the same starting model,
run in parallel worker processes; the results feed `report.write_report`.

Example (a miniature CPU comparison; the CLI builds the real one from the presets):
    >>> from metactl.adapters.reference.presets import cpu_config
    >>> cfg = cpu_config(quick=True, out="/tmp/metactl-doctest", controllers=("fixed-0.9",),
    ...                  seeds=(0,), steps=2)                      # doctest: +SKIP
    >>> report_path = run_experiment(cfg)                          # doctest: +SKIP
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import multiprocessing as mp
import os
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .model import TinyModelConfig
from .sft import WarmupConfig
from .tasks import ChainTask
from .trainer import GRPOConfig


@dataclass(frozen=True)
class EvalConfig:
    """How runs are evaluated: the final evaluation and the learning-curve points.

    Example:
        >>> EvalConfig(k=8).temperature
        0.6
    """

    n_per_benchmark: int = 200
    k: int = 8
    temperature: float = 0.6
    top_p: float = 1.0
    curve_n: int = 50
    curve_k: int = 4
    curve_points: int = 6
    batch_size: int = 1024
    train_check_n: int = 1000

    def __post_init__(self) -> None:
        for name in ("n_per_benchmark", "k", "curve_n", "curve_k", "batch_size", "train_check_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.curve_points < 0:
            raise ValueError(f"curve_points must be >= 0, got {self.curve_points}")
        if self.temperature < 0 or not (0 < self.top_p <= 1):
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")


@dataclass(frozen=True)
class ReproduceConfig:
    """Everything a comparison run needs (one object, frozen, recorded in the report).

    ``preset="cpu"`` uses ``task``, ``model`` and ``warmup``; ``preset="paper"`` uses
    ``model_path``, ``data`` and the field names instead.
    """

    preset: str
    out: str
    controllers: tuple[str, ...]
    seeds: tuple[int, ...]
    grpo: GRPOConfig
    eval: EvalConfig = field(default_factory=EvalConfig)
    workers: int = 2
    threads_per_worker: int = 1
    # -- cpu preset
    task: ChainTask | None = None
    model: TinyModelConfig | None = None
    warmup: WarmupConfig | None = None
    cache_dir: str | None = None
    # -- paper preset
    model_path: str | None = None
    data: str | None = None
    eval_data: tuple[tuple[str, str], ...] = ()
    eval_size: int = 100
    prompt_field: str = "problem"
    answer_field: str = "answer"
    instruction: str | None = None
    allow_download: bool = False

    def __post_init__(self) -> None:
        if self.preset not in ("cpu", "paper"):
            raise ValueError(f"preset must be 'cpu' or 'paper', got {self.preset!r}")
        if not self.controllers or len(set(self.controllers)) != len(self.controllers):
            raise ValueError(f"controllers must be non-empty and distinct, got {self.controllers}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be non-empty and distinct, got {self.seeds}")
        if self.workers < 1 or self.threads_per_worker < 1:
            raise ValueError("workers and threads_per_worker must be >= 1")
        if self.preset == "cpu" and (self.task is None or self.model is None
                                     or self.warmup is None):
            raise ValueError("preset 'cpu' needs task, model and warmup configs")
        if self.preset == "paper" and (not self.model_path or not self.data):
            raise ValueError("preset 'paper' needs model_path (--model) and data (--data)")

    def to_dict(self) -> dict:
        """JSON-safe view (nested configs as dicts)."""
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if hasattr(v, "to_dict"):
                v = v.to_dict()
            elif dataclasses.is_dataclass(v) and not isinstance(v, type):
                v = dataclasses.asdict(v)
            d[f.name] = v
        return d


# ----------------------------------------------------------------------------------------------
# per-run setup (built inside each worker process)
# ----------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """What a GRPO run needs besides its controller and seed."""

    model: Any
    tokenizer: Any
    prompts: Any
    reward_fn: Any
    benchmarks: dict[str, list]
    curve_benchmarks: dict[str, list]
    max_new_tokens: int
    ref_model: Any = None
    add_special_tokens: bool = False


def build_setup(cfg: ReproduceConfig, start_path: str | None) -> Setup:
    """Load the starting model and build prompts, verifier and benchmarks for ``cfg.preset``."""
    if cfg.preset == "cpu":
        return _cpu_setup(cfg, start_path)
    return _paper_setup(cfg)


def _cpu_setup(cfg: ReproduceConfig, start_path: str | None) -> Setup:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .tasks import HELDOUT_PER_BENCHMARK, chain_reward, heldout_prompts

    assert cfg.task is not None and start_path is not None
    task = cfg.task
    for length in task.benchmark_lengths:
        limit = min(HELDOUT_PER_BENCHMARK, task.n_distinct(length) // 4)
        if cfg.eval.n_per_benchmark > limit:
            raise ValueError(f"eval n_per_benchmark must be <= {limit} (held-out problems of "
                             f"chain length {length})")
    model = AutoModelForCausalLM.from_pretrained(start_path).float()
    tok = AutoTokenizer.from_pretrained(start_path)
    exclude = heldout_prompts(task)
    bench = task.benchmarks(cfg.eval.n_per_benchmark)
    ref = None
    if cfg.grpo.kl_beta > 0:
        ref = AutoModelForCausalLM.from_pretrained(start_path).float()
    return Setup(
        model=model, tokenizer=tok,
        prompts=lambda rng, n: task.sample(rng, n, exclude=exclude),
        reward_fn=chain_reward, benchmarks=bench,
        curve_benchmarks={k: v[: cfg.eval.curve_n] for k, v in bench.items()},
        max_new_tokens=task.max_completion_tokens, ref_model=ref,
    )


def _paper_setup(cfg: ReproduceConfig) -> Setup:
    from .paper import (
        DEFAULT_INSTRUCTION,
        MathProblem,
        format_prompt,
        load_math_dataset,
        load_model_and_tokenizer,
        math_reward,
    )

    assert cfg.model_path is not None and cfg.data is not None
    device = cfg.grpo.device
    model, tok = load_model_and_tokenizer(cfg.model_path, device=device,
                                          allow_download=cfg.allow_download)
    instruction = DEFAULT_INSTRUCTION if cfg.instruction is None else cfg.instruction

    def to_problems(rows: list[dict]) -> list[MathProblem]:
        return [MathProblem(format_prompt(tok, r["problem"], instruction), r["answer"])
                for r in rows]

    train = to_problems(load_math_dataset(cfg.data, cfg.prompt_field, cfg.answer_field))
    if cfg.eval_data:
        bench = {name: to_problems(load_math_dataset(path, cfg.prompt_field, cfg.answer_field))
                 for name, path in cfg.eval_data}
    else:  # hold out the last eval_size problems of the training file
        n_eval = min(cfg.eval_size, max(1, len(train) // 5))
        bench, train = {"heldout": train[-n_eval:]}, train[:-n_eval]
    bench = {k: v[: cfg.eval.n_per_benchmark] for k, v in bench.items()}
    if len(train) < cfg.grpo.prompts_per_step:
        raise ValueError(f"{cfg.data}: {len(train)} training problems, fewer than "
                         f"prompts_per_step={cfg.grpo.prompts_per_step}")

    def prompts(rng: np.random.Generator, n: int) -> list[MathProblem]:
        return [train[int(i)] for i in rng.choice(len(train), size=n, replace=False)]

    ref = None
    if cfg.grpo.kl_beta > 0:
        ref, _ = load_model_and_tokenizer(cfg.model_path, device=device,
                                          allow_download=cfg.allow_download)
        if cfg.grpo.precision == "bf16":
            ref = ref.bfloat16()  # frozen: bf16 weights are enough
    return Setup(
        model=model, tokenizer=tok, prompts=prompts, reward_fn=math_reward,
        benchmarks=bench, curve_benchmarks={k: v[: cfg.eval.curve_n] for k, v in bench.items()},
        max_new_tokens=cfg.grpo.max_new_tokens, ref_model=ref,
    )


def evaluate_setup(cfg: ReproduceConfig, setup: Setup, model: Any, *, final: bool,
                   seed: int) -> dict:
    """Evaluate ``model`` on the final benchmarks (``final=True``) or the curve subsets."""
    from .evaluate import evaluate_benchmarks

    ev = cfg.eval
    return evaluate_benchmarks(
        model, setup.tokenizer, setup.benchmarks if final else setup.curve_benchmarks,
        setup.reward_fn, k=ev.k if final else ev.curve_k, temperature=ev.temperature,
        top_p=ev.top_p, max_new_tokens=setup.max_new_tokens, seed=seed,
        batch_size=ev.batch_size, add_special_tokens=setup.add_special_tokens,
        max_prompt_len=cfg.grpo.max_prompt_len,
    )


# ----------------------------------------------------------------------------------------------
# one arm = one GRPO run (worker entry point)
# ----------------------------------------------------------------------------------------------
_PROGRESS: Any = None  # a multiprocessing queue, set in each worker by _init_worker


def _init_worker(progress_queue: Any, threads: int) -> None:
    global _PROGRESS
    import torch

    torch.set_num_threads(threads)
    _PROGRESS = progress_queue


def arm_key(cfg: ReproduceConfig, controller: str, seed: int, start_path: str | None) -> str:
    """Hash of everything that determines an arm's result (not where or how fast it runs), so
    a finished arm is reused only by a comparison that would have produced the same result."""
    import hashlib

    d = cfg.to_dict()
    for k in ("out", "workers", "threads_per_worker", "controllers", "seeds"):
        d.pop(k)
    blob = json.dumps({"cfg": d, "controller": controller, "seed": seed, "start": start_path},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _finished(cfg: ReproduceConfig, controller: str, seed: int, start_path: str | None) -> bool:
    path = run_dir_for(cfg, controller, seed) / "result.json"
    if not path.exists():
        return False
    return json.loads(path.read_text()).get("key") == arm_key(cfg, controller, seed, start_path)


def run_dir_for(cfg: ReproduceConfig, controller: str, seed: int) -> Path:
    """``<out>/runs/<controller>/seed<seed>``."""
    return Path(cfg.out) / "runs" / controller / f"seed{seed}"


def diagnostic_steps(steps: int) -> tuple[int, ...]:
    """Steps at which a run records its (N, K) likelihood matrix: first, middle, last."""
    return tuple(sorted({0, steps // 2, steps - 1}))


def run_arm(cfg: ReproduceConfig, controller: str, seed: int, start_path: str | None) -> dict:
    """Train one (controller, seed) arm (resuming its checkpoint if any), evaluate it, write
    ``result.json`` in its run directory and return the result."""
    import torch

    from .controllers import make_policy
    from .trainer import GRPOTrainer

    run_dir = run_dir_for(cfg, controller, seed)
    done = run_dir / "result.json"
    key = arm_key(cfg, controller, seed, start_path)
    if _finished(cfg, controller, seed, start_path):
        return json.loads(done.read_text())
    ckpt = run_dir / "checkpoint.pt"
    key_file = run_dir / "key.txt"
    if ckpt.exists() and (not key_file.exists() or key_file.read_text() != key):
        ckpt.unlink()  # a checkpoint of a different configuration: start over
    run_dir.mkdir(parents=True, exist_ok=True)
    key_file.write_text(key)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    setup = build_setup(cfg, start_path)
    steps = cfg.grpo.steps
    eval_every = max(1, steps // cfg.eval.curve_points) if cfg.eval.curve_points else 0
    grpo = dataclasses.replace(cfg.grpo, seed=seed, eval_every=eval_every,
                               diagnostic_steps=diagnostic_steps(steps))
    policy = make_policy(controller, steps, seed)

    def curve_eval(model: Any, step: int) -> dict:
        return evaluate_setup(cfg, setup, model, final=False, seed=10_000 + step)

    trainer = GRPOTrainer(setup.model, setup.tokenizer, grpo, policy, prompts=setup.prompts,
                          reward_fn=setup.reward_fn, ref_model=setup.ref_model,
                          evaluator=curve_eval, run_dir=run_dir)
    start_step = trainer.step_idx

    def report_progress(record: dict) -> None:
        if _PROGRESS is not None:
            _PROGRESS.put((controller, seed, 1))

    if _PROGRESS is not None and start_step:
        _PROGRESS.put((controller, seed, start_step))
    history = trainer.train(callback=report_progress, progress_bar=_PROGRESS is None)
    final = evaluate_setup(cfg, setup, trainer.model, final=True, seed=20_000)
    train_seconds = sum(h["seconds"] for h in history)
    result = {
        "key": key,
        "controller": controller,
        "seed": seed,
        "final": final,
        "curve": trainer.evals,
        "temperature": [h["temperature"] for h in history],
        "reward": [h["reward"] for h in history],
        "lr": [h["lr"] for h in history],
        "entropy": [h.get("entropy") for h in history],
        "probs": [h["probs"] for h in history[:: max(1, steps // 50)]],
        "candidates": [float(c) for c in policy.candidates],
        "diagnostics": trainer.diagnostics,
        "train_seconds": train_seconds,
        "rollout_seconds": sum(h["rollout_seconds"] for h in history),
        "meta_seconds": sum(h["meta_seconds"] for h in history),
        "steps": steps,
        "wall_seconds": time.perf_counter() - t0,
        "resumed_from_step": start_step,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, done)
    trainer.checkpoint_path.unlink(missing_ok=True)  # the result supersedes the checkpoint
    return result


def _run_arm_job(args: tuple) -> dict:
    return run_arm(*args)


# ----------------------------------------------------------------------------------------------
# the whole comparison
# ----------------------------------------------------------------------------------------------
def prepare_start(cfg: ReproduceConfig, progress: bool = True) -> tuple[str | None, dict]:
    """Warm-up (CPU preset; cached) and the pre-RL checks: returns (start path, start info).

    The start info holds the starting model's benchmark scores ("base, no RL") and, for the CPU
    preset, the task check: greedy accuracy on the training distribution and sampled accuracy at
    each fixed temperature of the comparison.
    """
    import torch

    start_path: str | None = None
    info: dict[str, Any] = {}
    if cfg.preset == "cpu":
        from .sft import warmup

        assert cfg.task and cfg.model and cfg.warmup
        path = warmup(cfg.task, cfg.model, cfg.warmup, cache_dir=cfg.cache_dir,
                      progress=progress)
        start_path = str(path)
        meta = json.loads((path / "warmup.json").read_text())
        info["warmup"] = {"path": start_path, "key": meta["key"], **meta["stats"]}
    setup = build_setup(cfg, start_path)
    info["base"] = evaluate_setup(cfg, setup, setup.model, final=True, seed=20_000)
    if cfg.preset == "cpu":
        info["task_check"] = task_check(cfg, setup)
    del setup
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return start_path, info


def task_check(cfg: ReproduceConfig, setup: Setup) -> dict:
    """Accuracy of the starting model on fresh training-distribution problems: greedy and
    sampled at each temperature of the comparison's fixed arms (and 1.0)."""
    from .evaluate import evaluate_benchmarks

    assert cfg.task is not None
    from .tasks import heldout_prompts

    rng = np.random.default_rng(4242)
    train = {"train": cfg.task.sample(rng, cfg.eval.train_check_n,
                                      exclude=heldout_prompts(cfg.task))}
    out: dict[str, Any] = {}
    temps = sorted({1.0} | {float(c.split("-")[1]) for c in cfg.controllers
                            if c.startswith("fixed-")})
    for t in temps:
        r = evaluate_benchmarks(setup.model, setup.tokenizer, train, setup.reward_fn, k=4,
                                temperature=t, max_new_tokens=setup.max_new_tokens, seed=1,
                                greedy=(t == temps[0]), batch_size=cfg.eval.batch_size)
        if "greedy" in r["train"]:
            out["greedy"] = r["train"]["greedy"]
        out[f"sampled@{t:g}"] = r["train"]["pass1"]
        out[f"pass@4@{t:g}"] = r["train"]["pass_at_k"]
    out["greedy_in_range"] = bool(0.10 <= out["greedy"] <= 0.60)
    out["n"] = cfg.eval.train_check_n
    return out


def run_all_arms(cfg: ReproduceConfig, start_path: str | None, progress: bool = True) -> list[dict]:
    """Run every (controller, seed) arm, ``cfg.workers`` at a time; returns their results."""
    jobs = [(cfg, c, s, start_path) for c in cfg.controllers for s in cfg.seeds]
    pending = [j for j in jobs if not _finished(cfg, j[1], j[2], start_path)]
    results: dict[tuple[str, int], dict] = {}
    for j in jobs:
        if j not in pending:
            results[(j[1], j[2])] = run_arm(*j)
    if pending and (cfg.workers == 1 or len(pending) == 1):
        import torch

        torch.set_num_threads(cfg.threads_per_worker)
        for j in pending:
            results[(j[1], j[2])] = run_arm(*j)
    elif pending:
        results.update(_run_parallel(cfg, pending, progress))
    return [results[(c, s)] for c in cfg.controllers for s in cfg.seeds]


def _run_parallel(cfg: ReproduceConfig, pending: list[tuple], progress: bool) -> dict:
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    q = manager.Queue()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pending) * cfg.grpo.steps, desc=f"{len(pending)} runs, "
                   f"{cfg.workers} workers", unit="step")
    out: dict[tuple[str, int], dict] = {}
    with cf.ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx,
                                initializer=_init_worker,
                                initargs=(q, cfg.threads_per_worker)) as pool:
        futures = {pool.submit(_run_arm_job, j): (j[1], j[2]) for j in pending}
        remaining = set(futures)
        while remaining:
            try:
                _, _, n = q.get(timeout=0.5)
                if bar is not None:
                    bar.update(n)
            except queue.Empty:
                pass
            for fut in [f for f in remaining if f.done()]:
                remaining.discard(fut)
                out[futures[fut]] = fut.result()  # re-raises a worker's error
                if bar is not None:
                    bar.set_postfix(done=f"{len(out)}/{len(pending)}")
    if bar is not None:
        bar.close()
    manager.shutdown()
    return out


def run_experiment(cfg: ReproduceConfig, progress: bool = True) -> Path:
    """Warm-up and checks, all arms, then the report. Returns the report's markdown path."""
    import torch

    from .report import write_report

    # tiny models run fastest single-threaded, and on a busy machine OpenMP spin-waiting makes
    # multi-threaded tiny matmuls many times slower: the main process uses the workers' setting
    torch.set_num_threads(cfg.threads_per_worker)
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=list))
    start_path, start_info = prepare_start(cfg, progress=progress)
    results = run_all_arms(cfg, start_path, progress=progress)
    return write_report(out, cfg, start_info, results, wall_seconds=time.perf_counter() - t0)
