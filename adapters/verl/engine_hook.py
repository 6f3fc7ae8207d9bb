"""Candidate likelihoods inside verl's old-log-prob pass (``metactl.candidate_likelihood=fused``).

TAMPO needs, per trajectory, the summed log-likelihood of its response tokens under every
candidate temperature, ``sum_t log_softmax(z_t / T_k)[o_t]``. verl 0.9.1 returns only the
log-probabilities at one temperature, so without this hook the trainer runs one extra no-grad
``compute_log_prob`` per candidate. The FSDP engine already holds the raw logits ``z`` in
``FSDPEngineWithLMHead.prepare_model_outputs`` (before it divides them by the stamped
temperature, out of place), so this module wraps that method: when the micro-batch carries the
non-tensor entry :data:`CANDIDATES_KEY` (the candidate temperatures, put into the batch's
``extra_info`` by :class:`~metactl.adapters.verl.trainer.MetaPPOTrainer` for its old-log-prob
pass only), it scores every trajectory's response tokens under every candidate with
:func:`metactl.likelihood.candidate_loglik` (float32, chunked: no ``K`` copies of the logits;
on CUDA its Triton kernel) and adds the output field :data:`LOGLIK_FIELD`: ``(bsz, K)`` sums
in float64 over the positions ``response_mask`` selects, one row per trajectory. verl's worker
writes every model output to the TransferQueue, so the field reaches the driver beside
``log_probs``. Without the entry the method runs unchanged.

The wrapper is installed at import (:func:`install`), which happens in every process that
imports verl: :mod:`metactl.adapters.verl.register` imports this module, and verl imports the
modules named in ``VERL_USE_EXTERNAL_MODULES`` at ``import verl``, in the driver and in every
Ray worker. What it cannot score (fused kernels, which never materialise the logits; Ulysses
sequence parallelism, where a rank holds a slice of the packed sequence) is refused by the
trainer's configuration check and raises here too.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch.distributed.tensor import DTensor
from verl.utils import tensordict_utils as tu
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from metactl.likelihood import candidate_loglik

__all__ = ["CANDIDATES_KEY", "LOGLIK_FIELD", "install", "trajectory_candidate_sums"]

#: Non-tensor batch entry (``extra_info``) holding the candidate temperatures to score.
CANDIDATES_KEY = "metactl_candidate_temperatures"
#: Output field: ``(bsz, K)`` summed response-token log-likelihoods under each candidate.
LOGLIK_FIELD = "metactl_candidate_loglik"

_WRAPPED = "__metactl_candidate_hook__"
#: Response positions per scored block (see :func:`trajectory_candidate_sums`).
_BLOCK = 16


def trajectory_candidate_sums(
    logits: Sequence[torch.Tensor],
    input_ids: Any,
    response_mask: Any,
    candidates: Sequence[float],
) -> torch.Tensor:
    """``(bsz, K)`` float64: for each sequence ``i``, the log-likelihood of its response
    tokens (those ``response_mask`` selects) summed, under each candidate temperature.

    Args:
        logits: per sequence, its ``(len_i, V)`` raw logits (position ``t`` scores token
            ``t + 1``, as verl's model outputs do); views, never copied whole.
        input_ids: jagged nested ``(bsz, len_i)`` prompt + response token ids (verl's layout).
        response_mask: jagged nested ``(bsz, resp_len_i)``, 1 for the response tokens to count.
        candidates: the ``K`` candidate temperatures.

    A sequence with no selected token gets zeros (it adds nothing to a sum).
    """
    offsets = input_ids.offsets().tolist()
    labels = input_ids.values()
    response_lengths = response_mask.offsets().diff().tolist()
    response_values = response_mask.values().bool()
    response_offsets = response_mask.offsets().tolist()
    rows = []
    for i, (start, stop) in enumerate(itertools.pairwise(offsets)):
        length, resp = stop - start, response_lengths[i]
        row_logits = logits[i]
        if row_logits.shape[0] != length or not 0 <= resp < length:
            raise RuntimeError(
                f"sequence {i}: {row_logits.shape[0]} logit rows for {length} tokens, "
                f"{resp} of them response"
            )
        selected = response_values[response_offsets[i] : response_offsets[i + 1]]
        if not bool(selected.any()):
            rows.append(torch.zeros(len(candidates), dtype=torch.float64))
            continue
        # position p scores token p + 1: the response tokens are scored by the resp positions
        # before the last. They are scored in blocks of _BLOCK positions (rows of a stride-0
        # view of the same logits: no copy), and the blocks' float32 means times their counts
        # are summed in float64: one float32 mean over a whole long response would round its
        # sum more than the passes' per-token float32 log-probs do
        scoring = row_logits[length - resp - 1 : length - 1]  # (resp, V)
        response = labels[stop - resp : stop].to(row_logits.device)  # (resp,)
        blocks = torch.arange(resp) // _BLOCK
        mask = (blocks.unsqueeze(0) == torch.arange(int(blocks[-1]) + 1).unsqueeze(1)) & (
            selected.cpu().unsqueeze(0)
        )  # (blocks, resp): block j selects its own positions
        mask = mask[mask.any(dim=1)]
        n = mask.shape[0]
        means = cast(
            torch.Tensor,  # torch logits in, a torch tensor out
            candidate_loglik(
                scoring.unsqueeze(0).expand(n, -1, -1),
                response.unsqueeze(0).expand(n, -1),
                mask,
                list(candidates),
            ),
        )  # (n, K) float32
        counts = mask.sum(dim=1, keepdim=True).double()
        rows.append((means.double().cpu() * counts).sum(dim=0))
    return torch.stack(rows)


def _candidate_output(
    engine: Any, output: Any, micro_batch: Any, candidates: Sequence[float]
) -> torch.Tensor:
    """The :data:`LOGLIK_FIELD` output of one micro-batch, from the model's raw logits."""
    if tu.get_non_tensor_data(data=micro_batch, key="use_fused_kernels", default=False):
        raise ValueError(
            "metactl.candidate_likelihood=fused needs the logits, which verl's fused kernels "
            "never materialise: set actor_rollout_ref.model.use_fused_kernels=False or "
            "+metactl.candidate_likelihood=passes"
        )
    if getattr(engine, "use_ulysses_sp", False):
        raise ValueError(
            "metactl.candidate_likelihood=fused does not support Ulysses sequence parallelism "
            "(a rank holds a slice of the packed sequence): set +metactl.candidate_likelihood="
            "passes"
        )
    input_ids = micro_batch["input_ids"]
    logits = output.logits
    if isinstance(logits, DTensor):  # tensor parallel: sharded on the vocabulary
        logits = logits.full_tensor()
    lengths = input_ids.offsets().diff().tolist()
    if tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
        packed = logits.squeeze(0)  # (total_nnz [+ static pad], V), sequences back to back
        offsets = input_ids.offsets().tolist()
        views = [packed[a:b] for a, b in itertools.pairwise(offsets)]
    else:
        views = [logits[i, :n] for i, n in enumerate(lengths)]  # (bsz, max_len, V), right-padded
    with torch.autocast(device_type=logits.device.type, enabled=False):
        sums = trajectory_candidate_sums(views, input_ids, micro_batch["response_mask"], candidates)
    # verl concatenates every model output of the micro-batches as nested (bsz, j) tensors
    return torch.nested.as_nested_tensor(list(sums.to(logits.device)), layout=torch.jagged)


def _wrap(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def prepare_model_outputs(
        self: Any, output: Any, output_args: Any, micro_batch: Any, logits_processor_func: Any
    ) -> Any:
        candidates = tu.get_non_tensor_data(data=micro_batch, key=CANDIDATES_KEY, default=None)
        extra = None
        if candidates is not None:  # scored first: nothing of verl's has touched the logits
            extra = _candidate_output(self, output, micro_batch, [float(c) for c in candidates])
        result = method(self, output, output_args, micro_batch, logits_processor_func)
        if extra is not None:
            result[LOGLIK_FIELD] = extra
        return result

    setattr(prepare_model_outputs, _WRAPPED, True)
    return prepare_model_outputs


def install() -> None:
    """Wrap ``FSDPEngineWithLMHead.prepare_model_outputs`` (once per process; idempotent).
    Subclasses that inherit the method (the FSDP2 and FSDP-turbo engines) see the wrapper;
    the value-head engine overrides it and is left alone."""
    method = FSDPEngineWithLMHead.prepare_model_outputs
    if not getattr(method, _WRAPPED, False):
        FSDPEngineWithLMHead.prepare_model_outputs = _wrap(method)


install()
