"""Run ``metactl reproduce --preset paper`` end to end on a tiny local model and data file.

Builds a tiny Qwen2 with a character tokenizer and a small JSONL of arithmetic word problems,
saves them like real local assets, then runs the paper preset on them (bf16 autocast on CUDA,
fp32 on CPU) for a few steps. It checks the plumbing of the full-scale path (local loading,
math-verify rewards, KL to a reference model, TAMPO's likelihoods, the report), not results.

    python examples/reference_paper_smoke.py                 # auto device
    python examples/reference_paper_smoke.py --device cpu --steps 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from metactl.adapters.char_tokenizer import build_char_tokenizer
from metactl.adapters.lab.reproduce.cli import main as reproduce
from metactl.adapters.reference.model import TinyModelConfig, build_model

ALPHABET = "0123456789+-*/=.,()^ \n\\{}$abcdefghijklmnopqrstuvwxyz?"


def make_assets(root: Path, n: int = 40) -> tuple[Path, Path]:
    """Save a tiny model + tokenizer under ``root/model`` and a JSONL under ``root/data.jsonl``."""
    tok = build_char_tokenizer(ALPHABET)
    model = build_model(TinyModelConfig(hidden_size=64, num_layers=2, intermediate_size=128,
                                        max_positions=256), tok, seed=0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = [{"problem": f"what is {a}+{b}?", "answer": str(a + b)}
            for a in range(n // 4) for b in range(4)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root / "model", root / "data.jsonl"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=None, help="report directory (default: a temp dir)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model, data = make_assets(Path(tmp))
        out = args.out or str(Path(tmp) / "report")
        t0 = time.perf_counter()
        rc = reproduce([
            "--preset", "paper", "--model", str(model), "--data", str(data), "--device",
            args.device, "--instruction", "", "--steps", str(args.steps),
            "--prompts-per-step", "4", "--group-size", "6", "--grad-accum", "4",
            "--max-new-tokens", "32", "--max-prompt-len", "64", "--eval-size", "8",
            "--eval-n", "8", "--eval-k", "4", "--curve-points", "2", "--seeds", "1",
            "--controllers", "tampo,fixed-0.9", "--out", out, "--no-progress",
        ])
        report = json.loads((Path(out) / "report.json").read_text())
        g = report["config"]["grpo"]
        print(f"rc={rc} device={g['device']} precision={g['precision']} "
              f"steps={g['steps']} wall={time.perf_counter() - t0:.1f}s")
        for ctrl, s in report["summary"].items():
            print(ctrl, "T by quarter:", [round(t, 2) for t in s["temperature_quarters"]],
                  "steps/s:", round(s["steps_per_second"], 2))
    return rc


if __name__ == "__main__":
    sys.exit(main())
