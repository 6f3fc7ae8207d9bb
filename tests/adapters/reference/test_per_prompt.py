"""Per-prompt temperatures in the reference trainer (the gym learner's are in
tests/adapters/gym/test_learner.py): every row sampled and scored at its own temperature, one
setting per prompt group for global and per-prompt decisions alike, what the trainer refuses at
construction, the per-prompt arms end to end at miniature scale (trainer, comparison, report),
the chain task's training pool, and the global path unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest

import metactl

# ------------------------------------------------------------------------------ reference
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import metactl.adapters.reference.trainer as trainer_mod  # noqa: E402
from metactl.adapters.char_tokenizer import build_char_tokenizer  # noqa: E402
from metactl.adapters.lab.controllers import (  # noqa: E402
    PER_PROMPT_ARMS,
    is_per_prompt,
    make_policy,
    validate_controller,
)
from metactl.adapters.reference.model import build_model  # noqa: E402
from metactl.adapters.reference.rollout import (  # noqa: E402
    completion_logits,
    sample,
    token_entropy,
    token_logprobs,
)
from metactl.adapters.reference.tasks import (  # noqa: E402
    ALPHABET,
    ChainTask,
    Problem,
    PromptPool,
    heldout_prompts,
)

from tests.adapters.reference.helpers import (  # noqa: E402
    TASK,
    TINY,
    make_trainer,
    timeless,
    train_until,
)


def _left_padded(tok):
    enc = tok(["1+2..=", "13+4.=", "2=", "1+1+1="], return_tensors="pt", padding=True,
              add_special_tokens=False)
    return enc.input_ids, enc.attention_mask


def test_sample_draws_every_row_from_its_own_tempered_distribution(monkeypatch) -> None:
    tok = build_char_tokenizer(ALPHABET)
    tok.padding_side = "left"
    model = build_model(TINY, tok, seed=0)
    ids, mask = _left_padded(tok)
    temps = torch.tensor([0.5, 1.0, 1.5, 2.5])
    drawn: list[torch.Tensor] = []
    real = torch.multinomial

    def spy(probs, *a, **k):
        drawn.append(probs.clone())
        return real(probs, *a, **k)

    monkeypatch.setattr(torch, "multinomial", spy)
    out = sample(model, ids, mask, temperature=temps, max_new_tokens=6,
                 eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                 generator=torch.Generator().manual_seed(0), return_entropy=True)
    monkeypatch.undo()
    with torch.no_grad():
        raw = completion_logits(model, ids, mask, out.tokens, out.mask)
    assert len(drawn) == out.tokens.shape[1] > 1
    for t, probs in enumerate(drawn):  # step t's sampling distribution of every row
        expected = torch.softmax(raw[:, t].float() / temps[:, None], dim=-1)
        live = out.mask[:, t]
        assert torch.allclose(probs[live], expected[live], atol=1e-6, rtol=1e-5)
    # the sampling loop's entropy is each row's own
    assert out.entropy is not None
    assert torch.allclose(out.entropy, token_entropy(raw, temps) * out.mask, atol=1e-5)
    for i, temp in enumerate(temps.tolist()):
        assert torch.allclose(token_entropy(raw[i:i + 1], temp),
                              token_entropy(raw, temps)[i:i + 1])
        assert torch.equal(token_logprobs(raw[i:i + 1], out.tokens[i:i + 1], temp),
                           token_logprobs(raw, out.tokens, temps)[i:i + 1])


def test_sample_with_a_uniform_row_temperature_draws_what_the_float_draws() -> None:
    tok = build_char_tokenizer(ALPHABET)
    tok.padding_side = "left"
    model = build_model(TINY, tok, seed=0)
    ids, mask = _left_padded(tok)
    kw = dict(max_new_tokens=6, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    one = sample(model, ids, mask, temperature=1.3, generator=torch.Generator().manual_seed(4),
                 **kw)
    rows = sample(model, ids, mask, temperature=torch.full((4,), 1.3),
                  generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(one.tokens, rows.tokens) and torch.equal(one.mask, rows.mask)


@pytest.mark.parametrize(
    ("temperature", "error", "match"),
    [
        (torch.ones(3), ValueError, "one value per row"),
        (torch.ones(4, 1), ValueError, "one value per row"),
        (torch.tensor([1.0, 0.0, 1.0, 1.0]), ValueError, "finite values > 0"),
        (torch.tensor([1.0, float("nan"), 1.0, 1.0]), ValueError, "finite values > 0"),
        (torch.ones(4, dtype=torch.long), TypeError, "floating tensor"),
        (float("nan"), ValueError, "finite float"),
    ],
)
def test_sample_and_scoring_reject_bad_row_temperatures(temperature, error, match) -> None:
    tok = build_char_tokenizer(ALPHABET)
    tok.padding_side = "left"
    model = build_model(TINY, tok, seed=0)
    ids, mask = _left_padded(tok)
    with pytest.raises(error, match=match):
        sample(model, ids, mask, temperature=temperature, max_new_tokens=2,
               eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    if isinstance(temperature, torch.Tensor):
        with pytest.raises(error, match=match):
            token_logprobs(torch.zeros(4, 2, 5), torch.zeros(4, 2, dtype=torch.long),
                           temperature)


def test_trainer_samples_and_scores_every_group_at_its_prompts_temperature(monkeypatch) -> None:
    sampled: list[tuple[torch.Tensor, torch.Tensor]] = []
    scored: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_sample, real_logprobs = trainer_mod.sample, trainer_mod.token_logprobs

    def spy_sample(*a, temperature, **k):
        out = real_sample(*a, temperature=temperature, **k)
        sampled.append((temperature.clone(), out.tokens.clone()))
        return out

    def spy_logprobs(logits, tokens, temperature):
        scored.append((temperature.clone(), tokens.clone()))
        return real_logprobs(logits, tokens, temperature)

    monkeypatch.setattr(trainer_mod, "sample", spy_sample)
    monkeypatch.setattr(trainer_mod, "token_logprobs", spy_logprobs)
    # KL on (every row in the pass, in order), 2 PPO epochs, 2 micro-batches
    policy = metactl.ptgs(seed=0, total_steps=3)
    tr = make_trainer(policy, kl_beta=0.05, ppo_epochs=2, grad_accum_steps=2)
    for _ in range(3):
        sampled.clear()
        scored.clear()
        record = tr.step()
        assert len(record["contexts"]) == 4  # one decision per prompt (key: chain length)
        rows = torch.tensor(np.repeat(record["temperatures"], 4), dtype=torch.float32)
        assert len(sampled) == 1 and torch.equal(sampled[0][0], rows)
        assert record["temperature"] == pytest.approx(float(np.mean(record["temperatures"])))
        tokens = sampled[0][1]
        # 2 epochs x 2 micro-batches of policy log-probs + 2 reference ones; micro-batch j holds
        # rows 8j .. 8j + 7: its temperatures are exactly those rows' sampling temperatures
        assert len(scored) == 6
        for temps, toks in scored:
            start = next(j for j in (0, 8) if torch.equal(toks, tokens[j:j + 8, :toks.shape[1]]))
            assert torch.equal(temps, rows[start:start + 8])
    assert policy.step == 3 and policy.num_contexts >= 1


def test_candidate_likelihoods_do_not_depend_on_the_sampling_temperature(monkeypatch) -> None:
    from metactl.likelihood import candidate_loglik

    checked = []
    real = trainer_mod.GRPOTrainer.optimize

    def spy(self, prompt_ids, prompt_mask, comp_ids, comp_mask, advantages, temperature, **k):
        assert isinstance(temperature, torch.Tensor) and temperature.shape == (16,)
        with torch.no_grad():  # the rollout policy's raw logits, before the update
            raw = completion_logits(self.model, prompt_ids, prompt_mask, comp_ids, comp_mask)
        expected = candidate_loglik(raw, comp_ids, comp_mask, self.candidates)
        out = real(self, prompt_ids, prompt_mask, comp_ids, comp_mask, advantages, temperature,
                   **k)
        assert out["loglik"] is not None and out["loglik"].shape == (16, 10)
        assert torch.allclose(out["loglik"], torch.as_tensor(expected).float(), atol=1e-5)
        checked.append(True)
        return out

    monkeypatch.setattr(trainer_mod.GRPOTrainer, "optimize", spy)
    tr = make_trainer(metactl.tampo_per_prompt(seed=0), skip_zero_advantage=False, steps=2)
    tr.step()
    tr.step()
    assert checked == [True, True]


@pytest.mark.parametrize("name", PER_PROMPT_ARMS)
def test_reference_per_prompt_arms_run_end_to_end(name: str) -> None:
    assert validate_controller(name, 3) == name and is_per_prompt(name)
    policy = make_policy(name, steps=3, seed=0)
    pool = PromptPool(ChainTask(ops=("+",), min_len=1, max_len=2, benchmark_lengths=(1, 2),
                                train_pool=6).training_pool())
    tr = make_trainer(policy, prompts=pool)
    history = tr.train(progress_bar=False)
    assert policy.step == 3
    # a cycle over the 6-prompt pool: 0 1 2 3 | 4 5 0 1 | 2 3 4 5
    assert [h["contexts"] for h in history] == [[0, 1, 2, 3], [4, 5, 0, 1], [2, 3, 4, 5]]
    stored = 0 if name.startswith(("mixture", "spread")) else 6  # mixtures store none
    assert policy.num_contexts == stored
    for h in history:
        assert len(h["temperatures"]) == 4 and "decision_index" not in h
        assert h["temperature"] == pytest.approx(float(np.mean(h["temperatures"])))


def test_global_policy_records_are_unchanged() -> None:
    tr = make_trainer(metactl.tampo(seed=0))
    record = tr.step()
    assert "contexts" not in record and isinstance(record["decision_index"], int)


def test_a_per_prompt_step_without_context_keys_changes_nothing() -> None:
    class Bare:
        def __init__(self, p: Problem) -> None:
            self.prompt, self.answer = p.prompt, p.answer

    policy = metactl.ptgs(seed=0)
    tr = make_trainer(policy, prompts=lambda rng, n: [Bare(p) for p in TASK.sample(rng, n)])
    rng_before, policy_before = tr.rng.bit_generator.state, policy.state_dict()
    with pytest.raises(TypeError, match="has no 'context' attribute"):
        tr.step()
    assert tr.rng.bit_generator.state == rng_before and policy.state_dict() == policy_before
    assert tr.step_idx == 0
    # a contexts function supplies the keys
    tr.context_fn = lambda item: len(item.prompt)
    assert tr.step()["contexts"] == [6, 6, 6, 6]


def test_a_pool_failure_restores_the_pool_position() -> None:
    pool = PromptPool(TASK.sample(np.random.default_rng(0), 5))  # no pool_index: still keyed
    policy = metactl.ptgs(seed=0)
    tr = make_trainer(policy, prompts=pool, steps=2)

    def bad_key(item):
        raise KeyError("no key")

    tr.context_fn = bad_key
    with pytest.raises(KeyError):
        tr.step()
    assert pool.position == 0


def test_features_policies_are_refused_by_the_reference_trainer() -> None:
    with pytest.raises(ValueError, match="feature_dim"):
        make_trainer(metactl.linear_thompson(seed=0, feature_dim=2))


def test_the_trainer_states_what_it_gives_and_refuses_the_rest_at_construction() -> None:
    per_prompt, global_ = trainer_mod.trainer_support(True), trainer_mod.trainer_support(False)
    assert per_prompt.knobs == ("temperature",) and per_prompt.per_context
    assert set(global_.knobs) == {"temperature", "top_p", "top_k", "min_p"}
    for support in (per_prompt, global_):
        assert set(support.feedback) == set(metactl.feedback.FEEDBACK_NAMES)
        assert set(support.loglik) == {"mean", "sum"} and not support.features
    top_p = metactl.MetaPolicy([0.8, 0.9, 1.0], metactl.ContextualTAMPO(), hyperparameter="top_p")
    before = top_p.state_dict()
    with pytest.raises(ValueError, match=r"per-prompt policy cannot sample the policy's knobs "
                                         r"\['top_p'\] \(it sets \['temperature'\]\)"):
        make_trainer(top_p)
    assert top_p.state_dict() == before
    generic = metactl.MetaPolicy([0.5, 1.0], metactl.TAMPO(), hyperparameter="generic")
    with pytest.raises(ValueError, match="hyperparameter='generic'"):
        make_trainer(generic)
    with pytest.raises(TypeError, match=r"policy must be a metactl\.MetaPolicy, got object"):
        make_trainer(object())


@pytest.mark.parametrize("make", [lambda: metactl.tampo(seed=0),
                                  lambda: metactl.ptgs(seed=0, total_steps=3)],
                         ids=["global", "per-prompt"])
def test_row_setting_turns_either_decision_into_the_rows_temperatures(make) -> None:
    policy = make()
    tr = make_trainer(policy, rollout_top_p=0.9)
    _, decision, _ = tr._select()
    setting, rows, logged = tr.row_setting(decision)
    assert setting.top_p == 0.9  # the config's truncation samples every row
    if policy.spec.per_context:
        values = np.asarray(decision.values, dtype=np.float64)
        assert torch.equal(rows, torch.from_numpy(np.repeat(values, 4)).float())
        assert logged == float(values.mean())
    else:  # one float for the whole batch, logged as it is
        assert isinstance(rows, float) and rows == logged == float(decision.value)


def test_a_resumed_per_prompt_run_with_a_pool_equals_an_uninterrupted_one(tmp_path) -> None:
    task = ChainTask(ops=("+",), min_len=1, max_len=2, benchmark_lengths=(1, 2), train_pool=6)

    def build(run_dir):
        return make_trainer(metactl.ptgs(seed=2, total_steps=5),
                            prompts=PromptPool(task.training_pool()), run_dir=run_dir,
                            steps=5, checkpoint_every=2)

    full = build(tmp_path / "full")
    full.train(progress_bar=False)

    train_until(build(tmp_path / "part"), 2)
    resumed = build(tmp_path / "part")
    assert resumed.step_idx == 2 and resumed.prompts.position == 2  # 2 steps x 4 of 6
    resumed.train(progress_bar=False)
    assert timeless(resumed.history) == timeless(full.history)
    assert resumed.policy.state_dict() == full.policy.state_dict()
    # a checkpoint with a pool position does not load into a trainer without a pool
    other = make_trainer(metactl.ptgs(seed=2), run_dir=tmp_path / "other", steps=5,
                         checkpoint_every=2)
    other.save_checkpoint()
    (tmp_path / "other" / "checkpoint.pt").replace(tmp_path / "x.pt")
    (tmp_path / "part" / "checkpoint.pt").replace(tmp_path / "other" / "checkpoint.pt")
    with pytest.raises(ValueError, match="prompt source has state"):
        make_trainer(metactl.ptgs(seed=2), run_dir=tmp_path / "other", steps=5,
                     checkpoint_every=2)


# ---------------------------------------------------------------------------- the task pool
def test_training_pool_is_deterministic_distinct_keyed_and_never_held_out() -> None:
    task = ChainTask(train_pool=40)
    exclude = heldout_prompts(task)
    pool = task.training_pool(exclude)
    assert pool == ChainTask(train_pool=40).training_pool(exclude)
    assert [p.pool_index for p in pool] == list(range(40))
    assert [p.context for p in pool] == list(range(40))
    assert len({p.prompt for p in pool}) == 40 and not exclude & {p.prompt for p in pool}
    # the infinite stream keys by chain length, a difficulty bucket
    assert all(p.context == p.length for p in task.sample(np.random.default_rng(0), 10))


def test_pool_option_keeps_the_default_task_and_its_keys() -> None:
    assert "train_pool" not in ChainTask().to_dict()
    assert ChainTask(train_pool=8).to_dict()["train_pool"] == 8
    assert ChainTask().to_dict() == ChainTask(train_pool=0).to_dict()


@pytest.mark.parametrize("bad", [-1, True, 1.5, "8"])
def test_pool_option_is_validated(bad) -> None:
    with pytest.raises(ValueError, match="train_pool"):
        ChainTask(train_pool=bad)


def test_pool_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="train_pool is 0"):
        ChainTask().training_pool()
    with pytest.raises(ValueError, match="train_pool=10000 is too many"):
        ChainTask(ops=("+",), max_len=1, benchmark_lengths=(1,), train_pool=10_000).training_pool()
    pool = PromptPool(ChainTask(train_pool=3).training_pool())
    with pytest.raises(ValueError, match=r"n must be an int in \[1, 3\]"):
        pool(None, 4)
    for state in ({"position": 3}, {"position": -1}, {}, {"position": True}, [0]):
        with pytest.raises(ValueError, match="prompt pool state"):
            pool.load_state_dict(state)  # type: ignore[arg-type]
    assert pool.position == 0
    with pytest.raises(ValueError, match="at least one problem"):
        PromptPool([])


# --------------------------------------------------------------------- report (miniature)
def test_miniature_comparison_with_per_prompt_arms_plots_the_context_temperatures(
        tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from metactl.adapters.lab.reproduce.experiment import run_experiment

    from tests.adapters.lab.reproduce.helpers import miniature_config

    task = ChainTask(ops=("+",), min_len=1, max_len=2, benchmark_lengths=(1, 2), train_pool=8)
    cfg = miniature_config(
        str(tmp_path / "out"), ("fixed-1.0", "ptgs", "tampo-per-prompt", "linear-thompson"),
        task=task, workers=1, cache_dir=str(tmp_path / "cache"),
    )
    run_experiment(cfg, progress=False)
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert (out / report["figures"]["context_temperature"]).stat().st_size > 1000
    assert "context_temperature.png" in (out / "report.md").read_text()
    ptgs = json.loads((out / "runs" / "ptgs" / "seed0" / "result.json").read_text())
    steps = ptgs["context_temperatures"]
    assert [s["contexts"] for s in steps] == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2
    assert ptgs["temperature"] == pytest.approx([float(np.mean(s["temperatures"]))
                                                 for s in steps])
    fixed = json.loads((out / "runs" / "fixed-1.0" / "seed0" / "result.json").read_text())
    assert "context_temperatures" not in fixed
