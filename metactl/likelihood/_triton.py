"""Fused Triton kernel for the temperature family on CUDA (private; imported on use)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ._checks import _check_positions_torch, _is_torch
from .families import CandidateSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

_INV_LN2 = 1.0 / math.log(2.0)


def _want_fused(logits: torch.Tensor, spec: CandidateSpec, fused: bool | None) -> bool:
    if fused is False:
        return False
    pure = spec.is_pure("temperature")
    ok = pure and logits.device.type == "cuda" and _triton_kernel() is not None
    if fused and not ok:
        raise ValueError(
            "fused=True needs family='temperature' without truncation (top_p=1, top_k=None, "
            "min_p=0), CUDA logits and an importable triton; got "
            f"family={spec.family!r}{'' if pure else ' with truncation'}, "
            f"device={logits.device.type!r}"
        )
    return ok


_KERNEL: list[Any] = []  # [kernel or None], built on first use


def _triton_kernel() -> Any:
    """The fused Triton kernel, or None where triton is unavailable."""
    if not _KERNEL:
        _KERNEL.append(_build_triton_kernel())
    return _KERNEL[0]


def _build_triton_kernel() -> Any:
    try:
        import triton
        import triton.language as tl
    except Exception:
        return None

    @triton.jit
    def temperature_sums(
        z_ptr, stride_n, stride_t, stride_v, n_ptr, t_ptr, tok_ptr, s_ptr,
        sums_ptr, uo_ptr, chk_ptr, V,
        K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # One program per position: pass 1 takes the row max (and a finiteness checksum),
        # pass 2 accumulates sum_v exp2(s_k (z_v - max)) for all K candidates at once.
        pid = tl.program_id(0)
        n = tl.load(n_ptr + pid)
        t = tl.load(t_ptr + pid)
        base = z_ptr + n * stride_n + t * stride_t
        offs = tl.arange(0, BLOCK)
        mvec = tl.full([BLOCK], float("-inf"), tl.float32)
        cvec = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            ok = idx < V
            z = tl.load(base + idx * stride_v, mask=ok, other=0.0).to(tl.float32)
            cvec += z
            mvec = tl.maximum(mvec, tl.where(ok, z, float("-inf")))
        mx = tl.max(mvec, axis=0)
        ks = tl.arange(0, KP)
        s = tl.load(s_ptr + ks, mask=ks < K, other=1.0)
        acc = tl.zeros([KP, BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            ok = idx < V
            z = tl.load(base + idx * stride_v, mask=ok, other=0.0).to(tl.float32)
            u = tl.where(ok, z - mx, float("-inf"))
            acc += tl.exp2(s[:, None] * u[None, :])
        tl.store(sums_ptr + pid * KP + ks, tl.sum(acc, axis=1), mask=ks < K)
        tok = tl.load(tok_ptr + pid)
        z_o = tl.load(base + tok * stride_v).to(tl.float32)
        tl.store(uo_ptr + pid, z_o - mx)
        tl.store(chk_ptr + pid, tl.sum(cvec, axis=0))

    return temperature_sums


def _loglik_fused(
    logits: torch.Tensor,
    tokens: Any,
    tok_host: np.ndarray,
    bmask: np.ndarray,
    cands: np.ndarray,
    chunk: int,
) -> torch.Tensor:
    import torch

    kernel = _triton_kernel()
    device = logits.device
    n, _, vocab = logits.shape
    k = cands.size
    kp = max(2, 1 << (k - 1).bit_length())
    rows_np, cols_np = np.nonzero(bmask)
    rows = torch.from_numpy(rows_np.astype(np.int64)).to(device)
    cols = torch.from_numpy(cols_np.astype(np.int64)).to(device)
    if _is_torch(tokens):
        tok = tokens.detach().to(device)[rows, cols].to(torch.long)
    else:
        tok = torch.from_numpy(tok_host[bmask].astype(np.int64)).to(device)
    betas = torch.tensor(1.0 / cands, dtype=torch.float32, device=device)
    scale = (betas * _INV_LN2).contiguous()
    acc = torch.zeros((n, k), dtype=torch.float64, device=device)
    chk = torch.empty(rows.numel(), dtype=torch.float32, device=device)
    sn, st, sv = logits.stride()
    with torch.no_grad():
        for a in range(0, rows.numel(), chunk):
            r, c, tk = rows[a : a + chunk], cols[a : a + chunk], tok[a : a + chunk]
            p = r.numel()
            sums = torch.empty((p, kp), dtype=torch.float32, device=device)
            u_o = torch.empty(p, dtype=torch.float32, device=device)
            kernel[(p,)](
                logits, sn, st, sv, r, c, tk, scale, sums, u_o, chk[a : a + p], vocab,
                K=k, KP=kp, BLOCK=512, num_warps=8,
            )  # fmt: skip
            logq = u_o.unsqueeze(1) * betas - sums[:, :k].clamp_min_(1.0).log_()  # (p, K)
            acc.index_add_(0, r, logq.to(torch.float64))
        bad = ~torch.isfinite(chk)
        if bool(bad.any()):
            # the checksum is also non-finite for huge finite logits and for -inf entries
            # (probability 0, fine except at the sampled token): confirm on the flagged rows
            idx = torch.nonzero(bad).squeeze(1)
            _check_positions_torch(logits, rows[idx], cols[idx], tok[idx])
        counts = torch.from_numpy(bmask.sum(axis=1)).to(device=device, dtype=torch.float64)
        return (acc / counts.unsqueeze(-1)).to(torch.float32)

