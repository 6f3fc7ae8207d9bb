"""The one registry of controller names: every lab command (``metactl reproduce``,
``gym-study``, ``scoreboard``) turns a name into a `metactl.MetaPolicy` here, so a name means
the same policy everywhere.

Names (temperatures on the paper grid 0.6..1.5 unless a knob arm says otherwise):

* ``fixed-T`` (T on the grid); the schedules ``linear-A-B`` and ``cosine-A-B`` (A, B in
  [0.6, 1.5]), ``linear`` being ``linear-0.9-1.5``.
* ``tampo`` (the paper's defaults, `metactl.tampo`), ``tampo-softmax``, and the untuned TAMPO
  variants ``tampo-std`` (each step's signal standardised), ``tampo-sharp`` (``tau = 0.1`` inside
  sparsemax), ``tampo-tau-X``, ``tampo-sum`` (summed likelihoods).
* the bandits and other rules at their defaults: ``hedge``, ``metagrad`` (also spelled
  ``metagradient``), ``exp3``, ``ucb1``, ``thompson``, ``counterfactual``, ``uncertainty``.
* entropy control: ``entropy-H`` (the E3 rule with target H nats), ``entropy`` (E3 toward the
  run's entropy target, 0.3 nats by default), ``entropy-e3`` (E3 with the target its reference
  code calibrates: the mean entropy of the first batch), ``entropy-schedule-H0-H1`` (a target moving
  linearly from H0 to H1 nats over the run) and ``entropy-schedule`` (from twice the run's
  entropy target to half of it: 0.6 -> 0.15 by default, annealed high to low around ``entropy``).
* per-prompt controllers (a temperature per prompt group; untuned defaults): ``ptgs`` (its pivot
  ramped over the run's steps; continuous temperatures in its range [1/1.5, 1.5], named by the
  nearest of 10 log-spaced candidates there), ``tampo-per-prompt``, ``linear-thompson``, and
  the temperature mixtures ``mixture`` (learned), ``mixture-variance`` and ``mixture-relative``
  (its two changes of ``benchmarks/PROTOCOL.md`` section 16.8: the variance signal, the
  relative step) and ``spread`` (uniform).
* two-phase arms, the scoreboard's bound rows spelled out (``benchmarks/PROTOCOL.md``
  section 16.2): ``switch-A-B-K`` (``metactl.Schedule("step", A, B, K)``: A for the steps
  ``0 .. K - 1``, then B; A, B in [0.6, 1.5], K an integer >= 1) and ``spread-then-B-K``
  (``metactl.Spread(then=B, after=K)``: the uniform mixture for K steps, then every prompt
  group at B, B on the grid; a per-prompt arm).
* ``recommended``: `metactl.recommended`, the choice of ``benchmarks/PROTOCOL.md`` section 16.6.
* arms over other sampler knobs (TAMPO with the paper's defaults): ``top-p`` (over ``top_p`` in
  `TOP_P_GRID` at the trainer's fixed temperature) and ``tampo-joint`` (over the paper's
  temperatures x ``top_p`` in `JOINT_TOP_P`, 20 settings).

`PAPER_ARMS` and `OPTIONAL_ARMS` are ``metactl reproduce``'s arms, `STUDY_ARMS` those of
``metactl gym-study`` and of the scoreboard (`FIXED_GRID` included).

Example:
    >>> make_policy("fixed-1.2", steps=10, seed=0).select().value
    1.2
    >>> round(make_policy("linear-0.9-1.5", steps=3, seed=0).select().value, 2)
    0.9
    >>> make_policy("tampo", steps=10, seed=0).requires
    ('loglik', 'advantages')
    >>> canonical_name("metagradient"), canonical_name("linear"), canonical_name("entropy")
    ('metagrad', 'linear-0.9-1.5', 'entropy-0.3')
    >>> [make_policy("switch-1.0-1.2-2", steps=10, seed=0).rule.at(s) for s in range(4)]
    [1.0, 1.0, 1.2, 1.2]
"""

from __future__ import annotations

import math
from collections.abc import Callable

import metactl
from metactl.recommended import CHOSEN_AS

__all__ = [
    "DEFAULT_ENTROPY_TARGET",
    "FIXED_GRID",
    "GRID",
    "JOINT_GRID",
    "JOINT_TOP_P",
    "KNOB_ARMS",
    "OPTIONAL_ARMS",
    "PAPER_ARMS",
    "PER_PROMPT_ARMS",
    "STUDY_ARMS",
    "TOP_P_GRID",
    "VALID_FORMS",
    "canonical_name",
    "controller_knobs",
    "is_fixed",
    "is_per_prompt",
    "make_policy",
    "validate_controller",
]

#: The paper's temperature grid 0.6..1.5, the candidates of every temperature arm.
GRID: tuple[float, ...] = tuple(metactl.PAPER_TEMPERATURES)
#: The entropy target (nats) of ``entropy`` and ``entropy-schedule`` unless a run sets another.
DEFAULT_ENTROPY_TARGET = 0.3
#: The fixed arms of the whole candidate grid 0.6..1.5.
FIXED_GRID: tuple[str, ...] = tuple(f"fixed-{t:.1f}" for t in GRID)
#: The ``top-p`` arm's candidates (at the trainer's fixed temperature, 1.0 by default).
TOP_P_GRID: tuple[float, ...] = (0.8, 0.85, 0.9, 0.95, 1.0)
#: The ``tampo-joint`` arm's top-p values (crossed with the paper's temperatures).
JOINT_TOP_P: tuple[float, ...] = (0.9, 1.0)
#: The ``tampo-joint`` arm's grid: the paper's temperatures x `JOINT_TOP_P`, K = 20.
JOINT_GRID = metactl.grid(temperature=GRID, top_p=JOINT_TOP_P)
#: The arms over knobs other than the temperature alone, and the knobs each sets.
KNOB_ARMS: dict[str, tuple[str, ...]] = {"top-p": ("top_p",),
                                         "tampo-joint": ("temperature", "top_p")}
PER_PROMPT_ARMS: tuple[str, ...] = ("ptgs", "tampo-per-prompt", "linear-thompson", "mixture",
                                    "mixture-variance", "mixture-relative",
                                    "spread")  # fmt: skip
#: ``metactl reproduce``'s default arms.
PAPER_ARMS: tuple[str, ...] = ("fixed-0.9", "fixed-1.2", "fixed-1.5", "linear-0.9-1.5", "tampo")
#: Further arms ``metactl reproduce --controllers`` documents.
OPTIONAL_ARMS: tuple[str, ...] = ("tampo-softmax", "hedge", "metagrad", "exp3", "ucb1",
                                  "thompson", "entropy-0.3", "entropy-e3", "cosine-0.9-1.5",
                                  "tampo-std", "tampo-sharp", "tampo-sum", "counterfactual",
                                  "uncertainty",
                                  "entropy-schedule", *PER_PROMPT_ARMS, "recommended",
                                  *KNOB_ARMS)  # fmt: skip
#: The arms of ``metactl gym-study`` (its ``--controllers all``) and of the scoreboard.
STUDY_ARMS: tuple[str, ...] = ("tampo", "tampo-softmax", "hedge", "metagradient", "exp3",
                               "entropy", "entropy-e3", "linear", "tampo-std", "tampo-sharp",
                               "tampo-sum", "counterfactual", "uncertainty", "entropy-schedule",
                               *PER_PROMPT_ARMS, "recommended", *KNOB_ARMS,
                               *FIXED_GRID)  # fmt: skip

# names without numbers -> their spelling with numbers, where they have one
_ALIASES: dict[str, str] = {"metagradient": "metagrad", "linear": "linear-0.9-1.5"}


def _tampo_over(candidates: tuple[float, ...] | metactl.KnobGrid,
                hyperparameter: str | None = None) -> Callable[[int, int, float],
                                                               metactl.MetaPolicy]:  # fmt: skip
    return lambda steps, seed, target: metactl.tampo(candidates, hyperparameter=hyperparameter,
                                                     seed=seed)


def _on_grid(rule: Callable[[int, float], metactl.Rule]) -> Callable[
        [int, int, float], metactl.MetaPolicy]:  # fmt: skip
    return lambda steps, seed, target: metactl.MetaPolicy(GRID, rule(steps, target), seed=seed)


# name -> build(steps, seed, entropy_target)
_SIMPLE: dict[str, Callable[[int, int, float], metactl.MetaPolicy]] = {
    "tampo": lambda steps, seed, target: metactl.tampo(seed=seed),
    "tampo-softmax": lambda steps, seed, target: metactl.tampo(normalizer="softmax", seed=seed),
    "hedge": _on_grid(lambda steps, target: metactl.Hedge()),
    "metagrad": _on_grid(lambda steps, target: metactl.MetaGradient()),
    "exp3": _on_grid(lambda steps, target: metactl.EXP3()),
    "ucb1": _on_grid(lambda steps, target: metactl.UCB1()),
    "thompson": _on_grid(lambda steps, target: metactl.ThompsonGaussian()),
    "tampo-std": _on_grid(lambda steps, target: metactl.TAMPO(standardize="std")),
    "tampo-sharp": _on_grid(lambda steps, target: metactl.TAMPO(tau=0.1)),
    "tampo-sum": _on_grid(lambda steps, target: metactl.TAMPO(likelihood_normalization="sum")),
    "counterfactual": _on_grid(lambda steps, target: metactl.Counterfactual()),
    "uncertainty": _on_grid(lambda steps, target: metactl.Uncertainty()),
    "entropy": _on_grid(lambda steps, target: metactl.EntropyTarget(target)),
    "entropy-schedule": _on_grid(
        lambda steps, target: metactl.EntropySchedule(2 * target, target / 2, total_steps=steps)),
    # PTGS's values are continuous in its range [1/1.5, 1.5]; its grid only names the nearest
    # candidate, so it is PTGS's own log-spaced grid over that range with the paper grid's K
    # (every temperature arm logs the same K)
    "ptgs": lambda steps, seed, target: metactl.ptgs(metactl.ptgs_candidates(k=len(GRID)),
                                                     seed=seed, total_steps=steps),
    "tampo-per-prompt": lambda steps, seed, target: metactl.tampo_per_prompt(GRID, seed=seed),
    "linear-thompson": lambda steps, seed, target: metactl.linear_thompson(GRID, seed=seed),
    "mixture": lambda steps, seed, target: metactl.mixture(GRID, seed=seed),
    "spread": lambda steps, seed, target: metactl.spread(GRID, seed=seed),
    # the two changes of PROTOCOL.md 16.8, one for each measured limit of the mixture
    "mixture-variance": lambda steps, seed, target: metactl.mixture(
        GRID, signal="variance", seed=seed),
    "mixture-relative": lambda steps, seed, target: metactl.mixture(GRID, relative=True, seed=seed),
    # E3 with its reference code's default: the target is the entropy of the first batch
    "entropy-e3": _on_grid(lambda steps, target: metactl.EntropyTarget()),
    "recommended": lambda steps, seed, target: metactl.recommended(seed=seed),
    "top-p": _tampo_over(TOP_P_GRID, hyperparameter="top_p"),
    "tampo-joint": _tampo_over(JOINT_GRID),
}
# prefix -> (how many numbers follow it, the form, build(numbers, steps) -> rule on the grid)
_PARAMETERISED: dict[str, tuple[int, str, Callable[[tuple[float, ...], int], metactl.Rule]]] = {
    "fixed": (1, "fixed-T", lambda v, steps: metactl.Fixed(v[0])),
    "linear": (2, "linear-A-B",
               lambda v, steps: metactl.Schedule("linear", v[0], v[1], total_steps=steps)),
    "cosine": (2, "cosine-A-B",
               lambda v, steps: metactl.Schedule("cosine", v[0], v[1], total_steps=steps)),
    "entropy": (1, "entropy-H", lambda v, steps: metactl.EntropyTarget(v[0])),
    "entropy-schedule": (2, "entropy-schedule-H0-H1",
                         lambda v, steps: metactl.EntropySchedule(v[0], v[1], total_steps=steps)),
    "tampo-tau": (1, "tampo-tau-X", lambda v, steps: metactl.TAMPO(tau=v[0])),
    "switch": (3, "switch-A-B-K",
               lambda v, steps: metactl.Schedule("step", v[0], v[1], total_steps=_steps(v[2]))),
    "spread-then": (2, "spread-then-B-K",
                    lambda v, steps: metactl.Spread(then=v[0], after=_steps(v[1]))),
}
#: The parameterised names whose arm decides per prompt group.
_PER_PROMPT_FORMS: tuple[str, ...] = ("spread-then",)


def _steps(value: float) -> int:
    """A step count written in a name (``10`` or ``10.0``): an integer, else ``ValueError``."""
    if not value.is_integer():
        raise ValueError(f"the step count K must be an integer, got {value:g}")
    return int(value)
VALID_FORMS = (
    "fixed-T (T on the grid 0.6, 0.7, ..., 1.5), linear-A-B, cosine-A-B (A, B in [0.6, 1.5]), "
    "entropy-H (H > 0 nats), entropy-schedule-H0-H1 (H0, H1 > 0 nats), tampo-tau-X (X > 0), "
    "switch-A-B-K (A, B in [0.6, 1.5], K an integer >= 1), spread-then-B-K (B on the grid, "
    "K an integer >= 0), "
    + ", ".join([*_SIMPLE, *_ALIASES])
)


def _parse_name(name: str) -> tuple[str, tuple[float, ...]]:
    """Split ``name`` into its kind and numbers per the naming grammar; raises `ValueError`
    naming the controller and listing the valid forms (nothing is built)."""
    if not isinstance(name, str):
        raise TypeError(f"controller name must be a str, got {type(name).__name__}")
    name = _ALIASES.get(name, name)
    if name in _SIMPLE:
        return name, ()
    # the longest matching prefix: "entropy-schedule-..." is not "entropy-H"
    matches = [k for k in _PARAMETERISED if name == k or name.startswith(k + "-")]
    if matches:
        kind = max(matches, key=len)
        count, form, _ = _PARAMETERISED[kind]
        rest = name[len(kind) + 1:]
        parts = rest.split("-") if rest else []
        try:
            values = tuple(float(x) for x in parts)
        except ValueError:
            values = ()
        if len(parts) == count and len(values) == count and all(
                math.isfinite(v) for v in values):
            return kind, values
        raise ValueError(f"controller {name!r} does not match {form} with finite numbers; "
                         f"valid forms: {VALID_FORMS}")
    raise ValueError(f"unknown controller {name!r}; valid forms: {VALID_FORMS}")


def _check_steps_and_seed(steps: int, seed: int) -> None:
    for label, value in (("steps", steps), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{label} must be an int, got {type(value).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")


def make_policy(name: str, steps: int, seed: int, *,
                entropy_target: float = DEFAULT_ENTROPY_TARGET) -> metactl.MetaPolicy:
    """Build the meta-policy called ``name`` for a run of ``steps`` steps.

    ``entropy_target`` (nats) is the run's target of ``entropy`` and ``entropy-schedule``;
    names with their own numbers (``entropy-0.5``) ignore it. Raises `ValueError` (one line,
    naming the controller and the valid forms) for a name outside the grammar or numbers the
    rule refuses.
    """
    _check_steps_and_seed(steps, seed)
    if isinstance(entropy_target, bool) or not isinstance(entropy_target, (int, float)):
        raise TypeError(f"entropy_target must be a float, got {type(entropy_target).__name__}")
    if not math.isfinite(entropy_target) or entropy_target <= 0:
        raise ValueError(f"entropy_target must be finite and > 0, got {entropy_target}")
    kind, values = _parse_name(name)
    try:
        if not values:  # a simple name ("entropy" is one, "entropy-H" is not)
            return _SIMPLE[kind](steps, seed, float(entropy_target))
        rule = _PARAMETERISED[kind][2](values, steps)
        return metactl.MetaPolicy(GRID, rule, seed=seed)
    except ValueError as exc:
        raise ValueError(f"controller {name!r}: {exc}; valid forms: {VALID_FORMS}") from exc


def validate_controller(name: str, steps: int = 1) -> str:
    """Check that ``name`` names a controller that can be built for a ``steps``-step run; returns
    ``name``. Raises `ValueError` (one line, naming the controller and the valid forms) otherwise.

    It builds the policy once and throws it away: a `MetaPolicy` is a few small numpy arrays, so
    this is cheap and has no side effects, and it applies exactly the checks a run would.

    Example:
        >>> validate_controller("linear-0.9-1.5")
        'linear-0.9-1.5'
        >>> validate_controller("fixed-abc")
        Traceback (most recent call last):
        ...
        ValueError: controller 'fixed-abc' does not match fixed-T with finite numbers; ...
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    make_policy(name, steps=steps, seed=0)
    return name


def canonical_name(name: str, entropy_target: float = DEFAULT_ENTROPY_TARGET) -> str:
    """``name`` spelled with its numbers where it has a shorter spelling (``linear`` ->
    ``linear-0.9-1.5``, ``metagradient`` -> ``metagrad``, ``entropy`` -> ``entropy-<target>``);
    any other valid name unchanged. Raises `ValueError` for an unknown name."""
    kind, _ = _parse_name(name)
    if kind == "entropy" and name == "entropy":
        return f"entropy-{entropy_target:g}"
    return _ALIASES.get(name, name)


def controller_knobs(name: str) -> tuple[str, ...]:
    """The sampler knobs the arm called ``name`` sets.

    Example:
        >>> controller_knobs("tampo"), controller_knobs("tampo-joint")
        (('temperature',), ('temperature', 'top_p'))
    """
    _parse_name(name)  # an unknown name raises, as everywhere else
    return KNOB_ARMS.get(name, ("temperature",))


def is_fixed(name: str) -> bool:
    """Whether ``name`` is a fixed-temperature arm."""
    if not isinstance(name, str):
        raise TypeError(f"controller name must be a str, got {type(name).__name__}")
    return name.startswith("fixed-")


def is_per_prompt(name: str) -> bool:
    """Whether ``name`` is a per-prompt arm (a temperature per prompt group).

    Example:
        >>> is_per_prompt("ptgs"), is_per_prompt("tampo"), is_per_prompt("spread-then-1.2-10")
        (True, False, True)
        >>> is_per_prompt("recommended")    # the learned mixture, one value per prompt group
        True
    """
    if not isinstance(name, str):
        raise TypeError(f"controller name must be a str, got {type(name).__name__}")
    if name in PER_PROMPT_ARMS:
        return True
    if name == "recommended":  # an alias of the arm the protocol chose
        return is_per_prompt(CHOSEN_AS)
    try:
        kind, values = _parse_name(name)
    except ValueError:
        return False
    return bool(values) and kind in _PER_PROMPT_FORMS
