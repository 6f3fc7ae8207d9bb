"""The reference GRPO trainer over any sampling knob: the sampler draws from the decision's
whole setting (only from the nucleus under top-p), every log-prob of the batch is the sampling
distribution's (`metactl.knobs`, the definition `metactl.likelihood` scores), the ``top-p`` and
``tampo-joint`` controllers run end to end with a report that names their knobs, policies the
trainer cannot apply are refused, and a temperature arm's trajectory is exactly the one recorded
from a trainer that set the temperature only."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import metactl.adapters.reference.trainer as trainer_mod  # noqa: E402
from metactl.adapters.char_tokenizer import build_char_tokenizer  # noqa: E402
from metactl.adapters.lab.controllers import (  # noqa: E402
    JOINT_TOP_P,
    TOP_P_GRID,
    controller_knobs,
    make_policy,
    validate_controller,
)
from metactl.adapters.reference.model import build_model  # noqa: E402
from metactl.adapters.reference.rollout import completion_logits, token_logprobs  # noqa: E402
from metactl.adapters.reference.tasks import ALPHABET  # noqa: E402
from metactl.adapters.reference.trainer import GRPOConfig, GRPOTrainer  # noqa: E402

import metactl  # noqa: E402
from metactl.knobs import Setting, kept_mask, log_probs, truncated_probs  # noqa: E402
from metactl.likelihood import candidate_loglik  # noqa: E402
from tests.adapters.reference.helpers import (  # noqa: E402
    TINY,
    make_trainer,
    timeless,
    train_until,
)

# ----------------------------------------------------------------------------------------------
# the temperature path is unchanged
# ----------------------------------------------------------------------------------------------
# Recorded from a trainer that set the temperature only (the same core): per step
# (temperature, mean reward, gradient norm, mean completion length), and the sum of |weights|
# after the 3 steps. Any change to the temperature path's sampling, scoring,
# loss or meta step changes some of these.
GOLDEN = {
    "fixed-1.2": ([(1.2, 0.25, 0.42670294642448425, 5.3125),
                   (1.2, 0.3125, 0.6702298521995544, 5.5),
                   (1.2, 0.25, 0.561606228351593, 5.6875)], 254.27023654943332),
    "tampo": ([(1.2, 0.25, 0.42670294642448425, 5.3125),
               (0.6, 0.3125, 1.345940113067627, 5.3125),
               (1.5, 0.25, 0.4483414888381958, 5.6875)], 254.3282285272653),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_a_temperature_arms_trajectory_is_unchanged(name):
    if name == "tampo":  # every row scored: the candidate likelihoods of all 16 rows matter
        policy, overrides = metactl.tampo(seed=0), {"skip_zero_advantage": False}
    else:
        policy, overrides = metactl.MetaPolicy(metactl.PAPER_TEMPERATURES,
                                               metactl.Fixed(1.2)), {}
    tr = make_trainer(policy, **overrides)
    history = tr.train(progress_bar=False)
    steps, weights = GOLDEN[name]
    for record, (temp, reward, grad_norm, length) in zip(history, steps, strict=True):
        assert record["temperature"] == pytest.approx(temp, abs=1e-12)
        assert record["reward"] == reward and record["completion_len"] == length
        assert record["grad_norm"] == pytest.approx(grad_norm, rel=1e-5)
        assert not {"top_p", "top_k", "min_p"} & set(record)  # the log is as it was
    total = float(sum(p.detach().double().abs().sum() for p in tr.model.parameters()))
    assert total == pytest.approx(weights, rel=1e-9)


# ----------------------------------------------------------------------------------------------
# the distribution: kept sets, sampling and scoring as metactl.likelihood defines them
# ----------------------------------------------------------------------------------------------
def brute_kept(z: np.ndarray, cut: Setting) -> np.ndarray:
    """The family definition (HF order), one row at a time, float64, by plain loops."""
    v = z.size
    p = np.exp(z - z.max())
    p = p / p.sum()
    kept = np.ones(v, dtype=bool)
    if cut.top_k:
        kth = np.sort(z)[::-1][min(cut.top_k, v) - 1]
        kept &= z >= kth
    if cut.top_p < 1.0:
        base = p * kept
        above = np.array([base[z > z[i]].sum() for i in range(v)])
        kept &= above < cut.top_p * base.sum()
    if cut.min_p > 0.0:
        kept &= p >= cut.min_p * p.max()
    return kept


CUTS = [Setting(top_p=0.7), Setting(top_k=3), Setting(min_p=0.2),
        Setting(top_k=5, top_p=0.8, min_p=0.05), Setting(top_p=0.3)]


@pytest.mark.parametrize("cut", CUTS, ids=str)
def test_kept_sets_follow_the_family_definition_with_ties_and_banned_tokens(cut):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 12)).round(1)  # rounded: many ties, also at the boundaries
    z[:20, 3] = -np.inf  # banned vocabulary entries
    got = kept_mask(torch.tensor(z, dtype=torch.float32), cut).numpy()
    want = np.stack([brute_kept(row, cut) for row in z])
    assert (got == want).all()
    assert got.sum(1).min() >= 1 and (got.sum(1) < z.shape[1]).mean() > 0.5  # it truncates


SETTINGS = [
    ("top_p", [0.7, 1.0], Setting(1.0, top_p=0.7)),
    ("top_k", [3, 8], Setting(0.9, top_k=3)),
    ("min_p", [0.2, 0.0], Setting(1.3, min_p=0.2)),
    ("temperature", [0.8, 1.2], Setting(0.8, top_p=0.9, top_k=6)),
    ("joint", metactl.grid(temperature=[0.7, 1.1], top_p=[0.85, 1.0]), Setting(0.7, top_p=0.85)),
]


@pytest.mark.parametrize(("family", "candidates", "setting"), SETTINGS,
                         ids=[s[0] for s in SETTINGS])
def test_the_scored_logprobs_equal_metactl_likelihood_on_the_same_logits(family, candidates,
                                                                        setting):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 11, generator=gen) * 2
    probs = truncated_probs(logits.reshape(-1, 11), setting)
    tokens = torch.multinomial(probs, 1, generator=gen).reshape(4, 6)
    tokens[0, :3] = logits[0, :3].argmin(-1)  # outside every kept set: finite, smoothed
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = False
    ours = log_probs(logits, setting, tokens)
    assert torch.isfinite(ours).all()
    # the trainer's scoring is the core's, to the bit (also with one temperature per row)
    for row_t in (setting.temperature, torch.full((4,), setting.temperature)):
        assert torch.equal(log_probs(logits, setting.at_temperature(row_t), tokens), ours)
    knob = {"temperature": "temperature", "joint": None}.get(family, family)
    varied = tuple(candidates.knobs) if knob is None else (knob,)
    ref = candidate_loglik(logits, tokens, mask, candidates, family,
                           **setting.fixed_knobs(varied))
    mean = (ours * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(mean.numpy(), ref[:, 0].numpy(), rtol=0, atol=2e-6)
    # differentiable, and untruncated it is log_softmax(z / T) bit for bit
    leaf = logits.clone().requires_grad_(True)
    log_probs(leaf, setting, tokens).sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    plain = log_probs(logits, Setting(setting.temperature), tokens)
    assert torch.equal(plain, token_logprobs(logits, tokens, setting.temperature))


# ----------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------
def sample_spy(monkeypatch, tr: GRPOTrainer) -> list[torch.Tensor]:
    """Wrap the real sampler: record, for every sampled position, whether its token is in the
    0.5-nucleus of the model's scoring logits at T = 1 (the model is not updated yet then)."""
    in_nucleus: list[torch.Tensor] = []
    real = trainer_mod.sample

    def spy(model, prompt_ids, prompt_mask, **kw):
        out = real(model, prompt_ids, prompt_mask, **kw)
        with torch.no_grad():
            logits = completion_logits(model, prompt_ids, prompt_mask, out.tokens, out.mask)
        kept = kept_mask(logits.float(), Setting(top_p=0.5))
        hit = kept.gather(-1, out.tokens.unsqueeze(-1)).squeeze(-1)
        in_nucleus.append(hit[out.mask])
        return out

    monkeypatch.setattr(trainer_mod, "sample", spy)
    return in_nucleus


def test_top_p_sampling_in_the_trainer_draws_only_from_the_nucleus(monkeypatch):
    nucleus = metactl.MetaPolicy([0.5, 1.0], metactl.Fixed(0.5), hyperparameter="top_p")
    tr = make_trainer(nucleus)
    hits = sample_spy(monkeypatch, tr)
    history = tr.train(progress_bar=False)
    assert [h["top_p"] for h in history] == [0.5] * 3
    assert [h["temperature"] for h in history] == [1.0] * 3  # the config's fixed temperature
    assert torch.cat(hits).all()
    # the check has teeth: the same run at top_p = 1 samples outside that nucleus
    full = metactl.MetaPolicy([0.5, 1.0], metactl.Fixed(1.0), hyperparameter="top_p")
    tr = make_trainer(full)
    hits = sample_spy(monkeypatch, tr)
    tr.train(progress_bar=False)
    assert not torch.cat(hits).all()


def test_the_loss_and_the_candidate_likelihoods_use_the_sampling_distribution(monkeypatch):
    policy = make_policy("top-p", steps=4, seed=1)
    tr = make_trainer(policy, steps=4, skip_zero_advantage=False)
    seen: dict[str, list] = {"old": [], "mask": [], "loglik": [], "index": []}
    real_loss, real_update = trainer_mod.policy_loss, policy.update

    def spy_loss(logp, old_logp, advantages, mask, **kw):
        seen["old"].append(old_logp.detach().clone())
        seen["mask"].append(mask.clone())
        assert torch.allclose(logp.detach(), old_logp)  # on-policy first pass: ratio 1
        return real_loss(logp, old_logp, advantages, mask, **kw)

    def spy_update(decision, feedback=None, /, **kwargs):
        loglik = kwargs["loglik"] if feedback is None else feedback.loglik
        seen["loglik"].append(np.asarray(loglik))
        seen["index"].append(decision.index)
        return real_update(decision, feedback, **kwargs)

    monkeypatch.setattr(trainer_mod, "policy_loss", spy_loss)
    monkeypatch.setattr(policy, "update", spy_update)
    history = tr.train(progress_bar=False)
    assert len(seen["old"]) == len(seen["loglik"]) == 4  # one micro-batch of all rows a step
    truncated_steps = 0
    for old, mask, loglik, index, record in zip(seen["old"], seen["mask"], seen["loglik"],
                                                seen["index"], history, strict=True):
        assert record["top_p"] == TOP_P_GRID[index]
        truncated_steps += record["top_p"] < 1.0
        # the loss's old log-probs, averaged per completion, are the candidate likelihoods of
        # the candidate that sampled them: one definition of the sampling distribution
        mean = ((old * mask).sum(1) / mask.sum(1)).double().numpy()
        np.testing.assert_allclose(mean, loglik[:, index], rtol=0, atol=2e-6)
    assert truncated_steps >= 1


@pytest.mark.parametrize("name", ["top-p", "tampo-joint"])
def test_three_steps_of_each_knob_controller(name):
    assert validate_controller(name, steps=3) == name
    policy = make_policy(name, steps=3, seed=0)
    tr = make_trainer(policy)
    history = tr.train(progress_bar=False)
    assert policy.step == 3 and policy.knobs == controller_knobs(name)
    for record in history:
        setting = policy.setting(record["decision_index"])
        assert record["top_p"] == setting["top_p"]
        assert record["temperature"] == setting.get("temperature", 1.0)
        assert record["signal"]["favoured_index"] in range(-1, len(policy.candidates))
    if name == "tampo-joint":
        assert len(policy.candidates) == len(metactl.PAPER_TEMPERATURES) * len(JOINT_TOP_P)
    assert np.isclose(np.sum(policy.probs), 1.0)


def test_a_joint_arm_resumes_exactly_where_an_uninterrupted_run_ends(tmp_path):
    def build(run_dir):
        return make_trainer(make_policy("tampo-joint", steps=4, seed=2), run_dir=run_dir,
                            steps=4, checkpoint_every=2)

    full = build(tmp_path / "full")
    full.train(progress_bar=False)
    train_until(build(tmp_path / "part"), 2)
    resumed = build(tmp_path / "part")
    assert resumed.step_idx == 2
    resumed.train(progress_bar=False)
    assert timeless(resumed.history) == timeless(full.history)
    assert resumed.policy.state_dict() == full.policy.state_dict()
    assert len({(h["temperature"], h["top_p"]) for h in full.history}) >= 2  # it moved


def test_policies_the_trainer_cannot_apply_are_refused():
    generic = metactl.MetaPolicy([0.5, 1.0], metactl.TAMPO(), hyperparameter="generic")
    with pytest.raises(ValueError, match="hyperparameter='generic'"):
        make_trainer(generic)
    per_prompt = metactl.MetaPolicy([0.8, 0.9, 1.0], metactl.ContextualTAMPO(),
                                    hyperparameter="top_p")
    with pytest.raises(ValueError, match=r"per-prompt policy .*\['top_p'\]"):
        make_trainer(per_prompt)
    with pytest.raises(ValueError, match="rollout_top_k"):
        GRPOConfig(rollout_top_k=-1)
    with pytest.raises(ValueError, match="rollout_temperature"):
        GRPOConfig(rollout_temperature=0.0)
    with pytest.raises(ValueError, match="rollout_min_p"):
        GRPOConfig(rollout_min_p=1.0)
    with pytest.raises(ValueError, match="no knob"):
        Setting().with_values({"top_a": 0.5})


def test_a_temperature_policy_under_a_fixed_nucleus_is_scored_under_it(monkeypatch):
    policy = metactl.tampo(seed=0)
    tr = make_trainer(policy, steps=1, rollout_top_p=0.8, skip_zero_advantage=False)
    got: dict = {}
    real_update = policy.update
    real_logits = trainer_mod.completion_logits

    def spy_logits(model, *a):
        logits = real_logits(model, *a)
        got.setdefault("logits", []).append(logits.detach().clone())
        got["batch"] = a
        return logits

    def spy_update(decision, feedback=None, /, **kwargs):
        got["loglik"] = np.asarray(kwargs["loglik"] if feedback is None else feedback.loglik)
        return real_update(decision, feedback, **kwargs)

    monkeypatch.setattr(trainer_mod, "completion_logits", spy_logits)
    monkeypatch.setattr(policy, "update", spy_update)
    record = tr.step()
    assert record["top_p"] == 0.8
    _, _, tokens, mask = got["batch"]
    want = candidate_loglik(got["logits"][0], tokens, mask, policy.candidates, "temperature",
                            top_p=0.8)
    np.testing.assert_allclose(got["loglik"], want.double().numpy(), rtol=0, atol=1e-6)
    plain = candidate_loglik(got["logits"][0], tokens, mask, policy.candidates)
    assert not np.allclose(got["loglik"], plain.double().numpy(), atol=1e-4)


# ----------------------------------------------------------------------------------------------
# metactl reproduce with the knob arms: the log, the results and the report name the knobs
# ----------------------------------------------------------------------------------------------
def test_a_miniature_comparison_with_knob_arms_writes_a_report_naming_them(tmp_path):
    pytest.importorskip("matplotlib")
    from metactl.adapters.lab.reproduce.experiment import EvalConfig, run_experiment
    from metactl.adapters.reference.sft import WarmupConfig

    from tests.adapters.lab.reproduce.helpers import miniature_config

    cfg = miniature_config(
        str(tmp_path / "out"), ("fixed-1.0", "top-p", "tampo-joint"), steps=3, prompts_per_step=2,
        eval=EvalConfig(n_per_benchmark=4, k=2, curve_n=2, curve_k=2, curve_points=1,
                        train_check_n=8, start_greedy_range=(0.0, 1.0)),
        warmup=WarmupConfig(steps=5, batch_size=16), workers=1, cache_dir=str(tmp_path / "cache"),
    )
    md = run_experiment(cfg, progress=False).read_text()
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    runs = {c: json.loads((out / "runs" / c / "seed0" / "result.json").read_text())
            for c in cfg.controllers}
    assert runs["top-p"]["knobs"] == ["top_p"] and runs["top-p"]["candidates"] == list(TOP_P_GRID)
    assert set(runs["top-p"]["settings"]["top_p"]) <= set(TOP_P_GRID)
    joint = runs["tampo-joint"]
    assert joint["knobs"] == ["temperature", "top_p"] and len(joint["candidates"]) == 20
    assert joint["candidates"][0] == {"temperature": 0.6, "top_p": 0.9}
    assert "knobs" not in runs["fixed-1.0"] and "settings" not in runs["fixed-1.0"]
    assert set(report["summary"]["top-p"]["knob_quarters"]) == {"top_p"}
    for row in ("| TAMPO over top-p |", "| TAMPO over T x top-p |", "| GRPO, T = 1.0 |"):
        assert row in md
    assert "; top_p " in md  # the setting per quarter, next to the temperature
    for fig in ("temperature", "diagnostics", "meta_policy"):
        assert (out / report["figures"][fig]).stat().st_size > 1000


def test_the_distribution_functions_and_the_sampler_reject_bad_arguments():
    logits = torch.zeros(2, 3, 5)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(TypeError, match=r"setting must be a metactl\.knobs\.Setting"):
        log_probs(logits, 0.9, tokens)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"setting must be a metactl\.knobs\.Setting"):
        truncated_probs(logits[0], {"top_p": 0.9})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tokens"):
        log_probs(logits, Setting(top_p=0.9), tokens[:, :2])
    with pytest.raises(ValueError, match="eps"):
        log_probs(logits, Setting(top_p=0.9), tokens, epsilon=0.0)
    with pytest.raises(TypeError, match="logits must hold floating-point"):
        kept_mask(torch.zeros(2, 3, dtype=torch.long), Setting(top_k=2))
    with pytest.raises(TypeError, match="top_k"):
        Setting(top_k=True)  # type: ignore[arg-type]
    from metactl.adapters.reference.rollout import sample

    tok = build_char_tokenizer(ALPHABET)
    model = build_model(TINY, tok, seed=0)
    enc = tok(["1+2="], return_tensors="pt")
    common = dict(max_new_tokens=2, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    with pytest.raises(ValueError, match="not also top_p"):
        sample(model, enc.input_ids, enc.attention_mask, temperature=1.0, top_p=0.9,
               truncation=Setting(top_k=2), **common)
    with pytest.raises(ValueError, match="truncation needs temperature > 0"):
        sample(model, enc.input_ids, enc.attention_mask, temperature=0.0,
               truncation=Setting(top_k=2), **common)
    with pytest.raises(TypeError, match=r"truncation must be a metactl\.knobs\.Setting"):
        sample(model, enc.input_ids, enc.attention_mask, temperature=1.0,
               truncation={"top_k": 2}, **common)  # type: ignore[arg-type]
