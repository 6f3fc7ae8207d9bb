"""The reference trainer's effective-temperature check: after each rollout, the temperature its
tokens were actually drawn from, estimated from the sampling loop's own logits.

A rollout can silently sample at another temperature than the one a meta-policy chose (a
sampler that ignores it, a greedy path left on): nothing fails, and the controller learns from
data it did not ask for. `metactl.effective_temperature` estimates the temperature from the
raw logits of the sampled positions; the KV-cache loop (`rollout.sample`) computes exactly
those logits at every decoding step, so the check costs no forward pass: `LogitSubsample`
keeps them (through ``sample``'s ``on_logits``) and `estimate` scores the sampled tokens under
the setting that was meant to sample them (the step's truncation, each row's temperature).

Keeping every logit vector of a batch would cost ``rows x new tokens x V`` floats (gigabytes
for a real vocabulary and long completions), so the check reads a deterministic subsample,
fixed before the draw: at most ``max_rows`` rows spread evenly over the batch (row
``floor(i N / max_rows)``: every prompt group is represented when ``max_rows`` is at least the
number of prompts) at at most ``max_positions`` decoding steps (``0, s, 2s, ...`` with the
stride ``s = ceil(max_new_tokens / max_positions)``). A selection decided before sampling keeps
the estimate's statistics valid: each scored token was drawn from the logits it is scored with.

Example:
    >>> import torch
    >>> keep = LogitSubsample(n_rows=8, max_new_tokens=10, max_rows=2, max_positions=5)
    >>> keep.rows.tolist(), keep.steps.tolist()
    ([0, 4], [0, 2, 4, 6, 8])
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from metactl.effective_temperature import TemperatureEstimate, effective_temperature
from metactl.knobs import Setting

from .rollout import LogitObserver

__all__ = ["LogitSubsample", "estimate"]


class LogitSubsample:
    """The sampling loop's raw logits at a deterministic subsample of (row, decoding step).

    Args:
        n_rows: rows of the batch.
        max_new_tokens: decoding steps of the rollout (its longest completion).
        max_rows: rows to keep, spread evenly over the batch (0: every row).
        max_positions: decoding steps to keep per row, evenly strided from step 0 (0: every
            step).
    """

    def __init__(self, n_rows: int, max_new_tokens: int, max_rows: int,
                 max_positions: int) -> None:
        for name, value, low in (("n_rows", n_rows, 1), ("max_new_tokens", max_new_tokens, 1),
                                 ("max_rows", max_rows, 0), ("max_positions", max_positions, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if max_rows == 0 or max_rows >= n_rows:
            self.rows = np.arange(n_rows)
        else:
            self.rows = (np.arange(max_rows) * n_rows) // max_rows
        stride = 1 if max_positions == 0 else max(1, math.ceil(max_new_tokens / max_positions))
        self.steps = np.arange(0, max_new_tokens, stride)
        self._column = {int(t): j for j, t in enumerate(self.steps)}
        # (column, positions among the kept rows, their logits at that step), per chunk
        self._kept: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def observer(self, start: int, stop: int) -> LogitObserver:
        """The ``on_logits`` of `rollout.sample` for the chunk of rows ``[start, stop)``."""
        inside = np.flatnonzero((self.rows >= start) & (self.rows < stop))
        positions = torch.from_numpy(inside)
        local = torch.from_numpy(self.rows[inside] - start)

        def keep(t: int, logits: torch.Tensor) -> None:
            column = self._column.get(t)
            if column is not None and len(inside):
                self._kept.append((column, positions,
                                   logits.index_select(0, local.to(logits.device))))

        return keep

    def gather(self, tokens: torch.Tensor, mask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """``(logits, tokens, mask)`` of the kept positions: ``(m, P, V)``, ``(m, P)`` and
        ``(m, P)`` for the ``m`` kept rows at the ``P`` kept steps inside the rollout's
        ``tokens`` (N, C) (the loop stops when every row is done); positions the loop never
        reached are masked out (zeros)."""
        width = tokens.shape[1]
        steps = [int(t) for t in self.steps if t < width]
        if not self._kept or not steps:
            raise ValueError("no logits were kept: pass observer() to the sampling loop")
        some = self._kept[0][2]
        logits = torch.zeros(len(self.rows), len(steps), some.shape[-1], dtype=some.dtype,
                             device=some.device)  # fmt: skip
        reached = torch.zeros(len(self.rows), len(steps), dtype=torch.bool)
        for column, positions, picked in self._kept:
            if column < len(steps):
                logits[positions.to(some.device), column] = picked
                reached[positions, column] = True
        rows = torch.from_numpy(self.rows).to(tokens.device)
        columns = torch.tensor(steps, dtype=torch.long, device=tokens.device)
        picked_tokens = tokens.index_select(0, rows).index_select(1, columns)
        kept_mask = mask.index_select(0, rows).index_select(1, columns).bool()
        return logits, picked_tokens, kept_mask & reached.to(kept_mask.device)


def estimate(kept: LogitSubsample, tokens: torch.Tensor, mask: torch.Tensor, setting: Setting,
             row_temperature: float | torch.Tensor) -> TemperatureEstimate:
    """The effective temperature of a rollout from its kept logits: the tokens scored under
    ``setting`` (the step's truncation) at ``row_temperature`` (a float, or the (N,) per-row
    temperatures the loop sampled with)."""
    logits, picked, picked_mask = kept.gather(tokens, mask)
    intended: Any
    if isinstance(row_temperature, torch.Tensor):
        temps = row_temperature.detach().cpu().double().numpy()[kept.rows]
        intended = setting.at_temperature(temps)
    else:
        intended = setting.at_temperature(float(row_temperature))
    return effective_temperature(logits, picked, picked_mask, temperature=intended, order="hf")
