"""MetaPolicy: the select/update loop, input validation, and state round-trips."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import metactl
from metactl import TAMPO, Decision, MetaPolicy

K = len(metactl.PAPER_TEMPERATURES)


def _feedback(rng: np.random.Generator, n: int = 8) -> dict:
    return {"loglik": rng.normal(-1.0, 0.3, size=(n, K)), "advantages": rng.normal(size=n)}


def test_import_does_not_load_torch() -> None:
    code = "import sys, metactl, metactl.likelihood; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_decision_fields_and_step_advance() -> None:
    policy = metactl.tampo(seed=1)
    decision = policy.select()
    assert isinstance(decision, Decision)
    assert decision.step == 0 and decision.value == policy.candidates[decision.index]
    assert 0 < decision.prob <= 1
    with pytest.raises(AttributeError):
        decision.value = 2.0  # type: ignore[misc]  # frozen
    info = policy.update(decision, **_feedback(np.random.default_rng(0)))
    assert info.step == 0 and policy.step == 1
    assert info.candidate_advantages is not None and info.candidate_advantages.shape == (K,)
    assert np.isclose(info.probs.sum(), 1.0)


def test_torch_tensors_are_accepted() -> None:
    torch = pytest.importorskip("torch")
    policy = metactl.tampo()
    decision = policy.select()
    loglik = torch.randn(4, K, dtype=torch.float32, requires_grad=True)
    policy.update(decision, loglik=loglik, advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]))
    assert policy.step == 1


def test_repr_is_readable() -> None:
    text = repr(metactl.tampo())
    assert "TAMPO(alpha=0.05" in text and "Nucleus(top_p=0.7)" in text and "step=0" in text


# -- bad inputs ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("candidates", "match"),
    [
        ([1.0], "at least 2"),
        ([], "empty"),
        ([1.0, 1.0, 1.2], "duplicate"),
        ([0.0, 1.0], "> 0"),
        ([-0.5, 1.0], "> 0"),
        ([1.0, float("nan")], "NaN"),
        ([1.0, float("inf")], "NaN or infinite"),
        ([[1.0, 2.0]], "1 dimension"),
    ],
)
def test_bad_candidates(candidates, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MetaPolicy(candidates, TAMPO())


def test_bad_constructor_types() -> None:
    with pytest.raises(TypeError, match="rule"):
        MetaPolicy([1.0, 2.0], "tampo")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="selector"):
        MetaPolicy([1.0, 2.0], TAMPO(), selector=0.7)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed"):
        MetaPolicy([1.0, 2.0], TAMPO(), seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        MetaPolicy([1.0, 2.0], TAMPO(), seed=-1)
    with pytest.raises(TypeError, match="candidates"):
        MetaPolicy(["a", "b"], TAMPO())
    with pytest.raises(ValueError, match="hyperparameter"):
        MetaPolicy([1.0, 2.0], TAMPO(), hyperparameter="beam_width")


def test_hyperparameter_ranges() -> None:
    MetaPolicy([0.5, 0.9, 1.0], TAMPO(), hyperparameter="top_p")
    with pytest.raises(ValueError, match="top-p"):
        MetaPolicy([0.5, 1.5], TAMPO(), hyperparameter="top_p")
    MetaPolicy([0.0, 0.1], TAMPO(), hyperparameter="min_p")
    with pytest.raises(ValueError, match="min-p"):
        MetaPolicy([0.1, 1.0], TAMPO(), hyperparameter="min_p")
    MetaPolicy([-1.0, 2.0], TAMPO(), hyperparameter="generic")


@pytest.mark.parametrize(
    ("feedback", "exc", "match"),
    [
        ({"loglik": np.full((4, K), np.nan), "advantages": np.zeros(4)}, ValueError, "loglik"),
        (
            {"loglik": np.zeros((4, K)), "advantages": np.array([0, 1, np.inf, 0])},
            ValueError,
            "advantages",
        ),
        ({"loglik": np.zeros((4, K - 1)), "advantages": np.zeros(4)}, ValueError, "loglik"),
        ({"loglik": np.zeros(K), "advantages": np.zeros(1)}, ValueError, "loglik"),
        ({"loglik": np.zeros((4, K)), "advantages": np.zeros(3)}, ValueError, "advantages"),
        ({"loglik": np.zeros((0, K)), "advantages": np.zeros(0)}, ValueError, "loglik.*empty"),
        ({"loglik": np.zeros((4, K)), "advantages": np.zeros((4, 1))}, ValueError, "advantages"),
        ({"loglik": np.zeros((4, K))}, ValueError, "advantages"),
        ({"advantages": np.zeros(4)}, ValueError, "loglik"),
        (
            {"loglik": np.zeros((4, K)), "advantages": np.zeros(4), "logliks": 1},
            TypeError,
            "logliks",
        ),
        ({"loglik": "abc", "advantages": np.zeros(4)}, TypeError, "loglik"),
        (
            {"loglik": np.zeros((4, K)), "advantages": np.zeros(4), "reward": float("nan")},
            ValueError,
            "reward",
        ),
    ],
)
def test_bad_feedback(feedback: dict, exc: type, match: str) -> None:
    policy = metactl.tampo()
    with pytest.raises(exc, match=match):
        policy.update(policy.select(), **feedback)
    assert policy.step == 0  # a rejected update changes nothing


def test_decision_from_another_policy_or_old_step() -> None:
    a, b = metactl.tampo(seed=0), metactl.tampo(seed=0)
    feedback = _feedback(np.random.default_rng(0))
    with pytest.raises(ValueError, match="another MetaPolicy"):
        a.update(b.select(), **feedback)
    decision = a.select()
    a.update(decision, **feedback)
    with pytest.raises(ValueError, match="step 0"):
        a.update(decision, **feedback)
    with pytest.raises(TypeError, match="decision"):
        a.update({"index": 0}, **feedback)  # type: ignore[arg-type]


# -- state -----------------------------------------------------------------------------------
RULES = [
    TAMPO(),
    TAMPO(alpha=0.1, normalizer="softmax"),
    metactl.Hedge(),
    metactl.MetaGradient(estimator="sampled"),
    metactl.EXP3(reward_min=-1, reward_max=1),
    metactl.UCB1(),
    metactl.ThompsonGaussian(),
    metactl.Fixed(1.0),
    metactl.Schedule("cosine", 0.9, 1.5, 20),
    metactl.EntropyTarget(1.5),
]


def _all_feedback(rng: np.random.Generator) -> dict:
    return {
        **_feedback(rng),
        "reward": float(rng.uniform(-1, 1)),
        "entropy": 1.0 + rng.random(),
        "vocab_size": 50,
    }


@pytest.mark.parametrize("rule", RULES, ids=lambda r: type(r).__name__)
def test_state_round_trip_gives_identical_future(rule) -> None:
    rng = np.random.default_rng(0)
    policy = MetaPolicy(metactl.PAPER_TEMPERATURES, rule, seed=7)
    for _ in range(5):
        policy.update(policy.select(), **_all_feedback(rng))
    saved = json.loads(json.dumps(policy.state_dict()))  # must survive JSON
    assert saved["schema_version"] == metactl.SCHEMA_VERSION and "rng" in saved
    restored = MetaPolicy.from_state_dict(saved)
    same_config = MetaPolicy(metactl.PAPER_TEMPERATURES, rule, seed=123)
    same_config.load_state_dict(saved)
    feed_rng = np.random.default_rng(1)
    for _ in range(10):
        feedback = _all_feedback(feed_rng)
        decisions = [p.select() for p in (policy, restored, same_config)]
        assert len({(d.index, d.value, d.prob) for d in decisions}) == 1
        infos = [
            p.update(d, **feedback)
            for p, d in zip((policy, restored, same_config), decisions, strict=True)
        ]
        assert all(np.array_equal(infos[0].probs, i.probs) for i in infos[1:])


def test_bad_state_dicts() -> None:
    policy = metactl.tampo()
    good = policy.state_dict()
    with pytest.raises(ValueError, match="schema_version"):
        policy.load_state_dict({**good, "schema_version": 99})
    with pytest.raises(ValueError, match="keys"):
        policy.load_state_dict({**good, "extra": 1})
    with pytest.raises(ValueError, match="candidates"):
        policy.load_state_dict({**good, "candidates": [1.0, 2.0]})
    with pytest.raises(ValueError, match="rule"):
        policy.load_state_dict({**good, "rule": {"type": "Hedge", "config": {}}})
    with pytest.raises(ValueError, match="rule_state"):
        policy.load_state_dict({**good, "rule_state": {"ema": [0.0] * 3}})
    with pytest.raises(ValueError, match="rule_state"):
        policy.load_state_dict({**good, "rule_state": {"ema": [float("nan")] * K}})
    with pytest.raises(ValueError, match="rng"):
        policy.load_state_dict({**good, "rng": {"bit_generator": "MT19937"}})
    with pytest.raises(ValueError, match="step"):
        policy.load_state_dict({**good, "step": -1})
    with pytest.raises(TypeError, match="state_dict"):
        policy.load_state_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metactl policy"):
        MetaPolicy.from_state_dict({**good, "rule": {"type": "Nope", "config": {}}})
    assert policy.state_dict() == good  # failed loads leave the policy untouched


def test_cli_help_and_unknown_command(capsys) -> None:
    from metactl.cli import main

    assert main(["--help"]) == 0
    assert "reproduce" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
