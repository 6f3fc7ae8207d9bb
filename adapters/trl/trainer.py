"""``MetaGRPOTrainer``: TRL's ``GRPOTrainer`` with the rollout temperature chosen by a meta-policy.

One decision per *generation batch*: TRL generates once every ``steps_per_generation *
num_iterations`` training steps and reuses the batch in between, so the meta-policy decides when
TRL generates, and its choice holds for every pass over that batch (a
:class:`~.window.GenerationWindow`). A global policy sets one value for every row: it is written
to every place TRL keeps the knob (:mod:`.seam`), so the rollouts and the old, reference and
current log-probs all use it. A per-prompt policy (``policy.spec.per_context``, with
``meta_context_column``) gives every prompt group its own temperature: generation runs at T = 1
with a per-row logits processor (with vLLM: one ``SamplingParams`` per row colocated, one server
request per distinct temperature), and TRL's log-prob passes run once per distinct temperature.

A policy over ``top_p``, ``top_k``, ``min_p`` or a joint grid works the same way: the chosen
setting is written where TRL keeps each knob; the knobs it does not own stay at the user's values
and are held fixed when its candidates are scored, in the engine's order of operations; TRL's own
loss keeps its temperature-only log-probs.

The meta update happens in the same call, right after TRL has scored the batch: the candidate
likelihoods come from :mod:`.scoring` (fast path: hidden states captured during the old-logprob
pass when TRL makes one, else during generation; exact path: one extra no-grad forward) or
:mod:`.fused`, the advantages and rewards from TRL. The feedback is gathered across ranks in rank
order and built by :func:`metactl.build_feedback`; every rank updates its own copy of the policy
identically, so the next selection agrees on every rank (checked with a broadcast from rank 0).

Before the update, the effective-temperature check (``temperature_check``, on by default)
estimates the temperature the batch's tokens were actually sampled at
(:func:`metactl.effective_temperature`), from raw logits the scoring path already forms (the
fast path's windows, the fused path's tiles, the exact path's forward; from the captured hidden
states times the LM head when the rule scores nothing), against the setting that really sampled
(the decision plus the knobs TRL holds fixed; one temperature per prompt group for per-prompt
decisions; vLLM's order of truncations), and stops the run (or warns) when the sampler ignored it.

Example:
    >>> import metactl
    >>> from metactl.adapters.trl import MetaGRPOTrainer
    >>> from metactl.adapters.trl.testing import (addition_dataset, digit_count_reward,
    ...     tiny_grpo_config, tiny_model_dir)
    >>> path = str(tiny_model_dir())
    >>> trainer = MetaGRPOTrainer(model=path, reward_funcs=digit_count_reward,
    ...     args=tiny_grpo_config("metactl_doc_run", max_steps=2),
    ...     train_dataset=addition_dataset(32), meta_policy=metactl.tampo(seed=0))
    >>> _ = trainer.train()  # prints TRL's logs, metactl/* metrics included
    {...'metactl/temperature': ...}
    >>> [round(h["value"], 1) in trainer.meta_policy.candidates for h in trainer.meta_history]
    [True, True]
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal, cast

import numpy as np
import torch

import metactl
from metactl._validation import finite_scalar
from metactl.distributed import assert_same_choice, torch_collectives
from metactl.effective_temperature import (
    CHECK_MODES,
    DEFAULT_OUTSIDE,
    DEFAULT_RTOL,
    DEFAULT_Z,
    EffectiveTemperatureWarning,
    TemperatureEstimate,
    check_effective_temperature,
    effective_temperature,
)
from metactl.feedback import FEEDBACK_NAMES, TrainerSupport, build_feedback, check_trainer
from metactl.knobs import KNOBS, Setting, SettingRows, check_knob

from .checkpoint import (
    MetaState,
    check_meta_state,
    meta_state_dict,
    read_meta_state,
    write_meta_state,
)
from .fused import FusedLogitsCapture
from .guards import (
    check_continuous_batching,
    check_generation_settings,
    check_per_row_settings,
    check_transformers_version,
    check_trl_version,
    unmodelled_setting,
)
from .scoring import (
    DEFAULT_CHECK_BYTES,
    DEFAULT_WINDOW_BYTES,
    CandidateScoring,
    HiddenCapture,
    LikelihoodResult,
    RawLogits,
    ScoringPath,
    candidate_loglik_exact,
    candidate_loglik_from_hidden,
    check_positions,
    dense_head,
    raw_logits_exact,
    raw_logits_from_hidden,
)
from .seam import (
    FusedHead,
    GeneratedBatch,
    GRPOSeam,
    LogProbPass,
    batch_reward,
    carry_row_temperatures,
    check_per_row_config,
    check_per_row_paths,
    find_trainer_heads,
    generate_fills,
    generates_with_model_generate,
    generation_settings,
    log_metric,
    makes_old_logprob_pass,
    output_embeddings,
    policy_target,
    row_temperature_generation,
    set_trainer_setting,
    trainer_knobs,
    uses_continuous_batching,
    uses_vllm,
)
from .window import GenerationWindow, context_keys, prompt_contexts

__all__ = ["DEFAULT_HISTORY_SIZE", "MetaGRPOTrainer", "trainer_support"]

logger = logging.getLogger(__name__)

#: The default most entries ``meta_history`` keeps.
DEFAULT_HISTORY_SIZE = 1000


def trainer_support(per_context: bool) -> TrainerSupport:
    """What ``MetaGRPOTrainer`` gives a rule (:class:`metactl.TrainerSupport`).

    Every feedback (candidate log-likelihoods summed or length-normalised, TRL's advantages,
    the rewards of every completion, the batch reward, the entropy at the sampled temperature,
    the vocabulary size, ``num_generations`` as the group size), every knob, decisions per
    prompt group, and no context features. With per-prompt decisions (``per_context``) each row
    has its own temperature (a logits processor, or vLLM's per-request sampling parameters): the
    temperature is the only knob, and the entropy (computed at one temperature) is not given.

    Example:
        >>> trainer_support(per_context=True).knobs
        ('temperature',)
    """
    if per_context:
        return TrainerSupport(
            "MetaGRPOTrainer with a per-prompt meta_policy",
            feedback=tuple(name for name in FEEDBACK_NAMES if name != "entropy"),
            knobs=("temperature",),
            per_context=True,
            features=False,
        )
    return TrainerSupport(
        "MetaGRPOTrainer", feedback=FEEDBACK_NAMES, knobs=KNOBS, per_context=True, features=False
    )


def _completion_advantages(batch: GeneratedBatch, scored: np.ndarray | None) -> np.ndarray:
    """TRL's advantages of the batch (one per completion) as float64.

    ``scored``: which completions have a scored token (``None`` when no likelihood was
    computed). A completion with no scored token (mask_truncated_completions, tool-only)
    carries no likelihood; TRL leaves it out of the loss, and weight 0 leaves it out here.
    """
    advantages = batch.advantages.detach().float().cpu().numpy().astype(np.float64)
    if advantages.ndim != 1:
        raise ValueError(
            "MetaGRPOTrainer needs one advantage per completion (shape (N,)); got shape "
            f"{advantages.shape}"
        )
    return advantages if scored is None else np.where(scored, advantages, 0.0)


class MetaGRPOTrainer(GRPOSeam):
    """``GRPOTrainer`` whose rollout temperature (or ``top_p``, ``top_k``, ``min_p``, or a joint
    setting of them) is chosen per generation batch, or per prompt group, by ``meta_policy``.

    All ``GRPOTrainer`` arguments are accepted unchanged; for a knob the policy owns,
    ``GRPOConfig``'s value becomes the *evaluation* value (evaluation samples and scores at it and
    never updates the policy); knobs it does not own stay at the user's values and are held
    fixed when the candidates are scored (the guard matrix of :mod:`.guards` says which are
    accepted).

    Args:
        meta_policy: a :class:`metactl.MetaPolicy` over the temperature, ``top_p``, ``top_k``,
            ``min_p`` or a joint grid (default :func:`metactl.tampo`). Give every rank the same
            seed. A rule the trainer cannot feed is refused here (:func:`trainer_support`).
        likelihood: ``"fast"`` (default; no extra transformer forward: hidden states are captured
            during TRL's old-logprob pass when it makes one, else during generation, and the LM head
            is applied window by window), ``"fused"`` (when TRL makes an old-logprob pass, the
            candidates are folded into the logit tiles of TRL's own fused log-prob head while they
            exist: no extra matmul; otherwise as ``"fast"``) or ``"exact"`` (one extra no-grad
            scoring forward). Only used when the rule needs likelihoods or entropies.
        check_sync: on multi-process runs, check at every selection that all ranks chose the
            same as rank 0 (one tiny broadcast).
        loglik_window_bytes: memory bound of one window of logits on the fast path.
        allow_missing_meta_state: on ``train(resume_from_checkpoint=...)``, a checkpoint
            without ``metactl_state.json`` is an error (``FileNotFoundError``) unless this is
            True; then the meta-policy keeps its current state (a warning is logged).
        meta_context_column: with a per-prompt policy (``policy.spec.per_context``), the
            ``train_dataset`` column holding each prompt's stable ``int``/``str`` context key
            (required then, refused for a global policy). Every prompt group is then sampled and
            scored at its own temperature.
        meta_history_size: the most entries ``meta_history`` keeps (the oldest are dropped);
            the history is saved with every checkpoint and restored on a resume.
        temperature_check: after every training generation batch, estimate the temperature
            its completion tokens were sampled at (:mod:`metactl.effective_temperature`) and,
            when it departs from the setting that should have sampled them, ``"error"``
            (default: raise ``ValueError`` before the policy learns from the batch), ``"warn"``
            (an ``EffectiveTemperatureWarning``; the run goes on) or ``"off"`` (no estimate).
            The raw logits come from the scoring path's own windows, tiles or forward (no extra
            transformer forward; a rule that scores nothing gets hidden states captured from
            TRL's old-logprob pass or the generation, times the LM head). Generation settings
            no likelihood family models (``repetition_penalty != 1``, ..., allowed for rules
            without likelihoods) turn it off, with a warning.
        temperature_check_rtol, temperature_check_z, temperature_check_max_outside: the
            check's tolerances (``check_effective_temperature``'s ``rtol``, ``z_threshold``,
            ``max_outside``; the defaults are calibrated on SmolLM2-135M-Instruct).
        temperature_check_bytes: memory bound on the float32 raw logits the check keeps per
            batch and rank; beyond it, evenly spaced scored positions (at least one).

    Attributes:
        meta_history: one dict per generation batch (the last ``meta_history_size``):
            ``policy_step``, ``global_step``, ``value``, ``probs`` (after the update),
            ``candidate_advantages``, ``likelihood_path``, ``reward`` (TRL's mean reward of the
            batch, all ranks); for a global decision ``setting`` (``{knob: value}``) and
            ``index``; for per-prompt decisions ``value`` is the mean over the prompts and
            ``contexts``, ``values``, ``indices`` give each prompt's decision;
            ``effective_temperature`` (with the check on): the estimate (the
            ``TemperatureEstimate`` fields, of the rank with the largest departure; ``None``
            for a value that is not finite) and ``ok``, the check's verdict.
        eval_temperature: the temperature used during evaluation (``args.temperature``).
        eval_setting: the owned knobs' values during evaluation (``GRPOConfig``'s).
        meta_scoring: how the candidates are scored (family, fixed knobs, engine order, labels).
        meta_seconds: wall time spent in the meta-policy work (selection, scoring, update,
            the temperature check).
        meta_check_seconds: the part of ``meta_seconds`` spent in the temperature check (the
            estimate, and the raw logits where no scoring forms them).

    Logged metrics (TRL's, so every TRL logger sees them): ``metactl/<knob>`` for every knob
    of a global decision (``metactl/temperature``, ``metactl/top_p``, ...) and
    ``metactl/decision_prob``; for per-prompt decisions ``metactl/temperature`` (the mean),
    ``metactl/temperature_min`` and ``metactl/temperature_max``;
    ``metactl/effective_temperature`` (the estimated sampling temperature) and
    ``metactl/effective_temperature_z`` (its likelihood-ratio z, about N(0, 1) when the batch
    was sampled as intended) with the check on; and ``metactl/prob/<label>``,
    ``metactl/candidate_advantage/<label>`` (``<label>``: the value, or
    ``temperature=0.7,top_p=0.9`` for a joint grid).
    """

    def __init__(
        self,
        *args: Any,
        meta_policy: metactl.MetaPolicy | None = None,
        likelihood: Literal["fast", "fused", "exact"] = "fast",
        check_sync: bool = True,
        loglik_window_bytes: int = DEFAULT_WINDOW_BYTES,
        allow_missing_meta_state: bool = False,
        meta_context_column: str | None = None,
        meta_history_size: int = DEFAULT_HISTORY_SIZE,
        temperature_check: Literal["error", "warn", "off"] = "error",
        temperature_check_rtol: float = DEFAULT_RTOL,
        temperature_check_z: float = DEFAULT_Z,
        temperature_check_max_outside: float = DEFAULT_OUTSIDE,
        temperature_check_bytes: int = DEFAULT_CHECK_BYTES,
        **kwargs: Any,
    ) -> None:
        check_trl_version()
        check_transformers_version()
        policy = metactl.tampo() if meta_policy is None else meta_policy
        if not isinstance(policy, metactl.MetaPolicy):
            raise TypeError(
                f"meta_policy must be a metactl.MetaPolicy, got {type(policy).__name__}"
            )
        spec = policy.spec
        check_trainer(policy, trainer_support(spec.per_context))
        if likelihood not in ("fast", "fused", "exact"):
            raise ValueError(f"likelihood must be 'fast', 'fused' or 'exact', got {likelihood!r}")
        for name, flag in (
            ("check_sync", check_sync),
            ("allow_missing_meta_state", allow_missing_meta_state),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        for name, number, minimum in (
            ("loglik_window_bytes", loglik_window_bytes, 1),
            ("meta_history_size", meta_history_size, 0),
            ("temperature_check_bytes", temperature_check_bytes, 1),
        ):
            if isinstance(number, bool) or not isinstance(number, int):
                raise TypeError(f"{name} must be an int, got {type(number).__name__}")
            if number < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {number}")
        if not isinstance(temperature_check, str) or temperature_check not in CHECK_MODES:
            raise ValueError(
                f"temperature_check must be one of {list(CHECK_MODES)}, got {temperature_check!r}"
            )
        check_rtol = finite_scalar(temperature_check_rtol, "temperature_check_rtol")
        check_z = finite_scalar(temperature_check_z, "temperature_check_z")
        check_outside = finite_scalar(temperature_check_max_outside,
                                      "temperature_check_max_outside")  # fmt: skip
        if check_rtol <= 0:
            raise ValueError(f"temperature_check_rtol must be > 0, got {check_rtol}")
        if check_z < 0:
            raise ValueError(f"temperature_check_z must be >= 0, got {check_z}")
        if not 0.0 <= check_outside <= 1.0:
            raise ValueError(
                f"temperature_check_max_outside must lie in [0, 1], got {check_outside}"
            )
        if meta_context_column is not None and not isinstance(meta_context_column, str):
            raise TypeError(
                "meta_context_column must be a str (a dataset column) or None, got "
                f"{type(meta_context_column).__name__}"
            )
        if spec.per_context and meta_context_column is None:
            raise ValueError(
                f"a per-prompt meta_policy ({policy.rule.name}) needs one stable context key per "
                "prompt, and TRL does not hand the dataset index to the trainer: pass "
                "meta_context_column='<column>' naming a train_dataset column that holds a stable "
                "int or str id per prompt (e.g. dataset.add_column('prompt_id', "
                "range(len(dataset))))"
            )
        if not spec.per_context and meta_context_column is not None:
            raise ValueError(
                f"meta_context_column={meta_context_column!r} is given, but {policy.rule.name} "
                "decides once per generation batch (a global meta_policy), so the column would be "
                "ignored: use a per-prompt policy (metactl.ptgs, metactl.tampo_per_prompt) or drop "
                "meta_context_column"
            )
        if spec.per_context:  # before TRL builds its vLLM engine
            check_per_row_config(kwargs.get("args", args[2] if len(args) > 2 else None))
        if spec.per_context and likelihood == "fused":
            raise ValueError(
                "likelihood='fused' cannot carry a temperature per prompt group (the candidates "
                "are folded into one scalar-temperature pass of TRL's fused head); use "
                "likelihood='fast' or 'exact' with a per-prompt meta_policy"
            )
        self.meta_policy = policy
        self._spec = spec  # fixed by the rule: read once
        self.likelihood = likelihood
        self.check_sync = check_sync
        self.loglik_window_bytes = loglik_window_bytes
        self.allow_missing_meta_state = allow_missing_meta_state
        self.meta_context_column = meta_context_column
        self.meta_history_size = meta_history_size
        self.temperature_check = temperature_check
        self.temperature_check_rtol = check_rtol
        self.temperature_check_z = check_z
        self.temperature_check_max_outside = check_outside
        self.temperature_check_bytes = temperature_check_bytes
        self.meta_history: list[dict[str, Any]] = []
        self.meta_seconds = 0.0
        self.meta_check_seconds = 0.0
        # the window of the buffered generation batch (None before the first one)
        self._window: GenerationWindow | None = None
        # (checkpoint folder, validated state or None) read by train() before TRL loads anything
        self._pending_state: tuple[str, MetaState | None] | None = None
        self._collective_fns: tuple[Any, Any] | None = None
        super().__init__(*args, **kwargs)
        self._post_init_checks(spec.per_context)

    def _post_init_checks(self, per_context: bool) -> None:
        """The checks that need TRL's configuration; sets the evaluation setting and scoring."""
        config: Any = self.args  # a GRPOConfig
        self.eval_temperature = float(check_knob("temperature", config.temperature,
                                                 "GRPOConfig.temperature"))  # fmt: skip
        settings = generation_settings(self)
        knobs = self.meta_policy.knobs
        needs_likelihood = self._spec.needs_loglik
        check_generation_settings(
            settings,
            generation_kwargs=config.generation_kwargs,
            needs_likelihood=needs_likelihood,
            owned=knobs,
        )
        if uses_continuous_batching(self):
            check_continuous_batching(settings, owned=knobs, needs_likelihood=needs_likelihood)
        self._heads: list[FusedHead] = find_trainer_heads(self)
        if generates_with_model_generate(self):  # what generate fills into unset fixed knobs
            fixed = tuple(k for k in ("top_p", "top_k", "min_p") if k not in knobs)
            settings = generate_fills(self, settings, fixed)
        settings["temperature"] = self.eval_temperature
        #: the setting evaluation samples at: GRPOConfig's values (for a knob the policy owns
        #: besides the temperature, its off value: the guards require it)
        self.eval_setting: dict[str, Any] = {knob: settings.get(knob) for knob in knobs}
        order = "vllm" if uses_vllm(self) else "hf"
        self.meta_scoring = CandidateScoring.for_policy(self.meta_policy, settings, order=order)
        #: whether the temperature check runs (``temperature_check`` unless the generation
        #: settings reshape the distribution beyond what the estimate models)
        self._checking = self.temperature_check != "off"
        unmodelled = unmodelled_setting(settings)
        if self._checking and unmodelled is not None:
            self._checking = False
            logger.warning(
                "metactl: the effective-temperature check is off for this run: %s reshapes "
                "the sampling distribution beyond temperature, top_p, top_k and min_p, which "
                "the estimate models",
                unmodelled,
            )
        if per_context:
            check_per_row_paths(self)
            check_per_row_settings(settings)
            self._check_context_column()

    def _check_context_column(self) -> None:
        dataset = getattr(self, "train_dataset", None)
        columns = getattr(dataset, "column_names", None)
        if columns is not None and self.meta_context_column not in columns:
            raise ValueError(
                f"meta_context_column={self.meta_context_column!r} is not a column of "
                f"train_dataset (columns: {sorted(columns)}); add a stable int or str id per "
                "prompt and name it"
            )

    # ------------------------------------------------------------------ sampler setting
    def set_sampling(self, setting: dict[str, Any]) -> None:
        """Write every knob of ``setting`` (``{knob: value}``) where TRL keeps it."""
        set_trainer_setting(self, setting, self._heads)

    def temperatures(self) -> dict[str, float]:
        """Every temperature the trainer currently holds, by place (they are always equal)."""
        return trainer_knobs(self, "temperature", self._heads)

    def knob_values(self, knob: str) -> dict[str, Any]:
        """Every value of ``knob`` the trainer currently holds, by place (always equal)."""
        return trainer_knobs(self, knob, self._heads)

    # ------------------------------------------------------------------ collectives
    def _collectives(self) -> tuple[Any, Any]:
        if self._collective_fns is None:
            self._collective_fns = torch_collectives()
        return self._collective_fns

    @property
    def _multi_process(self) -> bool:
        return self.accelerator.num_processes > 1

    @property
    def _group_size(self) -> int:
        """Completions per prompt in a training batch (consecutive rows)."""
        return int(self.num_generations)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ one generation batch
    def _meta_training_batch(
        self, inputs: list[dict[str, Any]], generate: Callable[[list[dict[str, Any]]], Any]
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        decision = self._select(inputs)
        window = GenerationWindow.open(
            decision,
            per_prompt=self._spec.per_context,
            group_size=self._group_size,
            first_row=self.accelerator.process_index * len(inputs),
            rows=len(inputs),
        )
        self.set_sampling(window.trl_setting)
        if self._spec.needs_scoring:
            window.path = self._scoring_path()
        elif self._checking:
            window.path = self._check_path()
        if window.path is not None:
            window.capture = self._capture(window.path, decision)
        self._window = window
        self.meta_seconds += time.perf_counter() - t0
        with window.generation():
            output = generate(inputs)
        t1 = time.perf_counter()
        if window.row_temperatures is not None:
            carry_row_temperatures(output, window.row_temperatures)
        self._update_policy(decision, output, window.capture, window.path)
        self.meta_seconds += time.perf_counter() - t1
        if isinstance(window.capture, FusedLogitsCapture):
            self.meta_seconds += window.capture.seconds  # the fold ran inside TRL's own pass
        return output

    def _select(self, inputs: list[dict[str, Any]]) -> metactl.Decision | metactl.DecisionBatch:
        """The policy's decision for the batch: one for all rows, or one per prompt group (the
        groups of ``num_generations`` rows are contiguous in rank order and may span ranks)."""
        decision: metactl.Decision | metactl.DecisionBatch
        if self._spec.per_context:
            column = str(self.meta_context_column)
            keys = context_keys(inputs, column)
            if self._multi_process:
                from accelerate.utils import gather_object

                keys = list(gather_object(keys))
            contexts = prompt_contexts(keys, self._group_size, column)
            decision = self.meta_policy.select(contexts=contexts)
        else:
            decision = self.meta_policy.select()
        if self.check_sync and self._multi_process:
            assert_same_choice(decision, self._collectives()[1])
        return decision

    def _scoring_path(self) -> ScoringPath:
        """Where this generation batch's candidate likelihoods come from."""
        if self.likelihood == "exact":
            return "exact"
        if makes_old_logprob_pass(self):
            # score inside TRL's fused head, or capture the hidden states of its pass
            return "fused" if self.likelihood == "fused" else "old"
        return "generate" if generates_with_model_generate(self) else "exact"

    def _check_path(self) -> ScoringPath:
        """Where the temperature check's raw logits come from when the rule scores nothing: a
        pass TRL makes anyway (its old-logprob pass, else the generation), or, when neither
        runs the policy (a rollout function, vLLM without importance sampling), a forward."""
        if makes_old_logprob_pass(self):
            return "old"
        return "generate" if generates_with_model_generate(self) else "exact"

    def _capture(
        self, path: ScoringPath, decision: metactl.Decision | metactl.DecisionBatch
    ) -> HiddenCapture | FusedLogitsCapture | None:
        """What records the candidate likelihoods during TRL's own passes on ``path``."""
        if path in ("old", "generate"):
            backbone = getattr(policy_target(self.model), self._heads[0].backbone_attr)
            return HiddenCapture(backbone, "old" if path == "old" else "generate")
        if path == "fused":
            return FusedLogitsCapture(
                self.meta_scoring,
                entropy_temperature=self._entropy_temperature(decision),
                check_bytes=self.temperature_check_bytes if self._checking else None,
            )
        return None

    def _entropy_temperature(
        self, decision: metactl.Decision | metactl.DecisionBatch
    ) -> float | None:
        """The sampled temperature, when the rule needs the entropy there (global decisions)."""
        if "entropy" not in self._spec.feedback:
            return None
        return float(decision.setting["temperature"])  # type: ignore[union-attr]

    # ------------------------------------------------------------------ inside TRL's batch
    @contextlib.contextmanager
    def _meta_generation(self) -> Iterator[None]:
        window = self._window
        with contextlib.ExitStack() as stack:
            if window is not None and window.generating:
                if window.row_temperatures is not None:
                    stack.enter_context(
                        row_temperature_generation(
                            self, window.row_temperatures, window.group_temperatures
                        )
                    )
                capture = window.capture
                if isinstance(capture, HiddenCapture) and capture.mode == "generate":
                    stack.enter_context(capture.recording())
            yield

    def _meta_log_prob_pass(self, call: LogProbPass) -> Any:
        window = self._window
        if window is None:
            return call.run()
        rows = window.pass_rows
        capture = window.old_pass_capture(call.model is self.model)

        def run() -> Any:
            if rows is None:
                return call.run()
            contiguous = window.generating and window.capture is not None
            return call.run_per_row(rows, self._heads, contiguous=contiguous)

        if capture is None:
            return run()
        recording: contextlib.AbstractContextManager[None]
        if isinstance(capture, FusedLogitsCapture):
            recording = capture.recording(
                call.input_ids, call.attention_mask, call.logits_to_keep, call.batch_size
            )
        else:
            recording = capture.recording(keep=call.logits_to_keep)
        with recording:
            return run()

    def _meta_rewards(self, rewards_per_func: torch.Tensor) -> None:
        window = self._window
        if window is not None and window.generating:
            window.rewards_per_func = rewards_per_func.detach()

    def _meta_loss_rows(self, rows: torch.Tensor | None) -> contextlib.AbstractContextManager[None]:
        if rows is None:
            return contextlib.nullcontext()
        if self._window is None:
            raise RuntimeError(
                "metactl: a batch carries per-row temperatures but no generation window is open"
            )
        return self._window.loss(rows)

    # ------------------------------------------------------------------ feedback and update
    def _score(
        self,
        decision: metactl.Decision | metactl.DecisionBatch,
        output: dict[str, Any],
        capture: HiddenCapture | FusedLogitsCapture | None,
        path: ScoringPath,
    ) -> tuple[LikelihoodResult, ScoringPath]:
        """The candidate likelihoods of the batch on ``path`` (``capture``: what recorded them),
        and the path actually used (an extra forward when the capture does not line up)."""
        batch = GeneratedBatch.read(output)
        tokens, mask = batch.completion_ids, batch.scored_mask
        ent_t = self._entropy_temperature(decision)
        keep = self._check_positions(mask)
        if isinstance(capture, FusedLogitsCapture):
            fused = capture.result(tokens, mask)
            if fused is not None:
                return fused, path
            logger.warning(
                "metactl: scoring inside TRL's fused head failed (%s); scoring this batch with "
                "an extra forward (likelihood='exact')",
                capture.failure,
            )
            capture = None
        if capture is not None:
            hidden = self._aligned_hidden(capture, tokens, mask)
            if hidden is not None:
                head = self._heads[0]
                weight, bias, head_fn = dense_head(output_embeddings(self.model))
                return candidate_loglik_from_hidden(
                    hidden,
                    tokens,
                    mask,
                    weight,
                    bias,
                    self.meta_scoring,
                    logit_scale=head.logit_scale,
                    softcap=head.softcap,
                    entropy_temperature=ent_t,
                    window_bytes=self.loglik_window_bytes,
                    head=head_fn,
                    keep=keep,
                ), path
            logger.warning(
                "metactl: the %s-pass hidden states did not line up with the completions; "
                "scoring this batch with an extra forward (likelihood='exact')",
                path,
            )
        input_ids = torch.cat([batch.prompt_ids, tokens], dim=1)
        attention_mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
        result = candidate_loglik_exact(
            self.model,
            input_ids,
            attention_mask,
            tokens,
            mask,
            self.meta_scoring,
            batch_size=self.args.per_device_train_batch_size,
            entropy_temperature=ent_t,
            autocast=self.accelerator.autocast,
            keep=keep,
        )
        return result, "exact"

    def _check_positions(self, mask: torch.Tensor) -> torch.Tensor | None:
        """The scored positions whose raw logits the temperature check reads (``None``: off)."""
        if not self._checking:
            return None
        vocab = int(output_embeddings(self.model).weight.shape[0])
        return check_positions(mask, vocab, self.temperature_check_bytes)

    def _raw_logits(
        self, output: dict[str, Any], capture: HiddenCapture | FusedLogitsCapture | None
    ) -> RawLogits:
        """The temperature check's raw logits when the rule scores nothing: the captured hidden
        states times the LM head, or (nothing captured) a forward of the policy."""
        batch = GeneratedBatch.read(output)
        tokens, mask = batch.completion_ids, batch.scored_mask
        keep = self._check_positions(mask)
        assert keep is not None  # only called with the check on
        if isinstance(capture, HiddenCapture):
            hidden = self._aligned_hidden(capture, tokens, mask)
            if hidden is not None:
                head = self._heads[0]
                weight, bias, head_fn = dense_head(output_embeddings(self.model))
                return raw_logits_from_hidden(hidden, keep, weight, bias,
                                              logit_scale=head.logit_scale, softcap=head.softcap,
                                              head=head_fn)  # fmt: skip
            logger.warning(
                "metactl: the %s-pass hidden states did not line up with the completions; the "
                "temperature check reads this batch's logits from an extra forward",
                capture.mode,
            )
        return raw_logits_exact(
            self.model,
            torch.cat([batch.prompt_ids, tokens], dim=1),
            torch.cat([batch.prompt_mask, batch.completion_mask], dim=1),
            tokens,
            keep,
            batch_size=self.args.per_device_train_batch_size,
            autocast=self.accelerator.autocast,
        )

    @staticmethod
    def _aligned_hidden(
        capture: HiddenCapture, tokens: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor | None:
        """The captured ``(N, C, H)`` hidden states, or ``None`` if they cannot be aligned."""
        if not capture.parts:
            return None
        hidden = capture.hidden()
        n, c = tokens.shape
        if hidden.shape[0] != n:
            return None
        steps = hidden.shape[1]
        if steps >= c:
            return hidden[:, :c]
        if bool(mask[:, steps:].any()):
            return None
        pad = hidden.new_zeros((n, c - steps, hidden.shape[2]))
        return torch.cat([hidden, pad], dim=1)

    def _gathered(self, local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every rank's rows of each array, concatenated in rank order (TRL's row order)."""
        if not self._multi_process or not local:
            return local
        all_gather = self._collectives()[0]
        return {
            name: np.concatenate([np.asarray(p) for p in all_gather(array)], axis=0)
            for name, array in local.items()
        }

    def _update_policy(
        self,
        decision: metactl.Decision | metactl.DecisionBatch,
        output: dict[str, Any],
        capture: HiddenCapture | FusedLogitsCapture | None,
        path: ScoringPath | None,
    ) -> ScoringPath | None:
        """Score the batch, build the feedback the rule needs (every rank's rows, in rank order)
        and update the policy; returns the scoring path used."""
        spec = self._spec
        needs = set(spec.feedback)
        local: dict[str, np.ndarray] = {}
        path_used: ScoringPath | None = None
        scored: np.ndarray | None = None
        raw: RawLogits | None = None
        if path is not None and not spec.needs_scoring:  # the check's logits only
            start = time.perf_counter()
            raw = self._raw_logits(output, capture)
            self.meta_check_seconds += time.perf_counter() - start
        elif path is not None:
            result, path_used = self._score(decision, output, capture, path)
            raw = result.raw
            counts = result.counts.cpu().numpy().astype(np.float64)
            scored = counts > 0
            if "loglik" in needs:
                local["loglik_sum"] = result.loglik_sum.cpu().numpy()
                local["token_counts"] = counts
            if "entropy" in needs:
                local["entropy"] = np.array([[float(result.entropy_sum or 0.0), counts.sum()]])
        check = self._check_temperature(output, raw) if self._checking else None
        if "advantages" in needs:
            local["advantages"] = _completion_advantages(
                GeneratedBatch.read(output), scored if "loglik" in needs else None
            )
        rows = self._gathered(local)
        entropy = rows["entropy"].sum(axis=0) if "entropy" in rows else None
        window = self._window
        reward = batch_reward(self) if "reward" in needs else None
        feedback = build_feedback(
            spec,
            loglik_sum=rows.get("loglik_sum"),
            token_counts=rows.get("token_counts"),
            advantages=rows.get("advantages"),
            rewards=(
                window.row_rewards(self.reward_weights)
                if "rewards" in needs and window is not None
                else None
            ),
            reward=reward,
            entropy_sum=None if entropy is None else float(entropy[0]),
            entropy_tokens=None if entropy is None else max(float(entropy[1]), 1.0),
            vocab_size=(
                int(output_embeddings(self.model).weight.shape[0])
                if "vocab_size" in needs
                else None
            ),
            group_size=self._group_size if "group_size" in needs else None,
        )
        info = self.meta_policy.update(decision, feedback)
        self._record(decision, info, path_used, check)
        return path_used

    # ------------------------------------------------------------------ the temperature check
    def _sampled_setting(self, rows: torch.Tensor) -> Setting | SettingRows:
        """The setting that should have sampled the positions of batch rows ``rows``: the
        window's decision plus the knobs TRL holds fixed, or each row's temperature."""
        window = self._window
        assert window is not None
        fixed = self.meta_scoring.setting
        if window.row_temperatures is not None:
            temps = window.row_temperatures.detach().cpu().double()[rows.cpu()]
            return fixed.rows(int(rows.numel()), temperature=temps.numpy())
        assert window.setting is not None
        return fixed.with_values(window.setting)

    def _check_temperature(
        self, output: dict[str, Any], raw: RawLogits | None
    ) -> dict[str, Any] | None:
        """Estimate the temperature the batch was sampled at and check it (before the policy
        learns from the batch). Every rank gets the estimate of the rank that departs most, so
        all ranks log, warn or raise alike. Returns the ``meta_history`` record (``None``: no
        scored token on any rank)."""
        start = time.perf_counter()
        estimate: TemperatureEstimate | None = None
        if raw is not None:
            batch = GeneratedBatch.read(output)
            raw = raw.restricted(batch.scored_mask)
            if raw.logits.shape[0] > 0:
                estimate = effective_temperature(
                    raw.logits,
                    raw.tokens(batch.completion_ids),
                    temperature=self._sampled_setting(raw.rows()),
                    order=self.meta_scoring.order,
                )
        estimate, rank = self._worst_estimate(estimate)
        self.meta_check_seconds += time.perf_counter() - start
        if estimate is None:
            return None
        ok = check_effective_temperature(estimate, mode="off", **self._check_tolerances())
        log_metric(self, "train", "metactl/effective_temperature", estimate.temperature)
        log_metric(self, "train", "metactl/effective_temperature_z", estimate.z_lr)
        if not ok:
            self._report_departure(estimate, rank)
        record = {
            name: value if not isinstance(value, float) or math.isfinite(value) else None
            for name, value in estimate.to_dict().items()
        }  # JSON-safe for the checkpoint: an estimate beyond the range (inf) or none (nan)
        return {**record, "ok": ok}

    def _check_tolerances(self) -> dict[str, float]:
        return {
            "rtol": self.temperature_check_rtol,
            "z_threshold": self.temperature_check_z,
            "max_outside": self.temperature_check_max_outside,
        }

    def _worst_estimate(
        self, local: TemperatureEstimate | None
    ) -> tuple[TemperatureEstimate | None, int]:
        """The estimate of the rank that departs most (a failing one first, then the largest
        ``|z_lr|``), and that rank; the local estimate on one process."""
        if not self._multi_process:
            return local, 0
        fields = ("temperature", "intended", "ratio", "z", "z_lr", "tokens", "outside")
        row = np.full(len(fields) + 1, np.nan)
        if local is not None:
            row[0] = 1.0
            row[1:] = [float(getattr(local, name)) for name in fields]
        parts = [np.asarray(p, dtype=np.float64) for p in self._collectives()[0](row)]
        best: tuple[TemperatureEstimate | None, int] = (None, 0)
        best_key = (-1.0, -math.inf)
        for rank, part in enumerate(parts):
            if not part[0] == 1.0:
                continue
            values = dict(zip(fields, part[1:].tolist(), strict=True))
            values["tokens"], values["outside"] = int(values["tokens"]), int(values["outside"])
            est = TemperatureEstimate(**values)
            failing = not check_effective_temperature(est, mode="off", **self._check_tolerances())
            key = (float(failing), abs(est.z_lr) if math.isfinite(est.z_lr) else math.inf)
            if key > best_key:
                best, best_key = (est, rank), key
        return best

    def _report_departure(self, estimate: TemperatureEstimate, rank: int) -> None:
        """Raise or warn (``temperature_check``) with the check's message and the batch."""
        try:
            check_effective_temperature(estimate, mode="error", **self._check_tolerances())
        except ValueError as exc:
            where = f" on rank {rank}" if self._multi_process else ""
            message = (
                f"metactl: the training generation batch of policy step {self.meta_policy.step}"
                f" (global step {self.state.global_step}){where}: {exc}. MetaGRPOTrainer "
                "wrote the chosen setting where TRL keeps it, so something sampled past it; "
                "temperature_check='warn' or 'off' lets the run go on"
            )
            if self.temperature_check == "error":
                raise ValueError(message) from None
            warnings.warn(message, EffectiveTemperatureWarning, stacklevel=2)

    def _record(
        self,
        decision: metactl.Decision | metactl.DecisionBatch,
        info: metactl.UpdateInfo,
        path: ScoringPath | None,
        check: dict[str, Any] | None = None,
    ) -> None:
        """Log the decision and the update to TRL's metrics and ``meta_history`` (with the
        temperature check's record, when it ran)."""
        entry: dict[str, Any] = {
            "policy_step": int(decision.step),
            "global_step": int(self.state.global_step),
        }
        if self._spec.per_context:  # one temperature per prompt group
            batch = cast(metactl.DecisionBatch, decision)
            values = [float(v) for v in batch.values]
            entry["value"] = float(np.mean(values))
            log_metric(self, "train", "metactl/temperature", entry["value"])
            log_metric(self, "train", "metactl/temperature_min", min(values))
            log_metric(self, "train", "metactl/temperature_max", max(values))
            entry["contexts"] = list(batch.contexts or ())
            entry["values"] = values
            entry["indices"] = [int(i) for i in batch.indices]
        else:
            decision = cast(metactl.Decision, decision)
            setting = decision.setting
            for knob, value in setting.items():
                log_metric(self, "train", f"metactl/{knob}", float(value))
            log_metric(self, "train", "metactl/decision_prob", decision.prob)
            entry["value"] = decision.value
            entry["setting"] = setting
            entry["index"] = decision.index
        labels = self.meta_scoring.labels()
        for label, prob in zip(labels, info.probs, strict=True):
            log_metric(self, "train", f"metactl/prob/{label}", float(prob))
        adv = info.candidate_advantages
        if adv is not None:
            for label, a in zip(labels, adv, strict=True):
                log_metric(self, "train", f"metactl/candidate_advantage/{label}", float(a))
        reward = batch_reward(self)
        entry.update(
            {
                "probs": [float(p) for p in info.probs],
                "candidate_advantages": None if adv is None else [float(a) for a in adv],
                "likelihood_path": path,
                "reward": reward if reward is not None and math.isfinite(reward) else None,
            }
        )
        if check is not None:
            entry["effective_temperature"] = check
        self._remember(entry)

    def _remember(self, entry: dict[str, Any]) -> None:
        """Append to ``meta_history``, dropping the oldest entries beyond its maximum."""
        self.meta_history.append(entry)
        excess = len(self.meta_history) - self.meta_history_size
        if excess > 0:
            del self.meta_history[:excess]

    # ------------------------------------------------------------------ evaluation
    def _meta_evaluation_batch(self) -> None:
        # Evaluation: sample and score at the evaluation setting; never update the policy.
        self.set_sampling(self.eval_setting)
        for knob, value in self.eval_setting.items():
            log_metric(self, "eval", f"metactl/{knob}", float(value or 0.0))

    @contextlib.contextmanager
    def _meta_evaluation(self) -> Iterator[None]:
        # Evaluation generates *and* computes its loss at the evaluation setting; then the
        # setting of the current (possibly half-consumed) buffered batch comes back.
        self.set_sampling(self.eval_setting)
        try:
            yield
        finally:
            if self._window is not None:
                self.set_sampling(self._window.trl_setting)

    # ------------------------------------------------------------------ checkpoints
    def meta_state_dict(self) -> dict[str, Any]:
        """What ``metactl_state.json`` holds (:func:`.checkpoint.meta_state_dict`): the policy
        state, the sampler setting of the buffered window (``train_setting``; ``None`` for
        per-prompt decisions, whose values live in the policy) and ``meta_history``."""
        window = self._window
        return meta_state_dict(
            self.meta_policy,
            None if window is None else window.setting,
            history=self.meta_history,
            eval_temperature=self.eval_temperature,
            likelihood=self.likelihood,
        )

    def load_meta_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`meta_state_dict` (the policy continues bit-identically).

        The policy state, the sampler setting and the history are validated before any is
        applied: a rejected state (``ValueError``/``TypeError``) changes nothing.
        """
        self._apply(check_meta_state(state, self.meta_policy))

    def _apply(self, state: MetaState) -> None:
        self.meta_policy.load_state_dict(state.policy)  # validated: cannot fail now
        if state.setting is not None:
            self._window = GenerationWindow.restored(state.setting)
            self.set_sampling(self._window.trl_setting)
        keep = self.meta_history_size
        self.meta_history = state.history[len(state.history) - keep :] if keep else []

    def _meta_before_train(self, checkpoint: str | None) -> None:
        self._pending_state = None
        if checkpoint is not None:
            state = read_meta_state(
                checkpoint, self.meta_policy, allow_missing=self.allow_missing_meta_state
            )
            self._pending_state = (checkpoint, state)

    def _meta_save(self, folder: str) -> None:
        write_meta_state(folder, self.meta_state_dict())

    def _meta_resume(self, folder: str) -> None:
        pending, self._pending_state = self._pending_state, None
        if pending is not None and os.path.realpath(pending[0]) == os.path.realpath(folder):
            state = pending[1]  # read and validated by train() before anything was loaded
        else:
            state = read_meta_state(
                folder, self.meta_policy, allow_missing=self.allow_missing_meta_state
            )
        if state is not None:
            self._apply(state)
