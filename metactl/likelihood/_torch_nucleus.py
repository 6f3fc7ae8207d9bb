"""Torch backend: nucleus (top-p) kept sets from one sort per position (private).

Used by ``_torch_truncation`` for every candidate with ``top_p < 1`` and no top-k (optionally
with min-p), e.g. temperatures under a fixed ``top_p``. A temperature is a monotone
transform of the logits, so the tokens sorted by logit are in the same order for every
candidate: each position's logits are sorted once (on CPU with NumPy's vectorised sort,
~16x faster than ``torch.sort`` here: 1.4 vs 23 ms for 16 x 32768 float32), and every
temperature's ``exp`` pass, which the normaliser needs anyway, runs over the sorted logits.
Every kept set is then a prefix of that order, found without a cumulative sum over the
vocabulary: per temperature, the ``exp`` buffer's sums over blocks of ``_block_size`` tokens
(one reduction); once per segment, for all candidates together, a search over the blocks'
running sums (float64) and a cumulative sum inside the one block where the mass before a
token reaches ``top_p`` times the survivors' mass (that block's probabilities computed again
from its sorted logits, as the pass did). Token ``i`` is kept when that mass (tokens sorted
before it) is ``< top_p * base``; the kept prefix then extends to the end of the last kept
token's tie group (a tie at the boundary is kept whole), as in
:mod:`metactl.likelihood.families`. The sums differ from a float32 cumulative sum only in
rounding order, so only a token whose mass before it ties the threshold to rounding may fall
on the other side (as with any floating-point sampler).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ._torch_ops import _exp_inplace, _Scratch
from .families import CandidateSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _block_size(vocab: int) -> int:
    """Tokens per block: about sqrt(V) (a power of two), so the running sums over blocks and
    the cumulative sum inside one block are both small."""
    return int(2 ** max(0, round(math.log2(max(1.0, math.sqrt(vocab))))))


class _NucleusPlan:
    """Per-call constants of the nucleus candidates ``idx`` (indices into the spec)."""

    def __init__(
        self,
        torch: Any,
        spec: CandidateSpec,
        idx: list[int],
        groups: list[tuple[float, list[int]]],
        vocab: int,
        unit: float,
        use_exp2: bool,
        device: Any,
    ) -> None:
        self.idx = idx
        self.use_exp2 = use_exp2
        pos_of = {j: p for p, j in enumerate(idx)}
        # positions (into idx) of each temperature group's nucleus candidates
        self.members = [[pos_of[j] for j in members if j in pos_of] for _, members in groups]
        top_p = spec.top_p[idx]
        min_p = spec.min_p[idx]
        self.top_p = torch.tensor(top_p, dtype=torch.float64, device=device).unsqueeze(-1)
        # the float32 min-p threshold on p / p_max, as the min-p family evaluates it
        self.min_p = torch.tensor(min_p.astype(np.float32), device=device).unsqueeze(-1)
        has_mp = min_p > 0
        self.has_mp = has_mp.tolist()
        # per group: its candidates with min-p (finished per group, see _score_with_min_p)
        self.with_mp = [
            torch.tensor([p for p in m if has_mp[p]], dtype=torch.long, device=device)
            for m in self.members
        ]
        # vLLM applies min-p first: top-p then measures mass among the min-p survivors
        self.mp_base = torch.from_numpy(has_mp & (spec.order == "vllm")).to(device).unsqueeze(-1)
        self.block = _block_size(vocab)
        self.n_blocks = -(-vocab // self.block)
        self.offsets = torch.arange(self.block, device=device)
        # Candidates without min-p ("plain"): each group only stores its block sums, and all
        # finish together at the end of the segment. slot[g]: the group's row of block sums.
        self.slot: list[int | None] = []
        plain_pos: list[int] = []
        plain_slot: list[int] = []
        self.n_slots = 0
        for g_members in self.members:
            plain = [p for p in g_members if not has_mp[p]]
            if not plain:
                self.slot.append(None)
                continue
            self.slot.append(self.n_slots)
            plain_pos += plain
            plain_slot += [self.n_slots] * len(plain)
            self.n_slots += 1
        self.plain_pos = torch.tensor(plain_pos, dtype=torch.long, device=device)
        self.plain_slot = torch.tensor(plain_slot, dtype=torch.long, device=device)
        self.plain_top_p = torch.tensor(top_p[plain_pos], dtype=torch.float64, device=device)
        self.plain_scale = torch.tensor(
            unit / spec.temperature[idx][plain_pos], dtype=torch.float32, device=device
        ).view(1, -1, 1)  # exp(u / T) == exp2(scale * u) when unit = 1 / ln 2


class _SortedSegment:
    """One segment's logits sorted in descending order, stored negated (``neg``, ascending,
    for ``searchsorted``; input dtype, float32 for 16-bit input, which converts exactly)."""

    def __init__(self, torch: Any, seg: torch.Tensor, tok: torch.Tensor, scratch: _Scratch) -> None:
        c = seg.shape[0]
        dtype = torch.float64 if seg.dtype == torch.float64 else torch.float32
        if seg.device.type == "cpu":
            name = "sorted64" if dtype == torch.float64 else "sorted"
            neg = scratch.get(name, dtype)[:c]
            if seg.dtype == dtype:
                torch.neg(seg, out=neg)
            else:  # 16-bit input: converted exactly, then negated
                neg.copy_(seg).neg_()
            neg.numpy().sort(axis=-1)  # in place; NumPy releases the GIL while sorting
        else:
            neg = torch.sort(-seg.to(dtype), dim=-1).values
        self.neg = neg
        z_o = seg.gather(-1, tok).to(dtype)  # (c, 1)
        self.neg_o = -z_o
        # where the sampled token's tie group starts in the sorted order
        self.pos_o = torch.searchsorted(neg, self.neg_o)  # (c, 1)


class _NucleusSegment:
    """The nucleus candidates of one segment: :meth:`score_group` on each temperature
    group's ``exp`` buffer (over the sorted logits), then :meth:`result` once.

    Candidates without min-p (the common case) keep, per group, only the ``exp`` buffer's
    block sums (one reduction) and finish together in :meth:`result`, in a few batched ops
    over the boundary blocks; candidates with min-p are finished per group
    (``_score_with_min_p``)."""

    def __init__(
        self, torch: Any, plan: _NucleusPlan, srt: _SortedSegment, m: torch.Tensor
    ) -> None:
        self.torch = torch
        self.plan = plan
        self.srt = srt
        self.m = m  # (c, 1) float32 row maxima
        c, vocab = srt.neg.shape
        n = len(plan.idx)
        device = srt.neg.device
        self.vocab = vocab
        self.kept_mass = torch.empty((c, n), dtype=torch.float32, device=device)
        self.kept_o = torch.empty((c, n), dtype=torch.bool, device=device)
        # block sums of the groups with plain candidates (float64)
        self.block_sums = torch.empty((plan.n_slots, c, plan.n_blocks), dtype=torch.float64,
                                      device=device)  # fmt: skip

    def score_group(self, g: int, e: torch.Tensor, total: torch.Tensor) -> bool:
        """Group ``g``'s part, while its ``exp`` buffer ``e`` lives: ``(c, V)`` ``p / p_max``
        over the sorted logits (non-increasing; not yet thresholded). When the group has
        nucleus candidates, writes its normaliser into ``total`` (``(c,)`` float32, the sum
        of its block sums, >= 1) and returns True; else returns False (nothing done)."""
        plan = self.plan
        if not plan.members[g]:
            return False
        slot = plan.slot[g]
        sums = self._block_sums(e, None if slot is None else self.block_sums[slot])
        # the normaliser from the block sums: the same tokens summed, no second pass over e
        total.copy_(sums.sum(dim=-1)).clamp_min_(1.0)  # >= 1 up to rounding (max term is 1)
        pos = plan.with_mp[g]
        if pos.numel():
            self._score_with_min_p(pos, e, self._running(sums), total)
        return True

    def result(
        self, logp_o: torch.Tensor, totals: torch.Tensor, eps: float, smoothed: Any
    ) -> torch.Tensor:
        """``(S, c)`` log q of the nucleus candidates (``logp_o``, ``totals``: ``(S, c)``)."""
        if self.plan.n_slots:
            self._finish_plain(totals)
        return smoothed(logp_o, self.kept_o.T, self.kept_mass.T, totals, eps)

    def _finish_plain(self, totals: torch.Tensor) -> None:
        """Kept sets of all candidates without min-p at once, from their groups' block sums
        and the sorted logits of each one's boundary block (whose probabilities are computed
        again here, as the ``exp`` pass did)."""
        torch = self.torch
        plan = self.plan
        bs = plan.block
        vocab = self.vocab
        neg = self.srt.neg
        c = neg.shape[0]
        pos = plan.plain_pos
        s = pos.numel()
        incl = self._running(self.block_sums)  # (G, c, nb + 1)
        incl = incl.index_select(0, plan.plain_slot).permute(1, 0, 2).contiguous()  # (c, S, .)
        limit = (totals.index_select(0, pos).T.double() * plan.plain_top_p).contiguous()
        # incl[..., 0] = 0 < limit, so the count is >= 1: jb = count - 1 is the block whose
        # running sum first reaches the limit (the last block if rounding never lets it)
        jb = torch.searchsorted(incl, limit.unsqueeze(-1).contiguous()).squeeze(-1) - 1
        jb.clamp_max_(plan.n_blocks - 1)
        before = incl.gather(-1, jb.unsqueeze(-1)).squeeze(-1)  # mass before the block
        index = jb.unsqueeze(-1) * bs + plan.offsets  # (c, S, bs)
        inside = index < vocab
        index.clamp_max_(vocab - 1)
        block_neg = neg.gather(1, index.view(c, s * bs)).view(c, s, bs)
        # p / p_max of the block's tokens: exp(beta (z - max)) with z = -neg
        block = (block_neg.float() + self.m.unsqueeze(-1)) * -plan.plain_scale
        _exp_inplace(block, plan.use_exp2)
        block.mul_(inside)  # zero past the vocabulary
        cum = block.cumsum(dim=-1, dtype=torch.float64)
        # token i is kept when the mass sorted before it is < limit: the tokens whose
        # inclusive running sum is below the limit, plus one (the first token always is).
        # If rounding lets the whole block pass although its block sum reached the limit,
        # the boundary is its last token (a rounding-level tie either way).
        below = torch.searchsorted(cum, (limit - before).unsqueeze(-1)).squeeze(-1)
        last = (jb * bs + below.clamp_max_(bs - 1)).clamp_max_(vocab - 1)  # (c, S)
        last_in = (last - jb * bs).unsqueeze(-1)
        boundary = neg.gather(1, last)  # negated smallest kept logit
        # the kept prefix ends with the boundary's tie group (every logit >= it); its
        # members after ``last`` share the boundary token's probability
        n = torch.searchsorted(neg, boundary, right=True)
        mass = before + cum.gather(-1, last_in).squeeze(-1)
        mass += (n - last - 1).double() * block.gather(-1, last_in).squeeze(-1).double()
        self.kept_mass[:, pos] = mass.float()
        self.kept_o[:, pos] = self.srt.neg_o <= boundary  # z_o >= smallest kept logit

    def _block_sums(self, e: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``(c, nb)`` float64 sums of ``e`` over the blocks (the last may be partial)."""
        torch = self.torch
        c, vocab = e.shape
        bs = self.plan.block
        full = vocab // bs
        if out is None:
            out = torch.empty((c, self.plan.n_blocks), dtype=torch.float64, device=e.device)
        # float32 sums of bs terms (a float64 reduction over the whole buffer is much slower)
        if full:
            out[:, :full] = e[:, : full * bs].reshape(c, full, bs).sum(dim=-1)
        if full < self.plan.n_blocks:
            out[:, full] = e[:, full * bs :].sum(dim=-1)
        return out

    def _running(self, sums: torch.Tensor) -> torch.Tensor:
        """``(..., nb + 1)``: column ``j`` is the mass of the blocks before block ``j``."""
        torch = self.torch
        zero = torch.zeros((*sums.shape[:-1], 1), dtype=sums.dtype, device=sums.device)
        return torch.cat([zero, sums], dim=-1).cumsum_(dim=-1)

    def _boundary_block(
        self, e: torch.Tensor, incl: torch.Tensor, limit: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For limits ``(c, S)``: the block where the running mass first reaches each
        (``jb``, ``(c, S)``), the mass before it (float64) and its ``(c, S, bs)`` entries."""
        torch = self.torch
        # incl[:, 0] = 0 < limit, so the count is >= 1: jb = count - 1 is the block whose
        # running sum first reaches the limit (the last block if rounding never lets it)
        jb = (torch.searchsorted(incl, limit.contiguous()) - 1).clamp_max_(self.plan.n_blocks - 1)
        before = incl.gather(1, jb)
        return jb, before, self._blocks(e, jb)

    def _blocks(self, e: torch.Tensor, jb: torch.Tensor) -> torch.Tensor:
        """Block ``jb[r, s]`` of row ``r`` of ``e`` for each ``s``: ``(c, S, bs)`` values,
        zero past the vocabulary."""
        c, vocab = e.shape
        s = jb.shape[1]
        bs = self.plan.block
        index = jb.unsqueeze(-1) * bs + self.plan.offsets  # (c, S, bs)
        if vocab % bs == 0:
            return e.gather(1, index.view(c, s * bs)).view(c, s, bs)
        inside = index < vocab
        vals = e.gather(1, index.clamp_max_(vocab - 1).view(c, s * bs)).view(c, s, bs)
        return vals * inside

    def _prefix_mass(self, e: torch.Tensor, incl: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """``(c, S)`` float64 mass of the first ``n[r, s] >= 1`` sorted tokens of each row."""
        torch = self.torch
        bs = self.plan.block
        jb = (n - 1) // bs  # the block of the last token counted
        block = self._blocks(e, jb)
        count = n - jb * bs  # tokens of that block counted, in [1, bs]
        upto = self.plan.offsets < count.unsqueeze(-1)
        return incl.gather(1, jb) + (block * upto).sum(dim=-1, dtype=torch.float64)

    def _count_at_least(self, e: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """``(c, S)``: how many entries of each (non-increasing) row of ``e`` are ``>=
        threshold[s]`` (``(S,)``, in ``(0, 1)``): whole blocks by their last entry, then
        the entries of the first block that falls below."""
        torch = self.torch
        vocab = e.shape[1]
        bs = self.plan.block
        full = vocab // bs
        lasts = e[:, bs - 1 : full * bs : bs]  # (c, full) last entry of each full block
        jb = (lasts.unsqueeze(1) >= threshold.view(1, -1, 1)).sum(dim=-1)  # (c, S)
        block = self._blocks(e, jb.clamp_max(self.plan.n_blocks - 1))
        inside = (block >= threshold.view(1, -1, 1)).sum(dim=-1)
        return torch.where(jb < self.plan.n_blocks, jb * bs + inside, jb * bs)

    def _score_with_min_p(
        self, pos: torch.Tensor, e: torch.Tensor, incl: torch.Tensor, total: torch.Tensor
    ) -> None:
        """Kept sets of the candidates ``pos`` of one group that also have min-p: the
        intersection of the min-p and top-p prefixes (vLLM: top-p among the min-p
        survivors)."""
        torch = self.torch
        plan = self.plan
        neg = self.srt.neg
        n_mp = self._count_at_least(e, plan.min_p.index_select(0, pos).squeeze(-1))  # (c, S)
        base = total.double().unsqueeze(-1).expand(-1, pos.numel())
        base = torch.where(plan.mp_base.index_select(0, pos).T, self._prefix_mass(e, incl, n_mp),
                           base)  # fmt: skip
        limit = base * plan.top_p.index_select(0, pos).T
        jb, before, block = self._boundary_block(e, incl, limit)
        cum = block.cumsum(dim=-1, dtype=torch.float64)
        below = torch.searchsorted(cum, (limit - before).unsqueeze(-1)).squeeze(-1)
        last = (jb * plan.block + below.clamp_max_(plan.block - 1)).clamp_max_(self.vocab - 1)
        n_p = torch.searchsorted(neg, neg.gather(1, last), right=True)  # whole tie group
        n = torch.minimum(n_p, n_mp)
        self.kept_mass[:, pos] = self._prefix_mass(e, incl, n).float()
        self.kept_o[:, pos] = self.srt.neg_o <= neg.gather(1, n - 1)
