"""The recommended temperature controller, chosen by a rule fixed in advance.

``benchmarks/PROTOCOL.md`` (section 7) fixed the rule before the new controllers were run:
among every non-fixed arm of ``metactl scoreboard --testbeds development`` (full budget), the
one with the lowest worst-case normalised regret over the four development testbeds (ties within
0.01 broken by the mean development regret). Applied to that run, it chose
:data:`CHOSEN_AS`: EXP3 over the paper grid with its untuned defaults, exactly the
configuration the scoreboard ran. ``metactl gym-study --controllers recommended``,
``metactl reproduce --controllers recommended`` and ``metactl scoreboard --controllers
recommended`` build this same policy.

Chosen does not mean good: its worst-case development regret was 0.54 (0 = the best fixed
temperature of the grid, 1 = the worst; fixed T = 1.0's was 0.64), it beat fixed T = 1.0
significantly on one development testbed of four, and no controller in metactl met the goal of
regret <= 0.10 everywhere. The README's "What the paper claims, and what we measured" section
has the numbers, development and held-out.

Example:
    >>> import metactl
    >>> policy = metactl.recommended(seed=0)
    >>> policy.rule == metactl.EXP3() and policy.candidates.tolist() == list(
    ...     metactl.PAPER_TEMPERATURES)
    True
    >>> decision = policy.select()              # sampled from the policy (uniform at first)
    >>> _ = policy.update(decision, reward=1.0) # the batch's mean reward, in [0, 1]
    >>> bool(policy.probs[decision.index] > 0.1)
    True
"""

from __future__ import annotations

from .factories import PAPER_TEMPERATURES
from .policy import MetaPolicy
from .rules import EXP3

__all__ = ["CHOSEN_AS", "recommended"]

#: The scoreboard / ``metactl gym-study`` name of the controller the protocol's rule chose.
CHOSEN_AS = "exp3"


def recommended(seed: int = 0) -> MetaPolicy:
    """A fresh meta-policy of the recommended controller (see the module docstring): EXP3
    (``gamma = 0.1``, rewards in [0, 1]) over the temperatures 0.6..1.5, sampling with
    :class:`metactl.Sample`. Feedback: ``reward``, the batch's mean reward in [0, 1].

    Args:
        seed: seeds the policy's own RNG, which draws every temperature (an int >= 0).

    Returns:
        a new :class:`metactl.MetaPolicy` (nothing is shared between calls).
    """
    return MetaPolicy(PAPER_TEMPERATURES, EXP3(), seed=seed)
