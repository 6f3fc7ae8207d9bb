"""The module to name in ``VERL_USE_EXTERNAL_MODULES``: importing it (verl does so at
``import verl``, in the driver and in every Ray worker) registers the ``metactl`` trainer and
the ``metactl_single_turn`` agent loop.

    VERL_USE_EXTERNAL_MODULES=metactl.adapters.verl.register python -m verl.trainer.main_ppo ...
"""

from __future__ import annotations

from .agent_loop import MetaSingleTurnAgentLoop
from .trainer import MetaPPOTrainer

__all__ = ["MetaPPOTrainer", "MetaSingleTurnAgentLoop"]
