"""A seeded stream of tasks for online meta-learning: each task's own data (its pool), drawn once.

Task t is drawn from the training split by a generator of its own, seeded by the stream's seed
and t, so the first t tasks are the same whatever the stream's length and on any device. A task
keeps its classes and its labels; what it holds is a pool of P examples per class (regression:
P points of one function). The learner meets task t with the first K of each class's pool to
adapt on and the next Q held out to score on (`meeting`); once the task is in the buffer, every
visit draws K + Q examples of each class afresh from its pool (`draw`; Finn et al. 2019,
Algorithm 1's Meta-Update: D_k^tr and D_k^val sampled from D_k).

Shape letters: T tasks, B tasks of a batch, N ways, P pool, K shots, Q queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError, DataError

SEED_STRIDE = 1_000_003  # task t's generator seed: stream seed * stride + t (a prime stride)


def task_seed(seed: int, index: int) -> int:
    """The seed of task `index`'s generator (torch seeds are below 2**64)."""
    return (seed * SEED_STRIDE + index) % 2**63


@dataclass
class TaskStream:
    """T tasks: inputs (T, N, P, *in_shape) and targets (T, N, P) labels or (T, N, P, 1) values;
    label n is class n of its task, in every visit."""

    x: Tensor
    y: Tensor

    @classmethod
    def draw(cls, tasks: Any, count: int, ways: int, pool: int, seed: int) -> TaskStream:
        """`count` tasks of the training split of `tasks` (a ClassTasks or SinusoidTasks), each
        N-way with P examples per class (regression: N = 1, P points), from seed `seed`."""
        try:
            tasks.check("train", ways, pool, 0)
        except DataError as error:
            raise ConfigError(
                f"trainer.pool={pool} examples per class is more than the training split holds "
                f"({error}); lower trainer.pool"
            ) from error
        xs, ys = [], []
        for index in range(count):
            generator = torch.Generator().manual_seed(task_seed(seed, index))  # CPU: any device
            support = tasks.sample("train", generator, 1, ways, pool, 0).support
            xs.append(support.x)  # (1, N * P, ...), class-major
            ys.append(support.y)
        x, y = torch.cat(xs), torch.cat(ys)
        return cls(x.view(count, ways, pool, *x.shape[2:]), y.view(count, ways, pool, *y.shape[2:]))

    @property
    def tasks(self) -> int:
        return self.x.shape[0]

    @property
    def ways(self) -> int:
        return self.x.shape[1]

    @property
    def pool(self) -> int:
        return self.x.shape[2]

    def meeting(self, indices: Tensor, shots: int, query: int) -> TaskBatch:
        """Tasks `indices` (B,) as the learner meets them: the first K examples of each class to
        adapt on, the next Q held out to score on."""
        order = torch.arange(shots + query).expand(len(indices), self.ways, -1)  # (B, N, K + Q)
        return self._split(indices, order, shots)

    def draw_batch(
        self, indices: Tensor, generator: torch.Generator, shots: int, query: int
    ) -> TaskBatch:
        """Tasks `indices` (B,), each with K + Q distinct examples per class drawn afresh from
        its own pool by `generator` (a CPU generator)."""
        keys = torch.rand((len(indices), self.ways, self.pool), generator=generator)
        return self._split(indices, keys.argsort(dim=-1)[..., : shots + query], shots)

    def _split(self, indices: Tensor, order: Tensor, shots: int) -> TaskBatch:
        """Index the pools: tasks (B,) and positions (B, N, K + Q) -> a TaskBatch whose support
        holds the first K positions of each class and whose query the rest, class-major."""
        device = self.x.device
        tasks = indices.to(device)[:, None, None]  # (B, 1, 1)
        classes = torch.arange(self.ways, device=device)[None, :, None]  # (1, N, 1)
        order = order.to(device)
        x, y = self.x[tasks, classes, order], self.y[tasks, classes, order]  # (B, N, K + Q, ...)
        return TaskBatch(
            support=Split(x[:, :, :shots].flatten(1, 2), y[:, :, :shots].flatten(1, 2)),
            query=Split(x[:, :, shots:].flatten(1, 2), y[:, :, shots:].flatten(1, 2)),
            ways=self.ways,
        )
