"""RL² (Duan et al. 2016; Wang et al. 2016): a recurrent policy whose forward pass is the learner.

The agent's hidden state carries across every pull (episode) of a trial and is reset between
trials; its input at each step is the observation, the previous action (one-hot), the previous
reward and the termination flag. The outer loop is plain reinforcement learning on whole
trials: maximising a trial's total reward teaches the recurrent dynamics to explore and then
exploit, so a trained agent adapts to a new task with no gradient step.

Trained with generalised advantage estimation (GAE, Schulman et al. 2016) over the trial and
either advantage actor-critic (`optimizer=a2c`: one gradient step per meta-batch of trials, the
trainer's `meta_loss -> backward -> step`; Wang et al. 2016) or PPO (`optimizer=ppo`, Schulman
et al. 2017: the trials are played once without a graph, then `ppo_epochs` passes over them in
`ppo_minibatches` mini-batches of whole trials, each an outer step on the clipped surrogate,
through `meta_losses`). Duan et al. use TRPO, whose trust region PPO's clipping approximates.

Shape letters: T trials run in parallel, P steps per trial (pulls of a bandit), A actions.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algos.learner import AlgoConfig, Learner
from metalearn.envs.trials import play, sample_actions
from metalearn.errors import ConfigError


@dataclass
class RL2Config(AlgoConfig):
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
    optimizer: str = "a2c"  # 'a2c' (one step per meta-batch) or 'ppo' (several, clipped)
    ppo_epochs: int = 4  # PPO: passes over each meta-batch of trials
    ppo_minibatches: int = 4  # PPO: mini-batches of whole trials per pass
    ppo_clip: float = 0.2  # PPO: the probability ratio is clipped to [1 - clip, 1 + clip]
    ppo_clip_value: bool = True  # PPO: the value's change clipped alike (openai/baselines ppo2)

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
        if self.optimizer not in ("a2c", "ppo"):
            raise ConfigError(f"algo.optimizer must be a2c or ppo, got {self.optimizer!r}")
        for key in ("ppo_epochs", "ppo_minibatches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"algo.{key} must be at least 1, got {getattr(self, key)}")
        if not 0 < self.ppo_clip < 1:
            raise ConfigError(f"algo.ppo_clip must be in (0, 1), got {self.ppo_clip}")


class RL2(Learner):
    """Meta-RL by a recurrent actor-critic trained on whole trials."""

    family = "blackbox"
    optimizees = False
    pretrains = False
    needs_train_classes = False
    needs_ways = False
    needs_head = True  # the model has one policy output per action
    reinforcement = True  # build.py: needs a meta-RL data set and a recurrent model
    policy_model = "recurrent"  # softmax over a family's discrete actions
    batches_tasks = False
    differentiates_inner_loop = False
    inner_loop = False
    first_order_switch = False
    checkpoint_switch = False
    outer_schedule = "constant"
    compiled = "meta_loss"

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
        keys = ("logp", "entropy", "value", "reward", "regret", "input", "action")
        out: dict[str, list[Tensor]] = {k: [] for k in keys}
        for t in range(batch.steps):
            x = torch.cat([observation, previous], -1)
            logits, value, state = self.model(x, state)
            logp_all = F.log_softmax(logits, -1)  # (T, A)
            action = sample_actions(logp_all.detach().exp(), batch.action_noise[:, t])
            observation, reward, done, _, info = env.step(action)
            out["logp"].append(logp_all.gather(1, action[:, None]).squeeze(1))
            out["entropy"].append(-(logp_all.exp() * logp_all).sum(-1))
            out["value"].append(value)
            out["reward"].append(reward)
            out["regret"].append(info["regret"])
            out["input"].append(x)
            out["action"].append(action)
            previous = feedback(action, reward, done, actions)
        return {k: torch.stack(v, 1) for k, v in out.items()}  # each (T, P), inputs (T, P, D)

    def replay(self, inputs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Log-probabilities of the trials' actions, entropies and values (T, P) under the
        current weights, the recurrent policy fed the inputs it saw (they do not depend on it)."""
        state = self.model.initial_state(inputs.shape[0], inputs.device)
        logp, entropy, values = [], [], []
        for t in range(inputs.shape[1]):
            logits, value, state = self.model(inputs[:, t], state)
            logp_all = F.log_softmax(logits, -1)
            logp.append(logp_all.gather(1, actions[:, t, None]).squeeze(1))
            entropy.append(-(logp_all.exp() * logp_all).sum(-1))
            values.append(value)
        return torch.stack(logp, 1), torch.stack(entropy, 1), torch.stack(values, 1)

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

    def trial_metrics(self, trial: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            "score": trial["reward"].sum(1).mean(),
            "regret": trial["regret"].sum(1).mean(),
        }

    def meta_loss(self, batch, iteration: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """The first outer step's loss on one meta-batch of trials (A2C's only one), and the
        training metrics to log."""
        return next(iter(self.meta_losses(batch, iteration)))

    def meta_losses(self, batch, iteration: int = 0) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """A2C: one loss on trials played with the graph. PPO: the clipped surrogate of each
        mini-batch of each epoch over trials played once without it."""
        cfg, coef = self.cfg, self.entropy_coef(iteration)
        if cfg.optimizer == "a2c":
            yield self.a2c_loss(self.rollout(batch), coef)
            return
        with torch.no_grad():
            trial = self.rollout(batch)
            returns = self.advantages(trial["reward"], trial["value"]) + trial["value"]
        tasks = returns.shape[0]
        for _ in range(cfg.ppo_epochs):
            for rows in torch.randperm(tasks, device=returns.device).chunk(cfg.ppo_minibatches):
                logp, entropy, values = self.replay(trial["input"][rows], trial["action"][rows])
                loss, metrics = ppo_loss(
                    logp,
                    values,
                    entropy.mean(),
                    trial["logp"][rows],
                    trial["value"][rows],
                    returns[rows],
                    cfg,
                    coef,
                )
                yield loss, metrics | self.trial_metrics(trial)

    def a2c_loss(self, trial: dict[str, Tensor], entropy_coef: float):
        """A2C's loss on trials played with the graph: GAE advantages (normalised over the
        meta-batch if configured) times the log-probabilities, the value loss, the bonus."""
        values = trial["value"]
        advantages = self.advantages(trial["reward"], values.detach())
        returns = advantages + values.detach()
        if self.cfg.normalize_advantages:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        policy_loss = -(trial["logp"] * advantages).mean()
        value_loss = 0.5 * (returns - values).pow(2).mean()
        entropy = trial["entropy"].mean()
        loss = policy_loss + self.cfg.value_coef * value_loss - entropy_coef * entropy
        return loss, {
            "loss": loss.detach(),
            **self.trial_metrics(trial),
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


def ppo_loss(
    logp: Tensor,
    values: Tensor,
    entropy: Tensor,
    old_logp: Tensor,
    old_values: Tensor,
    returns: Tensor,
    cfg: RL2Config,
    entropy_coef: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's loss on one mini-batch of steps, as openai/baselines' ppo2 (model.py): advantages
    returns - old values, normalised over the mini-batch; the clipped surrogate; the value
    loss 0.5 * max of the squared errors of the value and of its change clipped to the same
    range (or unclipped, `ppo_clip_value=false`); minus the entropy bonus."""
    advantages = returns - old_values
    if cfg.normalize_advantages:
        advantages = (advantages - advantages.mean()) / (advantages.std(unbiased=False) + 1e-8)
    ratio = (logp - old_logp).exp()
    clip = cfg.ppo_clip
    policy_loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    value_loss = (values - returns).square()
    if cfg.ppo_clip_value:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        value_loss = torch.maximum(value_loss, (clipped - returns).square())
    value_loss = 0.5 * value_loss.mean()
    loss = policy_loss.mean() + cfg.value_coef * value_loss - entropy_coef * entropy
    return loss, {
        "loss": loss.detach(),
        "entropy": entropy.detach(),
        "value_loss": value_loss.detach(),
        # the fraction of steps whose ratio left the clip range: how far the epochs moved
        "clipped": ((ratio - 1).abs() > clip).float().mean(),
    }


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
