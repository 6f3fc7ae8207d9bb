"""Tiny Qwen2 / Llama causal LMs built from a config (no weights to download).

Example:
    >>> from metactl.adapters.char_tokenizer import build_char_tokenizer
    >>> tok = build_char_tokenizer("0123456789+=")
    >>> model = build_model(TinyModelConfig(hidden_size=32, num_layers=1), tok, seed=0)
    >>> type(model).__name__, model.config.vocab_size
    ('Qwen2ForCausalLM', 16)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase


@dataclass(frozen=True)
class TinyModelConfig:
    """Architecture of the tiny model.

    Example:
        >>> TinyModelConfig(arch="llama").arch
        'llama'
    """

    arch: str = "qwen2"
    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_positions: int = 64
    # RoPE base: with 24-dim heads and sequences under 64 tokens, the usual 1e4 leaves few
    # rotation frequencies that tell nearby offsets apart; 100 makes the warm-up converge reliably
    rope_theta: float = 100.0

    def __post_init__(self) -> None:
        if self.arch not in ("qwen2", "llama"):
            raise ValueError(f"arch must be 'qwen2' or 'llama', got {self.arch!r}")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_positions"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.rope_theta > 1:
            raise ValueError(f"rope_theta must be > 1, got {self.rope_theta}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, num_heads by num_kv_heads")

    def to_dict(self) -> dict:
        """JSON-safe dict of the fields."""
        return dataclasses.asdict(self)


def build_model(
    cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int
) -> torch.nn.Module:
    """A freshly initialised (seeded) causal LM of the given architecture, in float32."""
    from transformers import LlamaConfig, Qwen2Config

    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_positions,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    config = Qwen2Config(**kwargs) if cfg.arch == "qwen2" else LlamaConfig(**kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float()


def n_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
