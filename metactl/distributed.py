"""Keeping every rank of a distributed run on the same choice.

A :class:`~metactl.MetaPolicy` is deterministic given its seed and its feedback, so ranks agree
when (1) every rank builds its policy with the same seed and (2) every rank updates from the
same, globally gathered feedback. :func:`gather_feedback` does (2) with whatever collective the
host framework offers; :func:`assert_same_choice` checks the result against rank 0 each step, so
a divergence fails loudly instead of silently training ranks at different temperatures.

The alternative, deciding on rank 0 and broadcasting the value, also works, but the other ranks'
policies must still receive the same updates or their ``state_dict()`` (and a resumed run) would
diverge; gathering feedback keeps every copy identical.

Example with ``torch.distributed`` (any collective with the same shape of call works)::

    all_gather, broadcast = metactl.distributed.torch_collectives()
    decision = policy.select()
    metactl.distributed.assert_same_choice(decision, broadcast)
    ...  # sample and train at decision.value
    feedback = metactl.distributed.gather_feedback(
        {"loglik": local_loglik, "advantages": local_advantages}, all_gather)
    policy.update(decision, **feedback)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _validation as check
from .decision import Decision, DecisionBatch

__all__ = ["assert_same_choice", "gather_feedback", "torch_collectives"]

AllGather = Callable[[np.ndarray], list[np.ndarray]]
Broadcast = Callable[[int], int]

# one row per trajectory: concatenated in rank order (for per-context decisions, split the
# batch's contexts across ranks in contiguous blocks, in rank order, so the gathered rows
# follow the decisions)
_ROW_FEEDBACK = ("loglik", "advantages", "rewards")
_MEAN_FEEDBACK = ("reward", "entropy")  # batch means: averaged, weighted by trajectory counts
_SAME_FEEDBACK = ("vocab_size", "group_size")  # must agree across ranks


def gather_feedback(feedback: dict[str, Any], all_gather: AllGather) -> dict[str, Any]:
    """Combine every rank's feedback into the global batch's feedback.

    Args:
        feedback: this rank's feedback (the keywords of ``MetaPolicy.update``).
        all_gather: called with a numpy array on every rank, returns the list of every rank's
            array in rank order (arrays may differ in their first dimension).

    ``loglik``/``advantages``/``rewards`` rows are concatenated in rank order; ``reward`` and
    ``entropy`` are averaged, weighted by each rank's number of trajectories (``advantages``
    rows, or equal weights without them); ``vocab_size`` and ``group_size`` must be equal on
    every rank.

    Example (one process standing in for two ranks):
        >>> import numpy as np
        >>> ranks = [np.array([1.0, -1.0]), np.array([0.5, -0.5])]
        >>> fake_gather = lambda x: [x, x * 0.5] if x.ndim else [x, x]
        >>> gather_feedback({"advantages": ranks[0]}, fake_gather)["advantages"].tolist()
        [1.0, -1.0, 0.5, -0.5]
    """
    if not callable(all_gather):
        raise TypeError("all_gather must be callable")
    unknown = sorted(set(feedback) - set(_ROW_FEEDBACK + _MEAN_FEEDBACK + _SAME_FEEDBACK))
    if unknown:
        raise TypeError(f"gather_feedback does not know how to combine {unknown}")
    out: dict[str, Any] = {}
    counts: np.ndarray | None = None
    for name in _ROW_FEEDBACK:
        if name in feedback:
            parts = all_gather(check.finite_array(feedback[name], name))
            out[name] = np.concatenate([np.asarray(p, dtype=np.float64) for p in parts], axis=0)
            if name == "advantages":
                counts = np.array([np.asarray(p).shape[0] for p in parts], dtype=np.float64)
    for name in _MEAN_FEEDBACK:
        if name in feedback:
            values = np.array(
                [
                    float(np.asarray(v))
                    for v in all_gather(np.asarray(check.finite_scalar(feedback[name], name)))
                ]
            )
            weights = counts if counts is not None and counts.shape == values.shape else None
            out[name] = float(np.average(values, weights=weights))
    for name in _SAME_FEEDBACK:
        if name in feedback:
            sizes = [int(np.asarray(v)) for v in all_gather(np.asarray(feedback[name]))]
            if len(set(sizes)) != 1:
                raise ValueError(f"{name} differs across ranks: {sizes}")
            out[name] = sizes[0]
    return out


def _batch_checksum(batch: DecisionBatch) -> int:
    """A 63-bit digest of a batch's contexts, values and indices (equal batches, equal ints)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(repr(batch.contexts).encode())
    digest.update(np.ascontiguousarray(batch.values, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(batch.indices, dtype=np.int64).tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


def assert_same_choice(decision: Decision | DecisionBatch, broadcast: Broadcast) -> None:
    """Raise ``RuntimeError`` if this rank's decision differs from rank 0's.

    Args:
        decision: this rank's decision, or the :class:`~metactl.DecisionBatch` of a
            per-context ``select(contexts=...)`` (every rank selects the whole batch's contexts;
            compared through a digest of its contexts, values and indices).
        broadcast: called with an int on every rank, returns rank 0's int on every rank.
    """
    if isinstance(decision, DecisionBatch):
        mine = _batch_checksum(decision)
        if int(broadcast(mine)) != mine:
            raise RuntimeError(
                f"ranks disagree at step {decision.step}: this rank's per-context decisions "
                "differ from rank 0's; every rank must select the same contexts, in the same "
                "order, with identically seeded policies updated from gathered feedback"
            )
        return
    if not isinstance(decision, Decision):
        raise TypeError(f"decision must be a metactl.Decision, got {type(decision).__name__}")
    root_index = int(broadcast(decision.index))
    if root_index != decision.index:
        raise RuntimeError(
            f"ranks disagree at step {decision.step}: this rank chose index {decision.index}, "
            f"rank 0 chose {root_index}; seed every rank's MetaPolicy identically and update "
            "every rank from gathered feedback (metactl.distributed.gather_feedback)"
        )


def torch_collectives() -> tuple[AllGather, Broadcast]:
    """``(all_gather, broadcast)`` built on an initialised ``torch.distributed`` process group.

    Imports torch only when called. Works with any backend that supports object collectives
    (gloo; NCCL after ``torch.cuda.set_device``).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised")

    def all_gather(array: np.ndarray) -> list[np.ndarray]:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, np.asarray(array))  # small arrays: (N, K) floats at most
        return [np.asarray(p) for p in parts]

    def broadcast(value: int) -> int:
        box = [int(value)]
        dist.broadcast_object_list(box, src=0)
        return int(box[0])

    return all_gather, broadcast
