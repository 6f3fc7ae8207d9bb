"""Torch backend of :func:`metactl.likelihood.candidate_loglik` (CPU and eager accelerator
paths; the fused CUDA kernel is in ``_triton``). Imported only when torch tensors are passed.

On CPU, worker threads score chunks of positions with single-threaded torch ops in
cache-sized buffers (``exp2`` on scaled logits, one pass per candidate, squaring where one
temperature is half another). Truncated candidates with top-k or top-p additionally take the
top logits of each position once (a ``topk`` window sized by a bound on the kept sets,
widened up to a full sort only when a kept set does not fit) and read every kept set and its
mass off that window (see ``_score_truncated``).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from ._checks import (
    _CPU_WORKER_BYTES,
    _check_mask_tokens,
    _check_positions_torch,
    _check_shapes,
    _is_torch,
    _segments,
    _square_plan,
    _to_numpy,
    default_chunk_size,
)
from .families import CandidateSpec, temperature_groups

if TYPE_CHECKING:  # pragma: no cover
    import torch

_LN2 = math.log(2.0)
_INV_LN2 = 1.0 / _LN2

# Temperature family with vocab * K at most this: score blocks of positions (across rows) for
# all K candidates in one vectorised (positions, K, V) step. Per-segment Python work would
# otherwise dominate (tiny vocabularies, short completions, many rows).
_SMALL_VOCAB_ELEMENTS = 1 << 10
# Smallest sorted-logit window of the truncated path (fewer gains nothing).
_MIN_WINDOW = 16


def _loglik_torch(
    logits: torch.Tensor,
    tokens: Any,
    mask: Any,
    spec: CandidateSpec,
    eps: float,
    chunk: int | None,
    use_fused: bool = False,
) -> torch.Tensor:
    import torch

    if not logits.is_floating_point():
        raise TypeError(f"logits must hold floating-point values, got dtype {logits.dtype}")
    logits = logits.detach()  # a view; grad mode is thread-local, so also for the workers
    tok_host = _to_numpy(tokens, "tokens")
    mask_host = _to_numpy(mask, "mask")
    _check_shapes(tuple(logits.shape), tok_host, mask_host)
    n, _, vocab = logits.shape
    bmask = _check_mask_tokens(tok_host, mask_host, vocab)
    device = logits.device
    if spec.is_pure("temperature"):
        family, cands, temp = "temperature", spec.temperature, 1.0
    elif spec.is_pure("min_p"):
        family, cands, temp = "min_p", spec.min_p, float(spec.temperature[0])
    else:  # any truncation beyond plain min-p, top-p / top-k families, joint grids
        family, cands, temp = "truncated", spec.temperature, 1.0
    if use_fused:
        from ._triton import _loglik_fused

        return _loglik_fused(logits, tokens, tok_host, bmask, cands, chunk or 65536)
    if family == "temperature" and vocab * cands.size <= _SMALL_VOCAB_ELEMENTS:
        return _loglik_blocks(logits, tokens, tok_host, bmask, cands, chunk)

    workers = _cpu_workers(torch) if device.type == "cpu" else 1
    if chunk is None:
        chunk = default_chunk_size(vocab, device.type, workers=workers)
    # with W workers, each holds a buffer of chunk // W positions: one chunk in all
    seg_row, seg_start, seg_stop = _segments(bmask, max(1, chunk // workers))
    n_seg = seg_row.size
    workers = min(workers, n_seg)

    # Segments hold masked positions only, so placeholders (e.g. -100) are never gathered.
    if _is_torch(tokens):
        tok_src = tokens.detach()
    else:
        tok_src = torch.from_numpy(np.ascontiguousarray(tok_host))

    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    k = cands.size
    partial = torch.empty((n_seg, k), dtype=acc_dtype, device=device)
    bad = torch.zeros(n_seg, dtype=torch.bool, device=device)
    longest = int((seg_stop - seg_start).max())
    betas = torch.tensor(
        1.0 / cands if family == "temperature" else cands, dtype=torch.float32, device=device
    )

    if family == "temperature":
        plan = _square_plan(cands)
    elif family == "truncated":
        trunc_plan = _TruncPlan(torch, spec, device)
    else:
        order = np.argsort(cands, kind="stable")
        # threshold_ keeps x > thr; with thr the float32 just below min_p this keeps x >= min_p.
        thr = [
            float(np.nextafter(np.float32(cands[j]), np.float32(-np.inf), dtype=np.float32))
            for j in order
        ]

    # exp(beta u) == exp2(beta / ln2 * u); which is faster on CPU depends on the torch build.
    # Chosen by version, never by a timing: the low bits of the result must not depend on
    # machine load (a resumed run, or another rank, must score alike).
    use_exp2 = device.type != "cpu" or _cpu_exp2_is_fast(torch.__version__)
    unit = _INV_LN2 if use_exp2 else 1.0
    scales = unit / (cands if family != "min_p" else np.array([temp]))
    fuse_limit = 1e37 / float(scales.max())
    rows_l, starts_l, stops_l = seg_row.tolist(), seg_start.tolist(), seg_stop.tolist()

    def score_segment(idx: int, scratch: torch.Tensor) -> None:
        i, t0, t1 = rows_l[idx], starts_l[idx], stops_l[idx]
        seg = logits[i, t0:t1]  # (c, V) view, input dtype
        c = t1 - t0
        e = scratch[:c]
        hi = seg.amax(dim=-1)  # NaN propagates; +inf shows here
        lo = seg.amin(dim=-1)  # for fuse_ok (torch.aminmax is much slower on CPU)
        m = hi.float().unsqueeze(-1)  # (c, 1)
        # s * z - s * m in one fused op is exact enough, unless s * z overflows float32
        # (|logits| ~ 1e38 / s): then subtract first. One host sync per segment.
        fuse_ok = float(torch.maximum(hi.abs().max(), lo.abs().max()).float()) < fuse_limit
        tok = tok_src[i, t0:t1].to(device=device, dtype=torch.long).unsqueeze(-1)  # (c, 1)
        u_o = seg.gather(-1, tok).float() - m  # (c, 1): z_o - max <= 0
        # NaN or +inf anywhere makes hi non-finite; -inf at the sampled token makes u_o -inf.
        # -inf elsewhere is probability 0: exp(s * (-inf - m)) = 0 in both shift forms.
        bad[idx] = ~(torch.isfinite(hi).all() & torch.isfinite(u_o).all())
        if family == "temperature":
            sums = torch.empty((k, c), dtype=torch.float32, device=device)
            for j, square in plan:
                if square:  # T_j == T_prev / 2: exp(2 beta u) == exp(beta u) ** 2
                    e.mul_(e)
                else:
                    s = unit / float(cands[j])
                    _scaled_shift(seg, m, s, e, fuse_ok)  # e = beta * unit * (z - m)
                    _exp_inplace(e, use_exp2)
                torch.sum(e, dim=-1, out=sums[j])
            # log q_k(o) = beta_k (z_o - m) - log sum_v exp(beta_k (z_v - m)). The max
            # term of the sum is exactly 1, so sums >= 1: clamping only removes rounding
            # and keeps log q <= 0 (u_o <= 0 holds exactly).
            logq = betas.unsqueeze(-1) * u_o.T - sums.clamp_min_(1.0).log_()  # (K, c)
        elif family == "truncated":
            logq = _score_truncated(seg, m, u_o, tok, e, trunc_plan, eps, unit, use_exp2, fuse_ok)
        else:
            s = unit / temp
            _scaled_shift(seg, m, s, e, fuse_ok)
            _exp_inplace(e, use_exp2)  # e_v = p_v / p_max, the max token gives exactly 1
            e_o = e.gather(-1, tok)  # (c, 1)
            total = e.sum(dim=-1).clamp_min_(1.0)  # (c,), >= 1 up to rounding
            logp_o = u_o.squeeze(-1) / temp - total.log()  # log p(o)
            kept_mass = torch.empty((k, c), dtype=torch.float32, device=device)
            for j, th in zip(order.tolist(), thr, strict=True):
                # thresholds ascend, so thresholding in place is cumulative and exact
                torch.threshold_(e, th, 0.0)
                torch.sum(e, dim=-1, out=kept_mass[j])
            z_frac = (kept_mass / total).clamp_max_(1.0)  # (K, c): kept mass, (0, 1]
            kept_o = e_o.T >= betas.unsqueeze(-1)  # (K, c): sampled token kept?
            # log q = log p(o) + log((1 - eps) [kept] / Z + eps)
            ratio = torch.where(kept_o, (1.0 - eps) / z_frac + eps, eps)
            # q(o) <= 1 exactly; clamp only the rounding of a probability near 1
            logq = (logp_o.unsqueeze(0) + ratio.log()).clamp_max_(0.0)
        partial[idx] = logq.sum(dim=-1, dtype=acc_dtype)

    with torch.no_grad():
        if workers <= 1:
            scratch = torch.empty((longest, vocab), dtype=torch.float32, device=device)
            for idx in range(n_seg):
                score_segment(idx, scratch)
        else:
            _run_pooled(torch, score_segment, n_seg, workers, (longest, vocab))
        if bool(bad.any()):
            _raise_for_bad_segments(logits, tok_src, bad, seg_row, seg_start, seg_stop)
        # summed in segment order whatever the schedule: results do not depend on workers
        acc = torch.zeros((n, k), dtype=acc_dtype, device=device)
        acc.index_add_(0, torch.from_numpy(seg_row).to(device), partial)
        counts = torch.from_numpy(bmask.sum(axis=1)).to(device=device, dtype=acc_dtype)
        return (acc / counts.unsqueeze(-1)).to(torch.float32)


def _raise_for_bad_segments(
    logits: torch.Tensor,
    tok_src: torch.Tensor,
    bad: torch.Tensor,
    seg_row: np.ndarray,
    seg_start: np.ndarray,
    seg_stop: np.ndarray,
) -> None:
    """Name the first bad position of the first flagged segment (see ``score_segment``)."""
    import torch

    for idx in np.flatnonzero(bad.cpu().numpy()).tolist():
        i, t0, t1 = int(seg_row[idx]), int(seg_start[idx]), int(seg_stop[idx])
        cols = torch.arange(t0, t1, device=logits.device)
        rows = torch.full_like(cols, i)
        toks = tok_src[i, t0:t1].to(device=logits.device, dtype=torch.long)
        _check_positions_torch(logits, rows, cols, toks)
    raise ValueError("logits contain NaN or +inf, or -inf at a sampled token, at masked positions")


def _loglik_blocks(
    logits: torch.Tensor,
    tokens: Any,
    tok_host: np.ndarray,
    bmask: np.ndarray,
    cands: np.ndarray,
    chunk: int | None,
) -> torch.Tensor:
    """Temperature family for small ``V * K``: blocks of masked positions, taken across rows,
    scored for all candidates at once; a block is at most ``chunk`` positions (default: a
    ``(positions, K, V)`` float32 block of ``_CPU_WORKER_BYTES``)."""
    import torch

    n, _, vocab = logits.shape
    k = cands.size
    device = logits.device
    if chunk is None:
        chunk = max(1, _CPU_WORKER_BYTES // (4 * k * vocab))
    rows_host, cols_host = np.nonzero(bmask)
    rows = torch.from_numpy(rows_host).to(device)
    cols = torch.from_numpy(cols_host).to(device)
    tok_src = tokens.detach() if _is_torch(tokens) else torch.from_numpy(tok_host)
    tok_all = tok_src.to(device=device, dtype=torch.long)[rows, cols]
    betas = torch.tensor(1.0 / cands, dtype=torch.float32, device=device)
    acc = torch.zeros((n, k), dtype=torch.float64, device=device)
    # single-threaded ops on CPU: small ops gain nothing from threads, and on shared cores each
    # parallel region waits for descheduled threads (see _cpu_workers below)
    threads = _single_threaded_ops(torch) if device.type == "cpu" else contextlib.nullcontext()
    with torch.no_grad(), threads:
        for start in range(0, rows_host.size, chunk):
            r, c = rows[start : start + chunk], cols[start : start + chunk]
            z = logits[r, c].float()  # (p, V)
            tk = tok_all[start : start + chunk]
            # -inf (probability 0) is fine except at the sampled token; NaN, +inf never are
            bad = (torch.isnan(z) | (z == float("inf"))).any() | (
                z.gather(-1, tk.unsqueeze(-1)) == float("-inf")
            ).any()
            if bool(bad):
                _check_positions_torch(logits, r, c, tk)
            u = z - z.amax(dim=-1, keepdim=True)  # <= 0, the max is exactly 0 (finite: z_o is)
            u_o = u.gather(-1, tk.unsqueeze(-1))  # (p, 1)
            # u * beta <= 0 with one entry exactly 0: the sum lies in [1, V], no overflow
            lse = torch.exp(u.unsqueeze(1) * betas[None, :, None]).sum(dim=-1).log_()  # (p, K)
            # log q = beta (z_o - max) - lse <= 0; the clamp removes rounding only
            logq = (u_o * betas - lse).clamp_max_(0.0)
            acc.index_add_(0, r, logq.double())
        counts = torch.from_numpy(bmask.sum(axis=1)).to(device=device, dtype=torch.float64)
        return (acc / counts.unsqueeze(-1)).to(torch.float32)


# CPU parallelism. Each torch op on a (chunk, V) buffer would otherwise open its own OpenMP
# parallel region: thousands per call, and on a machine whose cores are shared with other
# processes every region waits for a descheduled thread (measured on a busy 2-core machine:
# 31.8 s instead of 0.42 s). Instead, W Python threads each score whole segments with
# single-threaded ops (torch releases the GIL inside ops), pulling segments from a shared
# counter so that a slow core simply takes fewer segments.
_THREADS_LOCK = threading.Lock()
_THREADS_STATE = {"depth": 0, "saved": 1}


def _cpu_workers(torch: Any) -> int:
    """Worker threads for the CPU path: torch's intra-op thread count (OpenMP builds only)."""
    threads = int(torch.get_num_threads())
    if threads <= 1 or "OpenMP" not in _parallel_backend(torch):
        return 1
    return threads


@functools.lru_cache(maxsize=1)
def _parallel_backend(torch: Any) -> str:
    for line in torch.__config__.parallel_info().splitlines():
        if "parallel backend" in line:
            return str(line)
    return ""


@contextlib.contextmanager
def _single_threaded_ops(torch: Any) -> Iterator[None]:
    """Set torch's intra-op threads to 1 for the duration (re-entrant, thread-safe)."""
    with _THREADS_LOCK:
        if _THREADS_STATE["depth"] == 0:
            _THREADS_STATE["saved"] = int(torch.get_num_threads())
            torch.set_num_threads(1)
        _THREADS_STATE["depth"] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_STATE["depth"] -= 1
            if _THREADS_STATE["depth"] == 0:
                torch.set_num_threads(_THREADS_STATE["saved"])


def _run_pooled(
    torch: Any,
    work: Callable[[int, Any], None],
    n_items: int,
    workers: int,
    buffer_shape: tuple[int, int],
) -> None:
    """Run ``work(i, buffer)`` for i in range(n_items) on ``workers`` threads."""
    counter = itertools.count()
    lock = threading.Lock()

    def loop() -> None:
        buffer = torch.empty(buffer_shape, dtype=torch.float32)
        with torch.no_grad():  # grad mode is thread-local
            while True:
                with lock:
                    i = next(counter)
                if i >= n_items:
                    return
                work(i, buffer)

    with _single_threaded_ops(torch), ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(loop) for _ in range(workers)]
        for fut in futures:
            fut.result()  # re-raises a worker's exception


def _exp_inplace(e: torch.Tensor, use_exp2: bool) -> None:
    if use_exp2:
        e.exp2_()
    else:
        e.exp_()


def _cpu_exp2_is_fast(version: str) -> bool:
    """Whether to use ``exp2`` on CPU: torch >= 2.13, where single-threaded ``exp2_`` measured
    4.6x faster than ``exp_`` on an AVX-512 CPU (0.069 vs 0.319 ms for 512k floats); with
    torch 2.11 on another machine the exp2 path ran about 3x slower than expected.

    Example:
        >>> _cpu_exp2_is_fast("2.13.0+cpu"), _cpu_exp2_is_fast("2.11.0+cu130")
        (True, False)
    """
    major, minor = (int(part) for part in version.split("+")[0].split(".")[:2])
    return (major, minor) >= (2, 13)


def _scaled_shift(
    seg: torch.Tensor, m: torch.Tensor, s: float, out: torch.Tensor, fuse: bool
) -> None:
    """``out = s * (seg - m)``: one fused pass when ``s * seg`` cannot overflow, else two."""
    import torch

    if fuse:
        torch.add(m * (-s), seg, alpha=s, out=out)
    else:
        torch.sub(seg, m, out=out)
        out.mul_(s)



# --------------------------------------------------------------------------------------
# truncated candidates (top-k, top-p, min-p under any temperature; joint grids)
# --------------------------------------------------------------------------------------


class _TruncPlan:
    """Per-call constants of the truncated path (built once, shared by the workers)."""

    def __init__(self, torch: Any, spec: CandidateSpec, device: Any) -> None:
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
        truncated = spec.truncated()
        sorted_mask = (spec.top_k > 0) | (spec.top_p < 1.0)
        self.untruncated = np.flatnonzero(~truncated).tolist()
        self.sorted_ones = np.flatnonzero(sorted_mask).tolist()
        # min-p alone: thresholded in place in the exp buffer, ascending within a group
        self.min_p_only: list[list[tuple[int, float, float]]] = []
        for _, members in self.groups:
            only = [j for j in members if truncated[j] and not sorted_mask[j]]
            only.sort(key=lambda j: float(spec.min_p[j]))
            self.min_p_only.append(
                [
                    (j, float(np.float32(spec.min_p[j])),
                     float(np.nextafter(np.float32(spec.min_p[j]), np.float32(-np.inf))))
                    for j in only
                ]
            )  # fmt: skip
        self.min_p_only_idx = [j for g in self.min_p_only for j, _, _ in g]
        # first row of each group's min-p-only candidates in min_p_only_idx
        self.min_p_rows = np.cumsum([0] + [len(g) for g in self.min_p_only]).tolist()
        # hottest first, squaring where one temperature is half another (as the plain family)
        self.pass_order = _square_plan(np.array([t for t, _ in self.groups]))

        def f32(values: np.ndarray) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        idx = np.asarray(self.sorted_ones, dtype=np.int64)
        self.s_temp = f32(spec.temperature[idx])
        self.s_top_k = torch.from_numpy(spec.top_k[idx].astype(np.int64)).to(device)
        self.s_top_p = f32(spec.top_p[idx])
        self.s_min_p = f32(spec.min_p[idx].astype(np.float32))
        self.s_idx = torch.from_numpy(idx).to(device)
        self.max_top_k = int(spec.top_k.max())
        # the window bound for nuclei without top-k (see _window_size)
        nucleus = (spec.top_k[idx] == 0) & (spec.top_p[idx] < 1.0)
        self.nucleus = torch.from_numpy(nucleus).to(device)
        self.any_nucleus = bool(nucleus.any())
        unit_mass = (spec.min_p[idx] > 0) if spec.order == "vllm" else np.zeros(idx.size, bool)
        self.unit_mass = torch.from_numpy(unit_mass).to(device)
        with np.errstate(divide="ignore"):
            self.log_tail = f32(np.log((1.0 - np.minimum(spec.top_p[idx], 1.0)) / 1.0))


def _score_truncated(
    seg: torch.Tensor,
    m: torch.Tensor,
    u_o: torch.Tensor,
    tok: torch.Tensor,
    e: torch.Tensor,
    plan: _TruncPlan,
    eps: float,
    unit: float,
    use_exp2: bool,
    fuse_ok: bool,
) -> torch.Tensor:
    """``(K, c)`` float32 ``log q_k(o)`` for one segment ``seg`` (``(c, V)``, input dtype)
    under truncated candidates (see :mod:`metactl.likelihood.families` for the definitions).

    Pass 1, per temperature: one ``exp`` pass over the vocabulary gives the normaliser (as in
    the plain temperature family); a candidate truncated by min-p alone reads its kept mass
    off the same buffer (``p / p_max >= min_p``, thresholded in place). Pass 2, only for
    candidates with top-k or top-p: every kept set is a prefix of the position's logits in
    descending order (ties kept together), so it is read off the top ``size`` logits
    (``torch.topk``, T-invariant, taken once), with ``size`` from a cheap bound on the kept
    sets; when a kept set could extend past the window it is widened 8x (up to a full sort).
    Pass 2 scores batches of candidates at once (``(B, c, size)`` tensors, ``B * size <= V``).
    """
    import torch

    c, vocab = seg.shape
    spec = plan.spec
    k = spec.size
    device = seg.device
    n_groups = len(plan.groups)
    totals_g = torch.empty((n_groups, c), dtype=torch.float32, device=device)
    n_mp_only = len(plan.min_p_only_idx)
    if n_mp_only:
        kept_mass_mp = torch.empty((n_mp_only, c), dtype=torch.float32, device=device)
        e_o_mp = torch.empty((n_mp_only, c), dtype=torch.float32, device=device)
        thr_mp = torch.empty((n_mp_only, 1), dtype=torch.float32, device=device)
    intact = False  # e holds the previous group's exp(beta u), not thresholded
    for g, square in plan.pass_order:
        temp = plan.groups[g][0]
        if square and intact:  # T_g == T_prev / 2: exp(2 beta u) == exp(beta u) ** 2
            e.mul_(e)
        else:
            _scaled_shift(seg, m, unit / temp, e, fuse_ok)
            _exp_inplace(e, use_exp2)  # e_v = p_v / p_max, the max token gives exactly 1
        torch.sum(e, dim=-1, out=totals_g[g])
        only = plan.min_p_only[g]
        intact = not only
        if only:
            row = plan.min_p_rows[g]
            e_o = e.gather(-1, tok).squeeze(-1)  # (c,)
            # thresholds ascend, so thresholding in place is cumulative and exact;
            # threshold_ keeps x > thr, and thr is the float32 just below min_p
            for _, mp, below in only:
                torch.threshold_(e, below, 0.0)
                torch.sum(e, dim=-1, out=kept_mass_mp[row])
                e_o_mp[row] = e_o
                thr_mp[row] = mp
                row += 1
    totals_g.clamp_min_(1.0)  # >= 1 up to rounding (the max term is exactly 1)
    logp_g = u_o.T * plan.inv_temp_groups.unsqueeze(-1) - totals_g.log()  # (G, c)
    logp = logp_g.index_select(0, plan.group_of)  # (K, c)
    totals = totals_g.index_select(0, plan.group_of)
    logq = torch.empty((k, c), dtype=torch.float32, device=device)
    if plan.untruncated:
        logq[plan.untruncated] = logp[plan.untruncated]
    if n_mp_only:
        idx = plan.min_p_only_idx
        logq[idx] = _smoothed(logp[idx], e_o_mp >= thr_mp, kept_mass_mp, totals[idx], eps)
    if not plan.sorted_ones:
        return logq

    z_o = seg.gather(-1, tok)  # (c, 1), input dtype: compared with sorted logits exactly
    s_totals = totals.index_select(0, plan.s_idx)  # (S, c)
    s_logp = logp.index_select(0, plan.s_idx)
    size = _window_size(seg, m, s_totals, plan, vocab)
    n_sorted = len(plan.sorted_ones)
    while True:
        if size < vocab:
            vals = torch.topk(seg, size, dim=-1, largest=True, sorted=True).values
        else:
            vals = torch.sort(seg, dim=-1, descending=True).values
        shifted = vals.float() - m  # (c, size), <= 0
        neg_vals = -vals  # ascending, for searchsorted
        batch = max(1, vocab // size)  # (B, c, size) buffers stay within one (c, V) chunk
        out = torch.empty((n_sorted, c), dtype=torch.float32, device=device)
        overflow = False
        for a in range(0, n_sorted, batch):
            sl = slice(a, min(n_sorted, a + batch))
            res, over = _score_sorted(vals, neg_vals, shifted, z_o, plan, sl, s_totals[sl],
                                      s_logp[sl], eps, unit, use_exp2, vocab)  # fmt: skip
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
    neg_vals: torch.Tensor,
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
    """Score the sorted-path candidates ``plan.sorted_ones[sl]`` (``B`` of them) on the window
    ``vals`` (``(c, size)`` descending logits; ``neg_vals = -vals`` ascending, for
    ``searchsorted``). Returns ``(B, c)`` log q and whether some kept set (or the survivors'
    mass top-p needs) may continue past the window."""
    import torch

    c, size = vals.shape
    partial = size < vocab
    top_k = plan.s_top_k[sl]  # (B,)
    if partial and int(top_k.max()) > size - 1:
        return torch.empty(0), True  # the k-th logit (or its tie check) is past the window
    b = top_k.numel()
    full = torch.full((b, c), vocab, dtype=torch.long, device=vals.device)

    def count_at_least(x: torch.Tensor) -> torch.Tensor:
        """``(B, c)``: how many window logits are ``>= x`` (``(B, c)``, window values)."""
        return torch.searchsorted(neg_vals, (-x).T.contiguous(), right=True).T

    scale = (unit / plan.s_temp[sl]).view(b, 1, 1)
    ws = shifted.unsqueeze(0) * scale  # (B, c, size)
    _exp_inplace(ws, use_exp2)  # p / p_max of the sorted logits
    cum = ws.cumsum(dim=-1)  # non-decreasing (sums of non-negative terms)
    # ties at the k-th logit are kept (HF, vLLM): count every logit >= it
    kth = vals.index_select(1, (top_k - 1).clamp(0, size - 1)).T  # (B, c)
    n_k = torch.where((top_k > 0).unsqueeze(-1), count_at_least(kth), full)
    min_p = plan.s_min_p[sl].view(b, 1, 1)
    if bool((min_p > 0).any()):
        n_mp = torch.where((min_p > 0).view(b, 1), (ws >= min_p).sum(-1), full)
    else:
        n_mp = full
    # >= 1 for valid rows (the top token is always kept); the clamp only keeps the indices
    # in range for a NaN row, which is reported once the segment is done
    n = torch.minimum(n_k, n_mp).clamp_min_(1)
    top_p = plan.s_top_p[sl].view(b, 1)
    has_top_p = top_p < 1.0
    over = torch.zeros((b, c), dtype=torch.bool, device=vals.device)
    if bool(has_top_p.any()):
        base = n_k if plan.spec.order == "hf" else n  # top-p measures the survivors' mass
        if partial:  # that mass must be known: all tokens, or a prefix inside the window
            over |= has_top_p & (base >= size) & (base < vocab)
        inside = cum.gather(-1, (base - 1).clamp(0, size - 1).unsqueeze(-1)).squeeze(-1)
        base_mass = torch.where(base >= vocab, total, inside)  # (B, c)
        # token i is kept when the mass sorted before it, cum[i - 1], is < top_p * base mass
        # (the first token always is); then extend to the end of the last one's tie group
        # (a tie straddling the boundary is kept whole)
        limit = (top_p * base_mass).unsqueeze(-1)
        # count over cum[:-1] = count over cum, capped at size - 1 (cum is non-decreasing)
        below = torch.searchsorted(cum, limit.contiguous()).squeeze(-1)
        n_excl = 1 + below.clamp_max_(size - 1)
        boundary = vals.gather(1, (n_excl - 1).clamp(0, size - 1).T).T  # (B, c)
        n_p = torch.where(has_top_p, count_at_least(boundary), full)
        n = torch.minimum(n, n_p).clamp_min_(1)
    if partial:
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
    import torch

    frac = (kept_mass / total).clamp_(min=1e-38, max=1.0)  # kept mass, (0, 1]
    ratio = torch.where(kept_o, (1.0 - eps) / frac + eps, eps)
    # q(o) <= 1 exactly; the clamp removes rounding only
    return (logp_o + ratio.log()).clamp_max_(0.0)


# Extra room in the window bound: e^-0.05 in probability, far beyond float32 rounding of the
# bound (a too-small window is detected and widened anyway; this only avoids the retry).
_BOUND_SLACK = 0.05


def _window_size(
    seg: torch.Tensor, m: torch.Tensor, totals: torch.Tensor, plan: _TruncPlan, vocab: int
) -> int:
    """How many top logits per position should hold every kept set of the sorted path.

    A top-k set needs ``k + 1`` logits (the extra one shows whether a tie continues). A
    nucleus without top-k holds only tokens with ``p_v > (1 - top_p) * Z_b / V``: the tokens
    below it have mass at most ``1 - top_p`` of the survivors' mass ``Z_b`` and are the least
    likely, so they are all dropped. ``Z_b`` is bounded below by the full normaliser (HF
    order, or no min-p) or by 1 (the top token; vLLM order with min-p first). ``totals`` are
    the sorted-path candidates' normalisers ``(S, c)``.
    """
    import torch

    need = min(vocab, plan.max_top_k) + 1 if plan.max_top_k > 0 else 1
    if plan.any_nucleus:
        log_zb = torch.where(plan.unit_mass.unsqueeze(-1), 0.0, totals.log())  # (S, c)
        # exp(u / T) / Z_b > (1 - top_p) / V  <=>  u > T (log((1 - top_p) / V) + log Z_b)
        temp = plan.s_temp.unsqueeze(-1)
        bound = temp * (plan.log_tail.unsqueeze(-1) - math.log(vocab) + log_zb - _BOUND_SLACK)
        bound = torch.where(plan.nucleus.unsqueeze(-1), bound, float("inf"))
        lowest = bound.amin(dim=0)  # (c,)
        above = (seg >= (m.squeeze(-1) + lowest).unsqueeze(-1)).sum(dim=-1)
        need = max(need, int(above.max()) + 1)
    return min(vocab, max(need, _MIN_WINDOW))
