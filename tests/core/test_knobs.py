"""The sampler-setting module: ``Setting`` / ``SettingRows``, and the truncated distribution in
NumPy and torch, which agree with each other and with ``candidate_loglik``'s scoring for every
family and both orders, on logits with ties and ``-inf`` entries."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pytest

from metactl.knobs import (
    KNOB_OFF,
    KNOBS,
    SMOOTHING_EPS,
    Setting,
    SettingRows,
    grid,
    joint_candidates,
    kept_mask,
    log_probs,
    sampling_terms,
    truncated_probs,
)
from metactl.likelihood import candidate_loglik

V = 12
ROWS = 60

SETTINGS = [
    Setting(0.8, top_p=0.7),
    Setting(1.3, top_k=3),
    Setting(1.0, min_p=0.2),
    Setting(0.7, top_p=0.8, top_k=4, min_p=0.05),
    Setting(1.2, top_p=0.6, min_p=0.1),  # HF and vLLM differ here
    Setting(0.9, top_k=20),  # k >= V: keeps every token, yet "on"
    Setting(0.9),  # no truncation: q = p
]


def logits_and_tokens(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rounded logits (many ties, also at the boundaries), 10% banned (-inf), and a sampled
    token per row among the finite ones."""
    rng = np.random.default_rng(seed)
    z = np.round(rng.normal(size=(ROWS, V)) * 2) / 2
    z[rng.random(z.shape) < 0.1] = -np.inf
    z[:, 0] = np.maximum(z[:, 0], 0.0)  # every row keeps a finite entry
    tokens = np.array([rng.choice(np.flatnonzero(np.isfinite(row))) for row in z])
    return z, tokens


def brute_kept(z: np.ndarray, s: Setting, order: str) -> np.ndarray:
    """The definition, one row at a time, float64, by plain loops."""
    p = np.exp((z - z.max()) / s.temperature)
    p = p / p.sum()
    kept_k = np.ones(z.size, dtype=bool)
    if s.top_k is not None:
        kept_k = z >= np.sort(z)[::-1][min(s.top_k, z.size) - 1]
    kept_mp = p >= s.min_p * p.max() if s.min_p > 0 else np.ones(z.size, dtype=bool)
    base = kept_k if order == "hf" else kept_k & kept_mp
    kept_p = np.ones(z.size, dtype=bool)
    if s.top_p < 1.0:
        mass = p * base
        above = np.array([mass[z > z[i]].sum() for i in range(z.size)])
        kept_p = above < s.top_p * mass.sum()
    return kept_k & kept_mp & kept_p


@pytest.mark.parametrize("order", ["hf", "vllm"])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.label())
def test_numpy_and_torch_agree_with_the_definition_and_each_other(setting: Setting,
                                                                   order: str) -> None:
    torch = pytest.importorskip("torch")
    z, tokens = logits_and_tokens()
    kept = kept_mask(z, setting, order=order)
    want = np.stack([brute_kept(row, setting, order) for row in z])
    assert (kept == want).all()
    zt = torch.tensor(z, dtype=torch.float32)  # the halves are exact in float32
    assert (kept_mask(zt, setting, order=order).numpy() == kept).all()
    lq = log_probs(z, setting, order=order)
    lq_t = log_probs(zt, setting, order=order).double().numpy()
    finite = np.isfinite(z)
    assert (np.isfinite(lq) == finite).all() and (np.isfinite(lq_t) == finite).all()
    np.testing.assert_allclose(lq_t[finite], lq[finite], rtol=0, atol=2e-6)
    # q = (1 - eps) p_trunc + eps p, a distribution; p_trunc lives on the kept set
    p = np.exp(log_probs(z, Setting(setting.temperature), order=order))
    p_trunc = truncated_probs(z, setting, order=order)
    np.testing.assert_allclose(p_trunc.sum(axis=1), 1.0, rtol=1e-12)
    assert (p_trunc[~kept] == 0).all()
    if setting.truncated:
        mixed = (1 - SMOOTHING_EPS) * p_trunc + SMOOTHING_EPS * p
        np.testing.assert_allclose(np.exp(lq), mixed, rtol=1e-12, atol=1e-300)
    else:
        np.testing.assert_array_equal(p_trunc, p)
    np.testing.assert_allclose(truncated_probs(zt, setting, order=order).double().numpy(),
                               p_trunc, rtol=0, atol=1e-6)  # fmt: skip
    # the tokens' values are those of the whole array
    picked = log_probs(z, setting, tokens, order=order)
    np.testing.assert_array_equal(picked, lq[np.arange(ROWS), tokens])
    picked_t = log_probs(zt, setting, torch.from_numpy(tokens), order=order)
    assert torch.equal(picked_t, log_probs(zt, setting, order=order)[np.arange(ROWS), tokens])


def families(setting: Setting) -> list[tuple[str, Any, dict[str, Any]]]:
    """``(family, candidates, fixed knobs)`` whose first candidate is ``setting``: the
    temperature family, the family of every knob that is on, and a joint grid."""
    out = []
    on = [k for k in KNOBS if k != "temperature" and getattr(setting, k) != KNOB_OFF[k]]
    other = {"temperature": setting.temperature * 1.5, "top_p": 1.0, "top_k": V + 3,
             "min_p": 0.0}  # fmt: skip
    for knob in ["temperature", *on]:
        cands = [getattr(setting, knob), other[knob]]
        out.append((knob, cands, setting.fixed_knobs((knob,))))
    varied = ("temperature", *on)
    joint = joint_candidates([{k: getattr(setting, k) for k in varied},
                              {"temperature": other["temperature"],
                               **{k: getattr(setting, k) for k in on}}])  # fmt: skip
    out.append(("joint", joint, setting.fixed_knobs(varied)))
    return out


@pytest.mark.parametrize("order", ["hf", "vllm"])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.label())
def test_log_probs_are_what_candidate_loglik_scores(setting: Setting, order: str) -> None:
    torch = pytest.importorskip("torch")
    z, tokens = logits_and_tokens(1)
    mask = np.ones((ROWS, 1), dtype=bool)
    ours = log_probs(z, setting, tokens, order=order)
    zt = torch.tensor(z, dtype=torch.float32)
    ours_t = log_probs(zt, setting, torch.from_numpy(tokens), order=order)
    for family, cands, fixed in families(setting):
        scored = candidate_loglik(z[:, None], tokens[:, None], mask, cands, family, order=order,
                                  **fixed)[:, 0]  # fmt: skip
        # plain min-p has its own fast path (the kept mass summed unsorted)
        pure_min_p = family == "min_p" and setting.top_k is None and setting.top_p == 1.0
        if setting.truncated and not pure_min_p:  # the same kept-set code: to the bit
            np.testing.assert_array_equal(scored, ours, err_msg=family)
        else:
            np.testing.assert_allclose(scored, ours, rtol=1e-12, err_msg=family)
        scored_t = candidate_loglik(zt[:, None], torch.from_numpy(tokens)[:, None],
                                    torch.from_numpy(mask), cands, family, order=order,
                                    **fixed)[:, 0]  # fmt: skip
        np.testing.assert_allclose(scored_t.numpy(), ours_t.numpy(), rtol=0, atol=2e-6,
                                   err_msg=family)  # fmt: skip


@pytest.mark.parametrize("order", ["hf", "vllm"])
def test_one_setting_per_row_equals_each_rows_setting(order: str) -> None:
    torch = pytest.importorskip("torch")
    z, _ = logits_and_tokens(2)
    picks = [SETTINGS[i % len(SETTINGS)] for i in range(ROWS)]
    rows = Setting().rows(ROWS, **{k: [getattr(s, k) for s in picks] for k in KNOBS})
    assert [rows[i] for i in range(ROWS)] == picks
    lq = log_probs(z, rows, order=order)
    zt = torch.tensor(z, dtype=torch.float32)
    lq_t = log_probs(zt, rows, order=order)
    for i, s in enumerate(picks):
        np.testing.assert_array_equal(lq[i], log_probs(z[i : i + 1], s, order=order)[0])
        assert torch.equal(lq_t[i], log_probs(zt[i : i + 1], s, order=order)[0])
    # (N, L, V) logits: row i's setting covers its L positions
    z3 = np.stack([z, z[::-1]], axis=1)
    lq3 = log_probs(z3, rows, order=order)
    np.testing.assert_array_equal(lq3[:, 0], lq)
    np.testing.assert_array_equal(lq3, log_probs(z3.reshape(-1, V), rows.repeat(2),
                                                 order=order).reshape(z3.shape))  # fmt: skip


def test_torch_log_probs_are_differentiable_and_exact_without_truncation() -> None:
    torch = pytest.importorskip("torch")
    z, tokens = logits_and_tokens(3)
    leaf = torch.tensor(z, dtype=torch.float32).nan_to_num(neginf=-30.0).requires_grad_(True)
    toks = torch.from_numpy(tokens)
    log_probs(leaf, Setting(0.8, top_p=0.7, top_k=5), toks).sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    plain = log_probs(leaf, Setting(0.8), toks)
    assert torch.equal(plain, torch.log_softmax(leaf.float() / 0.8, -1)[np.arange(ROWS), toks])
    terms = sampling_terms(leaf.detach(), Setting(0.8, min_p=0.3))
    assert terms.truncated.all() and (terms.kept_mass <= 1).all()


def test_the_smoothing_epsilon_is_the_likelihood_default() -> None:
    default = inspect.signature(candidate_loglik).parameters["epsilon"].default
    assert default == SMOOTHING_EPS


def test_a_setting_reads_writes_and_labels_its_knobs() -> None:
    base = Setting(0.8, top_p=0.9)
    assert base.as_dict() == {"temperature": 0.8, "top_p": 0.9, "top_k": None, "min_p": 0.0}
    assert base.truncated and not Setting(0.5).truncated
    moved = base.with_values({"top_k": 40, "temperature": 1.2})
    assert (moved.temperature, moved.top_p, moved.top_k) == (1.2, 0.9, 40)
    assert base.fixed_knobs(("temperature", "top_p")) == {"top_k": None, "min_p": 0.0}
    assert base.label() == "temperature=0.8,top_p=0.9" and Setting().label() == "temperature=1"
    g = grid(temperature=[0.7, 1.0], top_p=[0.9, 1.0], top_k=[5, 50])
    assert [Setting().with_values(c).label(g.knobs) for c in g] == g.labels()
    assert Setting(top_k=None).label(("top_k",)) == "top_k=off"
    assert base.at_temperature(1.1) == Setting(1.1, top_p=0.9)
    rows = base.at_temperature(np.array([0.5, 2.0]))
    assert isinstance(rows, SettingRows) and rows[1] == Setting(2.0, top_p=0.9)
    with pytest.raises(ValueError, match="1-D"):
        base.at_temperature(np.ones((2, 2)))


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: Setting(temperature=0.0), ValueError, "temperature must be > 0"),
        (lambda: Setting(top_p=0.0), ValueError, r"top_p must lie in \(0, 1\]"),
        (lambda: Setting(top_k=0), ValueError, "top_k must be an integer >= 1"),
        (lambda: Setting(top_k=2.0), TypeError, "top_k"),
        (lambda: Setting(min_p=1.0), ValueError, r"min_p must lie in \[0, 1\)"),
        (lambda: Setting().with_values({"top_a": 0.5}), ValueError, r"no knob \['top_a'\]"),
        (lambda: Setting().with_values([("top_p", 0.5)]), TypeError, "mapping"),
        (lambda: Setting().fixed_knobs("temperature"), TypeError, "varied"),
        (lambda: Setting().rows(0), ValueError, "n must be an int >= 1"),
        (lambda: Setting().rows(3, top_p=[0.9, 0.9]), ValueError, "one value per row"),
        (lambda: Setting().rows(2, top_k=[3, True]), TypeError, r"top_k\[1\]"),
        (lambda: SettingRows(np.ones(2), np.ones(2), np.zeros(2, dtype=int), np.ones(2)),
         ValueError, r"min_p\[0\] must be in \[0, 1\)"),
        (lambda: SettingRows(np.ones(2), np.ones(2), np.zeros(2), np.zeros(2)), TypeError,
         "top_k must hold integers"),
        (lambda: SettingRows(np.ones(2), np.ones(3), np.zeros(2, dtype=int), np.zeros(2)),
         ValueError, "same length"),
    ],
)
def test_bad_settings_are_refused_naming_the_knob(make: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_the_distribution_functions_refuse_bad_arguments() -> None:
    z = np.zeros((2, 4))
    with pytest.raises(TypeError, match=r"setting must be a metactl\.knobs\.Setting"):
        log_probs(z, {"top_p": 0.9})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="logits must hold floating-point"):
        kept_mask(np.zeros((2, 4), dtype=int), Setting(top_k=2))
    with pytest.raises(TypeError, match=r"logits must be a numpy\.ndarray or torch\.Tensor"):
        truncated_probs([[0.0, 1.0]], Setting())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="order must be one of"):
        log_probs(z, Setting(top_p=0.5), order="sglang")
    with pytest.raises(ValueError, match="epsilon must lie in"):
        log_probs(z, Setting(top_p=0.5), epsilon=1.0)
    with pytest.raises(ValueError, match="tokens must have shape"):
        log_probs(z, Setting(top_p=0.5), np.zeros(3, dtype=int))
    with pytest.raises(TypeError, match="tokens must hold integer"):
        log_probs(z, Setting(top_p=0.5), np.zeros(2))
    with pytest.raises(ValueError, match="tokens must lie in"):
        log_probs(z, Setting(top_p=0.5), np.array([0, 4]))
    with pytest.raises(ValueError, match="setting has 3 rows"):
        log_probs(z, Setting().rows(3))
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        log_probs(np.array([[0.0, np.nan]]), Setting(top_p=0.5))
