"""HalfCheetah velocity and direction (Finn et al. 2017, section 5.3) on Gymnasium's MuJoCo
`HalfCheetah-v5`, vectorised over tasks and trajectories.

A task is a goal velocity v_goal ~ U[velocity_low, velocity_high] (`task: velocity`, reward
-|v - v_goal| - ctrl_cost ||a||^2) or a direction d in {-1, +1}, each with probability 1/2
(`task: direction`, reward d v - ctrl_cost ||a||^2), v the forward velocity of the torso
(Gymnasium's `info["x_velocity"]`, (x after - x before) / dt) and a the action clipped to the
action space [-1, 1]^6; episodes last `horizon` steps (HalfCheetah never terminates). As the
authors' environments: cbfinn/maml_rl `rllab/envs/mujoco/half_cheetah_env_rand.py` and
`half_cheetah_env_rand_direc.py` (ctrl cost 0.5 * 0.1 ||a||^2 on the action rllab's `normalize`
clipped) and tristandeleu/pytorch-maml-rl `maml_rl/envs/mujoco/half_cheetah.py` (velocities
U[0, 2], 100-step episodes).

The physics is Gymnasium's: a `SyncVectorEnv` of E = T * N `HalfCheetah-v5` environments
(task-major: environment e plays task e // N), one pool per E kept for the process (making an
environment compiles its XML). The randomness travels with the task, as in navigation.py: task
t's seed gives the action noise of each stage of adaptation (`stage_noise`) and the initial
states of its N trajectories (Gymnasium's reset noise, seeded per trajectory; the same at every
stage, so the stages of a task differ by the policy and the action noise alone). A fixed test
task thus gives the same trajectories to the same policy.

MuJoCo is an optional extra (`pip install -e '.[mujoco]'`): without it, choosing these tasks is a
ConfigError that names it.
"""

import importlib.util
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from gymnasium.spaces import Box
from gymnasium.vector import AutoresetMode, VectorEnv
from torch import Tensor

from metalearn.envs.navigation import SEEDS, GoalBatch
from metalearn.envs.trials import TrialTasks
from metalearn.errors import ConfigError

TASKS = ("velocity", "direction")
MUJOCO_EXTRA = "pip install -e '.[mujoco]' (or pip install 'gymnasium[mujoco]')"


def require_mujoco(name: str) -> None:
    """A ConfigError naming the extra where MuJoCo's Python bindings are not installed."""
    if importlib.util.find_spec("mujoco") is None:
        raise ConfigError(
            f"data={name} simulates HalfCheetah-v5 in MuJoCo, which is not installed; install "
            f"the optional extra: {MUJOCO_EXTRA}"
        )


@dataclass
class CheetahConfig:
    """HalfCheetah running at a goal velocity or in a goal direction."""

    task_kind: ClassVar[str] = "rl"
    name: str = "cheetah_velocity"
    task: str = "velocity"  # velocity: v_goal ~ U[low, high]; direction: d in {-1, +1}
    velocity_low: float = 0.0
    velocity_high: float = 2.0
    horizon: int = 100  # steps per episode
    ctrl_cost: float = 0.05  # the weight of ||a||^2 (the authors' 0.5 * 0.1)
    env_id: str = "HalfCheetah-v5"
    root: str | None = None  # unused: procedural tasks need no files
    split: str | None = None  # unused: every task is fresh; test tasks come from a fixed seed

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"data.task must be one of {', '.join(TASKS)}, got {self.task!r}")
        for key in ("velocity_low", "velocity_high", "ctrl_cost"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"data.{key} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"data.{key} must be finite, got {value}")
        if self.velocity_low > self.velocity_high:
            raise ConfigError(
                f"data.velocity_low must not exceed data.velocity_high, got "
                f"[{self.velocity_low}, {self.velocity_high}]"
            )
        if self.ctrl_cost < 0:
            raise ConfigError(f"data.ctrl_cost must be >= 0, got {self.ctrl_cost}")
        if isinstance(self.horizon, bool) or not isinstance(self.horizon, int) or self.horizon < 1:
            raise ConfigError(f"data.horizon must be a positive integer, got {self.horizon!r}")
        require_mujoco(self.name)

    @property
    def steps(self) -> int:
        return self.horizon

    @property
    def actions(self) -> int:
        """The torques of the six joints."""
        return 6

    def describe(self) -> dict[str, Any]:
        """The task's setting, for results.json and run names."""
        goals = [self.velocity_low, self.velocity_high] if self.task == "velocity" else [-1, 1]
        return {"task": self.task, "goals": goals, "horizon": self.horizon}


_POOLS: dict[tuple[str, int], VectorEnv] = {}


def physics(env_id: str, size: int) -> VectorEnv:
    """A SyncVectorEnv of `size` environments, made once per process and size."""
    import gymnasium as gym

    key = (env_id, size)
    if key not in _POOLS:
        _POOLS[key] = gym.vector.SyncVectorEnv(
            [lambda: gym.make(env_id, max_episode_steps=None) for _ in range(size)],
            autoreset_mode=AutoresetMode.DISABLED,
        )
    return _POOLS[key]


@dataclass
class CheetahBatch(GoalBatch):
    """T HalfCheetah tasks: a goal velocity or direction each (T,), and each task's seed."""

    def env(self, trajectories: int = 1) -> "CheetahEnv":
        """The environments playing `trajectories` episodes of every task at once."""
        seeds = self.noise_seeds.cpu()[:, None] * trajectories + torch.arange(trajectories)
        return CheetahEnv(
            self.goals.repeat_interleave(trajectories, dim=0),
            (seeds.flatten() % SEEDS).tolist(),
            self.cfg,
        )


class CheetahEnv(VectorEnv):
    """E cheetahs with torch tensors in and out: `reset()` gives the observations (E, 17)
    (float64 MuJoCo states in the goals' dtype), `step(actions (E, 6))` the task rewards (E,)
    and `info["valid"]` (all true: the episodes run the whole horizon), as NavigationEnv."""

    metadata: ClassVar[dict[str, Any]] = {"autoreset_mode": AutoresetMode.DISABLED}

    def __init__(self, goals: Tensor, seeds: list[int], cfg: CheetahConfig) -> None:
        self.goals, self.seeds, self.cfg = goals, seeds, cfg
        self.num_envs, self.horizon = goals.shape[0], cfg.horizon
        self.physics = physics(cfg.env_id, self.num_envs)
        self.single_observation_space = self.physics.single_observation_space
        self.single_action_space = Box(-1.0, 1.0, (cfg.actions,), np.float32)
        self.observation_space = self.physics.observation_space
        self.action_space = self.physics.action_space
        self.t = 0

    def tensor(self, array: np.ndarray) -> Tensor:
        return torch.as_tensor(array, dtype=self.goals.dtype).to(self.goals.device)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Every cheetah at Gymnasium's initial state, its noise from the trajectory's seed."""
        self.t = 0
        observations, _ = self.physics.reset(seed=self.seeds)
        return self.tensor(observations), {}

    def step(self, actions: Tensor):
        if self.t >= self.horizon:
            raise RuntimeError(f"the episodes are over after {self.horizon} steps; call reset()")
        self.t += 1
        clipped = actions.detach().clamp(-1.0, 1.0)
        observations, _, _, _, info = self.physics.step(clipped.cpu().double().numpy())
        velocity = self.tensor(info["x_velocity"])
        ctrl = self.cfg.ctrl_cost * clipped.square().sum(-1).to(velocity.dtype)
        if self.cfg.task == "velocity":
            rewards = -(velocity - self.goals).abs() - ctrl
        else:
            rewards = self.goals * velocity - ctrl
        over = torch.zeros(self.num_envs, dtype=torch.bool, device=self.goals.device)
        truncated = torch.full_like(over, self.t == self.horizon)
        info = {"valid": ~over, "velocity": velocity}
        return self.tensor(observations), rewards, over, truncated, info


class CheetahTasks(TrialTasks):
    """Draws goals on the device; `episodes` gives the fixed validation and test tasks."""

    in_shape = (17,)  # HalfCheetah-v5's observation (the torso's x position excluded)
    continuous_actions = True

    def __init__(self, cfg: CheetahConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.action_dim = cfg.actions

    def sample(self, split: str, generator: torch.Generator, tasks: int, *_shape) -> CheetahBatch:
        """T fresh goals and their seeds (every split draws from the same family)."""
        u = torch.rand((tasks,), generator=generator, device=generator.device)
        seeds = torch.randint(SEEDS, (tasks,), generator=generator, device=generator.device)
        if self.cfg.task == "velocity":
            low, high = self.cfg.velocity_low, self.cfg.velocity_high
            goals = low + (high - low) * u
        else:
            goals = torch.where(u < 0.5, -1.0, 1.0).to(u.dtype)
        return CheetahBatch(goals.to(self.device), self.cfg, seeds.to(self.device))
