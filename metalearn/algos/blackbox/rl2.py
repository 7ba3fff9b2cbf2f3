"""RL² (Duan et al. 2016; Wang et al. 2016): a recurrent policy whose forward pass is the learner.

The agent's hidden state carries across every pull (episode) of a trial and is reset between
trials; its input at each step is the observation, the previous action (one-hot), the previous
reward and the termination flag. The outer loop is plain reinforcement learning on whole
trials: maximising a trial's total reward teaches the recurrent dynamics to explore and then
exploit, so a trained agent adapts to a new task with no gradient step.

Trained with advantage actor-critic (A2C) and generalised advantage estimation (GAE, Schulman
et al. 2016) over the trial, one gradient step per meta-batch of trials: the trainer's
`meta_loss -> backward -> step` contract, as for every other algorithm. (Duan et al. use
TRPO, Wang et al. A2C.)

Shape letters: T trials run in parallel, P steps per trial (pulls of a bandit), A actions.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.data.envs import play, sample_actions
from metalearn.errors import ConfigError


@dataclass
class RL2Config:
    """A2C with GAE on whole trials."""

    name: str = "rl2"
    outer_lr: float = 3e-3  # Adam step size
    gamma: float = 0.9  # discount across the steps of a trial (0.99: slower to learn in our runs)
    gae_lambda: float = 0.95  # GAE's bias-variance trade-off
    value_coef: float = 0.5  # weight of the value loss
    # an entropy bonus, wide early and nearly greedy later: without the early bonus the policy
    # collapses onto one arm within a few hundred iterations on 100-pull bandits
    entropy_coef: float = 0.05  # the bonus at the start of training ...
    entropy_final: float = 0.005  # ... decayed linearly to this ...
    entropy_decay_iterations: int = 2000  # ... over this many iterations (0: constant)
    normalize_advantages: bool = True  # per meta-batch, to zero mean and unit variance

    def __post_init__(self) -> None:
        if not 0 < self.outer_lr < math.inf:
            raise ConfigError(
                f"algo.outer_lr must be a positive, finite learning rate, got {self.outer_lr}"
            )
        for key in ("gamma", "gae_lambda"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"algo.{key} must be in [0, 1], got {getattr(self, key)}")
        for key in ("value_coef", "entropy_coef", "entropy_final", "entropy_decay_iterations"):
            if getattr(self, key) < 0:
                raise ConfigError(f"algo.{key} must be >= 0, got {getattr(self, key)}")


class RL2:
    """Meta-RL by a recurrent actor-critic trained on whole trials."""

    needs_head = True  # the model has one policy output per action
    differentiates_inner_loop = False
    reinforcement = True  # build.py: needs a meta-RL data set and a recurrent model
    outer_schedule = "constant"

    def __init__(self, cfg: RL2Config, model: nn.Module, kind: str, task_batching: str) -> None:
        self.cfg = cfg
        self.model = model

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def entropy_coef(self, iteration: int) -> float:
        cfg = self.cfg
        if not cfg.entropy_decay_iterations:
            return cfg.entropy_coef
        fraction = min(iteration / cfg.entropy_decay_iterations, 1.0)
        return cfg.entropy_coef + (cfg.entropy_final - cfg.entropy_coef) * fraction

    def rollout(self, batch) -> dict[str, Tensor]:
        """Play the batch's trials with the current policy (with the autograd graph)."""
        env = batch.env()
        observation, _ = env.reset()
        tasks, actions = env.num_envs, env.single_action_space.n
        state = self.model.initial_state(tasks, observation.device)
        previous = observation.new_zeros(tasks, actions + 2)  # nothing done yet
        out: dict[str, list[Tensor]] = {k: [] for k in ("logp", "entropy", "value", "reward")}
        out["regret"] = []
        for t in range(batch.steps):
            logits, value, state = self.model(torch.cat([observation, previous], -1), state)
            logp_all = F.log_softmax(logits, -1)  # (T, A)
            action = sample_actions(logp_all.detach().exp(), batch.action_noise[:, t])
            observation, reward, done, _, info = env.step(action)
            out["logp"].append(logp_all.gather(1, action[:, None]).squeeze(1))
            out["entropy"].append(-(logp_all.exp() * logp_all).sum(-1))
            out["value"].append(value)
            out["reward"].append(reward)
            out["regret"].append(info["regret"])
            previous = feedback(action, reward, done, actions)
        return {k: torch.stack(v, 1) for k, v in out.items()}  # each (T, P)

    def advantages(self, rewards: Tensor, values: Tensor) -> Tensor:
        """GAE over a trial (T, P); the trial's end is terminal (the memory is reset)."""
        gamma, lam = self.cfg.gamma, self.cfg.gae_lambda
        next_values = F.pad(values[:, 1:], (0, 1))
        deltas = rewards + gamma * next_values - values
        running, out = torch.zeros_like(deltas[:, 0]), []
        for t in reversed(range(deltas.shape[1])):
            running = deltas[:, t] + gamma * lam * running
            out.append(running)
        return torch.stack(out[::-1], 1)

    def meta_loss(self, batch, iteration: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """A2C's loss on one meta-batch of trials, and the training metrics to log."""
        trial = self.rollout(batch)
        values = trial["value"]
        advantages = self.advantages(trial["reward"], values.detach())
        returns = advantages + values.detach()
        if self.cfg.normalize_advantages:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        policy_loss = -(trial["logp"] * advantages).mean()
        value_loss = 0.5 * (returns - values).pow(2).mean()
        entropy = trial["entropy"].mean()
        loss = (
            policy_loss + self.cfg.value_coef * value_loss - self.entropy_coef(iteration) * entropy
        )
        return loss, {
            "loss": loss.detach(),
            "score": trial["reward"].sum(1).mean(),
            "regret": trial["regret"].sum(1).mean(),
            "entropy": entropy.detach(),
            "value_loss": value_loss.detach(),
        }

    def evaluate(self, batch, steps: list[int]) -> dict[str, Tensor]:
        """Per trial: total reward as the score, total expected regret as the loss (T, 1), each
        step's reward and the cumulative regret after every step (T, P)."""
        with torch.no_grad():
            out = play(batch.env(), AgentPolicy(self.model), seed=0)
        return {
            "score": out["reward"][:, None],
            "loss": out["regret"][:, None],
            "rewards": out["rewards"],
            "curve": out["curve"],
        }

    def predict(self, *_args, **_kwargs):
        raise ConfigError("algo=rl2 acts in environments; it does not classify user episodes")

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])


def feedback(action: Tensor, reward: Tensor, done: Tensor, actions: int) -> Tensor:
    """What the agent sees of its last step besides the observation: (T, A + 2) = one-hot
    action, reward, termination flag."""
    one_hot = F.one_hot(action, actions).to(reward.dtype)
    return torch.cat([one_hot, reward[:, None], done[:, None].to(reward.dtype)], -1)


class AgentPolicy:
    """A trained RL² agent behind the baselines' start/act/observe interface: it samples its
    actions from its policy with the trials' own action uniforms."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def start(self, env, observation: Tensor, seed: int) -> None:
        self.batch, self.t, self.observation = env.batch, 0, observation
        self.actions = env.single_action_space.n
        self.state = self.model.initial_state(env.num_envs, observation.device)
        self.previous = observation.new_zeros(env.num_envs, self.actions + 2)

    def act(self) -> Tensor:
        x = torch.cat([self.observation, self.previous], -1)
        logits, _, self.state = self.model(x, self.state)
        return sample_actions(F.softmax(logits, -1), self.batch.action_noise[:, self.t])

    def observe(self, actions: Tensor, rewards: Tensor, observation: Tensor, done: Tensor) -> None:
        self.previous = feedback(actions, rewards, done, self.actions)
        self.observation = observation
        self.t += 1
