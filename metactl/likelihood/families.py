"""Sampling families: which distribution each candidate samples from, and its exact math.

Every candidate ``k`` is a full sampler setting ``(T_k, top_k_k, top_p_k, min_p_k)``; a
*family* says which of these the candidates vary (the others are held at fixed values):

* ``"temperature"``: the candidates are temperatures; ``top_k``, ``top_p``, ``min_p`` fixed;
* ``"min_p"`` / ``"top_p"`` / ``"top_k"``: the candidates are that knob's values, at a fixed
  temperature (and the other truncations fixed);
* ``"joint"``: the candidates are mappings of knob values (:func:`metactl.knobs.grid`).

Order of operations (the sampler's own). HF ``generate`` (transformers 5.x,
``_get_logits_processor``) applies temperature, then top-k, then top-p, then min-p; each
truncation renormalises what is left, so top-p's cumulative mass is that of the top-k
survivors. vLLM's v1 sampler applies temperature, then min-p (an "argmax-invariant logits
processor"), then top-k and top-p (``apply_top_k_top_p``: top-k, then top-p on the top-k
survivors). Top-k and min-p commute with each other (a rank and a ratio to the maximum), so the
two orders differ only when top-p and min-p are both active: vLLM's top-p then measures mass
among the min-p survivors. ``order="hf"`` (default) or ``order="vllm"`` selects one.

Kept sets (every one a prefix of the tokens sorted by logit, ties kept together; the code that
counts them is :mod:`metactl.knobs`', which also exports the distribution itself):

* top-k: tokens whose logit is ``>=`` the ``k``-th largest logit, ties at the boundary kept,
  exactly as HF's ``TopKLogitsWarper`` and vLLM (``scores < kth`` is removed); ``k >= V`` keeps
  everything (HF clips ``k`` to ``V``).
* top-p: token ``v`` is kept when the probability mass of the tokens strictly more likely than
  ``v`` (among the survivors of the previous truncations) is ``< top_p`` times that survivors'
  mass. The most likely token is always kept. HF and vLLM sort and remove the tokens whose
  ascending cumulative probability is ``<= 1 - top_p``; that is the same set when no tie
  straddles the boundary. When tokens tie *at* the boundary, HF/vLLM keep a prefix of the tie
  in their sort's (unspecified) order; here the whole tie is kept (a superset of theirs, and
  independent of sort order).
* min-p: ``p_v >= min_p * max(p)`` (HF ``MinPLogitsWarper``, vLLM), evaluated on
  ``p_v / max(p) = exp((z_v - max z) / T)`` in float32 (torch) or float64 (NumPy).

The membership tests are evaluated in floating point: a token whose cumulative mass or
probability ratio ties the threshold to rounding may fall on either side, as in the samplers.

Smoothing: a sampled token outside the kept set has probability 0 under the truncated
distribution (log-likelihood ``-inf``), so each truncated candidate is scored under
``q = (1 - epsilon) * p_trunc + epsilon * p`` with ``p = softmax(z / T)`` and ``p_trunc`` the
renormalised restriction of ``p`` to the kept set (as the ``min_p`` family always did). A
candidate with no active truncation is scored under ``p`` itself, exactly.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._validation import candidate_values
from ..knobs import (
    KNOB_OFF,
    KNOBS,
    ORDERS,
    KnobGrid,
    SettingRows,
    _check_order,
    _kept_count_numpy,
    _smoothed_numpy,
    _sort_rows,
    _sorted_mass,
    check_knob,
    joint_candidates,
    knob_values,
)

__all__ = ["FAMILIES", "ORDERS", "CandidateSpec", "build_spec", "numpy_logq"]

#: Sampling families understood by :func:`metactl.likelihood.candidate_loglik`: each knob of
#: :data:`metactl.knobs.KNOBS` (its candidates are that knob's values) and ``"joint"``.
FAMILIES: tuple[str, ...] = ("temperature", "min_p", "top_p", "top_k", "joint")


@dataclass(frozen=True, eq=False)
class CandidateSpec(SettingRows):
    """Every candidate's full sampler setting (a :class:`metactl.knobs.SettingRows` of ``K``
    rows, ``top_k = 0`` off), the family that varies them and the order of the truncations."""

    family: str
    order: str

    @property
    def size(self) -> int:
        return len(self)

    def is_pure(self, family: str) -> bool:
        """True when only ``family``'s own knob varies and no other truncation is active
        (the cases with dedicated fast paths: plain temperature, plain min-p)."""
        if self.family != family:
            return False
        if family == "temperature":
            return not bool(self.truncated.any())
        if family == "min_p":
            return bool(np.all(self.top_k == 0) and np.all(self.top_p == 1.0))
        return False


def _fixed(knob: str, value: object) -> Any:
    """A fixed (non-candidate) knob value; ``None`` for top_k means off."""
    if knob == "top_k" and value is None:
        return 0
    return check_knob(knob, value, knob)


# Specs of recent successful calls, by spec_key (oldest first); a spec is immutable (read-only
# arrays), so one object serves every call with the same arguments. Failures are never cached.
_SPEC_CACHE: OrderedDict[tuple[Any, ...], CandidateSpec] = OrderedDict()
_SPEC_CACHE_SIZE = 32
# Scalar argument types whose value (with the type) determines their validation exactly.
_PLAIN_SCALARS = (float, int, bool, str, type(None))


def _scalar_key(value: object) -> tuple[Any, ...] | None:
    """``(type, value)`` of a plain scalar (a float by its bits: -0.0 is not 0.0), else None."""
    if type(value) not in _PLAIN_SCALARS:
        return None
    return (type(value), value.hex() if isinstance(value, float) else value)


def _candidates_key(candidates: object) -> tuple[Any, ...] | None:
    """An exact, hashable copy of the candidates when they are a 1-D float64 or int64 array or
    a list / tuple of plain floats or of plain ints (their types and bits), else None (not
    cached: grids, mappings, tensors, mixed lists)."""
    if isinstance(candidates, np.ndarray):
        if candidates.ndim != 1 or candidates.dtype not in (np.float64, np.int64):
            return None
        return ("ndarray", candidates.dtype.str, candidates.tobytes())
    if not isinstance(candidates, (list, tuple)) or not candidates:
        return None
    kind = type(candidates[0])
    if kind not in (float, int) or any(type(c) is not kind for c in candidates):
        return None
    values = tuple(candidates) if kind is int else np.array(candidates).tobytes()
    return (type(candidates), kind, values)


def spec_key(candidates: object, family: object, **knobs: object) -> tuple[Any, ...] | None:
    """The cache key of :func:`build_spec`'s arguments: equal keys mean equal arguments (types
    and bits), so equal validation and an equal spec; None when they are not all of the plain
    immutable-valued kinds that :func:`build_spec` caches (``to_numpy`` is keyed as itself)."""
    key = [_candidates_key(candidates), _scalar_key(family)]
    key += [_scalar_key(knobs[name]) for name in sorted(knobs) if name != "to_numpy"]
    if any(part is None for part in key):
        return None
    return (*key, knobs.get("to_numpy"))


def build_spec(
    candidates: object,
    family: str | None,
    *,
    temperature: object,
    top_p: object,
    top_k: object,
    min_p: object,
    order: object,
    to_numpy: Any,
) -> CandidateSpec:
    """Validate the candidates and the fixed knobs; returns every candidate's setting.

    Arguments of plain kinds (a float64/int64 array or a list of floats or ints as candidates,
    scalars for the rest) are validated once: the spec of a recent call with the same
    arguments (equal types and bits, see :func:`spec_key`) is returned as it is."""
    knobs = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
             "order": order, "to_numpy": to_numpy}  # fmt: skip
    key = spec_key(candidates, family, **knobs)
    if key is None:  # arguments of other kinds: validated on every call
        return _build_spec(candidates, family, **knobs)
    spec = _SPEC_CACHE.get(key)
    if spec is not None:
        _SPEC_CACHE.move_to_end(key)
        return spec
    spec = _SPEC_CACHE[key] = _build_spec(candidates, family, **knobs)
    if len(_SPEC_CACHE) > _SPEC_CACHE_SIZE:
        _SPEC_CACHE.popitem(last=False)
    return spec


def _build_spec(
    candidates: object,
    family: str | None,
    *,
    temperature: object,
    top_p: object,
    top_k: object,
    min_p: object,
    order: object,
    to_numpy: Any,
) -> CandidateSpec:
    """:func:`build_spec` without the cache."""
    order = _check_order(order)
    is_joint = isinstance(candidates, KnobGrid) or (
        isinstance(candidates, (list, tuple))
        and any(isinstance(c, dict) or hasattr(c, "keys") for c in candidates)
    )
    if family is None:
        family = "joint" if is_joint else "temperature"
    if not isinstance(family, str):
        raise TypeError(f"family must be a str, one of {FAMILIES}, got {type(family).__name__}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if is_joint and family != "joint":
        raise ValueError(f"candidates are knob mappings (a joint grid), so family must be "
                         f"'joint' or None, got family={family!r}")  # fmt: skip

    given = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p}
    fixed = {knob: _fixed(knob, given[knob]) for knob in KNOBS}
    off = {knob: _fixed(knob, KNOB_OFF[knob]) for knob in KNOBS}

    if family == "joint":
        cand_grid = joint_candidates(candidates)
        varied = cand_grid.knobs
        k = len(cand_grid)
        columns = {knob: cand_grid.column(knob) for knob in varied}
    else:
        knob = family  # a one-knob family is named after its knob
        varied = (knob,)
        if knob == "top_k":
            # the raw values, so that a bool or a float among ints is seen as such
            values = knob_values("top_k", candidates, "candidates", minimum=2)
        else:
            values = candidate_values(to_numpy(candidates, "candidates"), knob)
        k = values.size
        columns = {knob: values}
    for knob in varied:
        if fixed[knob] != off[knob]:
            default = None if knob == "top_k" else off[knob]
            raise ValueError(
                f"{knob}={fixed[knob]!r} conflicts with the candidates, which set {knob} "
                f"themselves (family={family!r}); leave {knob} at its default ({default!r})"
            )
    arrays = {}
    for knob in KNOBS:
        if knob in columns:
            arrays[knob] = np.asarray(columns[knob], dtype=np.int64 if knob == "top_k" else None)
        else:
            arrays[knob] = np.full(k, fixed[knob], dtype=np.int64 if knob == "top_k" else None)
    return CandidateSpec(
        family=family,
        temperature=arrays["temperature"].astype(np.float64),
        top_k=arrays["top_k"].astype(np.int64),
        top_p=arrays["top_p"].astype(np.float64),
        min_p=arrays["min_p"].astype(np.float64),
        order=order,
    )


def temperature_groups(spec: CandidateSpec) -> list[tuple[float, list[int]]]:
    """Candidates grouped by temperature (first-appearance order): one ``exp`` pass each."""
    groups: dict[float, list[int]] = {}
    for j, t in enumerate(spec.temperature.tolist()):
        groups.setdefault(t, []).append(j)
    return list(groups.items())


def numpy_logq(
    z: np.ndarray, toks: np.ndarray, spec: CandidateSpec, eps: float
) -> np.ndarray:
    """``(c, K)`` float64 ``log q_k(toks | z)`` for a chunk of logit rows ``z`` (``(c, V)``,
    finite except ``-inf`` off the sampled token), every candidate of ``spec``: the kept sets
    of :mod:`metactl.knobs` (one sort shared by every candidate, one ``exp`` pass per
    temperature)."""
    c = z.shape[0]
    rows = np.arange(c)
    m = z.max(axis=1, keepdims=True)
    u = z - m  # <= 0, max exactly 0
    u_o = u[rows, toks]
    z_o = z[rows, toks]
    truncated = spec.truncated
    if truncated.any():
        # descending by logit; the order does not depend on T (T > 0)
        order, zs, first = _sort_rows(z)
    out = np.empty((c, spec.size))
    for temp, members in temperature_groups(spec):
        e = np.exp(u / temp)  # p / p_max
        total = np.maximum(e.sum(axis=1), 1.0)
        logp_o = u_o / temp - np.log(total)
        if not truncated[members].any():
            out[:, members] = logp_o[:, None]
            continue
        ws, cum, above = _sorted_mass(e, order, first)
        for j in members:
            if not truncated[j]:
                out[:, j] = logp_o
                continue
            n = _kept_count_numpy(zs, ws, cum, above, spec.top_k[j], spec.top_p[j],
                                  spec.min_p[j], spec.order)  # fmt: skip
            kept_o = z_o >= zs[rows, n - 1]
            frac = np.minimum(cum[rows, n - 1] / total, 1.0)
            out[:, j] = _smoothed_numpy(logp_o, kept_o, frac, eps)
    return out
