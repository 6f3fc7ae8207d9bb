"""Torch backend: truncated candidates (top-k, top-p and min-p under any temperature; joint
grids; see :mod:`metactl.likelihood.families` for the kept sets). Private.

Each candidate takes one of four routes, all sharing one ``exp`` pass per temperature:
no truncation (the plain log-probability); min-p alone (thresholded in place in the ``exp``
buffer); top-p without top-k, with or without min-p (``_torch_nucleus``: each position's
logits sorted once, and every ``exp`` pass run over that order); top-k, with or without the
others (a ``torch.topk`` window of the top ``k + 1`` logits, T-invariant and taken once; see
:func:`_score_sorted`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..knobs import _kept_count_torch, _smoothed_torch
from ._checks import _square_plan
from ._torch_nucleus import _NucleusPlan, _NucleusSegment, _SortedSegment
from ._torch_ops import _exp_inplace, _scaled_shift, _Scratch
from .families import CandidateSpec, temperature_groups

if TYPE_CHECKING:  # pragma: no cover
    import torch

# Smallest sorted-logit window of the top-k path (fewer gains nothing).
_MIN_WINDOW = 16


class _TruncPlan:
    """Per-call constants of the truncated path (built once, shared by the workers)."""

    def __init__(
        self,
        torch: Any,
        spec: CandidateSpec,
        device: Any,
        vocab: int,
        unit: float,
        use_exp2: bool,
    ) -> None:
        self.spec = spec
        self.groups = temperature_groups(spec)
        k = spec.size
        group_of = np.empty(k, dtype=np.int64)
        for g, (_, members) in enumerate(self.groups):
            group_of[members] = g
        self.group_of = torch.from_numpy(group_of).to(device)
        self.inv_temp_groups = torch.tensor(
            [1.0 / t for t, _ in self.groups], dtype=torch.float32, device=device
        )
        # top_k >= V keeps every token (HF clips k to V): no top-k at all
        has_k = (spec.top_k > 0) & (spec.top_k < vocab)
        has_p = spec.top_p < 1.0
        has_mp = spec.min_p > 0.0
        self.untruncated = np.flatnonzero(~has_k & ~has_p & ~has_mp).tolist()
        self.sorted_ones = np.flatnonzero(has_k).tolist()  # the top-k window path
        nucleus = np.flatnonzero(~has_k & has_p).tolist()
        # min-p-only thresholds, per group in ascending order (thresholded in place in the
        # exp buffer, cumulatively)
        self.thresholds: list[list[tuple[int, float]]] = []
        self.mp_idx: list[int] = []  # candidate of each threshold row
        for _, members in self.groups:
            only = [j for j in members if has_mp[j] and not has_k[j] and not has_p[j]]
            only.sort(key=lambda j: float(spec.min_p[j]))
            entries = []
            for j in only:
                # threshold_ keeps x > thr; with thr the float32 just below min_p: x >= min_p
                below = np.nextafter(np.float32(spec.min_p[j]), np.float32(-np.inf))
                entries.append((len(self.mp_idx), float(below)))
                self.mp_idx.append(j)
            self.thresholds.append(entries)
        self.mp_thr = torch.tensor(
            np.asarray(spec.min_p[self.mp_idx], dtype=np.float32), device=device
        ).unsqueeze(-1)  # (R, 1)
        self.nucleus = (
            _NucleusPlan(torch, spec, nucleus, self.groups, vocab, unit, use_exp2, device)
            if nucleus
            else None
        )
        # hottest first, squaring where one temperature is half another (as the plain family)
        self.pass_order = _square_plan(np.array([t for t, _ in self.groups]))

        def f32(values: np.ndarray) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        idx = np.asarray(self.sorted_ones, dtype=np.int64)
        self.s_temp = f32(spec.temperature[idx])
        # (S, 1): broadcast over the positions of a segment
        self.s_top_k = torch.from_numpy(spec.top_k[idx].astype(np.int64)).to(device).view(-1, 1)
        self.s_top_p = f32(spec.top_p[idx]).view(-1, 1)
        self.s_min_p = f32(spec.min_p[idx].astype(np.float32)).view(-1, 1)
        self.s_idx = torch.from_numpy(idx).to(device)
        self.max_top_k = int(spec.top_k[idx].max()) if idx.size else 0


def _score_truncated(
    seg: torch.Tensor,
    m: torch.Tensor,
    u_o: torch.Tensor,
    tok: torch.Tensor,
    scratch: _Scratch,
    plan: _TruncPlan,
    eps: float,
    unit: float,
    use_exp2: bool,
    fuse_ok: bool,
) -> torch.Tensor:
    """``(K, c)`` float32 ``log q_k(o)`` for one segment ``seg`` (``(c, V)``, input dtype, all
    finite except ``-inf`` off the sampled tokens) under truncated candidates.

    Pass 1, per temperature: one ``exp`` pass over the vocabulary gives the normaliser (as in
    the plain temperature family); candidates with min-p read their kept mass off the same
    buffer (``p / p_max >= min_p``, thresholded in place). With nucleus candidates the passes
    run over the position's logits sorted once (``_torch_nucleus``; sums do not depend on the
    order), and each pass leaves its block sums for them before any thresholding; their kept
    sets are resolved once all temperatures are done. Pass 2, only for candidates with top-k:
    every kept set is a
    prefix of the position's logits in descending order (ties kept together), read off the
    top ``k + 1`` logits (``torch.topk``, T-invariant, taken once); when a tie at the ``k``-th
    logit runs past the window it is widened 8x (up to a full sort). Pass 2 scores batches of
    candidates at once (``(B, c, size)`` tensors, ``B * size <= V``).
    """
    import torch

    c, vocab = seg.shape
    e = scratch.e[:c]
    spec = plan.spec
    k = spec.size
    device = seg.device
    n_groups = len(plan.groups)
    totals_g = torch.empty((n_groups, c), dtype=torch.float32, device=device)
    n_mp = len(plan.mp_idx)
    kept_mass_mp = e_o_mp = None
    if n_mp:
        kept_mass_mp = torch.empty((n_mp, c), dtype=torch.float32, device=device)
        e_o_mp = torch.empty((n_mp, c), dtype=torch.float32, device=device)
    nucleus = srt = None
    src, shift, sign = seg, m, 1.0  # pass 1 reads the logits as they are, or sorted
    gather_o = tok
    if plan.nucleus is not None:
        # nucleus candidates read their kept sets off the sorted logits (descending, stored
        # negated): every exp pass runs over the sorted order (sums are order-invariant)
        srt = _SortedSegment(torch, seg, tok, scratch)
        nucleus = _NucleusSegment(torch, plan.nucleus, srt, m)
        src, shift, sign = srt.neg, -m, -1.0  # s * (z - m) == -s * (neg - (-m))
        gather_o = srt.pos_o
    intact = False  # e holds the previous group's exp(beta u), not thresholded
    for g, square in plan.pass_order:
        temp = plan.groups[g][0]
        if square and intact:  # T_g == T_prev / 2: exp(2 beta u) == exp(beta u) ** 2
            e.mul_(e)
        else:
            _scaled_shift(src, shift, sign * unit / temp, e, fuse_ok)
            _exp_inplace(e, use_exp2)  # e_v = p_v / p_max, the max token gives exactly 1
        # nucleus groups take the normaliser from their block sums (before any threshold)
        if nucleus is None or not nucleus.score_group(g, e, totals_g[g]):
            torch.sum(e, dim=-1, out=totals_g[g])
            totals_g[g].clamp_min_(1.0)  # >= 1 up to rounding (the max term is exactly 1)
        entries = plan.thresholds[g]
        intact = not entries
        if entries:
            assert kept_mass_mp is not None and e_o_mp is not None
            e_o = e.gather(-1, gather_o).squeeze(-1)  # (c,)
            # thresholds ascend, so thresholding in place is cumulative and exact
            for row, below in entries:
                torch.threshold_(e, below, 0.0)
                torch.sum(e, dim=-1, out=kept_mass_mp[row])
                e_o_mp[row] = e_o
    logp_g = u_o.T * plan.inv_temp_groups.unsqueeze(-1) - totals_g.log()  # (G, c)
    logp = logp_g.index_select(0, plan.group_of)  # (K, c)
    totals = totals_g.index_select(0, plan.group_of)
    logq = torch.empty((k, c), dtype=torch.float32, device=device)
    if plan.untruncated:
        logq[plan.untruncated] = logp[plan.untruncated]
    if plan.mp_idx:
        assert kept_mass_mp is not None and e_o_mp is not None
        idx = plan.mp_idx
        logq[idx] = _smoothed(logp[idx], e_o_mp >= plan.mp_thr, kept_mass_mp, totals[idx], eps)
    if nucleus is not None:
        assert plan.nucleus is not None
        idx = plan.nucleus.idx
        logq[idx] = nucleus.result(logp[idx], totals[idx], eps, _smoothed)
    z_o = seg.gather(-1, tok)  # (c, 1), input dtype: compared with sorted logits exactly
    if not plan.sorted_ones:
        return logq

    s_totals = totals.index_select(0, plan.s_idx)  # (S, c)
    s_logp = logp.index_select(0, plan.s_idx)
    size = _window_size(plan, vocab)
    n_sorted = len(plan.sorted_ones)
    while True:
        if size < vocab:
            vals = torch.topk(seg, size, dim=-1, largest=True, sorted=True).values
        else:
            vals = torch.sort(seg, dim=-1, descending=True).values
        shifted = vals.float() - m  # (c, size), <= 0
        batch = max(1, vocab // size)  # (B, c, size) buffers stay within one (c, V) chunk
        out = torch.empty((n_sorted, c), dtype=torch.float32, device=device)
        overflow = False
        for a in range(0, n_sorted, batch):
            sl = slice(a, min(n_sorted, a + batch))
            res, over = _score_sorted(vals, shifted, z_o, plan, sl, s_totals[sl], s_logp[sl],
                                      eps, unit, use_exp2, vocab)  # fmt: skip
            if over:
                overflow = True
                break
            out[sl] = res
        if not overflow or size >= vocab:
            logq[plan.sorted_ones] = out
            return logq
        size = min(vocab, size * 8)


def _score_sorted(
    vals: torch.Tensor,
    shifted: torch.Tensor,
    z_o: torch.Tensor,
    plan: _TruncPlan,
    sl: slice,
    total: torch.Tensor,
    logp_o: torch.Tensor,
    eps: float,
    unit: float,
    use_exp2: bool,
    vocab: int,
) -> tuple[torch.Tensor, bool]:
    """Score the top-k candidates ``plan.sorted_ones[sl]`` (``B`` of them) on the window
    ``vals`` (``(c, size)`` descending logits), their kept sets counted by
    :mod:`metactl.knobs`'s definition. Returns ``(B, c)`` log q and whether some kept set (or
    the survivors' mass top-p needs) may continue past the window."""
    import torch

    size = vals.shape[1]
    partial = size < vocab
    top_k = plan.s_top_k[sl]  # (B, 1)
    if partial and int(top_k.max()) > size - 1:
        return torch.empty(0), True  # the k-th logit (or its tie check) is past the window
    b = top_k.shape[0]
    scale = (unit / plan.s_temp[sl]).view(b, 1, 1)
    ws = shifted.unsqueeze(0) * scale  # (B, c, size)
    _exp_inplace(ws, use_exp2)  # p / p_max of the sorted logits
    cum = ws.cumsum(dim=-1)  # non-decreasing (sums of non-negative terms)
    top_p = plan.s_top_p[sl]
    counts = _kept_count_torch(vals, ws, cum, top_k, top_p, plan.s_min_p[sl],
                               order=plan.spec.order, vocab=vocab, full_mass=total)  # fmt: skip
    n = counts.n  # (B, c)
    if partial:  # top-p's base mass must be known: all tokens, or a prefix inside the window
        over = (top_p < 1.0) & (counts.base >= size) & (counts.base < vocab)
        over |= n >= size
        if bool(over.any()):
            return torch.empty(0), True
    last = (n - 1).clamp_max_(size - 1)  # (B, c) index of the last kept token
    kept_o = z_o.T >= vals.gather(1, last.T).T  # (B, c)
    kept_mass = cum.gather(-1, last.unsqueeze(-1)).squeeze(-1)
    return _smoothed(logp_o, kept_o, kept_mass, total, eps), False


def _smoothed(
    logp_o: torch.Tensor,
    kept_o: torch.Tensor,
    kept_mass: torch.Tensor,
    total: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """``log q(o) = log p(o) + log((1 - eps) [o kept] / Z + eps)``, ``Z`` the kept mass."""
    frac = (kept_mass / total).clamp_(min=1e-38, max=1.0)  # kept mass, (0, 1]
    return _smoothed_torch(logp_o, kept_o, frac, eps)


def _window_size(plan: _TruncPlan, vocab: int) -> int:
    """How many top logits per position should hold every kept set of the top-k path: ``k +
    1`` (the extra one shows whether a tie at the ``k``-th logit continues; a longer tie
    widens the window in :func:`_score_truncated`). Every kept set of a top-k candidate lies
    inside its top-k set (HF and vLLM apply top-p and min-p to the top-k survivors, or
    intersect with them), so no other truncation needs more."""
    return min(vocab, max(plan.max_top_k + 1, _MIN_WINDOW))
