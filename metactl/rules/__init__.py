"""Update rules and controllers; each is a frozen config object usable with :class:`MetaPolicy`."""

from .bandits import EXP3, UCB1, ThompsonGaussian
from .base import Rule
from .controllers import EntropyTarget, Fixed, Schedule
from .full_information import Hedge, MetaGradient
from .tampo import TAMPO, candidate_advantages, minmax_probs

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
    )
}

__all__ = [
    "EXP3",
    "RULES",
    "TAMPO",
    "UCB1",
    "EntropyTarget",
    "Fixed",
    "Hedge",
    "MetaGradient",
    "Rule",
    "Schedule",
    "ThompsonGaussian",
    "candidate_advantages",
    "minmax_probs",
]
