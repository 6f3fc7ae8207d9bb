"""The effective-temperature check of ``MetaGRPOTrainer``: the raw logits every scoring path
hands it, no alarm on normal runs, and a clear error when generation ignores the chosen
temperature behind the adapter's back (greedy decoding, T = 1 while 0.6 was chosen, per-row
temperatures dropped).

The failure tests use a tiny model whose final norm is scaled by 4: the untrained tiny model's
logits are nearly flat, so its tokens say little about the temperature they were drawn at
(about 1.5 standard errors between T = 0.6 and T = 1 per 100 tokens); scaled, 100 tokens tell
them apart by 7 or more, beyond the default threshold of 5.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import trl.kernels.chunked_logprob as kernels
import trl.trainer.utils as trl_utils
from metactl.adapters.trl import MetaGRPOTrainer
from metactl.adapters.trl.fused import FusedLogitsCapture
from metactl.adapters.trl.scoring import (
    HiddenCapture,
    candidate_loglik_exact,
    candidate_loglik_from_hidden,
    check_positions,
    raw_logits_exact,
    raw_logits_from_hidden,
)
from metactl.adapters.trl.testing import (
    addition_dataset,
    build_char_tokenizer,
    build_tiny_model,
    digit_count_reward,
    tiny_grpo_config,
)
from trl.trainer.utils import add_fused_lm_head

import metactl
from metactl.effective_temperature import EffectiveTemperatureWarning
from tests.adapters.trl.helpers import digit_fraction_reward

pytestmark = pytest.mark.usefixtures("one_thread")

CANDIDATES = [0.6, 1.0, 1.4]
DEPARTURE = r"look drawn at temperature {}, not the intended {}"
NEAR_ONE = r"(0\.9\d*|1(\.\d*)?)"  # an estimate of T = 1 as the message writes it


# ---------------------------------------------------------------------------- the raw logits
@pytest.mark.parametrize(("token_chunk", "vocab_chunk"), [(4096, 32768), (7, 5)])
@pytest.mark.parametrize("batch_size", [2, None])
def test_every_scoring_path_hands_the_check_the_raw_logits_of_a_plain_forward(
    token_chunk, vocab_chunk, batch_size, monkeypatch
):
    """The fused tiles (whole or split vocabularies, batch chunks), the fast path's windows,
    the exact forward and the check-only helpers give the same logits as a plain forward, at
    exactly the scored positions."""
    monkeypatch.setattr(kernels, "TOKEN_CHUNK_SIZE", token_chunk)
    monkeypatch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", vocab_chunk)
    tok = build_char_tokenizer()
    vocab = len(tok)
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, seed=3).eval()
    add_fused_lm_head(model, temperature=0.8)
    gen = torch.Generator().manual_seed(0)
    n, prompt, keep = 5, 4, 6
    ids = torch.randint(4, vocab, (n, prompt + keep), generator=gen)
    attention = torch.ones_like(ids)
    attention[1, :2] = 0  # left padding
    attention[3, -2:] = 0  # a short completion
    completion, mask = ids[:, -keep:], attention[:, -keep:].clone()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=attention).logits[:, -(keep + 1) : -1]
    expected = plain[mask.bool()].float()
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :-keep] = -100

    fused = FusedLogitsCapture(CANDIDATES, check_bytes=1 << 20)
    with fused.recording(ids, attention, keep, batch_size), torch.no_grad():
        step = batch_size or n
        for s in range(0, n, step):
            model(input_ids=ids[s : s + step], attention_mask=attention[s : s + step],
                  labels=labels[s : s + step], fused_lm_head=True)  # fmt: skip
    scored = mask.clone()
    scored[4] = 0  # a completion without scored tokens (a tool-masked one, say)
    fused_result = fused.result(completion, scored)
    assert fused_result is not None and fused_result.raw is not None, fused.failure

    positions = check_positions(mask, vocab, 1 << 20)
    capture = HiddenCapture(model.model, "old")
    with capture, capture.recording(keep=keep), torch.no_grad():
        model(input_ids=ids, attention_mask=attention)
    hidden = capture.hidden()
    weight = model.lm_head.weight
    raws = {
        "fused": fused_result.raw,
        "fast": candidate_loglik_from_hidden(hidden, completion, mask, weight, None, CANDIDATES,
                                             window_bytes=4 * vocab * 2, keep=positions).raw,
        "exact": candidate_loglik_exact(model, ids, attention, completion, mask, CANDIDATES,
                                        batch_size=2, keep=positions).raw,
        "hidden only": raw_logits_from_hidden(hidden, positions, weight, None),
        "forward only": raw_logits_exact(model, ids, attention, completion, positions,
                                         batch_size=2),
    }  # fmt: skip
    for name, raw in raws.items():
        assert raw is not None, name
        if name == "fused":  # restricted to the scored positions
            assert torch.equal(raw.positions, scored.bool()), name
            torch.testing.assert_close(raw.logits, plain[scored.bool()].float(), rtol=0,
                                       atol=1e-5)  # fmt: skip
            continue
        assert torch.equal(raw.positions, mask.bool()), name
        torch.testing.assert_close(raw.logits, expected, rtol=0, atol=1e-5, msg=name)
        assert torch.equal(raw.tokens(completion), completion[mask.bool()])


def test_check_positions_keep_evenly_spaced_scored_positions_within_the_bound():
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3] = 0
    everything = check_positions(mask, vocab=100, limit_bytes=4 * 100 * 26)
    assert torch.equal(everything, mask.bool())
    seven = check_positions(mask, vocab=100, limit_bytes=4 * 100 * 7 + 399)
    assert int(seven.sum()) == 7 and not bool((seven & ~mask.bool()).any())
    flat = torch.nonzero(mask.flatten()).flatten()
    picked = torch.nonzero(seven.flatten()).flatten()
    assert torch.equal(picked, flat[(torch.arange(7) * 26) // 7])
    assert int(check_positions(mask, vocab=100, limit_bytes=1).sum()) == 1  # at least one


# ---------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def sharp_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model with its final norm scaled by 4 (logits that tell temperatures apart)."""
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, seed=0)
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)
    folder = tmp_path_factory.mktemp("sharp_model")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def keyed(n: int) -> Any:
    return addition_dataset(n, seed=1).add_column("prompt_id", list(range(n)))


def build(model: str, tmp_path: Path, policy: metactl.MetaPolicy, *, steps: int = 1,
          per_prompt: bool = False, config: dict[str, Any] | None = None,
          **kwargs: Any) -> MetaGRPOTrainer:  # fmt: skip
    """16 completions of 12 tokens per generation batch (completions end only at the length
    limit: generation stops at the padding token, which the model all but never samples)."""
    args = tiny_grpo_config(
        tmp_path, max_steps=steps, per_device_train_batch_size=16, num_generations=4,
        max_completion_length=12, generation_kwargs={"eos_token_id": 0}, **(config or {}),
    )  # fmt: skip
    if per_prompt:
        kwargs["meta_context_column"] = "prompt_id"
    return MetaGRPOTrainer(model=model, reward_funcs=digit_fraction_reward, args=args,
                           train_dataset=keyed(64) if per_prompt else addition_dataset(64),
                           meta_policy=policy, **kwargs)  # fmt: skip


def fixed(value: float, rule: Any = None) -> metactl.MetaPolicy:
    """Always ``value`` (``Fixed`` scores nothing: the check reads its own logits), or, with
    ``rule``, that rule over ``[value, value + 0.02]``."""
    if rule is None:
        return metactl.MetaPolicy([value, 1.0], metactl.Fixed(value), seed=0)
    return metactl.MetaPolicy([value, value + 0.02], rule, seed=0)


def sample_at(trainer: MetaGRPOTrainer, temperature: float) -> None:
    """Behind the adapter's back: every generate call samples at ``temperature``."""
    original = trainer.model.generate

    def generate(*a: Any, **kw: Any) -> Any:
        config = copy.deepcopy(kw["generation_config"])
        config.temperature = temperature
        return original(*a, **{**kw, "generation_config": config})

    trainer.model.generate = generate


BUFFERED = {"steps_per_generation": 2}  # TRL makes an old-logprob pass


@pytest.mark.parametrize(
    ("likelihood", "config", "rule", "path"),
    [
        ("fast", {}, None, "generate"),
        ("fast", BUFFERED, None, "old"),
        ("fused", BUFFERED, None, "fused"),
        ("exact", {}, None, "exact"),
        ("exact", {}, "exp3", None),  # a rule without likelihoods: the check's logits only
        ("fast", BUFFERED, "exp3", None),
        ("fast", {}, "per-prompt", "generate"),
    ],
)
def test_normal_runs_pass_the_check_and_log_the_estimate(sharp_model, tmp_path, likelihood,
                                                         config, rule, path):  # fmt: skip
    per_prompt = rule == "per-prompt"
    if per_prompt:
        policy = metactl.tampo_per_prompt([0.6, 1.0, 1.4], seed=0)
    elif rule == "exp3":
        policy = metactl.MetaPolicy(CANDIDATES, metactl.EXP3(), seed=0)
    else:
        policy = metactl.tampo(seed=0)
    trainer = build(sharp_model, tmp_path, policy, steps=4, per_prompt=per_prompt,
                    config=config, likelihood=likelihood)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", EffectiveTemperatureWarning)
        trainer.train()
    assert trainer.meta_history
    logged = [log for log in trainer.state.log_history if "metactl/temperature" in log]
    assert len(logged) == len(trainer.meta_history)
    for entry, log in zip(trainer.meta_history, logged, strict=True):
        assert entry["likelihood_path"] == path
        check = entry["effective_temperature"]
        assert check["ok"] and check["outside"] == 0 and check["tokens"] > 100
        if per_prompt:  # a mean of the rows' temperatures (geometric, weighted by tokens)
            assert min(entry["values"]) <= check["intended"] <= max(entry["values"])
        else:
            assert check["intended"] == pytest.approx(entry["value"])
        assert 0.8 < check["ratio"] < 1.25
        assert log["metactl/effective_temperature"] == pytest.approx(check["temperature"])
        assert log["metactl/effective_temperature_z"] == pytest.approx(check["z_lr"])
    assert 0 < trainer.meta_check_seconds < trainer.meta_seconds


@pytest.mark.parametrize(
    ("rule", "likelihood", "config"),
    [
        (None, "fast", {}),  # the check's own logits (Fixed scores nothing)
        ("tampo", "fast", {}),
        ("tampo", "fused", BUFFERED),
        ("tampo", "exact", {}),
    ],
)
def test_greedy_generation_behind_the_adapters_back_raises(sharp_model, tmp_path, rule,
                                                           likelihood, config):  # fmt: skip
    policy = fixed(0.6, metactl.TAMPO() if rule else None)
    trainer = build(sharp_model, tmp_path, policy, config=config, likelihood=likelihood)
    trainer.generation_config.do_sample = False  # e.g. a merged generation config
    with pytest.raises(ValueError, match=DEPARTURE.format("0", r"0\.6\d*")) as raised:
        trainer.train()
    assert "policy step 0" in str(raised.value)
    assert trainer.meta_policy.step == 0 and trainer.meta_history == []  # nothing learned


@pytest.mark.parametrize("rule", [None, "tampo"])
def test_sampling_at_one_while_the_policy_chose_0_6_raises(sharp_model, tmp_path, rule):
    trainer = build(sharp_model, tmp_path, fixed(0.6, metactl.TAMPO() if rule else None))
    sample_at(trainer, 1.0)
    with pytest.raises(ValueError, match=DEPARTURE.format(NEAR_ONE, r"0\.6\d*")):
        trainer.train()
    assert trainer.meta_policy.step == 0


def test_dropped_per_row_temperatures_raise(sharp_model, tmp_path, monkeypatch):
    """Per-prompt decisions: generation at T = 1 with the per-row processor doing nothing."""
    from metactl.adapters.trl.seam import RowTemperatureProcessor

    def ignore(self: RowTemperatureProcessor, input_ids: Any, scores: torch.Tensor) -> Any:
        self.calls += 1
        return scores

    monkeypatch.setattr(RowTemperatureProcessor, "__call__", ignore)
    policy = metactl.tampo_per_prompt([0.5, 0.6], seed=0)
    trainer = build(sharp_model, tmp_path, policy, per_prompt=True)
    with pytest.raises(ValueError, match=DEPARTURE.format(NEAR_ONE, r"0\.[56]\d*")):
        trainer.train()


def test_warn_mode_warns_and_learns_off_mode_skips(sharp_model, tmp_path):
    warn = build(sharp_model, tmp_path / "warn", fixed(0.6), temperature_check="warn")
    sample_at(warn, 1.0)
    with pytest.warns(EffectiveTemperatureWarning, match=DEPARTURE.format(NEAR_ONE, "0.6")):
        warn.train()
    (entry,) = warn.meta_history
    assert entry["effective_temperature"]["ok"] is False and warn.meta_policy.step == 1

    off = build(sharp_model, tmp_path / "off", fixed(0.6, metactl.EXP3()),
                temperature_check="off")  # fmt: skip
    sample_at(off, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EffectiveTemperatureWarning)
        off.train()
    (entry,) = off.meta_history
    assert "effective_temperature" not in entry and off.meta_check_seconds == 0.0
    assert not any("metactl/effective_temperature" in log for log in off.state.log_history)


def test_a_looser_tolerance_is_passed_to_the_check(sharp_model, tmp_path):
    trainer = build(sharp_model, tmp_path, fixed(0.6), temperature_check_rtol=1.0)
    sample_at(trainer, 1.0)  # a ratio near 1.7: inside a tolerance of 2
    trainer.train()
    check = trainer.meta_history[0]["effective_temperature"]
    assert check["ok"] and 1.25 < check["ratio"] < 2.0


def test_the_check_reads_at_most_its_memory_bound(sharp_model, tmp_path):
    vocab = len(build_char_tokenizer())
    trainer = build(sharp_model, tmp_path, metactl.tampo(seed=0),
                    temperature_check_bytes=4 * vocab * 40 + 3)  # fmt: skip
    trainer.train()
    assert trainer.meta_history[0]["effective_temperature"]["tokens"] == 40


def test_unmodelled_generation_settings_turn_the_check_off_with_a_warning(
    model_path, tmp_path, caplog
):
    policy = metactl.MetaPolicy(CANDIDATES, metactl.EXP3(), seed=0)
    with caplog.at_level(logging.WARNING, logger="metactl.adapters.trl.trainer"):
        trainer = MetaGRPOTrainer(
            model=model_path, reward_funcs=digit_count_reward,
            args=tiny_grpo_config(tmp_path, repetition_penalty=1.1),
            train_dataset=addition_dataset(8), meta_policy=policy,
        )  # fmt: skip
    assert "check is off for this run: repetition_penalty=1.1" in caplog.text
    assert not trainer._checking


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"temperature_check": "strict"}, ValueError, "temperature_check must be one of"),
        ({"temperature_check": True}, ValueError, "temperature_check must be one of"),
        ({"temperature_check_rtol": 0.0}, ValueError, "temperature_check_rtol must be > 0"),
        ({"temperature_check_rtol": "0.1"}, TypeError, "temperature_check_rtol must be a real"),
        ({"temperature_check_z": -1.0}, ValueError, "temperature_check_z must be >= 0"),
        ({"temperature_check_max_outside": 1.5}, ValueError, r"must lie in \[0, 1\]"),
        ({"temperature_check_bytes": 0}, ValueError, "temperature_check_bytes must be >= 1"),
        ({"temperature_check_bytes": 1.0}, TypeError, "temperature_check_bytes must be an int"),
    ],
)
def test_check_arguments_are_validated(model_path, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        MetaGRPOTrainer(model=model_path, reward_funcs=digit_count_reward,
                        args=tiny_grpo_config(tmp_path), train_dataset=addition_dataset(8),
                        meta_policy=metactl.tampo(), **kwargs)  # fmt: skip


def test_every_rank_takes_the_estimate_of_the_rank_that_departs_most(model_path, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    """Several processes: the estimates are gathered and the departing rank's is the one every
    rank logs and raises with (so no rank waits in a collective another one left)."""
    from metactl.effective_temperature import TemperatureEstimate

    trainer = MetaGRPOTrainer(model=model_path, reward_funcs=digit_count_reward,
                              args=tiny_grpo_config(tmp_path), train_dataset=addition_dataset(8),
                              meta_policy=metactl.tampo(seed=0))  # fmt: skip
    monkeypatch.setattr(MetaGRPOTrainer, "_multi_process", property(lambda self: True))
    fine = TemperatureEstimate(0.62, 0.6, 1.03, 0.4, 0.4, 90)
    noisy = TemperatureEstimate(1.5, 0.6, 2.5, 3.0, 3.0, 90)  # far off, but not significant
    hot = TemperatureEstimate(1.01, 0.6, 1.68, 9.0, 9.5, 90)  # off and significant
    others: list[Any] = []

    def all_gather(row: Any) -> list[Any]:  # this rank is rank 0
        return [row, *others]

    trainer._collective_fns = (all_gather, lambda value: value)
    others = [_row(noisy), _row(hot), _row(None)]
    assert trainer._worst_estimate(fine) == (hot, 2)
    others = [_row(noisy), _row(None)]
    assert trainer._worst_estimate(fine) == (noisy, 1)  # no departure: the largest |z_lr|
    others = [_row(None)]
    assert trainer._worst_estimate(None) == (None, 0)  # no scored token anywhere
    with pytest.raises(ValueError, match=r"on rank 2: sampled tokens look drawn at temperature 1"):
        trainer._report_departure(hot, 2)


def _row(estimate: Any) -> Any:
    """One rank's gathered row (as MetaGRPOTrainer._worst_estimate sends it)."""
    import numpy as np

    fields = ("temperature", "intended", "ratio", "z", "z_lr", "tokens", "outside")
    if estimate is None:
        return np.full(len(fields) + 1, np.nan)
    return np.array([1.0, *(float(getattr(estimate, f)) for f in fields)])


@pytest.mark.parametrize(("model_top_k", "expected"), [(None, 50), (7, 7)])
def test_an_unset_top_k_is_scored_and_checked_as_generate_fills_it(tmp_path, model_top_k,
                                                                   expected):  # fmt: skip
    """TRL passes GRPOConfig's top_k to generate (0 by default: off). Set to None, generate
    fills it from the model's generation config, else with its global default of 50: the
    candidates are scored and the check reads the batch under that value."""
    tok = build_char_tokenizer()

    def trainer(**config: Any) -> MetaGRPOTrainer:
        model = build_tiny_model(tok, hidden_size=32, num_layers=1)
        model.generation_config.top_k = model_top_k
        return MetaGRPOTrainer(model=model, processing_class=tok, reward_funcs=digit_count_reward,
                               args=tiny_grpo_config(tmp_path, **config),
                               train_dataset=addition_dataset(8),
                               meta_policy=metactl.tampo(seed=0))  # fmt: skip

    unset = trainer(top_k=None)
    assert unset.generation_config.top_k is None  # what TRL hands generate
    filled, _ = unset.model._prepare_generation_config(unset.generation_config)
    assert filled.top_k == expected == unset.meta_scoring.setting.top_k
    default = trainer()
    assert default.generation_config.top_k == 0 and default.meta_scoring.setting.top_k is None
