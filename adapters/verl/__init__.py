"""verl integration: the meta-policy inside verl's V1 trainer, selected by configuration.

verl imports every module named in ``VERL_USE_EXTERNAL_MODULES`` at ``import verl`` (in the
driver and in every Ray worker); :mod:`metactl.adapters.verl.register` registers

* the trainer ``trainer.v1.trainer_mode=metactl`` (:class:`.trainer.MetaPPOTrainer`, a subclass
  of verl's sync V1 trainer ``PPOTrainerSync``) and
* the agent loop ``metactl_single_turn`` (:class:`.agent_loop.MetaSingleTurnAgentLoop`, a
  subclass of ``SingleTurnAgentLoop`` that samples each prompt at its chosen temperature).

The ``metactl`` config group (candidates, rule, selector, seed, context_key, temperature_check,
candidate_likelihood) is parsed by :func:`.config.policy_from_config` and
:func:`.config.settings_from_config` and checked against what the trainer gives
(:data:`.config.TRAINER_SUPPORT`, :func:`.config.check_rollout`,
:func:`.config.check_temperature_check`, :func:`.config.check_candidate_likelihood`); its names are
re-exported here. This package imports nothing heavy: verl is imported only by
``register``, ``trainer``, ``agent_loop``, ``engine_hook`` (the FSDP engine wrapper that
scores the candidate temperatures inside verl's old-log-prob pass) and ``testing``.

Example:
    >>> import metactl.adapters.verl as mverl
    >>> mverl.TRAINER_NAME, mverl.AGENT_LOOP_NAME
    ('metactl', 'metactl_single_turn')
"""

from __future__ import annotations

from . import config as _config
from .config import *  # noqa: F403  (the public names are config's)

__all__: list[str] = []
__all__ += _config.__all__
