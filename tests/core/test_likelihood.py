"""Tests for metactl.likelihood: candidate_loglik, likelihood_optimal, default_chunk_size."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import metactl.likelihood._torch as lk  # noqa: E402
from metactl.likelihood import (  # noqa: E402
    candidate_loglik,
    default_chunk_size,
    likelihood_optimal,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PAPER_GRID = [0.6 + 0.1 * i for i in range(10)]  # deliberately not rounded: 1.2000000000000002


# ----------------------------------------------------------------------------- references


def ref_temperature(logits, tokens, mask, temps):
    """Dense float64 reference: masked mean of log_softmax(z / T) gathered at the tokens."""
    z = torch.as_tensor(logits).double()
    tok = torch.as_tensor(tokens).long().clamp_min(0)
    m = torch.as_tensor(mask).double()
    cols = []
    for t in temps:
        lp = torch.log_softmax(z / t, dim=-1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
        cols.append((lp * m).sum(1) / m.sum(1))
    return torch.stack(cols, 1).numpy()


def ref_min_p(logits, tokens, mask, thresholds, temperature, eps):
    """Dense float64 reference of the smoothed min-p distribution, written independently."""
    z = np.asarray(logits, dtype=np.float64)
    tok = np.clip(np.asarray(tokens), 0, None)
    msk = np.asarray(mask).astype(bool)
    n, length, _ = z.shape
    out = np.zeros((n, len(thresholds)))
    for k, th in enumerate(thresholds):
        for i in range(n):
            vals = []
            for t in range(length):
                if not msk[i, t]:
                    continue
                x = z[i, t] / temperature
                p = np.exp(x - x.max())
                p /= p.sum()
                kept = p >= th * p.max()
                p_trunc = np.where(kept, p, 0.0) / p[kept].sum()
                q = (1 - eps) * p_trunc + eps * p
                vals.append(np.log(q[tok[i, t]]))
            out[i, k] = np.mean(vals)
    return out


def make_batch(n=3, length=9, vocab=13, scale=3.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, length, vocab, generator=g) * scale).to(dtype)
    tokens = torch.randint(0, vocab, (n, length), generator=g)
    mask = torch.zeros(n, length, dtype=torch.bool)
    for i in range(n):  # needs length >= 4
        if i % 3 == 0:  # left-padded prompt, completion, right padding
            mask[i, 2 : length - 2] = True
        elif i % 3 == 1:  # completion only
            mask[i] = True
        else:  # a single token, a hole, then two tokens
            mask[i, length // 2 - 1] = True
            mask[i, length - 3 : length - 1] = True
    return logits, tokens, mask


# ----------------------------------------------------------------------------- temperature


@pytest.fixture(params=["blocks", "segments"])
def cpu_path(request, monkeypatch):
    """Run a test through both temperature-family paths: blocks of positions across rows (small
    V * K) and per-row segments (large V * K), by moving the size threshold between them."""
    if request.param == "segments":
        monkeypatch.setattr(lk, "_SMALL_VOCAB_ELEMENTS", 0)
    else:
        monkeypatch.setattr(lk, "_SMALL_VOCAB_ELEMENTS", 1 << 30)
    return request.param


@pytest.fixture
def segments_path(monkeypatch):
    monkeypatch.setattr(lk, "_SMALL_VOCAB_ELEMENTS", 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3, 7, 1000])
def test_temperature_matches_log_softmax(device, chunk_size, cpu_path):
    logits, tokens, mask = make_batch()
    temps = [0.3, 0.7, 1.0, 1.6, 4.0]
    got = candidate_loglik(
        logits.to(device), tokens.to(device), mask.to(device), temps, chunk_size=chunk_size
    )
    assert isinstance(got, torch.Tensor)
    assert got.dtype == torch.float32 and got.shape == (3, 5)
    assert got.device.type == device
    want = ref_temperature(logits, tokens, mask, temps)
    np.testing.assert_allclose(got.cpu().double().numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "temps",
    [PAPER_GRID, [0.25, 0.5, 1.0, 2.0, 3.0], [2.0, 1.0, 0.5]],
    ids=["paper-grid", "halving-chain", "descending"],
)
@pytest.mark.parametrize("scale", [1.0, 12.0])
def test_square_chains_match_reference(temps, scale):
    # scale 12 drives exp(u / T) into float32 underflow/denormals for the cold candidates
    logits, tokens, mask = make_batch(n=2, length=6, vocab=257, scale=scale, seed=3)
    got = candidate_loglik(logits, tokens, mask, temps, chunk_size=4).double().numpy()
    want = ref_temperature(logits, tokens, mask, temps)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-5)


def test_square_plan_groups_halving_chains():
    plan = lk._square_plan(np.array(PAPER_GRID))
    assert sorted(j for j, _ in plan) == list(range(10))
    squares = [(plan[p - 1][0], j) for p, (j, sq) in enumerate(plan) if sq]
    assert squares == [(8, 1), (6, 0)]  # 1.4 -> 0.7 and 1.2 -> 0.6
    plan = lk._square_plan(np.array([0.25, 0.5, 1.0, 2.0, 3.0]))
    assert plan == [(4, False), (3, False), (2, True), (1, True), (0, True)]
    assert all(not sq for _, sq in lk._square_plan(np.array([0.7, 1.1, 1.3])))


def test_numpy_input_returns_float64_and_matches():
    logits, tokens, mask = make_batch(seed=1)
    temps = [0.5, 1.0, 2.0]
    for chunk_size in (None, 1, 4):
        got = candidate_loglik(
            logits.numpy(), tokens.numpy(), mask.numpy(), temps, chunk_size=chunk_size
        )
        assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (3, 3)
        np.testing.assert_allclose(got, ref_temperature(logits, tokens, mask, temps), atol=1e-10)
    got_t = candidate_loglik(logits, tokens, mask, temps).double().numpy()
    np.testing.assert_allclose(got_t, got, rtol=1e-5, atol=1e-5)


def test_input_dtypes_views_and_mixed_inputs(cpu_path):
    logits, tokens, mask = make_batch(length=10, seed=2)
    temps = [0.8, 1.3]
    # non-contiguous view (the usual logits[:, :-1] shift), numpy tokens, int 0/1 mask
    sliced = logits[:, :-1]
    assert not sliced.is_contiguous()
    m9 = mask[:, :-1]
    got = candidate_loglik(sliced, tokens[:, :-1].numpy(), m9.int(), temps)
    np.testing.assert_allclose(
        got.double().numpy(), ref_temperature(sliced, tokens[:, :-1], m9, temps), atol=1e-5
    )
    # float mask, float64 and bfloat16 logits: computed in float32, returned as float32
    for lg, tol in ((logits.double(), 1e-5), (logits.bfloat16(), 1e-4)):
        got = candidate_loglik(lg, tokens, mask.float(), temps)
        assert got.dtype == torch.float32
        want = ref_temperature(lg.float(), tokens, mask, temps)
        np.testing.assert_allclose(got.double().numpy(), want, atol=tol)


def test_does_not_modify_input_or_track_grad(cpu_path):
    logits, tokens, mask = make_batch()
    logits.requires_grad_(True)
    before = logits.detach().clone()
    tokens = tokens.clone()
    tokens[~mask] = -100  # placeholders at unmasked positions are never read
    tok_before = tokens.clone()
    for family, cands in (("temperature", [0.5, 1.0]), ("min_p", [0.0, 0.3])):
        out = candidate_loglik(logits, tokens, mask, cands, family)
        assert not out.requires_grad
    assert torch.equal(logits.detach(), before)
    assert torch.equal(tokens, tok_before)


def test_chunking_does_not_change_results(cpu_path):
    logits, tokens, mask = make_batch(n=4, length=17, vocab=31, seed=5)
    mask[3] = torch.rand(17, generator=torch.Generator().manual_seed(0)) > 0.5
    mask[3, 0] = True
    outs = [
        candidate_loglik(logits, tokens, mask, [0.6, 0.9, 1.2], chunk_size=c)
        for c in (1, 2, 5, 16, 17, 100)
    ]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["temperature", "min_p"])
def test_cpu_workers_give_the_same_result(monkeypatch, family, segments_path):
    logits, tokens, mask = make_batch(n=6, length=11, vocab=37, seed=9)
    cands = [0.6, 0.9, 1.2, 1.8] if family == "temperature" else [0.0, 0.1, 0.4]
    if family == "temperature":
        want = ref_temperature(logits, tokens, mask, cands)
    else:
        want = ref_min_p(logits, tokens, mask, cands, 1.0, 1e-3)
    threads = torch.get_num_threads()
    outs = {}
    for workers in (1, 2, 3):
        monkeypatch.setattr(lk, "_cpu_workers", lambda _torch, w=workers: w)
        for chunk_size in (None, 1, 5):
            outs[workers, chunk_size] = candidate_loglik(
                logits, tokens, mask, cands, family, chunk_size=chunk_size
            )
            assert torch.get_num_threads() == threads  # restored after the pool
    for out in outs.values():
        torch.testing.assert_close(out, outs[1, None], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(outs[1, None].double().numpy(), want, rtol=1e-5, atol=1e-5)


def test_cpu_pool_propagates_errors_and_restores_threads(monkeypatch, segments_path):
    monkeypatch.setattr(lk, "_cpu_workers", lambda _torch: 2)
    threads = torch.get_num_threads()
    kw = _good()
    kw["logits"][1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="logits"):
        candidate_loglik(**kw, chunk_size=2)
    assert torch.get_num_threads() == threads

    def boom(*args, **kwargs):
        raise RuntimeError("worker failed")

    monkeypatch.setattr(lk, "_scaled_shift", boom)
    with pytest.raises(RuntimeError, match="worker failed"):
        candidate_loglik(**_good(), chunk_size=2)
    assert torch.get_num_threads() == threads


def test_single_threaded_ops_is_reentrant():
    threads = torch.get_num_threads()
    with lk._single_threaded_ops(torch):
        assert torch.get_num_threads() == 1
        with lk._single_threaded_ops(torch):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads


def test_segments_split_runs():
    mask = np.array([[0, 1, 1, 1, 1, 1, 0, 1], [1, 1, 1, 1, 0, 0, 0, 0]], dtype=bool)
    row, start, stop = lk._segments(mask, 2)
    assert list(zip(row.tolist(), start.tolist(), stop.tolist(), strict=True)) == [
        (0, 1, 3), (0, 3, 5), (0, 5, 6), (0, 7, 8), (1, 0, 2), (1, 2, 4)
    ]  # fmt: skip


# ----------------------------------------------------------------------------- min_p


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
@pytest.mark.parametrize("epsilon", [1e-3, 0.2])
def test_min_p_matches_dense_reference(device, temperature, epsilon):
    logits, tokens, mask = make_batch(vocab=23, seed=7)
    # make some sampled tokens improbable so that high thresholds drop them
    tokens[:, ::2] = logits[:, ::2].argmin(-1)
    thresholds = [0.0, 0.05, 0.3, 0.9]
    want = ref_min_p(logits, tokens, mask, thresholds, temperature, epsilon)
    for chunk_size in (None, 1, 3):
        got = candidate_loglik(
            logits.to(device), tokens.to(device), mask.to(device), thresholds, "min_p",
            temperature=temperature, epsilon=epsilon, chunk_size=chunk_size,
        )  # fmt: skip
        np.testing.assert_allclose(got.cpu().double().numpy(), want, rtol=1e-5, atol=1e-5)
    got_np = candidate_loglik(
        logits.numpy(), tokens.numpy(), mask.numpy(), thresholds, "min_p",
        temperature=temperature, epsilon=epsilon, chunk_size=2,
    )  # fmt: skip
    np.testing.assert_allclose(got_np, want, atol=1e-10)


def test_min_p_zero_equals_temperature_and_drop_costs_log_eps():
    logits, tokens, mask = make_batch(seed=8)
    a = candidate_loglik(logits, tokens, mask, [0.0, 0.5], "min_p", temperature=0.8)
    b = candidate_loglik(logits, tokens, mask, [0.8, 1.0])
    torch.testing.assert_close(a[:, 0], b[:, 0], rtol=1e-5, atol=1e-5)
    # a token never kept: log q = log(eps) + log p, exactly eps-smoothed, never -inf
    z = torch.tensor([[[5.0, 0.0, -1.0]]])
    out = candidate_loglik(z, torch.tensor([[2]]), torch.tensor([[True]]), [0.0, 0.5], "min_p",
                           epsilon=0.01)  # fmt: skip
    logp = torch.log_softmax(z.double(), -1)[0, 0, 2]
    assert out[0, 1].item() == pytest.approx((np.log(0.01) + logp).item(), rel=1e-6)
    assert out[0, 0].item() == pytest.approx(logp.item(), rel=1e-6)


# ----------------------------------------------------------------------------- properties

GRID_LOGIT = st.integers(-240, 240).map(lambda k: k / 8)


@st.composite
def batches(draw):
    n = draw(st.integers(1, 3))
    length = draw(st.integers(1, 5))
    vocab = draw(st.integers(1, 9))
    flat = draw(st.lists(GRID_LOGIT, min_size=n * length * vocab, max_size=n * length * vocab))
    logits = torch.tensor(flat, dtype=torch.float32).reshape(n, length, vocab)
    tokens = torch.tensor(
        draw(st.lists(st.integers(0, vocab - 1), min_size=n * length, max_size=n * length))
    ).reshape(n, length)
    mask = torch.tensor(
        draw(st.lists(st.booleans(), min_size=n * length, max_size=n * length))
    ).reshape(n, length)
    first = draw(st.lists(st.integers(0, length - 1), min_size=n, max_size=n))
    mask[torch.arange(n), torch.tensor(first)] = True
    shift = torch.tensor(
        draw(st.lists(st.integers(-50, 50), min_size=n * length, max_size=n * length)),
        dtype=torch.float32,
    ).reshape(n, length, 1)
    chunk = draw(st.integers(1, 6))
    return logits, tokens, mask, shift, chunk


@settings(max_examples=60, deadline=None)
@given(
    batch=batches(),
    temps=st.lists(
        st.sampled_from([0.3, 0.5, 0.6, 0.8, 1.0, 1.2, 1.6, 2.5]),
        min_size=2,
        max_size=5,
        unique=True,
    ),
)
def test_property_temperature_finite_nonpositive_shift_invariant(batch, temps):
    logits, tokens, mask, shift, chunk = batch
    out = candidate_loglik(logits, tokens, mask, temps, chunk_size=chunk)
    assert torch.isfinite(out).all()
    assert (out <= 0).all()
    shifted = candidate_loglik(logits + shift, tokens, mask, temps, chunk_size=chunk)
    torch.testing.assert_close(shifted, out, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        out.double().numpy(), ref_temperature(logits, tokens, mask, temps), atol=1e-4
    )


@settings(max_examples=40, deadline=None)
@given(
    batch=batches(),
    temperature=st.sampled_from([0.7, 1.0]),
    thresholds=st.lists(
        st.sampled_from([0.0, 0.05, 0.2, 0.6]), min_size=2, max_size=4, unique=True
    ),
)
def test_property_min_p_finite_nonpositive_shift_invariant(batch, temperature, thresholds):
    # logits on a 1/8 grid never put p / p_max within 2e-3 of these thresholds, so the
    # kept sets cannot flip under float32 rounding
    logits, tokens, mask, shift, chunk = batch
    kw = {"temperature": temperature, "chunk_size": chunk}
    out = candidate_loglik(logits, tokens, mask, thresholds, "min_p", **kw)
    assert torch.isfinite(out).all()
    assert (out <= 0).all()
    shifted = candidate_loglik(logits + shift, tokens, mask, thresholds, "min_p", **kw)
    torch.testing.assert_close(shifted, out, rtol=1e-5, atol=1e-4)
    want = ref_min_p(logits, tokens, mask, thresholds, temperature, 1e-3)
    np.testing.assert_allclose(out.double().numpy(), want, atol=1e-4)


# ----------------------------------------------------------------------------- likelihood_optimal


def test_likelihood_optimal_hand_case_with_tie():
    loglik = np.array(
        [[-3.0, -1.0, -1.0, -2.0], [-0.5, -0.7, -0.9, -1.0], [-4.0, -3.0, -2.0, -1.0]]
    )
    cands = [0.6, 0.9, 1.2, 1.5]
    out = likelihood_optimal(loglik, cands)
    np.testing.assert_array_equal(out, [0.9, 0.6, 1.5])  # the tie goes to the smaller index
    assert out.dtype == np.float64
    np.testing.assert_array_equal(likelihood_optimal(torch.tensor(loglik), np.array(cands)), out)


def test_likelihood_optimal_end_to_end():
    logits, tokens, mask = make_batch(seed=4)
    temps = [0.5, 0.8, 1.0, 1.5, 3.0]
    best = likelihood_optimal(candidate_loglik(logits, tokens, mask, temps), temps)
    want = np.asarray(temps)[ref_temperature(logits, tokens, mask, temps).argmax(1)]
    np.testing.assert_array_equal(best, want)


@pytest.mark.parametrize(
    ("loglik", "cands", "exc", "match"),
    [
        (np.zeros(3), [1.0, 2.0], ValueError, "loglik"),
        (np.zeros((0, 2)), [1.0, 2.0], ValueError, "loglik"),
        (np.zeros((2, 3)), [1.0, 2.0], ValueError, "candidates"),
        (np.array([[0.0, np.nan]]), [1.0, 2.0], ValueError, "loglik"),
        (np.array([[0.0, -np.inf]]), [1.0, 2.0], ValueError, "loglik"),
        (np.array([["a", "b"]]), [1.0, 2.0], TypeError, "loglik"),
        (np.zeros((2, 1)), [1.0], ValueError, "candidates"),
        (np.zeros((2, 2)), [1.0, 1.0], ValueError, "candidates"),
        (np.zeros((2, 2)), [1.0, np.nan], ValueError, "candidates"),
        (np.zeros((2, 2)), "ab", TypeError, "candidates"),
    ],
)
def test_likelihood_optimal_rejects_bad_input(loglik, cands, exc, match):
    with pytest.raises(exc, match=match):
        likelihood_optimal(loglik, cands)


# ----------------------------------------------------------------------------- validation


def _good():
    logits, tokens, mask = make_batch(n=2, length=4, vocab=5)
    mask[:] = True
    return {"logits": logits, "tokens": tokens, "mask": mask, "candidates": [0.5, 1.0]}


def _with(**changes):
    def build():
        kw = _good()
        for key, fn in changes.items():
            kw[key] = fn(kw) if callable(fn) else fn
        return kw

    return build


def _set(tensor, index, value):
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


BAD = [
    ("nan", _with(logits=lambda k: _set(k["logits"], (0, 1, 2), float("nan"))), ValueError,
     "logits"),
    ("+inf", _with(logits=lambda k: _set(k["logits"], (1, 3, 0), float("inf"))), ValueError,
     "logits"),
    ("-inf-at-sampled-token",
     _with(logits=lambda k: _set(k["logits"], (1, 0, int(k["tokens"][1, 0])), float("-inf"))),
     ValueError, r"-inf at the sampled token .*\(row 1, position 0\)"),
    ("logits-2d", _with(logits=lambda k: k["logits"][0]), ValueError, "logits"),
    ("logits-int", _with(logits=lambda k: k["logits"].long()), TypeError, "logits"),
    ("logits-list", _with(logits=lambda k: k["logits"].tolist()), TypeError, "logits"),
    ("empty-batch", _with(logits=lambda k: k["logits"][:0], tokens=lambda k: k["tokens"][:0],
                          mask=lambda k: k["mask"][:0]), ValueError, "logits"),
    ("tokens-shape", _with(tokens=lambda k: k["tokens"][:, :3]), ValueError, "tokens"),
    ("tokens-float", _with(tokens=lambda k: k["tokens"].float()), TypeError, "tokens"),
    ("token-too-big", _with(tokens=lambda k: _set(k["tokens"], (1, 2), 5)), ValueError, "tokens"),
    ("token-negative", _with(tokens=lambda k: _set(k["tokens"], (0, 0), -1)), ValueError,
     "tokens"),
    ("mask-shape", _with(mask=lambda k: k["mask"][:1]), ValueError, "mask"),
    ("mask-all-masked-row", _with(mask=lambda k: _set(k["mask"], 1, False)), ValueError, "mask"),
    ("mask-not-01", _with(mask=lambda k: k["mask"].int() * 2), ValueError, "mask"),
    ("mask-str", _with(mask=lambda k: np.full((2, 4), "x")), TypeError, "mask"),
    ("K<2", _with(candidates=[1.0]), ValueError, "candidates"),
    ("duplicate", _with(candidates=[1.0, 0.5, 1.0]), ValueError, "candidates"),
    ("zero-T", _with(candidates=[0.0, 1.0]), ValueError, "candidates"),
    ("negative-T", _with(candidates=[-1.0, 1.0]), ValueError, "candidates"),
    ("nan-T", _with(candidates=[float("nan"), 1.0]), ValueError, "candidates"),
    ("inf-T", _with(candidates=[float("inf"), 1.0]), ValueError, "candidates"),
    ("2d-candidates", _with(candidates=[[0.5, 1.0]]), ValueError, "candidates"),
    ("str-candidates", _with(candidates="ab"), TypeError, "candidates"),
    ("bool-candidates", _with(candidates=[True, False]), TypeError, "candidates"),
]  # fmt: skip


@pytest.mark.parametrize("as_numpy", [False, True], ids=["torch", "numpy"])
@pytest.mark.parametrize(("build", "exc", "match"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_candidate_loglik_rejects_bad_input(build, exc, match, as_numpy):
    kw = build()
    if as_numpy:
        kw = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    with pytest.raises(exc, match=match):
        candidate_loglik(**kw)


@pytest.mark.parametrize(
    ("extra", "exc", "match"),
    [
        ({"family": "top_n"}, ValueError, "family"),
        ({"family": 3}, TypeError, "family"),
        ({"family": "min_p", "candidates": [0.0, 1.0]}, ValueError, "candidates"),
        ({"family": "min_p", "candidates": [-0.1, 0.5]}, ValueError, "candidates"),
        ({"family": "min_p", "epsilon": 0.0}, ValueError, "epsilon"),
        ({"family": "min_p", "epsilon": 1.0}, ValueError, "epsilon"),
        ({"family": "min_p", "epsilon": float("nan")}, ValueError, "epsilon"),
        ({"family": "min_p", "epsilon": "0.1"}, TypeError, "epsilon"),
        ({"family": "min_p", "temperature": 0.0}, ValueError, "temperature"),
        ({"family": "min_p", "temperature": -1.0}, ValueError, "temperature"),
        ({"family": "min_p", "temperature": float("inf")}, ValueError, "temperature"),
        ({"family": "min_p", "temperature": None}, TypeError, "temperature"),
        ({"temperature": 0.7}, ValueError, "temperature"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"chunk_size": -3}, ValueError, "chunk_size"),
        ({"chunk_size": 2.5}, TypeError, "chunk_size"),
        ({"chunk_size": True}, TypeError, "chunk_size"),
    ],
)
def test_candidate_loglik_rejects_bad_options(extra, exc, match):
    kw = _good()
    if extra.get("family") == "min_p" and "candidates" not in extra:
        kw["candidates"] = [0.0, 0.2]
    kw.update(extra)
    with pytest.raises(exc, match=match):
        candidate_loglik(**kw)


def test_fused_option_validation_on_cpu():
    kw = _good()
    with pytest.raises(ValueError, match="fused"):
        candidate_loglik(**kw, fused=True)
    with pytest.raises(TypeError, match="fused"):
        candidate_loglik(**kw, fused="yes")
    with pytest.raises(ValueError, match="fused"):
        candidate_loglik(**{k: np.asarray(v) for k, v in kw.items()}, fused=True)
    torch.testing.assert_close(candidate_loglik(**kw, fused=False), candidate_loglik(**kw))


if torch.cuda.is_available():  # defined only where it can run (no skipped tests in CI)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
    def test_cuda_fused_matches_eager_and_reference(dtype):
        logits, tokens, mask = make_batch(n=5, length=12, vocab=1000, seed=11, dtype=dtype)
        temps = [*PAPER_GRID, 0.3, 3.0]
        lg = logits.cuda()[:, 1:]  # non-contiguous view
        tk, mk = tokens.cuda()[:, 1:], mask.cuda()[:, 1:]
        mk[:, 0] = True
        want = ref_temperature(lg.float().cpu(), tk.cpu(), mk.cpu(), temps)
        for chunk_size in (None, 1, 7):
            fused = candidate_loglik(lg, tk, mk, temps, fused=True, chunk_size=chunk_size)
            eager = candidate_loglik(lg, tk, mk, temps, fused=False, chunk_size=chunk_size)
            np.testing.assert_allclose(fused.cpu().double().numpy(), want, rtol=1e-5, atol=2e-5)
            torch.testing.assert_close(fused, eager, rtol=1e-5, atol=2e-5)

    @pytest.mark.parametrize("fused", [True, False])
    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
    def test_cuda_nonfinite_logits_raise(fused, bad):
        kw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _good().items()}
        kw["logits"][1, 2, int(kw["tokens"][1, 2])] = bad  # -inf: only at the sampled token
        with pytest.raises(ValueError, match=r"row 1, position 2"):
            candidate_loglik(**kw, fused=fused)
        kw["logits"][1, 2, 3] = 3e38  # huge but finite: the fused checksum overflows, no error
        assert torch.isfinite(candidate_loglik(**kw, fused=fused)).all()


    @pytest.mark.parametrize("fused", [True, False])
    @pytest.mark.parametrize("family", ["temperature", "min_p"])
    def test_cuda_minus_inf_at_unsampled_tokens_is_probability_zero(fused, family):
        if fused and family == "min_p":
            return  # the fused kernel is temperature-only
        logits, tokens, mask, cands = _banned_batch(vocab=300, family=family)
        want = ref_minus_inf_dropped(logits, tokens, mask, cands, family)
        got = candidate_loglik(logits.cuda(), tokens.cuda(), mask.cuda(), cands, family,
                               fused=fused)
        np.testing.assert_allclose(got.cpu().double().numpy(), want, rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------- -inf logits


def ref_minus_inf_dropped(logits, tokens, mask, cands, family, temperature=1.0, eps=1e-3):
    """Brute force, written independently: at each masked position drop the -inf entries from
    the vocabulary (probability 0) and score the sampled token against the rest."""
    z_all = np.asarray(logits, dtype=np.float64)
    tok_all, msk = np.asarray(tokens), np.asarray(mask).astype(bool)
    out = np.zeros((z_all.shape[0], len(cands)))
    for i in range(z_all.shape[0]):
        for k, c in enumerate(cands):
            vals = []
            for t in np.flatnonzero(msk[i]):
                keep = z_all[i, t] != -np.inf
                z = z_all[i, t][keep]
                o = int(np.count_nonzero(keep[: tok_all[i, t]]))  # index among the kept
                if family == "temperature":
                    x = z / c
                    vals.append(x[o] - x.max() - np.log(np.exp(x - x.max()).sum()))
                else:
                    x = z / temperature
                    p = np.exp(x - x.max())
                    p /= p.sum()
                    kept = p >= c * p.max()
                    q = (1 - eps) * np.where(kept, p, 0.0) / p[kept].sum() + eps * p
                    vals.append(np.log(q[o]))
            out[i, k] = np.mean(vals)
    return out


def _banned_batch(vocab=13, family="temperature", seed=3):
    """A batch with -inf logits (banned entries) everywhere but at the sampled tokens, one
    position where every other entry is -inf, and -inf at unmasked sampled tokens."""
    logits, tokens, mask = make_batch(n=4, length=8, vocab=vocab, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    banned = torch.rand(logits.shape, generator=g) < 0.4
    sampled = torch.nn.functional.one_hot(tokens, vocab).bool()
    logits = logits.masked_fill(banned & ~(sampled & mask.unsqueeze(-1)), float("-inf"))
    i, t = map(int, torch.nonzero(mask)[0])
    logits[i, t] = float("-inf")
    logits[i, t, tokens[i, t]] = 1.5  # the only possible token: log q = 0 for every candidate
    i, t = map(int, torch.nonzero(~mask)[0])
    logits[i, t] = float("-inf")  # not read at all
    cands = [0.3, 0.6, 1.0, 1.7] if family == "temperature" else [0.0, 0.05, 0.3, 0.9]
    return logits, tokens, mask, cands


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
@pytest.mark.parametrize("family", ["temperature", "min_p"])
@pytest.mark.parametrize("as_numpy", [False, True], ids=["torch", "numpy"])
def test_minus_inf_at_unsampled_tokens_is_probability_zero(as_numpy, family, chunk_size, cpu_path):
    logits, tokens, mask, cands = _banned_batch(family=family)
    want = ref_minus_inf_dropped(logits, tokens, mask, cands, family)
    args = (logits, tokens, mask) if not as_numpy else (
        logits.double().numpy(), tokens.numpy(), mask.numpy())
    got = candidate_loglik(*args, cands, family, chunk_size=chunk_size)
    got = got.double().numpy() if isinstance(got, torch.Tensor) else got
    tol = {"rtol": 1e-12, "atol": 1e-12} if as_numpy else {"rtol": 1e-5, "atol": 2e-5}
    np.testing.assert_allclose(got, want, **tol)
    assert np.isfinite(got).all()


@pytest.mark.parametrize("family", ["temperature", "min_p"])
@pytest.mark.parametrize("as_numpy", [False, True], ids=["torch", "numpy"])
@pytest.mark.parametrize(
    ("value", "at_token", "match"),
    [
        (float("-inf"), True, r"logits\[2, 5, \d+\] is -inf at the sampled token"),
        (float("nan"), False, r"logits\[2, 5, \d+\] is nan at a masked position"),
        (float("inf"), False, r"logits\[2, 5, \d+\] is inf at a masked position"),
        (float("nan"), True, r"is nan at a masked position \(row 2, position 5\)"),
    ],
)
def test_bad_logits_name_row_and_position(as_numpy, family, value, at_token, match, cpu_path):
    logits, tokens, mask, cands = _banned_batch(family=family)
    mask[2, 5] = True
    tok = int(tokens[2, 5])
    logits[2, 5, tok if at_token else (tok + 1) % logits.shape[-1]] = value
    args = (logits, tokens, mask) if not as_numpy else (
        logits.double().numpy(), tokens.numpy(), mask.numpy())
    for chunk_size in (None, 1, 4):
        with pytest.raises(ValueError, match=match):
            candidate_loglik(*args, cands, family, chunk_size=chunk_size)


def test_a_position_of_only_minus_inf_is_an_error():
    logits, tokens, mask, cands = _banned_batch()
    mask[1, 3] = True
    logits[1, 3] = float("-inf")
    for args in ((logits, tokens, mask), (logits.numpy(), tokens.numpy(), mask.numpy())):
        with pytest.raises(ValueError, match=r"\(row 1, position 3\)"):
            candidate_loglik(*args, cands)


@pytest.mark.parametrize("family", ["temperature", "min_p"])
def test_huge_finite_logits_stay_finite(family, cpu_path):
    # s * z overflows float32 here (s = 1 / (T ln 2)); z - max does not at the sampled tokens
    logits = torch.tensor([[[3e38, 2.9e38, 0.0], [0.0, 1.0, 2.0], [1e38, -1e38, 5.0]]])
    tokens, mask = torch.tensor([[1, 1, 2]]), torch.tensor([[True, True, True]])
    cands = [0.5, 1.0] if family == "temperature" else [0.0, 0.5]
    out = candidate_loglik(logits, tokens, mask, cands, family)
    want = candidate_loglik(logits.double().numpy(), tokens.numpy(), mask.numpy(), cands, family)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.double().numpy(), want, rtol=1e-5)


def test_nonfinite_logits_at_unmasked_positions_are_not_read(cpu_path):
    kw = _good()
    kw["mask"][0, 0] = False
    kw["logits"][0, 0, 1] = float("nan")
    out = candidate_loglik(**kw)
    assert torch.isfinite(out).all()


def test_default_chunk_size():
    assert default_chunk_size(32768) == 16  # 2 MiB of float32 per CPU worker
    assert default_chunk_size(32768, workers=2) == 32
    assert default_chunk_size(32768, "cuda", workers=8) == 2048
    assert default_chunk_size(10**9) == 1
    assert default_chunk_size(10**9, workers=3) == 3
    with pytest.raises(ValueError, match="workers"):
        default_chunk_size(10, workers=0)
    with pytest.raises(ValueError, match="vocab_size"):
        default_chunk_size(0)
    with pytest.raises(TypeError, match="vocab_size"):
        default_chunk_size(3.0)
    with pytest.raises(TypeError, match="device"):
        default_chunk_size(10, None)


def test_docstring_examples():
    import metactl.knobs
    import metactl.likelihood
    import metactl.likelihood._checks
    import metactl.likelihood._torch_ops

    attempted = 0
    modules = (metactl.likelihood, metactl.likelihood._checks, lk,
               metactl.likelihood._torch_ops, metactl.knobs)  # fmt: skip
    for module in modules:
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0, module.__name__
        attempted += result.attempted
    assert attempted >= 8
