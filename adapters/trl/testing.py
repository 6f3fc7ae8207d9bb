"""Tiny, fully local models, tokenizers and tasks for TRL tests, examples and benchmarks.

Nothing here touches the network: the tokenizer is a character-level ``tokenizers`` model
wrapped as a ``PreTrainedTokenizerFast`` (or a byte-level BPE trained locally on a synthetic
corpus, :func:`build_bpe_tokenizer`, for engines such as vLLM that need a real vocabulary), the
model is a ``Qwen2ForCausalLM`` built from a config, and the task is synthetic integer addition
(``"12+34="`` -> ``"46"``).

Example:
    >>> from metactl.adapters.trl.testing import build_char_tokenizer, build_tiny_model
    >>> tok = build_char_tokenizer()
    >>> tok.decode(tok("12+3=")["input_ids"], skip_special_tokens=True)
    '12+3='
    >>> model = build_tiny_model(tok, hidden_size=32, num_layers=1, seed=0)
    >>> model.config.vocab_size == len(tok)
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

__all__ = [
    "CHARS",
    "TinyModelSpec",
    "addition_dataset",
    "build_bpe_tokenizer",
    "build_char_tokenizer",
    "build_tiny_model",
    "digit_count_reward",
    "exact_match_reward",
    "fused_head_log_probs",
    "greedy_accuracy",
    "sft_warmup",
    "tiny_grpo_config",
    "tiny_model_dir",
    "torch_threads",
]

#: Characters of the synthetic tasks (one token each).
CHARS = "0123456789+-*=() "


def build_char_tokenizer(chars: str = CHARS) -> PreTrainedTokenizerFast:
    """The TRL tests' character-level fast tokenizer: one token per character of ``chars``,
    ``<bos>`` prepended (`metactl.adapters.char_tokenizer.build_char_tokenizer`).

    Ids: ``<pad>`` = 0, ``<eos>`` = 1, ``<bos>`` = 2, ``<unk>`` = 3, then the characters in
    order. Padding is on the left (what generation needs); ``decode`` joins characters without
    spaces.

    Example:
        >>> tok = build_char_tokenizer("0123456789+=")
        >>> tok("1+2=")["input_ids"][0] == tok.bos_token_id
        True
    """
    from ..char_tokenizer import build_char_tokenizer as build

    return build(chars, prepend_bos=True)


def _bpe_corpus(n: int, seed: int) -> Iterator[str]:
    """Synthetic training text: addition facts and pseudo-words built from syllables."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + list("aeiou")
    for i in range(n):
        if i % 3 == 0:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            yield f"{a}+{b}={a + b}"
        else:
            words = (
                "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(8)
            )
            yield " ".join(words)


def build_bpe_tokenizer(vocab_size: int = 512, *, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer locally (no hub) with exactly ``vocab_size`` tokens.

    Special tokens ``<pad>`` = 0, ``<eos>`` = 1, ``<bos>`` = 2 (``<bos>`` is prepended); left
    padding. The corpus is synthetic (addition facts and pseudo-words), sized so that the trainer
    reaches ``vocab_size`` merges: 32k tokens take about 10 s on one core.

    Example:
        >>> tok = build_bpe_tokenizer(300)
        >>> len(tok)
        300
        >>> tok.decode(tok("12+34=46")["input_ids"], skip_special_tokens=True)
        '12+34=46'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if not 260 <= vocab_size <= 200_000:
        raise ValueError(
            f"vocab_size must be in [260, 200000] (256 bytes + 3 specials), got {vocab_size}"
        )
    specials = ["<pad>", "<eos>", "<bos>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # about two new merges per line of text: enough lines that the merges do not run out
    core.train_from_iterator(_bpe_corpus(max(2_000, 2 * vocab_size), seed), trainer)
    if core.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"the BPE trainer stopped at {core.get_vocab_size()} tokens, not {vocab_size}"
        )
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", core.token_to_id("<bos>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        padding_side="left",
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 64,
    seed: int = 0,
) -> PreTrainedModel:
    """Build a randomly initialised ``Qwen2ForCausalLM`` sized for CPU tests (75k parameters).

    Example:
        >>> tok = build_char_tokenizer()
        >>> sum(p.numel() for p in build_tiny_model(tok).parameters()) < 200_000
        True
    """
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    if hidden_size % num_heads != 0:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})"
        )
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def addition_dataset(n: int, *, digits: int = 2, seed: int = 0) -> Dataset:
    """Synthetic addition prompts: ``{"prompt": "12+34=", "answer": "46"}`` rows.

    Example:
        >>> ds = addition_dataset(3, digits=1, seed=0)
        >>> sorted(ds.column_names)
        ['answer', 'prompt']
    """
    from datasets import Dataset

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    rng = random.Random(seed)
    hi = 10**digits - 1
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return Dataset.from_list(rows)


def exact_match_reward(completions: Sequence[str], answer: Sequence[str], **_: Any) -> list[float]:
    """TRL reward function: 1.0 when the completion (stripped) equals the answer, else 0.0.

    Example:
        >>> exact_match_reward(["46", "47 "], answer=["46", "46"])
        [1.0, 0.0]
    """
    return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]


def digit_count_reward(completions: Sequence[str], **_: Any) -> list[float]:
    """TRL reward function for tests: the number of digit characters in the completion.

    It gives non-zero, varied advantages even for an untrained model.

    Example:
        >>> digit_count_reward(["12a", "+"])
        [2.0, 0.0]
    """
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def sft_warmup(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    *,
    seconds: float = 5.0,
    max_steps: int = 10_000,
    digits: int = 2,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> int:
    """Supervised warm-up on ``a+b=`` -> ``sum<eos>`` so that GRPO sees non-zero rewards.

    Runs until ``seconds`` of wall time or ``max_steps`` optimizer steps, whichever comes first, and
    returns the number of steps taken. The model is left in eval mode.

    Example:
        >>> tok = build_char_tokenizer()
        >>> model = build_tiny_model(tok, hidden_size=32, num_layers=1)
        >>> sft_warmup(model, tok, seconds=60.0, max_steps=2)
        2
    """
    import torch

    if seconds <= 0 or max_steps < 1:
        raise ValueError("seconds must be > 0 and max_steps >= 1")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    hi = 10**digits - 1
    eos = tokenizer.eos_token
    model.train()
    start = time.perf_counter()
    step = 0
    while step < max_steps and time.perf_counter() - start < seconds:
        prompts, targets = [], []
        for _ in range(batch_size):
            a, b = rng.randint(0, hi), rng.randint(0, hi)
            prompts.append(f"{a}+{b}=")
            targets.append(f"{a + b}")
        texts = [p + t + eos for p, t in zip(prompts, targets, strict=True)]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        ids = enc["input_ids"].to(device)
        attn = enc["attention_mask"].to(device)
        labels = ids.clone()
        labels[attn == 0] = -100
        # Only learn the answer: mask the prompt part (left padding: prompt ends where '=' is).
        eq_id = tokenizer.convert_tokens_to_ids("=")
        eq_pos = (ids == eq_id).int().argmax(dim=1)
        positions = torch.arange(ids.size(1), device=device).unsqueeze(0)
        labels[positions <= eq_pos.unsqueeze(1)] = -100
        out = model(input_ids=ids, attention_mask=attn, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        step += 1
    model.eval()
    return step


def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    max_new_tokens: int = 4,
) -> float:
    """Greedy exact-match accuracy of ``model`` on ``prompts``.

    Example:
        >>> tok = build_char_tokenizer()
        >>> 0.0 <= greedy_accuracy(build_tiny_model(tok), tok, ["1+1="], ["2"]) <= 1.0
        True
    """
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
    with torch.no_grad():
        out = model.generate(  # type: ignore[operator]
            **enc,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].size(1) :], skip_special_tokens=True)
    model.train(was_training)
    return sum(t.strip() == a for t, a in zip(texts, answers, strict=True)) / len(prompts)


@dataclass(frozen=True)
class TinyModelSpec:
    """What :func:`tiny_model_dir` builds (and caches on disk under a hash of these fields).

    Example:
        >>> TinyModelSpec(hidden_size=32).num_layers
        2
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    max_positions: int = 64
    seed: int = 0
    sft_steps: int = 0
    sft_digits: int = 2
    #: ``"char"`` (:func:`build_char_tokenizer`) or ``"bpe"`` (:func:`build_bpe_tokenizer`)
    tokenizer: str = "char"
    #: vocabulary size of the BPE tokenizer (ignored for ``"char"``)
    bpe_vocab_size: int = 512

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "max_positions"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.sft_steps < 0:
            raise ValueError(f"sft_steps must be >= 0, got {self.sft_steps}")
        if self.tokenizer not in ("char", "bpe"):
            raise ValueError(f"tokenizer must be 'char' or 'bpe', got {self.tokenizer!r}")

    def key_fields(self) -> dict[str, Any]:
        """The fields that name the cached directory (the BPE ones only for a BPE spec)."""
        fields = asdict(self)
        if self.tokenizer == "char":
            del fields["tokenizer"], fields["bpe_vocab_size"]
        return fields


def tiny_model_dir(
    spec: TinyModelSpec | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Build (once) and save a tiny tokenizer+model; return the directory for ``from_pretrained``.

    The directory name is a hash of ``spec``, so repeated calls (and other processes) reuse it.
    SFT uses a fixed number of steps (``spec.sft_steps``): the result does not depend on speed.

    Example:
        >>> path = tiny_model_dir(TinyModelSpec(hidden_size=32, num_layers=1))
        >>> (path / "config.json").exists()
        True
    """
    spec = spec or TinyModelSpec()
    root = (
        Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir()) / "metactl_tiny"
    )
    key = hashlib.sha256(json.dumps(spec.key_fields(), sort_keys=True).encode()).hexdigest()[:12]
    path = root / f"qwen2-{spec.tokenizer}-{key}"
    if (path / "done").exists():
        return path
    tok = (
        build_char_tokenizer()
        if spec.tokenizer == "char"
        else build_bpe_tokenizer(spec.bpe_vocab_size, seed=spec.seed)
    )
    model = build_tiny_model(
        tok,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        max_positions=spec.max_positions,
        seed=spec.seed,
    )
    if spec.sft_steps:
        sft_warmup(
            model,
            tok,
            seconds=1e9,
            max_steps=spec.sft_steps,
            digits=spec.sft_digits,
            seed=spec.seed,
        )
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=_ensure_dir(root)))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "done").write_text(json.dumps(asdict(spec)))
    try:
        os.replace(tmp, path)
    except OSError:  # another process won the race; use its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "done").exists():
            raise
    return path


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def tiny_grpo_config(output_dir: str | os.PathLike[str], **overrides: Any) -> Any:
    """A ``GRPOConfig`` that runs on CPU in well under a second per step with the tiny model.

    Any field can be overridden by keyword.

    Example:
        >>> cfg = tiny_grpo_config("/tmp/x", max_steps=2)
        >>> (cfg.use_cpu, cfg.bf16, cfg.max_steps)
        (True, False, 2)
    """
    from trl import GRPOConfig

    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "max_steps": 3,
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 4,
        "temperature": 1.0,
        "learning_rate": 1e-3,
        "beta": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def fused_head_log_probs(model: Any, ids: Any, attention: Any, labels: Any, keep: int,
                         batch_size: int | None = None) -> Any:  # fmt: skip
    """The completion log-probs ``(N, keep)`` of a model with TRL's fused LM head
    (``add_fused_lm_head``), in no-grad passes of ``batch_size`` rows (all at once when None),
    as TRL's log-prob pass computes them: what a fused candidate capture records alongside."""
    import torch

    logps = []
    step = batch_size or ids.shape[0]
    for s in range(0, ids.shape[0], step):
        with torch.no_grad():
            out = model(input_ids=ids[s : s + step], attention_mask=attention[s : s + step],
                        labels=labels[s : s + step], fused_lm_head=True)  # fmt: skip
        logps.append(out.log_probs[:, -keep:])
    return torch.cat(logps)


@contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Temporarily set torch's intra-op threads (tiny models run fastest on one thread, and on a
    busy machine OpenMP spin-waiting makes multi-threaded tiny matmuls 10-50x slower).

    Example:
        >>> import torch
        >>> before = torch.get_num_threads()
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    import torch

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def launch_two_processes(
    script: str | os.PathLike[str], script_args: Sequence[str], launch_args: Sequence[str],
    workdir: str | os.PathLike[str], *, timeout: float = 300,
) -> Any:
    """Run ``script`` on 2 CPU processes under ``accelerate launch`` (gloo, a free local port,
    one OpenMP thread each, no user accelerate config) and return the finished process.

    ``launch_args`` select the mode, e.g. ``["--multi_gpu"]`` (plain data parallel; accelerate
    falls back to CPU) or the FSDP flags."""
    import socket
    import subprocess
    import sys

    env = dict(os.environ)
    env.update({
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(Path(workdir) / "hf"),  # ignore any user accelerate config
        "PYTHONUNBUFFERED": "1",
    })
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", *launch_args,
        "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port), str(script), *script_args,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
