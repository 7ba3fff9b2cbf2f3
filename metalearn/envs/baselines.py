"""Classic bandit policies, scored by the same trial loop and fixed test trials as RL² agents.

Each policy keeps, per task, the pulls N (T, A) and successes S (T, A) of every arm, and
chooses with them (Duan et al. 2016, section 4.1 lists these baselines):

- random: a uniformly random arm;
- greedy / epsilon-greedy: the highest posterior mean (S + 1) / (N + 2) under a uniform prior
  (with probability epsilon a random arm instead);
- UCB1 (Auer et al. 2002): every arm once, then the highest S/N + c sqrt(2 ln t / N);
- Thompson sampling: the highest draw from each arm's Beta(S + 1, N - S + 1) posterior;
- Gittins: the highest finite-horizon Gittins index of the arm's posterior and the pulls left,
  from an exact dynamic programme (`finite_horizon_gittins`).

They run through `data.envs.play`, the loop that scores learned agents too.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from metalearn.envs.trials import RandomPolicy

if TYPE_CHECKING:  # the type only: bandits.py imports this module for its baselines
    from metalearn.envs.bandits import BanditEnv


class CountingPolicy:
    """What every baseline shares: per-arm pulls and successes of the current trials."""

    def start(self, env: BanditEnv, observation: Tensor, seed: int) -> None:
        self.batch = batch = env.batch
        self.pulls = torch.zeros_like(batch.probs)  # N (T, A)
        self.successes = torch.zeros_like(batch.probs)  # S (T, A)
        self.t = 0
        self.rng = np.random.default_rng(seed)  # Thompson's posterior draws

    def observe(self, actions: Tensor, rewards: Tensor, *_observation_done: Tensor) -> None:
        rows = torch.arange(actions.shape[0], device=actions.device)
        self.pulls[rows, actions] += 1
        self.successes[rows, actions] += rewards
        self.t += 1

    def posterior_mean(self) -> Tensor:
        return (self.successes + 1) / (self.pulls + 2)


class EpsilonGreedy(CountingPolicy):
    def __init__(self, epsilon: float) -> None:
        self.epsilon = epsilon

    def act(self) -> Tensor:
        greedy = self.posterior_mean().argmax(-1)
        if not self.epsilon:
            return greedy
        noise, arms = self.batch.action_noise[:, self.t], self.pulls.shape[1]
        random = (noise / self.epsilon * arms).long().clamp_max(arms - 1)  # uniform below epsilon
        return torch.where(noise < self.epsilon, random, greedy)


class UCB1(CountingPolicy):
    def __init__(self, c: float = 1.0) -> None:
        self.c = c

    def act(self) -> Tensor:
        untried = self.pulls == 0
        mean = self.successes / self.pulls.clamp_min(1)
        bonus = self.c * torch.sqrt(2 * math.log(max(self.t, 1)) / self.pulls.clamp_min(1))
        return torch.where(untried, math.inf, mean + bonus).argmax(-1)


class Thompson(CountingPolicy):
    def act(self) -> Tensor:
        a = (self.successes + 1).cpu().numpy()
        b = (self.pulls - self.successes + 1).cpu().numpy()
        draws = torch.from_numpy(self.rng.beta(a, b)).to(self.pulls.device)
        return draws.argmax(-1)


class Gittins(CountingPolicy):
    def __init__(self, pulls: int) -> None:
        self.table = finite_horizon_gittins(pulls)  # (m, s, f)

    def start(self, env: BanditEnv, observation: Tensor, seed: int) -> None:
        super().start(env, observation, seed)
        self.table = self.table.to(self.batch.probs.device)

    def act(self) -> Tensor:
        left = self.batch.steps - self.t  # pulls left, this one included
        s, f = self.successes.long(), (self.pulls - self.successes).long()
        return self.table[left][s, f].argmax(-1)


@functools.lru_cache(maxsize=4)
def finite_horizon_gittins(horizon: int, grid: int = 1001) -> Tensor:
    """Finite-horizon Gittins indices G[m, s, f] of a Bernoulli arm under a uniform prior.

    The arm has had s successes and f failures (posterior Beta(s + 1, f + 1)) and m pulls are
    left. G is the reward per pull lambda of a known arm at which pulling the unknown arm now
    and continuing optimally is exactly as good as switching to the known arm for all m pulls
    (the calibration definition; Gittins 1979, Kaufmann 2016 for the finite horizon):

        V_m(s, f; lam) = max(m lam, C_m(s, f; lam)),
        C_m(s, f; lam) = p (1 + V_{m-1}(s + 1, f; lam)) + (1 - p) V_{m-1}(s, f + 1; lam),

    p = (s + 1) / (s + f + 2), V_0 = 0. D = C_m - m lam falls strictly in lam (its slope is at
    most (m - 1) - m), is positive at 0 and negative at 1, so the index is its one root. The
    programme runs for every lam of a grid at once and the root is interpolated linearly
    between the two grid points around it (exact where D has no kink between them).
    Only entries with s + f + m <= horizon are filled: no trial of `horizon` pulls visits others.
    """
    lam = torch.linspace(0.0, 1.0, grid, dtype=torch.float64)[:, None, None]  # (G, 1, 1)
    step = 1.0 / (grid - 1)
    counts = torch.arange(horizon + 1, dtype=torch.float64)
    p = (counts[:, None] + 1) / (counts[:, None] + counts[None, :] + 2)  # (S, F)
    table = torch.zeros(horizon + 1, horizon + 1, horizon + 1, dtype=torch.float64)
    value = torch.zeros(grid, horizon + 1, horizon + 1, dtype=torch.float64)  # V_0 = 0
    for m in range(1, horizon + 1):
        k = horizon - m + 1  # with m pulls left, s and f are at most horizon - m
        q = p[:k, :k]
        cont = q * (1 + value[:, 1 : k + 1, :k]) + (1 - q) * value[:, :k, 1 : k + 1]
        gap = cont - m * lam  # (G, k, k), falling in lam
        below = ((gap >= 0).sum(0) - 1).clamp(0, grid - 2)  # last grid point with gap >= 0
        g0, g1 = gap.gather(0, below[None])[0], gap.gather(0, below[None] + 1)[0]
        table[m, :k, :k] = step * (below + g0 / (g0 - g1))
        value = torch.maximum(cont, m * lam)  # V_m on s, f <= horizon - m
    return table.float()


def bandit_baselines(pulls: int) -> dict[str, CountingPolicy]:
    """The baselines of Duan et al. (2016), section 4.1, for trials of `pulls` pulls."""
    return {
        "random": RandomPolicy(),
        "greedy": EpsilonGreedy(0.0),
        "epsilon_greedy": EpsilonGreedy(0.1),
        "ucb1": UCB1(),
        "thompson": Thompson(),
        "gittins": Gittins(pulls),
    }
