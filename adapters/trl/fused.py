"""Candidate likelihoods computed inside TRL's fused log-prob head (``likelihood="fused"``).

:class:`FusedLogitsCapture` folds every candidate into the logit tiles of TRL's
``ChunkedLogProbFunction`` while they exist (no extra matmul, no captured hidden states). Plain
temperature candidates are folded online across vocabulary tiles; every other family (truncated
candidates need the whole sorted row) is scored on tiles that hold a row's whole vocabulary, and
a partial tile makes :meth:`FusedLogitsCapture.result` return ``None`` (the trainer then scores
with an extra forward, with a warning). On request (``check_bytes``) the raw logits of some
completion positions are copied from the same tiles for the effective-temperature check.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch

from .scoring import CandidateScoring, LikelihoodResult, RawLogits, check_positions
from .seam import fused_kernel_rows_are_compact, tapped_fused_head

__all__ = ["FusedLogitsCapture"]


class _ChunkCall:
    """Bookkeeping of one ``ChunkedLogProbFunction.apply`` call (one batch chunk of TRL's pass)."""

    def __init__(
        self, rows: torch.Tensor, batch: torch.Tensor, position: torch.Tensor, expected_rows: int
    ) -> None:
        self.targets = torch.empty(0)  # the call's targets (set when the call starts)
        self.rows = rows  # sorted indices (into this call's token rows) of the positions to score
        self.batch = batch  # their batch row
        self.position = position  # and their completion position
        self.expected_rows = expected_rows  # how many token rows TRL's kernel gets
        self.vocab = 0  # the LM head's vocabulary (set when the call starts)


class FusedLogitsCapture:
    """Candidate likelihoods computed inside TRL's fused log-prob head, tile by tile, while its
    logits exist: no extra matmul, no captured hidden states.

    TRL's ``add_fused_lm_head`` scores the completion with ``ChunkedLogProbFunction``, which
    projects ``[tokens, vocab chunk]`` tiles of logits and folds each into online log-sum-exp
    statistics (``_forward_tile`` in torch, ``_forward_kernel`` in Triton). Inside
    :meth:`recording`, the adapter wraps both folds: before TRL's fold reads a tile, the same raw
    tile is folded into per-candidate statistics (``logsumexp(y / T_k)`` and ``y_target / T_k``,
    with ``y`` the tile after TRL's logit scaling and soft-capping), for the rows that are
    completion tokens. The tile itself is only read, never changed.

    ``mode`` is ``"fused"``; :meth:`result` returns ``None`` when the pass did not line up with
    the completions (the trainer then falls back to an extra forward, with a warning).

    With ``check_bytes`` the raw logits of the completion positions that
    :func:`~.scoring.check_positions` picks within that bound are copied from the tiles too
    (``result(...).raw``, for the effective-temperature check).

    Example:
        >>> import torch
        >>> from trl.trainer.utils import add_fused_lm_head
        >>> from metactl.adapters.trl.testing import build_char_tokenizer, build_tiny_model
        >>> m = build_tiny_model(build_char_tokenizer(), hidden_size=32, num_layers=1)
        >>> add_fused_lm_head(m)
        >>> ids = torch.randint(4, 20, (2, 6))
        >>> labels = ids.clone(); labels[:, :-3] = -100
        >>> cap = FusedLogitsCapture([0.7, 1.0])
        >>> with cap.recording(ids, torch.ones_like(ids), 3, 2), torch.no_grad():
        ...     _ = m(input_ids=ids, labels=labels, fused_lm_head=True)
        >>> cap.result(ids[:, -3:], torch.ones(2, 3)).loglik_sum.shape
        torch.Size([2, 2])
    """

    mode = "fused"

    def __init__(
        self,
        candidates: Sequence[float] | CandidateScoring,
        *,
        entropy_temperature: float | None = None,
        check_bytes: int | None = None,
    ) -> None:
        if check_bytes is not None and check_bytes < 1:
            raise ValueError(f"check_bytes must be >= 1 or None, got {check_bytes}")
        self.scoring = CandidateScoring.of(candidates)
        self.check_bytes = check_bytes
        #: the plain candidate temperatures (online fold), or None (whole-vocabulary tiles only)
        self.temperatures = self.scoring.plain_temperatures
        self.entropy_temperature = entropy_temperature
        self.failure: str | None = None
        self.calls = 0
        #: wall time spent folding the candidates into TRL's tiles (part of TRL's pass)
        self.seconds = 0.0
        self._chunks: list[_ChunkCall] = []
        self._call: _ChunkCall | None = None
        self._lse: torch.Tensor | None = None
        self._target: torch.Tensor | None = None
        self._ent_lse: torch.Tensor | None = None
        self._ent_w: torch.Tensor | None = None
        self._token_ids: torch.Tensor | None = None
        self._seen: torch.Tensor | None = None
        # the completion positions whose raw logits are kept, and where: (N, keep) slots
        self._completion: torch.Tensor | None = None
        self._slot: torch.Tensor | None = None
        self._kept: torch.Tensor | None = None
        self._kept_cols: torch.Tensor | None = None

    def __enter__(self) -> FusedLogitsCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    # ------------------------------------------------------------------ the pass
    @contextmanager
    def recording(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        batch_size: int | None,
    ) -> Iterator[None]:
        """Fold the candidates into every tile of the fused pass TRL runs inside this block.

        The arguments are those of TRL's ``_get_per_token_logps_and_entropies`` call; the labels
        and the batch chunks are rebuilt from them exactly as TRL builds them, so each kernel
        call's token rows can be mapped to (completion, position).
        """
        n, length = input_ids.shape
        keep = int(logits_to_keep)
        if not 1 <= keep < length:
            raise ValueError(f"logits_to_keep must be in [1, {length - 1}], got {keep}")
        step = int(batch_size or n)
        device = input_ids.device
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-keep] = -100
        valid = labels[:, 1:] != -100  # (N, L - 1): the rows TRL's head scores
        k = len(self.scoring)
        self._lse = torch.full((n, keep, k), -math.inf, dtype=torch.float64, device=device)
        self._target = torch.zeros((n, keep, k), dtype=torch.float64, device=device)
        self._seen = torch.zeros((n, keep), dtype=torch.bool, device=device)
        self._token_ids = labels[:, -keep:].clone()
        if self.entropy_temperature is not None:
            self._ent_lse = torch.full((n, keep), -math.inf, dtype=torch.float64, device=device)
            self._ent_w = torch.zeros((n, keep), dtype=torch.float64, device=device)
        self._completion = attention_mask[:, -keep:] != 0
        self._slot = self._kept = self._kept_cols = None
        self._chunks = []
        for start in range(0, n, step):
            sub = valid[start : start + step]
            self._chunks.append(self._plan(sub, start, keep, length))
        chunks = iter(self._chunks)

        def start_call(hidden: torch.Tensor, weight: Any, targets: torch.Tensor) -> None:
            chunk = next(chunks, None)
            self.calls += 1
            if chunk is None or not self._matches(chunk, hidden, targets):
                self.failure = self.failure or "the fused pass did not match the batch"
                self._call = None
            else:
                chunk.targets = targets
                chunk.vocab = int(weight.shape[0])
                self._call = chunk
                self._allocate_kept(chunk.vocab, hidden.device)

        def end_call() -> None:
            self._call = None

        try:
            with tapped_fused_head(start_call, end_call, self._fold, device):
                yield
        finally:
            self._call = None
        if next(chunks, None) is not None:
            self.failure = self.failure or "the fused pass scored fewer chunks than the batch has"

    def _allocate_kept(self, vocab: int, device: torch.device) -> None:
        """The buffer of the kept raw logits (once the vocabulary is known)."""
        if self.check_bytes is None or self._slot is not None or self._completion is None:
            return
        positions = check_positions(self._completion, vocab, self.check_bytes)
        self._slot = torch.where(positions, positions.flatten().cumsum(0).view_as(positions) - 1,
                                 -1)  # fmt: skip
        count = int(positions.sum())
        self._kept = torch.zeros((count, vocab), dtype=torch.float32, device=device)
        self._kept_cols = torch.zeros(count, dtype=torch.long, device=device)

    def _keep(self, y: torch.Tensor, b: torch.Tensor, t: torch.Tensor, vocab_start: int,
              n_cols: int) -> None:  # fmt: skip
        """Copy the tile's columns of the kept positions' raw logits."""
        if self._slot is None or self._kept is None or self._kept_cols is None:
            return
        slot = self._slot[b, t]
        inside = slot >= 0
        if bool(inside.any()):
            index = slot[inside]
            self._kept[index, vocab_start : vocab_start + n_cols] = y[inside]
            self._kept_cols[index] += n_cols

    def _plan(self, valid: torch.Tensor, start: int, keep: int, length: int) -> _ChunkCall:
        """Where the positions to score sit among one chunk's kernel rows (both layouts)."""
        b, p = torch.nonzero(valid, as_tuple=True)  # row-major, as TRL flattens
        compact = fused_kernel_rows_are_compact(valid.device)
        # compact (Triton devices): only the valid positions are rows; else every position is
        rows = torch.arange(len(b), device=valid.device) if compact else b * (length - 1) + p
        position = p - (length - 1 - keep)
        expected = len(b) if compact else int(valid.numel())
        return _ChunkCall(rows, b + start, position, expected)

    @staticmethod
    def _matches(chunk: _ChunkCall, hidden: torch.Tensor, targets: torch.Tensor) -> bool:
        expected = chunk.expected_rows
        return hidden.shape[0] == expected and targets.shape[0] == expected

    def _fold(
        self,
        tile: torch.Tensor,
        targets: torch.Tensor,
        vocab_start: int,
        n_cols: int,
        kernel_args: dict[str, Any],
    ) -> None:
        """Fold one tile of TRL's fused head (its rows' logits over the vocabulary slice from
        ``vocab_start``, ``n_cols`` wide) into the running statistics; the time it takes is
        added to :attr:`seconds`."""
        start = time.perf_counter()
        try:
            call = self._call
            if call is None or self._lse is None or self._target is None:
                return
            offset = int(targets.storage_offset() - call.targets.storage_offset())
            n = int(tile.shape[0])
            lo = int(torch.searchsorted(call.rows, offset))
            hi = int(torch.searchsorted(call.rows, offset + n))
            if lo == hi:
                return
            local_rows = call.rows[lo:hi] - offset
            b, t = call.batch[lo:hi], call.position[lo:hi]
            with torch.no_grad():
                y = tile[local_rows, :n_cols].float()
                scale = float(kernel_args.get("logit_scale", 1.0))
                if scale != 1.0:
                    y = y * scale
                if kernel_args.get("HAS_SOFTCAP", False):
                    cap = float(kernel_args["softcap"])
                    y = cap * torch.tanh(y / cap)
                self._keep(y, b, t, vocab_start, n_cols)
                local = targets[local_rows] - vocab_start
                if self._fold_whole_vocabulary(y, local, b, t, vocab_start, n_cols, call.vocab):
                    return
                if self.temperatures is None:
                    # a truncated candidate needs the row's whole sorted vocabulary at once
                    self.failure = self.failure or (
                        f"family {self.scoring.family!r} with truncation is scored only on "
                        f"tiles holding the whole vocabulary (V={call.vocab} spans several of "
                        "TRL's tiles)"
                    )
                    return
                in_tile = (local >= 0) & (local < n_cols)
                y_target = y.gather(1, local.clamp(0, n_cols - 1).unsqueeze(1)).squeeze(1)
                for k, temperature in enumerate(self.temperatures):
                    z = y / temperature
                    part = torch.logsumexp(z, dim=-1).double()
                    self._lse[b, t, k] = torch.logaddexp(self._lse[b, t, k], part)
                    value = (y_target / temperature).double()
                    self._target[b, t, k] = torch.where(in_tile, value, self._target[b, t, k])
                self._fold_entropy(y, b, t)
                if vocab_start == 0:
                    assert self._seen is not None
                    self._seen[b, t] = True
        finally:
            self.seconds += time.perf_counter() - start

    def _fold_whole_vocabulary(
        self,
        y: torch.Tensor,
        local: torch.Tensor,
        b: torch.Tensor,
        t: torch.Tensor,
        vocab_start: int,
        n_cols: int,
        vocab: int,
    ) -> bool:
        """Score a tile that holds the whole vocabulary of its rows (``V`` up to TRL's chunk of
        32,768) with :func:`metactl.likelihood.candidate_loglik` (any family), the library's
        optimised kernel, and return True; return False for a partial tile (the online fold
        handles plain temperatures)."""
        if not (vocab_start == 0 and n_cols == vocab and len(self.scoring) >= 2):
            return False
        assert self._lse is not None and self._target is not None and self._seen is not None
        ones = torch.ones((y.shape[0], 1), dtype=torch.long, device=y.device)
        scored = self.scoring.loglik(y.unsqueeze(1), local.unsqueeze(1), ones)
        logq = cast(torch.Tensor, scored)
        self._target[b, t] = logq.double()
        self._lse[b, t] = 0.0
        self._fold_entropy(y, b, t)
        self._seen[b, t] = True
        return True

    def _fold_entropy(self, y: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> None:
        """Fold one tile into the entropy statistics at :attr:`entropy_temperature`: the
        running ``logsumexp`` and ``sum p z`` combine across vocabulary tiles exactly."""
        if self.entropy_temperature is None:
            return
        assert self._ent_lse is not None and self._ent_w is not None
        z = y / self.entropy_temperature
        part = torch.logsumexp(z, dim=-1).double()
        weighted = (torch.softmax(z, dim=-1) * z).sum(-1).double()
        total = torch.logaddexp(self._ent_lse[b, t], part)
        previous = self._ent_w[b, t] * torch.exp(self._ent_lse[b, t] - total).nan_to_num(0.0)
        self._ent_w[b, t] = previous + weighted * torch.exp(part - total)
        self._ent_lse[b, t] = total

    # ------------------------------------------------------------------ the result
    def result(self, tokens: torch.Tensor, mask: torch.Tensor) -> LikelihoodResult | None:
        """``LikelihoodResult`` for the completions ``tokens`` scored at ``mask``, or ``None``
        when the fused pass did not cover them (see :attr:`failure`)."""
        if self._lse is None or self._target is None or self._seen is None:
            self.failure = self.failure or "no fused pass was recorded"
            return None
        if self.failure is not None:
            return None
        if tokens.shape != self._seen.shape or mask.shape != self._seen.shape:
            self.failure = (
                f"the fused pass covered {tuple(self._seen.shape)} positions, the completions "
                f"are {tuple(tokens.shape)}"
            )
            return None
        scored = mask.to(torch.bool)
        assert self._token_ids is not None
        if bool((scored & ~self._seen).any()) or bool(
            (self._token_ids.to(tokens.device) != tokens)[scored].any()
        ):
            self.failure = "the fused pass scored other tokens than the completions"
            return None
        weights = scored.to(torch.float64).unsqueeze(-1)
        logp = (self._target - self._lse).nan_to_num(0.0, neginf=0.0) * weights
        entropy: float | None = None
        if self.entropy_temperature is not None:
            assert self._ent_lse is not None and self._ent_w is not None
            ent = (self._ent_lse - self._ent_w).nan_to_num(0.0, neginf=0.0)
            entropy = float((ent * scored).sum())
        raw: RawLogits | None = None
        if self.check_bytes is not None:
            raw = self._raw(mask)
            if raw is None:
                return None
        return LikelihoodResult(logp.sum(1), mask.to(torch.long).sum(1), entropy, raw)

    def _raw(self, mask: torch.Tensor) -> RawLogits | None:
        """The kept raw logits of the scored positions, or ``None`` (with :attr:`failure`)
        when a kept position did not get its whole vocabulary row."""
        if self._slot is None or self._kept is None or self._kept_cols is None:
            self.failure = "the fused pass kept no raw logits for the temperature check"
            return None
        if bool((self._kept_cols != self._kept.shape[1]).any()):
            self.failure = "the fused pass did not cover the whole vocabulary of a checked position"
            return None
        raw = RawLogits(self._kept, self._slot >= 0)
        return raw.restricted(mask.to(torch.bool))
