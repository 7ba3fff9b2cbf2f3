"""The Harlow task (Harlow 1949; Wang et al. 2018): learning to learn which of two objects pays.

Each episode shows two objects never seen together before, on `trials` successive choices;
each time they appear in a random left/right arrangement, the agent picks a side, and the same
object is rewarded throughout the episode whichever side it is on (reward 1, else 0). The
first choice can only be a guess (50%); a learner that has learned to learn is right from the
second choice on. An RL² trial is one such episode: the memory carries across its choices and
is reset before the next pair of objects.

Objects are feature vectors (`features` dimensions, entries N(0, 1)) from a fixed pool of
`objects` drawn with `object_seed`; the pool is split 60/20/20 between meta-training,
validation and test, so the test's objects are never seen in training. The observation of a
choice is the left object's features, then the right one's (T, 2 * features).

Randomness travels with the batch (see envs/trials.py): which objects, which is rewarded, the
arrangement of every choice, and the action uniforms.
"""

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from metalearn.envs.trials import RandomPolicy, TrialBatch, TrialEnv, TrialTasks
from metalearn.errors import ConfigError

SPLITS = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}  # shares of the pool


@dataclass
class HarlowConfig:
    """Episodes of `trials` choices between the same two objects; one of them pays."""

    task_kind: ClassVar[str] = "rl"
    name: str = "harlow"
    trials: int = 6  # choices per episode (Harlow 1949 and Wang et al. 2018: 6)
    features: int = 8  # dimensions of an object's feature vector
    objects: int = 1000  # objects in the pool (60/20/20% train/val/test)
    object_seed: int = 0  # seed of the pool: the same objects for every run
    root: str | None = None  # unused: procedural tasks need no files
    split: str | None = None  # unused: the object pool is split by SPLITS

    def __post_init__(self) -> None:
        if self.trials < 2:
            raise ConfigError(f"data.trials must be at least 2, got {self.trials}")
        if self.features < 1:
            raise ConfigError(f"data.features must be positive, got {self.features}")
        if self.objects < 10:
            raise ConfigError(
                f"data.objects must be at least 10 (two per split at least), got {self.objects}"
            )

    @property
    def actions(self) -> int:
        return 2  # left, right

    @property
    def steps(self) -> int:
        return self.trials

    def describe(self) -> dict[str, int]:
        return {"trials": self.trials, "features": self.features}


@dataclass
class HarlowBatch(TrialBatch):
    """T episodes: the objects shown (T, P, 2, D) and the side of the rewarded one (T, P)."""

    shown: Tensor  # (T, P, 2, D): left and right object at every choice
    rewarded_side: Tensor  # (T, P): 0 left, 1 right
    action_noise: Tensor  # (T, P)
    unit = "trials"  # what the trainer's throughput counts (an RL² trial is one episode here)

    def env(self) -> "HarlowEnv":
        return HarlowEnv(self)


class HarlowEnv(TrialEnv):
    """T Harlow episodes stepped at once (Gymnasium's vector API on torch tensors): each
    `step(sides)` is one choice; the next observation is the next choice's two objects."""

    def __init__(self, batch: HarlowBatch) -> None:
        super().__init__(batch, (2 * batch.shown.shape[-1],), 2, -np.inf, np.inf)

    def _observation(self) -> Tensor:
        t = min(self.t, self.batch.steps - 1)  # after the last choice: a last look, unused
        return self.batch.shown[:, t].flatten(1)

    def step(self, actions: Tensor):
        correct = actions == self.batch.rewarded_side[:, self._next_step()]
        reward = correct.to(self.batch.shown.dtype)
        done = torch.ones_like(correct)  # every choice ends a (one-step) episode
        info = {"regret": 1 - reward, "trial_over": self.t == self.batch.steps}
        return self._observation(), reward, done, ~done, info


class HarlowTasks(TrialTasks):
    """Draws Harlow episodes from each split's own objects, on the device."""

    per_step_accuracy = True  # a choice's reward is 1 when it is right: report it by choice

    def __init__(self, cfg: HarlowConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.actions = 2
        self.in_shape = (2 * cfg.features,)
        g = torch.Generator().manual_seed(cfg.object_seed)
        pool = torch.randn(cfg.objects, cfg.features, generator=g)
        self.pools = {
            split: pool[int(a * cfg.objects) : int(b * cfg.objects)].to(device)
            for split, (a, b) in SPLITS.items()
        }

    def baselines(self) -> dict:
        """A random chooser, and the ideal learner: a guess first, then the object that paid."""
        return {"random": RandomPolicy(), "ideal": IdealLearner()}

    def sample(self, split: str, generator: torch.Generator, tasks: int, *_shape) -> HarlowBatch:
        pool, trials = self.pools[split], self.cfg.trials
        g = generator

        def rand(*shape: int) -> Tensor:
            return torch.rand(shape, generator=g, device=g.device).to(self.device)

        first = (rand(tasks) * pool.shape[0]).long()  # two distinct objects per episode
        second = (first + 1 + (rand(tasks) * (pool.shape[0] - 1)).long()) % pool.shape[0]
        pair = torch.stack([pool[first], pool[second]], 1)  # (T, 2, D); pair[:, 0] pays
        swap = (rand(tasks, trials) < 0.5).long()  # 1: the rewarded object is on the right
        sides = torch.stack([swap, 1 - swap], -1)  # (T, P, 2): which object is left, right
        shown = pair[torch.arange(tasks, device=self.device)[:, None, None], sides]
        return HarlowBatch(shown, swap, rand(tasks, trials))


class IdealLearner:
    """What learning to learn reaches: a random first choice; from then on the side of the
    object that paid (or of the other one, if the first choice did not pay)."""

    def start(self, env: HarlowEnv, observation: Tensor, seed: int) -> None:
        self.random = RandomPolicy()
        self.random.start(env, observation, seed)
        self.observation, self.winner, self.t = observation, None, 0

    def act(self) -> Tensor:
        if self.winner is None:
            return self.random.act()
        left, right = self.observation.chunk(2, dim=-1)
        return ((right - self.winner).norm(dim=-1) < (left - self.winner).norm(dim=-1)).long()

    def observe(self, actions: Tensor, rewards: Tensor, observation: Tensor, _done) -> None:
        if self.winner is None:
            left, right = self.observation.chunk(2, dim=-1)
            chosen_right = (actions == 1)[:, None]
            chosen = torch.where(chosen_right, right, left)
            other = torch.where(chosen_right, left, right)
            self.winner = torch.where(rewards[:, None] > 0, chosen, other)
        self.random.observe()
        self.observation = observation
        self.t += 1
