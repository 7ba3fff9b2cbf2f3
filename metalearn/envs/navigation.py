"""2-D point navigation (Finn et al. 2017, section 5.3) as a task family vectorised on tensors.

A task is a goal g ~ U[goal_low, goal_high]^2. A point agent starts at s_0 = 0; an action is a
velocity, clipped to [-action_bound, action_bound]^2, and the next state is s' = s + a. The
reward is the negative distance to the goal after the step, r = -||s' - g||, and the episode
ends (terminates) when both |s'_x - g_x| and |s'_y - g_y| fall under `done_threshold`, or is cut
off (truncated) after `horizon` steps. This follows the authors' environment step by step:
cbfinn/maml_rl `maml_examples/point_env_randgoal.py` and tristandeleu/pytorch-maml-rl
`maml_rl/envs/navigation.py` (which clips the action itself, as we do by default). The authors'
own runs wrap the environment in rllab's `normalize` (`rllab/envs/normalized_env.py`), which
maps a policy's action in [-1, 1] to [-0.1, 0.1] (a = 0.1 u, then clipped): `rescale_actions`
does the same.

After an episode terminates it stays over: later steps leave its state where it is, give reward 0
and report it terminated, and `info["valid"]` marks the steps an episode really took. So rewards
summed over the whole horizon are the episode's return. This mirrors the authors' samplers:
rllab's rollout (`rllab/sampler/utils.py`) ends a path at `done`, and pytorch-maml-rl's
`SyncVectorEnv` steps only the live environments while `BatchEpisodes` pads the rest with zero
rewards under a mask.

The randomness of a task's trajectories travels with its batch, as the discrete families'
`action_noise` does (envs/trials.py): each task holds a seed, and `NavigationBatch.action_noise`
draws from it the standard normals with which a Gaussian policy samples its actions,
a = mean + std * noise, one stream per stage of adaptation (before it, after each inner step).
A fixed test task thus gives the same trajectories to the same policy, and a resumed run draws
exactly the trajectories of the run it continues.

Shape letters: T tasks, N trajectories per task, E = T * N environments (task-major: environment
e plays task e // N), H the horizon, A = 2 action dimensions.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from gymnasium.spaces import Box
from gymnasium.vector import AutoresetMode, VectorEnv
from torch import Tensor

from metalearn.envs.trials import TrialTasks
from metalearn.errors import ConfigError


@dataclass
class NavigationConfig:
    """2-D navigation to a random goal (MAML's point robot)."""

    task_kind: ClassVar[str] = "rl"
    name: str = "navigation"
    goal_low: float = -0.5  # goals are uniform on [goal_low, goal_high]^2
    goal_high: float = 0.5
    horizon: int = 100  # steps per episode (the authors' max_path_length)
    action_bound: float = 0.1  # a velocity is clipped to [-action_bound, action_bound]^2
    done_threshold: float = 0.01  # done when |dx| and |dy| are both below it (0: never done)
    rescale_actions: bool = False  # rllab's normalize: actions in [-1, 1] scaled by the bound
    root: str | None = None  # unused: procedural tasks need no files
    split: str | None = None  # unused: every task is fresh; test tasks come from a fixed seed

    def __post_init__(self) -> None:
        for key in ("goal_low", "goal_high", "action_bound", "done_threshold"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"data.{key} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"data.{key} must be finite, got {value}")
        if self.goal_low >= self.goal_high:
            raise ConfigError(
                f"data.goal_low must be below data.goal_high, got [{self.goal_low}, "
                f"{self.goal_high}]"
            )
        if isinstance(self.horizon, bool) or not isinstance(self.horizon, int) or self.horizon < 1:
            raise ConfigError(f"data.horizon must be a positive integer, got {self.horizon!r}")
        if self.action_bound <= 0:
            raise ConfigError(f"data.action_bound must be positive, got {self.action_bound}")
        if self.done_threshold < 0:
            raise ConfigError(
                f"data.done_threshold must be >= 0 (0: episodes never end early), got "
                f"{self.done_threshold}"
            )

    @property
    def steps(self) -> int:
        return self.horizon

    @property
    def actions(self) -> int:
        """The action's dimensions (a velocity in the plane)."""
        return 2

    def describe(self) -> dict[str, Any]:
        """The task's setting, for results.json and run names."""
        return {"goals": [self.goal_low, self.goal_high], "horizon": self.horizon}


# task seeds are drawn below SEEDS (torch's CPU generator keeps 32 bits of a seed); stage k of a
# task draws from seed + k * STAGE_STRIDE mod SEEDS (an odd stride: distinct for every stage)
SEEDS, STAGE_STRIDE = 2**32, 0x9E3779B9


def stage_noise(seeds: Tensor, stage: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Standard normals (T, *shape) in `like`'s dtype and device, task t's drawn from its seed
    and the adaptation stage alone (the action noise of every continuous-control family)."""
    stream = ((seeds.cpu() + stage * STAGE_STRIDE) % SEEDS).tolist()
    noise = [
        torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=like.dtype)
        for seed in stream
    ]
    return torch.stack(noise).to(like.device)


@dataclass
class GoalBatch:
    """T continuous-control tasks (navigation, cheetah.py): one goal each, the settings they
    share, and each task's seed of its trajectories' randomness (None: seeds 0, 1, ..., T - 1)."""

    goals: Tensor  # (T, ...)
    cfg: Any  # with horizon and actions
    noise_seeds: Tensor | None = None  # (T,) int64
    unit = "tasks"  # what the trainer's throughput counts

    def __post_init__(self) -> None:
        if self.noise_seeds is None:
            self.noise_seeds = torch.arange(self.tasks)

    @property
    def tasks(self) -> int:
        return self.goals.shape[0]

    def __getitem__(self, part: slice):
        return type(self)(self.goals[part], self.cfg, self.noise_seeds[part])

    def action_noise(self, stage: int, trajectories: int) -> Tensor:
        """Standard normals (T, N, H, A) for N trajectories of every task at adaptation stage
        `stage` (0: before adaptation, k: after k inner steps): a task's draws depend on its seed
        and the stage alone, not on the batch it sits in."""
        shape = (trajectories, self.cfg.horizon, self.cfg.actions)
        return stage_noise(self.noise_seeds, stage, shape, self.goals)


@dataclass
class NavigationBatch(GoalBatch):
    """T navigation tasks: one goal (T, 2) each and the dynamics they share."""

    def env(self, trajectories: int = 1) -> "NavigationEnv":
        """The vectorised environment playing `trajectories` episodes of every task at once."""
        return NavigationEnv(self.goals.repeat_interleave(trajectories, dim=0), self.cfg)


class NavigationEnv(VectorEnv):
    """E point agents stepped at once, with Gymnasium's vector API on torch tensors.

    `reset()` gives the observations (E, 2) (the positions: zeros); `step(actions (E, 2))` gives
    (observations (E, 2), rewards (E,), terminations (E,), truncations (E,), info) with
    `info["valid"]` (E,): whether the episode was still running when it took this step.
    There is no autoreset: an episode that is over stays over until `reset()`.
    """

    metadata: ClassVar[dict[str, Any]] = {"autoreset_mode": AutoresetMode.DISABLED}

    def __init__(self, goals: Tensor, cfg: NavigationConfig) -> None:
        self.goals, self.cfg, self.num_envs = goals, cfg, goals.shape[0]
        self.horizon = cfg.horizon
        bound = 1.0 if cfg.rescale_actions else cfg.action_bound
        self.single_observation_space = Box(-np.inf, np.inf, (2,), np.float32)
        self.single_action_space = Box(-bound, bound, (2,), np.float32)
        self.observation_space = Box(-np.inf, np.inf, (self.num_envs, 2), np.float32)
        self.action_space = Box(-bound, bound, (self.num_envs, 2), np.float32)
        self.reset()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Every agent back at the origin, every episode running (the goals are the batch's)."""
        self.t = 0
        self.state = torch.zeros_like(self.goals)  # (E, 2)
        self.over = torch.zeros(self.num_envs, dtype=torch.bool, device=self.goals.device)
        return self.state.clone(), {}

    def velocity(self, actions: Tensor) -> Tensor:
        """The clipped velocity (E, 2) an action moves the agent by."""
        bound = self.cfg.action_bound
        if self.cfg.rescale_actions:  # rllab's NormalizedEnv: lb + (u + 1) / 2 * (ub - lb)
            actions = actions * bound
        return actions.clamp(-bound, bound)

    def step(self, actions: Tensor):
        if self.t >= self.horizon:
            raise RuntimeError(f"the episodes are over after {self.horizon} steps; call reset()")
        self.t += 1
        valid = ~self.over  # (E,)
        moved = self.state + self.velocity(actions).to(self.state.dtype)
        self.state = torch.where(valid[:, None], moved, self.state)
        offset = self.state - self.goals  # reward and done use the state after the step
        rewards = torch.where(valid, -offset.norm(dim=-1), 0.0)
        reached = (offset.abs() < self.cfg.done_threshold).all(-1)
        self.over = self.over | (valid & reached)
        truncated = ~self.over & (self.t == self.horizon)
        return self.state.clone(), rewards, self.over.clone(), truncated, {"valid": valid}


def rollout(env: NavigationEnv, act: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """Play every episode of `env` for the whole horizon with `act(observations) -> actions`.

    Returns observations (E, H, 2) (the one each action was chosen on), actions (E, H, 2),
    rewards (E, H) (zero after an episode ends) and valid (E, H) (the steps taken).
    """
    observation, _ = env.reset()
    steps: dict[str, list[Tensor]] = {"observations": [], "actions": [], "rewards": [], "valid": []}
    for _ in range(env.horizon):
        action = act(observation)
        steps["observations"].append(observation)
        steps["actions"].append(action)
        observation, reward, _, _, info = env.step(action)
        steps["rewards"].append(reward)
        steps["valid"].append(info["valid"])
    return {key: torch.stack(values, 1) for key, values in steps.items()}


class NavigationTasks(TrialTasks):
    """Draws goals on the device; `episodes` gives the fixed validation and test tasks."""

    in_shape = (2,)  # the observation: the agent's position
    continuous_actions = True  # a Gaussian policy's velocities (RL²'s discrete families: False)

    def __init__(self, cfg: NavigationConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.action_dim = 2

    def sample(
        self, split: str, generator: torch.Generator, tasks: int, *_shape
    ) -> NavigationBatch:
        """T fresh goals and their noise seeds (every split draws from the same family)."""
        u = torch.rand((tasks, 2), generator=generator, device=generator.device)
        seeds = torch.randint(SEEDS, (tasks,), generator=generator, device=generator.device)
        low, high = self.cfg.goal_low, self.cfg.goal_high
        goals = (low + (high - low) * u).to(self.device)
        return NavigationBatch(goals, self.cfg, seeds.to(self.device))
