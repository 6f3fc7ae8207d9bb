"""The verl adapter's ``metactl`` config group: parsed into a policy, every error names its key.
Needs no verl (the parser is numpy-only); OmegaConf nodes are checked where it is installed."""

from __future__ import annotations

from typing import Any

import pytest
from metactl.adapters.verl import (
    TRAINER_SUPPORT,
    MetaSettings,
    check_candidate_likelihood,
    check_rollout,
    check_temperature_check,
    policy_from_config,
    settings_from_config,
)

import metactl


def test_defaults_are_the_paper_tampo_policy() -> None:
    policy = policy_from_config(None)
    reference = metactl.tampo()
    assert policy.rule.name == "TAMPO"
    assert policy.candidates.tolist() == reference.candidates.tolist()
    assert policy.selector == reference.selector
    assert settings_from_config(None, policy).context_key is None


def test_a_full_group_builds_exactly_that_policy() -> None:
    group = {
        "rule": "TAMPO",
        "rule_kwargs": {"alpha": 0.2},
        "candidates": [0.5, 1.0, 1.5],
        "selector": "Nucleus",
        "selector_kwargs": {"top_p": 0.9},
        "seed": 7,
    }
    policy = policy_from_config(group)
    assert policy.candidates.tolist() == [0.5, 1.0, 1.5]
    assert policy.rule.alpha == 0.2 and policy.selector.top_p == 0.9
    same = metactl.MetaPolicy([0.5, 1.0, 1.5], metactl.TAMPO(alpha=0.2), metactl.Nucleus(0.9), 7)
    assert policy.select().index == same.select().index


def test_per_prompt_rules_need_a_context_key() -> None:
    policy = policy_from_config({"rule": "PTGS"})
    assert policy.contextual
    assert policy.candidates.tolist() == metactl.ptgs_candidates().tolist()
    with pytest.raises(ValueError, match=r"metactl\.context_key"):
        settings_from_config({"rule": "PTGS"}, policy)
    assert (
        settings_from_config({"rule": "PTGS", "context_key": "index"}, policy).context_key
        == "index"
    )
    with pytest.raises(ValueError, match="only used by per-prompt rules"):
        settings_from_config({"context_key": "index"}, policy_from_config(None))


@pytest.mark.parametrize(
    ("group", "error", "match"),
    [
        ({"rul": "TAMPO"}, ValueError, "unknown keys"),
        ({"rule": "Nope"}, ValueError, "metactl.rule must be one of"),
        ({"rule_kwargs": {"beta": 1}}, TypeError, "metactl.rule_kwargs"),
        ({"candidates": "0.7,1.0"}, TypeError, "metactl.candidates"),
        ({"candidates": [1.0, -1.0]}, ValueError, "candidates"),
        ({"selector": "Best"}, ValueError, "metactl.selector must be one of"),
        ({"selector_kwargs": {"top_p": 0.5}}, ValueError, "selector is null"),
        ({"selector": "Nucleus", "selector_kwargs": {"p": 0.5}}, TypeError, "selector_kwargs"),
        ({"seed": 1.5}, TypeError, "metactl.seed"),
        ({"seed": True}, TypeError, "metactl.seed"),
        ([("rule", "TAMPO")], TypeError, "must be a mapping"),
        ({"rule": ["TAMPO"]}, TypeError, r"metactl\.rule must be one name \(a str\)"),
        ({"rule": None}, TypeError, r"metactl\.rule must be one name"),
        ({"selector": ["Sample"]}, TypeError, r"metactl\.selector must be one name"),
        ({"selector": {"Sample": 1}}, TypeError, r"metactl\.selector must be one name"),
        ({"rule_kwargs": []}, TypeError, r"metactl\.rule_kwargs must be a mapping"),
        ({"rule_kwargs": 0}, TypeError, r"metactl\.rule_kwargs must be a mapping"),
        ({"rule_kwargs": ""}, TypeError, r"metactl\.rule_kwargs must be a mapping"),
        ({"rule_kwargs": False}, TypeError, r"metactl\.rule_kwargs must be a mapping"),
        ({"selector_kwargs": []}, TypeError, r"metactl\.selector_kwargs must be a mapping"),
        (
            {"selector": "Nucleus", "selector_kwargs": ""},
            TypeError,
            r"metactl\.selector_kwargs must be a mapping",
        ),
        ({"candidates": {0.7: "a", 1.0: "b"}}, TypeError, r"metactl\.candidates must be a list"),
        ({"candidates": {0.7, 1.0, 1.3}}, TypeError, r"metactl\.candidates must be a list"),
        ({"candidates": 0.7}, TypeError, r"metactl\.candidates must be a list"),
    ],
)
def test_bad_groups_are_refused(group: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        policy_from_config(group)


def test_null_kwargs_mean_no_arguments() -> None:
    policy = policy_from_config({"rule": "Hedge", "rule_kwargs": None, "selector_kwargs": None})
    assert policy.rule == metactl.Hedge()


def test_the_trainer_support_feeds_every_rule_the_trainer_can_sample() -> None:
    # rewards (per trajectory) and group_size (rollout.n) included: Counterfactual, Uncertainty
    for group in (
        {"rule": "Counterfactual"},
        {"rule": "Uncertainty", "candidates": [0.5, 1.0, 1.5]},
        {"rule": "TAMPO", "rule_kwargs": {"likelihood_normalization": "sum"}},
        {"rule": "PTGS"},
    ):
        metactl.check_trainer(policy_from_config(group), TRAINER_SUPPORT)
    assert TRAINER_SUPPORT.knobs == ("temperature",) and not TRAINER_SUPPORT.features


def test_rules_needing_context_features_are_refused() -> None:
    group = {"rule": "LinearThompson", "rule_kwargs": {"feature_dim": 2}, "context_key": "index"}
    with pytest.raises(ValueError, match="feature_dim=0"):
        settings_from_config(group, policy_from_config(group))


_ROLLOUT = {"top_p": 1.0, "top_k": -1, "n": 4}


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"top_p": 0.9}, r"actor_rollout_ref\.rollout\.top_p=0\.9: TAMPO scores the candidate"),
        ({"top_k": 50}, r"actor_rollout_ref\.rollout\.top_k=50: TAMPO .* not top_k;"),
        ({"top_p": 0.95, "top_k": 20}, r"top_p=0\.95, actor_rollout_ref\.rollout\.top_k=20"),
    ],
)
def test_truncated_rollouts_are_refused_for_likelihood_rules(
    changes: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        check_rollout(metactl.tampo(), {**_ROLLOUT, **changes})


def test_truncation_is_fine_where_no_likelihood_is_scored() -> None:
    check_rollout(metactl.tampo(), {**_ROLLOUT, "top_k": 0})  # vLLM's other "off"
    check_rollout(metactl.tampo(), _ROLLOUT)
    for rule in ("PTGS", "EXP3"):
        check_rollout(policy_from_config({"rule": rule}), {**_ROLLOUT, "top_p": 0.9, "top_k": 5})


@pytest.mark.parametrize(
    "group", [{"rule": "Counterfactual"}, {"rule": "Uncertainty", "candidates": [0.5, 1.0, 1.5]}]
)
def test_group_rules_need_several_completions_per_prompt(group: dict[str, Any]) -> None:
    policy = policy_from_config(group)
    with pytest.raises(ValueError, match=r"rollout\.n=1: .* needs rollout\.n >= 2"):
        check_rollout(policy, {**_ROLLOUT, "n": 1})
    check_rollout(policy, {**_ROLLOUT, "n": 2})
    check_rollout(metactl.tampo(), {**_ROLLOUT, "n": 1})  # TAMPO reads no groups


def test_an_omegaconf_group_from_hydra_overrides() -> None:
    omegaconf = pytest.importorskip("omegaconf", reason="OmegaConf comes with verl's environment")
    config = omegaconf.OmegaConf.from_dotlist(
        ["metactl.rule=Hedge", "metactl.candidates=[0.7,1.3]", "metactl.seed=3"]
    )
    policy = policy_from_config(config.metactl)
    assert policy.rule.name == "Hedge" and policy.candidates.tolist() == [0.7, 1.3]


def test_the_temperature_check_is_on_by_default_and_configurable() -> None:
    policy = policy_from_config(None)
    default = settings_from_config(None, policy)
    assert default.temperature_check == "error" and dict(default.temperature_check_kwargs) == {}
    for mode in ("error", "warn", "off"):
        assert settings_from_config({"temperature_check": mode}, policy).temperature_check == mode
    # YAML 1.1 (OmegaConf's loader) reads an unquoted `off` as false
    assert settings_from_config({"temperature_check": False}, policy).temperature_check == "off"
    group = {"temperature_check": "warn", "temperature_check_kwargs": {"z_threshold": 8}}
    assert settings_from_config(group, policy).temperature_check_kwargs == {"z_threshold": 8.0}


@pytest.mark.parametrize(
    ("group", "error", "match"),
    [
        ({"temperature_check": "strict"}, ValueError, r"temperature_check must be one of"),
        ({"temperature_check": "ERROR"}, ValueError, r"temperature_check must be one of"),
        ({"temperature_check": True}, ValueError, r"temperature_check must be one of"),
        ({"temperature_check": None}, ValueError, r"temperature_check must be one of"),
        ({"temperature_check_kwargs": []}, TypeError, r"check_kwargs must be a mapping"),
        ({"temperature_check_kwargs": {"rtol": 0.1}}, TypeError, "do not fit"),
        ({"temperature_check_kwargs": {"z_threshold": -1}}, ValueError, "z_threshold must be"),
        ({"temperature_check_kwargs": {"min_effect": 1.0}}, ValueError, "min_effect must lie"),
        (
            {"temperature_check": "off", "temperature_check_kwargs": {"z_threshold": 8}},
            ValueError,
            "temperature_check_kwargs is set but metactl.temperature_check=off",
        ),
    ],
)
def test_bad_temperature_checks_are_refused(
    group: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        settings_from_config(group, policy_from_config(None))


@pytest.mark.parametrize(
    ("rollout", "algorithm", "match"),
    [
        ({"top_p": 0.9}, {}, r"rollout\.top_p=0\.9: metactl\.temperature_check"),
        ({"top_k": 20}, {}, r"rollout\.top_k=20: .* too cold"),
        ({}, {"rollout_correction": {"bypass_mode": True}}, r"bypass_mode=True skips"),
    ],
)
def test_runs_the_temperature_check_cannot_read_are_refused_unless_it_is_off(
    rollout: dict[str, Any], algorithm: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match + r".*\+metactl\.temperature_check=off"):
        check_temperature_check(MetaSettings(context_key=None), {**_ROLLOUT, **rollout}, algorithm)
    off = MetaSettings(context_key=None, temperature_check="off")
    check_temperature_check(off, {**_ROLLOUT, **rollout}, algorithm)
    check_temperature_check(MetaSettings(context_key=None), _ROLLOUT, {"rollout_correction": None})


def test_docstring_examples_run() -> None:
    import doctest

    import metactl.adapters.verl as package
    from metactl.adapters.verl import config, state

    for module in (package, config, state):
        result = doctest.testmod(module, raise_on_error=False)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_candidate_likelihood_defaults_to_fused_and_takes_passes() -> None:
    policy = policy_from_config(None)
    assert settings_from_config(None, policy).candidate_likelihood == "fused"
    group = {"candidate_likelihood": "passes"}
    assert settings_from_config(group, policy).candidate_likelihood == "passes"
    for bad in ("fast", True, None, 1):
        with pytest.raises(ValueError, match=r"metactl\.candidate_likelihood must be one of"):
            settings_from_config({"candidate_likelihood": bad}, policy)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"actor_rollout_ref": {"model": {"use_fused_kernels": True}}}, "use_fused_kernels"),
        ({"actor_rollout_ref": {"actor": {"strategy": "megatron"}}}, "strategy='megatron'"),
        (
            {
                "actor_rollout_ref": {
                    "actor": {"fsdp_config": {"ulysses_sequence_parallel_size": 4}}
                }
            },
            "ulysses_sequence_parallel_size=4",
        ),
        ({"algorithm": {"rollout_correction": {"bypass_mode": True}}}, "bypass_mode=True"),
    ],
)
def test_fused_likelihoods_are_refused_where_the_old_pass_cannot_score(
    config: dict[str, Any], match: str
) -> None:
    policy = policy_from_config({"rule": "TAMPO"})
    fused = settings_from_config(None, policy)
    with pytest.raises(ValueError, match=f"metactl.candidate_likelihood=fused .*{match}.*passes"):
        check_candidate_likelihood(fused, policy, config)
    passes = settings_from_config({"candidate_likelihood": "passes"}, policy)
    check_candidate_likelihood(passes, policy, config)
    exp3 = policy_from_config({"rule": "EXP3"})  # reads no likelihoods: nothing to score
    check_candidate_likelihood(settings_from_config(None, exp3), exp3, config)
    fsdp2 = {"actor_rollout_ref": {"actor": {"strategy": "fsdp2"}}}
    check_candidate_likelihood(fused, policy, fsdp2)
