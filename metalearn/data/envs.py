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

import torch
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
