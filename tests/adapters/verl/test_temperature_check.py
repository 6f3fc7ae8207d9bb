"""The sampled-temperature check's statistic on the verl adapter's test model: batches sampled
with ``generate`` from the tiny Qwen2 of :func:`metactl.adapters.verl.testing.build_fixture`
(full distribution: ``top_k=0``, ``top_p=1``), scored as verl's FSDP engine scores them (float32
``logits / T``, verl's ``logprobs_from_logits`` and ``entropy_from_logits``), then
:func:`metactl.effective_temperature.temperature_score` and its check at the defaults the
trainer uses. Normal batches at every temperature pass; greedy batches and batches sampled at
1.0 while 0.6 was chosen fail. (The larger calibration behind the defaults is in docs/verl.md.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("verl", reason="verl is installed only in .ci/verl-env.sh's environment")

import torch
from metactl.adapters.verl.testing import build_fixture
from transformers import AutoModelForCausalLM, AutoTokenizer
from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

from metactl.effective_temperature import (
    DEFAULT_SCORE_EFFECT,
    DEFAULT_SCORE_Z,
    check_temperature_score,
    temperature_score,
)

PROMPTS, SAMPLES, TOKENS = 8, 4, 16  # 512 response tokens a batch


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: the model is tiny and the cores are shared (more threads only
    contend: ten times slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    folder = Path(build_fixture(tmp_path_factory.mktemp("fx"), prompts=4)) / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return net, tokenizer


def _batch(model: tuple[Any, Any], sampled: float | None, scored: float, seed: int) -> Any:
    """Sample a batch (``sampled=None``: greedy), score it at ``scored`` as verl does."""
    net, tokenizer = model
    rng = np.random.default_rng(seed)
    texts = [f"{a}+{b}=" for a, b in rng.integers(0, 100, size=(PROMPTS, 2))]
    enc = tokenizer([t for t in texts for _ in range(SAMPLES)], return_tensors="pt", padding=True)
    kwargs: dict[str, Any] = {"do_sample": False}
    if sampled is not None:
        kwargs = {"do_sample": True, "temperature": sampled, "top_k": 0, "top_p": 1.0}
    torch.manual_seed(seed)
    with torch.no_grad():
        seqs = net.generate(**enc, max_new_tokens=TOKENS, min_new_tokens=TOKENS,
                            pad_token_id=tokenizer.pad_token_id, **kwargs)  # fmt: skip
        width = enc.input_ids.shape[1]
        attention = torch.cat([enc.attention_mask, torch.ones_like(seqs[:, width:])], dim=1)
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        logits = net(input_ids=seqs, attention_mask=attention, position_ids=positions).logits
        z = (logits[:, width - 1 : -1] / scored).float()
        log_probs = logprobs_from_logits(z, seqs[:, width:])
        return temperature_score(log_probs, entropy_from_logits(z), temperature=scored)


@pytest.mark.parametrize("temperature", [0.5, 0.7, 1.0, 1.5])
def test_normal_batches_of_the_test_model_pass(model: tuple[Any, Any], temperature: float) -> None:
    scores = [_batch(model, temperature, temperature, seed) for seed in range(25)]
    z = np.array([s.z for s in scores])
    assert all(check_temperature_score(s) for s in scores)
    assert np.abs(z).max() < 4 and abs(z.mean()) < 1.0
    assert all(s.tokens == PROMPTS * SAMPLES * TOKENS for s in scores)


@pytest.mark.parametrize(
    ("sampled", "scored", "side"),
    [(None, 0.6, "colder"), (None, 1.0, "colder"), (1.0, 0.6, "hotter"), (0.6, 1.0, "colder")],
    ids=["greedy at 0.6", "greedy at 1.0", "1.0 scored at 0.6", "0.6 scored at 1.0"],
)
def test_greedy_or_wrong_temperature_batches_of_the_test_model_fail(
    model: tuple[Any, Any], sampled: float | None, scored: float, side: str
) -> None:
    for seed in range(100, 104):
        score = _batch(model, sampled, scored, seed)
        assert abs(score.z) > 1.5 * DEFAULT_SCORE_Z, score
        assert abs(score.effect) > 2 * DEFAULT_SCORE_EFFECT, score
        with pytest.raises(ValueError, match=f"drawn {side} than the intended temperature"):
            check_temperature_score(score)
