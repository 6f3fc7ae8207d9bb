"""Hugging Face TRL integration: ``GRPOTrainer`` with a meta-policy choosing the temperature
(or ``top_p``, ``top_k``, ``min_p``, or a joint grid of them).

Change one class name to learn the rollout temperature with TAMPO::

    import metactl
    from metactl.adapters.trl import MetaGRPOTrainer

    trainer = MetaGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...),
                              train_dataset=..., meta_policy=metactl.tampo(seed=0))
    trainer.train()

Install with ``pip install "metactl[trl]"`` (tested with ``trl>=1.16,<1.17`` and
``transformers>=5.17,<5.25``). Heavy imports (torch,
TRL) happen on first attribute access, so ``import metactl.adapters.trl`` stays cheap.

Example:
    >>> import metactl.adapters.trl as mtrl
    >>> mtrl.TESTED_TRL
    '>=1.16,<1.17'
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .guards import TESTED_TRANSFORMERS, TESTED_TRL

__all__ = [
    "META_STATE_NAME",
    "TESTED_TRANSFORMERS",
    "TESTED_TRL",
    "FusedHead",
    "MetaGRPOTrainer",
    "candidate_loglik_exact",
    "candidate_loglik_from_hidden",
    "check_generation_settings",
    "check_transformers_version",
    "check_trl_version",
]

_LAZY = {
    "META_STATE_NAME": ".checkpoint",
    "MetaGRPOTrainer": ".trainer",
    "FusedHead": ".seam",
    "candidate_loglik_exact": ".scoring",
    "candidate_loglik_from_hidden": ".scoring",
    "check_generation_settings": ".guards",
    "check_transformers_version": ".guards",
    "check_trl_version": ".guards",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
