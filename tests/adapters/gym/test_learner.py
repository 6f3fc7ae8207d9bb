"""The tabular GRPO learner: rollouts, gradients, evaluation and the feedback it gives policies."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from metactl.adapters.gym import ENV_ID, TokenSearchEnv
from metactl.adapters.gym.learner import GRPOConfig, Rollout, TabularGRPO, log_softmax
from metactl.adapters.gym.training import (
    TRAINER_SUPPORT,
    StepRecord,
    TrainLog,
    group_advantages,
    train,
)
from metactl.adapters.lab.controllers import STUDY_ARMS as CONTROLLERS
from metactl.adapters.lab.gym_study import StudyConfig, make_controller

import metactl
from metactl.feedback import FEEDBACK_NAMES, FeedbackSpec

CANDS = np.array(metactl.PAPER_TEMPERATURES)


def _small_env(**kwargs: Any) -> TokenSearchEnv:
    defaults: dict[str, Any] = {"vocab_size": 5, "length": 3, "num_tasks": 3}
    return TokenSearchEnv(**{**defaults, **kwargs})


def test_group_advantages_match_a_direct_computation() -> None:
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(rewards, 4)
    first = rewards[:4]
    expected = (first - first.mean()) / (first.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(adv[:4], expected)
    assert np.all(adv[4:] == 0.0)  # a group with equal rewards carries no signal
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(rewards, 3)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(rewards, 1)


def test_rollout_uses_the_policy_logits_and_the_env_rewards() -> None:
    env = _small_env(reward="partial")
    learner = TabularGRPO(gym.make(ENV_ID, **env.config.__dict__), GRPOConfig(group_size=4))
    learner.logits += np.random.default_rng(1).normal(size=learner.logits.shape)  # context matters
    batch = learner.rollout(1.3, np.random.default_rng(0))
    n, length = batch.tokens.shape
    assert n == 3 * 4 and length == 3
    assert np.array_equal(batch.tasks, np.repeat(np.arange(3), 4))
    assert np.all(batch.states[:, 0] == 5)  # begin-of-answer state
    assert np.array_equal(batch.states[:, 1:], batch.tokens[:, :-1])
    for t in range(length):
        np.testing.assert_array_equal(
            batch.logits[:, t], learner.logits[batch.tasks, t, batch.states[:, t]]
        )
    # the env's own step() gives the same rewards as the learner's vectorised rollout
    replay = gym.make(ENV_ID, **env.config.__dict__)
    for i in range(n):
        replay.reset(seed=i, options={"task_id": int(batch.tasks[i])})
        for token in batch.tokens[i]:
            *_, reward, terminated, _, _ = replay.step(int(token))
        assert terminated and reward == batch.rewards[i]


def test_rollout_frequencies_match_the_exact_success_probability() -> None:
    env = _small_env(vocab_size=4, length=2, num_tasks=2, families=("shoulder",))
    learner = TabularGRPO(env, GRPOConfig(group_size=20_000))
    for temperature in (0.7, 1.4):
        batch = learner.rollout(temperature, np.random.default_rng(3))
        exact = learner.success_by_task(temperature)
        freq = batch.rewards.reshape(2, -1).mean(axis=1)
        sigma = np.sqrt(exact * (1 - exact) / 20_000)
        assert np.all(np.abs(freq - exact) < 5 * sigma + 1e-9)


def test_greedy_success_ignores_temperature_and_follows_the_argmax_path() -> None:
    env = _small_env(families=("shoulder",))
    learner = TabularGRPO(env)
    assert np.all(learner.greedy_success_by_task() == 0.0)  # the prior's mode is a decoy
    assert learner.success_rate(0.6) < learner.success_rate(1.0)  # the target is in the tail
    task, targets = 1, env.targets[1]
    prev = 5
    for t, token in enumerate(targets):
        learner.logits[task, t, prev, token] += 10.0
        prev = token
    assert learner.greedy_success_by_task().tolist() == [0.0, 1.0, 0.0]
    cold, hot = learner.success_by_task(0.6)[task], learner.success_by_task(1.5)[task]
    assert cold > hot > 0.0
    assert TabularGRPO(env, GRPOConfig(eval_temperature=0.6)).success_rate() == pytest.approx(
        TabularGRPO(env).success_rate(0.6)
    )


def test_gradient_matches_finite_differences() -> None:
    env = _small_env(vocab_size=3, length=2, num_tasks=2, reward="partial")
    learner = TabularGRPO(env, GRPOConfig(group_size=3))
    batch = learner.rollout(0.8, np.random.default_rng(0))
    adv = np.random.default_rng(1).normal(size=batch.tokens.shape[0])
    loss, grad = learner.gradient(batch, adv)

    def loss_at(table: np.ndarray) -> float:
        z = np.stack([table[batch.tasks, t, batch.states[:, t]] for t in range(2)], axis=1)
        logp = log_softmax(z / 0.8)
        taken = np.take_along_axis(logp, batch.tokens[..., None], axis=-1)[..., 0]
        return float(-(adv[:, None] * taken).mean())

    assert np.isclose(loss, loss_at(learner.logits))
    eps = 1e-6
    for index in np.ndindex(*learner.logits.shape):
        bumped = learner.logits.copy()
        bumped[index] += eps
        lowered = learner.logits.copy()
        lowered[index] -= eps
        numeric = (loss_at(bumped) - loss_at(lowered)) / (2 * eps)
        assert np.isclose(grad[index], numeric, atol=1e-7), index


def test_sgd_step_lowers_the_loss() -> None:
    learner = TabularGRPO(_small_env(), GRPOConfig(group_size=4, optimizer="sgd", lr=0.5))
    batch = learner.rollout(1.0, np.random.default_rng(0))
    adv = np.random.default_rng(1).normal(size=batch.tokens.shape[0])
    before = learner.update(batch, adv)
    after, _ = learner.gradient(batch, adv)
    assert after < before


def test_loglik_feedback_equals_direct_recomputation() -> None:
    records: list[StepRecord] = []
    train(metactl.tampo(seed=0), _small_env(), 6, GRPOConfig(group_size=4), seed=0,
          on_step=records.append)  # fmt: skip
    assert len(records) == 6
    for record in records:
        batch, feedback = record.batch, record.feedback
        assert set(feedback) == {"loglik", "advantages"}
        expected = np.empty((batch.tokens.shape[0], CANDS.shape[0]))
        for k, temp in enumerate(CANDS):
            logp = log_softmax(batch.logits / temp)
            taken = np.take_along_axis(logp, batch.tokens[..., None], axis=-1)[..., 0]
            expected[:, k] = taken.mean(axis=1)  # length-normalised, every position counts
        np.testing.assert_allclose(np.asarray(feedback["loglik"]), expected, rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(feedback["advantages"], record.advantages)
        np.testing.assert_allclose(record.advantages, group_advantages(batch.rewards, 4))
        assert batch.temperature == record.decision.value
        # the sampling temperature scores the batch: its column is the batch's own log-likelihood
        k = int(np.argmin(np.abs(CANDS - batch.temperature)))
        own = TabularGRPO.token_logprobs(record.learner, batch).mean(axis=1)
        np.testing.assert_allclose(expected[:, k], own)


@pytest.mark.parametrize(
    ("policy", "keys"),
    [
        (metactl.MetaPolicy(CANDS, metactl.Fixed(1.0)), set()),
        (metactl.MetaPolicy(CANDS, metactl.EXP3(), seed=0), {"reward"}),
        (metactl.MetaPolicy(CANDS, metactl.EntropyTarget(0.3)), {"entropy", "vocab_size"}),
        (metactl.MetaPolicy(CANDS, metactl.Hedge(), seed=0), {"loglik", "advantages"}),
    ],
    ids=["fixed", "exp3", "entropy", "hedge"],
)
def test_feedback_is_exactly_what_the_policy_requires(policy: Any, keys: set[str]) -> None:
    records: list[StepRecord] = []
    train(policy, _small_env(), 3, GRPOConfig(group_size=4), seed=0, on_step=records.append)
    for record in records:
        assert set(record.feedback) == keys
        batch = record.batch
        if "reward" in keys:
            assert record.feedback["reward"] == pytest.approx(batch.rewards.mean())
        if "entropy" in keys:
            p = np.exp(log_softmax(batch.logits / batch.temperature))
            entropy = -(p * np.log(p)).sum(axis=-1).mean()
            assert record.feedback["entropy"] == pytest.approx(entropy)
            assert record.feedback["vocab_size"] == 5


def test_learner_improves_on_an_easy_setting() -> None:
    env = TokenSearchEnv(vocab_size=6, length=3, num_tasks=4, families=("shoulder",))
    policy = metactl.MetaPolicy(CANDS, metactl.Fixed(1.0))
    log = train(policy, env, 40, GRPOConfig(group_size=8), seed=0)
    assert log.success[0] < 0.2
    assert log.final_success > 0.8
    assert log.auc > log.success[0]


def test_train_is_deterministic_given_the_seeds() -> None:
    env = _small_env()

    def run(seed: int) -> TrainLog:
        return train(metactl.tampo(seed=seed), env, 15, GRPOConfig(group_size=4), seed=seed)

    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a.success, b.success)
    np.testing.assert_array_equal(a.temperature, b.temperature)
    np.testing.assert_array_equal(a.probs, b.probs)
    assert not np.array_equal(a.success, c.success)
    assert a.probs.shape == (15, 10) and a.success_by_task.shape == (16, 3)
    expected_auc = (a.success[:-1] + a.success[1:]).sum() / 2 / 15
    assert a.auc == pytest.approx(expected_auc)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="optimizer"):
        GRPOConfig(optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eval_temperature"):
        GRPOConfig(eval_temperature=0.0)
    with pytest.raises(ValueError, match="betas"):
        GRPOConfig(betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="TokenSearchEnv"):
        TabularGRPO(gym.make("CartPole-v1"))
    learner = TabularGRPO(_small_env())
    with pytest.raises(ValueError, match="temperature"):
        learner.rollout(0.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="steps"):
        train(metactl.tampo(), _small_env(), 0)
    batch = learner.rollout(1.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="advantages"):
        learner.update(batch, np.zeros(3))
    with pytest.raises(ValueError, match=r"unknown names \['gradient_norm'\]"):
        learner.feedback(FeedbackSpec(("gradient_norm",)), batch,
                         np.zeros(batch.tokens.shape[0]), CANDS)  # fmt: skip
    with pytest.raises(TypeError, match=r"spec must be a metactl\.FeedbackSpec"):
        learner.feedback(("loglik",), batch, np.zeros(batch.tokens.shape[0]), CANDS)  # type: ignore[arg-type]


def test_the_learner_states_what_it_gives_and_refuses_the_rest_before_drawing() -> None:
    assert set(TRAINER_SUPPORT.feedback) == set(FEEDBACK_NAMES)
    assert set(TRAINER_SUPPORT.knobs) == {"temperature", "top_p", "top_k", "min_p"}
    assert set(TRAINER_SUPPORT.loglik) == {"mean", "sum"}
    assert TRAINER_SUPPORT.per_context and not TRAINER_SUPPORT.features
    featured = metactl.linear_thompson(seed=0, feature_dim=2)
    before = featured.state_dict()
    with pytest.raises(ValueError, match="feature_dim"):
        train(featured, _small_env(), 2)
    assert featured.state_dict() == before


# -- the signal rules and TAMPO variants in the learner ----------------------------------------

SIGNAL_RULES: dict[str, Any] = {
    "counterfactual": lambda: metactl.Counterfactual(),
    "counterfactual-informative": lambda: metactl.Counterfactual(objective="informative"),
    "entropy-schedule": lambda: metactl.EntropySchedule(0.6, 0.15, total_steps=8),
    "uncertainty": lambda: metactl.Uncertainty(),
    "tampo-std": lambda: metactl.TAMPO(standardize="std"),
    "tampo-sharp": lambda: metactl.TAMPO(tau=0.1),
    "tampo-sum": lambda: metactl.TAMPO(likelihood_normalization="sum"),
}


def _direct_loglik(batch: Any, how: str) -> np.ndarray:
    """Per answer and candidate: the sampled tokens' log-probs at T_k, summed or averaged."""
    expected = np.empty((batch.tokens.shape[0], CANDS.shape[0]))
    for k, temp in enumerate(CANDS):
        logp = log_softmax(batch.logits / temp)
        taken = np.take_along_axis(logp, batch.tokens[..., None], axis=-1)[..., 0]
        expected[:, k] = taken.sum(axis=1) if how == "sum" else taken.mean(axis=1)
    return expected


@pytest.mark.parametrize("name", sorted(SIGNAL_RULES))
def test_signal_rules_run_end_to_end_with_feedback_equal_to_a_recomputation(name: str) -> None:
    rule = SIGNAL_RULES[name]()
    policy = metactl.MetaPolicy(CANDS, rule, seed=0)
    records: list[StepRecord] = []
    log = train(policy, _small_env(), 8, GRPOConfig(group_size=4), seed=0, on_step=records.append)
    assert policy.step == 8 and len(records) == 8
    assert np.all((log.temperature >= CANDS.min()) & (log.temperature <= CANDS.max()))
    how = policy.spec.loglik
    assert how == ("sum" if name in ("counterfactual", "counterfactual-informative",
                                     "tampo-sum") else "mean")  # fmt: skip
    for record in records:
        batch, feedback = record.batch, record.feedback
        assert set(feedback) == set(rule.requires)
        if "loglik" in feedback:
            np.testing.assert_allclose(feedback["loglik"], _direct_loglik(batch, how),
                                       rtol=1e-9, atol=1e-12)  # fmt: skip
        if "rewards" in feedback:
            np.testing.assert_array_equal(feedback["rewards"], batch.rewards)
            assert feedback["rewards"] is not batch.rewards  # the policy gets its own copy
            assert feedback["group_size"] == 4
            # groups are consecutive rows: each group of 4 holds one task
            assert np.all(batch.tasks.reshape(-1, 4) == batch.tasks.reshape(-1, 4)[:, :1])
        if "entropy" in feedback:
            p = np.exp(log_softmax(batch.logits / batch.temperature))
            assert feedback["entropy"] == pytest.approx(-(p * np.log(p)).sum(axis=-1).mean())
            assert feedback["vocab_size"] == 5
        if name.startswith("counterfactual"):
            # the rule's per-step signal is the counterfactual score of exactly this batch
            scores, _ = metactl.rules.counterfactual.counterfactual_scores(
                _direct_loglik(batch, "sum"), batch.rewards, 4, record.decision.index,
                objective=rule.objective,
            )  # fmt: skip
            np.testing.assert_allclose(record.info.candidate_advantages, scores, rtol=1e-9)


def test_summed_loglik_is_the_mean_times_the_answer_length() -> None:
    runs = {}
    for how in ("sum", "mean"):
        learner = TabularGRPO(_small_env(), GRPOConfig(group_size=4))
        batch = learner.rollout(1.0, np.random.default_rng(3))
        adv = group_advantages(batch.rewards, 4)
        spec = FeedbackSpec(("loglik", "rewards", "group_size"), loglik=how)
        fb = learner.feedback(spec, batch, adv, CANDS)
        runs[how] = fb.loglik
    np.testing.assert_allclose(runs["sum"], runs["mean"] * 3, rtol=1e-12)  # length L = 3


def test_an_unknown_loglik_reduction_is_refused() -> None:
    with pytest.raises(ValueError, match=r"loglik must be one of \['mean', 'sum'\]"):
        FeedbackSpec(("loglik",), loglik="median")  # type: ignore[arg-type]


def test_train_refuses_a_rule_asking_for_an_unknown_loglik_reduction_before_select() -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class MedianFixed(metactl.Fixed):
        @property
        def loglik_reduction(self) -> str:
            return "median"

    policy = metactl.MetaPolicy(CANDS, MedianFixed(1.0))
    state = policy.state_dict()
    with pytest.raises(ValueError, match=r"loglik must be one of \['mean', 'sum'\]"):
        train(policy, _small_env(), 2)
    assert policy.state_dict() == state


# ---------------------------------------------------------------------- per-task temperatures
PER_PROMPT = ("ptgs", "tampo-per-prompt", "linear-thompson")


def _mixed_env() -> TokenSearchEnv:
    return TokenSearchEnv(vocab_size=8, length=3, num_tasks=4, prior_margins=(2.5, 7.0))


def test_gym_rows_are_sampled_and_scored_at_their_tasks_temperature() -> None:
    env = _mixed_env()
    learner = TabularGRPO(env, GRPOConfig(group_size=4))
    per_task = np.array([0.7, 1.4, 1.0, 0.6])
    rows = np.repeat(per_task, 4)
    batch = learner.rollout(rows, np.random.default_rng(5))
    assert np.array_equal(batch.row_temperatures(), rows)
    for task, temp in enumerate(per_task):
        # the same uniforms at the task's temperature alone: that task's rows are identical
        alone = learner.rollout(float(temp), np.random.default_rng(5))
        mine = batch.tasks == task
        assert np.array_equal(batch.tokens[mine], alone.tokens[mine])
        # log-probs: row by row at its own temperature
        expected = np.take_along_axis(
            log_softmax(batch.logits[mine] / temp), batch.tokens[mine][..., None], axis=-1
        )[..., 0]
        np.testing.assert_array_equal(learner.token_logprobs(batch)[mine], expected)
    # the gradient of task g's table equals the gradient of the batch scored at T_g alone
    # (a task's rows only touch its own table)
    adv = group_advantages(batch.rewards + np.arange(16) % 2, 4)
    _, grad = learner.gradient(batch, adv)
    for task, temp in enumerate(per_task):
        scalar = Rollout(batch.tasks, batch.states, batch.tokens, batch.logits, batch.rewards,
                         float(temp))
        _, grad_alone = learner.gradient(scalar, adv)
        np.testing.assert_array_equal(grad[task], grad_alone[task])
    # entropy: every row at its own temperature
    logp = log_softmax(batch.logits / rows[:, None, None])
    assert learner.entropy(batch) == pytest.approx(float(-(np.exp(logp) * logp).sum(-1).mean()))


def test_gym_uniform_per_row_temperature_is_the_global_path_bit_for_bit() -> None:
    learner = TabularGRPO(_mixed_env(), GRPOConfig(group_size=4))
    one = learner.rollout(1.3, np.random.default_rng(2))
    rows = learner.rollout(np.full(learner.num_rows, 1.3), np.random.default_rng(2))
    assert np.array_equal(one.tokens, rows.tokens) and np.array_equal(one.logits, rows.logits)
    assert np.array_equal(learner.token_logprobs(one), learner.token_logprobs(rows))
    adv = group_advantages(np.arange(16) % 3 / 2.0, 4)
    assert np.array_equal(learner.gradient(one, adv)[1], learner.gradient(rows, adv)[1])
    assert learner.entropy(one) == learner.entropy(rows)


@pytest.mark.parametrize(
    ("temperature", "error", "match"),
    [
        (np.ones(3), ValueError, r"one per row, shape \(16,\)"),
        (np.full(16, np.nan), ValueError, r"temperature\[0\] must be finite"),
        (np.zeros(16), ValueError, r"temperature\[0\] must be .*> 0"),
        (-1.0, ValueError, "temperature must be .*> 0"),
        ("hot", TypeError, "temperature must be a float"),
    ],
)
def test_gym_rollout_rejects_bad_temperatures(temperature, error, match) -> None:
    learner = TabularGRPO(_mixed_env(), GRPOConfig(group_size=4))
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    with pytest.raises(error, match=match):
        learner.rollout(temperature, rng)
    assert rng.bit_generator.state == before  # nothing drawn


@pytest.mark.parametrize("name", PER_PROMPT)
def test_gym_per_prompt_arms_run_end_to_end_keyed_by_task(name: str) -> None:
    assert name in CONTROLLERS
    policy = make_controller(name, StudyConfig(steps=4), seed=0)
    assert policy.spec.per_context
    seen = []
    log = train(policy, _mixed_env(), steps=4, config=GRPOConfig(group_size=4), seed=1,
                on_step=seen.append)
    assert policy.step == 4 and policy.num_contexts == 4
    assert log.task_temperature is not None and log.task_temperature.shape == (4, 4)
    for record, temps in zip(seen, log.task_temperature, strict=True):
        assert [d.context for d in record.decision] == [0, 1, 2, 3]  # keyed by task id
        np.testing.assert_array_equal(temps, record.decision.values)
        np.testing.assert_array_equal(record.batch.row_temperatures(),
                                      np.repeat(record.decision.values, 4))
        for key in policy.requires:
            assert np.shape(record.feedback[key])[0] == 16  # every row, in decision order
    np.testing.assert_allclose(log.temperature, log.task_temperature.mean(axis=1))
    assert np.all(np.isfinite(log.success))


def test_gym_global_policy_logs_one_temperature_for_every_task() -> None:
    log = train(metactl.MetaPolicy([0.8, 1.2], metactl.Fixed(1.2)), _mixed_env(), steps=3,
                config=GRPOConfig(group_size=4), seed=0)
    assert log.task_temperature is not None
    assert np.all(log.task_temperature == 1.2) and log.temperature.tolist() == [1.2] * 3
