"""Named temperature controllers for the comparison, all as `metactl.MetaPolicy` objects.

Names: ``fixed-T`` (T on the paper grid 0.6..1.5), ``linear-A-B`` / ``cosine-A-B`` schedules,
``tampo`` (paper defaults), ``tampo-softmax``, ``hedge``, ``metagrad``, ``exp3``, ``ucb1``,
``thompson``, ``entropy-H`` (the E3 entropy-targeting rule with target H nats), and (issue 9,
untuned defaults) the TAMPO variants ``tampo-std`` (each step's signal standardised),
``tampo-sharp`` (``tau = 0.1`` inside sparsemax), ``tampo-tau-X``, ``tampo-sum`` (summed
likelihoods), and ``counterfactual``, ``uncertainty``, ``entropy-schedule-H0-H1`` (E3 toward a
target moving linearly from H0 to H1 nats over the run) with its default ``entropy-schedule``
(0.6 -> 0.15: annealed high to low, around the geometric mean 0.3 of ``entropy-0.3``).

Per-prompt controllers (issue 10, untuned defaults; a temperature per prompt group, keyed by
`tasks.Problem.context`): ``ptgs`` (`metactl.ptgs`, its pivot ramped over the run's steps),
``tampo-per-prompt`` (`metactl.tampo_per_prompt`) and ``linear-thompson``
(`metactl.linear_thompson` over the paper grid, the running pass rate as its feature).
`is_per_prompt` tells them apart.

Controllers over other sampling knobs (issue 12, TAMPO with the paper's defaults: ``alpha =
0.05``, sparsemax, nucleus selection ``0.7``): ``top-p`` (over ``top_p`` in ``TOP_P_GRID``
at the trainer's fixed temperature, ``GRPOConfig.rollout_temperature``, 1.0 by default) and
``tampo-joint`` (over ``metactl.grid(temperature=<the paper grid>, top_p=(0.9, 1.0))``, 20
settings). `controller_knobs` names the knobs an arm sets.

Example:
    >>> make_policy("fixed-1.2", steps=10, seed=0).select().value
    1.2
    >>> round(make_policy("linear-0.9-1.5", steps=3, seed=0).select().value, 2)
    0.9
    >>> make_policy("tampo", steps=10, seed=0).requires
    ('loglik', 'advantages')
"""

from __future__ import annotations

import math

import metactl

PAPER_ARMS: tuple[str, ...] = ("fixed-0.9", "fixed-1.2", "fixed-1.5", "linear-0.9-1.5", "tampo")
OPTIONAL_ARMS: tuple[str, ...] = ("tampo-softmax", "hedge", "metagrad", "exp3", "ucb1",
                                  "thompson", "entropy-0.3", "cosine-0.9-1.5", "tampo-std",
                                  "tampo-sharp", "tampo-sum", "counterfactual", "uncertainty",
                                  "entropy-schedule", "ptgs", "tampo-per-prompt",
                                  "linear-thompson", "recommended", "top-p", "tampo-joint")
PER_PROMPT_ARMS: tuple[str, ...] = ("ptgs", "tampo-per-prompt", "linear-thompson")
#: the ``top-p`` arm's candidates (at the trainer's temperature, 1.0 by default)
TOP_P_GRID: tuple[float, ...] = (0.8, 0.85, 0.9, 0.95, 1.0)
#: the ``tampo-joint`` arm's top-p values (crossed with the paper's temperatures)
JOINT_TOP_P: tuple[float, ...] = (0.9, 1.0)
#: the arms over knobs other than the temperature, and the knobs each sets
KNOB_ARMS: dict[str, tuple[str, ...]] = {"top-p": ("top_p",),
                                         "tampo-joint": ("temperature", "top_p")}


_SIMPLE_NAMES: tuple[str, ...] = ("tampo", "tampo-softmax", "hedge", "metagrad", "exp3", "ucb1",
                                  "thompson", "tampo-std", "tampo-sharp", "tampo-sum",
                                  "counterfactual", "uncertainty", "entropy-schedule",
                                  *PER_PROMPT_ARMS, "recommended", *KNOB_ARMS)
# (prefix, how many numbers follow it, what they are) of the parameterised names
_PARAMETERISED: dict[str, tuple[int, str]] = {
    "fixed": (1, "fixed-T"), "linear": (2, "linear-A-B"), "cosine": (2, "cosine-A-B"),
    "entropy": (1, "entropy-H"), "entropy-schedule": (2, "entropy-schedule-H0-H1"),
    "tampo-tau": (1, "tampo-tau-X"),
}
VALID_FORMS = (
    "fixed-T (T on the grid 0.6, 0.7, ..., 1.5), linear-A-B, cosine-A-B (A, B in [0.6, 1.5]), "
    "entropy-H (H > 0 nats), entropy-schedule-H0-H1 (H0, H1 > 0 nats), tampo-tau-X (X > 0), "
    + ", ".join(_SIMPLE_NAMES)
)


def _parse_name(name: str) -> tuple[str, tuple[float, ...]]:
    """Split ``name`` into its kind and numbers per the naming grammar; raises `ValueError`
    naming the controller and listing the valid forms (nothing is built)."""
    if not isinstance(name, str):
        raise TypeError(f"controller name must be a str, got {type(name).__name__}")
    if name in _SIMPLE_NAMES:
        return name, ()
    # the longest matching prefix: "entropy-schedule-..." is not "entropy-H"
    matches = [k for k in _PARAMETERISED if name == k or name.startswith(k + "-")]
    if matches:
        kind = max(matches, key=len)
        rest = name[len(kind) + 1:]
        count, form = _PARAMETERISED[kind]
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


def make_policy(name: str, steps: int, seed: int) -> metactl.MetaPolicy:
    """Build the meta-policy called ``name`` for a run of ``steps`` GRPO steps."""
    kind, values = _parse_name(name)
    grid = metactl.PAPER_TEMPERATURES
    try:
        if kind == "fixed":
            return metactl.MetaPolicy(grid, metactl.Fixed(values[0]), seed=seed)
        if kind in ("linear", "cosine"):
            rule = metactl.Schedule(kind, values[0], values[1], total_steps=steps)
            return metactl.MetaPolicy(grid, rule, seed=seed)
        if kind == "entropy":
            return metactl.MetaPolicy(grid, metactl.EntropyTarget(values[0]), seed=seed)
        if kind == "entropy-schedule" and values:  # without numbers: the default, below
            target = metactl.EntropySchedule(values[0], values[1], total_steps=steps)
            return metactl.MetaPolicy(grid, target, seed=seed)
        if kind == "tampo-tau":
            return metactl.MetaPolicy(grid, metactl.TAMPO(tau=values[0]), seed=seed)
    except ValueError as exc:
        raise ValueError(f"controller {name!r}: {exc}; valid forms: {VALID_FORMS}") from exc
    simple = {
        "tampo": lambda: metactl.tampo(seed=seed),
        "tampo-softmax": lambda: metactl.tampo(normalizer="softmax", seed=seed),
        "hedge": lambda: metactl.MetaPolicy(grid, metactl.Hedge(), seed=seed),
        "metagrad": lambda: metactl.MetaPolicy(grid, metactl.MetaGradient(), seed=seed),
        "exp3": lambda: metactl.MetaPolicy(grid, metactl.EXP3(), seed=seed),
        "ucb1": lambda: metactl.MetaPolicy(grid, metactl.UCB1(), seed=seed),
        "thompson": lambda: metactl.MetaPolicy(grid, metactl.ThompsonGaussian(), seed=seed),
        "tampo-std": lambda: metactl.MetaPolicy(grid, metactl.TAMPO(standardize="std"), seed=seed),
        "tampo-sharp": lambda: metactl.MetaPolicy(grid, metactl.TAMPO(tau=0.1), seed=seed),
        "tampo-sum": lambda: metactl.MetaPolicy(
            grid, metactl.TAMPO(likelihood_normalization="sum"), seed=seed),
        "counterfactual": lambda: metactl.MetaPolicy(grid, metactl.Counterfactual(), seed=seed),
        "uncertainty": lambda: metactl.MetaPolicy(grid, metactl.Uncertainty(), seed=seed),
        "entropy-schedule": lambda: metactl.MetaPolicy(
            grid, metactl.EntropySchedule(0.6, 0.15, total_steps=steps), seed=seed),
        # PTGS's values are continuous in [1/1.5, 1.5]; the paper grid only names the nearest
        # candidate (every arm logs the same K)
        "ptgs": lambda: metactl.ptgs(grid, seed=seed, total_steps=steps),
        "tampo-per-prompt": lambda: metactl.tampo_per_prompt(grid, seed=seed),
        "linear-thompson": lambda: metactl.linear_thompson(grid, seed=seed),
        # benchmarks/PROTOCOL.md section 7's choice, the same policy as the gym study's
        "recommended": lambda: metactl.recommended(seed=seed),
        # TAMPO with the paper's defaults (as metactl.tampo) over other knobs
        "top-p": lambda: metactl.MetaPolicy(
            TOP_P_GRID, metactl.TAMPO(alpha=0.05, normalizer="sparsemax"), metactl.Nucleus(0.7),
            seed, hyperparameter="top_p"),
        "tampo-joint": lambda: metactl.MetaPolicy(
            metactl.grid(temperature=grid, top_p=JOINT_TOP_P),
            metactl.TAMPO(alpha=0.05, normalizer="sparsemax"), metactl.Nucleus(0.7), seed,
            hyperparameter="joint"),
    }
    return simple[kind]()


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
    return name.startswith("fixed-")


def is_per_prompt(name: str) -> bool:
    """Whether ``name`` is a per-prompt arm (a temperature per prompt group).

    Example:
        >>> is_per_prompt("ptgs"), is_per_prompt("tampo")
        (True, False)
    """
    return name in PER_PROMPT_ARMS
