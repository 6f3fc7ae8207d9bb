"""The declared suite of the scoreboard: testbeds, their split, budgets and controller names.

This module is the executable form of ``benchmarks/PROTOCOL.md`` (sections 2 and 3); change one
only together with the other, before the runs the change affects.

Example
-------
>>> [t.name for t in TESTBEDS.values() if t.split == DEVELOPMENT]
['gym-default', 'gym-sharp', 'gym-flat', 'reference-quick']
>>> TESTBEDS["gym-sharp"].gym.prior_margin
7.0
>>> TESTBEDS["reference-full"].seeds(quick=True) is None    # not part of the --quick suite
True
>>> reference_controller_name("metagradient"), reference_controller_name("tampo")
('metagrad', 'tampo')
>>> resolve_bound("bound-t1-10", "fixed-1.2"), resolve_bound("bound-spread-25", "fixed-0.8")
('switch-1.0-1.2-10', 'spread-then-0.8-25')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import metactl

from ..controllers import FIXED_GRID, STUDY_ARMS, canonical_name, make_policy
from ..gym_study import StudyConfig, make_controller

if TYPE_CHECKING:  # the reference trainer needs torch: imported only where a reference run is
    from ..reproduce.experiment import ReproduceConfig

__all__ = [
    "BOUND_ARMS",
    "DEVELOPMENT",
    "FIXED_GRID",
    "HELD_OUT",
    "TESTBEDS",
    "Testbed",
    "check_controller",
    "default_controllers",
    "is_bound",
    "is_likelihood_rule",
    "reference_controller_name",
    "resolve_bound",
    "testbed_policy",
]

DEVELOPMENT = "development"
HELD_OUT = "held-out"

# FIXED_GRID (from the controller registry): the fixed arms every testbed runs, the whole
# candidate grid 0.6..1.5.


#: The bound rows of PROTOCOL section 16.2: ``{name: (first phase, its steps)}``. Each plays
#: its first phase (T = 1.0, or the uniform mixture `metactl.Spread`) for that many steps, then
#: the testbed's best fixed temperature, known only after the fixed grid has run on the same
#: seeds (post hoc: oracles, never candidates for ``recommended``).
BOUND_ARMS: dict[str, tuple[str, int]] = {
    "bound-t1-10": ("t1", 10),
    "bound-t1-25": ("t1", 25),
    "bound-spread-10": ("spread", 10),
    "bound-spread-25": ("spread", 25),
}


def is_bound(name: str) -> bool:
    """Whether ``name`` is a bound row (resolved per testbed after its fixed grid has run)."""
    if not isinstance(name, str):
        raise TypeError(f"controller name must be a str, got {type(name).__name__}")
    return name in BOUND_ARMS


def resolve_bound(name: str, best_fixed: str) -> str:
    """The registry name bound row ``name`` runs as when ``best_fixed`` (a fixed arm of the grid)
    is the testbed's best fixed arm: ``switch-1.0-T-K`` or ``spread-then-T-K``.

    Raises ``ValueError`` naming the argument for a name that is not a bound row or a
    ``best_fixed`` that is not on the fixed grid.
    """
    if not isinstance(name, str) or not isinstance(best_fixed, str):
        raise TypeError("name and best_fixed must be str, got "
                        f"{type(name).__name__}, {type(best_fixed).__name__}")  # fmt: skip
    if name not in BOUND_ARMS:
        raise ValueError(f"name {name!r} is not a bound row; bound rows: {', '.join(BOUND_ARMS)}")
    if best_fixed not in FIXED_GRID:
        raise ValueError(f"best_fixed {best_fixed!r} is not a fixed arm of the grid "
                         f"{', '.join(FIXED_GRID)}")  # fmt: skip
    phase, steps = BOUND_ARMS[name]
    value = best_fixed.removeprefix("fixed-")
    return f"switch-1.0-{value}-{steps}" if phase == "t1" else f"spread-then-{value}-{steps}"


def reference_controller_name(name: str) -> str:
    """The name of the scoreboard controller ``name`` in a reference testbed's own run folders
    (``metactl reproduce``'s spelling: ``linear-0.9-1.5`` for ``linear``, ...). Raises
    ``ValueError`` for an unknown name."""
    return canonical_name(name)


@dataclass(frozen=True)
class Testbed:
    """One testbed of the suite.

    ``gym`` (a :class:`StudyConfig`) or ``reference`` (``quick -> ReproduceConfig``, built lazily
    because it needs torch) says what a run is. ``quick_seeds`` is ``None`` when the testbed is
    not part of the ``--quick`` suite. ``default_arms``: the non-fixed controllers that
    ``--controllers all`` (the default) runs on this testbed, ``None`` for every one; the others
    are reported as not run there (PROTOCOL section 15). Controllers named explicitly run on
    every selected testbed.
    """

    name: str
    split: str
    description: str
    full_seeds: int
    quick_seeds: int | None
    gym: StudyConfig | None = None
    reference: Callable[[bool], ReproduceConfig] | None = None
    default_arms: tuple[str, ...] | None = None

    def default_plan(self, controllers: Sequence[str]) -> list[str]:
        """The controllers of ``controllers`` that ``--controllers all`` runs here."""
        if self.default_arms is None:
            return list(controllers)
        return [c for c in controllers if c in FIXED_GRID or c in self.default_arms]

    def __post_init__(self) -> None:
        if self.split not in (DEVELOPMENT, HELD_OUT):
            raise ValueError(f"split must be {DEVELOPMENT!r} or {HELD_OUT!r}, got {self.split!r}")
        if (self.gym is None) == (self.reference is None):
            raise ValueError(f"testbed {self.name!r} needs exactly one of gym= and reference=")
        if self.full_seeds < 1 or (self.quick_seeds is not None and self.quick_seeds < 1):
            raise ValueError(f"testbed {self.name!r}: seed counts must be >= 1")

    @property
    def kind(self) -> str:
        """``"gym"`` or ``"reference"``."""
        return "gym" if self.gym is not None else "reference"

    @property
    def metric(self) -> str:
        """Name of the primary metric."""
        return "auc" if self.kind == "gym" else "pass1"

    def seeds(self, quick: bool) -> int | None:
        """Seeds of this testbed in the quick or the full suite (``None``: not in it)."""
        return self.quick_seeds if quick else self.full_seeds

    def gym_config(self, steps: int | None = None) -> StudyConfig:
        """The gym configuration, with ``steps`` overridden when given."""
        assert self.gym is not None
        return self.gym if steps is None else dataclasses.replace(self.gym, steps=steps)

    def reference_config(self, quick: bool, steps: int | None = None) -> ReproduceConfig:
        """The reference configuration of the quick or full budget (``steps`` overridden)."""
        assert self.reference is not None
        cfg = self.reference(quick)
        if steps is not None:
            cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, steps=steps))
        return cfg

    def describe(self) -> dict[str, Any]:
        """JSON-safe description (the configuration the runs use)."""
        d: dict[str, Any] = {
            "name": self.name,
            "split": self.split,
            "kind": self.kind,
            "description": self.description,
            "metric": self.metric,
            "full_seeds": self.full_seeds,
            "quick_seeds": self.quick_seeds,
        }
        if self.gym is not None:
            d["gym"] = dataclasses.asdict(self.gym)
        return d


#: The evaluation of a reference run under ``--quick`` (PROTOCOL section 14): 30 problems per
#: benchmark and no learning curve, so that a 25-step arm is not mostly evaluation.
QUICK_REFERENCE_EVAL: dict[str, Any] = {"n_per_benchmark": 30, "curve_points": 0}


def _reference(preset_quick: bool, quick_steps: int | None) -> Callable[[bool], Any]:
    """A reference testbed: the CPU preset (quick or full); under ``--quick``, ``quick_steps``
    steps and the smaller evaluation of `QUICK_REFERENCE_EVAL`."""

    def build(quick: bool) -> ReproduceConfig:
        from ..reproduce.presets import cpu_config

        steps = quick_steps if quick else None
        # out, controllers, seeds and workers are filled in by the runner
        return cpu_config(quick=preset_quick, out="unset", controllers=("fixed-1.0",),
                          seeds=(0,), workers=1, steps=steps,
                          eval_overrides=QUICK_REFERENCE_EVAL if quick else None)  # fmt: skip

    return build


def _gym(**fields: Any) -> StudyConfig:
    return StudyConfig(steps=200, **fields)


# The full suite's gym seed count: PROTOCOL section 16.3 sizes it by a pilot (the smallest
# multiple of 10 in 30..100 at which the typical arm's regret CI half-width is <= 0.10 on every
# development gym testbed); 30 until the pilot's count is set here (sections 8 and 14 had 12).
GYM_FULL_SEEDS = 40
# section 14: the quick suite from 10 to 3 gym seeds for 29 arms
GYM_QUICK_SEEDS = 3
# section 16.3: 6 seeds (0..5) on both reference testbeds in the full suite (2 under --quick)
REFERENCE_FULL_SEEDS = 6

#: The suite, in report order (development first). See benchmarks/PROTOCOL.md, section 2.
TESTBEDS: dict[str, Testbed] = {
    t.name: t
    for t in (
        Testbed("gym-default", DEVELOPMENT, "TokenSearch defaults", GYM_FULL_SEEDS,
                GYM_QUICK_SEEDS, gym=_gym()),
        Testbed("gym-sharp", DEVELOPMENT, "sharpened prior: prior_margin=7", GYM_FULL_SEEDS,
                GYM_QUICK_SEEDS, gym=_gym(prior_margin=7.0)),
        Testbed("gym-flat", DEVELOPMENT, "flattened prior: prior_margin=2.5", GYM_FULL_SEEDS,
                GYM_QUICK_SEEDS, gym=_gym(prior_margin=2.5)),
        Testbed("reference-quick", DEVELOPMENT,
                "reference CPU preset, quick (150 steps; 25 under --quick)", REFERENCE_FULL_SEEDS,
                2,
                reference=_reference(preset_quick=True, quick_steps=25)),
        Testbed("gym-wide", HELD_OUT, "vocab_size=32, length=8, num_tasks=8", GYM_FULL_SEEDS,
                GYM_QUICK_SEEDS, gym=_gym(vocab_size=32, length=8, num_tasks=8)),
        Testbed("gym-partial-g4", HELD_OUT, "reward=partial, group_size=4", GYM_FULL_SEEDS,
                GYM_QUICK_SEEDS, gym=_gym(reward="partial", group_size=4)),
        Testbed("gym-honest-hard", HELD_OUT,
                "deceptive=False, families=(tail, double), noise_scale=0.5", GYM_FULL_SEEDS,
                GYM_QUICK_SEEDS,
                gym=_gym(deceptive=False, families=("tail", "double"), noise_scale=0.5)),
        Testbed("gym-sharp-g16", HELD_OUT,
                "prior_margin=6, length=8, families=(shoulder, double), group_size=16",
                GYM_FULL_SEEDS, GYM_QUICK_SEEDS,
                gym=_gym(prior_margin=6.0, length=8, families=("shoulder", "double"),
                         group_size=16)),
        Testbed("gym-flat-short", HELD_OUT,
                "prior_margin=3, vocab_size=8, length=4, families=(shoulder, tail)",
                GYM_FULL_SEEDS, GYM_QUICK_SEEDS,
                gym=_gym(prior_margin=3.0, vocab_size=8, length=4,
                         families=("shoulder", "tail"))),
        # by default the fixed grid, `recommended`, the mixtures and the bound rows only: every
        # arm at 6 seeds x ~85 s would not fit (PROTOCOL sections 15 and 16.5, point 5)
        Testbed("reference-full", HELD_OUT, "reference CPU preset, full (400 steps)",
                REFERENCE_FULL_SEEDS, None,
                reference=_reference(preset_quick=False, quick_steps=None),
                default_arms=("recommended", "mixture", "spread", *BOUND_ARMS)),
    )
}


def default_controllers() -> list[str]:
    """Every controller ``metactl gym-study`` runs by default (the same names), then the bound
    rows, fixed grid last."""
    adaptive = [c for c in STUDY_ARMS if c not in FIXED_GRID]
    return [*adaptive, *BOUND_ARMS, *FIXED_GRID]


def testbed_policy(name: str, testbed: Testbed) -> metactl.MetaPolicy:
    """Controller ``name`` as a run on ``testbed`` builds it (seed 0); a bound row as it would
    run if fixed T = 1.0 were the best fixed arm. Raises ``ValueError`` naming the controller
    and the testbed when it cannot be built there."""
    if not isinstance(testbed, Testbed):
        raise TypeError(f"testbed must be a Testbed, got {type(testbed).__name__}")
    if is_bound(name):  # its shape (the best fixed arm is known only after the grid has run)
        name = resolve_bound(name, "fixed-1.0")
    try:
        if testbed.gym is not None:
            return make_controller(name, testbed.gym, seed=0)
        return make_policy(reference_controller_name(name), steps=10, seed=0)
    except ValueError as exc:
        raise ValueError(f"controller {name!r} is not available on testbed {testbed.name!r} "
                         f"({exc})") from None


def check_controller(name: str, testbed: Testbed) -> None:
    """Raise ``ValueError`` unless controller ``name`` can be built for ``testbed``."""
    testbed_policy(name, testbed)


def is_likelihood_rule(name: str, testbed: Testbed) -> bool:
    """Whether controller ``name`` on ``testbed`` is a likelihood rule (it asks for the
    candidate likelihoods and the advantages, as TAMPO does): the runs whose logs hold signal
    diagnostics. Raises ``ValueError`` as :func:`check_controller` does."""
    return {"loglik", "advantages"} <= set(testbed_policy(name, testbed).requires)
