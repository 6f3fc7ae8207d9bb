"""The trainer contract: what a policy declares (policy.spec), the one construction check
(check_trainer) and the one way a trainer's tensors become feedback (build_feedback)."""

from __future__ import annotations

import numpy as np
import pytest

import metactl
from metactl.feedback import Feedback, FeedbackSpec, TrainerSupport, build_feedback, check_trainer


def test_specs_declare_what_each_rule_needs() -> None:
    tampo = metactl.tampo().spec
    assert tampo == FeedbackSpec(("loglik", "advantages"), "mean", True, False, 0, ("temperature",))
    assert (
        metactl.MetaPolicy([0.8, 1.0], metactl.TAMPO(likelihood_normalization="sum")).spec.loglik
        == "sum"
    )
    assert metactl.MetaPolicy([0.8, 1.0], metactl.Counterfactual()).spec.loglik == "sum"
    ptgs = metactl.ptgs().spec
    assert ptgs.per_context and ptgs.feedback == ("rewards",)
    assert metactl.linear_thompson(feature_dim=3).spec.feature_dim == 3
    joint = metactl.tampo(metactl.grid(temperature=[0.7, 1.0], top_p=[0.9, 1.0])).spec
    assert joint.knobs == ("temperature", "top_p")
    assert metactl.recommended().spec.feedback == ("rewards",)
    assert metactl.recommended().spec.per_context


@pytest.mark.parametrize(
    ("policy", "support", "match"),
    [
        (
            metactl.MetaPolicy([0.5, 1.0, 1.5], metactl.Uncertainty()),
            TrainerSupport("T", feedback=("loglik", "advantages", "reward")),
            r"needs feedback \['rewards', 'group_size'\]",
        ),
        (
            metactl.MetaPolicy([0.8, 1.0], metactl.TAMPO(likelihood_normalization="sum")),
            TrainerSupport("T", loglik=("mean",)),
            "needs 'sum' log-likelihoods",
        ),
        (
            metactl.tampo([0.5, 0.9], hyperparameter="top_p"),
            TrainerSupport("T", knobs=("temperature",)),
            r"cannot sample the policy's knobs \['top_p'\]",
        ),
        (metactl.ptgs(), TrainerSupport("T"), "decides per prompt group"),
        (
            metactl.linear_thompson(feature_dim=2),
            TrainerSupport("T", per_context=True),
            "needs 2 feature",
        ),
    ],
)
def test_check_trainer_refuses_what_a_trainer_cannot_feed(policy, support, match) -> None:
    with pytest.raises(ValueError, match=match):
        check_trainer(policy, support)


def test_check_trainer_accepts_what_a_trainer_can_feed_and_checks_types() -> None:
    check_trainer(metactl.ptgs(), TrainerSupport("T", per_context=True))
    with pytest.raises(TypeError, match=r"metactl\.MetaPolicy"):
        check_trainer(object(), TrainerSupport("T"))
    with pytest.raises(TypeError, match="TrainerSupport"):
        check_trainer(metactl.tampo(), "trl")  # type: ignore[arg-type]


def test_build_feedback_reduces_likelihoods_the_way_the_rule_wants() -> None:
    summed = np.array([[-6.0, -3.0], [-4.0, -8.0], [0.0, 0.0]])
    counts = np.array([3, 4, 0])
    mean_spec = FeedbackSpec(("loglik", "advantages"), "mean")
    sum_spec = FeedbackSpec(("loglik", "advantages"), "sum")
    means = build_feedback(mean_spec, loglik_sum=summed, token_counts=counts, advantages=[1, 0, 0])
    assert means.loglik.tolist() == [[-2.0, -1.0], [-1.0, -2.0], [0.0, 0.0]]
    assert (
        build_feedback(sum_spec, loglik_sum=summed, advantages=[1, 0, 0]).loglik.tolist()
        == summed.tolist()
    )
    given_means = means.loglik
    back = build_feedback(
        sum_spec, loglik_mean=given_means, token_counts=counts, advantages=[1, 0, 0]
    )
    assert back.loglik.tolist() == summed.tolist()
    same = build_feedback(mean_spec, loglik_mean=given_means, advantages=[1, 0, 0])
    assert same.loglik.tolist() == given_means.tolist()  # passed on exactly, no round trip


def test_build_feedback_computes_only_what_is_needed_and_names_what_is_missing() -> None:
    bandit = FeedbackSpec(("reward",))
    assert build_feedback(bandit, rewards=[1.0, 0.0, 0.0, 1.0], loglik_sum=[[1.0]]).given() == (
        "reward",
    )
    assert build_feedback(bandit, rewards=[1.0, 0.0, 0.0, 1.0]).reward == 0.5
    assert build_feedback(bandit, rewards=np.array([1.0, 0.0])).reward == 0.5
    assert build_feedback(bandit, reward=0.25, rewards=np.array([1.0, 0.0])).reward == 0.25
    entropy = FeedbackSpec(("entropy", "vocab_size"))
    fb = build_feedback(entropy, entropy_sum=12.0, entropy_tokens=4, vocab_size=100)
    assert (fb.entropy, fb.vocab_size) == (3.0, 100)
    with pytest.raises(ValueError, match=r"needs \['advantages'\]"):
        build_feedback(FeedbackSpec(("loglik", "advantages")), loglik_sum=[[1.0]], token_counts=[1])
    with pytest.raises(ValueError, match="needs token_counts"):
        build_feedback(FeedbackSpec(("loglik",)), loglik_sum=[[1.0]])
    with pytest.raises(ValueError, match="not both"):
        build_feedback(FeedbackSpec(("loglik",)), loglik_sum=[[1.0]], loglik_mean=[[1.0]])


def test_feedback_object_validates_and_updates_a_policy() -> None:
    with pytest.raises(ValueError, match="one advantage per trajectory"):
        Feedback(loglik=np.zeros((3, 2)), advantages=[1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        Feedback(rewards=[np.nan])
    with pytest.raises(TypeError, match="unknown feedback"):
        Feedback.from_kwargs({"logliks": 1})
    policy = metactl.tampo(seed=0)
    info = policy.update(
        policy.select(), Feedback(loglik=np.zeros((2, 10)), advantages=[1.0, -1.0])
    )
    assert info.step == 0 and policy.step == 1
    with pytest.raises(TypeError, match="not both"):
        policy.update(policy.select(), Feedback(advantages=[1.0]), loglik=np.zeros((1, 10)))
