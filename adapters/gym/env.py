"""``TokenSearchEnv``: a token-by-token answer search where exploration genuinely matters.

An episode writes one answer of ``length`` tokens from a vocabulary of ``vocab_size`` tokens, one
token per step. The observation is the prefix written so far (padded with the token id
``vocab_size``) and the id of the task being answered; the action is the next token. When the
answer is complete, the environment scores it against the task's hidden target: exact match (1 or
0, like a verified math answer) or, with ``reward="partial"``, the fraction of positions that match.

Design (chosen from first principles, before any controller was run, and not tuned afterwards)
--------------------------------------------------------------------------------------------------
The environment also defines the *initial policy* of a learner, ``prior_logits(task_id)``, the way a
pretrained LLM defines the starting point of RL. It mirrors two facts about LLM answers:

* Most positions are "format" positions: the prior's mode (logit ``prior_margin`` above a bulk
  of near-zero logits) is the correct token. Sampling these at a low temperature is almost always
  right; a high temperature breaks them (at ``T = 1.5`` the mode keeps only about half of its mass).
* A few positions are "decisive": the correct token is not the prior's mode. With
  ``deceptive=True`` the mode of a decisive position is a wrong decoy token with the same confidence
  as a format token (the initial policy is confidently wrong); the target sits in the tail.

The target family of a task sets how far into the tail its answer lies:

========== ======================================================= ================================
family     decisive positions                                      P(success), prior at T = 1
========== ======================================================= ================================
shoulder   1, target is the second mode (``prior_margin - gap``)   ~ 5e-2  (easy)
tail       1, target has a bulk logit                              ~ 4e-3  (medium)
double     2, one shoulder and one bulk target                     ~ 8e-4  (hard)
========== ======================================================= ================================

Temperature therefore trades off in both directions: a higher temperature finds tail answers more
often but spoils format positions, and the best temperature moves as the policy learns (once the
decisive tokens have been found, a low temperature samples the whole answer most reliably). Tasks of
different families share every batch (``num_tasks`` tasks cycle through ``families``), so the best
temperature for one task is not the best for another.

Mixed sharpness (``prior_margins=(2.5, 7.0)``, cycled over the tasks, or ``prior_margin_range=
(low, high)``, drawn per task): the tasks of one environment start from priors of different
sharpness, as the prompts of a real data set do (a flat starting policy wants a low temperature, a
sharp one a high temperature), so one temperature per step cannot suit every task of a batch and a
temperature per task has something to find. Off by default (every task at ``prior_margin``).

The task set (targets, decoys, decisive positions, prior noise) is a deterministic function of the
configuration (``task_seed`` included): it is the definition of the environment, like a map. All
randomness of an episode (which task ``reset`` draws) comes from ``self.np_random``.

Example
-------
>>> import gymnasium as gym
>>> import metactl.adapters.gym  # registers metactl/TokenSearch-v0
>>> env = gym.make("metactl/TokenSearch-v0", vocab_size=8, length=3)
>>> obs, info = env.reset(seed=0)
>>> obs["prefix"].tolist()   # nothing written yet: all padding (= vocab_size)
[8, 8, 8]
>>> for _ in range(3):
...     obs, reward, terminated, truncated, info = env.step(0)
>>> terminated, reward in (0.0, 1.0)
(True, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = ["FAMILIES", "MAX_LENGTH", "TokenSearchConfig", "TokenSearchEnv"]

#: The target families, from easiest to hardest.
FAMILIES: tuple[str, ...] = ("shoulder", "tail", "double")
#: The longest answer the environment accepts (the registered ``max_episode_steps``).
MAX_LENGTH = 64

RewardMode = Literal["exact", "partial"]
_DEFAULT_MARGIN = 4.0


@dataclass(frozen=True)
class TokenSearchConfig:
    """Configuration of :class:`TokenSearchEnv` (validated on construction).

    Example
    -------
    >>> TokenSearchConfig(vocab_size=8, length=4).num_tasks
    6
    >>> TokenSearchConfig(vocab_size=1)
    Traceback (most recent call last):
    ...
    ValueError: vocab_size must be an integer >= 2, got 1
    """

    vocab_size: int = 16
    """Number of distinct tokens V (actions are ``0 .. V-1``; ``V`` is the padding id)."""
    length: int = 6
    """Answer length L (episode length), ``1 <= L <= MAX_LENGTH``."""
    num_tasks: int = 6
    """Number of tasks; task ``i`` gets family ``families[i % len(families)]``."""
    families: tuple[str, ...] = FAMILIES
    """Target families to cycle through (each one of :data:`FAMILIES`)."""
    reward: RewardMode = "exact"
    """``"exact"``: 1 if the whole answer matches, else 0; ``"partial"``: fraction that matches."""
    deceptive: bool = True
    """Give every decisive position a confident wrong decoy mode in the prior."""
    prior_margin: float = _DEFAULT_MARGIN
    """Logit of the prior's mode token above the bulk (format tokens and decoys), every task."""
    prior_margins: tuple[float, ...] | None = None
    """Mixed sharpness, listed: task ``i`` gets the margin ``prior_margins[i % len]`` instead of
    ``prior_margin`` (e.g. ``(2.5, 7.0)``: a flat and a sharp starting policy alternate over the
    tasks, crossed with the families when the two lengths are coprime). ``None``: off."""
    prior_margin_range: tuple[float, float] | None = None
    """Mixed sharpness, drawn: task ``i`` gets a margin drawn uniformly from ``[low, high]`` by a
    generator of its own (seeded by ``task_seed``; the rest of the task set is unchanged).
    ``None``: off. At most one of ``prior_margins``, ``prior_margin_range`` may be given, and
    then ``prior_margin`` must keep its default (it would be unused)."""
    shoulder_gap: float = 1.5
    """A shoulder target's logit sits this far below the mode."""
    noise_scale: float = 0.3
    """Standard deviation of the Gaussian noise on the bulk logits of the prior."""
    task_seed: int = 0
    """Seed of the (deterministic) task set: targets, decoys, decisive positions, prior noise."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "length", "num_tasks", "task_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be an integer >= 2, got {self.vocab_size}")
        if not 1 <= self.length <= MAX_LENGTH:
            raise ValueError(f"length must be an integer in [1, {MAX_LENGTH}], got {self.length}")
        if self.num_tasks < 1:
            raise ValueError(f"num_tasks must be an integer >= 1, got {self.num_tasks}")
        if self.task_seed < 0:
            raise ValueError(f"task_seed must be >= 0, got {self.task_seed}")
        if isinstance(self.families, str) or not isinstance(self.families, Sequence):
            raise TypeError(f"families must be a sequence of names, got {self.families!r}")
        object.__setattr__(self, "families", tuple(self.families))
        if not self.families:
            raise ValueError("families must name at least one target family")
        for family in self.families:
            if family not in FAMILIES:
                raise ValueError(f"unknown target family {family!r}; choose from {FAMILIES}")
        if self.reward not in ("exact", "partial"):
            raise ValueError(f"reward must be 'exact' or 'partial', got {self.reward!r}")
        if not isinstance(self.deceptive, bool):
            raise TypeError(f"deceptive must be a bool, got {type(self.deceptive).__name__}")
        for name in ("prior_margin", "shoulder_gap", "noise_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
                raise TypeError(f"{name} must be a float, got {type(value).__name__}")
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        self._check_margin_options()
        need = max(_DECISIVE[f] for f in self.families)
        if need > self.length:
            raise ValueError(
                f"length={self.length} is too short for families {self.families}: "
                f"a task needs up to {need} decisive positions"
            )


    def _check_margin_options(self) -> None:
        listed, drawn = self.prior_margins, self.prior_margin_range
        if listed is None and drawn is None:
            return
        if listed is not None and drawn is not None:
            raise ValueError("give prior_margins or prior_margin_range, not both")
        if self.prior_margin != _DEFAULT_MARGIN:
            which = "prior_margins" if listed is not None else "prior_margin_range"
            raise ValueError(
                f"{which} sets every task's margin: leave prior_margin at its default "
                f"{_DEFAULT_MARGIN} (got {self.prior_margin})"
            )
        name = "prior_margins" if listed is not None else "prior_margin_range"
        values = listed if listed is not None else drawn
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"{name} must be a tuple of floats, got {values!r}")
        out = []
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer,
                                                                np.floating)):
                raise TypeError(f"{name}[{i}] must be a float, got {type(value).__name__}")
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name}[{i}] must be finite and >= 0, got {value}")
            out.append(float(value))
        if listed is not None and not out:
            raise ValueError("prior_margins must list at least one margin")
        if drawn is not None and (len(out) != 2 or out[0] > out[1]):
            raise ValueError(f"prior_margin_range must be (low, high) with low <= high, got "
                             f"{tuple(drawn)}")
        object.__setattr__(self, name, tuple(out))

    def task_margins(self) -> np.ndarray:
        """The prior margin of every task, shape ``(num_tasks,)`` (see ``prior_margins`` and
        ``prior_margin_range``; otherwise ``prior_margin`` everywhere).

        >>> TokenSearchConfig(num_tasks=4, prior_margins=(2.5, 7.0)).task_margins().tolist()
        [2.5, 7.0, 2.5, 7.0]
        """
        n = self.num_tasks
        if self.prior_margins is not None:
            return np.array([self.prior_margins[i % len(self.prior_margins)] for i in range(n)])
        if self.prior_margin_range is not None:
            low, high = self.prior_margin_range
            # a generator of its own: the targets, decoys and noise stay those of task_seed
            return np.random.default_rng([self.task_seed, 1]).uniform(low, high, size=n)
        return np.full(n, float(self.prior_margin))


# Decisive positions per family, and the kind of target at each of them.
_DECISIVE: dict[str, int] = {"shoulder": 1, "tail": 1, "double": 2}
_TARGET_KINDS: dict[str, tuple[str, ...]] = {
    "shoulder": ("shoulder",),
    "tail": ("bulk",),
    "double": ("shoulder", "bulk"),
}


class TokenSearchEnv(gym.Env[dict[str, Any], np.int64]):
    """Write an answer token by token; a hidden target scores it at the end.

    Observation: ``{"task": Discrete(num_tasks), "prefix": MultiDiscrete([V + 1] * L)}``, the prefix
    written so far padded with ``V``. Action: ``Discrete(V)``. Reward: 0 until the last token, then
    :meth:`score` of the answer. ``reset(options={"task_id": i})`` picks the task; otherwise it is
    drawn uniformly from ``self.np_random``.

    Keyword arguments are the fields of :class:`TokenSearchConfig` (or pass ``config=``).

    Example
    -------
    >>> env = TokenSearchEnv(vocab_size=8, length=3, num_tasks=3)
    >>> obs, info = env.reset(seed=1, options={"task_id": 2})
    >>> info["family"], int(obs["task"])
    ('double', 2)
    >>> env.prior_logits(2).shape   # (position, previous token or BOS, next token)
    (3, 9, 8)
    >>> env.score(np.array([2]), env.targets[2][None]).tolist()
    [1.0]
    """

    metadata: dict[str, Any] = {"render_modes": ["ansi"], "render_fps": 4}  # noqa: RUF012

    def __init__(
        self,
        config: TokenSearchConfig | None = None,
        render_mode: str | None = None,
        **kwargs: Any,
    ) -> None:
        if config is not None and kwargs:
            raise TypeError("pass either config= or keyword fields of TokenSearchConfig, not both")
        if config is None:
            config = TokenSearchConfig(**kwargs)
        elif not isinstance(config, TokenSearchConfig):
            raise TypeError(f"config must be a TokenSearchConfig, got {type(config).__name__}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be None or one of {self.metadata['render_modes']}, "
                f"got {render_mode!r}"
            )
        self.config = config
        self.render_mode = render_mode
        v, length = config.vocab_size, config.length
        self.observation_space = spaces.Dict(
            {
                "task": spaces.Discrete(config.num_tasks),
                "prefix": spaces.MultiDiscrete(np.full(length, v + 1, dtype=np.int64)),
            }
        )
        self.action_space = spaces.Discrete(v)
        self.pad_id = v
        self._build_tasks()
        self._task = 0
        self._prefix = np.full(length, self.pad_id, dtype=np.int64)
        self._t = 0

    # ------------------------------------------------------------------ task set
    def _build_tasks(self) -> None:
        """Build targets, decoys and the prior deterministically from the config."""
        cfg = self.config
        rng = np.random.default_rng(cfg.task_seed)
        v, length, n = cfg.vocab_size, cfg.length, cfg.num_tasks
        self.families: tuple[str, ...] = tuple(
            cfg.families[i % len(cfg.families)] for i in range(n)
        )
        self.targets = np.zeros((n, length), dtype=np.int64)
        self.decisive = np.zeros((n, length), dtype=bool)
        prior = np.zeros((n, length, v), dtype=np.float64)
        self.margins = cfg.task_margins()
        for i, family in enumerate(self.families):
            margin = float(self.margins[i])
            kinds = _TARGET_KINDS[family]
            positions = np.sort(rng.choice(length, size=len(kinds), replace=False))
            for t in range(length):
                z = rng.normal(0.0, cfg.noise_scale, size=v)
                # distinct tokens: mode (target of a format position, or decoy), target
                tokens = rng.choice(v, size=2, replace=False)
                mode, target = int(tokens[0]), int(tokens[-1])
                if t in positions:
                    kind = kinds[int(np.flatnonzero(positions == t)[0])]
                    self.decisive[i, t] = True
                    if cfg.deceptive:
                        z[mode] = margin
                    if kind == "shoulder":
                        z[target] = margin - cfg.shoulder_gap
                    else:
                        z[target] = 0.0
                else:
                    target = mode
                    z[mode] = margin
                self.targets[i, t] = target
                prior[i, t] = z
        self._prior = prior
        self._prior.setflags(write=False)
        self.targets.setflags(write=False)
        self.decisive.setflags(write=False)
        self.margins.setflags(write=False)

    @property
    def num_tasks(self) -> int:
        """Number of tasks."""
        return self.config.num_tasks

    def prior_logits(self, task_id: int) -> np.ndarray:
        """Logits of the initial policy for ``task_id``, shape ``(L, V + 1, V)``.

        Entry ``[t, prev, :]`` holds the logits of the token at position ``t`` after the token
        ``prev`` (``prev = V`` at ``t = 0``: begin of answer). The prior is position-wise (the same
        for every ``prev``); a learner's table may then become context dependent. Returns a copy.
        """
        task_id = self._check_task(task_id)
        z = self._prior[task_id]
        return np.repeat(z[:, None, :], self.config.vocab_size + 1, axis=1).copy()

    def score(self, task_ids: np.ndarray, answers: np.ndarray) -> np.ndarray:
        """Reward of complete answers (vectorised); the single definition used by :meth:`step`.

        ``task_ids``: shape ``(N,)``; ``answers``: shape ``(N, L)`` ints. Returns ``(N,)`` float64.
        """
        task_ids = np.asarray(task_ids)
        answers = np.asarray(answers)
        if task_ids.ndim != 1 or answers.shape != (task_ids.shape[0], self.config.length):
            raise ValueError(
                f"score expects task_ids (N,) and answers (N, {self.config.length}), "
                f"got {task_ids.shape} and {answers.shape}"
            )
        if task_ids.size and (task_ids.min() < 0 or task_ids.max() >= self.num_tasks):
            raise ValueError(f"task_ids must lie in [0, {self.num_tasks})")
        match = answers == self.targets[task_ids]
        if self.config.reward == "exact":
            return match.all(axis=1).astype(np.float64)
        return match.mean(axis=1, dtype=np.float64)

    def _check_task(self, task_id: Any) -> int:
        if isinstance(task_id, bool) or not isinstance(task_id, (int, np.integer)):
            raise TypeError(f"task_id must be an int, got {type(task_id).__name__}")
        if not 0 <= task_id < self.num_tasks:
            raise ValueError(f"task_id must lie in [0, {self.num_tasks}), got {task_id}")
        return int(task_id)

    # ------------------------------------------------------------------ gym API
    def _obs(self) -> dict[str, Any]:
        return {"task": np.int64(self._task), "prefix": self._prefix.copy()}

    def _info(self) -> dict[str, Any]:
        return {"task_id": self._task, "family": self.families[self._task], "position": self._t}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Start a new answer; ``options={"task_id": i}`` fixes the task."""
        super().reset(seed=seed)
        options = dict(options or {})
        task = options.pop("task_id", None)
        if options:
            raise ValueError(f"unknown reset options {sorted(options)}; only 'task_id' is accepted")
        if task is None:
            self._task = int(self.np_random.integers(self.num_tasks))
        else:
            self._task = self._check_task(task)
        self._prefix = np.full(self.config.length, self.pad_id, dtype=np.int64)
        self._t = 0
        return self._obs(), self._info()

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        """Append ``action`` to the answer; the last token ends the episode with the score."""
        if self._t >= self.config.length:
            raise RuntimeError("the answer is complete; call reset() before step()")
        if not self.action_space.contains(action):
            raise ValueError(
                f"action must be an int in [0, {self.config.vocab_size}), got {action!r}"
            )
        self._prefix[self._t] = int(action)
        self._t += 1
        terminated = self._t == self.config.length
        reward = 0.0
        info = self._info()
        if terminated:
            reward = float(self.score(np.array([self._task]), self._prefix[None])[0])
            info["success"] = bool(np.array_equal(self._prefix, self.targets[self._task]))
        return self._obs(), reward, terminated, False, info

    def render(self) -> str | None:
        """``render_mode="ansi"``: the task and the prefix as text."""
        if self.render_mode != "ansi":
            return None
        written = " ".join(str(int(x)) for x in self._prefix[: self._t])
        return f"task {self._task} ({self.families[self._task]}): [{written}]"
