"""Update rules and controllers; each is a frozen config object usable with :class:`MetaPolicy`."""

from .bandits import EXP3, UCB1, ThompsonGaussian
from .base import Rule
from .contextual_tampo import ContextualTAMPO
from .controllers import EntropyTarget, Fixed, Schedule
from .counterfactual import Counterfactual
from .entropy_schedule import EntropySchedule
from .full_information import Hedge, MetaGradient
from .linear_thompson import LinearThompson
from .mixture import Mixture, Spread
from .ptgs import PTGS
from .tampo import TAMPO, candidate_advantages, minmax_probs
from .uncertainty import Uncertainty

RULES: dict[str, type[Rule]] = {
    cls.__name__: cls
    for cls in (
        TAMPO,
        Hedge,
        MetaGradient,
        EXP3,
        UCB1,
        ThompsonGaussian,
        Fixed,
        Schedule,
        EntropyTarget,
        Counterfactual,
        EntropySchedule,
        Uncertainty,
        PTGS,
        ContextualTAMPO,
        LinearThompson,
        Mixture,
        Spread,
    )
}

__all__ = [
    "EXP3",
    "PTGS",
    "RULES",
    "TAMPO",
    "UCB1",
    "ContextualTAMPO",
    "Counterfactual",
    "EntropySchedule",
    "EntropyTarget",
    "Fixed",
    "Hedge",
    "LinearThompson",
    "MetaGradient",
    "Mixture",
    "Rule",
    "Schedule",
    "Spread",
    "ThompsonGaussian",
    "Uncertainty",
    "candidate_advantages",
    "minmax_probs",
]
