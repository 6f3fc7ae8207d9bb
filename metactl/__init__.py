"""metactl: a sampling hyperparameter of LLM RL (first of all the rollout temperature) as a
learned meta-policy, with the TAMPO rule exactly as published and fair baselines behind one API.

Example:
    >>> import metactl, numpy as np
    >>> policy = metactl.tampo(seed=0)                     # paper defaults
    >>> decision = policy.select()                         # one temperature per rollout batch
    >>> loglik = np.full((4, 10), -1.0)                    # (N, K) trajectory log-likelihoods
    >>> info = policy.update(decision, loglik=loglik, advantages=np.zeros(4))
    >>> info.step, policy.step
    (0, 1)

The core needs numpy and scipy only; ``metactl.likelihood`` uses torch when given torch tensors,
and the integrations live in ``metactl.adapters`` (extras ``metactl[trl]``, ``[gym]``, ...).
"""

from . import (
    contexts,
    diagnostics,
    distributed,
    effective_temperature,
    feedback,
    knobs,
    likelihood,
)
from .decision import ContextKey, Decision, DecisionBatch, UpdateInfo, group_settings
from .factories import (
    PAPER_TEMPERATURES,
    linear_thompson,
    mixture,
    ptgs,
    ptgs_candidates,
    spread,
    tampo,
    tampo_per_prompt,
)
from .feedback import Feedback, FeedbackSpec, TrainerSupport, build_feedback, check_trainer
from .knobs import KnobGrid, Setting, grid
from .policy import SCHEMA_VERSION, MetaPolicy
from .recommended import recommended
from .rules import (
    EXP3,
    PTGS,
    TAMPO,
    UCB1,
    ContextualTAMPO,
    Counterfactual,
    EntropySchedule,
    EntropyTarget,
    Fixed,
    Hedge,
    LinearThompson,
    MetaGradient,
    Mixture,
    Rule,
    Schedule,
    Spread,
    ThompsonGaussian,
    Uncertainty,
    candidate_advantages,
    minmax_probs,
)
from .selectors import Greedy, Nucleus, Sample, Selector
from .sparsemax import softmax, sparsemax

__version__ = "0.1.0"

__all__ = [
    "EXP3",
    "PAPER_TEMPERATURES",
    "PTGS",
    "SCHEMA_VERSION",
    "TAMPO",
    "UCB1",
    "ContextKey",
    "ContextualTAMPO",
    "Counterfactual",
    "Decision",
    "DecisionBatch",
    "EntropySchedule",
    "EntropyTarget",
    "Feedback",
    "FeedbackSpec",
    "Fixed",
    "Greedy",
    "Hedge",
    "KnobGrid",
    "LinearThompson",
    "MetaGradient",
    "MetaPolicy",
    "Mixture",
    "Nucleus",
    "Rule",
    "Sample",
    "Schedule",
    "Selector",
    "Setting",
    "Spread",
    "ThompsonGaussian",
    "TrainerSupport",
    "Uncertainty",
    "UpdateInfo",
    "__version__",
    "build_feedback",
    "candidate_advantages",
    "check_trainer",
    "contexts",
    "diagnostics",
    "distributed",
    "effective_temperature",
    "feedback",
    "grid",
    "group_settings",
    "knobs",
    "likelihood",
    "linear_thompson",
    "minmax_probs",
    "mixture",
    "ptgs",
    "ptgs_candidates",
    "recommended",
    "softmax",
    "sparsemax",
    "spread",
    "tampo",
    "tampo_per_prompt",
]
