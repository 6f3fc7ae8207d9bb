"""Batched sampling with a KV cache and temperature-scaled token log-probabilities.

These are the only places where the temperature touches the model's logits: `sample` draws
tokens from ``softmax(logits / T)`` (``T = 0`` means greedy), truncated as a
`metactl.knobs.Setting` says (`metactl.knobs.truncated_probs`), `token_logprobs` scores tokens with
``log_softmax(logits / T)`` and `token_entropy` measures ``softmax(logits / T)``. The trainer
passes the same ``T`` to all of them, which is what makes a batch's sampling and scoring
temperatures equal. ``T`` is a float (one temperature for every row) or a 1-D tensor of one
temperature per row (a temperature per prompt group: row ``i`` is sampled, scored and measured
at ``T[i]``); a float takes exactly the code path it always took.

Example:
    >>> import torch
    >>> from metactl.adapters.reference.model import TinyModelConfig, build_model
    >>> from metactl.adapters.char_tokenizer import build_char_tokenizer
    >>> tok = build_char_tokenizer("0123456789+=")
    >>> model = build_model(TinyModelConfig(), tok, seed=0)
    >>> enc = tok(["1+2=", "3+4="], return_tensors="pt")
    >>> out = sample(model, enc.input_ids, enc.attention_mask, temperature=1.0,
    ...              max_new_tokens=3, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
    ...              generator=torch.Generator().manual_seed(0))
    >>> out.tokens.shape, out.mask.shape
    (torch.Size([2, 3]), torch.Size([2, 3]))
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

from metactl.knobs import Setting, check_knob, truncated_probs

Temperature = float | torch.Tensor
"""A float for every row, or a (N,) tensor: row ``i`` at ``T[i]``."""

LogitObserver = Callable[[int, torch.Tensor], None]
"""``observer(t, logits)``: decoding step ``t`` and its raw float32 logits (N, V)."""


def check_row_temperatures(temperature: torch.Tensor, n: int, name: str = "temperature") -> None:
    """A per-row temperature: a 1-D floating tensor of ``n`` finite values > 0, each a
    temperature `metactl.knobs.check_knob` accepts."""
    if temperature.ndim != 1 or temperature.shape[0] != n:
        raise ValueError(f"{name} must be a float or a 1-D tensor of one value per row ({n}), "
                         f"got shape {tuple(temperature.shape)}")
    if not temperature.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {temperature.dtype}")
    for i, value in enumerate(temperature.detach().cpu().tolist()):
        try:
            check_knob("temperature", value, f"{name}[{i}]")
        except ValueError as exc:
            raise ValueError(f"{name} must hold finite values > 0 (one per row): {exc}") from exc


def _divide(logits: torch.Tensor, temperature: Temperature) -> torch.Tensor:
    """``logits`` (N, ...) float32 divided by the float, or row ``i`` by ``temperature[i]``."""
    if isinstance(temperature, torch.Tensor):
        shape = (-1,) + (1,) * (logits.ndim - 1)
        return logits.float() / temperature.to(device=logits.device,
                                               dtype=torch.float32).reshape(shape)
    return logits.float() / temperature


@dataclass(frozen=True)
class Completions:
    """Sampled completions: ``tokens`` (N, C) padded with ``pad_id`` after EOS, ``mask`` (N, C)
    1 for generated tokens up to and including EOS; ``entropy`` (N, C) float32, only when
    `sample` is asked for it (``return_entropy=True``): the entropy (nats) of the sampling
    distribution ``softmax(logits / T)`` (before any truncation) at every masked position,
    0 at the others."""

    tokens: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor | None = None


def _cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument of ``model.forward`` (``cache`` in transformers >= 5.2x,
    ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _get_cache(output: object, cache_name: str) -> object:
    return getattr(output, cache_name)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    temperature: Temperature,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    top_p: float = 1.0,
    truncation: Setting | None = None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    return_entropy: bool = False,
    on_logits: LogitObserver | None = None,
) -> Completions:
    """Sample up to ``max_new_tokens`` tokens per row from ``softmax(logits / temperature)``.

    ``prompt_ids``/``prompt_mask`` are left-padded (N, P). ``temperature=0`` decodes greedily.
    ``temperature`` may be a (N,) tensor of values > 0: row ``i`` is sampled (and its entropy
    measured) at ``temperature[i]``; a float keeps the one-temperature path unchanged.
    Positions are counted from each row's first real token, so left padding does not shift them.
    Sampling uses ``generator`` (on the model's device) so runs are reproducible.

    ``return_entropy=True`` also returns the token entropy at ``temperature`` of every sampled
    position (`Completions.entropy`), from the logits the loop already has: the same values as
    `token_entropy` on a scoring forward of the completions, without that forward (the entropy
    controllers' feedback). The draws do not change (the sampling probabilities are computed
    exactly as without it). Needs ``temperature > 0``.

    ``truncation`` (a `metactl.knobs.Setting`; its top-k, top-p and min-p apply, the
    temperature is ``temperature``): draw from the truncated distribution
    `metactl.knobs.truncated_probs` (HF's order, ties at a boundary kept whole: what
    `metactl.likelihood` scores, so the trainer scores exactly what was sampled); it needs
    ``temperature > 0``. ``top_p`` is the same nucleus for callers without a setting
    (evaluation); not both. No truncation on takes exactly the untruncated path.
    """
    per_row = isinstance(temperature, torch.Tensor)
    n = prompt_ids.shape[0]
    if per_row:
        check_row_temperatures(temperature, n)  # type: ignore[arg-type]
        temperature = temperature.to(device=prompt_ids.device,  # type: ignore[union-attr]
                                     dtype=torch.float32)
    elif isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a finite float or a tensor, got {temperature!r}")
    elif temperature != 0:  # 0 is greedy decoding
        try:
            temperature = float(check_knob("temperature", temperature))
        except ValueError as exc:
            raise ValueError(f"temperature must be a finite float >= 0 (0: greedy) or a "
                             f"tensor: {exc}") from exc
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    if on_logits is not None and not callable(on_logits):
        raise TypeError(f"on_logits must be a function (t, logits) or None, got {on_logits!r}")
    if return_entropy and not per_row and temperature == 0:
        raise ValueError("return_entropy needs temperature > 0 (greedy decoding has no "
                         "sampling distribution)")
    top_p = float(check_knob("top_p", top_p))
    if truncation is not None and not isinstance(truncation, Setting):
        raise TypeError(f"truncation must be a metactl.knobs.Setting, got {truncation!r}")
    cut = Setting() if truncation is None else truncation
    if cut.truncated and top_p != 1.0:
        raise ValueError(f"pass the nucleus in truncation (top_p={cut.top_p}), not also "
                         f"top_p={top_p}")
    if cut.truncated and not per_row and temperature == 0:
        raise ValueError("truncation needs temperature > 0 (greedy decoding has no "
                         "sampling distribution to truncate)")
    cut = cut.with_values({"top_p": top_p}) if top_p != 1.0 else cut
    # the distribution every step draws from (unless greedy): the setting at the temperature
    dist = None if not per_row and temperature == 0 else cut.at_temperature(temperature)
    device = prompt_ids.device
    cache_name = _cache_kwarg(model)
    attn = prompt_mask.long()
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    # Without left padding the mask and positions are the defaults: passing None lets the model
    # take its plain causal path (no mask building at every decoding step).
    unpadded = bool(prompt_mask.all())
    ctx = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else torch.autocast(device.type, enabled=False)
    )
    with ctx:
        out = model(input_ids=prompt_ids, attention_mask=None if unpadded else attn,
                    position_ids=None if unpadded else pos, use_cache=True, logits_to_keep=1)
    cache = _get_cache(out, cache_name)
    logits = out.logits[:, -1].float()
    done = torch.zeros(n, dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    entropies: list[torch.Tensor] = []
    next_pos = pos[:, -1:] + 1
    for t in range(max_new_tokens):
        if on_logits is not None:
            on_logits(t, logits)
        if return_entropy:
            entropies.append(token_entropy(logits, temperature))
        if dist is None:
            nxt = logits.argmax(-1)
        else:
            probs = truncated_probs(logits, dist)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt)
        done = done | (nxt == eos_id)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        with ctx:
            if unpadded:
                out = model(input_ids=nxt[:, None], use_cache=True, logits_to_keep=1,
                            **{cache_name: cache})
            else:
                attn = torch.cat([attn, torch.ones(n, 1, dtype=attn.dtype, device=device)], 1)
                out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=next_pos,
                            use_cache=True, logits_to_keep=1, **{cache_name: cache})
        cache = _get_cache(out, cache_name)
        logits = out.logits[:, -1].float()
        next_pos = next_pos + 1
    toks = torch.stack(tokens, dim=1)
    # mask: generated tokens up to and including the first EOS
    is_eos = toks == eos_id
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    mask = ~after_eos
    entropy = torch.stack(entropies, dim=1) * mask if return_entropy else None
    return Completions(tokens=toks, mask=mask, entropy=entropy)


def completion_logits(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """Raw (un-tempered) logits (N, C, V) at the positions that predict each completion token.

    One forward over ``prompt + completion``; only the last ``C + 1`` positions go through the LM
    head. Row ``i``, column ``t`` scores ``completion_ids[i, t]``. When no prompt is padded the
    mask is dropped: the model is causal, so padding *after* a completion's EOS cannot change the
    logits of the tokens before it (those after are masked out of every loss).
    """
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    c = completion_ids.shape[1]
    if bool(prompt_mask.all()):
        out = model(input_ids=ids, use_cache=False, logits_to_keep=c + 1)
        return out.logits[:, -(c + 1):-1]
    attn = torch.cat([prompt_mask.long(), completion_mask.long()], dim=1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
                logits_to_keep=c + 1)
    return out.logits[:, -(c + 1):-1]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                   temperature: Temperature) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` gathered at ``tokens``: (N, C) float32;
    ``temperature`` a float > 0 or a (N,) tensor (row ``i`` at ``temperature[i]``).

    Example:
        >>> z = torch.tensor([[[2.0, 0.0]]]); toks = torch.tensor([[0]])
        >>> lp = token_logprobs(z, toks, 2.0)
        >>> float(lp[0, 0]) == float(torch.log_softmax(z / 2, -1)[0, 0, 0])
        True
    """
    if isinstance(temperature, torch.Tensor):
        check_row_temperatures(temperature, logits.shape[0])
    else:
        check_knob("temperature", temperature)
    logp = torch.log_softmax(_divide(logits, temperature), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor, temperature: Temperature) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits / temperature)`` at every position: (N, C) (or (N,)
    for (N, V) logits); ``temperature`` a float or a (N,) tensor (row ``i`` at
    ``temperature[i]``)."""
    if isinstance(temperature, torch.Tensor):
        check_row_temperatures(temperature, logits.shape[0])
    logp = torch.log_softmax(_divide(logits, temperature), dim=-1)
    return -(logp.exp() * logp).sum(-1)
