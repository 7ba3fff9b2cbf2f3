"""Bernoulli bandit task families (Duan et al. 2016; Wang et al. 2016) as vectorised environments.

A task is one bandit: k arms with success probabilities p (T, k). A trial is `pulls` one-step
episodes on the same bandit (Duan et al. 2016, section 3: every pull is an episode, the agent's
memory carries across them). Independent arms draw p ~ U[0, 1] per arm; the dependent
two-armed bandit draws p1 ~ U[0, 1] and sets p2 = 1 - p1 (Wang et al. 2016, section 3.1).

The randomness of a trial travels with its task batch (see envs/trials.py): `reward_noise`
(T, pulls) uniforms decide every reward (r_t = 1 if u_t < p[a_t]) and `action_noise`
(T, pulls) uniforms let stochastic policies sample actions by inverse CDF.

Shape letters: T tasks (trials run in parallel), A arms, P pulls per trial.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from metalearn.envs.trials import TrialBatch, TrialEnv, TrialTasks
from metalearn.errors import ConfigError


@dataclass
class BanditConfig:
    """k-armed Bernoulli bandits with independent arm probabilities p_i ~ U[0, 1]."""

    task_kind: ClassVar[str] = "rl"
    dependent: ClassVar[bool] = False
    name: str = "bandit"
    arms: int = 5  # k
    pulls: int = 10  # n: pulls (one-step episodes) per trial
    root: str | None = None  # unused: procedural tasks need no files
    split: str | None = None  # unused: every task is fresh; test trials come from a fixed seed

    def __post_init__(self) -> None:
        if self.arms < 2:
            raise ConfigError(f"data.arms must be at least 2, got {self.arms}")
        if self.pulls < 1:
            raise ConfigError(f"data.pulls must be positive, got {self.pulls}")

    @property
    def actions(self) -> int:
        return self.arms

    @property
    def steps(self) -> int:
        return self.pulls

    def describe(self) -> dict[str, int]:
        """The task's setting, for results.json and run names."""
        return {"arms": self.arms, "pulls": self.pulls}


@dataclass
class DependentBanditConfig(BanditConfig):
    """Two arms with p2 = 1 - p1, p1 ~ U[0, 1] (Wang et al. 2016's dependent bandits)."""

    dependent: ClassVar[bool] = True
    name: str = "dependent_bandit"
    arms: int = 2
    pulls: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.arms != 2:
            raise ConfigError(
                f"data=dependent_bandit has two arms (p2 = 1 - p1); data.arms must be 2, got "
                f"{self.arms}; use data=bandit for more arms"
            )


@dataclass
class BanditBatch(TrialBatch):
    """T bandit trials: arm probabilities and the uniforms that decide rewards and actions."""

    probs: Tensor  # (T, A)
    reward_noise: Tensor  # (T, P)
    action_noise: Tensor  # (T, P)
    unit = "trials"  # what the trainer's throughput counts

    def env(self) -> "BanditEnv":
        """The vectorised environment that plays these trials."""
        return BanditEnv(self)


class BanditEnv(TrialEnv):
    """T bandit trials stepped at once, with Gymnasium's vector API on torch tensors.

    `step(actions)` pulls one arm per task and returns (observations (T, 0), rewards (T,),
    terminations (T,), truncations (T,), info). Every pull ends an episode (terminations are
    all True); `info["trial_over"]` says when the trial's last pull has been made (then
    `reset()` starts the next trial). `info["regret"]` is each pull's expected regret
    max(p) - p[a]. Bandits have no observation: RL² agents see only their previous action,
    reward and termination flag.
    """

    def __init__(self, batch: BanditBatch) -> None:
        super().__init__(batch, (0,), batch.probs.shape[1], 0.0, 1.0)
        self.best = batch.probs.max(-1).values  # (T,)

    def _observation(self) -> Tensor:
        return self.batch.probs.new_zeros(self.num_envs, 0)

    def step(self, actions: Tensor):
        t = self._next_step()
        chosen = self.batch.probs.gather(1, actions.view(-1, 1)).squeeze(1)  # (T,)
        rewards = (self.batch.reward_noise[:, t] < chosen).to(chosen.dtype)
        done = torch.ones_like(rewards, dtype=torch.bool)
        info = {"regret": self.best - chosen, "trial_over": self.t == self.batch.steps}
        return self._observation(), rewards, done, ~done, info


class BanditTasks(TrialTasks):
    """Draws bandit trials on the device; `episodes` gives the fixed validation and test ones."""

    in_shape = (0,)  # bandits have no observation

    def __init__(self, cfg: BanditConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.actions = cfg.arms

    def baselines(self) -> dict:
        """name -> policy, the classic bandit algorithms scored beside a learned agent."""
        from metalearn.envs.baselines import bandit_baselines

        return bandit_baselines(self.cfg.pulls)

    def sample(self, split: str, generator: torch.Generator, tasks: int, *_shape) -> BanditBatch:
        """T fresh trials (every split draws from the same family; the shape is the config's)."""

        def uniform(*shape: int) -> Tensor:
            return torch.rand(shape, generator=generator, device=generator.device).to(self.device)

        arms, pulls = self.cfg.arms, self.cfg.pulls
        if self.cfg.dependent:
            p1 = uniform(tasks, 1)
            probs = torch.cat([p1, 1 - p1], dim=1)
        else:
            probs = uniform(tasks, arms)
        return BanditBatch(probs, uniform(tasks, pulls), uniform(tasks, pulls))
