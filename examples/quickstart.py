"""The TAMPO loop on synthetic feedback, in a few seconds and with numpy only.

Each step: the meta-policy picks a temperature; a "rollout batch" of groups is simulated; each
trajectory gets a unimodal likelihood-vs-temperature curve peaking at its own likelihood-optimal
temperature T*; successful trajectories (positive group advantage) tend to have T* near a
"useful" temperature that drifts from 1.3 down to 0.8 over training (explore, then exploit).
TAMPO should follow the drift. Run: ``python examples/quickstart.py``.
"""

from __future__ import annotations

import numpy as np

import metactl

STEPS, GROUPS, GROUP_SIZE = 200, 8, 8


def useful_temperature(step: int) -> float:
    """Where successful trajectories' likelihoods peak at this point of training."""
    return 1.3 - 0.5 * step / (STEPS - 1)


def simulate_batch(rng: np.random.Generator, temperature: float, step: int, candidates):
    """(loglik (N, K), advantages (N,)) for GROUPS groups of GROUP_SIZE rollouts."""
    n = GROUPS * GROUP_SIZE
    # Trajectories sampled at a temperature tend to be most likely near it...
    t_star = temperature + rng.normal(0.0, 0.15, size=n)
    # ...and succeed more often the closer their T* is to the useful temperature.
    p_success = np.exp(-((t_star - useful_temperature(step)) ** 2) / (2 * 0.15**2))
    rewards = (rng.random(n) < 0.1 + 0.8 * p_success).astype(float).reshape(GROUPS, GROUP_SIZE)
    std = rewards.std(axis=1, keepdims=True)
    advantages = ((rewards - rewards.mean(axis=1, keepdims=True)) / (std + 1e-4)).ravel()
    # unimodal in T: mean token log-likelihood, 1 nat lower per 0.5 away from T*
    loglik = -1.0 - 4.0 * (candidates[None, :] - t_star[:, None]) ** 2
    return loglik, advantages


def main() -> None:
    rng = np.random.default_rng(0)
    policy = metactl.tampo(seed=0)  # candidates 0.6..1.5, alpha 0.05, sparsemax, nucleus 0.7
    print(policy)
    print(f"{'step':>5} {'chosen T':>9} {'useful T':>9} {'most probable T':>16}")
    for step in range(STEPS):
        decision = policy.select()
        loglik, advantages = simulate_batch(rng, decision.value, step, policy.candidates)
        info = policy.update(decision, loglik=loglik, advantages=advantages)
        if step % 20 == 0 or step == STEPS - 1:
            best = policy.candidates[int(np.argmax(info.probs))]
            useful = useful_temperature(step)
            print(f"{step:>5} {decision.value:>9.1f} {useful:>9.2f} {best:>16.1f}")


if __name__ == "__main__":
    main()
