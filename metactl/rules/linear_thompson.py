"""LinearThompson: a contextual bandit over the candidate grid whose contexts are described by
features, so new prompts benefit from what old prompts taught it.

Each context x is described by ``phi(x) = [1, c_x, c_x ** 2, features_x...]`` where
``c_x = pbar_x - 1/2`` and ``pbar_x = (s_x + 1) / (s_x + f_x + 2)`` is the context's running
pass rate (discounted success/failure counts ``s_x, f_x`` as in PTGS, prior ``Beta(1, 1)``)
and ``features_x`` the optional user features (``feature_dim`` of them, given to ``select``).

For every candidate k a Bayesian linear model ``y = phi . w_k + noise`` (prior
``w_k ~ N(0, I / ridge)``, known noise standard deviation ``noise_std``) predicts the
*learning signal* of a prompt group sampled at candidate k: ``y`` = the population standard
deviation of the group's G rewards (0 when every rollout got the same reward, i.e. the group
gives GRPO no gradient; at most 1/2 for rewards in [0, 1]). Selection is Thompson sampling,
one draw per context: ``score_k = phi . mu_k + sqrt(phi' Sigma_k phi) z_k`` with
``z ~ N(0, 1)`` from the policy's generator (K normals per context, in order), and the context
gets ``argmax_k score_k``. The models are shared by all contexts: an unseen prompt (running
pass rate 1/2, its own features) gets the shared model's choice at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy.special import log_ndtr

from .._validation import integer, positive_scalar, unit_interval
from ..selectors import Greedy, Selector
from . import base
from .base import DEFAULT_MAX_CONTEXTS, Draw, Rule, state_field
from .ptgs import PassCountRows, check_pass_counts, check_unit_rewards

__all__ = ["LinearThompson"]

#: The most features per context: the state holds K (3 + feature_dim)^2 numbers.
MAX_FEATURES = 256
_QUADRATURE_NODES = 16
_NODES, _WEIGHTS = np.polynomial.hermite.hermgauss(_QUADRATURE_NODES)
# Up to this many contexts, the win probabilities of every candidate are computed in one pass
# (a (n, K, Q, K) array); more contexts take one candidate at a time.
_VECTOR_ROWS = 64


@dataclass(frozen=True)
class LinearThompson(PassCountRows, Rule):
    """Thompson sampling over per-candidate Bayesian linear models of the group's reward
    spread, on the context's running pass rate and features (see the module docstring).

    Args:
        gamma: discount of each context's pass-rate counts per update of it, in (0, 1].
        ridge: prior precision of every weight, ``> 0``.
        noise_std: the reward-spread model's noise standard deviation, ``> 0``.
        feature_dim: number of user features per context (0: the running pass rate only);
            with ``feature_dim > 0``, ``select(contexts=..., features=(n, feature_dim))``.
        max_contexts: the most contexts stored (least recently updated evicted beyond).

    Values are candidates (``on_grid`` True). ``Decision.prob`` is the probability that the
    chosen candidate wins the Thompson draw (16-node Gauss-Hermite quadrature of the
    independent Gaussian scores); ``context_probs`` and ``probs`` give those win probabilities
    for every candidate, renormalised to sum 1. The global policy (``select()`` without
    contexts) is one context with the pooled pass rate of all rows and all-zero features.
    base.Feedback: ``rewards`` (N,) in [0, 1], G per decision. The selector is not used.

    Example:
        >>> import metactl
        >>> policy = metactl.linear_thompson(seed=0, feature_dim=1)
        >>> batch = policy.select(contexts=[1, 2], features=[[0.0], [1.0]])
        >>> info = policy.update(batch, rewards=[1, 0, 1, 1])   # G = 2
        >>> policy.context_probs([3], features=[[0.5]]).shape
        (1, 10)
    """

    gamma: float = 0.95
    ridge: float = 1.0
    noise_std: float = 0.5
    feature_dim: int = 0
    max_contexts: int = DEFAULT_MAX_CONTEXTS
    requires: ClassVar[tuple[str, ...]] = ("rewards",)
    candidate_use: ClassVar[str] = "indices"
    uses_selector: ClassVar[bool] = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "gamma", unit_interval(self.gamma, "gamma", low_open=True))
        for name in ("ridge", "noise_std"):
            value = positive_scalar(getattr(self, name), name)
            # squared and inverted in the posterior: keep both finite and non-zero
            if not 1e-150 < value < 1e150:
                raise ValueError(f"{name} must lie in (1e-150, 1e150), got {value}")
            object.__setattr__(self, name, value)
        object.__setattr__(
            self,
            "feature_dim",
            integer(self.feature_dim, "feature_dim", minimum=0, below=MAX_FEATURES + 1),
        )
        object.__setattr__(
            self, "max_contexts", integer(self.max_contexts, "max_contexts", minimum=1)
        )

    @property
    def dim(self) -> int:
        """``D = 3 + feature_dim``: the length of ``phi``."""
        return 3 + self.feature_dim

    def default_selector(self) -> Selector:
        return Greedy()  # not used: Thompson sampling picks the candidate

    def row_fields(self, candidates: np.ndarray) -> dict[str, int]:
        return {"successes": 0, "failures": 0}

    def init_state(self, candidates: np.ndarray) -> base.RuleState:
        k, d = candidates.shape[0], self.dim
        precision = np.tile(self.ridge * np.eye(d), (k, 1, 1))
        return {
            "precision": precision.reshape(-1),  # (K * D * D,): A_k = ridge I + sum phi phi' / s2
            "moment": np.zeros(k * d),  # (K * D,): b_k = sum phi y / s2
            "successes": 0.0,
            "failures": 0.0,
        }

    def check_state(self, state: base.RuleState, candidates: np.ndarray, step: int) -> None:
        check_pass_counts(state)
        k, d = candidates.shape[0], self.dim
        precision = state["precision"].reshape(k, d, d)
        if not np.array_equal(precision, np.swapaxes(precision, 1, 2)):
            raise ValueError(f"{state_field('precision')} must hold symmetric matrices")
        try:  # ridge I plus a sum of outer products: positive definite
            np.linalg.cholesky(precision)
        except np.linalg.LinAlgError as exc:
            raise ValueError(
                f"{state_field('precision')} must hold positive-definite matrices"
            ) from exc
        # A_k - ridge I = Phi' Phi / s2 is positive semi-definite (never below the prior)
        data = precision - self.ridge * np.eye(d)[None]
        eigenvalues, vectors = np.linalg.eigh(data)
        scale = np.maximum(np.abs(eigenvalues).max(axis=1), self.ridge)  # (K,)
        tolerance = 1e-9 * d * scale
        if np.any(eigenvalues < -tolerance[:, None]):
            raise ValueError(
                f"{state_field('precision')} must be ridge * I plus a positive semi-definite "
                f"sum of outer products (ridge = {self.ridge}); it falls below the prior"
            )
        # b_k = Phi' y / s2 with every y in [0, 1/2], and the data matrix's [0, 0] entry is
        # n / s2 (phi starts with 1). By Cauchy-Schwarz, along every eigenvector v of the data
        # matrix (eigenvalue lambda), (v . b)^2 <= lambda * sum(y^2) / s2 <= lambda * n / (4 s2):
        # a direction no phi touched carries no moment, one touched a little only a little.
        moment = state["moment"].reshape(k, d)
        along = np.einsum("kde,kd->ke", vectors, moment)
        quarter_count = np.maximum(data[:, 0, 0], 0.0) / 4.0  # (K,)
        bound = np.sqrt(
            (np.maximum(eigenvalues, 0.0) + tolerance[:, None]) * quarter_count[:, None]
        )
        slack = 1e-9 * np.maximum(np.abs(moment).max(axis=1), 1.0)[:, None]
        if np.any(np.abs(along) > bound * (1.0 + 1e-6) + slack):
            raise ValueError(
                f"{state_field('moment')} must be a sum of phi * y / noise_std^2 over the "
                f"observed phi with y in [0, 1/2] (where {state_field('precision')} exceeds "
                "ridge * I); got moments no data explains"
            )

    # -- the model ----------------------------------------------------------------------------
    def phi(self, rows: base.ContextRows, features: np.ndarray | None) -> np.ndarray:
        """The design rows ``[1, c, c ** 2, features]``, (n, D)."""
        pass_rate = (rows["successes"] + 1.0) / (rows["successes"] + rows["failures"] + 2.0)
        c = pass_rate - 0.5
        n = c.shape[0]
        extra = np.zeros((n, self.feature_dim)) if features is None else features
        return np.column_stack([np.ones(n), c, c * c, extra])

    def _posterior(
        self, state: base.RuleState, candidates: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        k, d = candidates.shape[0], self.dim
        precision = state["precision"].reshape(k, d, d)
        covariance = np.linalg.inv(precision)
        mean = np.einsum("kde,ke->kd", covariance, state["moment"].reshape(k, d))
        return mean, covariance

    def _scores(
        self, state: base.RuleState, phi: np.ndarray, candidates: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of every candidate's score, each (n, K)."""
        mean, covariance = self._posterior(state, candidates)
        score_mean = phi @ mean.T
        variance = np.einsum("nd,kde,ne->nk", phi, covariance, phi)
        return score_mean, np.sqrt(np.maximum(variance, 0.0))

    @staticmethod
    def _win_probability(mean: np.ndarray, std: np.ndarray, chosen: np.ndarray) -> np.ndarray:
        """``P(score_chosen > every other score)`` per row, by Gauss-Hermite quadrature."""
        rows = np.arange(mean.shape[0])
        m_c, s_c = mean[rows, chosen], std[rows, chosen]
        points = m_c[:, None] + math.sqrt(2.0) * s_c[:, None] * _NODES[None, :]  # (n, Q)
        z = (points[:, :, None] - mean[:, None, :]) / std[:, None, :]  # (n, Q, K)
        log_cdf = log_ndtr(z)
        log_cdf[rows, :, chosen] = 0.0  # the chosen candidate is not its own rival
        inner = np.exp(log_cdf.sum(axis=2))
        return (inner @ _WEIGHTS) / math.sqrt(math.pi)

    @staticmethod
    def _node_values(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        """The quadrature's integrand at every node for every candidate at once, (n, K, Q):
        ``inner`` of :meth:`_win_probability` for each chosen candidate, element for element
        (the same operations on the same values, the sums over rivals in the same order)."""
        points = mean[:, :, None] + math.sqrt(2.0) * std[:, :, None] * _NODES  # (n, K, Q)
        z = (points[..., None] - mean[:, None, None, :]) / std[:, None, None, :]  # (n, K, Q, K)
        log_cdf = log_ndtr(z)
        chosen = np.arange(mean.shape[1])
        log_cdf[:, chosen, :, chosen] = 0.0  # no candidate is its own rival
        return np.exp(log_cdf.sum(axis=3))

    def _all_win_probabilities(self, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        n, k = mean.shape
        if n <= _VECTOR_ROWS:  # few rows (the global policy): every candidate in one pass
            inner = self._node_values(mean, std)
            # each candidate's weighted sum over nodes as one (n, Q) product, as one at a time
            columns = [
                (np.ascontiguousarray(inner[:, j]) @ _WEIGHTS) / math.sqrt(math.pi)
                for j in range(k)
            ]
        else:
            columns = [self._win_probability(mean, std, np.full(n, j)) for j in range(k)]
        out = np.column_stack(columns)
        out = np.maximum(out, 0.0)
        return out / out.sum(axis=1, keepdims=True)

    def _checked_scores(
        self, state: base.RuleState, ctx: base.Contexts
    ) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(over="ignore", invalid="ignore"):
            mean, std = self._scores(state, self.phi(ctx.rows, ctx.features), ctx.candidates)
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
            largest = 0.0 if ctx.features is None else float(np.max(np.abs(ctx.features)))
            raise ValueError(
                "features: the candidates' scores overflow float64 for these features (largest "
                f"|feature| = {largest:g}); rescale the features"
            )
        return mean, std

    def probs(self, state: base.RuleState, ctx: base.Contexts) -> np.ndarray:
        return self._all_win_probabilities(*self._checked_scores(state, ctx))

    def select(self, state: base.RuleState, ctx: base.Contexts, rng: np.random.Generator) -> Draw:
        candidates = ctx.candidates
        mean, std = self._checked_scores(state, ctx)
        draws = mean + std * rng.standard_normal(mean.shape)
        indices = np.argmax(draws, axis=1).astype(np.int64)

        def probs() -> np.ndarray:  # on first access; quadrature error kept inside [0, 1]
            return np.clip(self._win_probability(mean, std, indices), 0.0, 1.0)

        return Draw(candidates[indices], indices, probs, np.ones(indices.shape[0], dtype=bool))

    def update(
        self, state: base.RuleState, ctx: base.Contexts, batch: base.Batch, feedback: base.Feedback
    ) -> tuple[base.RuleState, base.ContextRows, None]:
        rows, groups, candidates = ctx.rows, batch, ctx.candidates
        rewards = feedback["rewards"]
        check_unit_rewards(rewards)
        per_decision = groups.per_decision(rewards)  # (n, G)
        successes = per_decision.sum(axis=1)
        failures = (1.0 - per_decision).sum(axis=1)
        spread = per_decision.std(axis=1)  # y: the group's reward standard deviation
        # phi of each decision as at select time (rows before this update, its own features)
        decision_rows = {key: value[groups.inverse] for key, value in rows.items()}
        phi = self.phi(decision_rows, groups.features)
        k, d = candidates.shape[0], self.dim
        inverse_noise = 1.0 / (self.noise_std * self.noise_std)
        precision = state["precision"].reshape(k, d, d).copy()
        moment = state["moment"].reshape(k, d).copy()
        np.add.at(precision, groups.indices, phi[:, :, None] * phi[:, None, :] * inverse_noise)
        np.add.at(moment, groups.indices, phi * (spread * inverse_noise)[:, None])
        new_state = {
            "precision": precision.reshape(-1),
            "moment": moment.reshape(-1),
            "successes": self.gamma * float(state["successes"]) + float(successes.sum()),
            "failures": self.gamma * float(state["failures"]) + float(failures.sum()),
        }
        new_rows = {
            "successes": self.gamma * rows["successes"] + groups.pool(successes),
            "failures": self.gamma * rows["failures"] + groups.pool(failures),
        }
        return new_state, new_rows, None
