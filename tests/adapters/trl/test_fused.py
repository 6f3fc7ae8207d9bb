"""Candidate likelihoods computed inside TRL's fused log-prob head (``likelihood="fused"``).

The fold runs on the logit tiles of TRL's own ``ChunkedLogProbFunction`` during its old-logprob
pass, so the meta step adds no matmul. It must equal the exact path (an extra forward with full
logits) and leave TRL's own numbers untouched. The kernel's tile sizes are shrunk here so that a
tiny model still spans several token chunks and several vocabulary chunks.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import trl.kernels.chunked_logprob as kernels
import trl.trainer.utils as trl_utils
from metactl.adapters.trl import MetaGRPOTrainer
from metactl.adapters.trl.fused import FusedLogitsCapture
from metactl.adapters.trl.scoring import CandidateScoring, candidate_loglik_exact
from metactl.adapters.trl.testing import (
    addition_dataset,
    build_char_tokenizer,
    build_tiny_model,
    digit_count_reward,
    fused_head_log_probs,
    tiny_grpo_config,
)
from trl.trainer.utils import add_fused_lm_head

import metactl
from metactl.knobs import Setting

CANDIDATES = [0.6, 0.8, 1.0, 1.3, 1.5]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("token_chunk", "vocab_chunk"), [(4096, 32768), (7, 5)])
@pytest.mark.parametrize("batch_size", [2, None])
def test_fused_fold_equals_exact_and_leaves_trl_numbers_alone(
    token_chunk, vocab_chunk, batch_size, monkeypatch
):
    monkeypatch.setattr(kernels, "TOKEN_CHUNK_SIZE", token_chunk)
    monkeypatch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", vocab_chunk)
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, seed=3).eval()
    add_fused_lm_head(model, temperature=0.8)
    gen = torch.Generator().manual_seed(0)
    n, prompt, keep = 5, 4, 6
    ids = torch.randint(4, len(tok), (n, prompt + keep), generator=gen)
    attention = torch.ones_like(ids)
    attention[1, :2] = 0  # left padding
    attention[3, -2:] = 0  # a short completion
    completion_mask = attention[:, -keep:].clone()
    completion_mask[4] = 0  # a completion with no scored token
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :-keep] = -100

    plain = fused_head_log_probs(model, ids, attention, labels, keep, batch_size)
    capture = FusedLogitsCapture(CANDIDATES, entropy_temperature=1.3)
    with capture.recording(ids, attention, keep, batch_size):
        fused_pass = fused_head_log_probs(model, ids, attention, labels, keep, batch_size)
    assert torch.equal(fused_pass, plain)  # TRL's numbers are untouched
    assert capture.calls == (3 if batch_size == 2 else 1)  # one kernel call per batch chunk
    result = capture.result(ids[:, -keep:], completion_mask)
    assert result is not None, capture.failure
    exact = candidate_loglik_exact(model, ids, attention, ids[:, -keep:], completion_mask,
                                   CANDIDATES, batch_size=2, entropy_temperature=1.3)  # fmt: skip
    assert torch.equal(result.counts, exact.counts)
    torch.testing.assert_close(result.loglik, exact.loglik, rtol=0, atol=1e-5)
    assert torch.all(result.loglik[4] == 0)
    assert result.entropy_sum == pytest.approx(exact.entropy_sum, rel=1e-5)


@pytest.mark.parametrize("vocab_chunk", [32768, 5])
def test_fused_truncated_family_whole_tiles_or_a_clear_fallback(vocab_chunk, monkeypatch):
    """A truncated family (here top_p under a fixed temperature and top_k) is scored on tiles
    holding the whole vocabulary (== the exact path with the same scoring); split vocabularies
    make the capture decline with a reason (the trainer then scores with an extra forward)."""
    monkeypatch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", vocab_chunk)
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, seed=3).eval()
    add_fused_lm_head(model, temperature=0.9)
    ids = torch.randint(4, len(tok), (3, 9), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :-5] = -100
    scoring = CandidateScoring(candidates=(0.3, 0.6, 1.0), family="top_p",
                               setting=Setting(temperature=0.9, top_k=6))
    capture = FusedLogitsCapture(scoring)
    with capture.recording(ids, torch.ones_like(ids), 5, None), torch.no_grad():
        model(input_ids=ids, labels=labels, fused_lm_head=True)
    mask = torch.ones(3, 5)
    result = capture.result(ids[:, -5:], mask)
    if vocab_chunk < len(tok):
        assert result is None and "whole vocabulary" in str(capture.failure)
        return
    assert result is not None, capture.failure
    exact = candidate_loglik_exact(model, ids, torch.ones_like(ids), ids[:, -5:], mask, scoring,
                                   batch_size=3)  # fmt: skip
    torch.testing.assert_close(result.loglik, exact.loglik, rtol=0, atol=1e-5)
    plain = candidate_loglik_exact(model, ids, torch.ones_like(ids), ids[:, -5:], mask,
                                   [0.9, 1.0], batch_size=3)  # fmt: skip
    assert not torch.allclose(exact.loglik[:, :1], plain.loglik[:, :1], atol=1e-3)


def test_fused_capture_refuses_completions_it_did_not_score():
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, seed=3).eval()
    add_fused_lm_head(model)
    ids = torch.randint(4, len(tok), (2, 7), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :-3] = -100
    capture = FusedLogitsCapture(CANDIDATES)
    with capture.recording(ids, torch.ones_like(ids), 3, None), torch.no_grad():
        model(input_ids=ids, labels=labels, fused_lm_head=True)
    other = ids[:, -3:].clone()
    other[0, 1] = (other[0, 1] + 1) % len(tok)
    assert capture.result(other, torch.ones(2, 3)) is None
    assert "other tokens" in str(capture.failure)
    unrecorded = FusedLogitsCapture(CANDIDATES)
    assert unrecorded.result(ids[:, -3:], torch.ones(2, 3)) is None
    with (
        pytest.raises(ValueError, match="logits_to_keep"),
        unrecorded.recording(ids, torch.ones_like(ids), 7, None),
    ):
        pass


class FusedAndExact(MetaGRPOTrainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.comparisons: list[tuple[str, float, int]] = []

    def _score(self, decision, output, capture, path):  # type: ignore[no-untyped-def]
        result, used = super()._score(decision, output, capture, path)
        exact, _ = super()._score(decision, output, None, "exact")
        assert torch.equal(result.counts, exact.counts)
        diff = float((result.loglik - exact.loglik).abs().max())
        self.comparisons.append((used, diff, int(result.counts.sum())))
        return result, used


def test_fused_path_equals_exact_inside_trl_and_makes_the_same_choices(model_path, tmp_path):
    overrides = {"steps_per_generation": 2, "num_iterations": 2, "beta": 0.1}
    runs = {}
    for likelihood in ("fused", "fast"):
        trainer = FusedAndExact(
            model=model_path, reward_funcs=digit_count_reward,
            args=tiny_grpo_config(tmp_path / likelihood, max_steps=8, **overrides),
            train_dataset=addition_dataset(64, seed=3), meta_policy=metactl.tampo(seed=1),
            likelihood=likelihood,
        )  # fmt: skip
        trainer.train()
        runs[likelihood] = trainer
    fused = runs["fused"]
    assert [used for used, _, _ in fused.comparisons] == ["fused", "fused"]
    assert all(diff < 1e-5 and tokens > 0 for _, diff, tokens in fused.comparisons)
    assert [h["likelihood_path"] for h in fused.meta_history] == ["fused", "fused"]
    assert [h["value"] for h in fused.meta_history] == [
        h["value"] for h in runs["fast"].meta_history
    ]
    # without an old-logprob pass (on-policy default) "fused" scores like "fast" (generation)
    trainer = MetaGRPOTrainer(
        model=model_path, reward_funcs=digit_count_reward,
        args=tiny_grpo_config(tmp_path / "on-policy", max_steps=1),
        train_dataset=addition_dataset(16), meta_policy=metactl.tampo(seed=1),
        likelihood="fused",
    )  # fmt: skip
    trainer.train()
    assert trainer.meta_history[0]["likelihood_path"] == "generate"


def test_likelihood_argument_is_checked(model_path, tmp_path):
    with pytest.raises(ValueError, match="'fast', 'fused' or 'exact'"):
        MetaGRPOTrainer(
            model=model_path, reward_funcs=digit_count_reward,
            args=tiny_grpo_config(tmp_path), train_dataset=addition_dataset(16),
            likelihood="approximate",  # type: ignore[arg-type]
        )  # fmt: skip
