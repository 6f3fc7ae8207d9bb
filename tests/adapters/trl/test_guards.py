"""Clear errors for settings that would silently break the temperature meta-policy in TRL."""

from __future__ import annotations

from typing import Any

import pytest
from metactl.adapters.trl import MetaGRPOTrainer
from metactl.adapters.trl.guards import (
    ALLOW_UNTESTED_ENV,
    check_generation_settings,
    check_trl_version,
)
from metactl.adapters.trl.testing import (
    addition_dataset,
    digit_count_reward,
    tiny_grpo_config,
)

import metactl

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(model_path, tmp_path, policy=None, **overrides):
    return MetaGRPOTrainer(
        model=model_path,
        reward_funcs=digit_count_reward,
        args=tiny_grpo_config(tmp_path, **overrides),
        train_dataset=addition_dataset(16),
        meta_policy=policy,
    )


def _refused_unless_allowed(check: Any, version: str, tested: str, monkeypatch: Any) -> None:
    """``check(version)`` raises naming the tested range, and only warns once the user allows
    untested versions."""
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(RuntimeError, match=tested):
        check(version)
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(RuntimeWarning, match=tested):
        check(version)


def _trainer_refuses_version(package: Any, version: str, model_path: str, tmp_path: Any,
                             monkeypatch: Any) -> None:
    """A trainer is not built while ``package`` reports an untested ``version``."""
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    monkeypatch.setattr(package, "__version__", version)
    with pytest.raises(RuntimeError, match=f"is tested with {package.__name__}"):
        _trainer(model_path, tmp_path)


@pytest.mark.parametrize("version", ["1.16.0", "1.16.5", "1.16.0rc1"])
def test_tested_trl_versions_pass(version):
    check_trl_version(version)


@pytest.mark.parametrize("version", ["1.15.2", "1.17.0", "1.17.0.dev0", "2.0.0", "0.16.0"])
def test_untested_trl_versions_raise(version, monkeypatch):
    _refused_unless_allowed(check_trl_version, version, r"trl>=1.16,<1.17", monkeypatch)


def test_trainer_refuses_an_untested_trl(model_path, tmp_path, monkeypatch):
    import trl

    _trainer_refuses_version(trl, "1.17.0", model_path, tmp_path, monkeypatch)


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"repetition_penalty": 1.1}, "repetition_penalty"),
        ({"generation_kwargs": {"typical_p": 0.9}}, "typical_p"),
        ({"generation_kwargs": {"epsilon_cutoff": 0.01}}, "epsilon_cutoff"),
    ],
)
def test_unmodelled_sampling_with_likelihood_rule_raises(model_path, tmp_path, overrides, name):
    with pytest.raises(ValueError, match=rf"^{name}=.*no likelihood\s+family models"):
        _trainer(model_path, tmp_path, metactl.tampo(), **overrides)


@pytest.mark.parametrize(
    ("overrides", "knob", "value"),
    [
        ({"top_p": 0.9}, "top_p", 0.9),
        ({"top_k": 5}, "top_k", 5),
        ({"min_p": 0.05}, "min_p", 0.05),
        ({"top_p": 0.9, "generation_kwargs": {"top_p": 0.8}}, "top_p", 0.8),  # kwargs override
    ],
)
def test_fixed_truncation_is_scored_with_a_temperature_policy(
    model_path, tmp_path, overrides, knob, value
):
    trainer = _trainer(model_path, tmp_path, metactl.tampo(), **overrides)
    assert trainer.meta_scoring.family == "temperature"
    assert getattr(trainer.meta_scoring.setting, knob) == value


def test_truncated_sampling_is_fine_without_likelihoods(model_path, tmp_path):
    policy = metactl.MetaPolicy([0.7, 1.0], metactl.EXP3(), seed=0)
    trainer = _trainer(model_path, tmp_path, policy, top_p=0.9, top_k=5)
    assert trainer.generation_config.top_p == 0.9


def test_pinned_temperature_in_generation_kwargs_raises(model_path, tmp_path):
    with pytest.raises(ValueError, match=r"generation_kwargs pins temperature=0\.7"):
        _trainer(model_path, tmp_path, generation_kwargs={"temperature": 0.7})
    # also for rules that need no likelihood: the meta-policy owns the temperature
    policy = metactl.MetaPolicy([0.7, 1.0], metactl.EXP3(), seed=0)
    with pytest.raises(ValueError, match="generation_kwargs pins temperature"):
        _trainer(model_path, tmp_path, policy, generation_kwargs={"temperature": 0.7})


def test_bad_trainer_arguments(model_path, tmp_path):
    with pytest.raises(TypeError, match=r"meta_policy must be a metactl\.MetaPolicy"):
        _trainer(model_path, tmp_path, policy="tampo")
    generic = metactl.MetaPolicy([0.8, 0.9], metactl.EXP3(), hyperparameter="generic")
    with pytest.raises(ValueError, match="which is no sampling knob"):
        _trainer(model_path, tmp_path, generic)
    with pytest.raises(ValueError, match="likelihood must be 'fast', 'fused' or 'exact'"):
        MetaGRPOTrainer(model=model_path, reward_funcs=digit_count_reward, likelihood="approx")
    with pytest.raises(ValueError, match="loglik_window_bytes must be >= 1"):
        MetaGRPOTrainer(model=model_path, reward_funcs=digit_count_reward, loglik_window_bytes=0)


def test_default_policy_is_paper_tampo(model_path, tmp_path):
    trainer = _trainer(model_path, tmp_path)
    assert trainer.meta_policy.candidates.tolist() == list(metactl.PAPER_TEMPERATURES)
    assert trainer.meta_policy.requires == ("loglik", "advantages")


def test_check_generation_settings_names_the_setting():
    check_generation_settings({"top_p": 1.0, "top_k": 0, "min_p": None},
                              generation_kwargs=None, needs_likelihood=True)  # fmt: skip
    check_generation_settings({"top_k": 3}, generation_kwargs={}, needs_likelihood=True)
    with pytest.raises(ValueError, match=r"num_beams=3 .* Set num_beams=1"):
        check_generation_settings({"num_beams": 3}, generation_kwargs={}, needs_likelihood=True)
    check_generation_settings({"num_beams": 3}, generation_kwargs={}, needs_likelihood=False)


@pytest.mark.parametrize("version", ["5.17.0", "5.20.1", "5.24.0"])
def test_tested_transformers_versions_pass(version):
    from metactl.adapters.trl.guards import check_transformers_version

    check_transformers_version(version)


@pytest.mark.parametrize("version", ["5.16.2", "5.25.0", "6.0.0", "4.57.1"])
def test_untested_transformers_versions_raise(version, monkeypatch):
    from metactl.adapters.trl.guards import TESTED_TRANSFORMERS, check_transformers_version

    assert TESTED_TRANSFORMERS == ">=5.17,<5.25"
    _refused_unless_allowed(check_transformers_version, version, r"transformers>=5.17,<5.25",
                            monkeypatch)


def test_trainer_refuses_an_untested_transformers(model_path, tmp_path, monkeypatch):
    import transformers

    _trainer_refuses_version(transformers, "5.25.0", model_path, tmp_path, monkeypatch)


@pytest.mark.parametrize(
    ("generation_kwargs", "name"),
    [
        ({"no_repeat_ngram_size": 2}, "no_repeat_ngram_size"),
        ({"min_new_tokens": 2}, "min_new_tokens"),
        ({"bad_words_ids": [[5]]}, "bad_words_ids"),
        ({"suppress_tokens": [5]}, "suppress_tokens"),
        ({"sequence_bias": [[[5], -1.0]]}, "sequence_bias"),
        ({"encoder_repetition_penalty": 1.2}, "encoder_repetition_penalty"),
        ({"a_setting_metactl_does_not_know": 3}, "a_setting_metactl_does_not_know"),
    ],
)
def test_settings_no_family_models_are_refused_for_likelihood_rules(
    model_path, tmp_path, generation_kwargs, name
):
    """Only the generation settings the adapter knows to leave the distribution alone pass
    with a likelihood rule (an allow-list: an unknown setting is refused too)."""
    with pytest.raises(ValueError, match=rf"^{name}="):
        _trainer(model_path, tmp_path, metactl.tampo(), generation_kwargs=generation_kwargs)
    exp3 = metactl.MetaPolicy([0.7, 1.0], metactl.EXP3(), seed=0)  # needs no likelihoods
    _trainer(model_path, tmp_path, exp3, generation_kwargs=generation_kwargs)


def test_settings_that_leave_the_distribution_alone_pass():
    check_generation_settings(
        {"max_new_tokens": 8, "do_sample": True, "eos_token_id": [1], "pad_token_id": 0,
         "no_repeat_ngram_size": 0, "min_new_tokens": None, "bad_words_ids": [],
         "sequence_bias": None, "num_beams": 1, "repetition_penalty": 1.0,
         "stop_strings": ["\n"], "cache_implementation": None},
        generation_kwargs={}, needs_likelihood=True,
    )  # fmt: skip


@pytest.mark.parametrize("rule", ["tampo", "exp3", "ptgs"])
def test_greedy_decoding_is_refused_for_every_rule(model_path, tmp_path, rule):
    """A policy choosing temperatures over greedy decoding would change nothing it samples."""
    dataset = addition_dataset(16)
    extra: dict[str, object] = {}
    if rule == "ptgs":
        dataset = dataset.add_column("prompt_id", list(range(len(dataset))))
        extra["meta_context_column"] = "prompt_id"
    policy = {
        "tampo": lambda: metactl.tampo(seed=0),
        "exp3": lambda: metactl.MetaPolicy([0.7, 1.0], metactl.EXP3(), seed=0),
        "ptgs": lambda: metactl.ptgs(seed=0),
    }[rule]()
    with pytest.raises(ValueError, match=r"^do_sample=False decodes greedily"):
        MetaGRPOTrainer(
            model=model_path, reward_funcs=digit_count_reward,
            args=tiny_grpo_config(tmp_path, generation_kwargs={"do_sample": False}),
            train_dataset=dataset, meta_policy=policy, **extra,
        )  # fmt: skip
