"""How the candidates of a policy are scored on TRL's batches: the scoring setup
(:class:`CandidateScoring`), and the exact (extra forward) and fast (captured) paths.

Both paths return, for every completion ``i`` of the local batch and every candidate ``k`` (a
temperature ``T_k``, or any sampler setting of a :class:`CandidateScoring`), the *summed*
log-likelihood of the sampled tokens under the candidate's sampling distribution (via
:func:`metactl.likelihood.candidate_loglik`: ``softmax(z / T_k)`` for plain temperatures), where
``z`` are the raw logits of the policy that sampled the batch, and the number of tokens scored:
:func:`metactl.build_feedback` reduces them to what the rule reads (mean or sum). The fused path
(scoring inside TRL's own log-prob head) is in :mod:`.fused`.

* **exact**: one no-grad forward of the policy over prompt+completion, materialising the logits
  of the completion positions (``logits_to_keep``), batch by batch.
* **fast**: no extra transformer forward. A :class:`HiddenCapture` hook on the backbone records
  the final hidden states during a pass TRL makes anyway (the old-logprob pass, or the
  generation itself), and :func:`candidate_loglik_from_hidden` applies the LM head window by window
  (a bounded number of positions at a time), so the ``(N, L, V)`` logits never exist at once.

Completions with no scored token (e.g. ``mask_truncated_completions=True``) get
``loglik_sum[i, :] = 0`` and ``counts[i] = 0``, so the trainer can give them zero weight.

Both paths (and :mod:`.fused`) also hand back, on request (``keep``), the raw logits of some
completion positions (:class:`RawLogits`): the effective-temperature check reads them, so it
costs no extra transformer forward and no extra LM-head matmul on the scoring paths.
:func:`check_positions` picks those positions under a memory bound, and
:func:`raw_logits_from_hidden` / :func:`raw_logits_exact` give them when no candidate is scored.

Example:
    >>> import torch
    >>> hidden = torch.randn(2, 3, 8)
    >>> weight = torch.randn(11, 8)
    >>> tokens = torch.randint(0, 11, (2, 3))
    >>> mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    >>> res = candidate_loglik_from_hidden(hidden, tokens, mask, weight, None, [0.5, 1.0])
    >>> res.loglik_sum.shape, res.counts.tolist()
    (torch.Size([2, 2]), [2, 3])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch

import metactl
from metactl.knobs import KNOB_OFF, KNOBS, Setting, check_knob, joint_candidates
from metactl.likelihood import candidate_loglik

__all__ = [
    "DEFAULT_CHECK_BYTES",
    "CandidateScoring",
    "HiddenCapture",
    "LikelihoodResult",
    "RawLogits",
    "ScoringPath",
    "candidate_loglik_exact",
    "candidate_loglik_from_hidden",
    "check_positions",
    "dense_head",
    "engine_knob",
    "raw_logits_exact",
    "raw_logits_from_hidden",
]

#: Where a generation batch's candidate likelihoods come from: TRL's fused head during its
#: old-logprob pass, hidden states captured during that pass or during generation, or an extra
#: forward.
ScoringPath = Literal["fused", "old", "generate", "exact"]

#: Default size of one window of materialised logits (float32 bytes).
DEFAULT_WINDOW_BYTES = 64 << 20
#: Default bound on the raw logits kept for the effective-temperature check (float32 bytes):
#: 1,365 positions at a vocabulary of 49,152, 436 at 152,064.
DEFAULT_CHECK_BYTES = 256 << 20


def engine_knob(knob: str, value: Any) -> Any:
    """A user's fixed value of ``knob`` as the likelihood families take it: TRL and the engines
    spell "off" as ``None`` or (``top_k``) ``0`` / ``-1``; those become
    :data:`metactl.knobs.KNOB_OFF`, every other value is checked with
    :func:`metactl.knobs.check_knob`.

    Example:
        >>> engine_knob("top_k", 0), engine_knob("top_k", 40), engine_knob("min_p", None)
        (None, 40, 0.0)
    """
    if value is None:
        return KNOB_OFF[knob]
    if knob == "top_k" and type(value) is int and value in (0, -1):
        return KNOB_OFF[knob]
    return check_knob(knob, value)


@dataclass(frozen=True)
class CandidateScoring:
    """How the candidates of one policy are scored on one engine: the family, the candidates
    (values of the owned knob, or joint mappings), the sampler ``setting`` holding the knobs
    the candidates do not vary (each owned knob at its off value) and the order.

    :meth:`loglik` is :func:`metactl.likelihood.candidate_loglik` with exactly these arguments.
    A plain list of temperatures is ``CandidateScoring.of([0.7, 1.0])``.

    Example:
        >>> import numpy as np
        >>> s = CandidateScoring(candidates=(0.8, 1.2), setting=Setting(top_p=0.9))
        >>> s.loglik(np.zeros((1, 2, 4)), np.array([[0, 3]]), np.ones((1, 2))).shape
        (1, 2)
        >>> s.plain_temperatures is None, CandidateScoring.of([0.8, 1.2]).plain_temperatures
        (True, [0.8, 1.2])
        >>> s.labels()
        ['0.8', '1.2']
    """

    candidates: tuple[Any, ...]
    family: str = "temperature"
    setting: Setting = field(default_factory=Setting)
    order: str = "hf"

    @classmethod
    def of(cls, candidates: Sequence[float] | CandidateScoring) -> CandidateScoring:
        """``candidates`` itself, or the plain temperature family over a list of temperatures."""
        if isinstance(candidates, CandidateScoring):
            return candidates
        values = tuple(float(c) for c in candidates)
        if len(values) < 1:
            raise ValueError("candidates must not be empty")
        return cls(candidates=values)

    @classmethod
    def for_policy(
        cls, policy: metactl.MetaPolicy, settings: Mapping[str, Any], *, order: str
    ) -> CandidateScoring:
        """The scoring of ``policy``'s candidates with every knob it does not own held at its
        value in ``settings`` (the engine's effective sampling settings, TRL's spelling).

        Example:
            >>> import metactl
            >>> policy = metactl.MetaPolicy([0.9, 1.0], metactl.EXP3(), hyperparameter="top_p")
            >>> s = CandidateScoring.for_policy(
            ...     policy, {"temperature": 0.8, "top_k": 0, "min_p": None}, order="hf")
            >>> s.family, s.candidates, s.setting
            ('top_p', (0.9, 1.0), Setting(temperature=0.8, top_p=1.0, top_k=None, min_p=0.0))
        """
        fixed = Setting(**{knob: engine_knob(knob, settings.get(knob)) for knob in KNOBS
                           if knob not in policy.knobs})
        if policy.family == "joint":  # each candidate's setting, knobs in canonical order
            scored = tuple(policy.setting(k) for k in range(policy.num_candidates))
        else:
            scored = tuple(policy.candidates.tolist())
        return cls(candidates=scored, family=policy.family, setting=fixed, order=order)

    def __len__(self) -> int:
        return len(self.candidates)

    def labels(self) -> list[str]:
        """One metric label per candidate: ``'0.9'`` for one knob, the
        :meth:`metactl.knobs.KnobGrid.labels` (``'temperature=0.7,top_p=0.9'``) for a joint one."""
        if self.family == "joint":
            return joint_candidates(list(self.candidates)).labels()
        return [f"{c:g}" for c in self.candidates]

    @property
    def plain_temperatures(self) -> list[float] | None:
        """The candidate temperatures when nothing but the temperature shapes the distribution
        (the case TRL's fused head tiles can be folded online), else ``None``."""
        if self.family != "temperature" or self.setting.truncated:
            return None
        return [float(c) for c in self.candidates]

    def loglik(self, logits: Any, tokens: Any, mask: Any) -> Any:
        """``(N, K)`` length-normalised log-likelihoods (see ``candidate_loglik``)."""
        return candidate_loglik(logits, tokens, mask, list(self.candidates), self.family,
                                order=self.order, **self.setting.as_dict())


@dataclass(frozen=True)
class RawLogits:
    """The raw logits (before any temperature or truncation) of some completion positions.

    Attributes:
        logits: ``(M, V)`` float32, one row per position of ``positions`` in row-major order.
        positions: ``(N, C)`` bool, which completion positions (``M`` of them).

    Example:
        >>> import torch
        >>> raw = RawLogits(torch.zeros(2, 5), torch.tensor([[True, False], [False, True]]))
        >>> raw.rows().tolist()
        [0, 1]
    """

    logits: torch.Tensor
    positions: torch.Tensor

    def __post_init__(self) -> None:
        count = int(self.positions.sum())
        if self.logits.dim() != 2 or self.logits.shape[0] != count:
            raise ValueError(
                f"logits must have shape ({count}, V) for {count} positions, got "
                f"{tuple(self.logits.shape)}"
            )

    def rows(self) -> torch.Tensor:
        """``(M,)`` the batch row of each position."""
        return torch.nonzero(self.positions, as_tuple=True)[0]

    def tokens(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """``(M,)`` the sampled token at each position."""
        return completion_ids.to(self.positions.device)[self.positions]

    def restricted(self, mask: torch.Tensor) -> RawLogits:
        """Only the positions that ``mask`` (``(N, C)``) also holds."""
        mask = mask.to(device=self.positions.device, dtype=torch.bool)
        inside = mask[self.positions]
        return RawLogits(self.logits[inside.to(self.logits.device)], self.positions & mask)


@dataclass(frozen=True)
class LikelihoodResult:
    """Candidate likelihoods of one local batch.

    Attributes:
        loglik_sum: ``(N, K)`` float64, the summed log-likelihood of row ``i``'s scored tokens
            under candidate ``k`` (0 for rows with no scored token).
        counts: ``(N,)`` int64, number of scored tokens per row.
        entropy_sum: sum over scored tokens of the entropy (nats) of ``softmax(z / T)`` at the
            requested temperature, or ``None`` when not requested.
        raw: the raw logits of the positions asked for (``keep``), else ``None``.
    """

    loglik_sum: torch.Tensor
    counts: torch.Tensor
    entropy_sum: float | None = None
    raw: RawLogits | None = None

    @property
    def loglik(self) -> torch.Tensor:
        """``(N, K)`` per-token means (``loglik_sum / counts``; 0 for rows with no token)."""
        return self.loglik_sum / self.counts.clamp(min=1).double().unsqueeze(1)


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


def _accumulate(
    sums: torch.Tensor,
    rows: torch.Tensor,
    logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    scoring: CandidateScoring,
) -> None:
    """Add the summed log-likelihoods of this window's scored tokens to ``sums[rows]``
    (``candidate_loglik`` gives each row's mean over the window's tokens; times their number is
    the window's sum)."""
    counts = mask.sum(1)
    keep = counts > 0
    if not bool(keep.any()):
        return
    means = cast(torch.Tensor, scoring.loglik(logits[keep], tokens[keep], mask[keep]))
    sums.index_add_(
        0,
        rows[keep].to(sums.device),
        means.double() * counts[keep].double().unsqueeze(1).to(means.device),
    )


def check_positions(mask: torch.Tensor, vocab: int, limit_bytes: int) -> torch.Tensor:
    """``(N, C)`` bool: the scored positions whose raw logits the effective-temperature check
    reads: all of ``mask``, or, when their float32 logits (``4 * vocab`` bytes each) exceed
    ``limit_bytes``, as many as fit, evenly spaced in row-major order (chosen from the mask
    alone, never from the sampled tokens).

    Example:
        >>> import torch
        >>> check_positions(torch.ones(2, 3), vocab=10, limit_bytes=80).int().tolist()
        [[1, 0, 0], [1, 0, 0]]
    """
    if vocab < 1 or limit_bytes < 1:
        raise ValueError(f"vocab and limit_bytes must be >= 1, got {vocab} and {limit_bytes}")
    keep = mask.to(torch.bool)
    limit = max(1, limit_bytes // (4 * vocab))
    flat = torch.nonzero(keep.flatten()).flatten()
    if flat.numel() <= limit:
        return keep.clone()
    pick = flat[(torch.arange(limit, device=flat.device) * flat.numel()) // limit]
    out = torch.zeros(keep.numel(), dtype=torch.bool, device=keep.device)
    out[pick] = True
    return out.view_as(keep)


class _KeptLogits:
    """Collects the raw logits of the positions of ``keep`` window by window."""

    def __init__(self, keep: torch.Tensor, mask: torch.Tensor, vocab: int,
                 device: torch.device) -> None:  # fmt: skip
        if keep.shape != mask.shape:
            raise ValueError(
                f"keep must have the shape of the mask {tuple(mask.shape)}, got {tuple(keep.shape)}"
            )
        self.positions = keep.to(device=mask.device, dtype=torch.bool) & mask.to(torch.bool)
        self.slot = (self.positions.flatten().cumsum(0) - 1).view_as(self.positions)
        count = int(self.positions.sum())
        self.logits = torch.empty((count, vocab), dtype=torch.float32, device=device)

    def add(self, rows: slice, cols: slice, z: torch.Tensor) -> None:
        """Keep the logits ``z`` (``(rows, cols, V)``) of the window's kept positions."""
        sub = self.positions[rows, cols]
        if bool(sub.any()):
            index = self.slot[rows, cols][sub].to(self.logits.device)
            self.logits[index] = z[sub.to(z.device)].float()

    def result(self) -> RawLogits:
        return RawLogits(self.logits, self.positions)


def candidate_loglik_from_hidden(
    hidden: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    candidates: Sequence[float] | CandidateScoring,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    entropy_temperature: float | None = None,
    window_bytes: int = DEFAULT_WINDOW_BYTES,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    keep: torch.Tensor | None = None,
) -> LikelihoodResult:
    """Candidate likelihoods from final hidden states, applying the LM head window by window.

    Args:
        hidden: ``(N, C, H)`` final hidden states; ``hidden[:, t]`` predicts ``tokens[:, t]``.
        tokens: ``(N, C)`` sampled token ids.
        mask: ``(N, C)`` 0/1, the tokens to score.
        weight, bias: the LM head (``(V, H)``, ``(V,)`` or ``None``).
        candidates: the ``K`` candidate temperatures, or a :class:`CandidateScoring` (any
            family, with the fixed knobs and the engine's order).
        logit_scale, softcap: the model's logit scaling and soft-capping (as TRL's fused head).
        entropy_temperature: also sum the token entropies of ``softmax(z / T)`` at this ``T``.
        window_bytes: bound on one window of float32 logits (rows x positions x V x 4 bytes).
        head: computes the raw logits of a ``(rows, positions, H)`` window instead of
            ``linear(hidden, weight, bias)``: for an LM head that is more than one matrix (a PEFT
            LoRA layer adds its low-rank update). ``weight`` then only gives the vocabulary size.
        keep: ``(N, C)`` bool, positions (of ``mask``) whose raw logits to return as well
            (``result.raw``), copied from the windows as they are computed.

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
    scoring = CandidateScoring.of(candidates)
    vocab = weight.shape[0]
    mask = mask.to(torch.long)
    width = max(1, min(c, window_bytes // (4 * vocab)))
    height = max(1, window_bytes // (4 * vocab * width))
    sums = torch.zeros((n, len(scoring)), dtype=torch.float64, device=hidden.device)
    kept = None if keep is None else _KeptLogits(keep, mask, vocab, hidden.device)
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
                _accumulate(sums, rows, z, tokens[r0:r1, t0:t1], sub_mask, scoring)
                if entropy_temperature is not None:
                    entropy += _entropy_sum(z, sub_mask, entropy_temperature)
                if kept is not None:
                    kept.add(slice(r0, r1), slice(t0, t1), z)
    return LikelihoodResult(sums, mask.sum(1), entropy if entropy_temperature is not None else None,
                            None if kept is None else kept.result())  # fmt: skip


def raw_logits_from_hidden(
    hidden: torch.Tensor,
    keep: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> RawLogits:
    """The raw logits of the positions of ``keep`` (``(N, C)`` bool) from final hidden states
    (``(N, C, H)``; ``hidden[:, t]`` predicts completion position ``t``): the LM head applied to
    those positions only, as :func:`candidate_loglik_from_hidden` forms them.

    Example:
        >>> import torch
        >>> h, w = torch.randn(2, 3, 4), torch.randn(5, 4)
        >>> keep = torch.tensor([[True, False, True], [False, False, True]])
        >>> raw = raw_logits_from_hidden(h, keep, w, None)
        >>> torch.allclose(raw.logits, h[keep] @ w.T)
        True
    """
    if hidden.dim() != 3 or keep.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden must have shape (N, C, H) and keep (N, C), got {tuple(hidden.shape)} and "
            f"{tuple(keep.shape)}"
        )
    positions = keep.to(device=hidden.device, dtype=torch.bool)
    with torch.no_grad():
        z = _logits(hidden[positions].unsqueeze(0), weight, bias, logit_scale, softcap, head)
    return RawLogits(z[0], positions)


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
    candidates: Sequence[float] | CandidateScoring,
    *,
    batch_size: int,
    entropy_temperature: float | None = None,
    autocast: Any = None,
    keep: torch.Tensor | None = None,
) -> LikelihoodResult:
    """Candidate likelihoods from one extra no-grad forward of ``model`` (the slow, plain path).

    Args:
        model: the causal LM (its plain ``forward`` returning ``.logits``).
        input_ids, attention_mask: ``(N, P + C)`` prompt+completion.
        tokens, mask: ``(N, C)`` the completion tokens and the 0/1 mask of those to score.
        candidates: the ``K`` candidate temperatures, or a :class:`CandidateScoring`.
        batch_size: rows per forward.
        entropy_temperature: also sum the token entropies at this temperature.
        autocast: context-manager factory to run the forward under (``accelerator.autocast``).
        keep: ``(N, C)`` bool, positions (of ``mask``) whose raw logits to return as well
            (``result.raw``).

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
    scoring = CandidateScoring.of(candidates)
    mask = mask.to(torch.long)
    n = tokens.shape[0]
    sums = torch.zeros((n, len(scoring)), dtype=torch.float64, device=input_ids.device)
    kept: _KeptLogits | None = None
    entropy = 0.0
    for rows, logits in _completion_logits(model, input_ids, attention_mask, tokens, mask,
                                           batch_size, autocast):  # fmt: skip
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        sub_mask = mask[r0:r1]
        _accumulate(sums, rows, logits, tokens[r0:r1], sub_mask, scoring)
        if entropy_temperature is not None:
            entropy += _entropy_sum(logits, sub_mask, entropy_temperature)
        if keep is not None:
            if kept is None:
                kept = _KeptLogits(keep, mask, logits.shape[-1], logits.device)
            kept.add(slice(r0, r1), slice(None), logits)
    raw = None
    if keep is not None:
        raw = kept.result() if kept is not None else _no_logits(keep, mask, input_ids.device)
    return LikelihoodResult(sums, mask.sum(1), entropy if entropy_temperature is not None else None,
                            raw)  # fmt: skip


def raw_logits_exact(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tokens: torch.Tensor,
    keep: torch.Tensor,
    *,
    batch_size: int,
    autocast: Any = None,
) -> RawLogits:
    """The raw logits of the positions of ``keep`` (``(N, C)`` bool) from a no-grad forward of
    ``model`` over the rows that hold one (the arguments as :func:`candidate_loglik_exact`'s):
    for batches no pass of TRL's records.

    Example:
        >>> import torch
        >>> from metactl.adapters.trl.testing import build_char_tokenizer, build_tiny_model
        >>> m = build_tiny_model(build_char_tokenizer(), hidden_size=32, num_layers=1)
        >>> ids = torch.randint(4, 20, (2, 5))
        >>> keep = torch.tensor([[True, False], [True, True]])
        >>> raw_logits_exact(m, ids, torch.ones_like(ids), ids[:, 3:], keep,
        ...                  batch_size=2).logits.shape
        torch.Size([3, 21])
    """
    kept: _KeptLogits | None = None
    for rows, logits in _completion_logits(model, input_ids, attention_mask, tokens, keep,
                                           batch_size, autocast):  # fmt: skip
        if kept is None:
            kept = _KeptLogits(keep, keep, logits.shape[-1], logits.device)
        kept.add(slice(int(rows[0]), int(rows[-1]) + 1), slice(None), logits)
    return kept.result() if kept is not None else _no_logits(keep, keep, input_ids.device)


def _no_logits(keep: torch.Tensor, mask: torch.Tensor, device: torch.device) -> RawLogits:
    """No kept position (an empty mask): zero rows."""
    positions = keep.to(torch.bool) & mask.to(torch.bool)
    return RawLogits(torch.empty((0, 0), device=device), positions)


def _completion_logits(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    batch_size: int,
    autocast: Any,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(rows, logits)`` per forward of ``batch_size`` rows that hold a position of ``mask``:
    the rows' indices and their ``(rows, C, V)`` logits at the completion positions."""
    n, c = tokens.shape
    if input_ids.shape[0] != n or input_ids.shape[1] < c + 1:
        raise ValueError("input_ids must hold the prompt (>= 1 token) followed by the completion")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for r0 in range(0, n, batch_size):
        r1 = min(n, r0 + batch_size)
        if not bool(mask[r0:r1].any()):
            continue
        with torch.no_grad(), autocast() if autocast is not None else _null():
            out = model(
                input_ids=input_ids[r0:r1],
                attention_mask=attention_mask[r0:r1],
                logits_to_keep=c + 1,
                use_cache=False,
            )
        yield torch.arange(r0, r1, device=input_ids.device), out.logits[:, -(c + 1) : -1]


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
