"""Benchmark: scoring sampled tokens under K candidate temperatures.

Compares :func:`metactl.likelihood.candidate_loglik` (K = 10 temperatures 0.6..1.5) with

* ``naive``: K separate passes ``torch.log_softmax(logits / T, -1).gather(...)``, and
* ``single``: one ``torch.log_softmax(logits / T, -1).gather(...)`` pass, i.e. what a GRPO
  trainer already pays to score its batch at the sampling temperature.

On CUDA, ``candidate_loglik`` defaults to its fused Triton kernel; the table then also shows
the eager chunked path (``fused=False``).

A second table times every other likelihood family at K = 10 on the same logits, against the
same single pass: temperatures under a fixed truncation (``top_p=0.9``, ``top_k=50``,
``min_p=0.1``, and all three), the ``min_p``, ``top_p`` and ``top_k`` families (the candidates
are that knob's values, at T = 1), and a joint 5 x 2 grid over (T, top_p); each with its
maximum error against a dense float64 reference built from HF's own logits warpers on the
first 64 positions (``--skip-families`` leaves the table out). All positions are masked (no
padding), so no method saves work by skipping positions.

Times are medians over ``--repeats`` interleaved runs after one warm-up (``--threads`` torch
CPU threads for every method). Peak extra memory (over the resident logits) is measured per
method: on CUDA with ``torch.cuda.max_memory_allocated``; on CPU in a fresh subprocess per
method, as the peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``)
minus the resident size just before the call, after a small warm-up call (steady state) and
with glibc's mmap threshold fixed at 128 KiB so that freed buffers leave the resident set.
RSS is page-granular and includes thread stacks, so expect a few KiB of noise. Targets:
>= 3.5x faster than naive, <= 3x the single pass, peak extra memory <= one chunk; temperatures
under a fixed truncation <= 3x the single pass; top-p and top-k (a selection or a sort per
position) as measured.

Usage::

    python benchmarks/likelihood.py                     # 4096 positions x 32768 vocab, CPU
    python benchmarks/likelihood.py --device cuda --positions 16384
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from metactl.knobs import SMOOTHING_EPS, grid
from metactl.likelihood import candidate_loglik, default_chunk_size

CANDIDATES = [round(0.6 + 0.1 * i, 1) for i in range(10)]
SAMPLING_T = 1.0
EPSILON = SMOOTHING_EPS
# name: (label, candidates, family, fixed knobs); K = 10 each
FAMILIES: dict[str, tuple[str, Any, str | None, dict[str, Any]]] = {
    "t_top_p": ("T x10 | top_p=0.9", CANDIDATES, "temperature", {"top_p": 0.9}),
    "t_top_k": ("T x10 | top_k=50", CANDIDATES, "temperature", {"top_k": 50}),
    "t_min_p": ("T x10 | min_p=0.1", CANDIDATES, "temperature", {"min_p": 0.1}),
    "t_all": ("T x10 | top_k=50,top_p=0.9,min_p=0.1", CANDIDATES, "temperature",
              {"top_k": 50, "top_p": 0.9, "min_p": 0.1}),
    "min_p": ("min_p x10 (T=1)", [0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5],
              "min_p", {}),
    "top_p": ("top_p x10 (T=1)", [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.95, 0.98, 1.0],
              "top_p", {}),
    "top_k": ("top_k x10 (T=1)", [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], "top_k", {}),
    "joint": ("grid T x5 * top_p x2", grid(temperature=[0.6, 0.8, 1.0, 1.2, 1.4],
                                           top_p=[0.9, 1.0]), None, {}),
}  # fmt: skip
METHODS = ("single", "naive", "metactl")
CUDA_METHODS = (*METHODS, "eager")  # on CUDA, metactl defaults to the fused Triton kernel
DIST = (
    "z = 3 * N(0,1) per token, plus 3 'dominant' tokens per position at "
    "logsumexp(background) + N(+1, 2), N(-1, 2), N(-3, 2); tokens sampled at T = 1"
)


def make_batch(
    positions: int, vocab: int, sequences: int, device: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic LM-like logits (built in place: no full-size temporaries), tokens, mask."""
    if positions % sequences:
        raise ValueError(f"--positions ({positions}) must be divisible by --sequences")
    length = positions // sequences
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.empty((sequences, length, vocab), dtype=torch.float32, device=device)
    logits.normal_(0.0, 3.0, generator=gen)
    flat = logits.view(-1, vocab)
    # Background log-partition, computed chunk-wise (no full-size temporaries).
    lse = torch.empty(positions, device=device)
    for a in range(0, positions, 256):
        lse[a : a + 256] = torch.logsumexp(flat[a : a + 256], dim=-1)
    dom = torch.randint(0, vocab, (positions, 3), generator=gen, device=device)
    offsets = torch.tensor([1.0, -1.0, -3.0], device=device)
    noise = torch.randn((positions, 3), generator=gen, device=device) * 2.0
    flat.scatter_(1, dom, lse.unsqueeze(1) + offsets + noise)
    tokens = torch.empty((sequences, length), dtype=torch.long, device=device)
    tflat = tokens.view(-1)
    for a in range(0, positions, 256):
        probs = torch.softmax(flat[a : a + 256] / SAMPLING_T, dim=-1)
        tflat[a : a + 256] = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    mask = torch.ones((sequences, length), dtype=torch.bool, device=device)
    return logits, tokens, mask


def describe(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[float, float]:
    """Mean entropy (nats) at T = 1 and median probability of the sampled token."""
    flat = logits.view(-1, logits.shape[-1])
    tok = tokens.view(-1)
    ent, ptok = [], []
    for a in range(0, flat.shape[0], 256):
        lp = torch.log_softmax(flat[a : a + 256], dim=-1)
        ent.append(-(lp.exp() * lp).sum(-1))
        ptok.append(lp.gather(-1, tok[a : a + 256, None]).squeeze(-1).exp())
    return float(torch.cat(ent).mean()), float(torch.cat(ptok).median())


def naive(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()
    cols = []
    for t in CANDIDATES:
        lp = torch.log_softmax(logits / t, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        cols.append((lp * m).sum(1) / m.sum(1))
    return torch.stack(cols, dim=1)


def single(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(logits / SAMPLING_T, dim=-1).gather(-1, tokens.unsqueeze(-1))
    m = mask.float()
    return (lp.squeeze(-1) * m).sum(1) / m.sum(1)


def method_fn(
    name: str, chunk: int | None
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "naive":
        return naive
    if name == "single":
        return single
    if name in FAMILIES:
        _, cands, family, fixed = FAMILIES[name]
        return lambda lg, tk, mk: candidate_loglik(
            lg, tk, mk, cands, family, **fixed, chunk_size=chunk
        )
    fused = False if name == "eager" else None
    return lambda lg, tk, mk: candidate_loglik(
        lg, tk, mk, CANDIDATES, chunk_size=chunk, fused=fused
    )


def family_error(
    name: str, logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
) -> float:
    """Max |metactl - dense reference| over the first 64 positions of the first row: the
    dense reference applies HF's logits warpers in ``generate``'s order per candidate
    (float64) and smooths with epsilon."""
    from transformers.generation import logits_process as lp

    _, cands, family, fixed = FAMILIES[name]
    knob = {"temperature": "temperature", "min_p": "min_p", "top_p": "top_p", "top_k": "top_k"}
    settings = list(cands) if family is None else [{**fixed, knob[family]: c} for c in cands]
    lg, tk, mk = logits[:1, :64], tokens[:1, :64], mask[:1, :64]
    ours = candidate_loglik(lg, tk, mk, cands, family, **fixed).double().cpu()
    z = lg[0].double().cpu()
    cols = []
    for cfg in settings:
        scores = z / cfg.get("temperature", 1.0)
        full = scores.log_softmax(-1)
        if cfg.get("top_k") is not None:
            scores = lp.TopKLogitsWarper(cfg["top_k"])(None, scores)
        if cfg.get("top_p", 1.0) < 1.0:
            scores = lp.TopPLogitsWarper(cfg["top_p"])(None, scores)
        if cfg.get("min_p", 0.0) > 0.0:
            scores = lp.MinPLogitsWarper(cfg["min_p"])(None, scores)
        truncated = any(
            (cfg.get("top_k") is not None, cfg.get("top_p", 1.0) < 1.0, cfg.get("min_p", 0.0) > 0)
        )
        if truncated:
            q = (1 - EPSILON) * scores.softmax(-1) + EPSILON * full.exp()
            logq = q.log()
        else:
            logq = full
        cols.append(logq.gather(-1, tk[0].cpu().unsqueeze(-1)).mean())
    return float((ours[0] - torch.stack(cols)).abs().max())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh subprocess: prints the peak extra bytes of one method as JSON."""
    torch.set_num_threads(args.threads)
    logits, tokens, mask = make_batch(args.positions, args.vocab, args.sequences, "cpu")
    fn = method_fn(args.measure_memory, args.chunk_size)
    with torch.no_grad():
        # steady state, as in a training loop: a small call first initialises kernels and,
        # for metactl, its worker threads (their stacks and malloc arenas are then reused)
        fn(logits[:, :64], tokens[:, :64], mask[:, :64])
        gc.collect()
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM (the peak RSS) to the current RSS
        fn(logits, tokens, mask)
        peak = _status_kib("VmHWM")
    print(json.dumps({"extra_bytes": (peak - before) * 1024}))


def peak_extra_cpu(name: str, args: argparse.Namespace) -> int | None:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--positions", str(args.positions),
        "--vocab", str(args.vocab),
        "--sequences", str(args.sequences),
        "--threads", str(args.threads),
        "--measure-memory", name,
    ]  # fmt: skip
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    # A fixed mmap threshold turns off glibc's dynamic threshold, so every allocation of
    # 128 KiB or more is its own mapping, returned on free: the peak RSS then shows it.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        print(f"  [memory measurement of {name} failed: {proc.stderr.strip()[-300:]}]")
        return None
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["extra_bytes"])


def peak_extra_cuda(fn: Callable, logits, tokens, mask) -> int:  # type: ignore[no-untyped-def]
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        out = fn(logits, tokens, mask)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--positions", type=int, default=4096, help="total positions (default 4096)")
    p.add_argument("--vocab", type=int, default=32768, help="vocabulary size (default 32768)")
    p.add_argument("--sequences", type=int, default=8, help="sequences the positions form")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median; default 5)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--chunk-size", type=int, default=None, help="positions per chunk")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--skip-memory", action="store_true", help="do not measure memory")
    p.add_argument("--skip-families", action="store_true", help="only the temperature family")
    p.add_argument("--families", default=None,
                   help=f"comma-separated subset of the family table ({','.join(FAMILIES)})")
    p.add_argument("--measure-memory", choices=(*METHODS, *FAMILIES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure_memory:
        measure_memory_child(args)
        return 0
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    chosen = tuple(FAMILIES)
    if args.families is not None:
        chosen = tuple(name.strip() for name in args.families.split(",") if name.strip())
        unknown = sorted(set(chosen) - set(FAMILIES))
        if unknown or not chosen:
            p.error(f"--families: unknown or empty {unknown}; choose from {list(FAMILIES)}")
    torch.set_num_threads(args.threads)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but torch.cuda.is_available() is False")

    logits, tokens, mask = make_batch(args.positions, args.vocab, args.sequences, device)
    workers = torch.get_num_threads() if device == "cpu" else 1  # see candidate_loglik
    chunk = args.chunk_size or default_chunk_size(
        args.vocab, torch.device(device).type, workers=workers
    )
    # each worker's buffer holds chunk // workers positions and never exceeds a run
    per_worker = min(max(1, chunk // workers), args.positions // args.sequences)
    chunk = per_worker * workers
    entropy, ptok = describe(logits, tokens)
    dev_name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"candidate scoring benchmark: torch {torch.__version__}, device {dev_name}, "
          f"threads {torch.get_num_threads()}")  # fmt: skip
    print(f"logits: {args.sequences} x {args.positions // args.sequences} positions "
          f"(= {args.positions}, all masked) x {args.vocab} vocab, float32 "
          f"({logits.numel() * 4 / 2**20:.0f} MiB)")  # fmt: skip
    print(f"distribution: {DIST}")
    print(f"  -> mean entropy at T=1: {entropy:.2f} nats; median sampled-token prob: {ptok:.2f}")
    print(f"K = {len(CANDIDATES)} candidates {CANDIDATES}; chunk = {chunk} positions "
          f"({workers} worker(s) x {per_worker}; {chunk * args.vocab * 4 / 2**20:.1f} MiB float32"
          f"{'; eager path only' if device.startswith('cuda') else ''})")  # fmt: skip

    methods = CUDA_METHODS if device.startswith("cuda") else METHODS
    families = () if args.skip_families else chosen
    methods = (*methods, *families)
    fns = {name: method_fn(name, args.chunk_size) for name in methods}
    times: dict[str, list[float]] = {name: [] for name in methods}
    with torch.no_grad():
        ref = naive(logits, tokens, mask)
        ours = fns["metactl"](logits, tokens, mask)
        max_err = float((ref - ours).abs().max())
        for name in methods:  # warm-up
            fns[name](logits, tokens, mask)
        for _ in range(args.repeats):  # interleaved, so drifting load hits all methods alike
            for name in methods:
                sync(device)
                t0 = time.perf_counter()
                fns[name](logits, tokens, mask)
                sync(device)
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}

    mem: dict[str, int | None] = {}
    if not args.skip_memory:
        for name in methods:
            if device.startswith("cuda"):
                mem[name] = peak_extra_cuda(fns[name], logits, tokens, mask)
            else:
                mem[name] = peak_extra_cpu(name, args)
    chunk_bytes = chunk * args.vocab * 4

    print(f"max |metactl - naive| over the (N, K) output: {max_err:.2e}")
    print()
    header = f"{'method':<34}{'median s':>10}{'min s':>9}{'max s':>9}{'vs single':>11}"
    header += f"{'peak extra MiB':>16}"
    print(header)
    print("-" * len(header))
    base_methods = [name for name in methods if name not in FAMILIES]
    labels = {
        "single": "single log_softmax (1 T)",
        "naive": f"naive {len(CANDIDATES)} x log_softmax",
        "metactl": "metactl candidate_loglik",
        "eager": "  same, fused=False (eager)",
    }
    if device.startswith("cuda"):
        labels["metactl"] += " (fused)"
    for name in base_methods:
        m = mem.get(name)
        mem_s = "n/a" if m is None else f"{m / 2**20:.1f}"
        rel = med[name] / med["single"]
        print(f"{labels[name]:<34}{med[name]:>10.3f}{min(times[name]):>9.3f}"
              f"{max(times[name]):>9.3f}{rel:>10.2f}x{mem_s:>16}")  # fmt: skip
    if families:
        print()
        print(f"every family at K = 10, epsilon = {EPSILON:g} (max err: vs dense HF-warper "
              "reference, first 64 positions)")  # fmt: skip
        fam_header = f"{'family':<40}{'median s':>10}{'vs single':>11}{'peak extra MiB':>16}"
        fam_header += f"{'chunks':>8}{'max err':>10}"
        print(fam_header)
        print("-" * len(fam_header))
        for name in families:
            m = mem.get(name)
            mem_s = "n/a" if m is None else f"{m / 2**20:.1f}"
            chunks_s = "n/a" if m is None else f"{m / chunk_bytes:.2f}"
            err = family_error(name, logits, tokens, mask)
            rel = med[name] / med["single"]
            print(f"{FAMILIES[name][0]:<40}{med[name]:>10.3f}{rel:>10.2f}x{mem_s:>16}"
                  f"{chunks_s:>8}{err:>10.1e}")  # fmt: skip
        fixed_truncation = [med[n] / med["single"] for n in families if n.startswith("t_")]
        if fixed_truncation:
            worst = max(fixed_truncation)
            print(f"temperature under a fixed truncation: at most {worst:.2f}x the single pass "
                  f"(target <= 3x: {'met' if worst <= 3.0 else 'MISSED'}); top-p / top-k as "
                  "measured")  # fmt: skip
    print()
    speedup = med["naive"] / med["metactl"]
    vs_single = med["metactl"] / med["single"]
    print(f"speedup over naive: {speedup:.2f}x  (target >= 3.5x: "
          f"{'met' if speedup >= 3.5 else 'MISSED'})")  # fmt: skip
    print(f"cost vs single pass: {vs_single:.2f}x  (target <= 3x: "
          f"{'met' if vs_single <= 3.0 else 'MISSED'})")  # fmt: skip
    if mem.get("metactl") is not None:
        m = mem["metactl"]
        assert m is not None
        fused_note = ""
        if device.startswith("cuda"):
            fused_note = " (the fused kernel allocates no chunk buffer)"
        over = m - chunk_bytes
        if over <= 0:
            verdict = "met"
        else:
            verdict = (f"MISSED by {over / 1024:.0f} KiB (the chunk buffers are one chunk; the"
                       " rest is bookkeeping that does not grow with V)")  # fmt: skip
        print(f"metactl peak extra memory: {m / 1024:.0f} KiB = {m / chunk_bytes:.3f} chunks; "
              f"one chunk = {chunk} x {args.vocab} x 4 B = {chunk_bytes / 1024:.0f} KiB"
              f"{fused_note}; logits = {logits.numel() * 4 / 2**20:.0f} MiB")  # fmt: skip
        print(f"  target <= 1 chunk: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
