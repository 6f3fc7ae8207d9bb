"""Truncated likelihood families (top-p, top-k, temperature under a fixed truncation, joint
grids) against a brute-force per-candidate reference and against HF's own logits warpers."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import metactl.likelihood._torch as lk_torch  # noqa: E402
import metactl.likelihood._torch_nucleus as lk_nucleus  # noqa: E402
import metactl.likelihood._torch_truncation as lk_trunc  # noqa: E402
from metactl.knobs import KnobGrid, check_knob, grid, joint_candidates  # noqa: E402
from metactl.likelihood import candidate_loglik  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
EPS = 1e-3


# ----------------------------------------------------------------------------- reference


def ref_kept(z, temp, top_k, top_p, min_p, order):
    """The kept set of one position, by the set definitions (float64, no sorting)."""
    p = np.exp((z - z.max()) / temp)
    p = p / p.sum()
    vocab = z.size
    everything = np.ones(vocab, dtype=bool)

    def top_k_set():
        if top_k is None:
            return everything
        kth = np.sort(z)[::-1][min(top_k, vocab) - 1]
        return z >= kth  # ties at the k-th logit kept

    def min_p_set():
        return p >= min_p * p.max() if min_p > 0 else everything

    def top_p_set(survivors):
        if top_p >= 1.0:
            return everything
        mass = p[survivors].sum()
        # mass strictly more likely than v, among the survivors
        above = np.array([p[survivors & (z > z[v])].sum() for v in range(vocab)])
        return above < top_p * mass

    if order == "hf":
        kept = top_k_set()
        kept = kept & top_p_set(kept)
        return kept & min_p_set(), p
    kept = top_k_set() & min_p_set()
    return kept & top_p_set(kept), p


def ref_loglik(logits, tokens, mask, settings_list, order="hf", eps=EPS):
    """Masked mean of log q_k(token) for each candidate setting (dicts of knob values)."""
    z_all = np.asarray(torch.as_tensor(logits).double())
    tok = np.asarray(tokens)
    msk = np.asarray(mask).astype(bool)
    n, length, _ = z_all.shape
    out = np.zeros((n, len(settings_list)))
    for k, cfg in enumerate(settings_list):
        temp = cfg.get("temperature", 1.0)
        top_k, top_p, min_p = cfg.get("top_k"), cfg.get("top_p", 1.0), cfg.get("min_p", 0.0)
        for i in range(n):
            vals = []
            for t in range(length):
                if not msk[i, t]:
                    continue
                kept, p = ref_kept(z_all[i, t], temp, top_k, top_p, min_p, order)
                o = tok[i, t]
                if top_k is None and top_p >= 1.0 and min_p == 0.0:
                    vals.append(np.log(p[o]))
                    continue
                trunc = np.where(kept, p, 0.0) / p[kept].sum()
                vals.append(np.log((1 - eps) * trunc[o] + eps * p[o]))
            out[i, k] = np.mean(vals)
    return out


def make_batch(n=3, length=6, vocab=23, scale=3.0, seed=0, dtype=torch.float32, ties=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, length, vocab, generator=g) * scale
    if ties:  # a coarse grid of values: many exact ties, also at truncation boundaries
        logits = (logits * 2).round() / 2
    logits = logits.to(dtype)
    tokens = torch.randint(0, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.bool)
    mask[0, :2] = False
    mask[-1, -1] = False
    return logits, tokens, mask


def settings_for(family, cands, **fixed):
    knob = family
    out = []
    for c in cands:
        cfg = {k: v for k, v in fixed.items() if v is not None}
        cfg[knob] = c
        out.append(cfg)
    return out


CASES = [
    # (family, candidates, fixed knobs)
    ("top_p", [0.3, 0.7, 0.9, 1.0], {"temperature": 0.8}),
    ("top_k", [1, 2, 5, 40], {"temperature": 1.3}),
    ("top_k", [3, 7], {"temperature": 1.0, "top_p": 0.8}),
    ("temperature", [0.5, 0.7, 1.0, 1.4], {"top_p": 0.9}),
    ("temperature", [0.6, 1.2, 2.0], {"top_k": 4}),
    ("temperature", [0.6, 1.2, 2.0], {"min_p": 0.1}),
    ("temperature", [0.6, 0.9, 1.5], {"top_k": 8, "top_p": 0.85, "min_p": 0.05}),
    ("min_p", [0.0, 0.05, 0.3], {"temperature": 0.9, "top_p": 0.9}),
    ("top_p", [0.5, 0.95], {"temperature": 1.1, "top_k": 6, "min_p": 0.2}),
]


def call(logits, tokens, mask, family, cands, fixed, **kw):
    kwargs = dict(fixed)
    if family == "temperature":
        kwargs.pop("temperature", None)
    return candidate_loglik(logits, tokens, mask, cands, family, **kwargs, **kw)


# ----------------------------------------------------------------------------- brute force


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", ["hf", "vllm"])
@pytest.mark.parametrize(("family", "cands", "fixed"), CASES)
def test_families_match_brute_force(device, order, family, cands, fixed):
    logits, tokens, mask = make_batch()
    want = ref_loglik(logits, tokens, mask, settings_for(family, cands, **fixed), order)
    got = call(logits.to(device), tokens.to(device), mask.to(device), family, cands, fixed,
               order=order)  # fmt: skip
    assert got.dtype == torch.float32 and got.shape == (3, len(cands))
    np.testing.assert_allclose(got.cpu().double().numpy(), want, rtol=1e-5, atol=2e-5)
    got_np = call(logits.numpy(), tokens.numpy(), mask.numpy(), family, cands, fixed,
                  order=order)  # fmt: skip
    assert got_np.dtype == np.float64
    np.testing.assert_allclose(got_np, want, rtol=1e-9, atol=1e-9)


def test_orders_differ_only_with_top_p_and_min_p():
    logits, tokens, mask = make_batch(vocab=31, scale=2.0, seed=4)
    temps = [0.7, 1.0, 1.5]
    both = {"top_p": 0.6, "min_p": 0.2}
    hf = candidate_loglik(logits, tokens, mask, temps, **both, order="hf")
    vllm = candidate_loglik(logits, tokens, mask, temps, **both, order="vllm")
    assert not torch.allclose(hf, vllm)  # vLLM's top-p sees the min-p survivors' mass
    for fixed in ({"top_p": 0.6, "top_k": 5}, {"min_p": 0.2, "top_k": 5}):
        torch.testing.assert_close(
            candidate_loglik(logits, tokens, mask, temps, **fixed, order="hf"),
            candidate_loglik(logits, tokens, mask, temps, **fixed, order="vllm"),
        )


def test_matches_hf_logits_warpers():
    """With no ties, the kept sets are exactly those of HF's warpers applied in generate's order
    (temperature, top-k, top-p, min-p), and the score is log((1 - eps) p_trunc + eps p)."""
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits, tokens, mask = make_batch(n=2, length=5, vocab=97, scale=2.5, seed=11)
    mask[:] = True
    temps = [0.6, 0.9, 1.3, 2.0]
    fixed = {"top_k": 30, "top_p": 0.8, "min_p": 0.05}
    got = candidate_loglik(logits, tokens, mask, temps, **fixed).double()
    flat = logits.reshape(-1, 97).double()
    tok = tokens.reshape(-1, 1)
    cols = []
    for temp in temps:
        scores = lp.TemperatureLogitsWarper(temp)(None, flat.clone())
        full = scores.log_softmax(-1)
        warpers = (lp.TopKLogitsWarper(30), lp.TopPLogitsWarper(0.8), lp.MinPLogitsWarper(0.05))
        for warper in warpers:
            scores = warper(None, scores)
        trunc = scores.softmax(-1)
        q = (1 - EPS) * trunc + EPS * full.exp()
        cols.append(q.gather(-1, tok).log().reshape(2, 5).mean(1))
    want = torch.stack(cols, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    # the truncation is real: tokens outside the kept set score about log(eps p)
    plain = candidate_loglik(logits, tokens, mask, temps).double()
    assert (got - plain).abs().max() > 0.5


# ----------------------------------------------------------------------------- ties


def test_top_k_keeps_ties_at_the_kth_logit_like_hf():
    lp = pytest.importorskip("transformers.generation.logits_process")
    z = torch.tensor([[[3.0, 2.0, 2.0, 2.0, 1.0, 0.0]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    for token in range(6):
        tokens = torch.tensor([[token]])
        got = candidate_loglik(z, tokens, mask, [2, 3], "top_k", epsilon=1e-6)
        # HF keeps every logit >= the k-th largest: k = 2 keeps {0, 1, 2, 3}, as does k = 3
        kept = lp.TopKLogitsWarper(2)(None, z[0].clone())[0] > float("-inf")
        assert kept.tolist() == [True, True, True, True, False, False]
        p = z[0, 0].double().softmax(-1)
        trunc = torch.where(kept, p, 0) / p[kept].sum()
        want = ((1 - 1e-6) * trunc + 1e-6 * p)[token].log()
        torch.testing.assert_close(got[0].double(), want.repeat(2), rtol=1e-5, atol=1e-5)


def test_top_p_keeps_a_boundary_tie_whole():
    # p ~ [0.47, 0.17, 0.17, 0.17, ...]: top_p = 0.55 needs one of the tied tokens; the whole
    # tie is kept (HF would keep 1 of the 3, whichever its sort puts first)
    z = torch.tensor([[[2.0, 1.0, 1.0, 1.0, -1.0, -3.0]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    p = z[0, 0].double().softmax(-1)
    assert p[0] < 0.55 < p[0] + p[1]
    kept = torch.tensor([True, True, True, True, False, False])
    for token in range(6):
        got = candidate_loglik(z, torch.tensor([[token]]), mask, [0.55, 1.0], "top_p")
        got_np = candidate_loglik(z.numpy(), np.array([[token]]), mask.numpy(), [0.55, 1.0],
                                  "top_p")  # fmt: skip
        trunc = torch.where(kept, p, 0) / p[kept].sum()
        want = ((1 - EPS) * trunc + EPS * p)[token].log()
        assert float(got[0, 0]) == pytest.approx(float(want), abs=1e-6)
        assert float(got_np[0, 0]) == pytest.approx(float(want), abs=1e-12)
        assert float(got[0, 1]) == pytest.approx(float(p[token].log()), abs=1e-6)
    # the HF kept set is a subset of ours (a strict one here)
    lp = pytest.importorskip("transformers.generation.logits_process")
    hf_kept = lp.TopPLogitsWarper(0.55)(None, z[0].clone())[0] > float("-inf")
    assert bool((hf_kept <= kept).all()) and int(hf_kept.sum()) < 4


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(2, 40),
    ties=st.booleans(),
    temps=st.lists(st.sampled_from([0.4, 0.7, 1.0, 1.3, 2.5]), min_size=2, max_size=3, unique=True),
    top_k=st.one_of(st.none(), st.integers(1, 45)),
    top_p=st.sampled_from([1.0, 0.95, 0.7, 0.35]),
    min_p=st.sampled_from([0.0, 0.02, 0.25]),
    order=st.sampled_from(["hf", "vllm"]),
)
def test_property_temperature_under_truncation_matches_brute_force(
    seed, vocab, ties, temps, top_k, top_p, min_p, order
):
    logits, tokens, mask = make_batch(n=2, length=4, vocab=vocab, seed=seed, ties=ties)
    fixed = {"top_k": top_k, "top_p": top_p, "min_p": min_p}
    cfgs = [{"temperature": t, **fixed} for t in temps]
    want = ref_loglik(logits, tokens, mask, cfgs, order)
    got = candidate_loglik(logits, tokens, mask, temps, **fixed, order=order, chunk_size=3)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=3e-5)
    got_np = candidate_loglik(logits.numpy(), tokens.numpy(), mask.numpy(), temps, **fixed,
                              order=order)  # fmt: skip
    np.testing.assert_allclose(got_np, want, rtol=1e-9, atol=1e-9)
    assert np.all(got_np <= 0) and np.all(np.isfinite(got_np))


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    temps=st.lists(st.sampled_from([0.5, 1.0, 1.7]), min_size=1, max_size=2, unique=True),
    top_ps=st.lists(st.sampled_from([0.3, 0.8, 0.99, 1.0]), min_size=1, max_size=3, unique=True),
    top_ks=st.lists(st.sampled_from([1, 3, 100]), min_size=1, max_size=2, unique=True),
)
def test_property_joint_grids_match_brute_force(seed, temps, top_ps, top_ks):
    if len(temps) * len(top_ps) * len(top_ks) < 2:
        top_ps = [*top_ps, 0.5] if 0.5 not in top_ps else top_ps
    logits, tokens, mask = make_batch(n=2, length=3, vocab=17, seed=seed, ties=seed % 2 == 0)
    g = grid(temperature=temps, top_p=top_ps, top_k=top_ks)
    want = ref_loglik(logits, tokens, mask, list(g))
    got = candidate_loglik(logits, tokens, mask, g)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=3e-5)
    got_np = candidate_loglik(logits.numpy(), tokens.numpy(), mask.numpy(), list(g), "joint")
    np.testing.assert_allclose(got_np, want, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- window, chunks


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("first_window", [1, 2, 256, None])
def test_window_growth_and_chunking_do_not_change_results(monkeypatch, first_window, ties):
    # a flat distribution: the nucleus needs most of the vocabulary, past small windows
    logits, tokens, mask = make_batch(n=2, length=7, vocab=300, scale=0.3, seed=2, ties=ties)
    logits[0, 3, :50] = 1.0  # a 50-way tie at the top
    if first_window is not None:  # start too small: the window must grow until sets fit
        monkeypatch.setattr(lk_trunc, "_window_size", lambda *args: first_window)
    g = grid(temperature=[0.8, 1.2], top_p=[0.5, 0.97], top_k=[60, 300])
    cases = [(g, list(g), "hf")]
    for order in ("hf", "vllm"):
        cfgs = [{"temperature": t, "top_p": 0.9, "min_p": 0.3} for t in (0.8, 1.2)]
        cases.append((grid(temperature=[0.8, 1.2], top_p=[0.9], min_p=[0.3]), cfgs, order))
    for cands, cfgs, order in cases:
        want = ref_loglik(logits, tokens, mask, cfgs, order)
        for chunk_size in (None, 1, 4):
            got = candidate_loglik(logits, tokens, mask, cands, order=order,
                                   chunk_size=chunk_size)
            np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=3e-5)


def test_window_holds_every_top_k_kept_set(monkeypatch):
    """The top-k window (k + 1 logits) holds every top-k kept set, also with top-p and min-p
    on the survivors, without widening on distinct logits; it is far smaller than V."""
    logits, tokens, mask = make_batch(n=2, length=5, vocab=2000, scale=4.0, seed=3)
    sizes = []
    real = lk_trunc._window_size

    def recording(*args):
        sizes.append(real(*args))
        return sizes[-1]

    monkeypatch.setattr(lk_trunc, "_window_size", recording)
    real_topk = torch.topk
    widths = []

    def topk(x, k, *args, **kwargs):
        widths.append(k)
        return real_topk(x, k, *args, **kwargs)

    monkeypatch.setattr(torch, "topk", topk)
    g = grid(temperature=[0.7, 1.5], top_p=[0.3, 0.9], min_p=[0.0, 0.05], top_k=[20, 60])
    for order in ("hf", "vllm"):
        sizes.clear()
        widths.clear()
        got = candidate_loglik(logits, tokens, mask, g, order=order)
        np.testing.assert_allclose(
            got.double().numpy(), ref_loglik(logits, tokens, mask, list(g), order),
            rtol=1e-5, atol=3e-5,
        )  # fmt: skip
        assert sizes and set(sizes) == {61} and set(widths) == {61}  # never widened


def test_nucleus_candidates_need_no_torch_sort_or_topk(monkeypatch):
    """Top-p without top-k reads its kept sets off one NumPy sort per position (CPU): no
    torch.sort or torch.topk, whose cost on a large vocabulary is many exp passes."""
    logits, tokens, mask = make_batch(n=2, length=5, vocab=2000, scale=1.0, seed=3)

    def forbidden(*args, **kwargs):
        raise AssertionError("the nucleus path must not call torch.sort / torch.topk")

    monkeypatch.setattr(torch, "sort", forbidden)
    monkeypatch.setattr(torch, "topk", forbidden)
    g = grid(temperature=[0.7, 1.4], top_p=[0.3, 0.9, 1.0], min_p=[0.0, 0.05])
    for order in ("hf", "vllm"):
        got = candidate_loglik(logits, tokens, mask, g, order=order)
        want = candidate_loglik(logits.numpy(), tokens.numpy(), mask.numpy(), list(g), "joint",
                                order=order)  # fmt: skip
        np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=3e-5)


@pytest.mark.parametrize("block", [1, 2, 3, 16, 4096])
def test_nucleus_blocks_do_not_change_results(monkeypatch, block):
    """Any block size (1, not a power of two, or larger than V) gives the same kept sets,
    including a tie longer than a block that straddles a block edge and the boundary."""
    monkeypatch.setattr(lk_nucleus, "_block_size", lambda vocab: block)
    logits, tokens, mask = make_batch(n=2, length=7, vocab=300, scale=0.3, seed=2, ties=True)
    logits[0, 3, :50] = 1.0  # a 50-way tie at the top: top_p = 0.5 cuts through it
    logits[1, 2, 7:200] = 0.25  # a 193-way tie in the middle
    cases = [
        (grid(temperature=[0.6, 1.2], top_p=[0.5, 0.97]), "hf"),  # 0.6 = 1.2 / 2: squared
        (grid(temperature=[0.8, 1.2], top_p=[0.9], min_p=[0.0, 0.3]), "hf"),
        (grid(temperature=[0.8, 1.2], top_p=[0.9], min_p=[0.0, 0.3]), "vllm"),
    ]
    for cands, order in cases:
        want = ref_loglik(logits, tokens, mask, list(cands), order)
        for chunk_size in (None, 1, 4):
            got = candidate_loglik(logits, tokens, mask, cands, order=order,
                                   chunk_size=chunk_size)  # fmt: skip
            np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=3e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("vocab", [4096, 3001])
def test_nucleus_on_a_large_vocabulary_matches_numpy(dtype, vocab):
    """Vocabularies with many blocks (V = 3001 leaves a partial last block): temperatures
    under top-p (with a halving chain), the top-p family, min-p on top, both orders, ties,
    -inf logits and 16-bit input, against the float64 NumPy backend (itself checked against
    the brute force above)."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, 12, vocab, generator=g) * 3
    logits[2] = (logits[2] * 2).round() / 2  # coarse grid: ties everywhere
    logits[0, 3, :200] = logits[0, 3].max() + 1  # a 200-way tie at the top
    logits[1, :, 5:50] = float("-inf")
    logits = logits.to(dtype)
    tokens = torch.randint(0, vocab, (3, 12), generator=g)
    tokens[1] = torch.where((tokens[1] >= 5) & (tokens[1] < 50), 0, tokens[1])
    tokens[0, 4] = int(logits[0, 4].float().argmax())  # the top token
    mask = torch.ones(3, 12, dtype=torch.bool)
    ref = logits.double().numpy()
    cases = [
        ([0.6, 0.7, 1.2, 1.4, 2.0], "temperature", {"top_p": 0.9}),
        ([0.3, 0.5, 0.9, 0.99, 1.0], "top_p", {"temperature": 1.1}),
        ([0.6, 1.2], "temperature", {"top_p": 0.8, "min_p": 0.05}),
    ]
    for cands, family, fixed in cases:
        for order in ("hf", "vllm"):
            got = candidate_loglik(logits, tokens, mask, cands, family, **fixed, order=order)
            want = candidate_loglik(ref, tokens.numpy(), mask.numpy(), cands, family, **fixed,
                                    order=order)  # fmt: skip
            assert got.dtype == torch.float32
            np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("workers", [1, 3])
def test_cpu_workers_give_the_same_result(monkeypatch, workers):
    logits, tokens, mask = make_batch(n=5, length=9, vocab=41, seed=8)
    monkeypatch.setattr(lk_torch, "_cpu_workers", lambda _torch: workers)
    got = candidate_loglik(logits, tokens, mask, [0.6, 1.0, 1.4], top_p=0.9, top_k=20,
                           chunk_size=4)  # fmt: skip
    want = ref_loglik(logits, tokens, mask,
                      [{"temperature": t, "top_p": 0.9, "top_k": 20} for t in (0.6, 1.0, 1.4)])
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("as_numpy", [False, True])
def test_minus_inf_logits_are_probability_zero(as_numpy):
    logits, tokens, mask = make_batch(vocab=19, seed=6)
    banned = torch.zeros_like(logits, dtype=torch.bool)
    banned[..., 5:9] = True
    banned[0, 3, :] = True
    banned[0, 3, 0] = False  # a position with a single allowed token
    tokens = torch.where(banned.gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
                         torch.zeros_like(tokens), tokens)  # fmt: skip
    logits = logits.masked_fill(banned, float("-inf"))
    g = grid(temperature=[0.7, 1.3], top_p=[0.6, 1.0], top_k=[3, 50])
    want = ref_loglik(logits, tokens, mask, list(g))
    assert np.all(np.isfinite(want))
    args = (logits, tokens, mask)
    if as_numpy:
        args = tuple(a.numpy() for a in args)
    got = np.asarray(candidate_loglik(*args, g), dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    bad = logits.clone()
    bad[1, 2, int(tokens[1, 2])] = float("-inf")
    with pytest.raises(ValueError, match=r"logits\[1, 2, .*-inf at the sampled token"):
        candidate_loglik(bad, tokens, mask, g)
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        candidate_loglik(bad, tokens, mask, [0.5, 0.9], "top_p")


def test_bf16_logits_are_scored_in_float32():
    logits, tokens, mask = make_batch(vocab=29, seed=9, dtype=torch.bfloat16)
    # bf16 rounding creates ties; the reference sees the same bf16 values (as float64)
    for family, cands, fixed in CASES:
        want = ref_loglik(logits.float(), tokens, mask, settings_for(family, cands, **fixed))
        got = call(logits, tokens, mask, family, cands, fixed)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=3e-5)


def test_no_truncation_equals_plain_temperature():
    logits, tokens, mask = make_batch(seed=10)
    temps = [0.5, 1.0, 2.0]
    plain = candidate_loglik(logits, tokens, mask, temps)
    off = candidate_loglik(logits, tokens, mask, grid(temperature=temps, top_p=[1.0], top_k=[99]))
    torch.testing.assert_close(off, plain, rtol=1e-6, atol=1e-6)
    # top_p = 1 among the top-p candidates is the untruncated distribution, exactly
    tp = candidate_loglik(logits, tokens, mask, [0.5, 1.0], "top_p", temperature=2.0)
    torch.testing.assert_close(tp[:, 1], plain[:, 2], rtol=1e-6, atol=1e-6)


def test_does_not_modify_inputs():
    logits, tokens, mask = make_batch(seed=12)
    before = logits.clone()
    candidate_loglik(logits, tokens, mask, grid(temperature=[0.5, 1.0], top_p=[0.5, 0.9]))
    candidate_loglik(logits, tokens, mask, [2, 5], "top_k")
    assert torch.equal(logits, before)


# ----------------------------------------------------------------------------- validation


def _kw():
    logits, tokens, mask = make_batch()
    return {"logits": logits, "tokens": tokens, "mask": mask}


@pytest.mark.parametrize(
    ("extra", "exc", "match"),
    [
        ({"candidates": [0.0, 0.5], "family": "top_p"}, ValueError, r"candidates.*\(0, 1\]"),
        ({"candidates": [0.5, 1.5], "family": "top_p"}, ValueError, r"candidates.*\(0, 1\]"),
        ({"candidates": [0, 5], "family": "top_k"}, ValueError, r"candidates\[0\].*>= 1"),
        ({"candidates": [2.5, 5], "family": "top_k"}, TypeError, r"candidates\[0\].*integer"),
        ({"candidates": [True, 5], "family": "top_k"}, TypeError, r"candidates\[0\]"),
        ({"candidates": [3, 3], "family": "top_k"}, ValueError, "duplicate"),
        ({"candidates": [3], "family": "top_k"}, ValueError, "at least 2"),
        ({"candidates": [0.5, 1.0], "top_p": 0.0}, ValueError, r"top_p.*\(0, 1\]"),
        ({"candidates": [0.5, 1.0], "top_p": 1.2}, ValueError, r"top_p.*\(0, 1\]"),
        ({"candidates": [0.5, 1.0], "top_p": float("nan")}, ValueError, "top_p"),
        ({"candidates": [0.5, 1.0], "top_k": 0}, ValueError, "top_k"),
        ({"candidates": [0.5, 1.0], "top_k": -1}, ValueError, "top_k"),
        ({"candidates": [0.5, 1.0], "top_k": 2.0}, TypeError, "top_k"),
        ({"candidates": [0.5, 1.0], "min_p": 1.0}, ValueError, "min_p"),
        ({"candidates": [0.5, 1.0], "order": "sglang"}, ValueError, "order"),
        ({"candidates": [0.5, 0.9], "family": "top_p", "top_p": 0.9}, ValueError, "top_p=0.9"),
        ({"candidates": [2, 5], "family": "top_k", "top_k": 5}, ValueError, "top_k=5"),
        ({"candidates": [{"temperature": 0.5}, {"temperature": 1.0}], "family": "temperature"},
         ValueError, "family"),
        ({"candidates": [{"temperature": 0.5}, {"top_p": 0.9}]}, ValueError, "mixed grid"),
        ({"candidates": [0.5, {"top_p": 0.9}]}, TypeError, r"candidates\[0\].*mix"),
        ({"candidates": [{"temp": 0.5}, {"temp": 1.0}]}, ValueError, "unknown knob 'temp'"),
        ({"candidates": [{"top_p": 0.5}, {"top_p": 1.5}]}, ValueError, r"candidates\[1\]"),
        ({"candidates": [{"top_p": 0.5}, {"top_p": 0.5}]}, ValueError, "duplicate"),
        ({"candidates": grid(temperature=[0.5, 1.0]), "temperature": 0.7}, ValueError,
         "temperature=0.7 conflicts"),
        ({"candidates": grid(top_p=[0.5, 1.0]), "top_p": 0.7}, ValueError, "top_p=0.7"),
    ],
)
def test_rejects_bad_knobs(extra, exc, match):
    kw = _kw()
    kw.update(extra)
    with pytest.raises(exc, match=match):
        candidate_loglik(**kw)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({}, ValueError, "at least one knob"),
        ({"tempreature": [0.5, 1.0]}, ValueError, "unknown knob 'tempreature'"),
        ({"top_p": [0.0, 0.5]}, ValueError, r"top_p\[0\].*\(0, 1\]"),
        ({"top_p": [0.5, 1.01]}, ValueError, r"top_p\[1\]"),
        ({"top_k": [0, 4]}, ValueError, r"top_k\[0\].*>= 1"),
        ({"top_k": [1.5, 4]}, TypeError, r"top_k\[0\]"),
        ({"temperature": [0.0, 1.0]}, ValueError, r"temperature\[0\].*> 0"),
        ({"min_p": [0.1, 1.0]}, ValueError, r"min_p\[1\].*\[0, 1\)"),
        ({"temperature": 0.7, "top_p": [0.5, 1.0]}, TypeError, "temperature must be a sequence"),
        ({"temperature": "0.7"}, TypeError, "temperature"),
        ({"temperature": [0.7, 0.7]}, ValueError, "duplicate"),
        ({"temperature": []}, ValueError, "temperature needs at least 1"),
        ({"temperature": [0.7]}, ValueError, "at least 2 candidates"),
        ({"temperature": [[0.7, 1.0]]}, TypeError, r"temperature\[0\]"),
    ],
)
def test_grid_rejects_bad_knobs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        grid(**kwargs)


def test_grid_layout_and_state_round_trip():
    g = grid(temperature=[0.6, 1.0, 1.4], top_p=[0.9, 1.0], top_k=[50])
    assert len(g) == 6 and g.knobs == ("temperature", "top_p", "top_k")
    assert g[0] == {"temperature": 0.6, "top_p": 0.9, "top_k": 50}
    assert g[-1] == {"temperature": 1.4, "top_p": 1.0, "top_k": 50}
    assert type(g[0]["top_k"]) is int and type(g[0]["top_p"]) is float
    assert g.labels()[1] == "temperature=0.6,top_p=1,top_k=50"
    state = json.loads(json.dumps(g.to_state()))
    assert KnobGrid.from_state(state) == g
    assert joint_candidates(list(g)) == g
    with pytest.raises(ValueError, match="version"):
        KnobGrid.from_state({**state, "version": 99})
    with pytest.raises(ValueError, match=r"candidates\[2\]\['top_p'\]"):
        KnobGrid.from_state({**state, "candidates": [[0.6, 0.9, 50], [1.0, 0.9, 50],
                                                     [1.0, 2.0, 50]]})  # fmt: skip
    with pytest.raises(IndexError):
        g[6]
    with pytest.raises(TypeError):
        g["temperature"]
    np.testing.assert_array_equal(g.column("top_p"), [0.9, 1.0] * 3)
    with pytest.raises(ValueError):
        g.column("top_p")[0] = 0.5  # read-only


def test_check_knob():
    assert check_knob("temperature", np.float32(0.5)) == 0.5
    assert check_knob("top_k", np.int64(3)) == 3
    with pytest.raises(TypeError, match="top_k must be an integer"):
        check_knob("top_k", 3.0)
    with pytest.raises(TypeError, match="bool"):
        check_knob("top_p", True)
    with pytest.raises(ValueError, match="unknown knob"):
        check_knob("top_a", 0.5)
