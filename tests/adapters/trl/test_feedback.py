"""Meta-policy feedback inside TRL: fast (captured hidden states) == exact (extra forward)
candidate likelihoods, the LM-head transform matches TRL's fused kernel, and every kind of rule
(full-information, chosen-arm bandit, entropy controller, schedule) gets what it needs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from metactl.adapters.trl import MetaGRPOTrainer
from metactl.adapters.trl.scoring import (
    HiddenCapture,
    candidate_loglik_exact,
    candidate_loglik_from_hidden,
)
from metactl.adapters.trl.testing import (
    addition_dataset,
    build_char_tokenizer,
    build_tiny_model,
    digit_count_reward,
    tiny_grpo_config,
)
from trl.kernels import ChunkedLogProbFunction

import metactl
from metactl.likelihood import candidate_loglik
from tests.adapters.trl.helpers import digit_fraction_reward

CANDIDATES = [0.6, 0.8, 1.0, 1.3, 1.5]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_windowed_head_equals_full_logits_with_empty_rows_and_entropy():
    torch.manual_seed(0)
    n, c, h, v = 5, 7, 16, 23
    hidden = torch.randn(n, c, h)
    weight, bias = torch.randn(v, h), torch.randn(v)
    tokens = torch.randint(0, v, (n, c))
    mask = (torch.rand(n, c) > 0.3).long()
    mask[2] = 0  # a completion with no scored token
    logits = hidden @ weight.T + bias
    rows = mask.sum(1) > 0
    expected = candidate_loglik(logits[rows], tokens[rows], mask[rows], CANDIDATES).double()
    logp = torch.log_softmax(logits / 1.3, -1)
    expected_entropy = float((-(logp.exp() * logp).sum(-1) * mask).sum())
    for window in (1, 4 * v * 3, 1 << 30):  # 1 position, 3 positions, everything at once
        res = candidate_loglik_from_hidden(
            hidden, tokens, mask, weight, bias, CANDIDATES,
            entropy_temperature=1.3, window_bytes=window,
        )  # fmt: skip
        torch.testing.assert_close(res.loglik[rows], expected, rtol=0, atol=1e-5)
        assert torch.all(res.loglik[2] == 0) and int(res.counts[2]) == 0
        assert res.entropy_sum == pytest.approx(expected_entropy, rel=1e-5)


@pytest.mark.parametrize(("scale", "softcap"), [(1.0, None), (0.5, 3.0)])
def test_logit_transform_matches_trl_fused_kernel(scale, softcap):
    """Per-token log-probs of the fast path equal those of TRL's own chunked log-prob kernel."""
    torch.manual_seed(1)
    m, h, v = 9, 8, 31
    hidden, weight = torch.randn(m, h), torch.randn(v, h)
    targets = torch.randint(0, v, (m,))
    for temperature in (0.7, 1.4):
        trl_logps = ChunkedLogProbFunction.apply(
            hidden, weight, None, targets, temperature, 16, softcap, scale, ("log_probs",)
        )[0]
        res = candidate_loglik_from_hidden(
            hidden.unsqueeze(1), targets.unsqueeze(1), torch.ones(m, 1), weight, None,
            [temperature, 2.0], logit_scale=scale, softcap=softcap,
        )  # fmt: skip
        torch.testing.assert_close(res.loglik[:, 0].float(), trl_logps, rtol=0, atol=1e-5)


def test_generation_capture_equals_full_forward_with_left_padding():
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, seed=4).eval()
    enc = tok(["1+2=", "31+45=", "7+80="], return_tensors="pt", padding=True)
    capture = HiddenCapture(model.model, "generate")
    torch.manual_seed(0)
    with capture, capture.recording(), torch.no_grad():
        out = model.generate(**enc, do_sample=True, max_new_tokens=5, min_new_tokens=5,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
    p = enc["input_ids"].shape[1]
    completion = out[:, p:]
    mask = torch.ones_like(completion)
    attn = torch.cat([enc["attention_mask"], mask], 1)
    fast = candidate_loglik_from_hidden(
        capture.hidden(), completion, mask, model.lm_head.weight, None, CANDIDATES
    )
    exact = candidate_loglik_exact(model, out, attn, completion, mask, CANDIDATES, batch_size=2)
    torch.testing.assert_close(fast.loglik, exact.loglik, rtol=0, atol=1e-5)


class BothPaths(MetaGRPOTrainer):
    """Scores every generation batch on the configured path *and* with an extra forward."""

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


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({}, "generate"),  # on-policy default: TRL makes no old-logprob pass
        ({"steps_per_generation": 2, "num_iterations": 2, "beta": 0.1}, "old"),
    ],
)
def test_fast_path_equals_exact_path_inside_trl(model_path, tmp_path, overrides, path):
    args = tiny_grpo_config(tmp_path, max_steps=8, **overrides)
    trainer = BothPaths(
        model=model_path, reward_funcs=digit_count_reward, args=args,
        train_dataset=addition_dataset(64, seed=3), meta_policy=metactl.tampo(seed=1),
    )  # fmt: skip
    trainer.train()
    assert trainer.comparisons, "no batch was scored"
    for used, diff, tokens in trainer.comparisons:
        assert used == path
        assert tokens > 0
        assert diff < 1e-5


def test_fast_and_exact_runs_make_the_same_choices(model_path, tmp_path):
    histories = []
    for likelihood in ("fast", "exact"):
        trainer = MetaGRPOTrainer(
            model=model_path, reward_funcs=digit_count_reward,
            args=tiny_grpo_config(tmp_path / likelihood, max_steps=6),
            train_dataset=addition_dataset(64, seed=3),
            meta_policy=metactl.tampo(seed=2), likelihood=likelihood,
        )  # fmt: skip
        trainer.train()
        histories.append(trainer.meta_history)
    fast, exact = histories
    assert [h["value"] for h in fast] == [h["value"] for h in exact]
    np.testing.assert_allclose([h["probs"] for h in fast], [h["probs"] for h in exact], atol=1e-4)
    assert {h["likelihood_path"] for h in fast} == {"generate"}
    assert {h["likelihood_path"] for h in exact} == {"exact"}
    assert all(h["candidate_advantages"] is not None for h in fast)


@pytest.mark.parametrize(
    "policy",
    [
        metactl.MetaPolicy(CANDIDATES, metactl.EXP3(reward_max=4.0), seed=0),
        metactl.MetaPolicy(CANDIDATES, metactl.EntropyTarget(target_entropy=1.0, initial=1.0)),
        metactl.MetaPolicy(CANDIDATES, metactl.Schedule("linear", 0.6, 1.5, total_steps=3)),
    ],
    ids=["exp3-reward", "e3-entropy", "schedule"],
)
def test_rules_without_likelihoods_get_their_feedback(model_path, tmp_path, policy):
    trainer = MetaGRPOTrainer(
        model=model_path, reward_funcs=digit_count_reward,
        args=tiny_grpo_config(tmp_path, max_steps=3, top_p=0.95),  # allowed: no likelihoods
        train_dataset=addition_dataset(32), meta_policy=policy,
    )  # fmt: skip
    trainer.train()
    assert policy.step == 3
    values = [h["value"] for h in trainer.meta_history]
    if isinstance(policy.rule, metactl.Schedule):
        assert values == pytest.approx([0.6, 1.05, 1.5])
    if isinstance(policy.rule, metactl.EntropyTarget):
        # the untrained model's entropy (~3 nats) is far above the 1-nat target: it cools down
        assert values[0] == 1.0 and values[-1] < values[0]
    paths = {h["likelihood_path"] for h in trainer.meta_history}
    assert paths == ({"generate"} if "entropy" in policy.requires else {None})


# ------------------------------------------------------------------ what each rule is fed
class FeedbackSpy(metactl.MetaPolicy):
    """A policy that records the feedback of every update."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.feedback: list[metactl.Feedback] = []

    def update(self, decision, feedback=None, /, **kwargs):  # type: ignore[no-untyped-def]
        self.feedback.append(feedback if feedback is not None else metactl.Feedback(**kwargs))
        return super().update(decision, feedback, **kwargs)


class ScoredAndRewarded(MetaGRPOTrainer):
    """Records the likelihoods the trainer scored and TRL's reward of every completion."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.results: list[Any] = []
        self.rewards: list[np.ndarray] = []

    def _score(self, *args: Any, **kwargs: Any) -> Any:
        result, path = super()._score(*args, **kwargs)
        self.results.append(result)
        return result, path

    def _calculate_rewards(self, *args: Any, **kwargs: Any) -> Any:
        per_func = super()._calculate_rewards(*args, **kwargs)
        if self.model.training:
            self.rewards.append(per_func.sum(dim=1).double().cpu().numpy())
        return per_func


def train_spied(policy: Any, model_path: str, tmp_path: Any, reward: Any,
                **config: Any) -> ScoredAndRewarded:
    """A finished `ScoredAndRewarded` run of ``policy`` on 32 addition prompts."""
    trainer = ScoredAndRewarded(
        model=model_path, reward_funcs=reward, args=tiny_grpo_config(tmp_path, **config),
        train_dataset=addition_dataset(32, seed=3), meta_policy=policy,
    )  # fmt: skip
    trainer.train()
    return trainer


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loglik_reaches_the_rule_reduced_as_it_declares(model_path, tmp_path, reduction):
    policy = FeedbackSpy(CANDIDATES, metactl.TAMPO(likelihood_normalization=reduction), seed=0)
    assert policy.spec.loglik == reduction
    trainer = train_spied(policy, model_path, tmp_path, digit_count_reward, max_steps=2,
                          max_completion_length=6)
    assert len(policy.feedback) == len(trainer.results) == 2
    for feedback, result in zip(policy.feedback, trainer.results, strict=True):
        counts = result.counts.double().cpu()
        means = result.loglik.double().cpu()  # per-token means of every row and candidate
        expected = means * counts.unsqueeze(1) if reduction == "sum" else means
        np.testing.assert_allclose(feedback.loglik, expected.numpy(), rtol=1e-9, atol=1e-12)
    # completions of several tokens: a sum and a mean differ
    assert any(bool((r.counts >= 2).any()) for r in trainer.results)


@pytest.mark.parametrize(
    "rule",
    [metactl.Counterfactual(), metactl.Uncertainty(gain=0.1)],
    ids=["counterfactual", "uncertainty"],
)
def test_rules_reading_every_completions_reward_get_rewards_and_groups(model_path, tmp_path, rule):
    policy = FeedbackSpy(CANDIDATES, rule, seed=0)
    trainer = train_spied(policy, model_path, tmp_path, digit_fraction_reward, max_steps=3,
                          num_generations=4)
    assert policy.step == 3 == len(policy.feedback) == len(trainer.rewards)
    for step, (feedback, rewards) in enumerate(zip(policy.feedback, trainer.rewards, strict=True)):
        assert feedback.group_size == 4
        np.testing.assert_array_equal(feedback.rewards, rewards)  # TRL's rows, TRL's order
        if "loglik" in policy.spec.feedback:  # Counterfactual: whole-completion likelihoods
            result = trainer.results[step]
            sums = result.loglik.double().cpu() * result.counts.double().cpu().unsqueeze(1)
            np.testing.assert_allclose(feedback.loglik, sums.numpy(), rtol=1e-9, atol=1e-12)


def test_the_trainer_states_what_it_can_feed():
    from metactl.adapters.trl.trainer import trainer_support

    from metactl.feedback import FEEDBACK_NAMES

    everything, per_prompt = trainer_support(per_context=False), trainer_support(per_context=True)
    assert set(everything.feedback) == set(FEEDBACK_NAMES)
    assert set(everything.loglik) == {"mean", "sum"} == set(per_prompt.loglik)
    # one temperature per row needs a logits processor; the entropy is computed at one value
    assert per_prompt.knobs == ("temperature",) and "entropy" not in per_prompt.feedback
    assert not everything.features and not per_prompt.features
