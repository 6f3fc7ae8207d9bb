"""The shortcuts of one select + update step against the plain computations they replace:
``UpdateInfo.probs`` is the validated probabilities of the new state (``policy.probs``), the
store's gather of stored / unseen / mixed keys, the positions of repeated keys."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

import metactl
from metactl.contexts import ContextStore


def _feedback(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    return {
        "loglik": rng.normal(-1.0, 0.3, size=(rows, 10)),
        "advantages": rng.normal(size=rows),
        "rewards": (rng.random(rows) < 0.4).astype(np.float64),
    }


FACTORIES = {
    "tampo": lambda: metactl.tampo(seed=0),
    "ptgs": lambda: metactl.ptgs(seed=0, total_steps=50, max_contexts=6),
    "tampo-per-prompt": lambda: metactl.tampo_per_prompt(seed=0, max_contexts=6),
    "linear-thompson": lambda: metactl.linear_thompson(seed=0, max_contexts=6),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_update_info_probs_are_the_new_states(name: str) -> None:
    policy = FACTORIES[name]()
    rng = np.random.default_rng(1)
    for step in range(6):
        keys = None if not policy.contextual else [step % 4, 9, step % 4, 100 + step]
        decision = policy.select() if keys is None else policy.select(contexts=keys)
        fb = _feedback(rng, 2 * (1 if keys is None else len(keys)))
        info = policy.update(decision, **{k: fb[k] for k in policy.spec.feedback})
        assert np.array_equal(info.probs, policy.probs)
        assert info.probs.dtype == np.float64


def test_gather_paths_equal_the_masked_copy() -> None:
    store = ContextStore({"ema": 3, "updates": 0}, capacity=10)
    rows = {"ema": np.arange(12.0).reshape(4, 3), "updates": np.arange(1.0, 5.0)}
    store.write(["a", "b", 7, 8], np.full(4, -1), rows)
    prior = {"ema": np.full((5, 3), -1.0), "updates": np.zeros(5)}
    for keys in (["a", "b", 7, 8, "a"], ["x", "y", "z", 1, 2], ["a", "x", 8, "y", "b"]):
        slots = store.slots(keys)
        got = store.gather(slots, prior)
        for field, array in store._arrays.items():
            expected = prior[field].copy()
            seen = slots >= 0
            expected[seen] = array[slots[seen]]
            assert np.array_equal(got[field], expected)
            got[field][...] = 99.0  # a new array: neither the store nor the prior changes
        assert np.all(prior["ema"] == -1.0)
    assert np.array_equal(store.gather(store.slots(["a"]), prior)["ema"][0], [0.0, 1.0, 2.0])


def test_repeated_keys_pool_in_order_of_first_occurrence() -> None:
    policy = metactl.tampo_per_prompt(seed=0)
    keys = [5, "b", 5, 3, "b", 5]
    batch = policy.select(contexts=keys)
    rng = np.random.default_rng(0)
    info = policy.update(batch, **{k: v for k, v in _feedback(rng, 12).items()
                                   if k in policy.spec.feedback})  # fmt: skip
    assert info.contexts == 3
    assert policy.state_dict()["contexts"]["keys"] == [5, "b", 3]


class _ReferenceStore:
    """The store's contract written plainly: an OrderedDict of key -> row, least recently
    updated first; a write moves its keys to the end in order, evicting the oldest others."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.rows: OrderedDict[object, float] = OrderedDict()

    def write(self, keys: list[object], values: np.ndarray) -> list[object]:
        new = sum(key not in self.rows for key in keys)
        excess = len(self.rows) + new - self.capacity
        evicted = [key for key in self.rows if key not in set(keys)][: max(excess, 0)]
        for key in evicted:
            del self.rows[key]
        for key, value in zip(keys, values.tolist(), strict=True):
            self.rows.pop(key, None)
            self.rows[key] = value
        return evicted


_POOLS: dict[str, list[object]] = {
    "mixed": [*range(30), *(f"k{i}" for i in range(30))],
    "ints": [*range(-10, 40), -(2**63), 2**63 - 1, 10**12],
    "big ints": [*range(40), 2**63, -(2**63) - 1, 10**30],
}


@pytest.mark.parametrize("pool_name", list(_POOLS))
@pytest.mark.parametrize("capacity", [1, 5, 40])
def test_store_keeps_the_least_recently_updated_order(capacity: int, pool_name: str) -> None:
    rng = np.random.default_rng(capacity)
    store, reference = ContextStore({"x": 0}, capacity), _ReferenceStore(capacity)
    pool = _POOLS[pool_name]
    for step in range(300):
        size = int(rng.integers(1, capacity + 1))
        keys = [pool[i] for i in rng.choice(len(pool), size=size, replace=False)]
        values = rng.normal(size=size)
        expected = reference.write(keys, values)
        evicted = store.write(keys, store.slots(keys), {"x": values})
        assert evicted == expected
        assert store.keys() == list(reference.rows) and len(store) == len(reference.rows)
        assert all(key in store for key in reference.rows)
        assert not any(key in store for key in expected)
        # every key of the pool (and keys never stored) looked up as one batch
        probe = [*pool, "absent", 10**40, -(2**63) + 1]
        slots = store.slots(probe)
        assert [bool(s >= 0) for s in slots] == [key in reference.rows for key in probe]
        assert np.array_equal(store.gather(slots, {"x": np.full(len(probe), np.nan)})["x"],
                              [reference.rows.get(key, np.nan) for key in probe],
                              equal_nan=True)  # fmt: skip
        state = store.to_json()
        assert state["rows"]["x"] == list(reference.rows.values())
        if step % 50 == 49:  # a reloaded store continues alike
            store, _ = ContextStore.from_json(state, {"x": 0}, capacity, "contexts")
            assert store.to_json() == state


def test_gather_cache_serves_copies_until_a_write() -> None:
    store = ContextStore({"ema": 2}, capacity=10)
    store.write([1, 2, 3], np.full(3, -1), {"ema": np.arange(6.0).reshape(3, 2)})
    prior = {"ema": np.zeros((2, 2))}
    slots = store.slots([3, 1])
    first = store.gather(slots, prior)
    first["ema"][...] = -5.0  # the caller's copy: the next gather is unchanged
    again = store.gather(slots.copy(), prior)
    assert again["ema"].tolist() == [[4.0, 5.0], [0.0, 1.0]]
    assert again["ema"] is not first["ema"]
    store.write([1], store.slots([1]), {"ema": np.array([[7.0, 8.0]])})  # clears the cache
    after = store.gather(store.slots([3, 1]), prior)
    assert after["ema"].tolist() == [[4.0, 5.0], [7.0, 8.0]]
    other = store.gather(store.slots([2, 3]), prior)  # other slots: read from the store
    assert other["ema"].tolist() == [[2.0, 3.0], [4.0, 5.0]]


@pytest.mark.parametrize("name", ["tampo_per_prompt", "linear_thompson", "ptgs"])
def test_repeated_keys_reuse_the_selects_lookup(name: str) -> None:
    """An update whose keys repeat reads the distinct keys' slots from select's lookup: the
    same steps and state as an update that looks them up again."""
    kwargs = {"total_steps": 50} if name == "ptgs" else {}
    fast = getattr(metactl, name)(seed=3, max_contexts=6, **kwargs)
    plain = getattr(metactl, name)(seed=3, max_contexts=6, **kwargs)
    rng = np.random.default_rng(3)
    for _ in range(12):
        keys = rng.choice(9, size=5).tolist()  # repeats; some keys evicted and new
        fb = _feedback(rng, 10)
        batches = []
        for policy in (fast, plain):
            batches.append(policy.select(contexts=keys))
        plain._store._looked_up = None  # the plain path: no lookup to reuse
        assert np.array_equal(batches[0].indices, batches[1].indices)
        for policy, batch in zip((fast, plain), batches, strict=True):
            policy.update(batch, **{k: v for k, v in fb.items() if k in policy.spec.feedback})
        assert fast.state_dict() == plain.state_dict()
