"""A lean GRPO trainer for any Hugging Face causal LM, with the rollout temperature (or any
sampling knob: top-p, top-k, min-p, a joint grid) chosen each step by a `metactl.MetaPolicy`
(TAMPO, a fixed value, a schedule, a bandit, ...).

What a policy needs is read from ``policy.spec`` (`metactl.FeedbackSpec`) and checked at
construction against what the trainer gives (`trainer_support`, `metactl.check_trainer`): a
rule it cannot feed, a knob it cannot sample, a per-prompt policy over anything but the
temperature or one that needs context features is refused before any state is built.

One GRPO step, top to bottom (`GRPOTrainer.step`):

1. Draw ``prompts_per_step`` prompts; ``decision = policy.select()``; ``T = decision.value``: one
   temperature for the whole step.
2. Sample ``group_size`` completions per prompt at ``T`` (own loop with a KV cache,
   `rollout.sample`), then check the temperature the tokens actually came from
   (`check_temperature`: `metactl.effective_temperature` on the loop's own logits of a
   deterministic subsample of positions, `temperature_check`; no extra forward): a sampler
   that ignored the chosen setting stops the run before anything trains on its tokens
   (`GRPOConfig`'s ``temperature_check="error"``, the default; ``"warn"`` warns, ``"off"``
   skips).
3. Rewards from the verifier; group-normalised advantages ``(r - mean_g) / (std_g + eps)``.
4. ``ppo_epochs`` optimisation passes over the batch, each one optimizer step accumulated over
   ``grad_accum_steps`` micro-batches. Every log-prob (current, old, reference) is
   ``log_softmax(logits / T)``. The old log-probs are the detached log-probs of the first pass
   (the batch is on-policy there, so the ratio is exactly 1), and the same first-pass logits give
   the candidate likelihoods ``L`` (N, K) via `metactl.likelihood.candidate_loglik`: the meta step
   costs no extra forward pass and no extra rollout. ``L`` is computed only when
   ``"loglik" in policy.spec.feedback``, length-normalised or summed per completion as
   ``policy.spec.loglik`` says. The token entropy at ``T`` (entropy controllers) comes from the
   sampling loop itself (`rollout.sample` with ``return_entropy``), not from a scoring pass.
5. ``policy.update(decision, feedback)``: the `metactl.Feedback` that `metactl.build_feedback`
   makes of ``L``, the advantages ``A``, the mean reward, each completion's reward, the group
   size, the entropy and the vocabulary size, each only when the rule needs it
   (`GRPOTrainer.feedback`).
6. Log the step (temperature and the effective temperature with its z, LR, reward, loss, KL,
   clip fraction, meta-policy probs); evaluate, checkpoint (model, optimizer, scheduler,
   meta-policy, every RNG, history) every few steps.
   A trainer built on a run directory that holds a checkpoint resumes from it and ends exactly
   where an uninterrupted run would.

**Any sampling knob.** A policy over ``top_p``, ``top_k``, ``min_p`` or a joint grid
(``metactl.grid(temperature=..., top_p=...)``) sets those knobs each step; the others stay at
the config's (`GRPOConfig.sampler_setting`: ``rollout_temperature``, ``rollout_top_p``, ...).
The rollout draws from that setting's truncated distribution, and every log-prob of the batch
(old, current, reference: the loss's importance ratio) is that distribution's, smoothed as
`metactl.likelihood` defines it (`metactl.knobs.log_probs`; why, and the bound on the
difference, in `metactl.knobs`); the candidate likelihoods are ``candidate_loglik(...,
policy.candidates, policy.family, <the other knobs at the step's values>)``. A temperature
policy with no truncation configured takes exactly the plain path above. The log records each
knob besides the temperature that is set (``top_p``, ...). A policy over no sampler knob
(``"generic"``), or a per-prompt policy over anything but the temperature, is refused at
construction.

**A temperature per prompt group.** With a per-prompt policy (``policy.spec.per_context``:
`metactl.PTGS`, `metactl.ContextualTAMPO`, `metactl.LinearThompson` with ``feature_dim=0``;
see `metactl.contexts`) the step selects ``batch = policy.select(contexts=keys)`` with one
stable key per prompt (``item.context``: a pool index or a bucket such as the chain length, or
the ``contexts`` function given to the trainer). Both kinds of decision become one sampler
setting per prompt group through `metactl.group_settings` (`GRPOTrainer.row_setting`). Prompt
``i``'s ``group_size`` rows are sampled in the KV-cache loop at ``batch.values[i]`` (a per-row
temperature tensor), and every log-prob of those rows (old, current, reference) and the
sampling loop's entropy use that same row temperature; the candidate likelihoods ``L`` are over
the candidate grid, independent of the sampling temperature. ``policy.update(batch, feedback)``
then gets every row in decision order. A global decision samples the whole batch at one float
temperature, exactly the path above.

Example:
    >>> import metactl
    >>> from metactl.adapters.reference.tasks import ChainTask, chain_reward
    >>> from metactl.adapters.reference.model import TinyModelConfig, build_model
    >>> from metactl.adapters.char_tokenizer import build_char_tokenizer
    >>> from metactl.adapters.reference.tasks import ALPHABET
    >>> task = ChainTask(max_len=2, benchmark_lengths=(1, 2))
    >>> tok = build_char_tokenizer(ALPHABET)
    >>> model = build_model(TinyModelConfig(hidden_size=32, num_layers=1), tok, seed=0)
    >>> cfg = GRPOConfig(steps=2, prompts_per_step=2, group_size=2, max_new_tokens=6,
    ...                  checkpoint_every=0, eval_every=0)
    >>> trainer = GRPOTrainer(model, tok, cfg, metactl.tampo(seed=0),
    ...                       prompts=lambda rng, n: task.sample(rng, n), reward_fn=chain_reward)
    >>> history = trainer.train(progress_bar=False)
    >>> [round(h["temperature"], 1) > 0 for h in history]
    [True, True]
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch

import metactl
from metactl.decision import Decision, DecisionBatch, group_settings
from metactl.effective_temperature import (
    EffectiveTemperatureWarning,
    TemperatureEstimate,
    check_effective_temperature,
)
from metactl.feedback import (
    FEEDBACK_NAMES,
    Feedback,
    FeedbackSpec,
    TrainerSupport,
    build_feedback,
    check_trainer,
)
from metactl.knobs import KNOBS, Setting, log_probs

from ..integrity import (
    HASH_FIELD,
    TORCH_PICKLE_PROTOCOL,
    CorruptFileError,
    atomic_write,
    plain_tree,
    read_torch_checked,
    tree_sha256,
)
from .config import GRPOConfig
from .loss import cosine_with_floor, group_advantages, policy_loss
from .rollout import Completions, completion_logits, sample, token_logprobs
from .temperature_check import LogitSubsample, estimate

__all__ = ["CHECKPOINT_ADVICE", "GRPOConfig", "GRPOTrainer", "cosine_with_floor",
           "group_advantages", "policy_loss", "read_checkpoint",
           "trainer_support"]


class PromptItem(Protocol):
    """Anything with a ``prompt`` text and a reference ``answer`` (e.g. `tasks.Problem`)."""

    prompt: str
    answer: str


PromptSource = Callable[[np.random.Generator, int], Sequence[PromptItem]]
"""``prompts(rng, n)``; a source with ``state_dict()``/``load_state_dict()`` (e.g.
`tasks.PromptPool`, which cycles) has that state saved in the checkpoints and restored."""
ContextFn = Callable[[Any], "int | str"]
RewardFn = Callable[[str, str], float]
Evaluator = Callable[[torch.nn.Module, int], dict]


def trainer_support(per_context: bool) -> TrainerSupport:
    """What `GRPOTrainer` gives a rule (`metactl.TrainerSupport`, checked by
    `metactl.check_trainer` when the trainer is built).

    Every feedback (the candidate log-likelihoods, length-normalised or summed, the GRPO
    advantages, every completion's reward, the batch reward, the sampling loop's entropy, the
    vocabulary size, the group size) and no context features. A global policy may set any
    sampler knob; per-prompt decisions set the temperature only: the KV-cache loop samples each
    row at its own temperature, while the truncation is one for the whole batch.

    Example:
        >>> trainer_support(per_context=True).knobs
        ('temperature',)
    """
    if per_context:
        return TrainerSupport("GRPOTrainer with a per-prompt policy", feedback=FEEDBACK_NAMES,
                              knobs=("temperature",), per_context=True, features=False)
    return TrainerSupport("GRPOTrainer", feedback=FEEDBACK_NAMES, knobs=KNOBS, per_context=True,
                          features=False)


# ----------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------
class GRPOTrainer:
    """GRPO on a causal LM with a meta-policy choosing each step's rollout temperature.

    Args:
        model: a Hugging Face causal LM (``AutoModelForCausalLM``); trained in place.
        tokenizer: its tokenizer (left padding is enforced for prompts).
        config: `GRPOConfig`.
        policy: a `metactl.MetaPolicy` over temperatures, ``top_p``, ``top_k``, ``min_p`` or
            a joint grid (the knobs it does not set stay at the config's values).
        prompts: ``prompts(rng, n)`` returns ``n`` items with ``.prompt`` and ``.answer``.
        reward_fn: ``reward_fn(completion_text, answer) -> float``.
        ref_model: frozen reference model for the KL term (required when ``kl_beta > 0``).
        evaluator: ``evaluator(model, step) -> dict`` run every ``eval_every`` steps and at the end.
        run_dir: where checkpoints go; a checkpoint found there is resumed.
        contexts: for a per-prompt policy, ``contexts(item) -> key`` (a stable ``int`` or
            ``str`` per prompt); default: the item's ``context`` attribute (`tasks.Problem`:
            its pool index, or its chain length when the pool is infinite).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        config: GRPOConfig,
        policy: Any,
        *,
        prompts: PromptSource,
        reward_fn: RewardFn,
        ref_model: torch.nn.Module | None = None,
        evaluator: Evaluator | None = None,
        run_dir: str | os.PathLike | None = None,
        contexts: ContextFn | None = None,
    ) -> None:
        # what the policy needs against what this trainer gives (the feedback, the knobs, per
        # prompt decisions over the temperature only, no features): refused here, before any
        # state is built
        if not isinstance(policy, metactl.MetaPolicy):
            raise TypeError(f"policy must be a metactl.MetaPolicy, got {type(policy).__name__}")
        spec = policy.spec
        check_trainer(policy, trainer_support(spec.per_context))
        if contexts is not None and not callable(contexts):
            raise TypeError(f"contexts must be a function item -> key, got {contexts!r}")
        if config.kl_beta > 0 and ref_model is None:
            raise ValueError("ref_model is required when config.kl_beta > 0")
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("tokenizer needs pad_token_id and eos_token_id")
        self.cfg = config
        self.device = torch.device(config.device)
        self.model = model.to(self.device)
        self.ref_model = ref_model.to(self.device).eval() if ref_model is not None else None
        if self.ref_model is not None:
            self.ref_model.requires_grad_(False)
        if config.gradient_checkpointing:
            # recompute activations in the backward pass (long completions); sampling runs in
            # eval mode, where checkpointing is off and the KV cache works as usual
            lm = cast(Any, model)  # transformers >= 5.2x renamed the method
            if hasattr(lm, "activation_checkpointing_enable"):
                lm.activation_checkpointing_enable()
            else:
                lm.gradient_checkpointing_enable()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.tokenizer.truncation_side = "left"
        self.policy = policy
        self.spec: FeedbackSpec = spec
        self.context_fn = contexts
        self.prompts = prompts
        self.reward_fn = reward_fn
        self.evaluator = evaluator
        self.run_dir = Path(run_dir) if run_dir is not None else None
        knobs = spec.knobs
        self.knobs = knobs
        self.family = policy.family
        # the plain temperature path (log_softmax(z / T), the candidates scored untruncated),
        # exactly as before knobs existed; any truncation, or a policy over another knob,
        # takes the truncated path (metactl.knobs.log_probs, candidate_loglik with the family)
        self.plain_temperature = (knobs == ("temperature",)
                                  and not config.sampler_setting.truncated)
        # numbers for the signal diagnostics: the candidate values of a one-knob policy, the
        # candidate indices of a joint grid (its candidates are knob mappings)
        self.candidates = (np.asarray(policy.candidates, dtype=float) if len(knobs) == 1
                           else np.arange(len(policy.candidates), dtype=float))
        self.vocab_size = int(cast(Any, model).get_output_embeddings().weight.shape[0])

        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, betas=config.adam_betas,
            weight_decay=config.weight_decay,
        )
        total, warm = config.optimizer_steps, round(config.warmup_ratio * config.optimizer_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_with_floor(s, total, warm, config.lr_floor_ratio)
        )
        self.rng = np.random.default_rng(config.seed)  # prompts
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)  # sampling
        self.step_idx = 0
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.diagnostics: list[dict] = []
        if self.run_dir is not None and self.checkpoint_path.exists():
            self.load_checkpoint()

    # -- helpers ----------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def encode_prompts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and mask on the trainer's device (left-truncated if
        ``max_prompt_len`` is set)."""
        kw: dict[str, Any] = {}
        if self.cfg.max_prompt_len:
            kw = {"truncation": True, "max_length": self.cfg.max_prompt_len}
        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True,
                             add_special_tokens=self.cfg.add_special_tokens, **kw)
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    def rollout(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                temperature: float | torch.Tensor, *,
                truncation: Setting | None = None,
                return_entropy: bool = False,
                keep_logits: LogitSubsample | None = None) -> Completions:
        """Sample one completion per prompt row at ``temperature`` under ``truncation``'s top-k,
        top-p and min-p (a `metactl.knobs.Setting`, its temperature unused; default: the
        config's, `GRPOConfig.sampler_setting`; drawn from `metactl.knobs.truncated_probs`)
        (chunked if configured); with ``return_entropy`` also the token entropy at
        ``temperature`` of every sampled position (`Completions.entropy`, from the sampling
        loop's own logits). ``temperature``: a float, or a (N,) tensor, row ``i`` sampled (and
        its entropy measured) at ``temperature[i]``. ``keep_logits`` keeps the loop's raw
        logits at its subsample of positions (for `check_temperature`); the draws do not
        change."""
        chunk = self.cfg.rollout_chunk or prompt_ids.shape[0]
        cut = self.cfg.sampler_setting if truncation is None else truncation
        parts = []
        self.model.eval()
        for s in range(0, prompt_ids.shape[0], chunk):
            parts.append(sample(
                self.model, prompt_ids[s:s + chunk], prompt_mask[s:s + chunk],
                temperature=(temperature[s:s + chunk] if isinstance(temperature, torch.Tensor)
                             else temperature),
                max_new_tokens=self.cfg.max_new_tokens,
                eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id,
                truncation=cut, generator=self.generator,
                autocast_dtype=torch.bfloat16 if self.cfg.precision == "bf16" else None,
                return_entropy=return_entropy,
                on_logits=(None if keep_logits is None
                           else keep_logits.observer(s, min(s + chunk, prompt_ids.shape[0]))),
            ))
        width = max(p.tokens.shape[1] for p in parts)
        pad = self.tokenizer.pad_token_id
        tokens = torch.cat([torch.nn.functional.pad(p.tokens, (0, width - p.tokens.shape[1]),
                                                    value=pad) for p in parts])
        mask = torch.cat([torch.nn.functional.pad(p.mask, (0, width - p.mask.shape[1]),
                                                  value=False) for p in parts])
        entropy = None
        if return_entropy:
            entropy = torch.cat([torch.nn.functional.pad(cast(torch.Tensor, p.entropy),
                                                         (0, width - p.tokens.shape[1]))
                                 for p in parts])
        return Completions(tokens=tokens, mask=mask, entropy=entropy)

    def optimize(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        comp_ids: torch.Tensor,
        comp_mask: torch.Tensor,
        advantages: torch.Tensor,
        temperature: float | torch.Tensor,
        needs: set[str] | frozenset[str] = frozenset(),
        score_skipped_rows: bool = True,
        loglik_normalization: str = "mean",
        setting: Setting | None = None,
    ) -> dict[str, Any]:
        """``ppo_epochs`` optimizer steps on one rollout batch, every log-prob at ``temperature``
        (a float, or a (N,) CPU tensor: every log-prob of row ``i``, current, old and reference,
        at ``temperature[i]``, the temperature that sampled it) under the step's sampler
        ``setting`` (default: the config's, `GRPOConfig.sampler_setting`; its temperature is
        ``temperature``'s). With a truncation every log-prob (current, old, reference) is the
        smoothed log-probability of the truncated distribution the rollout sampled from
        (`metactl.knobs.log_probs`: the sampling distribution up to a factor within 1e-3 of 1
        on every sampled token, see `metactl.knobs`; PPO's importance ratio must be that of the
        sampling distribution, which an untruncated ``log_softmax(z / T)`` is not), and the
        candidate likelihoods are `metactl.likelihood.candidate_loglik` over the policy's
        family with the knobs it does not set held at the step's values. Without one, the
        plain ``log_softmax(z / T)`` (`rollout.token_logprobs`) and temperature candidates.

        Each epoch accumulates gradients over ``grad_accum_steps`` micro-batches. The first
        epoch's logits are the rollout policy's logits (nothing has been updated yet), so they
        give the old log-probs and, if ``"loglik"`` is in ``needs``, the candidate likelihoods
        (N, K) without another forward: length-normalised (``loglik_normalization="mean"``,
        TAMPO's paper form) or summed over each completion's tokens (``"sum"``: the mean times
        the token count). Rows left out of the gradient pass (``skip_zero_advantage``)
        get them from a no-grad forward when ``score_skipped_rows``, else their ``loglik`` rows
        stay 0. Returns those plus the loss statistics and the LR used. (The token entropy comes
        from the rollout: `rollout` with ``return_entropy``.)
        """
        if loglik_normalization not in ("mean", "sum"):
            raise ValueError("loglik_normalization must be 'mean' or 'sum', got "
                             f"{loglik_normalization!r}")
        cfg = self.cfg
        n = comp_ids.shape[0]
        setting = cfg.sampler_setting if setting is None else setting
        if not isinstance(setting, Setting):
            raise TypeError(f"setting must be a metactl.knobs.Setting, got {setting!r}")
        plain = self.plain_temperature and not setting.truncated
        fixed_knobs = setting.fixed_knobs(self.knobs)
        if isinstance(temperature, torch.Tensor):
            from .rollout import check_row_temperatures

            check_row_temperatures(temperature, n)
            temperature = temperature.cpu()
        total_tokens = max(int(comp_mask.sum()), 1)
        adv_dev = advantages.to(self.device)
        with_kl = self.ref_model is not None and cfg.kl_beta > 0
        # Rows whose advantage is 0 (groups with equal rewards) add exactly nothing to the loss
        # or its gradient when there is no KL term (normalisers use the whole batch), so
        # skip_zero_advantage leaves them out of the forward/backward pass. Their feedback comes
        # from a no-grad forward only when asked (``score_skipped_rows``): the one case where the
        # meta step costs a (partial) forward pass.
        if cfg.skip_zero_advantage and not with_kl:
            grad_rows = torch.nonzero(advantages != 0).flatten()
        else:
            grad_rows = torch.arange(n)
        score_rest = "loglik" in needs and score_skipped_rows
        rest = torch.ones(n, dtype=torch.bool)
        rest[grad_rows] = False
        score_rows = torch.nonzero(rest).flatten() if score_rest else grad_rows[:0]
        micro = max(1, -(-len(grad_rows) // cfg.grad_accum_steps))
        chunks = [grad_rows[s:s + micro] for s in range(0, len(grad_rows), micro)]

        old_logp: list[torch.Tensor] = []
        ref_logp: list[torch.Tensor | None] = []
        # float32 like candidate_loglik's values: a sum stored in float32 keeps the relative
        # precision (~1e-7) of the float32 mean it is computed from
        loglik = torch.zeros(n, len(self.candidates)) if "loglik" in needs else None
        meta_seconds = 0.0
        losses, clip_fracs, kls, grad_norms = [], [], [], []

        def feedback(rows: torch.Tensor, raw: torch.Tensor, ci: torch.Tensor,
                     cm: torch.Tensor) -> None:
            """Candidate likelihoods of ``rows`` from their raw logits."""
            nonlocal meta_seconds
            if loglik is not None:
                from metactl.likelihood import candidate_loglik

                t_meta = time.perf_counter()
                if plain:  # the temperature family, untruncated: the call it always was
                    scored = candidate_loglik(raw, ci, cm, self.candidates)
                else:  # the policy's family, its other knobs held at the step's setting
                    scored = candidate_loglik(raw, ci, cm, self.policy.candidates, self.family,
                                              **fixed_knobs)
                values = torch.as_tensor(scored)
                values = values.to(device="cpu", dtype=torch.float64)
                if loglik_normalization == "sum":  # the mean times each completion's length
                    values = values * cm.sum(1).to(device="cpu", dtype=torch.float64)[:, None]
                loglik[rows] = values.float()
                meta_seconds += time.perf_counter() - t_meta

        def score(logits: torch.Tensor, tokens: torch.Tensor,
                  row_t: float | torch.Tensor) -> torch.Tensor:
            """The log-probs (N, C) of ``tokens`` under the distribution that sampled them."""
            if plain:
                return token_logprobs(logits, tokens, row_t)
            return log_probs(logits, setting.at_temperature(row_t), tokens)

        self.model.train()
        for epoch in range(cfg.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=False)
            for p in self.model.parameters():  # zero (not absent) gradients when no row has
                if p.grad is None and p.requires_grad:  # an advantage, as without skipping
                    p.grad = torch.zeros_like(p)
            epoch_loss = 0.0
            for j, rows in enumerate(chunks):
                idx = rows.to(self.device)
                ids, pm, ci, cm = (prompt_ids[idx], prompt_mask[idx], comp_ids[idx],
                                   comp_mask[idx])
                # the temperature that sampled these rows: the step's T, or each row's own
                row_t = (temperature[rows] if isinstance(temperature, torch.Tensor)
                         else temperature)
                with self._autocast():
                    logits = completion_logits(self.model, ids, pm, ci, cm)
                logp = score(logits, ci, row_t)
                if epoch == 0:
                    # on-policy: the first pass's logits are the rollout policy's logits
                    old_logp.append(logp.detach())
                    with torch.no_grad():
                        feedback(rows, logits.detach().float(), ci, cm)
                        if with_kl:
                            assert self.ref_model is not None
                            with self._autocast():
                                ref_logits = completion_logits(self.ref_model, ids, pm, ci, cm)
                            ref_logp.append(score(ref_logits, ci, row_t))
                        else:
                            ref_logp.append(None)
                del logits
                loss, st = policy_loss(
                    logp, old_logp[j], adv_dev[idx], cm, clip_eps=cfg.clip_eps,
                    ref_logp=ref_logp[j], kl_beta=cfg.kl_beta, agg=cfg.loss_agg,
                    total_rows=n, total_tokens=total_tokens,
                )
                loss.backward()
                epoch_loss += float(loss.detach())
                clip_fracs.append(st["clip_frac"])
                kls.append(st["kl"])
            if epoch == 0 and len(score_rows):
                # these rows are scored only for the meta-policy: all of it is meta-step time
                t_fwd, before = time.perf_counter(), meta_seconds
                with torch.no_grad():
                    for s in range(0, len(score_rows), micro):
                        rows = score_rows[s:s + micro]
                        idx = rows.to(self.device)
                        with self._autocast():
                            raw = completion_logits(self.model, prompt_ids[idx],
                                                    prompt_mask[idx], comp_ids[idx],
                                                    comp_mask[idx]).float()
                        feedback(rows, raw, comp_ids[idx], comp_mask[idx])
                meta_seconds = before + time.perf_counter() - t_fwd
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                                   cfg.max_grad_norm)))
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            losses.append(epoch_loss)

        return {
            "loglik": loglik,
            "loss": float(np.mean(losses)),
            "clip_frac": float(np.mean(clip_fracs)) if clip_fracs else 0.0,
            "kl": float(np.mean(kls)) if kls else 0.0,
            "grad_norm": float(np.mean(grad_norms)),
            "lr": lr,
            "meta_seconds": meta_seconds,
            "grad_rows": len(grad_rows),
            "meta_forward_rows": len(score_rows),
        }

    # -- one GRPO step ----------------------------------------------------------------------
    def step(self) -> dict:
        """Run one GRPO step (select T, roll out, score, optimise, update the meta-policy)."""
        cfg, t0 = self.cfg, time.perf_counter()
        spec = self.spec
        needs = set(spec.feedback)

        # 1-2. the prompts, then the decision (one per prompt group for a per-prompt policy),
        # then the sampler setting of every row; each prompt repeated group_size times (groups
        # are contiguous rows)
        items, decision, t_select = self._select()
        setting, row_temperature, temperature = self.row_setting(decision)
        texts = [it.prompt for it in items for _ in range(cfg.group_size)]
        answers = [it.answer for it in items for _ in range(cfg.group_size)]
        prompt_ids, prompt_mask = self.encode_prompts(texts)
        keep = None
        if cfg.temperature_check != "off":
            keep = LogitSubsample(len(texts), cfg.max_new_tokens, cfg.temperature_check_rows,
                                  cfg.temperature_check_positions)
        with self._autocast():
            # the entropy controllers' feedback and the temperature check read the sampling
            # loop's own logits
            sampled = self.rollout(prompt_ids, prompt_mask, row_temperature,
                                   truncation=setting,
                                   return_entropy="entropy" in needs, keep_logits=keep)
        comp_ids, comp_mask = sampled.tokens, sampled.mask
        t_rollout = time.perf_counter() - t0
        # the temperature the tokens came from, checked before anything trains on them
        checked: dict[str, Any] = {}
        if keep is not None:
            t_check = time.perf_counter()
            est = self.check_temperature(keep, sampled, setting, row_temperature)
            del keep
            checked = {
                "effective_temperature": (est.temperature if math.isfinite(est.temperature)
                                          else None),
                "effective_temperature_z": est.z_lr,
                "check_seconds": time.perf_counter() - t_check,
            }

        # 3. verifier rewards and group-normalised advantages
        completions = self.tokenizer.batch_decode(comp_ids, skip_special_tokens=True)
        reward_values = [self.reward_fn(c, a) for c, a in zip(completions, answers, strict=True)]
        rewards = torch.tensor(reward_values, dtype=torch.float32)
        advantages = group_advantages(rewards, cfg.group_size, cfg.scale_rewards, cfg.adv_eps)

        # 4. optimisation at T; the first pass also yields the meta-policy's feedback. Rows with
        # A = 0 that the pass skips need scoring only for a rule that reads their likelihoods
        # (TAMPO, Hedge and MetaGradient weight each row by A: they do not; Counterfactual
        # weighs every completion: it does) and for the diagnostics of this step.
        diagnostic = self.step_idx in set(cfg.diagnostic_steps)
        score_skipped = diagnostic or not spec.zero_advantage_rows_free
        opt = self.optimize(prompt_ids, prompt_mask, comp_ids, comp_mask, advantages,
                            row_temperature, needs=needs, score_skipped_rows=score_skipped,
                            loglik_normalization=spec.loglik, setting=setting)

        # 5. meta-policy update: only the feedback its rule requires is computed
        loglik = opt["loglik"]
        t_entropy = time.perf_counter()
        feedback = self.feedback(loglik=loglik, advantages=advantages, rewards=rewards,
                                 reward_values=reward_values, sampled=sampled)
        t_entropy = time.perf_counter() - t_entropy
        t_update = time.perf_counter()
        info = self.policy.update(decision, feedback)
        t_update = time.perf_counter() - t_update
        # a likelihood rule's signal diagnostics, every step: they read only the (N, K)
        # likelihoods and advantages the rule just received (no model call)
        signal = None
        if feedback.loglik is not None and feedback.advantages is not None:
            from metactl.diagnostics import signal_diagnostics, signal_options

            # the sampled value of a one-knob policy's knob; a joint grid's candidate index
            sampled_value: float | torch.Tensor = (
                row_temperature if self.knobs == ("temperature",)
                else float(setting.as_dict()[self.knobs[0]]) if len(self.knobs) == 1
                else float(cast(Decision, decision).index))
            signal = signal_diagnostics(
                feedback.loglik, feedback.advantages, self.candidates, sampled_value,
                cfg.group_size, **signal_options(self.policy.rule))

        # 6. log everything that changed this step
        record = {
            "step": self.step_idx,
            # per prompt: the mean of the prompts' temperatures (= the mean over the rows)
            "temperature": temperature,
            # the temperature the sampled tokens came from and its z (unless the check is off)
            **checked,
            "lr": opt["lr"],
            "reward": float(rewards.mean()),
            "frac_solved_groups": float((rewards.view(-1, cfg.group_size).max(1).values > 0)
                                        .float().mean()),
            "loss": opt["loss"],
            "clip_frac": opt["clip_frac"],
            "kl": opt["kl"],
            "grad_norm": opt["grad_norm"],
            "completion_len": float(comp_mask.sum(1).float().mean()),
            "grad_rows": opt["grad_rows"],
            "meta_forward_rows": opt["meta_forward_rows"],
            "probs": [float(p) for p in info.probs],
            "seconds": time.perf_counter() - t0,
            "rollout_seconds": t_rollout,
            # select + candidate likelihoods + entropy + update: the cost of the meta step
            "meta_seconds": t_select + opt["meta_seconds"] + t_entropy + t_update,
        }
        # every knob the sampler used besides the temperature: those the policy sets and the
        # active fixed truncations (a plain temperature run logs exactly what it always did)
        knob_values = self._logged_knobs(setting)
        record.update(knob_values)
        record.update(self._decision_log(decision))
        if feedback.entropy is not None:
            record["entropy"] = feedback.entropy
        if signal is not None:
            record["signal"] = signal
        if loglik is not None and diagnostic:
            entry = {
                "step": self.step_idx, "temperature": temperature,
                "loglik": loglik.tolist(), "advantages": advantages.tolist(),
                "rewards": rewards.tolist(), **knob_values,
            }
            if "temperatures" in record:
                entry["temperatures"] = record["temperatures"]
            self.diagnostics.append(entry)
        self.history.append(record)
        self.step_idx += 1
        return record

    def check_temperature(self, kept: LogitSubsample, sampled: Completions, setting: Setting,
                          row_temperature: float | torch.Tensor) -> TemperatureEstimate:
        """The effective temperature of a rollout (`temperature_check.estimate`: the sampled
        tokens at ``kept``'s positions scored under ``setting`` at ``row_temperature``, from
        the sampling loop's own logits), checked by `metactl.check_effective_temperature`
        at its calibrated tolerance: a departure raises ``ValueError`` naming the step and both
        temperatures when ``temperature_check`` is ``"error"``, warns
        (`metactl.effective_temperature.EffectiveTemperatureWarning`) when it is ``"warn"``.
        Reads nothing else and draws nothing: the run's numbers do not change."""
        est = estimate(kept, sampled.tokens, sampled.mask, setting, row_temperature)
        try:
            check_effective_temperature(est, mode="error")
        except ValueError as exc:
            message = (f"GRPO step {self.step_idx}: {exc} (GRPOConfig.temperature_check="
                       f"{self.cfg.temperature_check!r}; 'warn' warns and goes on)")
            if self.cfg.temperature_check == "error":
                raise ValueError(message) from None
            warnings.warn(message, EffectiveTemperatureWarning, stacklevel=3)
        return est

    def row_setting(self, decision: Decision | DecisionBatch
                    ) -> tuple[Setting, float | torch.Tensor, float]:
        """The step's sampler setting from ``decision``: ``(setting, row_temperature,
        temperature)``.

        Every prompt group's setting is ``metactl.group_settings(decision, prompts_per_step)``
        over the config's (`GRPOConfig.sampler_setting`). ``setting`` holds the truncation that
        samples every row (per-prompt decisions set the temperature only, see
        `trainer_support`). One decision for the whole batch samples it at one float
        temperature, the sampler's fast path, logged as it is; per-prompt decisions give row
        ``j`` its group's temperature in a (N,) float32 tensor, and the log records their mean.
        """
        cfg = self.cfg
        groups = [cfg.sampler_setting.with_values(values)
                  for values in group_settings(decision, cfg.prompts_per_step)]
        setting = groups[0]
        if not self.spec.per_context:
            return setting, setting.temperature, setting.temperature
        values = np.array([g.temperature for g in groups], dtype=np.float64)
        rows = torch.from_numpy(np.repeat(values, cfg.group_size)).float()
        return setting, rows, float(values.mean())

    def feedback(self, *, loglik: torch.Tensor | None, advantages: torch.Tensor,
                 rewards: torch.Tensor, reward_values: Sequence[float],
                 sampled: Completions) -> Feedback:
        """The meta-policy's feedback of one step, built by `metactl.build_feedback` with only
        what ``policy.spec`` asks for computed: the candidate likelihoods ``loglik`` (N, K)
        from `optimize` (reduced over tokens as ``spec.loglik`` says), the GRPO
        ``advantages``, the verifier's ``reward_values`` (one per completion, rows as in
        ``loglik``) and the batch reward (the mean of ``rewards``, their float32 tensor), the
        token entropy the sampling loop measured over ``sampled``'s completion tokens (its
        per-position cost is inside the rollout: a few vector ops per decoding step), the
        vocabulary size and the group size (groups are contiguous rows)."""
        spec = self.spec
        needs = set(spec.feedback)
        entropy_sum = entropy_tokens = None
        if "entropy" in needs:
            entropy_sum = float(cast(torch.Tensor, sampled.entropy).double().sum())
            entropy_tokens = max(int(sampled.mask.sum()), 1)
        return build_feedback(
            spec,
            loglik_mean=loglik if spec.loglik == "mean" else None,
            loglik_sum=loglik if spec.loglik == "sum" else None,
            advantages=advantages.numpy(),
            rewards=np.asarray(reward_values, dtype=np.float64) if "rewards" in needs else None,
            reward=float(rewards.mean()),
            entropy_sum=entropy_sum,
            entropy_tokens=entropy_tokens,
            vocab_size=self.vocab_size,
            group_size=self.cfg.group_size,
        )

    def _decision_log(self, decision: Decision | DecisionBatch) -> dict[str, Any]:
        """What the log records of the decision: for per-prompt decisions which prompt (context
        key) got which temperature, else the chosen candidate's index."""
        if self.spec.per_context:
            batch = cast(DecisionBatch, decision)
            return {"contexts": [d.context for d in batch],
                    "temperatures": [float(v) for v in batch.values],
                    "decision_indices": [int(i) for i in batch.indices]}
        return {"decision_index": int(cast(Decision, decision).index)}

    def _logged_knobs(self, setting: Setting) -> dict[str, Any]:
        """``{knob: value}`` of the step's non-temperature knobs that are set: by the policy, or
        by the config to anything but off (``top_k`` an int, the others floats)."""
        values = setting.as_dict()
        off = Setting().as_dict()
        return {k: values[k] for k in ("top_p", "top_k", "min_p")
                if k in self.knobs or values[k] != off[k]}

    def context_keys(self, items: Sequence[PromptItem]) -> list[int | str]:
        """The context key of every prompt item (``contexts(item)``, default ``item.context``):
        an ``int`` or ``str``, stable across steps."""
        keys: list[int | str] = []
        for i, item in enumerate(items):
            if self.context_fn is not None:
                key = self.context_fn(item)
            elif hasattr(item, "context"):
                key = item.context
            else:
                raise TypeError(
                    f"a per-prompt policy needs a context key per prompt: prompt item {i} "
                    f"({type(item).__name__}) has no 'context' attribute; pass "
                    "GRPOTrainer(contexts=item -> key) or items with .context")
            keys.append(key)
        return keys

    def _select(self) -> tuple[list[PromptItem], Decision | DecisionBatch, float]:
        """Draw the step's prompts, then the policy's decision: one per prompt, keyed by
        `context_keys`, for a per-prompt policy; one for the batch otherwise. Returns the
        prompts, the decision and the seconds ``select`` took. A failure (no key, a bad key)
        leaves the prompt source and its RNG as they were."""
        rng_state = self.rng.bit_generator.state
        source_state = self._prompt_source_state()
        try:
            items = list(self.prompts(self.rng, self.cfg.prompts_per_step))
            keys = self.context_keys(items) if self.spec.per_context else None
            t0 = time.perf_counter()
            decision = self.policy.select(contexts=keys)
            return items, decision, time.perf_counter() - t0
        except Exception:
            self.rng.bit_generator.state = rng_state
            if source_state is not None:
                cast(Any, self.prompts).load_state_dict(source_state)
            raise

    def _prompt_source_state(self) -> dict | None:
        state_fn = getattr(self.prompts, "state_dict", None)
        return state_fn() if callable(state_fn) else None

    # -- loop -------------------------------------------------------------------------------
    def evaluate(self) -> None:
        """Run the evaluator (if any) at the current step and store its result."""
        if self.evaluator is None:
            return
        if self.evals and self.evals[-1]["step"] == self.step_idx:
            return
        self.model.eval()
        with self._autocast():
            result = self.evaluator(self.model, self.step_idx)
        self.evals.append({"step": self.step_idx, **result})

    def train(
        self, callback: Callable[[dict], None] | None = None, progress_bar: bool = True
    ) -> list[dict]:
        """Run (or resume) until ``config.steps``; returns the per-step history.

        ``callback(record)`` is called after every step (e.g. to report progress; an exception
        raised there interrupts the run, which a new trainer on the same ``run_dir`` resumes).
        """
        cfg = self.cfg
        bar = None
        if progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step_idx, desc="GRPO", leave=False)
        try:
            if self.step_idx == 0 and cfg.eval_every:
                self.evaluate()
            while self.step_idx < cfg.steps:
                record = self.step()
                if cfg.eval_every and self.step_idx % cfg.eval_every == 0:
                    self.evaluate()
                if cfg.checkpoint_every and self.step_idx % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(T=f"{record['temperature']:.2f}",
                                    reward=f"{record['reward']:.2f}")
                if callback is not None:
                    callback(record)
            self.evaluate()
        finally:
            if bar is not None:
                bar.close()
        return self.history

    # -- checkpoints ------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        """``run_dir / "checkpoint.pt"``."""
        if self.run_dir is None:
            raise ValueError("this trainer has no run_dir")
        return self.run_dir / "checkpoint.pt"

    def save_checkpoint(self) -> Path:
        """Atomically write everything needed to resume exactly (model, optimizer, scheduler,
        meta-policy state, RNG states, step, history).

        Everything is stored as tensors, numbers, strings, lists and dicts (`plain_tree`: numpy
        values in a history or an evaluator's result become the same Python numbers and lists),
        so `read_checkpoint` loads it with ``torch.load(weights_only=True)``, which runs no code.
        Raises ``TypeError`` naming the field when something else was given to store.
        """
        path = self.checkpoint_path
        path.parent.mkdir(parents=True, exist_ok=True)
        state = plain_tree({
            "step": self.step_idx,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "policy": self.policy.state_dict(),
            "prompt_source": self._prompt_source_state(),
            "rng_numpy": self.rng.bit_generator.state,
            "rng_sampling": self.generator.get_state(),
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "history": self.history,
            "evals": self.evals,
            "diagnostics": self.diagnostics,
        }, "checkpoint")
        state[HASH_FIELD] = tree_sha256(state)  # checked by load_checkpoint
        # a uniquely named temporary file renamed into place: a reader sees the old checkpoint
        # or the new one, and two writers never share a temporary file; the protocol is pinned
        # because the reader's opcode check accepts exactly what protocol 2 writes
        atomic_write(path, lambda f: torch.save(state, f, pickle_protocol=TORCH_PICKLE_PROTOCOL))
        return path

    def load_checkpoint(self) -> None:
        """Restore the state written by `save_checkpoint`, after checking its content hash.

        Raises `CorruptFileError` (naming the file) when it is empty, truncated, garbled or has
        no hash; nothing is restored then.
        """
        state = read_checkpoint(self.checkpoint_path)
        source = state.get("prompt_source")
        loader = getattr(self.prompts, "load_state_dict", None)
        if (source is None) != (self._prompt_source_state() is None) or (
                source is not None and not callable(loader)):
            raise ValueError(
                f"{self.checkpoint_path}: the checkpoint's prompt source "
                f"{'has' if source is not None else 'has no'} state but this trainer's "
                f"{'has none' if source is not None else 'has'} (another prompt pool "
                f"configuration); {CHECKPOINT_ADVICE}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.policy.load_state_dict(state["policy"])
        if source is not None:
            cast(Any, self.prompts).load_state_dict(source)
        self.rng.bit_generator.state = state["rng_numpy"]
        self.generator.set_state(state["rng_sampling"].cpu())
        torch.set_rng_state(state["rng_torch"].cpu())
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step_idx = int(state["step"])
        self.history = list(state["history"])
        self.evals = list(state["evals"])
        self.diagnostics = list(state["diagnostics"])


CHECKPOINT_ADVICE = ("delete it to restart this run from step 0 (its other files are kept), or "
                     "use a fresh output folder")


# what `GRPOTrainer.load_checkpoint` reads unconditionally ("prompt_source" and "rng_cuda" are
# optional there)
_CHECKPOINT_FIELDS = ("step", "config", "model", "optimizer", "scheduler", "policy", "rng_numpy",
                      "rng_sampling", "rng_torch", "history", "evals", "diagnostics")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a `GRPOTrainer` checkpoint on the CPU and check its content hash, without running
    any code the file names (`integrity.read_torch_checked`: its pickle's opcodes are checked
    before anything is loaded, then ``torch.load(weights_only=True)``, then the hash).

    Raises `CorruptFileError` naming ``path`` when the file is empty, truncated or garbled (it
    does not load, or its hash does not match what was saved), has no hash, lacks a field a
    resume needs, or names anything but tensors (a crafted file, or numpy values in a
    checkpoint written before this check: it is refused, never loaded unsafely).
    """
    p = Path(path)
    state = read_torch_checked(p, advice=CHECKPOINT_ADVICE)
    missing = [k for k in _CHECKPOINT_FIELDS if k not in state]
    if missing:
        raise CorruptFileError(p, f"lacks the field(s) {', '.join(missing)} (not written by "
                                  "this trainer)", CHECKPOINT_ADVICE)
    for key in ("rng_sampling", "rng_torch"):
        if not isinstance(state[key], torch.Tensor) or state[key].dtype != torch.uint8:
            raise CorruptFileError(p, f"its {key} is not a byte tensor (not written by this "
                                      "trainer)", CHECKPOINT_ADVICE)
    return state
