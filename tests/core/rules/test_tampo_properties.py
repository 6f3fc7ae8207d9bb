"""Properties of the TAMPO update over generated inputs (hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from metactl import EXP3, TAMPO, EntropyTarget, Hedge, MetaGradient, MetaPolicy, Nucleus, sparsemax

K = 5
CANDIDATES = [0.6, 0.8, 1.0, 1.2, 1.4]
loglik_values = st.floats(-8.0, 0.0, allow_nan=False, allow_infinity=False)
advantage_values = st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False)


@st.composite
def batches(draw, min_n: int = 1, max_n: int = 12):
    n = draw(st.integers(min_n, max_n))
    loglik = draw(arrays(np.float64, (n, K), elements=loglik_values))
    advantages = draw(arrays(np.float64, (n,), elements=advantage_values))
    return loglik, advantages


def _policy(normalizer: str = "sparsemax", alpha: float = 0.05) -> MetaPolicy:
    return MetaPolicy(CANDIDATES, TAMPO(alpha=alpha, normalizer=normalizer), Nucleus(0.7), seed=0)


def _minmax_tolerance(policy: MetaPolicy, atol: float) -> float:
    """``atol`` widened by what min-max normalisation does to the EMA's rounding: it divides by
    the EMA's spread, so an error of about eps * |ema| reaches the probabilities amplified by
    |ema| / spread (huge when the EMA entries differ only in their last digits)."""
    ema = np.asarray(policy.state_dict()["rule_state"]["ema"])
    spread = float(np.ptp(ema))
    amplification = float(np.abs(ema).max()) / spread if spread > 0 else 0.0
    return atol + 1e3 * float(np.finfo(np.float64).eps) * amplification


def _run(policy: MetaPolicy, history) -> np.ndarray:
    for loglik, advantages in history:
        policy.update(policy.select(), loglik=loglik, advantages=advantages)
    return policy.probs


@given(
    history=st.lists(batches(), min_size=1, max_size=6),
    normalizer=st.sampled_from(["sparsemax", "softmax"]),
)
@settings(max_examples=150, deadline=None)
def test_probabilities_are_a_distribution(history, normalizer: str) -> None:
    probs = _run(_policy(normalizer), history)
    assert np.all(probs >= 0)
    assert abs(probs.sum() - 1.0) < 1e-12


@given(
    history=st.lists(batches(), min_size=1, max_size=5),
    shifts=arrays(np.float64, (12,), elements=st.floats(-50.0, 50.0)),
    normalizer=st.sampled_from(["sparsemax", "softmax"]),
)
@settings(max_examples=150, deadline=None)
def test_shifting_a_trajectorys_logliks_changes_nothing(history, shifts, normalizer) -> None:
    shifted = [(ll + shifts[: ll.shape[0], None], adv) for ll, adv in history]
    a, b = _policy(normalizer), _policy(normalizer)
    _run(a, history)
    _run(b, shifted)
    np.testing.assert_allclose(
        a.state_dict()["rule_state"]["ema"],
        b.state_dict()["rule_state"]["ema"],
        rtol=1e-9,
        atol=1e-12,
    )
    np.testing.assert_allclose(a.probs, b.probs, atol=_minmax_tolerance(a, 1e-7))


@given(
    history=st.lists(batches(), min_size=0, max_size=4),
    batch=batches(),
    k=st.integers(0, K - 1),
    boost=st.floats(0.01, 5.0),
)
@settings(max_examples=200, deadline=None)
def test_positive_evidence_for_a_candidate_never_lowers_its_probability(history, batch, k, boost):
    """Add positive advantage to a trajectory whose likelihood favours candidate k alone (its
    sparsemax weights are one-hot on k): pi_k after the update never drops below what the same
    update gives without that extra advantage."""
    loglik, advantages = batch
    favouring = np.full(K, -10.0)
    favouring[k] = -1.0  # 9 nats above the rest: sparsemax puts all weight on k
    assert sparsemax(favouring)[k] == 1.0
    loglik = np.vstack([loglik, favouring])
    base, more = _policy(), _policy()
    _run(base, history)
    _run(more, history)
    p_base = _run(base, [(loglik, np.append(advantages, 0.0))])[k]
    p_more = _run(more, [(loglik, np.append(advantages, boost))])[k]
    assert p_more >= p_base - 1e-12


@given(history=st.lists(batches(), min_size=1, max_size=5), k=st.integers(0, K - 1))
@settings(max_examples=150, deadline=None)
def test_a_candidate_credited_only_by_positive_trajectories_gets_nonnegative_signal(history, k):
    """If every trajectory that gives candidate k weight has a positive advantage, the batch's
    signal a_k is >= 0 and k is never the unique worst candidate of a batch with negative
    evidence for another candidate."""
    for loglik, advantages in history:
        weights = sparsemax(loglik, axis=1)
        credits_k = weights[:, k] > 0
        advantages = np.where(credits_k, np.abs(advantages) + 0.1, advantages)
        policy = _policy(alpha=1.0)
        info = policy.update(policy.select(), loglik=loglik, advantages=advantages)
        signal = info.candidate_advantages
        assert signal is not None and signal[k] >= 0
        if signal.min() < 0:
            assert info.probs[k] > 0


@given(history=st.lists(batches(), min_size=1, max_size=4))
@settings(max_examples=100, deadline=None)
def test_all_zero_advantages_leave_probabilities_unchanged(history) -> None:
    policy = _policy()
    before = _run(policy, history)
    tolerance = _minmax_tolerance(policy, 1e-12)  # the EMA decays by (1 - alpha), rounded
    loglik = history[0][0]
    after = _run(policy, [(loglik, np.zeros(loglik.shape[0]))])
    np.testing.assert_allclose(after, before, rtol=1e-9, atol=tolerance)


@given(
    history=st.lists(batches(), min_size=1, max_size=6),
    seed=st.integers(0, 2**31),
    cut=st.integers(0, 5),
)
@settings(max_examples=60, deadline=None)
def test_state_round_trip_is_bit_identical(history, seed: int, cut: int) -> None:
    import json

    original = MetaPolicy(CANDIDATES, TAMPO(), seed=seed)
    _run(original, history[:cut])
    copy = MetaPolicy.from_state_dict(json.loads(json.dumps(original.state_dict())))
    for loglik, advantages in history[cut:] + history:
        d1, d2 = original.select(), copy.select()
        assert (d1.index, d1.value, d1.prob) == (d2.index, d2.value, d2.prob)
        original.update(d1, loglik=loglik, advantages=advantages)
        copy.update(d2, loglik=loglik, advantages=advantages)
        assert np.array_equal(original.probs, copy.probs)


@given(
    history=st.lists(batches(min_n=2), min_size=1, max_size=5),
    zero_rows=st.lists(st.booleans(), min_size=12, max_size=12),
    filler=loglik_values,
    rule=st.sampled_from(
        [
            TAMPO(),
            TAMPO(normalizer="softmax"),
            Hedge(),
            MetaGradient(),
            MetaGradient(estimator="sampled"),
        ]
    ),
)
@settings(max_examples=150, deadline=None)
def test_zero_advantage_rows_likelihoods_are_ignored_exactly(history, zero_rows, filler, rule):
    # what lets a trainer skip scoring rows with A = 0 (rules that declare it): their
    # likelihoods may be anything finite and the state stays bit-identical
    assert rule.zero_advantage_rows_ignored
    zeroed, filled = [], []
    for ll, adv in history:
        adv = np.where(zero_rows[: adv.shape[0]], 0.0, adv)
        zeroed.append((ll, adv))
        filled.append((np.where((adv == 0)[:, None], filler, ll), adv))
    a = MetaPolicy(CANDIDATES, rule, seed=3)
    b = MetaPolicy(CANDIDATES, rule, seed=3)
    for (ll_a, adv_a), (ll_b, adv_b) in zip(zeroed, filled, strict=True):
        da, db = a.select(), b.select()
        assert da.index == db.index
        a.update(da, loglik=ll_a, advantages=adv_a)
        b.update(db, loglik=ll_b, advantages=adv_b)
    assert a.state_dict() == b.state_dict()


def test_rules_that_need_every_row_do_not_claim_to_ignore_any() -> None:
    assert not EntropyTarget(target_entropy=1.0).zero_advantage_rows_ignored
    assert not EXP3().zero_advantage_rows_ignored
