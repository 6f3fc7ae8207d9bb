"""The per-step signal diagnostics of a likelihood-rule run, as a scoreboard record keeps them.

The gym learner (``TrainLog.signal``) and the reference trainer (``result["signal"]``, one
:func:`metactl.diagnostics.signal_diagnostics` dict per step) both record, every step, what a
likelihood rule's signal said. A scoreboard record keeps the arrays that
:func:`metactl.adapters.lab.signal_plot.plot_signal_diagnostics` draws, under ``"signal"``:

- a dict (see :func:`encode_signal`) for a run whose log has diagnostics;
- ``None`` for a run whose log has none (the controller is not a likelihood rule);
- no ``"signal"`` key at all in a record written before the scoreboard kept them. Such a record
  is still reused (its metrics are the same), and its page says
  :data:`NOT_RECORDED` instead of drawing anything.

The values are the logs' own float64 numbers (JSON keeps them exactly); ``favoured_candidate``
is ``None`` on a flat step (NaN in the arrays, as in :func:`metactl.diagnostics.stack_diagnostics`).

Example
-------
>>> import numpy as np
>>> from metactl.diagnostics import signal_diagnostics
>>> step = signal_diagnostics([[-1.0, -1.2], [-1.0, -0.4]], [1.0, -1.0], [0.8, 1.2], 1.0, 2)
>>> block = from_reference_result({"signal": [step, None], "candidates": [0.8, 1.2]})
>>> block["step"], block["favoured_candidate"]
([0], [0.8])
>>> arrays, candidates = decode_signal(block)
>>> arrays["signal"].shape, candidates.tolist()
((1, 2), [0.8, 1.2])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "COUNT_FIELDS",
    "FLOAT_FIELDS",
    "NOT_RECORDED",
    "SIGNAL_FORMAT",
    "decode_signal",
    "encode_signal",
    "from_gym_run",
    "from_reference_result",
]

#: version of the ``"signal"`` block (independent of the record key: the metrics do not change)
SIGNAL_FORMAT = 1
#: per-step float arrays kept (``favoured_candidate`` may be None: a flat step)
FLOAT_FIELDS: tuple[str, ...] = (
    "sampling_value",
    "signal_spread",
    "favoured_candidate",
    "support_mean",
    "tstar_advantage_correlation",
)
#: per-step counts kept (non-negative integers)
COUNT_FIELDS: tuple[str, ...] = ("signal_rows", "informative_groups")
#: what a page says for a record written without the diagnostics
NOT_RECORDED = "diagnostics not recorded for this run"


def _finite_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def _count(value: Any, name: str) -> int:
    number = _finite_float(value, name)
    if number < 0 or number != int(number):
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(number)


def encode_signal(stacked: Mapping[str, Any], candidates: Sequence[float] | np.ndarray,
                  steps: Sequence[int]) -> dict[str, Any]:  # fmt: skip
    """The record block of one run's diagnostics.

    Args:
        stacked: :func:`metactl.diagnostics.stack_diagnostics` of the run (one row per step in
            ``steps``; other keys are ignored).
        candidates: the K candidate values (the columns of ``stacked["signal"]``).
        steps: the training step of each row, strictly increasing, ``>= 0``.

    Raises:
        TypeError: ``stacked`` not a mapping, non-numeric entries.
        ValueError: a missing field, lengths that disagree, NaN/inf (outside
            ``favoured_candidate``), counts that are not non-negative integers, no candidate,
            no step.
    """
    if not isinstance(stacked, Mapping):
        raise TypeError(f"stacked must be a mapping of arrays, got {type(stacked).__name__}")
    cands = [_finite_float(c, "candidates") for c in np.asarray(candidates).ravel().tolist()]
    if not cands:
        raise ValueError("candidates must not be empty")
    step_list = [_count(s, "steps") for s in steps]
    if not step_list:
        raise ValueError("steps must not be empty (a run without diagnostics has no block)")
    if any(b <= a for a, b in itertools.pairwise(step_list)):
        raise ValueError("steps must be strictly increasing")
    n = len(step_list)
    missing = [f for f in (*FLOAT_FIELDS, *COUNT_FIELDS, "signal") if f not in stacked]
    if missing:
        raise ValueError(f"stacked lacks the fields {missing}")
    block: dict[str, Any] = {"format": SIGNAL_FORMAT, "candidates": cands, "step": step_list}
    for name in (*FLOAT_FIELDS, *COUNT_FIELDS):
        column = np.asarray(stacked[name], dtype=np.float64)
        if column.shape != (n,):
            raise ValueError(f"stacked[{name!r}] has shape {column.shape}, expected ({n},)")
        if name == "favoured_candidate":  # NaN marks a flat step (no favoured candidate)
            block[name] = [None if math.isnan(v) else _finite_float(v, name)
                           for v in column.tolist()]  # fmt: skip
        elif name in COUNT_FIELDS:
            block[name] = [_count(v, name) for v in column.tolist()]
        else:
            block[name] = [_finite_float(v, name) for v in column.tolist()]
    signal = np.asarray(stacked["signal"], dtype=np.float64)
    if signal.shape != (n, len(cands)):
        raise ValueError(f"stacked['signal'] has shape {signal.shape}, expected ({n}, "
                         f"{len(cands)})")  # fmt: skip
    if not np.isfinite(signal).all():
        raise ValueError("stacked['signal'] must be finite")
    block["signal"] = signal.tolist()
    return block


def from_gym_run(signal: Mapping[str, Any] | None,
                 candidates: Sequence[float] | np.ndarray) -> dict[str, Any] | None:  # fmt: skip
    """The block of a gym run (``run_one(...)["signal"]``: every step, or None)."""
    if signal is None:
        return None
    if not isinstance(signal, Mapping) or "signal" not in signal:
        raise TypeError("signal must be None or a stack_diagnostics dict")
    rows = int(np.asarray(signal["signal"]).shape[0])
    return encode_signal(signal, candidates, range(rows))


def from_reference_result(result: Mapping[str, Any]) -> dict[str, Any] | None:
    """The block of a reference arm (its ``result.json``: ``"signal"``, one
    ``signal_diagnostics`` dict or None per step, and ``"candidates"``); None without one.

    An arm over a joint grid of knobs lists each candidate as a ``{knob: value}`` setting and
    diagnoses its signal over the candidate indices (its sampling value is the step's index):
    its block's candidates are the indices ``0..K-1``, with the settings under
    ``"candidate_settings"``.
    """
    from metactl.diagnostics import stack_diagnostics

    per_step = result.get("signal")
    if not per_step:
        return None
    if not isinstance(per_step, list):
        raise TypeError(f"result['signal'] must be a list, got {type(per_step).__name__}")
    steps = [i for i, r in enumerate(per_step) if r is not None]
    if not steps:
        return None
    stacked = stack_diagnostics([per_step[i] for i in steps])
    candidates = list(result["candidates"])
    if all(isinstance(c, Mapping) for c in candidates):
        block = encode_signal(stacked, list(range(len(candidates))), steps)
        block["candidate_settings"] = [dict(c) for c in candidates]
        return block
    return encode_signal(stacked, candidates, steps)


def decode_signal(block: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``(arrays, candidates)`` of a record's block: the arrays ``plot_signal_diagnostics``
    reads (``favoured_candidate`` NaN on flat steps) plus ``step``.

    Raises:
        ValueError: a block that is not of :data:`SIGNAL_FORMAT` or does not hold consistent
            arrays (a record's checksum guards against corruption on disk; this against a
            block written by other code).
    """
    if not isinstance(block, Mapping):
        raise ValueError(f"the signal block must be a dict, got {type(block).__name__}")
    if block.get("format") != SIGNAL_FORMAT:
        raise ValueError(f"the signal block has format {block.get('format')!r}, this code reads "
                         f"{SIGNAL_FORMAT}")  # fmt: skip
    try:
        # encode_signal validates every field; it accepts its own output's form
        stacked: dict[str, Any] = {
            name: [np.nan if v is None else v for v in block[name]]
            if name == "favoured_candidate" else block[name]
            for name in (*FLOAT_FIELDS, *COUNT_FIELDS, "signal")
        }
        again = encode_signal(stacked, block["candidates"], block["step"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"the signal block is malformed ({type(exc).__name__}: {exc})") from None
    arrays = {name: np.asarray(stacked[name], dtype=np.float64)
              for name in (*FLOAT_FIELDS, *COUNT_FIELDS)}  # fmt: skip
    arrays["signal"] = np.asarray(again["signal"], dtype=np.float64).reshape(
        len(again["step"]), len(again["candidates"]))
    arrays["step"] = np.asarray(again["step"], dtype=np.int64)
    return arrays, np.asarray(again["candidates"], dtype=np.float64)
