"""The cache of validated candidate settings in ``candidate_loglik`` (``build_spec``): a cached
spec equals the uncached one, input that changes (in place or in type) is validated again, and
rejected input is rejected on every call."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from metactl.likelihood import _to_numpy, candidate_loglik, families
from metactl.likelihood.families import _build_spec, build_spec, spec_key

DEFAULTS: dict[str, Any] = {
    "temperature": 1.0, "top_p": 1.0, "top_k": None, "min_p": 0.0, "order": "hf",
    "to_numpy": _to_numpy,
}  # fmt: skip


def _same(a: families.CandidateSpec, b: families.CandidateSpec) -> bool:
    return (a.family, a.order) == (b.family, b.order) and all(
        np.array_equal(getattr(a, k), getattr(b, k))
        and getattr(a, k).dtype == getattr(b, k).dtype
        and np.array_equal(np.signbit(getattr(a, k)), np.signbit(getattr(b, k)))
        for k in ("temperature", "top_p", "top_k", "min_p")
    )


def _outcome(call: Any) -> Any:
    try:
        return call()
    except (TypeError, ValueError) as exc:
        return (type(exc), str(exc))


CASES: list[tuple[Any, str | None, dict[str, Any]]] = [
    (np.linspace(0.6, 1.5, 10), None, {}),
    ([0.7, 1.0, 1.3], "temperature", {"top_p": 0.9}),
    ((0.7, 1.0, 1.3), "temperature", {"top_k": 20, "min_p": 0.05}),
    ([0.0, 0.05, 0.1], "min_p", {"temperature": 0.8}),
    ([5, 10, 50], "top_k", {}),
    (np.array([5, 10, 50]), "top_k", {"order": "vllm"}),
    ([0.5, 0.9, 1.0], "top_p", {"temperature": 1.2}),
]


@pytest.mark.parametrize(("candidates", "family", "knobs"), CASES)
def test_cached_spec_equals_uncached(candidates: Any, family: str | None,
                                     knobs: dict[str, Any]) -> None:  # fmt: skip
    families._SPEC_CACHE.clear()
    kwargs = {**DEFAULTS, **knobs}
    assert spec_key(candidates, family, **kwargs) is not None
    uncached = _build_spec(candidates, family, **kwargs)
    first = build_spec(candidates, family, **kwargs)
    again = build_spec(candidates, family, **kwargs)
    assert again is first  # served from the cache
    assert _same(first, uncached)
    assert not first.temperature.flags.writeable  # nobody can change a cached spec


def test_changed_candidates_are_validated_again() -> None:
    families._SPEC_CACHE.clear()
    cands = np.linspace(0.6, 1.5, 10)
    first = build_spec(cands, None, **DEFAULTS)
    cands[3] = 2.5  # in place: another key, another spec
    second = build_spec(cands, None, **DEFAULTS)
    assert second.temperature[3] == 2.5 and first.temperature[3] != 2.5
    cands[3] = cands[4]  # duplicate candidates: rejected, as without the cache
    with pytest.raises(ValueError):
        build_spec(cands, None, **DEFAULTS)
    with pytest.raises(ValueError):
        build_spec(cands, None, **DEFAULTS)


@pytest.mark.parametrize(
    ("candidates", "family", "knobs"),
    [
        ([0.7, 1.0, 1.0], None, {}),  # duplicates
        ([0.7, 1.0, 1.3], None, {"temperature": True}),  # a bool, equal to the cached 1
        ([0.7, 1.0, 1.3], None, {"top_k": 2.0}),
        ([0.7, 1.0, 1.3], "top_p", {}),
        ([True, 5], "top_k", {}),
        ([5, 10], "top_k", {"min_p": -0.0}),
        ([0.7, 1.0, 1.3], None, {"order": "other"}),
        ([-0.0, 0.5], "min_p", {}),
    ],
)
def test_every_call_validates_like_the_uncached_path(candidates: Any, family: str | None,
                                                     knobs: dict[str, Any]) -> None:  # fmt: skip
    families._SPEC_CACHE.clear()
    build_spec([0.7, 1.0, 1.3], None, **DEFAULTS)  # a neighbour in the cache
    build_spec([5, 10], "top_k", **DEFAULTS)
    kwargs = {**DEFAULTS, **knobs}
    expected = _outcome(lambda: _build_spec(candidates, family, **kwargs))
    for _ in range(2):
        got = _outcome(lambda: build_spec(candidates, family, **kwargs))
        if isinstance(expected, tuple):
            assert got == expected
        else:
            assert _same(got, expected)


def test_keys_tell_types_and_signed_zeros_apart() -> None:
    base = spec_key([0.5, 1.0], None, **DEFAULTS)
    assert spec_key([0.5, 1.0], None, **{**DEFAULTS, "temperature": 1}) != base
    assert spec_key([0.5, 1.0], None, **{**DEFAULTS, "temperature": True}) != base
    assert spec_key((0.5, 1.0), None, **DEFAULTS) != base
    assert spec_key(np.array([0.5, 1.0]), None, **DEFAULTS) != base
    assert spec_key([0.0, 1.0], "min_p", **DEFAULTS) != spec_key([-0.0, 1.0], "min_p", **DEFAULTS)
    assert spec_key([0.5, 1.0], None, **{**DEFAULTS, "min_p": -0.0}) != base
    # not cached: mixed lists, other dtypes, 2-D arrays, numpy scalars
    assert spec_key([0.5, 1], None, **DEFAULTS) is None
    assert spec_key(np.array([0.5, 1.0], dtype=np.float32), None, **DEFAULTS) is None
    assert spec_key(np.ones((2, 2)), None, **DEFAULTS) is None
    assert spec_key([0.5, 1.0], None, **{**DEFAULTS, "top_p": np.float64(0.9)}) is None


def test_cache_is_bounded_and_scores_alike() -> None:
    families._SPEC_CACHE.clear()
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 7))
    tokens = rng.integers(0, 7, size=(3, 4))
    mask = np.ones((3, 4), dtype=bool)
    expected = candidate_loglik(logits, tokens, mask, [0.7, 1.0, 1.3])
    for i in range(2 * families._SPEC_CACHE_SIZE):
        candidate_loglik(logits, tokens, mask, [0.5, 1.0 + i / 64])
    assert len(families._SPEC_CACHE) == families._SPEC_CACHE_SIZE
    again = candidate_loglik(logits, tokens, mask, [0.7, 1.0, 1.3])
    assert np.array_equal(again, expected)
