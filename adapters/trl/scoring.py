"""Candidate likelihoods of sampled completions: exact (extra forward) and fast (captured) paths.

Both return, for every completion ``i`` of the local batch and every candidate temperature
``T_k``, the length-normalised log-likelihood ``L[i, k]`` of the sampled tokens under
``softmax(z / T_k)`` (via :func:`metactl.likelihood.candidate_loglik`), where ``z`` are the raw
logits of the policy that sampled the batch.

* **exact**: one no-grad forward of the policy over prompt+completion, materialising the logits
  of the completion positions (``logits_to_keep``), batch by batch.
* **fast**: no extra transformer forward. A :class:`HiddenCapture` hook on the backbone records
  the final hidden states during a pass TRL makes anyway (the old-logprob pass, or the
  generation itself), and :func:`candidate_loglik_from_hidden` applies the LM head window by window
  (a bounded number of positions at a time), so the ``(N, L, V)`` logits never exist at once.

Completions with no scored token (e.g. ``mask_truncated_completions=True``) get ``L[i, :] = 0``
and are reported in ``counts`` as 0, so the trainer can give them zero weight.

Example:
    >>> import torch
    >>> hidden = torch.randn(2, 3, 8)
    >>> weight = torch.randn(11, 8)
    >>> tokens = torch.randint(0, 11, (2, 3))
    >>> mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    >>> res = candidate_loglik_from_hidden(hidden, tokens, mask, weight, None, [0.5, 1.0])
    >>> res.loglik.shape, res.counts.tolist()
    (torch.Size([2, 2]), [2, 3])
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch

from metactl.likelihood import candidate_loglik

__all__ = [
    "FusedLogitsCapture",
    "HiddenCapture",
    "LikelihoodResult",
    "candidate_loglik_exact",
    "candidate_loglik_from_hidden",
    "dense_head",
]

#: Default size of one window of materialised logits (float32 bytes).
DEFAULT_WINDOW_BYTES = 64 << 20


@dataclass(frozen=True)
class LikelihoodResult:
    """Candidate likelihoods of one local batch.

    Attributes:
        loglik: ``(N, K)`` float64, ``L[i, k]`` (0 for rows with no scored token).
        counts: ``(N,)`` int64, number of scored tokens per row.
        entropy_sum: sum over scored tokens of the entropy (nats) of ``softmax(z / T)`` at the
            requested temperature, or ``None`` when not requested.
    """

    loglik: torch.Tensor
    counts: torch.Tensor
    entropy_sum: float | None = None


def _logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    logit_scale: float,
    softcap: float | None,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Raw logits exactly as TRL's fused head forms them (before the temperature), in float32."""
    if head is not None:
        z = head(hidden).float()
    else:
        z = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _entropy_sum(logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> float:
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    return float((ent * mask).sum())


def _result(sums: torch.Tensor, mask: torch.Tensor, entropy_sum: float | None) -> LikelihoodResult:
    """Length-normalise the summed log-likelihoods (rows with no tokens divide by 1)."""
    counts = mask.sum(1)
    loglik = sums / counts.clamp(min=1).double().unsqueeze(1)
    return LikelihoodResult(loglik=loglik, counts=counts, entropy_sum=entropy_sum)


def _accumulate(
    sums: torch.Tensor,
    rows: torch.Tensor,
    logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    candidates: Sequence[float],
) -> None:
    """Add ``count * mean`` of every row with a scored token in this window to ``sums[rows]``."""
    counts = mask.sum(1)
    keep = counts > 0
    if not bool(keep.any()):
        return
    means = cast(torch.Tensor, candidate_loglik(logits[keep], tokens[keep], mask[keep], candidates))
    sums.index_add_(
        0,
        rows[keep].to(sums.device),
        means.double() * counts[keep].double().unsqueeze(1).to(means.device),
    )


def candidate_loglik_from_hidden(
    hidden: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    candidates: Sequence[float],
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    entropy_temperature: float | None = None,
    window_bytes: int = DEFAULT_WINDOW_BYTES,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> LikelihoodResult:
    """Candidate likelihoods from final hidden states, applying the LM head window by window.

    Args:
        hidden: ``(N, C, H)`` final hidden states; ``hidden[:, t]`` predicts ``tokens[:, t]``.
        tokens: ``(N, C)`` sampled token ids.
        mask: ``(N, C)`` 0/1, the tokens to score.
        weight, bias: the LM head (``(V, H)``, ``(V,)`` or ``None``).
        candidates: the ``K`` candidate temperatures.
        logit_scale, softcap: the model's logit scaling and soft-capping (as TRL's fused head).
        entropy_temperature: also sum the token entropies of ``softmax(z / T)`` at this ``T``.
        window_bytes: bound on one window of float32 logits (rows x positions x V x 4 bytes).
        head: computes the raw logits of a ``(rows, positions, H)`` window instead of
            ``linear(hidden, weight, bias)``: for an LM head that is more than one matrix (a PEFT
            LoRA layer adds its low-rank update). ``weight`` then only gives the vocabulary size.

    Example:
        >>> import torch
        >>> h, w = torch.randn(1, 2, 4), torch.randn(5, 4)
        >>> r = candidate_loglik_from_hidden(h, torch.tensor([[1, 2]]), torch.ones(1, 2), w, None,
        ...                                  [0.8, 1.2], entropy_temperature=1.0)
        >>> r.entropy_sum > 0
        True
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape (N, C, H), got {tuple(hidden.shape)}")
    n, c, _ = hidden.shape
    if tokens.shape != (n, c) or mask.shape != (n, c):
        raise ValueError(
            f"tokens and mask must have shape {(n, c)}, got {tuple(tokens.shape)} and "
            f"{tuple(mask.shape)}"
        )
    if window_bytes < 1:
        raise ValueError(f"window_bytes must be >= 1, got {window_bytes}")
    vocab = weight.shape[0]
    mask = mask.to(torch.long)
    width = max(1, min(c, window_bytes // (4 * vocab)))
    height = max(1, window_bytes // (4 * vocab * width))
    sums = torch.zeros((n, len(candidates)), dtype=torch.float64, device=hidden.device)
    entropy = 0.0
    with torch.no_grad():
        for r0 in range(0, n, height):
            r1 = min(n, r0 + height)
            rows = torch.arange(r0, r1, device=hidden.device)
            for t0 in range(0, c, width):
                t1 = min(c, t0 + width)
                sub_mask = mask[r0:r1, t0:t1]
                if not bool(sub_mask.any()):
                    continue
                z = _logits(hidden[r0:r1, t0:t1], weight, bias, logit_scale, softcap, head)
                _accumulate(sums, rows, z, tokens[r0:r1, t0:t1], sub_mask, candidates)
                if entropy_temperature is not None:
                    entropy += _entropy_sum(z, sub_mask, entropy_temperature)
    return _result(sums, mask, entropy if entropy_temperature is not None else None)


def dense_head(
    lm_head: torch.nn.Module,
) -> tuple[torch.Tensor, torch.Tensor | None, Callable[[torch.Tensor], torch.Tensor] | None]:
    """``(weight, bias, head)`` for :func:`candidate_loglik_from_hidden` from an LM head module.

    A plain ``Linear`` gives its weight and bias (``head`` is ``None``); sharded FSDP2 parameters
    (``DTensor``) are gathered once with ``full_tensor()``, as TRL's fused head does. A PEFT
    LoRA layer around the head (``base_layer`` + ``lora_A``) is called as a module, so that the
    adapter's update is part of the logits exactly as in generation.

    Example:
        >>> import torch
        >>> w, b, head = dense_head(torch.nn.Linear(4, 6, bias=False))
        >>> tuple(w.shape), b, head
        ((6, 4), None, None)
    """
    weight = cast(torch.Tensor, lm_head.weight)
    bias = cast("torch.Tensor | None", getattr(lm_head, "bias", None))
    full = getattr(weight, "full_tensor", None)
    if callable(full):  # a DTensor shard
        weight = full()
        full_bias = getattr(bias, "full_tensor", None)
        if callable(full_bias):
            bias = full_bias()
    if hasattr(lm_head, "base_layer") and hasattr(lm_head, "lora_A"):
        return weight, bias, lm_head
    return weight, bias, None


def candidate_loglik_exact(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    candidates: Sequence[float],
    *,
    batch_size: int,
    entropy_temperature: float | None = None,
    autocast: Any = None,
) -> LikelihoodResult:
    """Candidate likelihoods from one extra no-grad forward of ``model`` (the slow, plain path).

    Args:
        model: the causal LM (its plain ``forward`` returning ``.logits``).
        input_ids, attention_mask: ``(N, P + C)`` prompt+completion.
        tokens, mask: ``(N, C)`` the completion tokens and the 0/1 mask of those to score.
        candidates: the ``K`` candidate temperatures.
        batch_size: rows per forward.
        entropy_temperature: also sum the token entropies at this temperature.
        autocast: context-manager factory to run the forward under (``accelerator.autocast``).

    Example:
        >>> import torch
        >>> from metactl.adapters.trl.testing import build_char_tokenizer, build_tiny_model
        >>> m = build_tiny_model(build_char_tokenizer(), hidden_size=32, num_layers=1)
        >>> ids = torch.randint(4, 20, (2, 5))
        >>> r = candidate_loglik_exact(m, ids, torch.ones_like(ids), ids[:, 3:], torch.ones(2, 2),
        ...                            [0.7, 1.0], batch_size=2)
        >>> r.loglik.shape
        torch.Size([2, 2])
    """
    n, c = tokens.shape
    if input_ids.shape[0] != n or input_ids.shape[1] < c + 1:
        raise ValueError("input_ids must hold the prompt (>= 1 token) followed by the completion")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mask = mask.to(torch.long)
    sums = torch.zeros((n, len(candidates)), dtype=torch.float64, device=input_ids.device)
    entropy = 0.0
    with torch.no_grad():
        for r0 in range(0, n, batch_size):
            r1 = min(n, r0 + batch_size)
            sub_mask = mask[r0:r1]
            if not bool(sub_mask.any()):
                continue
            with autocast() if autocast is not None else _null():
                out = model(
                    input_ids=input_ids[r0:r1],
                    attention_mask=attention_mask[r0:r1],
                    logits_to_keep=c + 1,
                    use_cache=False,
                )
            logits = out.logits[:, -(c + 1) : -1]
            rows = torch.arange(r0, r1, device=input_ids.device)
            _accumulate(sums, rows, logits, tokens[r0:r1], sub_mask, candidates)
            if entropy_temperature is not None:
                entropy += _entropy_sum(logits, sub_mask, entropy_temperature)
    return _result(sums, mask, entropy if entropy_temperature is not None else None)


@contextmanager
def _null() -> Iterator[None]:
    yield


class HiddenCapture:
    """Records the backbone's final hidden states during passes TRL already makes.

    ``mode="generate"``: during ``generate`` every forward (prefill, then one per new token) keeps
    the hidden state of its last position, i.e. the state that produced the logits the next token
    was sampled from. ``mode="old"``: during TRL's old-logprob pass (a full forward over
    prompt+completion) it keeps the ``logits_to_keep`` positions that predict the completion.

    The hook is attached only inside ``with capture:`` and records only inside
    ``capture.recording(...)``; everything is detached (no autograd graph is kept).

    Example:
        >>> import torch
        >>> from metactl.adapters.trl.testing import build_char_tokenizer, build_tiny_model
        >>> m = build_tiny_model(build_char_tokenizer(), hidden_size=32, num_layers=1)
        >>> cap = HiddenCapture(m.model, "old")
        >>> with cap, cap.recording(keep=2), torch.no_grad():
        ...     _ = m(input_ids=torch.randint(4, 20, (3, 6)))
        >>> cap.hidden().shape
        torch.Size([3, 2, 32])
    """

    def __init__(self, backbone: torch.nn.Module, mode: Literal["generate", "old"]) -> None:
        if mode not in ("generate", "old"):
            raise ValueError(f"mode must be 'generate' or 'old', got {mode!r}")
        self.backbone = backbone
        self.mode = mode
        self.parts: list[torch.Tensor] = []
        self.calls = 0
        self._keep = 0
        self._active = False
        self._handle: Any = None

    def __enter__(self) -> HiddenCapture:
        self._handle = self.backbone.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._active = False

    @contextmanager
    def recording(self, keep: int = 0) -> Iterator[None]:
        """Record the backbone's outputs inside this block (``keep``: positions, ``"old"`` mode)."""
        if self.mode == "old" and keep < 1:
            raise ValueError("keep (logits_to_keep) must be >= 1 in 'old' mode")
        self._keep, self._active = keep, True
        try:
            yield
        finally:
            self._active = False

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not self._active:
            return
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            hidden = output[0]
        self.calls += 1
        if self.mode == "generate":
            self.parts.append(hidden[:, -1].detach())
        else:
            self.parts.append(hidden[:, -(self._keep + 1) : -1].detach())

    def hidden(self) -> torch.Tensor:
        """``(N, C, H)``: per generated position (``"generate"``) or per completion position."""
        if not self.parts:
            raise RuntimeError("nothing was captured")
        if self.mode == "generate":
            return torch.stack(self.parts, dim=1)
        return torch.cat(self.parts, dim=0)


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
        >>> cap.result(ids[:, -3:], torch.ones(2, 3)).loglik.shape
        torch.Size([2, 2])
    """

    mode = "fused"

    def __init__(
        self, candidates: Sequence[float], *, entropy_temperature: float | None = None
    ) -> None:
        if len(candidates) < 1:
            raise ValueError("candidates must not be empty")
        self.candidates = [float(c) for c in candidates]
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
        import trl.kernels.chunked_logprob as kernel_module
        import trl.trainer.utils as utils_module

        # patched for the duration of the block only (module globals read at call time)
        kernels: Any = kernel_module
        trl_utils: Any = utils_module
        n, length = input_ids.shape
        keep = int(logits_to_keep)
        if not 1 <= keep < length:
            raise ValueError(f"logits_to_keep must be in [1, {length - 1}], got {keep}")
        step = int(batch_size or n)
        device = input_ids.device
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-keep] = -100
        valid = labels[:, 1:] != -100  # (N, L - 1): the rows TRL's head scores
        k = len(self.candidates)
        self._lse = torch.full((n, keep, k), -math.inf, dtype=torch.float64, device=device)
        self._target = torch.zeros((n, keep, k), dtype=torch.float64, device=device)
        self._seen = torch.zeros((n, keep), dtype=torch.bool, device=device)
        self._token_ids = labels[:, -keep:].clone()
        if self.entropy_temperature is not None:
            self._ent_lse = torch.full((n, keep), -math.inf, dtype=torch.float64, device=device)
            self._ent_w = torch.zeros((n, keep), dtype=torch.float64, device=device)
        self._chunks = []
        for start in range(0, n, step):
            sub = valid[start : start + step]
            self._chunks.append(self._plan(sub, start, keep, length))
        chunks = iter(self._chunks)
        original_apply_owner = trl_utils._ChunkedLogProbFunction
        original_tile = kernels._forward_tile
        original_kernel = kernels._forward_kernel
        capture = self

        class _Apply:
            """Stands in for ``ChunkedLogProbFunction`` in ``trl.trainer.utils`` (its ``apply``)."""

            @staticmethod
            def apply(hidden: torch.Tensor, weight: Any, bias: Any, targets: torch.Tensor,
                      *args: Any) -> Any:  # fmt: skip
                chunk = next(chunks, None)
                capture.calls += 1
                if chunk is None or not capture._matches(chunk, hidden, targets):
                    capture.failure = capture.failure or "the fused pass did not match the batch"
                    capture._call = None
                else:
                    chunk.targets = targets
                    chunk.vocab = int(weight.shape[0])
                    capture._call = chunk
                try:
                    return original_apply_owner.apply(hidden, weight, bias, targets, *args)
                finally:
                    capture._call = None

        def tile_fold(tile: torch.Tensor, stride: int, targets: torch.Tensor, *args: Any,
                      **kwargs: Any) -> Any:  # fmt: skip
            capture._fold(tile, targets, args[7], args[8], kwargs)
            return original_tile(tile, stride, targets, *args, **kwargs)

        class _KernelGrid:
            def __getitem__(self, grid: Any) -> Any:
                launch = original_kernel[grid]

                def run(tile: torch.Tensor, stride: int, targets: torch.Tensor, *args: Any,
                        **kwargs: Any) -> Any:  # fmt: skip
                    capture._fold(tile, targets, args[7], args[8], kwargs)
                    return launch(tile, stride, targets, *args, **kwargs)

                return run

        trl_utils._ChunkedLogProbFunction = _Apply
        kernels._forward_tile = tile_fold
        if kernels._use_triton(device):
            kernels._forward_kernel = _KernelGrid()
        try:
            yield
        finally:
            trl_utils._ChunkedLogProbFunction = original_apply_owner
            kernels._forward_tile = original_tile
            kernels._forward_kernel = original_kernel
            self._call = None
        if next(chunks, None) is not None:
            self.failure = self.failure or "the fused pass scored fewer chunks than the batch has"

    def _plan(self, valid: torch.Tensor, start: int, keep: int, length: int) -> _ChunkCall:
        """Where the positions to score sit among one chunk's kernel rows (both layouts)."""
        import trl.kernels.chunked_logprob as kernels

        b, p = torch.nonzero(valid, as_tuple=True)  # row-major, as TRL flattens
        compact = kernels._use_triton(valid.device)
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
        start = time.perf_counter()
        try:
            self._fold_rows(tile, targets, vocab_start, n_cols, kernel_args)
        finally:
            self.seconds += time.perf_counter() - start

    def _fold_rows(
        self,
        tile: torch.Tensor,
        targets: torch.Tensor,
        vocab_start: int,
        n_cols: int,
        kernel_args: dict[str, Any],
    ) -> None:
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
            local = targets[local_rows] - vocab_start
            if self._fold_whole_vocabulary(y, local, b, t, vocab_start, n_cols, call.vocab):
                return
            in_tile = (local >= 0) & (local < n_cols)
            y_target = y.gather(1, local.clamp(0, n_cols - 1).unsqueeze(1)).squeeze(1)
            for k, temperature in enumerate(self.candidates):
                z = y / temperature
                part = torch.logsumexp(z, dim=-1).double()
                self._lse[b, t, k] = torch.logaddexp(self._lse[b, t, k], part)
                value = (y_target / temperature).double()
                self._target[b, t, k] = torch.where(in_tile, value, self._target[b, t, k])
            self._fold_entropy(y, b, t)
            if vocab_start == 0:
                assert self._seen is not None
                self._seen[b, t] = True

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
        32,768) with :func:`metactl.likelihood.candidate_loglik`, the library's optimised
        kernel, and return True; return False for a partial tile (the online fold handles it)."""
        if not (vocab_start == 0 and n_cols == vocab and len(self.candidates) >= 2):
            return False
        assert self._lse is not None and self._target is not None and self._seen is not None
        ones = torch.ones((y.shape[0], 1), dtype=torch.long, device=y.device)
        scored = candidate_loglik(y.unsqueeze(1), local.unsqueeze(1), ones, self.candidates)
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
        return _result(logp.sum(1), mask.to(torch.long), entropy)
