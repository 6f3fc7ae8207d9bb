"""TokenSearch-v0: registration, env checker, seeding, scoring and option validation."""

from __future__ import annotations

import warnings

import gymnasium as gym
import metactl.adapters.gym as gym_adapter
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from metactl.adapters.gym import ENV_ID, MAX_LENGTH, TokenSearchConfig, TokenSearchEnv
from metactl.adapters.gym.learner import log_softmax


def test_registered_with_string_entry_point_and_time_limit() -> None:
    spec = gym.spec(ENV_ID)
    assert spec.entry_point == "metactl.adapters.gym.env:TokenSearchEnv"
    assert spec.max_episode_steps == MAX_LENGTH
    env = gym.make(ENV_ID, vocab_size=5, length=3)
    assert isinstance(env.unwrapped, TokenSearchEnv)
    assert env.unwrapped.config.vocab_size == 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"reward": "partial", "deceptive": False, "render_mode": "ansi"},
        {"vocab_size": 2, "length": 2, "num_tasks": 1, "families": ("double",)},
        {"prior_margins": (2.5, 7.0)},
        {"prior_margin_range": (2.0, 8.0), "num_tasks": 5},
    ],
)
def test_check_env_passes_without_warnings(kwargs: dict) -> None:
    env = gym.make(ENV_ID, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)


def _task_sequence(env: gym.Env, seed: int, n: int = 30) -> list[int]:
    out = [env.reset(seed=seed)[1]["task_id"]]
    out += [env.reset()[1]["task_id"] for _ in range(n - 1)]
    return out


def test_reset_seed_is_reproducible_and_draws_every_task() -> None:
    a, b = gym.make(ENV_ID), gym.make(ENV_ID)
    seq_a, seq_b = _task_sequence(a, 7), _task_sequence(b, 7)
    assert seq_a == seq_b
    assert _task_sequence(a, 8) != seq_a
    assert set(_task_sequence(a, 7, n=200)) == set(range(a.unwrapped.num_tasks))


def test_task_set_is_a_function_of_the_config() -> None:
    a, b, c = TokenSearchEnv(task_seed=3), TokenSearchEnv(task_seed=3), TokenSearchEnv(task_seed=4)
    assert np.array_equal(a.targets, b.targets)
    assert np.array_equal(a.prior_logits(1), b.prior_logits(1))
    assert not np.array_equal(a.targets, c.targets)


def test_step_rewards_agree_with_vectorised_score() -> None:
    env = gym.make(ENV_ID, reward="partial", vocab_size=4, length=3)
    base = env.unwrapped
    rng = np.random.default_rng(0)
    tasks, answers, rewards = [], [], []
    obs, info = env.reset(seed=0)
    for episode in range(60):
        if episode:
            obs, info = env.reset()
        actions = rng.integers(0, 4, size=3)
        if episode % 3 == 0:  # make sure some answers hit the target
            actions = base.targets[info["task_id"]].copy()
        for t, action in enumerate(actions):
            assert obs["prefix"][t] == base.pad_id
            obs, reward, terminated, truncated, step_info = env.step(int(action))
            assert not truncated
            assert terminated == (t == 2)
            if not terminated:
                assert reward == 0.0
        assert np.array_equal(obs["prefix"], actions)
        tasks.append(info["task_id"])
        answers.append(actions)
        rewards.append(reward)
        assert step_info["success"] == np.array_equal(actions, base.targets[info["task_id"]])
    scored = base.score(np.array(tasks), np.array(answers))
    np.testing.assert_array_equal(scored, np.array(rewards))
    assert scored.max() == 1.0
    assert len(set(np.round(scored, 6))) > 2  # partial credit takes fractional values


def test_exact_reward_is_binary() -> None:
    env = TokenSearchEnv(vocab_size=4, length=3)
    answers = np.array([env.targets[0], (env.targets[0] + 1) % 4])
    answers[1, 1:] = env.targets[0, 1:]  # one wrong token
    assert env.score(np.array([0, 0]), answers).tolist() == [1.0, 0.0]


def test_prior_is_deceptive_and_families_are_ordered_by_difficulty() -> None:
    env = TokenSearchEnv(num_tasks=30)
    cfg = env.config
    success_at = {}
    for task in range(env.num_tasks):
        z = env.prior_logits(task)
        assert z.shape == (cfg.length, cfg.vocab_size + 1, cfg.vocab_size)
        assert np.array_equal(z[:, 0], z[:, -1])  # position-wise prior
        mode = z[:, 0].argmax(axis=1)
        target = env.targets[task]
        decisive = env.decisive[task]
        assert np.array_equal(mode[~decisive], target[~decisive])  # format positions: mode right
        assert np.all(mode[decisive] != target[decisive])  # decisive: a confident decoy
        assert decisive.sum() == {"shoulder": 1, "tail": 1, "double": 2}[env.families[task]]
        logp = log_softmax(z[:, 0])
        success_at.setdefault(env.families[task], []).append(
            np.exp(logp[np.arange(cfg.length), target].sum())
        )
    mean = {f: float(np.mean(v)) for f, v in success_at.items()}
    assert mean["shoulder"] > mean["tail"] > mean["double"]
    assert mean["shoulder"] < 0.1  # even the easy answers sit in the prior's tail


def test_non_deceptive_prior_has_no_decoy() -> None:
    env = TokenSearchEnv(deceptive=False, num_tasks=3, families=("tail",))
    for task in range(3):
        z = env.prior_logits(task)[:, 0]
        decisive = env.decisive[task]
        assert z[decisive].max() < env.config.prior_margin


def test_reset_options_and_step_errors() -> None:
    env = TokenSearchEnv(vocab_size=4, length=2, num_tasks=3)
    obs, info = env.reset(seed=0, options={"task_id": 2})
    assert info["task_id"] == 2 and int(obs["task"]) == 2
    with pytest.raises(ValueError, match="task_id"):
        env.reset(options={"task_id": 3})
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"colour": 1})
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(4)
    env.step(0)
    env.step(1)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)
    with pytest.raises(ValueError, match="answers"):
        env.score(np.array([0]), np.zeros((1, 3), dtype=int))
    with pytest.raises(ValueError, match="task_ids"):
        env.score(np.array([5]), np.zeros((1, 2), dtype=int))
    assert env.render() is None
    assert "task" in TokenSearchEnv(render_mode="ansi").render()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"vocab_size": 1}, ValueError, "vocab_size must be an integer >= 2"),
        ({"vocab_size": 2.0}, TypeError, "vocab_size must be an int"),
        ({"length": 0}, ValueError, "length must be an integer in"),
        ({"length": MAX_LENGTH + 1}, ValueError, "length must be an integer in"),
        ({"families": ("shoulder", "odd")}, ValueError, "unknown target family 'odd'"),
        ({"families": "tail"}, TypeError, "families must be a sequence"),
        ({"families": ()}, ValueError, "at least one target family"),
        ({"length": 1, "families": ("double",)}, ValueError, "too short"),
        ({"reward": "dense"}, ValueError, "reward must be 'exact' or 'partial'"),
        ({"num_tasks": 0}, ValueError, "num_tasks"),
        ({"prior_margin": float("nan")}, ValueError, "prior_margin"),
        ({"deceptive": 1}, TypeError, "deceptive"),
        ({"prior_margins": ()}, ValueError, "prior_margins must list at least one margin"),
        ({"prior_margins": (2.5, float("nan"))}, ValueError, r"prior_margins\[1\] must be finite"),
        ({"prior_margins": (-1.0,)}, ValueError, r"prior_margins\[0\] must be finite and >= 0"),
        ({"prior_margins": ("a",)}, TypeError, r"prior_margins\[0\] must be a float"),
        ({"prior_margins": (True,)}, TypeError, r"prior_margins\[0\] must be a float"),
        ({"prior_margins": "2.5"}, TypeError, "prior_margins must be a tuple of floats"),
        ({"prior_margins": 2.5}, TypeError, "prior_margins must be a tuple of floats"),
        ({"prior_margins": (2.5,), "prior_margin": 3.0}, ValueError,
         "leave prior_margin at its default"),
        ({"prior_margin_range": (3.0, 2.0)}, ValueError, "prior_margin_range must be"),
        ({"prior_margin_range": (1.0, 2.0, 3.0)}, ValueError, "prior_margin_range must be"),
        ({"prior_margin_range": (1.0, float("inf"))}, ValueError,
         r"prior_margin_range\[1\] must be finite"),
        ({"prior_margins": (2.5,), "prior_margin_range": (1.0, 2.0)}, ValueError,
         "prior_margins or prior_margin_range, not both"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        TokenSearchConfig(**kwargs)
    with pytest.raises(error, match=match):
        gym.make(ENV_ID, **kwargs)


def test_config_and_kwargs_are_exclusive() -> None:
    with pytest.raises(TypeError, match="either config"):
        TokenSearchEnv(TokenSearchConfig(), vocab_size=4)
    with pytest.raises(ValueError, match="render_mode"):
        TokenSearchEnv(render_mode="human")
    assert gym_adapter.FAMILIES == ("shoulder", "tail", "double")


def test_mixed_sharpness_gives_each_task_its_margin_and_keeps_the_rest_of_the_task_set() -> None:
    mixed = TokenSearchEnv(prior_margins=[2.5, 7.0])  # a list is accepted, stored as a tuple
    assert mixed.config.prior_margins == (2.5, 7.0)
    assert mixed.margins.tolist() == [2.5, 7.0, 2.5, 7.0, 2.5, 7.0]
    # every family meets both margins (6 tasks: 3 families x 2 margins, coprime cycles)
    assert {(f, float(m)) for f, m in zip(mixed.families, mixed.margins, strict=True)} == {
        (f, m) for f in ("shoulder", "tail", "double") for m in (2.5, 7.0)}
    plain = TokenSearchEnv()
    assert np.array_equal(plain.targets, mixed.targets)  # same targets, decoys, noise draws
    for task in range(6):
        z = mixed.prior_logits(task)[:, 0]  # (L, V)
        format_positions = ~mixed.decisive[task]
        assert np.all(z[format_positions].max(axis=1) == mixed.margins[task])
        assert np.all(z.max(axis=1) == mixed.margins[task])  # decoys at the same margin
    # one listed margin equal to the default is the default env, bit for bit
    same = TokenSearchEnv(prior_margins=(4.0,))
    for task in range(6):
        assert np.array_equal(same.prior_logits(task), plain.prior_logits(task))
    assert plain.margins.tolist() == [4.0] * 6
    # drawn margins: within the range, deterministic in task_seed, varying with it
    drawn = TokenSearchEnv(prior_margin_range=(2.0, 8.0), num_tasks=8)
    assert np.all((drawn.margins >= 2.0) & (drawn.margins <= 8.0))
    assert np.array_equal(drawn.margins,
                          TokenSearchEnv(prior_margin_range=(2.0, 8.0), num_tasks=8).margins)
    other = TokenSearchEnv(prior_margin_range=(2.0, 8.0), num_tasks=8, task_seed=1).margins
    assert not np.array_equal(drawn.margins, other)
    assert gym.make(ENV_ID, prior_margins=(2.5, 7.0)).unwrapped.margins.tolist()[:2] == [2.5, 7.0]
