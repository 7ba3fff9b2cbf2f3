"""What every meta-RL task family shares: the batch protocol, action sampling, the trial loop.

A meta-RL task batch holds T tasks (one environment each) and every random number their trials
need, so that a fixed test trial is the same for every policy (common random numbers) and a
training batch is reproduced exactly on resume. It has `tasks` (T), `steps` (P, the steps of a
trial), `action_noise` (T, P) uniforms with which stochastic policies sample their actions,
and `env()`, the Gymnasium `VectorEnv` that plays the trials on torch tensors: `reset()`
gives the first observations (T, ...), `step(actions)` the next ones, rewards (T,),
terminations and truncations (T,) and an info dict with each step's expected `regret` (T,).

A policy, learned or classic, has start(env, observation, seed), act() -> actions (T,) and
observe(actions, rewards, observation, done).
"""

import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from gymnasium.spaces import Box, Discrete, MultiDiscrete
from gymnasium.vector import AutoresetMode, VectorEnv
from torch import Tensor


def sample_actions(probs: Tensor, noise: Tensor) -> Tensor:
    """Draw a ~ Categorical(probs) (T, A) by inverse CDF with the given uniforms (T,)."""
    cdf = probs.cumsum(-1)
    return (cdf < noise[:, None] * cdf[:, -1:]).sum(-1).clamp_max(probs.shape[-1] - 1)


def play(env, policy, seed: int) -> dict[str, Tensor]:
    """Run the env's trials with a policy; `seed` seeds the policy's own randomness. Per task:
    the total reward (T,), the total expected regret (T,), each step's reward (T, P) and the
    cumulative regret after every step (T, P)."""
    observation, _ = env.reset()
    policy.start(env, observation, seed)
    rewards, regrets = [], []
    for _ in range(env.batch.steps):
        actions = policy.act()
        observation, reward, done, _, info = env.step(actions)
        policy.observe(actions, reward, observation, done)
        rewards.append(reward)
        regrets.append(info["regret"])
    curve, rewards = torch.stack(regrets, 1).cumsum(1), torch.stack(rewards, 1)
    return {"reward": rewards.sum(1), "regret": curve[:, -1], "rewards": rewards, "curve": curve}


class RandomPolicy:
    """A uniformly random action at every step, from the trials' own action uniforms."""

    def start(self, env, observation: Tensor, seed: int) -> None:
        self.noise, self.actions, self.t = env.batch.action_noise, env.single_action_space.n, 0

    def act(self) -> Tensor:
        return (self.noise[:, self.t] * self.actions).long().clamp_max(self.actions - 1)

    def observe(self, *_step: Tensor) -> None:
        self.t += 1


class TrialBatch:
    """The batch protocol's shared half, for dataclass batches whose tensors are all (T, ...)
    and hold `action_noise` (T, P): the task and step counts, and slicing by task."""

    action_noise: Tensor

    @property
    def tasks(self) -> int:
        return self.action_noise.shape[0]

    @property
    def steps(self) -> int:
        return self.action_noise.shape[1]

    def __getitem__(self, part: slice):
        tensors = {
            f.name: getattr(self, f.name)[part]
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **tensors)


class TrialEnv(VectorEnv):
    """The Gymnasium side every meta-RL environment shares: the spaces of T tasks with
    `actions` discrete actions and float observations, and the step counter of a trial."""

    metadata: ClassVar[dict[str, Any]] = {"autoreset_mode": AutoresetMode.DISABLED}

    def __init__(self, batch, observation_shape: tuple[int, ...], actions: int, low, high):
        self.batch, self.num_envs, self.t = batch, batch.tasks, 0
        self.single_observation_space = Box(low, high, observation_shape, np.float32)
        self.single_action_space = Discrete(actions)
        self.observation_space = Box(low, high, (self.num_envs, *observation_shape), np.float32)
        self.action_space = MultiDiscrete(np.full(self.num_envs, actions))

    def _observation(self) -> Tensor:
        raise NotImplementedError

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start the trial again at its first step (the batch fixes all its randomness)."""
        self.t = 0
        return self._observation(), {}

    def _next_step(self) -> int:
        """The index of the step being taken; refuses a step past the trial's end."""
        if self.t >= self.batch.steps:
            raise RuntimeError(f"the trial is over after {self.batch.steps} steps; call reset()")
        self.t += 1
        return self.t - 1


class TrialTasks:
    """What every meta-RL task family shares: infinite, and fixed trials from a seed."""

    kind = "rl"
    continuous_actions = False  # one of `actions` discrete actions per step (RL²'s softmax)
    # a step's reward is 1 for a right choice (Harlow): the records report accuracy by step
    per_step_accuracy = False

    def check(self, split: str, *_shape: int) -> None:
        """Any number of trials fits: the family is infinite."""

    def subsets(self, batch) -> dict[str, Tensor]:
        """name -> which of the batch's trials (T,) bool form a subset the test also reports
        apart (the causal quiz: trials with a hidden confounder); none by default."""
        return {}

    def episodes(self, split: str, n: int, *_shape: int, seed: int, batch_size: int) -> Iterator:
        """n fixed trials: the same for a given seed whatever the batch size."""
        batch = self.sample(split, torch.Generator().manual_seed(seed), n)
        for start in range(0, n, batch_size):
            yield batch[start : start + batch_size]
