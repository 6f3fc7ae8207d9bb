"""The verl adapter's feedback helpers (torch only, no verl): per-trajectory reductions of
right-padded per-token fields read response tokens only, so NaN or inf at padding never reaches
the feedback, and NaN at a response token is an error naming the field at once."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

import torch
from metactl.adapters.verl import feedback as fb

import metactl

NAN = float("nan")
INF = float("inf")

# two trajectories of 3 and 1 response tokens, right-padded to 3
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def _padded(rows: list[list[float]], pad: float) -> torch.Tensor:
    """Rows of MASK's lengths, padded with ``pad``."""
    return torch.tensor([row + [pad] * (3 - len(row)) for row in rows], dtype=torch.float32)


@pytest.mark.parametrize("pad", [0.0, NAN, INF, -INF])
def test_padding_never_reaches_the_feedback(pad: float) -> None:
    advantages = _padded([[0.5, 0.5, 0.5], [-0.5]], pad)
    scores = _padded([[0.0, 0.0, 1.0], [0.25]], pad)
    entropy = _padded([[1.0, 2.0, 3.0], [6.0]], pad)
    log_probs = [
        _padded([[-1.0, -2.0, -3.0], [-4.0]], pad),
        _padded([[0.0, 0.0, -3.0], [-1.0]], pad),
    ]
    assert fb.trajectory_advantages(advantages, MASK).tolist() == [0.5, -0.5]
    assert fb.trajectory_rewards(scores, MASK).tolist() == [1.0, 0.25]
    assert fb.entropy_totals(entropy, MASK) == (12.0, 4)
    assert fb.candidate_loglik_sums(log_probs, MASK).tolist() == [[-6.0, -3.0], [-4.0, -1.0]]
    assert fb.token_counts(MASK).tolist() == [3.0, 1.0]


def test_a_row_without_response_tokens_gives_zeros() -> None:
    mask = torch.tensor([[1, 1], [0, 0]])
    values = torch.tensor([[0.5, 0.5], [NAN, NAN]])
    assert fb.trajectory_advantages(values, mask).tolist() == [0.5, 0.0]
    assert fb.trajectory_rewards(values, mask).tolist() == [1.0, 0.0]
    assert fb.candidate_loglik_sums([values, values], mask).tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert fb.token_counts(mask).tolist() == [2.0, 0.0]


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda v: fb.trajectory_advantages(v, MASK), "advantages"),
        (lambda v: fb.trajectory_rewards(v, MASK), "rm_scores"),
        (lambda v: fb.entropy_totals(v, MASK), "entropy"),
        (lambda v: fb.candidate_loglik_sums([torch.zeros(2, 3), v], MASK), r"log_probs\[1\]"),
    ],
)
@pytest.mark.parametrize("bad", [NAN, INF])
def test_nan_at_a_response_token_is_an_error_naming_the_field(
    call: object, field: str, bad: float
) -> None:
    values = _padded([[0.0, 0.0, 0.0], [0.0]], 0.0)
    values[1, 0] = bad  # the second trajectory's only response token
    with pytest.raises(ValueError, match=rf"^{field} holds NaN or inf at 1 response token\(s\) "
                                         r"\(first: row 1, position 0\)"):  # fmt: skip
        call(values)  # type: ignore[operator]


def test_shapes_and_empty_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="rm_scores must have the shape of response_mask"):
        fb.trajectory_rewards(torch.zeros(2, 2), MASK)
    with pytest.raises(ValueError, match="log_probs is empty"):
        fb.candidate_loglik_sums([], MASK)
    with pytest.raises(TypeError, match=r"entropy must be a torch\.Tensor"):
        fb.entropy_totals(np.zeros((2, 3)), MASK)  # type: ignore[arg-type]


@pytest.mark.parametrize("normalization", ["mean", "sum"])
def test_summed_loglik_is_reduced_as_the_rule_reads_it(normalization: str) -> None:
    spec = metactl.MetaPolicy(
        [0.7, 1.0], metactl.TAMPO(likelihood_normalization=normalization), seed=0
    ).spec
    log_probs = [
        _padded([[-1.0, -2.0, -3.0], [-4.0]], NAN),
        _padded([[0.0, 0.0, -3.0], [-1.0]], NAN),
    ]
    feedback = metactl.build_feedback(
        spec,
        loglik_sum=fb.candidate_loglik_sums(log_probs, MASK),
        token_counts=fb.token_counts(MASK),
        advantages=fb.trajectory_advantages(_padded([[0.5] * 3, [-0.5]], NAN), MASK),
    )
    means, sums = [[-2.0, -1.0], [-4.0, -1.0]], [[-6.0, -3.0], [-4.0, -1.0]]
    expected = means if normalization == "mean" else sums
    assert feedback.loglik.tolist() == expected
    assert feedback.advantages.tolist() == [0.5, -0.5]
