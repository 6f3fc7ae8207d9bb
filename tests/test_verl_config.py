"""The verl adapter's ``metactl`` config group: parsed into a policy, every error names its key.
Needs no verl (the parser is numpy-only); OmegaConf nodes are checked where it is installed."""

from __future__ import annotations

import pytest
from metactl.adapters.verl import policy_from_config, settings_from_config

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
    ],
)
def test_bad_groups_are_refused(group: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        policy_from_config(group)


def test_an_omegaconf_group_from_hydra_overrides() -> None:
    omegaconf = pytest.importorskip("omegaconf", reason="OmegaConf comes with verl's environment")
    config = omegaconf.OmegaConf.from_dotlist(
        ["metactl.rule=Hedge", "metactl.candidates=[0.7,1.3]", "metactl.seed=3"]
    )
    policy = policy_from_config(config.metactl)
    assert policy.rule.name == "Hedge" and policy.candidates.tolist() == [0.7, 1.3]


def test_docstring_examples_run() -> None:
    import doctest

    import metactl.adapters.verl as package
    from metactl.adapters.verl import config

    for module in (package, config):
        result = doctest.testmod(module, raise_on_error=False)
        assert result.attempted > 0 and result.failed == 0, module.__name__
