"""metactl's lean GRPO reference trainer (the paper reproduction, ``metactl reproduce``, is in
``metactl.adapters.lab.reproduce``).

Modules (torch and transformers are imported by the modules, so ``pip install metactl[reference]``):

* `trainer`: `GRPOConfig` and `GRPOTrainer`, GRPO for any Hugging Face causal LM with the rollout
  temperature chosen each step by a `metactl.MetaPolicy`; the same temperature samples and scores
  every batch, and TAMPO's candidate likelihoods come from the logits the update already computes.
* `rollout`: batched sampling with a KV cache; temperature-scaled token log-probs.
* `tasks`: the CPU-scale task (modular operation chains with a systematically biased teacher),
  its five graded held-out benchmarks and its verifier.
* `model`, `sft`: tiny Qwen2/Llama (over `metactl.adapters.char_tokenizer`), cached supervised
  warm-up.

Example:
    >>> from metactl.adapters.reference.trainer import GRPOConfig
    >>> GRPOConfig().group_size > 1
    True
"""
