"""The recommended temperature controller, chosen by a rule fixed in advance.

``benchmarks/PROTOCOL.md`` (section 16.6) fixed the rule before the runs: among the shortlisted
arms of the development scoreboard (section 16.5, fixed T = 1.0 included), the lowest
worst-case normalised regret over the four development testbeds; arms within 0.05 of it are
tied, fixed T = 1.0 wins a tie, otherwise the lowest mean development regret. Applied to that
run, it chose :data:`CHOSEN_AS`: the learned temperature mixture with the relative step
(``metactl.Mixture(relative=True)``, otherwise untuned defaults) over the paper grid, exactly
the configuration the scoreboard ran. ``metactl gym-study --controllers recommended``,
``metactl reproduce --controllers recommended`` and ``metactl scoreboard --controllers
recommended`` build this same policy.

Chosen does not mean good. Its worst-case development regret was 0.54 (0 = the best fixed
temperature of the grid, 1 = the worst), tied with EXP3 (0.54) and the uniform mixture (0.52)
and won on the mean; fixed T = 1.0's was 0.70. On the reference task it lost to fixed T = 1.0
on all 6 seeds. No controller met the goal of regret <= 0.10 everywhere. docs/results.md has
the numbers, development and held-out, and docs/decision-guide.md what they mean for a run.

It is a per-prompt policy: decide with ``select(contexts=...)``, one context per prompt group,
and update with every completion's reward (``rewards``, G consecutive rows per group).

Example:
    >>> import numpy as np, metactl
    >>> policy = metactl.recommended(seed=0)
    >>> policy.rule == metactl.Mixture(relative=True) and policy.candidates.tolist() == list(
    ...     metactl.PAPER_TEMPERATURES)
    True
    >>> decisions = policy.select(contexts=list(range(20)))   # 20 prompt groups
    >>> np.bincount(decisions.indices, minlength=10).tolist()  # dealt evenly at first
    [2, 2, 2, 2, 2, 2, 2, 2, 2, 2]
    >>> rewards = np.tile([1.0, 0.0], 20)                      # G = 2, every group mixed
    >>> info = policy.update(decisions, rewards=rewards)
    >>> policy.step
    1
"""

from __future__ import annotations

from .factories import PAPER_TEMPERATURES
from .policy import MetaPolicy
from .rules import Mixture

__all__ = ["CHOSEN_AS", "recommended"]

#: The scoreboard / ``metactl gym-study`` name of the controller the protocol's rule chose.
CHOSEN_AS = "mixture-relative"


def recommended(seed: int = 0) -> MetaPolicy:
    """A fresh meta-policy of the recommended controller (see the module docstring): the
    learned temperature mixture with the relative step (``Mixture(relative=True)``: floor 0.1,
    step size 1.0, the share of mixed groups as the signal) over the temperatures 0.6..1.5.
    Feedback: ``rewards``, every completion's reward, G consecutive rows per prompt group.

    Args:
        seed: seeds the policy's own RNG, which deals every temperature (an int >= 0).

    Returns:
        a new :class:`metactl.MetaPolicy` (nothing is shared between calls).
    """
    return MetaPolicy(PAPER_TEMPERATURES, Mixture(relative=True), seed=seed)
