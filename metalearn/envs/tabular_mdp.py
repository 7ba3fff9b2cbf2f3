"""Random tabular MDPs (Duan et al. 2016, section 4.2): learning to explore an unknown MDP.

A task is an MDP with `states` states and `actions` actions: mean rewards mu(s, a) ~ N(1, 1),
rewards r ~ N(mu(s, a), 1), transition distributions P(. | s, a) ~ Dirichlet(1, ..., 1) (flat).
A trial is `episodes` episodes of `horizon` steps on the same MDP, each starting in state 0;
the agent sees the state (one-hot), and the termination flag marks each episode's end.

The expected regret of a step is V*(s_0) / horizon - mu(s_t, a_t), with V* the optimal
finite-horizon value: summed over a trial, the gap between the optimal expected return and
the expected reward of the pairs visited.

Randomness travels with the batch (see envs/trials.py): standard normals for the rewards and
uniforms for the transitions and the actions, one per step.
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from torch import Tensor

from metalearn.envs.trials import RandomPolicy, TrialBatch, TrialEnv, TrialTasks
from metalearn.errors import ConfigError


@dataclass
class TabularMDPConfig:
    """Random MDPs: sizes, the episode length and the episodes per trial (n)."""

    task_kind: ClassVar[str] = "rl"
    name: str = "tabular_mdp"
    states: int = 10
    actions: int = 5
    horizon: int = 10  # steps per episode
    episodes: int = 10  # n: episodes per trial (Duan et al.: 10, 25, 50, 75, 100)
    root: str | None = None  # unused: procedural tasks need no files
    split: str | None = None  # unused: every task is fresh; test trials come from a fixed seed

    def __post_init__(self) -> None:
        for key in ("states", "actions", "horizon", "episodes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be positive, got {getattr(self, key)}")
        if self.actions < 2:
            raise ConfigError(f"data.actions must be at least 2, got {self.actions}")

    @property
    def steps(self) -> int:
        return self.horizon * self.episodes

    def describe(self) -> dict[str, int]:
        return {"states": self.states, "actions": self.actions, "horizon": self.horizon,
                "episodes": self.episodes}  # fmt: skip


def optimal_values(transitions: Tensor, means: Tensor, horizon: int) -> Tensor:
    """Finite-horizon value iteration: Q*_h (T, horizon, S, A), h = steps left - 1."""
    values = means.new_zeros(means.shape[:2])  # V_0 = 0, (T, S)
    qs = []
    for _ in range(horizon):
        q = means + (transitions @ values[:, None, :, None]).squeeze(-1)  # (T, S, A)
        values = q.max(-1).values
        qs.append(q)
    return torch.stack(qs, 1)


@dataclass
class MDPBatch(TrialBatch):
    """T trials: each MDP, and the noise of every step."""

    transitions: Tensor  # (T, S, A, S)
    means: Tensor  # (T, S, A)
    reward_noise: Tensor  # (T, P) standard normals
    transition_noise: Tensor  # (T, P) uniforms
    action_noise: Tensor  # (T, P)
    horizon: int
    unit = "trials"

    def env(self) -> "MDPEnv":
        return MDPEnv(self)


class MDPEnv(TrialEnv):
    """T MDP trials at once (Gymnasium's vector API on torch tensors); observations are the
    one-hot state (T, S); each episode's last step terminates and the next starts in state 0."""

    metadata: ClassVar[dict[str, Any]] = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, batch: MDPBatch) -> None:
        _, states, actions = batch.means.shape
        super().__init__(batch, (states,), actions, 0.0, 1.0)
        best = optimal_values(batch.transitions, batch.means, batch.horizon)[:, -1, 0]
        self.optimal_per_step = best.max(-1).values / batch.horizon  # (T,)
        self.state = torch.zeros(self.num_envs, dtype=torch.long, device=batch.means.device)

    def _observation(self) -> Tensor:
        return torch.nn.functional.one_hot(self.state, self.batch.means.shape[1]).float()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self.state = torch.zeros_like(self.state)
        return super().reset(seed=seed, options=options)

    def step(self, actions: Tensor):
        b, t = self.batch, self._next_step()
        rows = torch.arange(self.num_envs, device=self.state.device)
        mean = b.means[rows, self.state, actions]
        reward = mean + b.reward_noise[:, t]
        cdf = b.transitions[rows, self.state, actions].cumsum(-1)  # (T, S)
        following = (cdf < b.transition_noise[:, t, None] * cdf[:, -1:]).sum(-1)
        episode_over = self.t % b.horizon == 0
        self.state = torch.zeros_like(following) if episode_over else following
        done = torch.full_like(self.state, episode_over, dtype=torch.bool)
        info = {"regret": self.optimal_per_step - mean, "trial_over": self.t == b.steps}
        return self._observation(), reward, done, torch.zeros_like(done), info


class MDPTasks(TrialTasks):
    """Draws random MDP trials on the device."""

    def __init__(self, cfg: TabularMDPConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.actions = cfg.actions
        self.in_shape = (cfg.states,)

    def baselines(self) -> dict:
        """A random policy, and posterior sampling for RL (PSRL; Osband et al. 2013)."""
        return {"random": RandomPolicy(), "psrl": PSRL(self.cfg.horizon)}

    def sample(self, split: str, generator: torch.Generator, tasks: int, *_shape) -> MDPBatch:
        cfg, g = self.cfg, generator
        s, a, steps = cfg.states, cfg.actions, cfg.steps

        def draw(fn, *shape: int) -> Tensor:
            return fn(shape, generator=g, device=g.device).to(self.device)

        # a flat Dirichlet is normalised unit exponentials: -log(U)
        gaps = -torch.log(draw(torch.rand, tasks, s, a, s).clamp_min(1e-12))
        transitions = gaps / gaps.sum(-1, keepdim=True)
        means = 1.0 + draw(torch.randn, tasks, s, a)
        return MDPBatch(
            transitions, means, draw(torch.randn, tasks, steps), draw(torch.rand, tasks, steps),
            draw(torch.rand, tasks, steps), cfg.horizon,
        )  # fmt: skip


class PSRL:
    """Posterior sampling (Osband et al. 2013): at each episode's start, draw an MDP from the
    posterior (Dirichlet(1 + counts) transitions; N(1, 1) prior on mean rewards with unit
    reward noise, so mu | data ~ N((1 + sum r) / (1 + n), 1 / (1 + n))), solve it by value
    iteration and follow its greedy policy for the episode."""

    def __init__(self, horizon: int) -> None:
        self.horizon = horizon

    def start(self, env: MDPEnv, observation: Tensor, seed: int) -> None:
        tasks, states, actions = env.batch.means.shape
        self.rng = np.random.default_rng(seed)
        self.counts = np.zeros((tasks, states, actions, states))
        self.reward_sums = np.zeros((tasks, states, actions))
        self.visits = np.zeros((tasks, states, actions))
        self.state, self.t, self.q = observation.argmax(-1).cpu().numpy(), 0, None
        self.device = observation.device

    def act(self) -> Tensor:
        if self.t % self.horizon == 0:  # a new episode: a new sample of the MDP
            transitions = self.rng.gamma(1.0 + self.counts)
            transitions /= transitions.sum(-1, keepdims=True)
            mean = (1.0 + self.reward_sums) / (1.0 + self.visits)
            means = mean + self.rng.standard_normal(mean.shape) / np.sqrt(1.0 + self.visits)
            self.q = optimal_values(torch.from_numpy(transitions), torch.from_numpy(means),
                                    self.horizon).numpy()  # fmt: skip
        left = self.horizon - 1 - self.t % self.horizon  # the Q of the steps left
        rows = np.arange(self.state.shape[0])
        return torch.from_numpy(self.q[rows, left, self.state].argmax(-1)).to(self.device)

    def observe(self, actions: Tensor, rewards: Tensor, observation: Tensor, done: Tensor) -> None:
        a, r = actions.cpu().numpy(), rewards.cpu().numpy()
        rows = np.arange(a.shape[0])
        self.visits[rows, self.state, a] += 1
        self.reward_sums[rows, self.state, a] += r
        self.t += 1
        following = observation.argmax(-1).cpu().numpy()
        # after an episode's last step the observation is the next episode's start, not s'
        if self.t % self.horizon:
            self.counts[rows, self.state, a, following] += 1
        self.state = following
