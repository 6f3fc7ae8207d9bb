"""The synthetic reasoning task of the CPU-scale reproduction: modular operation chains with a
systematically biased teacher.

A problem is a chain ``a op1 b1 op2 b2 ... opL bL`` of single digits, evaluated left to right
modulo 10 (``+``, ``-``, ``*``). The prompt has a fixed width (the chain, then ``.`` fillers, then
``=``), and the completion writes the start value and every running value, separated by commas:

    prompt      ``3+5*8-6......=``    (max_len=6: width 1 + 2*6 + 1 = 14)
    completion  ``3,8,4,8<eos>``      ((3+5)=8, (8*8)%10=4, (4-6)%10=8); the answer is ``8``

With a fixed-width prompt, step i always reads its operator and operand at the same relative
offset, so a tiny transformer can learn the procedure from a short warm-up.

Why this task leaves room for RL and makes exploration matter (the design, decided up front):
a fixed, seeded subset of the "facts" ``(op, x, b)`` are *traps*. The warm-up teacher writes a
fixed wrong value at a trap with probability ``trap_bias`` and the right one otherwise, and then
continues the chain from what it wrote, as a systematically biased demonstrator would. After the
warm-up the model is confident and right on ordinary facts, but at a trap its most likely token is
wrong; the correct path is the *less likely* one (probability about ``1 - trap_bias`` at T = 1).
Greedy decoding therefore fails on every chain that contains a trap, so greedy accuracy sits well
below 100% (about the share of trap-free chains), while sampling finds the correct path with a
probability that grows with the temperature. Traps are independent facts, so RL must discover
and fix each one separately; that keeps headroom over hundreds of steps. Chains that hit more
traps are harder; the five held-out benchmarks are chains of length 2..6.

Per-prompt temperatures (`metactl.PTGS` and the other per-prompt policies) learn from prompts
that recur. By default every training prompt is fresh (an infinite stream): a problem's context
key (`Problem.context`) is then its chain length, a difficulty bucket. ``ChainTask(train_pool=P)``
instead trains on a fixed pool of ``P`` distinct problems (drawn once from ``task_seed``, never a
held-out one) visited in a fixed cycle by `PromptPool`; a problem's key is then its pool index.

Example:
    >>> task = ChainTask()
    >>> import numpy as np
    >>> p = task.make_problem([3, 5, 8, 6], ["+", "*", "-"])
    >>> p.prompt, p.answer, task.solution(p)
    ('3+5*8-6......=', '8', '3,8,4,8')
    >>> chain_reward("3,8,4,8", "8"), chain_reward("3,8,4,7", "8")
    (1.0, 0.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

_OPS: dict[str, object] = {
    "+": lambda x, b: (x + b) % 10,
    "-": lambda x, b: (x - b) % 10,
    "*": lambda x, b: (x * b) % 10,
}
FILLER = "."
ALPHABET = "0123456789+-*,=."
HELDOUT_PER_BENCHMARK = 500


def _apply(op: str, x: int, b: int) -> int:
    return int(_OPS[op](x, b))  # type: ignore[operator]


@dataclass(frozen=True)
class Problem:
    """One task instance: the prompt text, the reference answer and a few descriptors.

    ``pool_index``: its position in the training pool (`ChainTask.training_pool`), ``None``
    for a problem of the infinite stream.

    Example:
        >>> p = Problem(prompt="1+2..=", answer="3", length=1, digits=(1, 2), ops=("+",))
        >>> p.answer, p.context
        ('3', 1)
    """

    prompt: str
    answer: str
    length: int = 0
    digits: tuple[int, ...] = ()
    ops: tuple[str, ...] = ()
    pool_index: int | None = None

    @property
    def context(self) -> int:
        """The problem's key for a per-prompt policy: its pool index when it comes from a
        finite training pool, else its chain length (a difficulty bucket)."""
        return self.length if self.pool_index is None else self.pool_index


@dataclass(frozen=True)
class ChainTask:
    """Configuration and generators of the biased modular-chain task (see the module docstring).

    Args:
        ops: operators used in chains (subset of ``+ - *``).
        min_len, max_len: chain lengths (number of operations) of the training distribution.
        trap_fraction: share of facts ``(op, x, b)`` that are traps.
        trap_bias: probability that the warm-up teacher writes the wrong value at a trap.
        benchmark_lengths: chain length of each held-out benchmark (graded difficulty).
        task_seed: seeds the choice of traps and of their wrong values.
        train_pool: 0 (the default): every training prompt is a fresh draw; ``P > 0``: RL
            trains on a fixed pool of ``P`` distinct problems (`training_pool`), cycled
            (`PromptPool`), each keyed by its pool index (for per-prompt policies).

    Example:
        >>> task = ChainTask(trap_fraction=0.25)
        >>> round(len(task.traps) / (3 * 100), 2)
        0.25
    """

    ops: tuple[str, ...] = ("+", "-", "*")
    min_len: int = 1
    max_len: int = 6
    trap_fraction: float = 0.25
    trap_bias: float = 0.9
    benchmark_lengths: tuple[int, ...] = (2, 3, 4, 5, 6)
    task_seed: int = 1234
    train_pool: int = 0
    traps: dict[tuple[str, int, int], int] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        if not self.ops or any(op not in _OPS for op in self.ops) or len(set(self.ops)) != len(
            self.ops
        ):
            raise ValueError(f"ops must be distinct operators from {sorted(_OPS)}, got {self.ops}")
        if not (1 <= self.min_len <= self.max_len):
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        if not (0.0 <= self.trap_fraction <= 1.0):
            raise ValueError(f"trap_fraction must be in [0, 1], got {self.trap_fraction}")
        if not (0.0 <= self.trap_bias <= 1.0):
            raise ValueError(f"trap_bias must be in [0, 1], got {self.trap_bias}")
        if not self.benchmark_lengths or any(
            not (1 <= n <= self.max_len) for n in self.benchmark_lengths
        ):
            raise ValueError(
                f"benchmark_lengths must lie in [1, max_len={self.max_len}], "
                f"got {self.benchmark_lengths}"
            )
        if (isinstance(self.train_pool, bool) or not isinstance(self.train_pool, int)
                or self.train_pool < 0):
            raise ValueError(f"train_pool must be an int >= 0 (0: no pool), got "
                             f"{self.train_pool!r}")
        rng = np.random.default_rng(self.task_seed)
        facts = [(op, x, b) for op in self.ops for x in range(10) for b in range(10)]
        n_traps = round(self.trap_fraction * len(facts))
        chosen = rng.choice(len(facts), size=n_traps, replace=False)
        traps = {}
        for i in sorted(int(i) for i in chosen):
            op, x, b = facts[i]
            traps[(op, x, b)] = (_apply(op, x, b) + int(rng.integers(1, 10))) % 10
        object.__setattr__(self, "traps", traps)

    # -- identity ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-safe description of the configuration (used in cache keys and reports).
        ``train_pool`` appears only when set, so the default task keeps its keys."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        if not self.train_pool:
            del out["train_pool"]
        return out

    @property
    def width(self) -> int:
        """Number of prompt tokens: the start digit, ``max_len`` (op, operand) pairs and ``=``."""
        return 2 + 2 * self.max_len

    @property
    def max_completion_tokens(self) -> int:
        """Longest correct completion in tokens, EOS included."""
        return 2 * self.max_len + 2

    # -- generators -------------------------------------------------------------------------
    def make_problem(self, digits: Sequence[int], ops: Sequence[str]) -> Problem:
        """Build the problem for start digit ``digits[0]`` and steps ``zip(ops, digits[1:])``."""
        if len(digits) != len(ops) + 1 or not (1 <= len(ops) <= self.max_len):
            raise ValueError("need len(digits) == len(ops) + 1 and 1 <= len(ops) <= max_len")
        body = str(digits[0]) + "".join(f"{op}{b}" for op, b in zip(ops, digits[1:], strict=True))
        prompt = body + FILLER * (self.width - 1 - len(body)) + "="
        x = digits[0]
        for op, b in zip(ops, digits[1:], strict=True):
            x = _apply(op, x, b)
        return Problem(prompt, str(x), len(ops), tuple(int(d) for d in digits), tuple(ops))

    def sample(
        self, rng: np.random.Generator, n: int, length: int | None = None,
        exclude: frozenset[str] = frozenset(),
    ) -> list[Problem]:
        """Draw ``n`` problems (length uniform in [min_len, max_len] unless given), skipping
        prompts in ``exclude`` (the held-out benchmarks)."""
        out: list[Problem] = []
        while len(out) < n:
            n_ops = int(length if length is not None else rng.integers(self.min_len,
                                                                        self.max_len + 1))
            digits = [int(d) for d in rng.integers(0, 10, size=n_ops + 1)]
            ops = [self.ops[int(i)] for i in rng.integers(0, len(self.ops), size=n_ops)]
            p = self.make_problem(digits, ops)
            if p.prompt not in exclude:
                out.append(p)
        return out

    def training_pool(self, exclude: frozenset[str] = frozenset()) -> list[Problem]:
        """The ``train_pool`` distinct training problems (a deterministic function of the
        configuration: drawn with their own seed from ``task_seed``, skipping ``exclude``), each
        with its ``pool_index``. Raises `ValueError` when ``train_pool`` is 0 or larger than the
        distinct problems available."""
        if not self.train_pool:
            raise ValueError("train_pool is 0: this task has no finite training pool")
        available = sum(self.n_distinct(n) for n in range(self.min_len, self.max_len + 1))
        if self.train_pool > available // 2:
            raise ValueError(f"train_pool={self.train_pool} is too many distinct problems "
                             f"(at most {available // 2} for lengths {self.min_len}.."
                             f"{self.max_len})")
        rng = np.random.default_rng([self.task_seed, 7])
        seen: dict[str, Problem] = {}
        while len(seen) < self.train_pool:
            p = self.sample(rng, 1, exclude=exclude)[0]
            seen.setdefault(p.prompt, p)
        return [dataclasses.replace(p, pool_index=i) for i, p in enumerate(seen.values())]

    def solution(self, problem: Problem) -> str:
        """The correct completion text (without EOS)."""
        return self._write(problem, rng=None)

    def demonstration(self, problem: Problem, rng: np.random.Generator) -> str:
        """A warm-up demonstration from the biased teacher: at a trap it writes the trap's wrong
        value with probability ``trap_bias`` and continues the chain from what it wrote."""
        return self._write(problem, rng=rng)

    def _write(self, problem: Problem, rng: np.random.Generator | None) -> str:
        x = problem.digits[0]
        values = [x]
        for op, b in zip(problem.ops, problem.digits[1:], strict=True):
            wrong = self.traps.get((op, x, b))
            if wrong is not None and rng is not None and rng.random() < self.trap_bias:
                x = wrong
            else:
                x = _apply(op, x, b)
            values.append(x)
        return ",".join(str(v) for v in values)

    def n_traps(self, problem: Problem) -> int:
        """Number of trap facts met on the *correct* path of ``problem``."""
        x, hits = problem.digits[0], 0
        for op, b in zip(problem.ops, problem.digits[1:], strict=True):
            hits += (op, x, b) in self.traps
            x = _apply(op, x, b)
        return hits

    def n_distinct(self, length: int) -> int:
        """Number of distinct problems of a given chain length."""
        return 10 * (10 * len(self.ops)) ** length

    def benchmark(self, length: int, n: int, seed: int = 10_000) -> list[Problem]:
        """``n`` distinct problems of chain length ``length``, drawn with their own seed
        (so ``benchmark(L, n)`` is a prefix of ``benchmark(L, n + m)``)."""
        if n > self.n_distinct(length) // 2:
            raise ValueError(f"n={n} is too many distinct problems of length {length}")
        rng = np.random.default_rng([seed, length])
        seen: dict[str, Problem] = {}
        while len(seen) < n:
            p = self.sample(rng, 1, length=length)[0]
            seen.setdefault(p.prompt, p)
        return list(seen.values())

    def benchmarks(self, n_per: int, seed: int = 10_000) -> dict[str, list[Problem]]:
        """Five (by default) held-out evaluation sets of graded difficulty: ``chain-L`` holds
        ``n_per`` distinct problems of length L (the first of those `heldout_prompts` reserves)."""
        return {f"chain-{n}": self.benchmark(n, n_per, seed) for n in self.benchmark_lengths}


class PromptPool:
    """A finite training pool visited in a fixed cycle: each call ``pool(rng, n)`` returns the
    next ``n`` problems, wrapping around at the end (``rng`` is not used: the order is fixed, so
    every problem recurs once every ``len(pool) / n`` steps). Its position is its state
    (`state_dict`), which `GRPOTrainer` checkpoints and restores, so a resumed run draws what
    an uninterrupted one would.

    Example:
        >>> task = ChainTask(train_pool=4)
        >>> pool = PromptPool(task.training_pool())
        >>> [p.pool_index for p in pool(None, 3)], [p.pool_index for p in pool(None, 3)]
        ([0, 1, 2], [3, 0, 1])
        >>> pool.state_dict()
        {'position': 2}
    """

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        if not self.problems:
            raise ValueError("problems must hold at least one problem")
        self.position = 0

    def __len__(self) -> int:
        return len(self.problems)

    def __call__(self, rng: object, n: int) -> list[Problem]:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(self.problems):
            raise ValueError(f"n must be an int in [1, {len(self.problems)}] (the pool's size: "
                             f"a batch holds each problem at most once), got {n!r}")
        size, start = len(self.problems), self.position
        out = [self.problems[(start + i) % size] for i in range(n)]
        self.position = (start + n) % size
        return out

    def state_dict(self) -> dict:
        """``{"position": next index}``: JSON-safe."""
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`; raises `ValueError` for a position outside the pool."""
        position = state.get("position") if isinstance(state, dict) else None
        if (isinstance(position, bool) or not isinstance(position, int)
                or not 0 <= position < len(self.problems)):
            raise ValueError(f"prompt pool state must be {{'position': int in [0, "
                             f"{len(self.problems)})}}, got {state!r}")
        self.position = position


def heldout_prompts(task: ChainTask) -> frozenset[str]:
    """Prompts of the held-out benchmarks (the first `HELDOUT_PER_BENCHMARK` of each), which the
    warm-up and the RL prompt sampler never draw."""
    out: set[str] = set()
    for length in task.benchmark_lengths:
        n = min(HELDOUT_PER_BENCHMARK, task.n_distinct(length) // 4)
        out.update(p.prompt for p in task.benchmark(length, n))
    return frozenset(out)


def chain_reward(completion: str, answer: str) -> float:
    """Outcome reward: 1.0 when the last comma-separated value of ``completion`` equals
    ``answer``, else 0.0. Intermediate values are not checked (as in outcome-reward math RL).

    Example:
        >>> chain_reward("3,8,4,8", "8"), chain_reward("", "8"), chain_reward("3,8,4,8,", "8")
        (1.0, 0.0, 0.0)
    """
    last = completion.strip().split(",")[-1].strip()
    return 1.0 if last == answer.strip() else 0.0
