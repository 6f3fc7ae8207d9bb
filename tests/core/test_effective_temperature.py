"""``metactl.effective_temperature``: the temperature sampled tokens came from, estimated from
their logits, and the check that catches a sampler ignoring the chosen temperature (synthetic
logits; the real-model calibration is in tests/adapters/test_models.py); and the score of the
temperature from log-probabilities and entropies alone (``temperature_score``; calibrated on the
verl test model in tests/adapters/verl/test_temperature_check.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

import metactl.effective_temperature as effective_temperature_module
from metactl.effective_temperature import (
    BOUNDARY_LOGIT_MARGIN,
    BOUNDARY_MASS_SLACK,
    DEFAULT_OUTSIDE,
    DEFAULT_RTOL,
    DEFAULT_SCORE_EFFECT,
    DEFAULT_SCORE_Z,
    DEFAULT_Z,
    EffectiveTemperatureWarning,
    TemperatureEstimate,
    TemperatureScore,
    check_effective_temperature,
    check_temperature_score,
    effective_temperature,
    temperature_score,
)
from metactl.knobs import Setting, SettingRows, kept_mask, truncated_probs


def _logits(rng: np.random.Generator, n: int, length: int, vocab: int = 64) -> np.ndarray:
    """LLM-like logits: a few strong tokens over a broad tail, peakedness varying by position."""
    scale = rng.uniform(1.0, 5.0, size=(n, length, 1))
    return rng.standard_normal((n, length, vocab)) * scale


def _draw(rng: np.random.Generator, z: np.ndarray, setting: Setting | SettingRows) -> np.ndarray:
    p = truncated_probs(z, setting)
    u = rng.random((*z.shape[:-1], 1))
    return np.minimum((p.cumsum(axis=-1) < u).sum(axis=-1), z.shape[-1] - 1)


def _information(z: np.ndarray, temps: np.ndarray) -> float:
    """Fisher information of log T at the true temperature(s), summed over positions."""
    b = (1.0 / temps).reshape(-1, *([1] * (z.ndim - 1)))
    p = np.exp(z * b - logsumexp(z * b, axis=-1, keepdims=True))
    mean = (p * z).sum(-1)
    var = (p * z * z).sum(-1) - mean**2
    return float((var * b[..., 0] ** 2).sum())


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.5])
@pytest.mark.parametrize("length", [25, 400])
def test_recovers_the_sampling_temperature_within_its_standard_error(
    temperature: float, length: int
) -> None:
    rng = np.random.default_rng(int(temperature * 10) + length)
    z = _logits(rng, 16, length)
    tokens = _draw(rng, z, Setting(temperature=temperature))
    est = effective_temperature(z, tokens, temperature=temperature)
    se = 1.0 / math.sqrt(_information(z, np.full(16, temperature)))  # of log T_hat
    assert abs(math.log(est.temperature / temperature)) < 4.5 * se
    assert se * math.sqrt(16 * length) < 1.5  # the tolerance shrinks as 1/sqrt(tokens)
    assert abs(est.z) < 4.5
    assert est.tokens == 16 * length and est.intended == temperature
    assert est.ratio == pytest.approx(est.temperature / temperature)
    assert check_effective_temperature(est)


def test_z_statistics_are_standard_normal_over_many_batches() -> None:
    rng = np.random.default_rng(7)
    stats = []
    for _ in range(300):
        z = _logits(rng, 4, 16, vocab=32)
        est = effective_temperature(z, _draw(rng, z, Setting(0.8)), temperature=0.8)
        stats.append((est.z, est.z_lr))
    for col in np.array(stats).T:  # the score's z, then the likelihood ratio's
        assert abs(col.mean()) < 0.2  # 4 standard errors of a mean of 300
        assert 0.85 < col.std() < 1.15
        assert np.mean(np.abs(col) > 1.96) < 0.1
    assert np.corrcoef(np.array(stats).T)[0, 1] > 0.95  # the same evidence near the truth


def test_estimate_is_the_maximum_of_the_log_likelihood() -> None:
    rng = np.random.default_rng(3)
    z = _logits(rng, 3, 40, vocab=20)
    temps = np.array([0.5, 1.0, 2.0])
    tokens = _draw(rng, z, Setting().rows(3, temperature=temps * 1.3))
    rows = Setting().rows(3, temperature=temps)
    est = effective_temperature(z, tokens, temperature=rows)

    def nll(log_r: float) -> float:
        b = 1.0 / (temps[:, None, None] * math.exp(log_r))
        lp = z * b - logsumexp(z * b, axis=-1, keepdims=True)
        return -float(np.take_along_axis(lp, tokens[..., None], -1).sum())

    best = minimize_scalar(nll, bounds=(-3, 3), method="bounded", options={"xatol": 1e-10})
    assert math.log(est.ratio) == pytest.approx(best.x, abs=1e-6)
    assert est.z_lr == pytest.approx(math.sqrt(2 * (nll(0.0) - best.fun)), rel=1e-6)
    assert est.intended == pytest.approx(float(np.exp(np.log(temps).mean())))


def test_per_row_temperatures_share_one_factor() -> None:
    rng = np.random.default_rng(11)
    z = _logits(rng, 6, 300)
    temps = np.array([0.5, 0.7, 0.9, 1.1, 1.3, 1.5])
    rows = Setting().rows(6, temperature=temps)
    right = effective_temperature(z, _draw(rng, z, rows), temperature=rows)
    assert abs(math.log(right.ratio)) < 0.05 and abs(right.z) < 4.5
    hot = Setting().rows(6, temperature=1.5 * temps)
    wrong = effective_temperature(z, _draw(rng, z, hot), temperature=rows)
    assert wrong.ratio == pytest.approx(1.5, rel=0.05) and wrong.z > 10


def test_greedy_tokens_give_zero_temperature_and_are_caught() -> None:
    rng = np.random.default_rng(0)
    z = _logits(rng, 4, 32)
    est = effective_temperature(z, z.argmax(-1), temperature=1.0)
    assert est.temperature == 0.0 and est.z < -DEFAULT_Z
    assert est.z_lr < est.z  # the likelihood ratio sees the distant alternative better
    with pytest.raises(ValueError, match=r"temperature 0, not the intended 1 "):
        check_effective_temperature(est)


def test_nearly_greedy_tokens_give_a_tiny_temperature() -> None:
    rng = np.random.default_rng(1)
    z = _logits(rng, 4, 32)
    tokens = z.argmax(-1)
    tokens[0, 0] = np.argsort(z[0, 0])[-2]  # one runner-up among 128 argmax tokens
    est = effective_temperature(z, tokens, temperature=1.0)
    assert est.temperature < 0.3 and est.z < -DEFAULT_Z
    assert not check_effective_temperature(est, mode="off")


@pytest.mark.parametrize(("sampled", "intended"), [(1.0, 0.6), (0.6, 1.0), (1.5, 1.0)])
def test_tokens_sampled_at_another_temperature_are_caught(sampled: float, intended: float
                                                          ) -> None:  # fmt: skip
    rng = np.random.default_rng(5)
    z = _logits(rng, 16, 32)
    est = effective_temperature(z, _draw(rng, z, Setting(sampled)), temperature=intended)
    assert est.temperature == pytest.approx(sampled, rel=0.15)
    assert abs(est.z) > DEFAULT_Z and abs(est.z_lr) > DEFAULT_Z
    assert np.sign(est.z) == np.sign(est.z_lr) == np.sign(sampled - intended)
    with pytest.raises(ValueError, match=f"not the intended {intended:g} "):
        check_effective_temperature(est)
    with pytest.warns(EffectiveTemperatureWarning, match="look drawn at temperature"):
        assert check_effective_temperature(est, mode="warn") is False
    assert check_effective_temperature(est, mode="off") is False


@pytest.mark.parametrize(
    "setting",
    [
        Setting(0.7, top_p=0.8),
        Setting(1.2, top_k=5),
        Setting(1.0, min_p=0.1),
        Setting(0.9, top_p=0.9, min_p=0.05),
    ],
)
def test_truncated_sampling_is_scored_inside_the_kept_set(setting: Setting) -> None:
    rng = np.random.default_rng(2)
    z = _logits(rng, 16, 100)
    est = effective_temperature(z, _draw(rng, z, setting), temperature=setting)
    assert est.outside == 0
    assert abs(math.log(est.ratio)) < 0.1 and abs(est.z) < 4.5
    assert check_effective_temperature(est)
    # the untruncated score of the same tokens is biased: it reads them as colder
    plain = effective_temperature(z, _draw(rng, z, setting), temperature=setting.temperature)
    assert plain.z < -4.5


def test_a_sampler_ignoring_the_truncation_is_caught() -> None:
    rng = np.random.default_rng(4)
    z = _logits(rng, 8, 50)
    est = effective_temperature(z, _draw(rng, z, Setting(0.8)),
                                temperature=Setting(0.8, top_p=0.7))  # fmt: skip
    assert est.outside > 0.05 * est.tokens
    with pytest.raises(ValueError, match="outside the intended kept set"):
        check_effective_temperature(est)


@pytest.mark.parametrize(
    ("token", "counted"),
    [
        (1, False),  # 0.2 below the kept logit: within float rounding of the boundary
        (2, True),  # 3.0 below it
    ],
)
def test_top_k_boundary_counts_only_tokens_beyond_the_logit_margin(token: int,
                                                                  counted: bool) -> None:
    z = np.array([[3.0, 2.8, 0.0]])  # top_k=1 keeps token 0 alone
    est = effective_temperature(z, np.array([token]), temperature=Setting(1.0, top_k=1))
    assert BOUNDARY_LOGIT_MARGIN == 0.5
    assert est.outside == int(counted)


@pytest.mark.parametrize(
    ("token", "counted"),
    [
        (1, False),  # 0.6 of mass above it: inside top_p 0.59 widened by the slack (0.61)
        (2, True),  # 0.9 above it
    ],
)
def test_top_p_boundary_counts_only_tokens_beyond_the_mass_slack(token: int,
                                                                counted: bool) -> None:
    z = np.log(np.array([[0.6, 0.3, 0.1]]))  # top_p=0.59 keeps token 0 alone
    assert np.log(0.3 / 0.6) < -BOUNDARY_LOGIT_MARGIN  # token 1 is beyond the logit margin
    est = effective_temperature(z, np.array([token]), temperature=Setting(1.0, top_p=0.59))
    assert BOUNDARY_MASS_SLACK == 0.02
    assert est.outside == int(counted)


@pytest.mark.parametrize("setting", [Setting(0.9, top_p=0.5), Setting(0.9, top_k=10),
                                     Setting(1.0, min_p=0.1)])  # fmt: skip
def test_a_sampler_in_lower_precision_passes_the_kept_set_check(setting: Setting) -> None:
    # tokens drawn from logits off by float rounding (as vLLM's bf16 against a float32
    # trainer): some fall just outside the exact kept sets, none beyond the tolerances
    rng = np.random.default_rng(8)
    z = _logits(rng, 16, 100)
    noisy = z + rng.normal(0.0, 0.2, size=z.shape)
    tokens = _draw(rng, noisy, setting)
    exact = np.take_along_axis(kept_mask(z, setting), tokens[..., None], axis=-1)
    assert (~exact).sum() > DEFAULT_OUTSIDE * tokens.size  # too many for an exact count
    est = effective_temperature(z, tokens, temperature=setting)
    assert est.outside < 0.5 * DEFAULT_OUTSIDE * est.tokens
    assert check_effective_temperature(est)


def test_mask_selects_the_scored_tokens() -> None:
    rng = np.random.default_rng(6)
    z = _logits(rng, 4, 30)
    tokens = _draw(rng, z, Setting(1.0))
    mask = np.zeros((4, 30), dtype=bool)
    mask[:, 10:] = True
    tokens[~mask] = -100  # unmasked positions may hold anything
    masked = effective_temperature(z, tokens, mask, temperature=1.0)
    sliced = effective_temperature(z[:, 10:], tokens[:, 10:], temperature=1.0)
    assert masked.tokens == 80
    assert masked.temperature == pytest.approx(sliced.temperature, rel=1e-12)
    flat = effective_temperature(z[:, 10:].reshape(-1, 64), tokens[:, 10:].reshape(-1),
                                 temperature=1.0)  # fmt: skip
    assert flat.temperature == pytest.approx(sliced.temperature, rel=1e-12)


def test_banned_entries_are_allowed_off_the_sampled_token() -> None:
    rng = np.random.default_rng(8)
    z = _logits(rng, 4, 50)
    z[..., :8] = -np.inf
    est = effective_temperature(z, _draw(rng, z, Setting(1.0)), temperature=1.0)
    assert math.isfinite(est.temperature) and abs(est.z) < 4.5


def test_no_information_passes_the_check() -> None:
    z = np.full((2, 3, 5), -np.inf)
    z[..., 0] = 1.0  # every position has one possible token
    est = effective_temperature(z, np.zeros((2, 3), dtype=int), temperature=0.7)
    assert math.isnan(est.temperature) and est.z == 0.0 and est.z_lr == 0.0
    assert check_effective_temperature(est)


@pytest.mark.parametrize("torch_kernels", [False, True])
@pytest.mark.parametrize("setting", [Setting(0.9), Setting(0.9, top_p=0.9)])
def test_torch_and_numpy_agree(torch_kernels: bool, setting: Setting,
                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    torch = pytest.importorskip("torch")
    # the torch kernels run on accelerators; forced here to run them on CPU
    monkeypatch.setattr(effective_temperature_module, "_TORCH_KERNELS_ON_CPU", torch_kernels)
    monkeypatch.setattr(effective_temperature_module, "_CPU_CHUNK", 64 * 7)  # several chunks
    rng = np.random.default_rng(9)
    z = _logits(rng, 4, 20)
    z[..., :3] = -np.inf
    tokens = _draw(rng, z, setting)
    ref = effective_temperature(z, tokens, temperature=setting)
    got = effective_temperature(torch.tensor(z), torch.tensor(tokens),
                                torch.ones(4, 20, dtype=torch.bool),
                                temperature=setting)  # fmt: skip
    assert got.temperature == pytest.approx(ref.temperature, rel=1e-9)
    assert got.z == pytest.approx(ref.z, rel=1e-9)
    assert got.z_lr == pytest.approx(ref.z_lr, rel=1e-6)
    assert got.outside == ref.outside == 0
    half = effective_temperature(torch.tensor(z, dtype=torch.bfloat16), torch.tensor(tokens),
                                 temperature=setting)  # fmt: skip
    assert half.temperature == pytest.approx(ref.temperature, rel=0.05)


def test_default_tolerance_needs_both_a_large_and_a_significant_departure() -> None:
    def est(ratio: float, z: float) -> TemperatureEstimate:
        return TemperatureEstimate(ratio * 0.6, 0.6, ratio, z, z, 1000)

    hi, lo = 1.0 + DEFAULT_RTOL, 1.0 / (1.0 + DEFAULT_RTOL)
    assert check_effective_temperature(est(hi * 0.99, 50.0))  # small departure, significant
    assert check_effective_temperature(est(lo * 1.01, -50.0))
    assert check_effective_temperature(est(3.0, DEFAULT_Z * 0.9))  # large, not significant
    assert not check_effective_temperature(est(hi * 1.01, DEFAULT_Z * 1.1), mode="off")
    assert not check_effective_temperature(est(lo * 0.99, -DEFAULT_Z * 1.1), mode="off")
    assert check_effective_temperature(est(3.0, 50.0), rtol=2.5)
    assert check_effective_temperature(est(3.0, 50.0), z_threshold=60.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"logits": np.zeros((2, 3))}, ValueError, "tokens must have shape"),
        ({"logits": np.zeros(4)}, ValueError, "logits must have shape"),
        ({"logits": np.zeros((2, 2, 4), dtype=int)}, TypeError, "floating-point"),
        ({"logits": [[0.0, 1.0]]}, TypeError, "logits must be"),
        ({"tokens": np.full((2, 2), 4)}, ValueError, r"tokens at masked positions must lie"),
        ({"tokens": np.zeros((2, 2))}, TypeError, "integer token ids"),
        ({"mask": np.zeros((2, 2))}, ValueError, "mask selects no position"),
        ({"mask": np.full((2, 2), 2)}, ValueError, "mask must hold only 0 and 1"),
        ({"mask": np.ones(3, dtype=bool)}, ValueError, "mask must have shape"),
        ({"temperature": 0.0}, ValueError, "temperature must lie in"),
        ({"temperature": "hot"}, TypeError, "temperature must be a number"),
        ({"temperature": True}, TypeError, "temperature must be a number"),
        ({"temperature": Setting().rows(3)}, ValueError, "SettingRows of 3 rows"),
        ({"order": "sglang"}, ValueError, "order must be one of"),
    ],
)
def test_bad_inputs_are_refused_naming_the_argument(kwargs: dict, error: type, match: str
                                                    ) -> None:  # fmt: skip
    args = {"logits": np.zeros((2, 2, 4)), "tokens": np.zeros((2, 2), dtype=int), "mask": None,
            "temperature": 1.0, "order": "hf", **kwargs}  # fmt: skip
    with pytest.raises(error, match=match):
        effective_temperature(args.pop("logits"), args.pop("tokens"), args.pop("mask"), **args)


def test_bad_logits_at_masked_positions_are_refused() -> None:
    z = np.zeros((2, 3, 4))
    tokens = np.zeros((2, 3), dtype=int)
    z[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"position 5 .* NaN or \+inf"):
        effective_temperature(z, tokens)
    mask = np.ones((2, 3), dtype=bool)
    mask[1, 2] = False
    assert effective_temperature(z, tokens, mask).tokens == 5  # an unmasked NaN is not read
    z[1, 2, 3] = 0.0
    z[0, 1, 0] = -np.inf
    with pytest.raises(ValueError, match=r"logit -inf .* cannot have been sampled"):
        effective_temperature(z, tokens)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "raise"}, ValueError, "mode must be one of"),
        ({"rtol": 0.0}, ValueError, "rtol must be > 0"),
        ({"z_threshold": -1.0}, ValueError, "z_threshold must be >= 0"),
        ({"max_outside": 1.5}, ValueError, r"max_outside must lie in \[0, 1\]"),
        ({"rtol": float("nan")}, ValueError, "rtol must be finite"),
    ],
)
def test_check_refuses_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    est = TemperatureEstimate(1.0, 1.0, 1.0, 0.0, 0.0, 10)
    with pytest.raises(error, match=match):
        check_effective_temperature(est, **kwargs)
    with pytest.raises(TypeError, match="estimate must be a TemperatureEstimate"):
        check_effective_temperature(1.0)  # type: ignore[arg-type]


# ---------------------------------------------------------------- from log-probs and entropies


def _pass(z: np.ndarray, tokens: np.ndarray, temps: float | np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """What a trainer's log-prob pass returns: each sampled token's float32 log-probability and
    its position's entropy under ``softmax(z / T)`` (``T`` per row)."""
    b = np.broadcast_to(np.asarray(temps, dtype=np.float64), z.shape[:1])
    zt = (z / b.reshape(-1, *([1] * (z.ndim - 1)))).astype(np.float32)
    lp = zt - logsumexp(zt, axis=-1, keepdims=True)
    entropy = -(np.exp(lp) * lp).sum(-1)
    return np.take_along_axis(lp, tokens[..., None], -1)[..., 0], entropy


def test_the_score_is_temperature_times_the_derivative_of_the_log_probability() -> None:
    rng = np.random.default_rng(20)
    z = _logits(rng, 1, 6, vocab=10)[0]
    tokens = _draw(rng, z[None], Setting(0.8))[0]
    lp, entropy = _pass(z, tokens, 0.8)
    h = 1e-6

    def logp(t: float) -> np.ndarray:
        return np.take_along_axis(z / t - logsumexp(z / t, -1, keepdims=True), tokens[:, None],
                                  -1)[:, 0]  # fmt: skip

    derivative = 0.8 * (logp(0.8 + h) - logp(0.8 - h)) / (2 * h)
    np.testing.assert_allclose(-(entropy + lp), derivative, atol=1e-5)
    score = temperature_score(lp, entropy, temperature=0.8)
    assert score.z == pytest.approx(derivative.sum() / np.sqrt((derivative**2).sum()), rel=1e-4)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.5])
def test_score_z_is_standard_normal_over_many_normal_batches(temperature: float) -> None:
    rng = np.random.default_rng(int(temperature * 100))
    stats = []
    for _ in range(300):
        z = _logits(rng, 4, 16, vocab=32)
        tokens = _draw(rng, z, Setting(temperature))
        score = temperature_score(*_pass(z, tokens, temperature), temperature=temperature)
        est = effective_temperature(z, tokens, temperature=temperature)
        stats.append((score.z, est.z))
        assert check_temperature_score(score)
    z_score, z_fisher = np.array(stats).T
    assert abs(z_score.mean()) < 0.2 and 0.85 < z_score.std() < 1.15
    assert np.mean(np.abs(z_score) > 1.96) < 0.1
    assert np.abs(z_score).max() < DEFAULT_SCORE_Z
    assert np.corrcoef(z_score, z_fisher)[0, 1] > 0.9  # the same score, normalised otherwise


@pytest.mark.parametrize(
    ("sampled", "intended", "side"),
    [
        (None, 0.6, "colder"),
        (None, 1.0, "colder"),
        (None, 1.5, "colder"),
        (1.0, 0.6, "hotter"),
        (0.6, 1.0, "colder"),
        (1.5, 1.0, "hotter"),
    ],
)
def test_greedy_or_wrong_temperature_batches_fail_the_score_check(
    sampled: float | None, intended: float, side: str
) -> None:
    rng = np.random.default_rng(21)
    z = _logits(rng, 16, 32)
    tokens = z.argmax(-1) if sampled is None else _draw(rng, z, Setting(sampled))
    score = temperature_score(*_pass(z, tokens, intended), temperature=intended)
    assert abs(score.z) > 1.5 * DEFAULT_SCORE_Z and abs(score.effect) > 3 * DEFAULT_SCORE_EFFECT
    assert score.z == pytest.approx(score.effect * math.sqrt(16 * 32))
    with pytest.raises(ValueError, match=f"drawn {side} than the intended temperature "
                                         f"{intended:g} "):  # fmt: skip
        check_temperature_score(score)
    with pytest.warns(EffectiveTemperatureWarning, match=side):
        assert check_temperature_score(score, mode="warn") is False
    assert check_temperature_score(score, mode="off") is False


def test_per_row_temperatures_are_scored_each_at_its_own() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(22)
    temps = np.array([0.5, 0.7, 0.9, 1.1, 1.3, 1.5])
    z = _logits(rng, 6, 300)
    tokens = _draw(rng, z, Setting().rows(6, temperature=temps))
    lp, entropy = _pass(z, tokens, temps)
    right = temperature_score(lp, entropy, temperature=temps)
    assert abs(right.z) < 4 and right.intended == pytest.approx(math.exp(np.log(temps).mean()))
    for given in (temps.tolist(), torch.tensor(temps), Setting().rows(6, temperature=temps)):
        assert temperature_score(lp, entropy, temperature=given) == right
    hot = _draw(rng, z, Setting().rows(6, temperature=1.5 * temps))
    wrong = temperature_score(*_pass(z, hot, temps), temperature=temps)
    assert wrong.z > 10 and not check_temperature_score(wrong, mode="off")
    # scored at one temperature instead, the rows sampled colder or hotter than it depart
    lp_1, entropy_1 = _pass(z, tokens, 1.0)
    assert temperature_score(lp_1[:1], entropy_1[:1], temperature=1.0).z < -DEFAULT_SCORE_Z
    assert temperature_score(lp_1[5:], entropy_1[5:], temperature=1.0).z > DEFAULT_SCORE_Z


def test_one_step_estimate_tracks_small_drifts_and_saturates_for_large_ones() -> None:
    rng = np.random.default_rng(23)
    z = _logits(rng, 64, 200)
    for drift in (0.95, 1.05):
        tokens = _draw(rng, z, Setting(drift))
        score = temperature_score(*_pass(z, tokens, 1.0), temperature=1.0)
        assert score.ratio == pytest.approx(drift, abs=0.015)
        assert score.temperature == pytest.approx(score.ratio)
    far = temperature_score(*_pass(z, _draw(rng, z, Setting(2.5)), 1.0), temperature=1.0)
    assert far.ratio < 1.5  # two and a half times hotter, yet the one step stays short


def test_small_departures_in_huge_batches_pass_by_their_effect() -> None:
    rng = np.random.default_rng(24)
    z = _logits(rng, 256, 400)  # 102,400 tokens
    tokens = _draw(rng, z, Setting(1.03))  # a 3% drift, e.g. a sampler's numerics
    score = temperature_score(*_pass(z, tokens, 1.0), temperature=1.0)
    assert score.z > DEFAULT_SCORE_Z and abs(score.effect) < DEFAULT_SCORE_EFFECT
    assert check_temperature_score(score)  # significant, but small
    assert not check_temperature_score(score, mode="off", min_effect=0.0)


def test_score_reads_only_masked_positions_and_takes_tensors() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(25)
    z = _logits(rng, 4, 30)
    lp, entropy = _pass(z, _draw(rng, z, Setting(0.9)), 0.9)
    mask = np.zeros((4, 30), dtype=bool)
    mask[:, 10:] = True
    lp[~mask], entropy[~mask] = np.nan, np.nan  # padding as a trainer may leave it
    masked = temperature_score(lp, entropy, mask, temperature=0.9)
    sliced = temperature_score(lp[:, 10:], entropy[:, 10:], temperature=0.9)
    flat = temperature_score(lp[:, 10:].ravel(), entropy[:, 10:].ravel(), temperature=0.9)
    assert masked == sliced == flat and masked.tokens == 80
    assert masked.excess == pytest.approx(float(np.mean(-lp[mask] - entropy[mask])))
    tensors = temperature_score(torch.tensor(lp), torch.tensor(entropy),
                                torch.tensor(mask.astype(np.int64)), temperature=0.9)  # fmt: skip
    assert tensors == masked


def test_no_information_passes_the_score_check() -> None:
    score = temperature_score(np.zeros((2, 3)), np.zeros((2, 3)), temperature=0.7)
    assert math.isnan(score.ratio) and score.z == 0.0 and score.tokens == 6
    assert check_temperature_score(score)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"log_probs": [[-1.0, -1.0]] * 2}, TypeError, "log_probs must be a numpy.ndarray"),
        ({"log_probs": np.zeros((2, 2), dtype=int)}, TypeError, "floating-point"),
        ({"entropies": np.ones((2, 3))}, ValueError, "entropies must have the shape"),
        ({"log_probs": np.zeros((1, 2, 2))}, ValueError, r"shape \(N, L\) or \(M,\)"),
        ({"mask": np.zeros((2, 2))}, ValueError, "mask selects no position"),
        ({"mask": np.full((2, 2), 2)}, ValueError, "mask must hold only 0 and 1"),
        ({"mask": np.ones(2, dtype=bool)}, ValueError, "mask must have the shape"),
        ({"temperature": 0.0}, ValueError, "temperature must lie in"),
        ({"temperature": True}, TypeError, "temperature must be a number"),
        ({"temperature": [0.7, 0.8, 0.9]}, ValueError, r"one value per row, shape \(2,\)"),
        ({"temperature": Setting(0.7, top_p=0.9)}, ValueError, "a truncated setting"),
        (
            {"log_probs": np.array([[-1.0, 0.5], [-1.0, -1.0]])},
            ValueError,
            r"log_probs at masked position \(0, 1\) is 0\.5: it must be finite and <= 0",
        ),
        (
            {"entropies": np.array([[1.0, 1.0], [np.inf, 1.0]])},
            ValueError,
            r"entropies at masked position \(1, 0\) is inf",
        ),
        ({"entropies": np.array([[1.0, -0.5], [1.0, 1.0]])}, ValueError, "finite and >= 0"),
    ],
)
def test_bad_score_inputs_are_refused_naming_the_argument(kwargs: dict, error: type, match: str
                                                          ) -> None:  # fmt: skip
    args = {"log_probs": np.full((2, 2), -1.0), "entropies": np.ones((2, 2)), "mask": None,
            "temperature": 1.0, **kwargs}  # fmt: skip
    with pytest.raises(error, match=match):
        temperature_score(args.pop("log_probs"), args.pop("entropies"), args.pop("mask"), **args)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "raise"}, ValueError, "mode must be one of"),
        ({"z_threshold": -1.0}, ValueError, "z_threshold must be >= 0"),
        ({"min_effect": 1.0}, ValueError, r"min_effect must lie in \[0, 1\)"),
        ({"min_effect": float("nan")}, ValueError, "min_effect must be finite"),
        ({"rtol": 0.1}, TypeError, "rtol"),
    ],
)
def test_score_check_refuses_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    score = TemperatureScore(1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 10)
    with pytest.raises(error, match=match):
        check_temperature_score(score, **kwargs)
    with pytest.raises(TypeError, match="score must be a TemperatureScore"):
        check_temperature_score(TemperatureEstimate(1.0, 1.0, 1.0, 0.0, 0.0, 10))  # type: ignore[arg-type]
