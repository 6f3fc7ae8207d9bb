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
from metactl.adapters.reference.evaluate import evaluate_benchmarks  # noqa: E402
from metactl.adapters.reference.model import TinyModelConfig, build_model  # noqa: E402
from metactl.adapters.reference.rollout import completion_logits  # noqa: E402
from metactl.adapters.reference.sft import WarmupConfig, warmup  # noqa: E402
from metactl.adapters.reference.tasks import ALPHABET, ChainTask, chain_reward  # noqa: E402
from metactl.adapters.reference.tokenizer import build_char_tokenizer  # noqa: E402
from metactl.adapters.reference.trainer import GRPOConfig, GRPOTrainer  # noqa: E402

import metactl  # noqa: E402
from metactl.likelihood import candidate_loglik  # noqa: E402

TINY = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                       intermediate_size=64, max_positions=32)
TASK = ChainTask(ops=("+",), min_len=1, max_len=2, benchmark_lengths=(1, 2))


def fixed(t: float) -> metactl.MetaPolicy:
    return metactl.MetaPolicy(metactl.PAPER_TEMPERATURES, metactl.Fixed(t))


def contains_seven(completion: str, answer: str) -> float:
    """A reward a random model earns sometimes, so advantages are not all zero."""
    return float("7" in completion)


def make_trainer(policy=None, run_dir=None, seed=0, **overrides) -> GRPOTrainer:
    torch.manual_seed(0)
    tok = build_char_tokenizer(ALPHABET)
    model = build_model(TINY, tok, seed=0)
    cfg = GRPOConfig(**{**dict(steps=3, prompts_per_step=4, group_size=4, lr=1e-3,
                               max_new_tokens=6, checkpoint_every=0, eval_every=0, seed=seed),
                        **overrides})
    ref = build_model(TINY, tok, seed=0) if cfg.kl_beta > 0 else None
    return GRPOTrainer(model, tok, cfg, policy if policy is not None else fixed(1.0),
                       prompts=lambda rng, n: TASK.sample(rng, n), reward_fn=contains_seven,
                       ref_model=ref, run_dir=run_dir)


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
    captured: dict = {}
    real_rollout = GRPOTrainer.rollout

    def spy_rollout(self, prompt_ids, prompt_mask, temperature):
        out = real_rollout(self, prompt_ids, prompt_mask, temperature)
        captured["batch"] = (prompt_ids, prompt_mask, *out)
        captured["model"] = copy.deepcopy(self.model)  # the policy that sampled the batch
        return out

    monkeypatch.setattr(GRPOTrainer, "rollout", spy_rollout)
    policy = metactl.tampo(seed=0)
    real_update = policy.update

    def spy_update(decision, **feedback):
        captured["loglik"] = feedback["loglik"]
        captured["advantages"] = torch.as_tensor(feedback["advantages"])
        return real_update(decision, **feedback)

    policy.update = spy_update
    tr = make_trainer(policy, grad_accum_steps=2)
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


def _strip_times(history):
    return [{k: v for k, v in h.items() if k not in ("seconds", "rollout_seconds", "meta_seconds")}
            for h in history]


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

    class Interrupt(Exception):
        pass

    def stop_after_step_2(record):
        if record["step"] == 2:  # three steps done; the last checkpoint is after step 2 of 3
            raise Interrupt

    part = make_trainer(metactl.tampo(seed=3), run_dir=tmp_path / "part", **kw)
    part.evaluator = evaluator
    with pytest.raises(Interrupt):
        part.train(callback=stop_after_step_2, progress_bar=False)
    resumed = make_trainer(metactl.tampo(seed=3), run_dir=tmp_path / "part", **kw)
    resumed.evaluator = evaluator
    assert resumed.step_idx == 2
    resumed.train(progress_bar=False)

    assert _strip_times(resumed.history) == _strip_times(full.history)
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


def test_skipped_rows_are_scored_for_entropy_targets_and_diagnostics():
    entropy = metactl.MetaPolicy(metactl.PAPER_TEMPERATURES, metactl.EntropyTarget(1.0))
    tr = make_trainer(entropy, steps=3)
    tr.train(progress_bar=False)
    skipped = [h for h in tr.history if h["grad_rows"] < 16]
    assert skipped, "the test needs a step with a group of equal rewards"
    assert all(h["meta_forward_rows"] == 16 - h["grad_rows"] for h in tr.history)

    tr = make_trainer(metactl.tampo(seed=1), steps=3, diagnostic_steps=(0, 1, 2))
    tr.train(progress_bar=False)
    assert all(h["meta_forward_rows"] == 16 - h["grad_rows"] for h in tr.history)
    assert len(tr.diagnostics) == 3
    for d in tr.diagnostics:  # every row scored, none left at the 0 placeholder
        assert np.all(np.asarray(d["loglik"]) < 0)
