"""The reference trainer's effective-temperature check: the step record holds the temperature
the sampled tokens came from; samplers that ignore the chosen temperature (greedy, T = 1 for a
chosen 0.6) or the truncation are caught before anything trains on their tokens; "warn" warns,
"off" skips; the check reads the sampling loop's logits and changes no number of a run."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import metactl.adapters.reference.rollout as rollout_mod
import metactl.adapters.reference.trainer as trainer_mod
import torch
from metactl.adapters.char_tokenizer import build_char_tokenizer
from metactl.adapters.reference.model import build_model
from metactl.adapters.reference.rollout import sample
from metactl.adapters.reference.tasks import ALPHABET
from metactl.adapters.reference.temperature_check import LogitSubsample, estimate
from metactl.adapters.reference.trainer import GRPOConfig, GRPOTrainer

import metactl
from metactl.effective_temperature import EffectiveTemperatureWarning
from metactl.knobs import Setting, truncated_probs
from tests.adapters.reference.helpers import TASK, TINY, fixed, make_trainer, timeless

CHECK_KEYS = ("effective_temperature", "effective_temperature_z", "check_seconds")


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def peaked_trainer(policy: metactl.MetaPolicy, **overrides: Any) -> GRPOTrainer:
    """`make_trainer` with its model's logits scaled up five times: a freshly initialised model
    is nearly uniform over its 19 tokens, so every temperature samples about the same tokens
    and no check could tell them apart; scaled, its next-token distributions are as peaked as
    a trained model's."""
    trainer = make_trainer(policy, **overrides)
    with torch.no_grad():
        trainer.model.model.norm.weight.mul_(5.0)
    return trainer


def weights(trainer: GRPOTrainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def greedy_probs(logits: torch.Tensor, dist: Any) -> torch.Tensor:
    """A sampler that ignores the temperature: all mass on the argmax."""
    return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()


def untempered_probs(logits: torch.Tensor, dist: Any) -> torch.Tensor:
    """A sampler that draws at T = 1 whatever was chosen (the truncation kept)."""
    return truncated_probs(logits, dist.with_values({"temperature": 1.0}))


def untruncated_probs(logits: torch.Tensor, dist: Any) -> torch.Tensor:
    """A sampler that applies the temperature but ignores top-p / top-k / min-p."""
    return truncated_probs(logits, Setting(dist.temperature))


# ----------------------------------------------------------------------------------------------
# the log
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.5])
def test_every_step_records_the_effective_temperature_beside_the_temperature(temperature):
    history = peaked_trainer(fixed(temperature)).train(progress_bar=False)
    for record in history:
        keys = list(record)
        assert keys[keys.index("temperature") + 1: keys.index("temperature") + 3] == [
            "effective_temperature", "effective_temperature_z"]
        assert record["effective_temperature"] == pytest.approx(temperature, rel=0.25)
        assert abs(record["effective_temperature_z"]) < 5
        assert 0 < record["check_seconds"] < record["seconds"]


def test_the_check_changes_no_number_of_a_run():
    checked = peaked_trainer(metactl.tampo(seed=0), skip_zero_advantage=False)
    unchecked = peaked_trainer(metactl.tampo(seed=0), skip_zero_advantage=False,
                               temperature_check="off")
    with_check = timeless(checked.train(progress_bar=False))
    without = timeless(unchecked.train(progress_bar=False))
    assert [{k: v for k, v in h.items() if k not in CHECK_KEYS} for h in with_check] == without
    assert all(not set(CHECK_KEYS) & set(h) for h in without)
    assert any(h["grad_norm"] > 0 for h in without)  # the weights did move
    for a, b in zip(weights(checked), weights(unchecked), strict=True):
        assert torch.equal(a, b)
    assert checked.generator.get_state().equal(unchecked.generator.get_state())


# ----------------------------------------------------------------------------------------------
# the failures it is there for
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sampler", "chosen", "message"), [
    (greedy_probs, 0.6, "drawn at temperature 0, not the intended 0.6"),
    (greedy_probs, 1.5, "drawn at temperature 0, not the intended 1.5"),
    (untempered_probs, 0.6, r"drawn at temperature (0\.9|1\.)\d*, not the intended 0.6"),
])
def test_a_sampler_that_ignores_the_chosen_temperature_stops_the_run(monkeypatch, sampler,
                                                                     chosen, message):
    trainer = peaked_trainer(fixed(chosen))
    before = weights(trainer)
    monkeypatch.setattr(rollout_mod, "truncated_probs", sampler)
    with pytest.raises(ValueError, match=f"GRPO step 0: sampled tokens look {message}"):
        trainer.train(progress_bar=False)
    # caught before the optimizer saw the batch
    assert trainer.step_idx == 0 and not trainer.history
    for a, b in zip(before, weights(trainer), strict=True):
        assert torch.equal(a, b)


def test_a_sampler_that_ignores_the_truncation_stops_the_run(monkeypatch):
    trainer = peaked_trainer(fixed(1.0), rollout_top_p=0.5)
    monkeypatch.setattr(rollout_mod, "truncated_probs", untruncated_probs)
    with pytest.raises(ValueError, match="outside the intended kept set"):
        trainer.step()


def test_warn_mode_warns_and_goes_on(monkeypatch):
    trainer = peaked_trainer(fixed(0.6), temperature_check="warn")
    monkeypatch.setattr(rollout_mod, "truncated_probs", untempered_probs)
    with pytest.warns(EffectiveTemperatureWarning, match="not the intended 0.6") as caught:
        history = trainer.train(progress_bar=False)
    assert len(caught) == len(history) == 3  # one per step, and every step ran
    for record in history:
        assert record["effective_temperature"] == pytest.approx(1.0, rel=0.25)
        assert record["effective_temperature_z"] > 5


def test_off_mode_neither_estimates_nor_logs(monkeypatch):
    def no_estimate(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the check is off: nothing may be estimated")

    trainer = peaked_trainer(fixed(0.6), temperature_check="off")
    monkeypatch.setattr(trainer_mod, "estimate", no_estimate)
    monkeypatch.setattr(rollout_mod, "truncated_probs", greedy_probs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EffectiveTemperatureWarning)
        history = trainer.train(progress_bar=False)
    assert len(history) == 3 and all(not set(CHECK_KEYS) & set(h) for h in history)


@pytest.mark.parametrize(("field", "value"), [
    ("temperature_check", "loud"), ("temperature_check", None),
    ("temperature_check_rows", -1), ("temperature_check_positions", 1.5),
])
def test_the_check_settings_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        GRPOConfig(**{field: value})


# ----------------------------------------------------------------------------------------------
# what the check reads: a subsample of the sampling loop's own logits
# ----------------------------------------------------------------------------------------------
def test_the_subsample_spreads_rows_over_the_batch_and_strides_the_steps():
    keep = LogitSubsample(n_rows=128, max_new_tokens=100, max_rows=32, max_positions=64)
    assert keep.rows.tolist() == list(range(0, 128, 4))  # every group of G = 4 .. 8 is read
    assert keep.steps.tolist() == list(range(0, 100, 2))
    everything = LogitSubsample(n_rows=6, max_new_tokens=5, max_rows=0, max_positions=0)
    assert everything.rows.tolist() == list(range(6)) and everything.steps.tolist() == [0, 1, 2,
                                                                                         3, 4]
    with pytest.raises(ValueError, match="max_rows"):
        LogitSubsample(n_rows=6, max_new_tokens=5, max_rows=-1, max_positions=0)


def test_the_kept_logits_are_those_the_loop_sampled_from_whatever_the_chunking():
    seen: list[list[torch.Tensor]] = []  # per chunk, the logits of every decoding step

    def spy(logits: torch.Tensor, dist: Any) -> torch.Tensor:
        seen[-1].append(logits.clone())
        return truncated_probs(logits, dist)

    def chunk(*args: Any, **kwargs: Any) -> Any:
        seen.append([])
        return sample(*args, **kwargs)

    trainer = make_trainer(fixed(1.0), rollout_chunk=3)
    problems = TASK.sample(np.random.default_rng(0), 8)
    ids, mask = trainer.encode_prompts([p.prompt for p in problems])
    keep = LogitSubsample(8, trainer.cfg.max_new_tokens, 5, 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rollout_mod, "truncated_probs", spy)
        mp.setattr(trainer_mod, "sample", chunk)
        sampled = trainer.rollout(ids, mask, 1.0, keep_logits=keep)
    logits, tokens, kept_mask = keep.gather(sampled.tokens, sampled.mask)
    assert len(seen) == 3 and keep.rows.tolist() == [0, 1, 3, 4, 6]
    for k, row in enumerate(keep.rows.tolist()):  # chunks of rows 0-2, 3-5, 6-7
        steps = seen[row // 3]
        for t in range(logits.shape[1]):
            if t < len(steps):
                assert torch.equal(logits[k, t], steps[t][row % 3])
            else:  # that chunk was done: nothing to read there
                assert not kept_mask[k, t]
        assert torch.equal(tokens[k], sampled.tokens[row, : logits.shape[1]])
        assert torch.equal(kept_mask[k, : len(steps)], sampled.mask[row, : len(steps)])


def test_per_row_temperatures_are_scored_each_at_its_own():
    torch.manual_seed(0)
    tok = build_char_tokenizer(ALPHABET)
    model = build_model(TINY, tok, seed=0)
    with torch.no_grad():
        model.model.norm.weight.mul_(5.0)
    prompts = [p.prompt for p in TASK.sample(np.random.default_rng(1), 4) for _ in range(8)]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    rows = torch.tensor([0.5, 2.0] * 16)
    keep = LogitSubsample(32, 6, 0, 0)
    out = sample(model, enc.input_ids, enc.attention_mask, temperature=rows, max_new_tokens=6,
                 eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                 generator=torch.Generator().manual_seed(0), on_logits=keep.observer(0, 32))
    right = estimate(keep, out.tokens, out.mask, Setting(), rows)
    assert right.ratio == pytest.approx(1.0, rel=0.2) and abs(right.z_lr) < 5
    swapped = estimate(keep, out.tokens, out.mask, Setting(), rows.flip(0))
    assert abs(swapped.z_lr) > 5  # each row at the other's temperature does not fit
