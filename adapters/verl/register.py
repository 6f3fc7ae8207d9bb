"""The module to name in ``VERL_USE_EXTERNAL_MODULES``: importing it (verl does so at
``import verl``, in the driver and in every Ray worker) registers the ``metactl`` trainer and
the ``metactl_single_turn`` agent loop, and installs the FSDP engine hook that scores the
candidate temperatures inside the old-log-prob pass (:mod:`.engine_hook`).

    VERL_USE_EXTERNAL_MODULES=metactl.adapters.verl.register python -m verl.trainer.main_ppo ...
"""

from __future__ import annotations

from . import engine_hook as _engine_hook  # noqa: F401  (installs the hook on import)
from .agent_loop import MetaSingleTurnAgentLoop
from .trainer import MetaPPOTrainer

__all__ = ["MetaPPOTrainer", "MetaSingleTurnAgentLoop"]
