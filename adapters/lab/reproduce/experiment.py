"""The comparison: every (controller, seed) arm is one GRPO run from the same starting model,
run in parallel worker processes; the results feed `report.write_report`.

Example (a miniature CPU comparison; the CLI builds the real one from the presets):
    >>> from metactl.adapters.lab.reproduce.presets import cpu_config
    >>> cfg = cpu_config(quick=True, out="/tmp/metactl-doctest", controllers=("fixed-0.9",),
    ...                  seeds=(0,), steps=2)                      # doctest: +SKIP
    >>> report_path = run_experiment(cfg)                          # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from metactl.adapters.integrity import RunRefusedError
from metactl.adapters.reference.chat_tasks import ChatTask
from metactl.adapters.reference.model import TinyModelConfig
from metactl.adapters.reference.sft import WarmupConfig
from metactl.adapters.reference.tasks import ChainTask
from metactl.adapters.reference.trainer import GRPOConfig

from ..commands import output_lock
from .workers import ArmStopped, Interrupts, RunControl, interrupted_exit, run_in_workers


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
    # the start model's greedy accuracy on the training distribution must lie in this range
    # (the task check; the comparison fails otherwise). The real setups need 10-60%: an
    # untrained or saturated start model cannot show what the rollout temperature changes.
    # Miniature test setups declare a wider range.
    start_greedy_range: tuple[float, float] = (0.10, 0.60)

    def __post_init__(self) -> None:
        for name in ("n_per_benchmark", "k", "curve_n", "curve_k", "batch_size", "train_check_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.curve_points < 0:
            raise ValueError(f"curve_points must be >= 0, got {self.curve_points}")
        if self.temperature < 0 or not (0 < self.top_p <= 1):
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        rng = self.start_greedy_range
        if (not isinstance(rng, tuple | list) or len(rng) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in rng)
                or not (0.0 <= rng[0] <= rng[1] <= 1.0)):
            raise ValueError(f"start_greedy_range must be (low, high) with 0 <= low <= high "
                             f"<= 1, got {rng!r}")
        object.__setattr__(self, "start_greedy_range", (float(rng[0]), float(rng[1])))


#: The presets of ``metactl reproduce`` (`presets`).
PRESETS: tuple[str, ...] = ("cpu", "paper", "smollm2")


@dataclass(frozen=True)
class ReproduceConfig:
    """Everything a comparison run needs (one object, frozen, recorded in the report).

    ``preset="cpu"`` uses ``task``, ``model`` and ``warmup``; ``preset="paper"`` uses
    ``model_path``, ``data`` and the field names instead; ``preset="smollm2"`` uses
    ``chat_task`` (the model is the packaged SmolLM2-135M-Instruct, `metactl.adapters.models`,
    its converted checkpoint cached in ``cache_dir``).
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
    # -- smollm2 preset
    chat_task: ChatTask | None = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {list(PRESETS)}, got {self.preset!r}")
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
        if self.preset == "smollm2" and not isinstance(self.chat_task, ChatTask):
            raise ValueError("preset 'smollm2' needs a chat_task (a ChatTask)")

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
    # item -> context key for per-prompt arms (None: the items' own ``context``)
    contexts: Any = None


def build_setup(cfg: ReproduceConfig, start_path: str | None) -> Setup:
    """Load the starting model and build prompts, verifier and benchmarks for ``cfg.preset``."""
    if cfg.preset == "cpu":
        return _cpu_setup(cfg, start_path)
    if cfg.preset == "smollm2":
        return _smollm2_setup(cfg)
    return _paper_setup(cfg)


def check_eval_sizes(cfg: ReproduceConfig) -> None:
    """Cheap checks of the evaluation sizes (no model, no data), so that the CLI can refuse them
    before the warm-up: the CPU preset's benchmarks hold at most this many distinct problems."""
    from metactl.adapters.reference.tasks import HELDOUT_PER_BENCHMARK

    if cfg.preset == "smollm2":
        assert cfg.chat_task is not None
        train = cfg.chat_task.n_distinct - cfg.eval.n_per_benchmark
        if train < cfg.grpo.prompts_per_step:
            raise ValueError(
                f"eval n_per_benchmark must be <= {cfg.chat_task.n_distinct} - prompts_per_step "
                f"= {cfg.chat_task.n_distinct - cfg.grpo.prompts_per_step} (the task "
                f"'{cfg.chat_task.describe()}' has {cfg.chat_task.n_distinct} distinct "
                "problems; held-out ones are never trained on)")
        return
    if cfg.preset != "cpu":
        return
    assert cfg.task is not None
    for length in cfg.task.benchmark_lengths:
        limit = min(HELDOUT_PER_BENCHMARK, cfg.task.n_distinct(length) // 4)
        if cfg.eval.n_per_benchmark > limit:
            raise ValueError(f"eval n_per_benchmark must be <= {limit} (held-out problems of "
                             f"chain length {length})")


def _cpu_setup(cfg: ReproduceConfig, start_path: str | None) -> Setup:
    from metactl.adapters.reference.tasks import PromptPool, chain_reward, heldout_prompts
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert cfg.task is not None and start_path is not None
    task = cfg.task
    check_eval_sizes(cfg)
    from metactl.adapters.reference.sft import verify_entry

    verify_entry(start_path)  # the files about to be loaded are the ones the warm-up wrote
    model = AutoModelForCausalLM.from_pretrained(start_path).float()
    tok = AutoTokenizer.from_pretrained(start_path)
    exclude = heldout_prompts(task)
    bench = task.benchmarks(cfg.eval.n_per_benchmark)
    ref = None
    if cfg.grpo.kl_beta > 0:
        ref = AutoModelForCausalLM.from_pretrained(start_path).float()
    # a finite pool (cycled; keyed by pool index) or the infinite stream (keyed by chain length)
    prompts: Any = (PromptPool(task.training_pool(exclude)) if task.train_pool
                    else lambda rng, n: task.sample(rng, n, exclude=exclude))
    return Setup(
        model=model, tokenizer=tok,
        prompts=prompts,
        reward_fn=chain_reward, benchmarks=bench,
        curve_benchmarks={k: v[: cfg.eval.curve_n] for k, v in bench.items()},
        max_new_tokens=task.max_completion_tokens, ref_model=ref,
    )


#: The seed that orders the chat task's problems: its first ``n_per_benchmark`` are held out.
HELDOUT_SEED = 0


def _smollm2_setup(cfg: ReproduceConfig) -> Setup:
    """SmolLM2-135M-Instruct as packaged (`metactl.adapters.models.load_model`: pretrained,
    no warm-up) on the chat task: prompts in the model's chat template, the task's reward.
    Every distinct problem is listed once in a fixed shuffled order (`ChatTask.
    distinct_problems`); the first ``n_per_benchmark`` are the held-out benchmark, training
    draws from the rest (``prompts_per_step`` distinct ones a step, keyed by their index)."""
    from metactl.adapters.models import load_model
    from metactl.adapters.reference.chat_tasks import reward
    from metactl.adapters.reference.tasks import Problem

    assert cfg.chat_task is not None
    check_eval_sizes(cfg)
    model, tok = load_model("smollm2", cache_dir=cfg.cache_dir)
    model = model.to(cfg.grpo.device)  # the start model's evaluation runs before the trainer's
    task = cfg.chat_task
    problems = task.distinct_problems(HELDOUT_SEED)
    texts = task.prompts(tok, problems)
    items = [Problem(prompt=text, answer=p.answer, pool_index=p.context)
             for text, p in zip(texts, problems, strict=True)]
    n_eval = cfg.eval.n_per_benchmark
    heldout, train = items[:n_eval], items[n_eval:]

    def prompts(rng: np.random.Generator, n: int) -> list[Problem]:
        return [train[int(i)] for i in rng.choice(len(train), size=n, replace=False)]

    ref = None
    if cfg.grpo.kl_beta > 0:
        ref, _ = load_model("smollm2", cache_dir=cfg.cache_dir)
        ref = ref.to(cfg.grpo.device)
    bench = {"heldout": heldout}
    return Setup(
        model=model, tokenizer=tok, prompts=prompts, reward_fn=reward, benchmarks=bench,
        curve_benchmarks={k: v[: cfg.eval.curve_n] for k, v in bench.items()},
        max_new_tokens=cfg.grpo.max_new_tokens, ref_model=ref,
    )


def _paper_setup(cfg: ReproduceConfig) -> Setup:
    from .paper import (
        DEFAULT_INSTRUCTION,
        MathProblem,
        format_prompt,
        heldout_size,
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
        n_eval = heldout_size(len(train), cfg.eval_size)
        bench, train = {"heldout": train[-n_eval:]}, train[:-n_eval]
    bench = {k: v[: cfg.eval.n_per_benchmark] for k, v in bench.items()}
    if len(train) < cfg.grpo.prompts_per_step:
        raise ValueError(f"{cfg.data}: {len(train)} training problems, fewer than "
                         f"prompts_per_step={cfg.grpo.prompts_per_step}")

    def prompts(rng: np.random.Generator, n: int) -> list[MathProblem]:
        return [train[int(i)] for i in rng.choice(len(train), size=n, replace=False)]

    # per-prompt arms: a problem's key is its (first) index in the training file
    index_of: dict[str, int] = {}
    for i, problem in enumerate(train):
        index_of.setdefault(problem.prompt, i)

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
        contexts=lambda item: index_of[item.prompt],
    )


def evaluate_setup(cfg: ReproduceConfig, setup: Setup, model: Any, *, final: bool,
                   seed: int) -> dict:
    """Evaluate ``model`` on the final benchmarks (``final=True``) or the curve subsets."""
    from metactl.adapters.reference.evaluate import evaluate_benchmarks

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
# the configuration fields that do not change an arm's result, left out of its key: where and
# how fast it runs, which other arms run, how often it checkpoints, the start-model check, and
# the GRPO fields that run_arm sets for each arm
ARM_KEY_VERSION = 2
_NOT_IN_ARM_KEY = ("out", "workers", "threads_per_worker", "controllers", "seeds", "cache_dir",
                   "allow_download")
_GRPO_NOT_IN_ARM_KEY = ("checkpoint_every", "seed", "eval_every", "diagnostic_steps",
                        "temperature_check", "temperature_check_rows",
                        "temperature_check_positions")
_EVAL_NOT_IN_ARM_KEY = ("train_check_n", "start_greedy_range")
# sampler knobs added after ARM_KEY_VERSION 2: left out at their off values, so the key of a
# configuration that does not use them (every result computed before they existed) is unchanged
_GRPO_KNOBS_OFF = {"rollout_temperature": 1.0, "rollout_top_k": 0, "rollout_min_p": 0.0}
# configuration fields added after ARM_KEY_VERSION 2, likewise left out while unused
_FIELDS_UNUSED = {"chat_task": None}


def _resolved(path: str | None) -> str | None:
    """A local path as an absolute, symlink-free path (a hub id is kept as it is)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def start_identity(start_path: str | None) -> str | None:
    """The identity of the warm-up entry at ``start_path`` (a hash of its weight and tokenizer
    files, see `sft.WarmupEntry`), ``None`` without a warm-up (paper preset)."""
    if start_path is None:
        return None
    from metactl.adapters.integrity import read_json_checked
    from metactl.adapters.reference.sft import META_FILE, entry_identity

    meta = read_json_checked(Path(start_path) / META_FILE,
                             advice="rerun: the warm-up cache entry is rebuilt automatically")
    return entry_identity(meta["files"])


def arm_key(cfg: ReproduceConfig, controller: str, seed: int, start_path: str | None) -> str:
    """Hash of everything that determines an arm's result and nothing else, so a finished arm
    or a checkpoint is reused exactly when this comparison would produce the same result: the
    starting weights enter by content (not by the cache folder's path), local data and model
    paths resolved, and bookkeeping (output folder, workers, threads, ``checkpoint_every``, the
    other arms) left out."""
    import hashlib

    d = cfg.to_dict()
    for k in _NOT_IN_ARM_KEY:
        d.pop(k)
    for k, unused in _FIELDS_UNUSED.items():
        if d[k] == unused:
            d.pop(k)
    if cfg.preset == "smollm2":  # the weights by content: the package's GGUF file's hash
        from metactl.adapters.models import checkpoint_path

        d["packaged_model"] = checkpoint_path("smollm2", cache_dir=cfg.cache_dir).name
    d["grpo"] = {k: v for k, v in d["grpo"].items() if k not in _GRPO_NOT_IN_ARM_KEY
                 and not (k in _GRPO_KNOBS_OFF and v == _GRPO_KNOBS_OFF[k])}
    if cfg.grpo.sampler_setting.truncated:
        # a truncated rollout is scored under its truncation: a result of the older,
        # untruncated scoring is another computation
        d["grpo"]["truncated_scoring"] = 1
    d["eval"] = {k: v for k, v in d["eval"].items() if k not in _EVAL_NOT_IN_ARM_KEY}
    d["model_path"], d["data"] = _resolved(d["model_path"]), _resolved(d["data"])
    d["eval_data"] = [[name, _resolved(path)] for name, path in d["eval_data"]]
    blob = json.dumps({"version": ARM_KEY_VERSION, "cfg": d, "controller": controller,
                       "seed": seed, "start": start_identity(start_path)},
                      sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_RESULT_ADVICE = "delete it to recompute this arm"


def _read_result(path: Path) -> dict:
    """A run's ``result.json`` (hash checked; `CorruptFileError` naming it when damaged). A
    result without a hash (an older metactl) loads: its key never matches, so it is redone."""
    from metactl.adapters.integrity import read_json_checked

    return read_json_checked(path, advice=_RESULT_ADVICE, require_hash=False)


def _finished(cfg: ReproduceConfig, controller: str, seed: int, start_path: str | None) -> bool:
    path = run_dir_for(cfg, controller, seed) / "result.json"
    if not path.exists():
        return False
    return _read_result(path).get("key") == arm_key(cfg, controller, seed, start_path)


def run_dir_for(cfg: ReproduceConfig, controller: str, seed: int) -> Path:
    """``<out>/runs/<controller>/seed<seed>``."""
    return Path(cfg.out) / "runs" / controller / f"seed{seed}"


def diagnostic_steps(steps: int) -> tuple[int, ...]:
    """Steps at which a run records its (N, K) likelihood matrix: first, middle, last."""
    return tuple(sorted({0, steps // 2, steps - 1}))


def _set_aside(path: Path, old_key: str | None) -> Path:
    """Move ``path`` to ``<its folder>/superseded/<stem>-<old key>[-n]<suffix>`` (never over
    another file) and return the new path."""
    folder = path.parent / "superseded"
    folder.mkdir(exist_ok=True)
    base = f"{path.stem}-{old_key or 'unknown-key'}"
    dest = folder / f"{base}{path.suffix}"
    n = 1
    while dest.exists():
        n += 1
        dest = folder / f"{base}-{n}{path.suffix}"
    os.replace(path, dest)
    return dest


def run_arm(cfg: ReproduceConfig, controller: str, seed: int, start_path: str | None,
            progress: bool = True, control: RunControl | None = None) -> dict:
    """Train one (controller, seed) arm (resuming its checkpoint if any), evaluate it, write
    ``result.json`` in its run directory and return the result. ``control``: how the arm
    reports its steps and notes and sees a stop request (default: notes on stderr, no stop);
    ``progress``: draw the arm's own progress bar when ``control`` does not count the steps.

    A checkpoint or result of another configuration (another key) is never deleted: it is
    moved to ``superseded/`` in the run directory. Raises `ArmStopped` when a stop is requested
    (the arm stops after its current step and keeps a checkpoint), `CorruptFileError` when its
    checkpoint or result is damaged.
    """
    import torch
    from metactl.adapters.integrity import write_json_checked, write_text_atomic
    from metactl.adapters.reference.trainer import GRPOTrainer

    from ..controllers import make_policy

    if control is None:
        control = RunControl()
    if not isinstance(control, RunControl):
        raise TypeError(f"control must be a RunControl, got {type(control).__name__}")
    label = f"{controller} seed {seed}"
    if control.stop_requested():  # queued before the stop: never started
        raise ArmStopped(f"{label}: not started")
    run_dir = run_dir_for(cfg, controller, seed)
    done = run_dir / "result.json"
    key = arm_key(cfg, controller, seed, start_path)
    old_result = _read_result(done) if done.exists() else None
    if old_result is not None and old_result.get("key") == key:
        return old_result
    ckpt = run_dir / "checkpoint.pt"
    key_file = run_dir / "key.txt"
    old_key = key_file.read_text().strip() if key_file.exists() else None
    if ckpt.exists() and old_key != key:
        aside = _set_aside(ckpt, old_key)
        control.note(f"{label}: {ckpt} is of another configuration (key "
                     f"{old_key or 'unknown'}, this run {key}); kept as {aside}, this arm starts "
                     "from step 0")
    if old_result is not None:
        aside = _set_aside(done, old_result.get("key"))
        control.note(f"{label}: {done} is of another configuration; kept as {aside}")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(key_file, key)
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
                          evaluator=curve_eval, run_dir=run_dir, contexts=setup.contexts)
    start_step = trainer.step_idx
    if control.stop_requested():  # stopped while loading: nothing new to keep
        raise ArmStopped(f"{label}: stopped before training (at step {start_step} of {steps})")
    if start_step:
        control.note(f"{label}: resumed at step {start_step} of {steps} from {ckpt}")

    def after_step(record: dict) -> None:
        control.steps_done(1)
        if control.stop_requested():
            if cfg.grpo.checkpoint_every:  # keep this step's work: resume starts after it
                trainer.save_checkpoint()
            raise ArmStopped(f"{label}: stopped after step {trainer.step_idx} of {steps}")

    if start_step:
        control.steps_done(start_step)
    history = trainer.train(callback=after_step,
                            progress_bar=progress and not control.counts_steps)
    final = evaluate_setup(cfg, setup, trainer.model, final=True, seed=20_000)
    train_seconds = sum(h["seconds"] for h in history)
    result = {
        "key": key,
        "controller": controller,
        "seed": seed,
        "final": final,
        "curve": trainer.evals,
        "temperature": [h["temperature"] for h in history],
        # the temperature the sampled tokens came from (the trainer's check), and its z
        "effective_temperature": [h.get("effective_temperature") for h in history],
        "effective_temperature_z": [h.get("effective_temperature_z") for h in history],
        "reward": [h["reward"] for h in history],
        "lr": [h["lr"] for h in history],
        "entropy": [h.get("entropy") for h in history],
        "probs": [h["probs"] for h in history[:: max(1, steps // 50)]],
        # one-knob arms: the values; a joint arm: each candidate's {knob: value}
        "candidates": ([float(c) for c in policy.candidates] if len(trainer.knobs) == 1
                       else [policy.setting(k) for k in range(len(policy.candidates))]),
        "diagnostics": trainer.diagnostics,
        "train_seconds": train_seconds,
        "rollout_seconds": sum(h["rollout_seconds"] for h in history),
        "meta_seconds": sum(h["meta_seconds"] for h in history),
        "check_seconds": sum(h.get("check_seconds", 0.0) for h in history),
        "steps": steps,
        "wall_seconds": time.perf_counter() - t0,
        "resumed_from_step": start_step,
    }
    if trainer.knobs != ("temperature",):  # an arm over other knobs: which, and their values
        result["knobs"] = list(trainer.knobs)
    logged = sorted({k for h in history for k in ("top_p", "top_k", "min_p") if k in h})
    if logged:  # each sampler knob besides the temperature, every step
        result["settings"] = {k: [h[k] for h in history] for k in logged}
    if any("signal" in h for h in history):  # a likelihood rule: its signal, every step
        result["signal"] = [h.get("signal") for h in history]
    if trainer.spec.per_context:  # per-prompt arms: which context got which temperature, every step
        result["context_temperatures"] = [
            {"contexts": h["contexts"], "temperatures": h["temperatures"]} for h in history]
    write_json_checked(done, result)
    result = _read_result(done)  # what a rerun will read back (tuples as lists, ...)
    trainer.checkpoint_path.unlink(missing_ok=True)  # the result supersedes the checkpoint
    return result


# ----------------------------------------------------------------------------------------------
# the whole comparison
# ----------------------------------------------------------------------------------------------
class StartModelError(RunRefusedError):
    """The warm-up's start model is outside the range the comparison needs."""


def prepare_start(cfg: ReproduceConfig, progress: bool = True,
                  control: RunControl | None = None) -> tuple[str | None, dict]:
    """Warm-up (CPU preset; cached) and the pre-RL checks: returns (start path, start info).

    The start info holds the starting model's benchmark scores ("base, no RL") and, for the CPU
    preset, the task check: greedy accuracy on the training distribution and sampled accuracy at
    each fixed temperature of the comparison. Raises `StartModelError` when the greedy accuracy
    is outside ``cfg.eval.start_greedy_range`` (before the base evaluation). ``control``
    receives the notes (default: stderr).
    """
    import torch

    if control is None:
        control = RunControl()

    start_path: str | None = None
    info: dict[str, Any] = {}
    if cfg.preset == "cpu":
        from metactl.adapters.reference.sft import warmup_entry

        assert cfg.task and cfg.model and cfg.warmup
        entry = warmup_entry(cfg.task, cfg.model, cfg.warmup, cache_dir=cfg.cache_dir,
                             progress=progress)
        if entry.rebuilt is not None and entry.rebuilt != "missing":
            control.note(f"warm-up cache entry {entry.key} was damaged and has been rebuilt "
                  f"({entry.rebuilt})")
        start_path = str(entry.path)
        info["warmup"] = {"path": start_path, "key": entry.key, "identity": entry.identity,
                          "rebuilt": entry.rebuilt, **entry.meta["stats"]}
    setup = build_setup(cfg, start_path)
    if cfg.preset == "smollm2":
        from metactl.adapters.models import MODELS

        assert cfg.chat_task is not None
        info["model"] = {"name": "smollm2", "description": MODELS["smollm2"].description,
                         "task": cfg.chat_task.describe(),
                         "distinct_problems": cfg.chat_task.n_distinct,
                         "heldout": cfg.eval.n_per_benchmark}
    if cfg.preset == "cpu":
        tc = info["task_check"] = task_check(cfg, setup)
        if not tc["greedy_in_range"]:
            lo, hi = tc["greedy_range"]
            raise StartModelError(
                f"the start model (warm-up {info['warmup']['key']} in {start_path}) solves "
                f"{100 * tc['greedy']:.1f}% of fresh training problems greedily, outside the "
                f"required {100 * lo:g}-{100 * hi:g}%: RL from it cannot show what the rollout "
                "temperature changes. Change the warm-up (WarmupConfig: steps, stop_loss) or, "
                "for a miniature setup, declare the range (EvalConfig.start_greedy_range)")
    info["base"] = evaluate_setup(cfg, setup, setup.model, final=True, seed=20_000)
    del setup
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return start_path, info


def task_check(cfg: ReproduceConfig, setup: Setup) -> dict:
    """Accuracy of the starting model on fresh training-distribution problems: greedy and
    sampled at each temperature of the comparison's fixed arms (and 1.0); ``greedy_in_range``
    says whether the greedy accuracy is inside ``cfg.eval.start_greedy_range``."""
    from metactl.adapters.reference.evaluate import evaluate_benchmarks

    assert cfg.task is not None
    from metactl.adapters.reference.tasks import heldout_prompts

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
    lo, hi = cfg.eval.start_greedy_range
    out["greedy_range"] = [lo, hi]
    out["greedy_in_range"] = bool(lo <= out["greedy"] <= hi)
    out["n"] = cfg.eval.train_check_n
    return out


def run_all_arms(cfg: ReproduceConfig, start_path: str | None, progress: bool = True) -> list[dict]:
    """Run every (controller, seed) arm, ``cfg.workers`` at a time; returns their results.

    Ctrl-C (SIGINT, to this process or its process group) stops every running arm after its
    current step with a checkpoint, starts no queued arm, and raises ``KeyboardInterrupt``; an
    arm's error stops the other arms the same way and is raised. Worker processes die with
    this process.
    """
    jobs = [(cfg, c, s, start_path) for c in cfg.controllers for s in cfg.seeds]
    pending = [j for j in jobs if not _finished(cfg, j[1], j[2], start_path)]
    results: dict[tuple[str, int], dict] = {}
    here = RunControl()
    for j in jobs:
        if j not in pending:
            results[(j[1], j[2])] = run_arm(*j, control=here)
            here.note(f"{j[1]} seed {j[2]}: finished earlier, result reused")
    if pending and (cfg.workers == 1 or len(pending) == 1):
        import torch

        torch.set_num_threads(cfg.threads_per_worker)
        stopped: list[str] = []
        with Interrupts(threading.Event()) as ctl:
            control = RunControl(stop=ctl.stop)
            for j in pending:
                try:
                    results[(j[1], j[2])] = run_arm(*j, progress=progress, control=control)
                except ArmStopped as exc:
                    stopped.append(str(exc))
                    break
        if ctl.interrupted:
            raise interrupted_exit(stopped)
    elif pending:
        results.update(run_in_workers(cfg, pending, progress, run_arm))
    return [results[(c, s)] for c in cfg.controllers for s in cfg.seeds]


def check_run_files(cfg: ReproduceConfig) -> None:
    """Before any work: every arm's ``result.json`` intact (hash) and ``checkpoint.pt`` not
    empty or truncated (its hash is checked when it is loaded); leftovers of killed writers
    removed. Raises `CorruptFileError` naming the first damaged file. Call with the output
    lock held."""
    import zipfile

    from metactl.adapters.integrity import CorruptFileError, remove_stale_temps
    from metactl.adapters.reference.trainer import CHECKPOINT_ADVICE

    for c in cfg.controllers:
        for s in cfg.seeds:
            run_dir = run_dir_for(cfg, c, s)
            for name in ("checkpoint.pt", "result.json", "key.txt"):
                remove_stale_temps(run_dir, name)
            if (run_dir / "result.json").exists():
                _read_result(run_dir / "result.json")
            ckpt = run_dir / "checkpoint.pt"
            if ckpt.exists():
                if ckpt.stat().st_size == 0:
                    raise CorruptFileError(ckpt, "empty file", CHECKPOINT_ADVICE)
                try:
                    with zipfile.ZipFile(ckpt):
                        pass
                except (zipfile.BadZipFile, OSError) as exc:
                    raise CorruptFileError(ckpt, f"truncated or garbled ({exc})",
                                           CHECKPOINT_ADVICE) from None


def run_experiment(cfg: ReproduceConfig, progress: bool = True) -> Path:
    """Warm-up and checks, all arms, then the report. Returns the report's markdown path.

    Holds an exclusive lock on ``<out>/.lock`` throughout: a second run on the same output
    folder is refused with `OutputInUseError`. Damaged run files raise `CorruptFileError`
    before any work; Ctrl-C raises ``KeyboardInterrupt`` after the arms stopped (see
    `run_all_arms`).
    """
    import torch
    from metactl.adapters.integrity import wait_exclusive, write_text_atomic

    from .report import write_report

    # tiny models run fastest single-threaded, and on a busy machine OpenMP spin-waiting makes
    # multi-threaded tiny matmuls many times slower: the main process uses the workers' setting
    torch.set_num_threads(cfg.threads_per_worker)
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        # the workers of a run whose main process was killed exit within a second
        wait_exclusive(out / ".workers.lock", timeout=30, what=f"output folder {out}")
        check_run_files(cfg)
        write_text_atomic(out / "config.json",
                          json.dumps(cfg.to_dict(), indent=2, default=list))
        start_path, start_info = prepare_start(cfg, progress=progress)
        results = run_all_arms(cfg, start_path, progress=progress)
        return write_report(out, cfg, start_info, results,
                            wall_seconds=time.perf_counter() - t0)
