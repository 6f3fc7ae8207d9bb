"""The state of one generation window: a generation batch and the optimisation steps that reuse
it.

TRL generates once every ``steps_per_generation * num_iterations`` training steps and reuses the
batch in between, so what the meta-policy chose for a batch must hold from its generation to the
last loss computed on it. :class:`GenerationWindow` holds all of it in one object: the decision,
the sampler setting TRL holds (one setting for every row of a global decision) or each row's
temperature (a per-prompt decision: every prompt group at its own value), the likelihood capture
and scoring path, the phase (generating, or TRL's loss over one micro-batch) and the rewards TRL
computed. The trainer opens one per training generation batch and keeps it until the next.

Example:
    >>> import metactl
    >>> policy = metactl.ptgs(seed=0)
    >>> window = GenerationWindow.open(policy.select(contexts=[7, 8]), per_prompt=True,
    ...                                group_size=2, first_row=0, rows=4)
    >>> window.setting is None, window.trl_setting, window.row_temperatures.shape
    (True, {'temperature': 1.0}, torch.Size([4]))
    >>> GenerationWindow.open(metactl.MetaPolicy([0.7, 1.0], metactl.Fixed(0.7)).select(),
    ...                       per_prompt=False, group_size=2, first_row=0, rows=4).setting
    {'temperature': 0.7}
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

import metactl
from metactl import ContextKey
from metactl.knobs import KnobValue

from .fused import FusedLogitsCapture
from .scoring import HiddenCapture, ScoringPath

__all__ = ["GenerationWindow", "context_keys", "prompt_contexts"]

Capture = HiddenCapture | FusedLogitsCapture


@dataclass
class GenerationWindow:
    """One generation batch and the steps that reuse it (see the module docstring).

    Attributes:
        decision: the policy's decision for the batch: one :class:`metactl.Decision`, or the
            :class:`metactl.DecisionBatch` of its prompt groups; ``None`` for a window restored
            from a checkpoint (its update is in the restored policy state).
        setting: the sampler setting of every row (a global decision), ``None`` when each row
            has its own temperature.
        row_temperatures: ``(rows,)`` float64, this rank's rows' temperatures (per-prompt
            decisions), else ``None``.
        group_temperatures: ``(groups,)`` float64, the temperature of every prompt group of
            the generation batch, all ranks in rank order (per-prompt decisions), else ``None``:
            vLLM's server gets one request per prompt group from the main process.
        path: where the candidate likelihoods come from (``None``: the rule needs none).
        capture: what records them during TRL's own passes (``None``: an extra forward, or
            nothing to score).
        generating: TRL is generating and scoring the batch right now.
        old_pass_pending: the capture still waits for TRL's old-logprob pass.
        pass_rows: the per-row temperatures of the log-prob passes TRL runs now (during the
            generation, or its loss over one micro-batch), else ``None``.
        rewards_per_func: TRL's ``(N_global, F)`` rewards of the batch, all ranks in rank order.
    """

    decision: metactl.Decision | metactl.DecisionBatch | None
    setting: dict[str, KnobValue] | None
    row_temperatures: torch.Tensor | None
    group_temperatures: torch.Tensor | None = None
    path: ScoringPath | None = None
    capture: Capture | None = None
    generating: bool = False
    old_pass_pending: bool = False
    pass_rows: torch.Tensor | None = None
    rewards_per_func: torch.Tensor | None = None

    @classmethod
    def open(
        cls,
        decision: metactl.Decision | metactl.DecisionBatch,
        *,
        per_prompt: bool,
        group_size: int,
        first_row: int,
        rows: int,
    ) -> GenerationWindow:
        """The window of ``decision``: a global decision sets one setting for every row; the
        decisions of a per-prompt policy (``per_prompt``) give prompt group ``g`` (global rows
        ``g * group_size`` to ``(g + 1) * group_size - 1``) its own temperature, of which this
        rank keeps rows ``first_row`` to ``first_row + rows - 1``.

        Raises:
            ValueError: the decisions do not cover this rank's rows.
        """
        if not per_prompt:
            setting = cast(metactl.Decision, decision).setting
            return cls(decision=decision, setting=setting, row_temperatures=None)
        batch = cast(metactl.DecisionBatch, decision)
        groups = np.asarray(batch.values, dtype=np.float64)
        values = np.repeat(groups, group_size)
        local = values[first_row : first_row + rows]
        if local.shape != (rows,):
            raise ValueError(
                f"{len(batch)} prompt decisions of {group_size} rows cover {values.size} rows, "
                f"not rows {first_row} to {first_row + rows - 1}"
            )
        return cls(
            decision=decision,
            setting=None,
            row_temperatures=torch.tensor(local),
            group_temperatures=torch.tensor(groups),
        )

    @classmethod
    def restored(cls, setting: dict[str, KnobValue]) -> GenerationWindow:
        """The window a checkpoint was saved in: its setting holds until the next batch."""
        return cls(decision=None, setting=dict(setting), row_temperatures=None)

    @property
    def trl_setting(self) -> dict[str, KnobValue]:
        """The setting TRL's scalar knobs hold during the window: the decision's, or temperature
        1 when each row has its own (a logits processor or vLLM's per-request sampling parameters,
        and TRL's fused head per distinct value, apply each row's temperature)."""
        return dict(self.setting) if self.setting is not None else {"temperature": 1.0}

    @contextmanager
    def generation(self) -> Iterator[None]:
        """TRL generates and scores the batch inside this block: the capture is attached, the
        per-row temperatures apply to every pass, the old-logprob pass is awaited."""
        self.generating, self.pass_rows = True, self.row_temperatures
        self.old_pass_pending = self.capture is not None and self.capture.mode in ("old", "fused")
        try:
            if self.capture is not None:
                with self.capture:
                    yield
            else:
                yield
        finally:
            self.generating, self.pass_rows, self.old_pass_pending = False, None, False

    @contextmanager
    def loss(self, rows: torch.Tensor | None) -> Iterator[None]:
        """TRL computes its loss over one micro-batch inside this block; ``rows``: its per-row
        temperatures (TRL shuffles and splits them with the batch)."""
        before, self.pass_rows = self.pass_rows, rows
        try:
            yield
        finally:
            self.pass_rows = before

    def old_pass_capture(self, model_is_policy: bool) -> Capture | None:
        """The capture that records this log-prob pass: TRL's first pass of the policy while the
        batch is generated is its old-logprob pass (the reference pass comes after it; with PEFT
        it also runs on the policy model)."""
        if not (self.generating and self.old_pass_pending and model_is_policy):
            return None
        self.old_pass_pending = False
        return self.capture

    def row_rewards(self, weights: torch.Tensor) -> np.ndarray:
        """Every row's reward (all ranks, rank order), as TRL sums its weighted reward functions.

        Raises:
            RuntimeError: TRL computed no rewards for the batch.
            ValueError: a completion got no reward from any reward function (all ``None``).
        """
        per_func = self.rewards_per_func
        if per_func is None:
            raise RuntimeError("metactl: TRL computed no rewards for this generation batch")
        unscorable = torch.isnan(per_func).all(dim=1)
        if bool(unscorable.any()):
            raise ValueError(
                f"{int(unscorable.sum())} completions got no reward from any reward function "
                "(all None); the meta-policy's rule needs a reward for every completion"
            )
        rewards = (per_func * weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
        return rewards.double().cpu().numpy()


def context_keys(inputs: Sequence[dict[str, Any]], column: str) -> list[ContextKey]:
    """Each row's context key, read from the dataset column ``column``.

    Raises:
        ValueError: a row without the column.
        TypeError: a key that is neither an ``int`` nor a ``str``.

    Example:
        >>> context_keys([{"prompt_id": 3}, {"prompt_id": "a"}], "prompt_id")
        [3, 'a']
    """
    keys: list[ContextKey] = []
    for i, row in enumerate(inputs):
        if column not in row:
            raise ValueError(
                f"row {i} of the generation batch has no column {column!r} "
                "(meta_context_column); keep it in the dataset (remove_unused_columns=False)"
            )
        key = row[column]
        if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer, str)):
            raise TypeError(
                f"meta_context_column {column!r} must hold int or str keys, got "
                f"{type(key).__name__} {key!r} in row {i}"
            )
        keys.append(key if isinstance(key, str) else int(key))
    return keys


def prompt_contexts(keys: Sequence[ContextKey], group_size: int, column: str) -> list[ContextKey]:
    """One context per prompt group of ``group_size`` consecutive rows (TRL's order).

    Raises:
        ValueError: the rows are not whole groups, or a group mixes keys.

    Example:
        >>> prompt_contexts([4, 4, 9, 9], 2, "prompt_id")
        [4, 9]
    """
    if len(keys) % group_size != 0:
        raise ValueError(
            f"the generation batch has {len(keys)} rows, not a multiple of "
            f"num_generations={group_size}"
        )
    contexts = list(keys[::group_size])
    for g, key in enumerate(contexts):
        group = list(keys[g * group_size : (g + 1) * group_size])
        if any(k != key for k in group):
            raise ValueError(
                f"prompt group {g} mixes context keys {group!r}: meta_context_column={column!r} "
                "must be one id per prompt"
            )
    return contexts
