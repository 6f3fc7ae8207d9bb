"""``MetaGRPOTrainer`` over any sampling knob: top_p, top_k, min_p, temperature under a fixed
truncation and joint grids, with a real tiny model and transformers ``generate``.

For every generation batch a recorder re-runs the policy (unchanged until the optimiser step
that follows) over prompt+completion and checks, on those logits:

* every sampled token lies in the kept set of the chosen setting *and the user's fixed knobs*,
  computed with transformers' own warpers (nothing inside generation is patched); and the same
  tokens would very unlikely all lie there without the chosen truncation (so the check can fail);
* the likelihoods the trainer scored equal :func:`metactl.likelihood.candidate_loglik` with the
  policy's family and the user's fixed knobs (``order="hf"``);
* the metrics name the knob (``metactl/top_p``, ...) through TRL's own logging.

The guard matrix (which user settings are accepted with which policy family) is tested cell by
cell, as docs/trl.md tabulates it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from metactl.adapters.trl import MetaGRPOTrainer
from metactl.adapters.trl.guards import check_generation_settings
from metactl.adapters.trl.testing import addition_dataset, digit_count_reward, tiny_grpo_config
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import metactl
from metactl.likelihood import candidate_loglik

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(MetaGRPOTrainer):
    """Records every training generation batch: the setting in force, the completions, the
    policy's logits over them, and the likelihoods the trainer scored."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[dict[str, Any]] = []
        self._scored: Any = None

    def _score(self, *args: Any, **kwargs: Any) -> Any:
        result, path = super()._score(*args, **kwargs)
        self._scored = result
        return result, path

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        training = self.model.training
        output = super()._generate_and_score_completions(inputs)
        if not training:
            return output
        prompt, tokens = output["prompt_ids"], output["completion_ids"]
        ids = torch.cat([prompt, tokens], dim=1)
        attn = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        p, c = prompt.shape[1], tokens.shape[1]
        self.records.append(
            {
                "setting": dict(self.meta_history[-1]["setting"]),
                "path": self.meta_history[-1]["likelihood_path"],
                "logits": logits[:, p - 1 : p + c - 1].float(),
                "tokens": tokens.clone(),
                "mask": output["completion_mask"].clone(),
                "loglik": self._scored.loglik.clone(),
                "counts": self._scored.counts.clone(),
                "knobs": {k: self.knob_values(k) for k in ("temperature", "top_p", "top_k")},
            }
        )
        return output


def _warpers(temperature: float, top_k: int | None, top_p: float, min_p: float, slack: float):
    """transformers' own sampling warpers, in ``generate``'s order (slack widens the top-p and
    min-p boundaries a little, against rounding between generation and the re-run)."""
    out: list[Any] = [TemperatureLogitsWarper(temperature)]
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(min(1.0, top_p + slack)))
    if min_p > 0.0:
        out.append(MinPLogitsWarper(max(0.0, min_p - slack)))
    return LogitsProcessorList(out)


@dataclass
class Case:
    policy: Any  # a factory: () -> MetaPolicy
    family: str
    user: dict[str, Any]  # GRPOConfig overrides (the user's fixed knobs)
    fixed: dict[str, Any] = field(default_factory=dict)  # candidate_loglik's fixed knobs
    likelihood: str = "fast"
    extra: dict[str, Any] = field(default_factory=dict)


CASES = {
    "top_p": Case(
        lambda: metactl.MetaPolicy([0.3, 0.5], metactl.TAMPO(), seed=0, hyperparameter="top_p"),
        "top_p", {"temperature": 0.9, "top_k": 8}, {"temperature": 0.9, "top_k": 8},
    ),
    "top_p-exact": Case(
        lambda: metactl.MetaPolicy([0.3, 0.5], metactl.TAMPO(), seed=1, hyperparameter="top_p"),
        "top_p", {"min_p": 0.05}, {"min_p": 0.05}, likelihood="exact",
    ),
    "top_p-fused-old-pass": Case(
        lambda: metactl.MetaPolicy([0.3, 0.6], metactl.TAMPO(), seed=2, hyperparameter="top_p"),
        "top_p", {"temperature": 1.1}, {"temperature": 1.1}, likelihood="fused",
        extra={"num_iterations": 2},  # TRL then makes an old-logprob pass: scored in its head
    ),
    "top_k": Case(
        lambda: metactl.MetaPolicy([2, 3], metactl.TAMPO(), seed=0, hyperparameter="top_k"),
        "top_k", {"top_p": 0.95}, {"top_p": 0.95},
    ),
    "min_p": Case(
        lambda: metactl.MetaPolicy([0.3, 0.5], metactl.TAMPO(), seed=0, hyperparameter="min_p"),
        "min_p", {"top_p": 0.9, "temperature": 0.8}, {"top_p": 0.9, "temperature": 0.8},
    ),
    "temperature-under-fixed-truncation": Case(
        lambda: metactl.MetaPolicy([0.6, 1.4], metactl.TAMPO(), seed=0),
        "temperature", {"top_p": 0.5, "top_k": 6, "min_p": 0.1},
        {"top_p": 0.5, "top_k": 6, "min_p": 0.1},
    ),
    "joint": Case(
        lambda: metactl.MetaPolicy(
            metactl.grid(temperature=[0.7, 1.3], top_p=[0.3, 0.6]), metactl.TAMPO(), seed=0,
            hyperparameter="joint",
        ),
        "joint", {"top_k": 7}, {"top_k": 7},
    ),
}  # fmt: skip


def _run(model_path: str, tmp_path: Any, case: Case) -> Recorder:
    overrides = {"max_steps": 3, "max_completion_length": 6, **case.user, **case.extra}
    trainer = Recorder(
        model=model_path,
        reward_funcs=digit_count_reward,
        args=tiny_grpo_config(tmp_path, **overrides),
        train_dataset=addition_dataset(32, seed=3),
        meta_policy=case.policy(),
        likelihood=case.likelihood,
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("name", list(CASES))
def test_chosen_setting_samples_and_scores_every_batch(model_path, tmp_path, name):
    case = CASES[name]
    trainer = _run(model_path, tmp_path, case)
    owned = trainer.meta_policy.knobs
    assert trainer.meta_scoring.family == case.family
    generations = 3 if "num_iterations" not in case.extra else 2  # max_steps=3
    assert len(trainer.records) == len(trainer.meta_history) == generations
    log_in_untruncated = 0.0
    for rec in trainer.records:
        setting = rec["setting"]
        full = {"temperature": 1.0, "top_p": 1.0, "top_k": None, "min_p": 0.0}
        full.update(case.fixed)
        full.update(setting)
        # the chosen values are where transformers generate reads them
        for knob in ("temperature", "top_p", "top_k"):
            expected = full[knob] if knob != "top_k" else (full["top_k"] or 0)
            assert set(rec["knobs"][knob].values()) == {expected}, (knob, rec["knobs"][knob])
        logits, tokens, mask = rec["logits"], rec["tokens"], rec["mask"].bool()
        # 1. every sampled token is in the kept set of the chosen setting + fixed knobs
        warp = _warpers(full["temperature"], full["top_k"], full["top_p"], full["min_p"], 1e-4)
        for i in range(tokens.shape[0]):
            for t in range(tokens.shape[1]):
                if not mask[i, t]:
                    continue
                kept = warp(tokens[i : i + 1, :t], logits[i, t : t + 1].clone())[0]
                assert math.isfinite(float(kept[tokens[i, t]])), (name, setting, i, t)
                # mass the chosen truncation keeps, under the same setting without it
                loose = dict(full)
                for knob in owned:
                    if knob != "temperature":
                        loose[knob] = {"top_p": 1.0, "top_k": None, "min_p": 0.0}[knob]
                base = _warpers(loose["temperature"], loose["top_k"], loose["top_p"],
                                loose["min_p"], 0.0)  # fmt: skip
                base_logits = base(tokens[i : i + 1, :t], logits[i, t : t + 1].clone())[0]
                probs = torch.softmax(base_logits, -1)
                log_in_untruncated += math.log(float(probs[torch.isfinite(kept)].sum()))
        # 2. the scored likelihoods are candidate_loglik's with the family and fixed knobs
        rows = rec["counts"] > 0
        candidates = list(trainer.meta_scoring.candidates)
        expected_l = candidate_loglik(
            logits[rows], tokens[rows], mask[rows], candidates, case.family,
            order="hf", **{k: v for k, v in case.fixed.items()},
        )  # fmt: skip
        torch.testing.assert_close(rec["loglik"][rows].float(), expected_l, rtol=0, atol=2e-5)
        assert (
            rec["path"] == {"fast": "generate", "exact": "exact", "fused": "fused"}[case.likelihood]
        )
    if set(owned) != {"temperature"}:
        # without the chosen truncation, all these tokens falling in its kept sets is unlikely
        assert log_in_untruncated < math.log(1e-3), log_in_untruncated
    # 3. the metrics name every knob of the decision, through TRL's own log
    logged = [h for h in trainer.state.log_history if "metactl/decision_prob" in h]
    assert len(logged) == len(trainer.meta_history)
    for entry, hist in zip(logged, trainer.meta_history, strict=False):
        for knob in ("temperature", "top_p", "top_k", "min_p"):
            key = f"metactl/{knob}"
            if knob in owned:
                assert float(entry[key]) == pytest.approx(float(hist["setting"][knob]))
            else:
                assert key not in entry
        labels = trainer.meta_scoring.labels()
        assert {f"metactl/prob/{label}" for label in labels} <= set(entry)


def test_evaluation_samples_at_the_config_setting_and_the_window_comes_back(model_path, tmp_path):
    policy = metactl.MetaPolicy([0.3, 0.5], metactl.TAMPO(), seed=0, hyperparameter="top_p")
    seen: list[tuple[bool, float]] = []

    class Spy(MetaGRPOTrainer):
        def _generate_single_turn(self, *args: Any, **kwargs: Any) -> Any:
            seen.append((bool(self.model.training), float(self.generation_config.top_p)))
            return super()._generate_single_turn(*args, **kwargs)

    args = tiny_grpo_config(tmp_path, max_steps=4, steps_per_generation=2, eval_strategy="steps",
                            eval_steps=1, per_device_eval_batch_size=4)  # fmt: skip
    trainer = Spy(model=model_path, reward_funcs=digit_count_reward, args=args,
                  train_dataset=addition_dataset(32), eval_dataset=addition_dataset(1, seed=2),
                  meta_policy=policy)  # fmt: skip
    trainer.train()
    assert trainer.eval_setting == {"top_p": 1.0}
    assert {v for training, v in seen if not training} == {1.0}
    assert [v for training, v in seen if training] == [
        h["setting"]["top_p"] for h in trainer.meta_history
    ]
    # after the evaluation inside the last window the window's top_p is back
    assert set(trainer.knob_values("top_p").values()) == {trainer.meta_history[-1]["value"]}
    assert any("eval_metactl/top_p" in h for h in trainer.state.log_history)


def test_checkpoint_holds_and_restores_the_setting(model_path, tmp_path):
    def make(out: Any) -> MetaGRPOTrainer:
        policy = metactl.MetaPolicy(metactl.grid(top_k=[2, 4], min_p=[0.0, 0.2]),
                                    metactl.TAMPO(), seed=0, hyperparameter="joint")  # fmt: skip
        return MetaGRPOTrainer(model=model_path, reward_funcs=digit_count_reward,
                               args=tiny_grpo_config(out, max_steps=2, save_strategy="steps",
                                                     save_steps=2),
                               train_dataset=addition_dataset(16), meta_policy=policy)  # fmt: skip

    trainer = make(tmp_path / "a")
    trainer.train()
    state = json.loads((tmp_path / "a" / "checkpoint-2" / "metactl_state.json").read_text())
    assert state["train_setting"] == trainer.meta_history[-1]["setting"]
    assert state["train_temperature"] is None
    fresh = make(tmp_path / "b")
    fresh.load_meta_state_dict(state)
    assert set(fresh.knob_values("top_k").values()) == {state["train_setting"]["top_k"]}
    assert set(fresh.knob_values("min_p").values()) == {state["train_setting"]["min_p"]}
    before = fresh.meta_policy.state_dict()
    bad = [
        ({"top_k": 3.5, "min_p": 0.0}, ValueError, "top_k"),
        ({"top_k": 40, "min_p": 0.0}, ValueError, r"candidate range \[2\.0, 4\.0\]"),
        ({"top_k": 2}, ValueError, "the policy sets"),
        ({"top_k": 2, "min_p": "x"}, TypeError, "min_p"),
        ("hot", TypeError, "train_setting must be an object"),
    ]
    for setting, error, match in bad:
        with pytest.raises(error, match=match):
            fresh.load_meta_state_dict({**state, "train_setting": setting})
    with pytest.raises(ValueError, match=r"train_temperature is 1\.0, but the policy sets"):
        fresh.load_meta_state_dict({**state, "train_temperature": 1.0})
    assert fresh.meta_policy.state_dict() == before  # a rejected state changes nothing


# ---------------------------------------------------------------------------- the guard matrix
def _policy(family: str, rule: Any = None) -> metactl.MetaPolicy:
    rule = metactl.TAMPO() if rule is None else rule
    if family == "temperature":
        return metactl.MetaPolicy([0.7, 1.0], rule)
    if family == "joint":
        return metactl.MetaPolicy(metactl.grid(temperature=[0.7, 1.0], top_p=[0.8, 1.0]), rule,
                                  hyperparameter="joint")  # fmt: skip
    values = {"top_p": [0.8, 0.9], "top_k": [5, 10], "min_p": [0.05, 0.1]}[family]
    return metactl.MetaPolicy(values, rule, hyperparameter=family)


FAMILIES = ["temperature", "top_p", "top_k", "min_p", "joint", "top_p-no-likelihood"]
# user setting -> the families that refuse it (regex of the error); every other family accepts
SETTINGS: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "top_p=0.9": ({"top_p": 0.9}, {f: r"^top_p=0.9 is set, but the meta-policy chooses top_p"
                                   for f in ("top_p", "joint", "top_p-no-likelihood")}),
    "top_k=20": ({"top_k": 20}, {"top_k": r"^top_k=20 is set, but the meta-policy chooses top_k"}),
    "min_p=0.05": ({"min_p": 0.05},
                   {"min_p": r"^min_p=0.05 is set, but the meta-policy chooses min_p"}),
    "generation_kwargs top_p": (
        {"generation_kwargs": {"top_p": 0.8}},
        {f: r"^generation_kwargs pins top_p=0.8" for f in ("top_p", "joint",
                                                           "top_p-no-likelihood")},
    ),
    "generation_kwargs top_k": (
        {"generation_kwargs": {"top_k": 4}}, {"top_k": r"^generation_kwargs pins top_k=4"},
    ),
    "generation_kwargs min_p": (
        {"generation_kwargs": {"min_p": 0.1}}, {"min_p": r"^generation_kwargs pins min_p=0.1"},
    ),
    "generation_kwargs temperature": (
        {"generation_kwargs": {"temperature": 0.7}},
        {f: r"^generation_kwargs pins temperature=0.7" for f in FAMILIES},
    ),
    "repetition_penalty=1.1": (
        {"repetition_penalty": 1.1},
        {f: r"^repetition_penalty=1.1 reshapes" for f in FAMILIES if "no-likelihood" not in f},
    ),
    "typical_p=0.9": (
        {"generation_kwargs": {"typical_p": 0.9}},
        {f: r"^typical_p=0.9 reshapes" for f in FAMILIES if "no-likelihood" not in f},
    ),
    "num_beams=2": (
        {"generation_kwargs": {"num_beams": 2}},
        {f: r"^num_beams=2 reshapes" for f in FAMILIES if "no-likelihood" not in f},
    ),
    "continuous batching": (
        {"use_transformers_continuous_batching": True},
        {f: r"^use_transformers_continuous_batching with a meta_policy over"
         for f in ("top_p", "top_k", "min_p", "joint", "top_p-no-likelihood")},
    ),
    "continuous batching + top_k=20": (
        {"use_transformers_continuous_batching": True, "top_k": 20},
        {"temperature": r"^top_k=20 with use_transformers_continuous_batching",
         "top_k": r"^top_k=20 is set, but the meta-policy chooses top_k",
         **{f: r"^use_transformers_continuous_batching with a meta_policy over"
            for f in ("top_p", "min_p", "joint", "top_p-no-likelihood")}},
    ),
}  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_guard_matrix(model_path, tmp_path, family, setting):
    overrides, refused = SETTINGS[setting]
    rule = metactl.EXP3() if family.endswith("no-likelihood") else None
    policy = _policy(family.split("-")[0], rule)

    def build() -> MetaGRPOTrainer:
        return MetaGRPOTrainer(model=model_path, reward_funcs=digit_count_reward,
                               args=tiny_grpo_config(tmp_path, **overrides),
                               train_dataset=addition_dataset(8), meta_policy=policy)  # fmt: skip

    if family in refused:
        with pytest.raises(ValueError, match=refused[family]):
            build()
        return
    trainer = build()
    scoring = trainer.meta_scoring
    # accepted: every knob the policy does not own is held fixed at the user's value
    user = {**overrides, **overrides.get("generation_kwargs", {})}
    for knob, off in (("top_p", 1.0), ("top_k", None), ("min_p", 0.0)):
        if knob in trainer.meta_policy.knobs:
            continue
        assert getattr(scoring.setting, knob) == user.get(knob, off), knob
    assert scoring.order == "hf"


def test_guard_matrix_per_prompt_cells(model_path, tmp_path):
    """Per-prompt (contextual) policies: the temperature only; top_k (rank-based, so it commutes
    with the per-row temperature) is held fixed; top_p / min_p act before the per-row temperature
    and are refused (vLLM carries per-row temperatures: test_per_prompt_vllm.py; colocated
    tensor parallelism is refused: test_per_prompt.py)."""
    with pytest.raises(ValueError, match=r"PTGS drives temperature only.*'top_p'"):
        metactl.MetaPolicy([0.8, 0.9], metactl.PTGS(), hyperparameter="top_p")
    ds = addition_dataset(8)
    ds = ds.add_column("prompt_id", list(range(len(ds))))

    def build(policy: Any = None, **overrides: Any) -> MetaGRPOTrainer:
        policy = metactl.tampo_per_prompt(seed=0) if policy is None else policy
        return MetaGRPOTrainer(model=model_path, reward_funcs=digit_count_reward,
                               args=tiny_grpo_config(tmp_path, **overrides), train_dataset=ds,
                               meta_policy=policy, meta_context_column="prompt_id")  # fmt: skip

    top_p_per_prompt = metactl.MetaPolicy([0.8, 0.9], metactl.ContextualTAMPO(),
                                          hyperparameter="top_p")  # fmt: skip
    with pytest.raises(ValueError, match=r"per-prompt meta_policy cannot sample the policy's "
                                         r"knobs \['top_p'\]"):  # fmt: skip
        build(top_p_per_prompt)

    assert build(top_k=5).meta_scoring.setting.top_k == 5
    with pytest.raises(ValueError, match=r"^top_p=0.9: with a per-prompt meta_policy"):
        build(top_p=0.9)
    with pytest.raises(ValueError, match=r"^min_p=0.1: with a per-prompt meta_policy"):
        build(min_p=0.1)


def test_refused_policies_name_the_knob(model_path, tmp_path):
    def build(policy: Any) -> MetaGRPOTrainer:
        return MetaGRPOTrainer(model=model_path, reward_funcs=digit_count_reward,
                               args=tiny_grpo_config(tmp_path), train_dataset=addition_dataset(8),
                               meta_policy=policy)  # fmt: skip

    generic = metactl.MetaPolicy([1.0, 2.0], metactl.EXP3(), hyperparameter="generic")
    with pytest.raises(ValueError, match="'generic', which is no sampling knob"):
        build(generic)
    # an entropy controller sets the temperature only: the core refuses it over another knob
    with pytest.raises(ValueError, match=r"EntropyTarget drives temperature only.*'top_p'"):
        metactl.MetaPolicy([0.8, 0.9], metactl.EntropyTarget(2.0, initial=0.85),
                           hyperparameter="top_p")  # fmt: skip


def test_check_generation_settings_matrix_without_a_trainer():
    """The same rules on the plain function (the settings TRL would merge)."""
    check_generation_settings({"top_p": 0.9, "top_k": 5, "min_p": 0.1}, generation_kwargs=None,
                              needs_likelihood=True, owned=("temperature",))  # fmt: skip
    check_generation_settings({"top_k": -1, "min_p": None}, generation_kwargs=None,
                              needs_likelihood=True, owned=("top_k", "min_p"))  # fmt: skip
    with pytest.raises(ValueError, match="two owners of one knob"):
        check_generation_settings({"top_k": 3}, generation_kwargs=None, needs_likelihood=False,
                                  owned=("temperature", "top_k"))  # fmt: skip
    with pytest.raises(ValueError, match=r"^top_h=0.5 reshapes"):
        check_generation_settings({"top_h": 0.5}, generation_kwargs=None, needs_likelihood=True)
    check_generation_settings({"top_h": 0.5}, generation_kwargs=None, needs_likelihood=False)
