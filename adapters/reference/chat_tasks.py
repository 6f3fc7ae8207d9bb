"""Checkable chat tasks for pretrained instruct models, generated locally with a seed.

A :class:`ChatTask` draws small integer problems, asks them as one user message in the model's
own chat template (``tokenizer.apply_chat_template(..., add_generation_prompt=True)``, with the
template's default system prompt), and :func:`reward` checks a completion against the answer.
Nothing is downloaded: the problems come from a seeded NumPy generator.

Families (the user message; ``a``, ``b``, ``start`` and ``step`` drawn uniformly in the task's
ranges, both ends included):

* ``"add"``: ``"What is {a} + {b}? Answer with just the number."``; answer ``a + b``.
* ``"next"``: ``"What is the next number in the sequence {x0}, {x1}, {x2}, {x3}? Answer with
  just the number."`` (``x_i = start + i * step``); answer ``start + 4 * step``.

Answer check (the same for every family): the completion is cut at the first end-of-turn marker
(``<|im_end|>``, or ``<|endoftext|>``), the *last* integer in what is left (an optional minus sign
and digits) is the model's answer (the usual "last number" rule: a restated equation ends
with its result), and the reward is 1.0 when it equals the reference answer,
else 0.0. So ``"17 + 25 = 42."`` and ``"42"`` earn 1.0, ``"17 + 25 = 32."`` and a completion
without a number earn 0.0.

:data:`SMOLLM2_TASK` is the task sized to SmolLM2-135M-Instruct's frontier: the first of a list of
candidates, fixed before measuring, whose pass@1 at T = 1 lay in [0.10, 0.60] (see
``benchmarks/smollm2_start.py``).

Example:
    >>> task = ChatTask("add", low=0, high=9)
    >>> problems = task.problems(3, seed=0)
    >>> len(problems), problems[0].question.startswith("What is ")
    (3, True)
    >>> reward("3 + 4 = 7.", "7"), reward("The answer is 8.<|im_end|>7", "7")
    (1.0, 0.0)
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FAMILIES", "SMOLLM2_TASK", "ChatProblem", "ChatTask", "extract_answer", "reward"]

#: The task families (see the module docstring).
FAMILIES: tuple[str, ...] = ("add", "next")
#: Markers that end a turn: text after the first one is not part of the answer.
END_MARKERS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>")
_SUFFIX = "Answer with just the number."
_INTEGER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class ChatProblem:
    """One problem: the user message and the reference answer (an integer, as text).

    ``context`` is a key for per-prompt policies: the problem's index in its batch.

    Example:
        >>> ChatProblem("What is 2 + 2? Answer with just the number.", "4").answer
        '4'
    """

    question: str
    answer: str
    context: int = 0

    def messages(self) -> list[dict[str, str]]:
        """The chat messages (one user turn) for ``apply_chat_template``."""
        return [{"role": "user", "content": self.question}]


def _check_int(value: object, name: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


@dataclass(frozen=True)
class ChatTask:
    """A family of small integer problems and its range of operands.

    Args:
        family: one of :data:`FAMILIES`.
        low, high: operands (``a``, ``b``; ``start`` for ``"next"``) are drawn uniformly from
            ``[low, high]``, both included; ``0 <= low < high``.
        max_step: ``"next"`` only: the sequence's step is drawn from ``[1, max_step]``.

    Raises:
        TypeError, ValueError: a bad argument (the message names it).

    Example:
        >>> p = ChatTask("next", low=0, high=1, max_step=1).problems(1, seed=0)[0]
        >>> p.question, p.answer
        ('What is the next number in the sequence 1, 2, 3, 4? Answer with just the number.', '5')
    """

    family: str = "add"
    low: int = 0
    high: int = 19
    max_step: int = 5

    def __post_init__(self) -> None:
        if not isinstance(self.family, str):
            raise TypeError(f"family must be a str, one of {list(FAMILIES)}, got "
                            f"{type(self.family).__name__}")  # fmt: skip
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {list(FAMILIES)}, got {self.family!r}")
        low = _check_int(self.low, "low", minimum=0)
        high = _check_int(self.high, "high")
        if high <= low:
            raise ValueError(f"high must be > low, got low={low}, high={high}")
        _check_int(self.max_step, "max_step", minimum=1)

    def describe(self) -> str:
        """A short label, e.g. ``"add a, b in [0, 9]"``."""
        if self.family == "next":
            return f"next start in [{self.low}, {self.high}], step in [1, {self.max_step}]"
        return f"{self.family} a, b in [{self.low}, {self.high}]"

    def problems(self, n: int, seed: int) -> list[ChatProblem]:
        """``n`` problems drawn from a NumPy generator seeded with ``seed`` (reproducible).

        Example:
            >>> ChatTask().problems(2, seed=1) == ChatTask().problems(2, seed=1)
            True
        """
        n = _check_int(n, "n", minimum=1)
        seed = _check_int(seed, "seed", minimum=0)
        rng = np.random.default_rng(seed)
        out = []
        for i in range(n):
            a = int(rng.integers(self.low, self.high + 1))
            b = int(rng.integers(self.low, self.high + 1))
            step = int(rng.integers(1, self.max_step + 1)) if self.family == "next" else 0
            out.append(self._problem(a, b, step, context=i))
        return out

    @property
    def n_distinct(self) -> int:
        """How many distinct problems the task has: every ``(a, b)`` pair for ``"add"``,
        every ``(start, step)`` for ``"next"``.

        Example:
            >>> ChatTask("add", low=0, high=19).n_distinct
            400
        """
        width = self.high - self.low + 1
        return width * width if self.family == "add" else width * self.max_step

    def distinct_problems(self, seed: int) -> list[ChatProblem]:
        """Every distinct problem of the task once, in an order shuffled by ``seed``
        (``context``: the position in that order). Its first problems make a held-out set
        that no other problem repeats: evaluate on ``[:n]``, train on ``[n:]``.

        Example:
            >>> problems = ChatTask("add", low=0, high=2).distinct_problems(seed=0)
            >>> len(problems), len({p.question for p in problems}), problems[4].context
            (9, 9, 4)
        """
        seed = _check_int(seed, "seed", minimum=0)
        values = range(self.low, self.high + 1)
        second = values if self.family == "add" else range(1, self.max_step + 1)
        pairs = [(x, y) for x in values for y in second]
        order = np.random.default_rng(seed).permutation(len(pairs))
        out = []
        for i, j in enumerate(order):
            x, y = pairs[int(j)]
            out.append(self._problem(x, y, 0, context=i) if self.family == "add"
                       else self._problem(x, 0, y, context=i))
        return out

    def _problem(self, a: int, b: int, step: int, context: int) -> ChatProblem:
        """The problem of operands ``a``, ``b`` (``"add"``) or of ``start = a`` and ``step``
        (``"next"``)."""
        if self.family == "add":
            question, answer = f"What is {a} + {b}? {_SUFFIX}", a + b
        else:
            terms = ", ".join(str(a + j * step) for j in range(4))
            question = f"What is the next number in the sequence {terms}? {_SUFFIX}"
            answer = a + 4 * step
        return ChatProblem(question=question, answer=str(answer), context=context)

    def prompts(self, tokenizer: Any, problems: Sequence[ChatProblem]) -> list[str]:
        """Each problem as prompt text in ``tokenizer``'s chat template, ending where the
        assistant's answer starts (tokenize it with ``add_special_tokens=False``).

        Example:
            >>> from metactl.adapters.models import load_model
            >>> _, tok = load_model("smollm2")  # doctest: +SKIP
            >>> ChatTask().prompts(tok, ChatTask().problems(1, 0))[0][-22:]  # doctest: +SKIP
            '<|im_start|>assistant\\n'
        """
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("tokenizer has no chat template (an instruct model's tokenizer "
                             "is needed)")  # fmt: skip
        return [
            tokenizer.apply_chat_template(p.messages(), tokenize=False, add_generation_prompt=True)
            for p in problems
        ]


def extract_answer(completion: str) -> str | None:
    """The last integer in ``completion`` before its first end-of-turn marker, or ``None``.

    Example:
        >>> extract_answer("17 + 25 = 42."), extract_answer("no idea"), extract_answer("-3")
        ('42', None, '-3')
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    for marker in END_MARKERS:
        completion = completion.split(marker, 1)[0]
    found = _INTEGER.findall(completion)
    if not found:
        return None
    return str(int(found[-1]))


def reward(completion: str, answer: str) -> float:
    """1.0 when the completion's final integer (:func:`extract_answer`) equals ``answer``.

    Example:
        >>> reward("17 + 25 = 42.", "42"), reward("17 + 25 = 32.", "42"), reward("", "42")
        (1.0, 0.0, 0.0)
    """
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    got = extract_answer(completion)
    return 1.0 if got is not None and got == answer.strip() else 0.0


#: The task at SmolLM2-135M-Instruct's frontier (chosen by ``benchmarks/smollm2_start.py``).
SMOLLM2_TASK = ChatTask("add", low=0, high=19)
