"""Torch backend of :func:`metactl.likelihood.candidate_loglik` (CPU and eager accelerator
paths; the fused CUDA kernel is in ``_triton``). Imported only when torch tensors are passed.

On CPU, worker threads score chunks of positions with single-threaded torch ops in
cache-sized buffers (``exp2`` on scaled logits, one pass per candidate, squaring where one
temperature is half another). Truncated candidates are scored in ``_torch_truncation``: top-p
from the same ``exp`` passes run over each position's logits sorted once (``_torch_nucleus``),
top-k from a ``topk`` window of the top ``k + 1`` logits. Shared helpers: ``_torch_ops``.
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
from ._torch_ops import _cpu_exp2_is_fast, _exp_inplace, _scaled_shift, _Scratch
from ._torch_truncation import _score_truncated, _TruncPlan
from .families import CandidateSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

_LN2 = math.log(2.0)
_INV_LN2 = 1.0 / _LN2

# Temperature family with vocab * K at most this: score blocks of positions (across rows) for
# all K candidates in one vectorised (positions, K, V) step. Per-segment Python work would
# otherwise dominate (tiny vocabularies, short completions, many rows).
_SMALL_VOCAB_ELEMENTS = 1 << 10


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
    elif family != "truncated":
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
    if family == "truncated":
        trunc_plan = _TruncPlan(torch, spec, device, vocab, unit, use_exp2)
    rows_l, starts_l, stops_l = seg_row.tolist(), seg_start.tolist(), seg_stop.tolist()

    def score_segment(idx: int, scratch: _Scratch) -> None:
        i, t0, t1 = rows_l[idx], starts_l[idx], stops_l[idx]
        seg = logits[i, t0:t1]  # (c, V) view, input dtype
        c = t1 - t0
        e = scratch.e[:c]
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
        if family == "truncated" and bool(bad[idx]):
            # reported once all segments are done; the truncated path's index arithmetic
            # (sorted blocks, windows) needs finite logits, so it does not run on this segment
            partial[idx] = 0.0
            return
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
            logq = _score_truncated(seg, m, u_o, tok, scratch, trunc_plan, eps, unit, use_exp2,
                                    fuse_ok)  # fmt: skip
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
            scratch = _Scratch(torch, (longest, vocab), device)
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
            u = z - z.amax(dim=-1, keepdim=True)  # <= 0 once checked: the max is exactly 0
            u_o = u.gather(-1, tk.unsqueeze(-1))  # (p, 1)
            # -inf (probability 0) is fine except at the sampled token; NaN, +inf never are.
            # amax propagates NaN and +inf, which make u_o NaN or -inf, as -inf at the sampled
            # token does: u_o is finite exactly when the positions are valid.
            if not bool(torch.isfinite(u_o).all()):
                _check_positions_torch(logits, r, c, tk)
            # beta * u <= 0 with one entry exactly 0: the sum lies in [1, V], no overflow. The
            # (K, p, V) layout puts the candidate outermost (faster than (p, K, V); same sums).
            scaled = betas[:, None, None] * u.unsqueeze(0)
            lse = scaled.exp_().sum(dim=-1).log_()  # (K, p)
            # log q = beta (z_o - max) - lse <= 0; the clamp removes rounding only
            logq = (betas[:, None] * u_o.T - lse).clamp_max_(0.0)
            acc.index_add_(0, r, logq.T.double())
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
        buffer = _Scratch(torch, buffer_shape, torch.device("cpu"))
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
