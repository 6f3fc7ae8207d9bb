"""Reference GRPO trainer: update direction, exact gradient accumulation, one temperature per
batch for sampling and every log-prob, no extra forward for the meta step, resume == uninterrupted,
and a short run that improves accuracy."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import metactl.adapters.reference.trainer as trainer_mod  # noqa: E402
from metactl.adapters.char_tokenizer import build_char_tokenizer  # noqa: E402
from metactl.adapters.reference.evaluate import evaluate_benchmarks  # noqa: E402
from metactl.adapters.reference.model import TinyModelConfig, build_model  # noqa: E402
from metactl.adapters.reference.rollout import completion_logits  # noqa: E402
from metactl.adapters.reference.sft import WarmupConfig, warmup  # noqa: E402
from metactl.adapters.reference.tasks import ALPHABET, ChainTask, chain_reward  # noqa: E402
from metactl.adapters.reference.trainer import GRPOConfig, GRPOTrainer  # noqa: E402

import metactl  # noqa: E402
from metactl.likelihood import candidate_loglik  # noqa: E402
from tests.adapters.reference.helpers import (  # noqa: E402
    TASK,
    TINY,
    contains_seven,
    fixed,
    make_trainer,
    timeless,
    train_until,
)


def capture_rollouts(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A dict that holds, after every rollout of a `GRPOTrainer`, its ``"batch"`` (prompt ids and
    mask, completion tokens and mask) and a copy of the ``"model"`` (the policy that sampled it)."""
    captured: dict = {}
    real_rollout = GRPOTrainer.rollout

    def spy_rollout(self, prompt_ids, prompt_mask, temperature, **kwargs):
        out = real_rollout(self, prompt_ids, prompt_mask, temperature, **kwargs)
        captured["batch"] = (prompt_ids, prompt_mask, out.tokens, out.mask)
        captured["model"] = copy.deepcopy(self.model)
        return out

    monkeypatch.setattr(GRPOTrainer, "rollout", spy_rollout)
    return captured


def capture_feedback(policy: metactl.MetaPolicy, captured: dict) -> None:
    """``captured["feedback"]`` holds the feedback of the policy's last update."""
    real_update = policy.update

    def spy_update(decision, feedback):
        captured["feedback"] = feedback
        return real_update(decision, feedback)

    policy.update = spy_update


def count_optimize_forwards(tr: GRPOTrainer) -> dict[str, int]:
    """A dict whose ``"n"`` counts the model's forward calls inside ``tr.optimize``."""
    forwards = {"n": 0}
    real_optimize = tr.optimize

    def counting_optimize(*a, **k):
        handle = tr.model.register_forward_pre_hook(lambda m, i: forwards.__setitem__(
            "n", forwards["n"] + 1))
        try:
            return real_optimize(*a, **k)
        finally:
            handle.remove()

    tr.optimize = counting_optimize
    return forwards


def hand_made_batch(tok):
    """One prompt, two one-token completions: '3' (advantage +1 below) and '4' (-1)."""
    p = tok(["1+2..=", "1+2..="], return_tensors="pt", add_special_tokens=False)
    comp = torch.tensor([[tok.convert_tokens_to_ids("3")], [tok.convert_tokens_to_ids("4")]])
    return p.input_ids, p.attention_mask, comp, torch.ones_like(comp, dtype=torch.bool)


def seq_logp(model, batch, t):
    with torch.no_grad():
        lg = completion_logits(model, *batch)
        return torch.log_softmax(lg / t, -1).gather(-1, batch[2][..., None])[..., 0].sum(1)


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("overrides", [{}, {"ppo_epochs": 2, "grad_accum_steps": 2},
                                       {"loss_agg": "token", "kl_beta": 0.1}])
def test_one_grpo_step_moves_logprobs_in_the_advantage_direction(overrides, sign):
    tr = make_trainer(prompts_per_step=1, group_size=2, lr=1e-3, warmup_ratio=0.0, **overrides)
    batch = hand_made_batch(tr.tokenizer)
    before = seq_logp(tr.model, batch, 1.3)
    tr.optimize(*batch, advantages=torch.tensor([sign, -sign]), temperature=1.3)
    after = seq_logp(tr.model, batch, 1.3)
    moved = (after - before) * torch.tensor([sign, -sign])
    assert moved[0] > 1e-3 and moved[1] > 1e-3  # A > 0: more likely; A < 0: less likely


def test_gradient_accumulation_is_exact():
    batch = hand_made_batch(build_char_tokenizer(ALPHABET))
    params = []
    for accum in (1, 2):
        tr = make_trainer(prompts_per_step=1, group_size=2, grad_accum_steps=accum,
                          warmup_ratio=0.0)
        # plain SGD, so the parameter change is the accumulated gradient itself (Adam's first
        # step is sign-like and would amplify float round-off in near-zero gradients)
        tr.optimizer = torch.optim.SGD(tr.model.parameters(), lr=0.1)
        tr.scheduler = torch.optim.lr_scheduler.LambdaLR(tr.optimizer, lambda _: 1.0)
        tr.optimize(*batch, advantages=torch.tensor([1.0, -1.0]), temperature=0.8)
        params.append(torch.cat([p.detach().flatten() for p in tr.model.parameters()]))
    assert torch.allclose(params[0], params[1], atol=1e-6)


def test_sampling_and_every_logprob_use_the_steps_temperature(monkeypatch):
    seen: list[tuple[str, float]] = []
    real_sample, real_logprobs = trainer_mod.sample, trainer_mod.token_logprobs

    def spy_sample(*a, temperature, **k):
        seen.append(("sample", temperature))
        return real_sample(*a, temperature=temperature, **k)

    def spy_logprobs(logits, tokens, temperature):
        seen.append(("logprob", temperature))
        return real_logprobs(logits, tokens, temperature)

    monkeypatch.setattr(trainer_mod, "sample", spy_sample)
    monkeypatch.setattr(trainer_mod, "token_logprobs", spy_logprobs)
    # a schedule whose middle value (1.05) is off the candidate grid; KL on, 2 PPO epochs,
    # 2 micro-batches: sampling, current, old and reference log-probs must all share T
    policy = metactl.MetaPolicy(metactl.PAPER_TEMPERATURES,
                                metactl.Schedule("linear", 0.7, 1.4, total_steps=3))
    tr = make_trainer(policy, kl_beta=0.05, ppo_epochs=2, grad_accum_steps=2)
    for expected in (0.7, 1.05, 1.4):
        seen.clear()
        record = tr.step()
        assert record["temperature"] == pytest.approx(expected)
        kinds = {k for k, _ in seen}
        assert kinds == {"sample", "logprob"}
        assert all(t == record["temperature"] for _, t in seen)
        # 2 epochs x 2 micro-batches policy log-probs + 2 reference log-probs
        assert sum(k == "logprob" for k, _ in seen) == 6


def test_candidate_likelihoods_come_from_the_rollout_policy_without_extra_forwards(monkeypatch):
    captured = capture_rollouts(monkeypatch)
    policy = metactl.tampo(seed=0)
    real_update = policy.update

    def spy_update(decision, feedback):
        captured["loglik"] = torch.as_tensor(feedback.loglik).float()  # float32 as computed
        captured["advantages"] = torch.as_tensor(feedback.advantages)
        return real_update(decision, feedback)

    policy.update = spy_update
    tr = make_trainer(policy, grad_accum_steps=2)
    forwards = count_optimize_forwards(tr)
    tr.step()
    scored = captured["advantages"] != 0  # rows with A = 0 are skipped by the pass
    assert 0 < int(scored.sum()) < 16, "the test needs both kinds of rows"
    # one forward per micro-batch of the scored rows, nothing extra for the meta step
    assert forwards["n"] == min(2, int(scored.sum()))
    pids, pmask, cids, cmask = captured["batch"]
    with torch.no_grad():
        logits = completion_logits(captured["model"], pids, pmask, cids, cmask)
    expected = candidate_loglik(logits, cids, cmask, policy.candidates)
    assert captured["loglik"].shape == (16, 10)
    # TAMPO ignores the A = 0 rows exactly: their likelihoods are left at 0, never computed
    assert torch.allclose(captured["loglik"][scored], expected[scored], atol=1e-5)
    assert torch.all(captured["loglik"][~scored] == 0)
    # a rule without "loglik" never gets (or pays for) the likelihood pass
    fixed_tr = make_trainer(fixed(1.2))
    called = []
    monkeypatch.setattr("metactl.likelihood.candidate_loglik",
                        lambda *a, **k: called.append(1))
    fixed_tr.step()
    assert called == []


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    def evaluator(model, step):
        r = evaluate_benchmarks(model, tok, {"b": TASK.benchmark(2, 6)}, contains_seven, k=2,
                                max_new_tokens=6, seed=step)
        return r["avg"]

    tok = build_char_tokenizer(ALPHABET)
    kw = dict(steps=6, checkpoint_every=2, eval_every=3)

    full = make_trainer(metactl.tampo(seed=3), run_dir=tmp_path / "full", **kw)
    full.evaluator = evaluator
    full.train(progress_bar=False)

    part = make_trainer(metactl.tampo(seed=3), run_dir=tmp_path / "part", **kw)
    part.evaluator = evaluator
    # three steps done; the last checkpoint is after step 2 of 3
    train_until(part, 2)
    resumed = make_trainer(metactl.tampo(seed=3), run_dir=tmp_path / "part", **kw)
    resumed.evaluator = evaluator
    assert resumed.step_idx == 2
    resumed.train(progress_bar=False)

    assert timeless(resumed.history) == timeless(full.history)
    assert resumed.evals == full.evals
    assert resumed.policy.state_dict() == full.policy.state_dict()
    pairs = zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True)
    for (name, a), b in pairs:
        assert torch.equal(a, b), name
    assert any(h["reward"] > 0 for h in full.history)  # the run did learn something to compare


def test_a_short_grpo_run_improves_accuracy(tmp_path):
    """Warm up on the biased teacher (traps), then 60 GRPO steps at T=1.5 fix some traps."""
    task = ChainTask(ops=("+",), min_len=1, max_len=1, trap_fraction=0.4, trap_bias=0.85,
                     benchmark_lengths=(1,))
    model_cfg = TinyModelConfig(hidden_size=64, num_layers=2, intermediate_size=128,
                                max_positions=32)
    path = warmup(task, model_cfg, WarmupConfig(steps=400, batch_size=64, lr=1e-2,
                                                warmup_steps=20), cache_dir=tmp_path,
                  progress=False)
    assert (path / "warmup.json").exists()
    assert warmup(task, model_cfg, WarmupConfig(steps=400, batch_size=64, lr=1e-2,
                                                warmup_steps=20), cache_dir=tmp_path) == path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    problems = {"train": task.sample(np.random.default_rng(5), 400)}

    def accuracy() -> float:
        return evaluate_benchmarks(model, tok, problems, chain_reward, k=1,
                                   max_new_tokens=task.max_completion_tokens)["train"]["greedy"]

    before = accuracy()
    assert 0.2 < before < 0.8  # room for RL: trap facts are wrong under greedy decoding
    cfg = GRPOConfig(steps=60, prompts_per_step=16, group_size=8, lr=1e-3, warmup_ratio=0.0,
                     max_new_tokens=task.max_completion_tokens, checkpoint_every=0,
                     eval_every=0)
    GRPOTrainer(model, tok, cfg, fixed(1.5), prompts=lambda r, n: task.sample(r, n),
                reward_fn=chain_reward).train(progress_bar=False)
    after = accuracy()
    assert after > before + 0.08, (before, after)


@pytest.mark.parametrize("policy_name", ["fixed", "tampo"])
def test_skipping_zero_advantage_rows_changes_nothing_but_compute(policy_name):
    runs = []
    for skip in (False, True):
        policy = fixed(1.1) if policy_name == "fixed" else metactl.tampo(seed=1)
        tr = make_trainer(policy, steps=4, skip_zero_advantage=skip, grad_accum_steps=2)
        tr.train(progress_bar=False)
        runs.append(tr)
    full, skipped = runs
    assert any(h["grad_rows"] < 16 for h in skipped.history)  # some rows were skipped
    assert all(h["grad_rows"] == 16 for h in full.history)
    # TAMPO ignores A = 0 rows exactly: their likelihoods are never computed (no extra forward)
    assert all(h["meta_forward_rows"] == 0 for h in skipped.history + full.history)
    for a, b in zip(full.model.parameters(), skipped.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert [h["temperature"] for h in full.history] == [h["temperature"] for h in
                                                        skipped.history]
    assert np.allclose(full.policy.probs, skipped.policy.probs, atol=1e-5)


def test_skipped_rows_are_scored_for_diagnostics_but_not_for_entropy_targets():
    # the entropy comes from the sampling loop: no row is scored for it
    entropy = metactl.MetaPolicy(metactl.PAPER_TEMPERATURES, metactl.EntropyTarget(1.0))
    tr = make_trainer(entropy, steps=3)
    tr.train(progress_bar=False)
    skipped = [h for h in tr.history if h["grad_rows"] < 16]
    assert skipped, "the test needs a step with a group of equal rewards"
    assert all(h["meta_forward_rows"] == 0 for h in tr.history)

    tr = make_trainer(metactl.tampo(seed=1), steps=3, diagnostic_steps=(0, 1, 2))
    tr.train(progress_bar=False)
    assert all(h["meta_forward_rows"] == 16 - h["grad_rows"] for h in tr.history)
    assert len(tr.diagnostics) == 3
    for d in tr.diagnostics:  # every row scored, none left at the 0 placeholder
        assert np.all(np.asarray(d["loglik"]) < 0)


# -- entropy from the sampling loop; rewards, group_size and summed likelihoods ---------------

def _left_padded_prompts(tok):
    """Prompts of different lengths, so the sampler's left padding and positions are used."""
    texts = ["1+2..=", "12+3..=", "1+2+3+4..=", "5..="] * 2
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert not bool(enc.attention_mask.all())
    return enc.input_ids, enc.attention_mask


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampling_loop_entropy_equals_the_scoring_pass_entropy(top_p):
    from metactl.adapters.reference.rollout import sample, token_entropy

    tok = build_char_tokenizer(ALPHABET)
    model = build_model(TINY, tok, seed=0)
    ids, mask = _left_padded_prompts(tok)
    kw = dict(temperature=1.3, max_new_tokens=8, eos_id=tok.eos_token_id,
              pad_id=tok.pad_token_id, top_p=top_p)
    with_entropy = sample(model, ids, mask, generator=torch.Generator().manual_seed(3),
                          return_entropy=True, **kw)
    plain = sample(model, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    # asking for the entropy does not change a single draw
    assert torch.equal(with_entropy.tokens, plain.tokens) and plain.entropy is None
    assert torch.equal(with_entropy.mask, plain.mask)
    assert not bool(plain.mask.all()), "the test needs completions that end before the limit"
    # the reference: a separate scoring forward of the completions, entropy at T before top-p
    with torch.no_grad():
        raw = completion_logits(model, ids, mask, plain.tokens, plain.mask)
    expected = token_entropy(raw, 1.3) * plain.mask
    assert with_entropy.entropy is not None and with_entropy.entropy.shape == plain.tokens.shape
    assert torch.allclose(with_entropy.entropy, expected, atol=1e-5, rtol=1e-5)
    assert torch.all(with_entropy.entropy[~plain.mask] == 0)
    with pytest.raises(ValueError, match="return_entropy needs temperature > 0"):
        sample(model, ids, mask, return_entropy=True, **{**kw, "temperature": 0.0})


@pytest.mark.parametrize("chunk", [0, 6])
def test_entropy_feedback_equals_a_separate_scoring_pass_without_any_extra_forward(monkeypatch,
                                                                                 chunk):
    from metactl.adapters.reference.rollout import token_entropy

    captured = capture_rollouts(monkeypatch)
    policy = metactl.MetaPolicy(metactl.PAPER_TEMPERATURES, metactl.EntropyTarget(1.0))
    capture_feedback(policy, captured)
    # rollout_chunk=6: 16 rows sampled in chunks of 6, 6, 4 of different widths, then padded
    tr = make_trainer(policy, grad_accum_steps=2, rollout_chunk=chunk)
    forwards = count_optimize_forwards(tr)
    for _ in range(2):
        forwards["n"] = 0
        record = tr.step()
        # only the gradient pass's micro-batches: no row is scored for the meta step
        assert record["meta_forward_rows"] == 0
        assert forwards["n"] == min(2, record["grad_rows"])
        pids, pmask, cids, cmask = captured["batch"]
        with torch.no_grad():
            raw = completion_logits(captured["model"], pids, pmask, cids, cmask)
        old = float((token_entropy(raw, record["temperature"]) * cmask).sum()
                    / cmask.sum())
        assert captured["feedback"].entropy == pytest.approx(old, rel=1e-5, abs=1e-6)
        assert record["entropy"] == captured["feedback"].entropy
        assert captured["feedback"].vocab_size == tr.vocab_size
    assert any(h["grad_rows"] < 16 for h in tr.history), "the test needs skipped rows"


@pytest.mark.parametrize("name", ["counterfactual", "tampo-sum", "uncertainty"])
def test_signal_rules_get_rewards_group_size_and_the_likelihoods_they_declare(monkeypatch, name):
    from metactl.adapters.lab.controllers import make_policy

    captured = capture_rollouts(monkeypatch)
    policy = make_policy(name, steps=3, seed=0)
    capture_feedback(policy, captured)
    tr = make_trainer(policy, grad_accum_steps=2)
    real_optimize = tr.optimize

    def spy_optimize(prompt_ids, prompt_mask, comp_ids, comp_mask, advantages, *a, **k):
        captured["advantages"] = advantages.clone()
        return real_optimize(prompt_ids, prompt_mask, comp_ids, comp_mask, advantages, *a, **k)

    tr.optimize = spy_optimize
    for _ in range(3):
        record = tr.step()
        fb = captured["feedback"]
        pids, pmask, cids, cmask = captured["batch"]
        assert set(policy.requires) <= set(fb.given())
        if "rewards" in policy.requires:
            texts = tr.tokenizer.batch_decode(cids, skip_special_tokens=True)
            np.testing.assert_array_equal(fb.rewards, [contains_seven(t, "") for t in texts])
            assert fb.rewards.dtype == np.float64 and fb.group_size == 4
        if "loglik" not in policy.requires:
            assert fb.loglik is None and record["meta_forward_rows"] == 0
            continue
        with torch.no_grad():
            raw = completion_logits(captured["model"], pids, pmask, cids, cmask)
        summed = candidate_loglik(raw, cids, cmask, policy.candidates) * cmask.sum(1)[:, None]
        loglik = torch.as_tensor(fb.loglik).float()  # float32 as computed
        scored = captured["advantages"] != 0
        if policy.spec.zero_advantage_rows_free:  # tampo-sum: A = 0 rows are never scored
            assert record["meta_forward_rows"] == 0
            assert torch.all(loglik[~scored] == 0)
            rows = scored
        else:  # counterfactual weighs every completion: the skipped rows are scored too
            assert record["meta_forward_rows"] == 16 - record["grad_rows"]
            rows = torch.ones(16, dtype=torch.bool)
        assert torch.allclose(loglik[rows], summed[rows], rtol=1e-5, atol=1e-4)
    assert any(h["grad_rows"] < 16 for h in tr.history), "the test needs skipped rows"
    assert policy.step == 3


def test_optimize_rejects_an_unknown_likelihood_normalization():
    tr = make_trainer(prompts_per_step=1, group_size=2)
    before = [p.detach().clone() for p in tr.model.parameters()]
    with pytest.raises(ValueError, match="loglik_normalization must be 'mean' or 'sum'"):
        tr.optimize(*hand_made_batch(tr.tokenizer), advantages=torch.tensor([1.0, -1.0]),
                    temperature=1.0, needs={"loglik"}, loglik_normalization="median")
    assert all(torch.equal(a, b) for a, b in zip(before, tr.model.parameters(), strict=True))


def test_a_rule_asking_for_an_unknown_loglik_reduction_is_refused_before_select():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class MedianFixed(metactl.Fixed):
        @property
        def loglik_reduction(self) -> str:
            return "median"

    policy = metactl.MetaPolicy(metactl.PAPER_TEMPERATURES, MedianFixed(1.0))
    state = policy.state_dict()
    with pytest.raises(ValueError, match=r"loglik must be one of \['mean', 'sum'\]"):
        make_trainer(policy)  # refused when the trainer is built: nothing is drawn
    assert policy.state_dict() == state and policy.step == 0
