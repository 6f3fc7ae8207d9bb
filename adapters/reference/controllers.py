"""Named temperature controllers for the comparison, all as `metactl.MetaPolicy` objects.

Names: ``fixed-T`` (T on the paper grid 0.6..1.5), ``linear-A-B`` / ``cosine-A-B`` schedules,
``tampo`` (paper defaults), ``tampo-softmax``, ``hedge``, ``metagrad``, ``exp3``, ``ucb1``,
``thompson``, ``entropy-H`` (the E3 entropy-targeting rule with target H nats).

Example:
    >>> make_policy("fixed-1.2", steps=10, seed=0).select().value
    1.2
    >>> round(make_policy("linear-0.9-1.5", steps=3, seed=0).select().value, 2)
    0.9
    >>> make_policy("tampo", steps=10, seed=0).requires
    ('loglik', 'advantages')
"""

from __future__ import annotations

import metactl

PAPER_ARMS: tuple[str, ...] = ("fixed-0.9", "fixed-1.2", "fixed-1.5", "linear-0.9-1.5", "tampo")
OPTIONAL_ARMS: tuple[str, ...] = ("tampo-softmax", "hedge", "metagrad", "exp3", "ucb1",
                                  "thompson", "entropy-0.3", "cosine-0.9-1.5")


def make_policy(name: str, steps: int, seed: int) -> metactl.MetaPolicy:
    """Build the meta-policy called ``name`` for a run of ``steps`` GRPO steps."""
    grid = metactl.PAPER_TEMPERATURES
    parts = name.split("-")
    try:
        if parts[0] == "fixed" and len(parts) == 2:
            return metactl.MetaPolicy(grid, metactl.Fixed(float(parts[1])), seed=seed)
        if parts[0] in ("linear", "cosine") and len(parts) == 3:
            rule = metactl.Schedule(parts[0], float(parts[1]), float(parts[2]), total_steps=steps)
            return metactl.MetaPolicy(grid, rule, seed=seed)
        if parts[0] == "entropy" and len(parts) == 2:
            return metactl.MetaPolicy(grid, metactl.EntropyTarget(float(parts[1])), seed=seed)
    except ValueError as exc:
        raise ValueError(f"controller {name!r}: {exc}") from exc
    simple = {
        "tampo": lambda: metactl.tampo(seed=seed),
        "tampo-softmax": lambda: metactl.tampo(normalizer="softmax", seed=seed),
        "hedge": lambda: metactl.MetaPolicy(grid, metactl.Hedge(), seed=seed),
        "metagrad": lambda: metactl.MetaPolicy(grid, metactl.MetaGradient(), seed=seed),
        "exp3": lambda: metactl.MetaPolicy(grid, metactl.EXP3(), seed=seed),
        "ucb1": lambda: metactl.MetaPolicy(grid, metactl.UCB1(), seed=seed),
        "thompson": lambda: metactl.MetaPolicy(grid, metactl.ThompsonGaussian(), seed=seed),
    }
    if name not in simple:
        raise ValueError(
            f"unknown controller {name!r}; use fixed-T, linear-A-B, cosine-A-B, entropy-H or one "
            f"of {sorted(simple)}"
        )
    return simple[name]()


def is_fixed(name: str) -> bool:
    """Whether ``name`` is a fixed-temperature arm."""
    return name.startswith("fixed-")
