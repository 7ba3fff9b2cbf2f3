"""Sinusoid regression tasks (Finn et al. 2017, section 5.1): y = A sin(x - phase), no files."""

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError


@dataclass
class SinusoidConfig:
    """The task family: amplitude, phase and input ranges, and the task size."""

    task_kind: ClassVar[str] = "regression"
    name: str = "sinusoid"
    ways: int = 1  # regression: one output; kept so every data set answers data.ways
    shots: int = 10  # K: support points per task
    query: int = 10  # query points per task
    amplitude: list[float] = field(default_factory=lambda: [0.1, 5.0])  # U[low, high]
    phase: list[float] = field(default_factory=lambda: [0.0, 3.141592653589793])  # U[low, high]
    x_range: list[float] = field(default_factory=lambda: [-5.0, 5.0])  # inputs U[low, high]
    root: str | None = None  # unused: procedural tasks need no files
    split: str | None = None  # unused: every task is fresh; test tasks come from a fixed seed

    def __post_init__(self) -> None:
        if self.ways != 1:
            raise ConfigError(
                f"sinusoid regression has one output: data.ways must be 1, got {self.ways}"
            )
        if self.shots < 1 or self.query < 1:
            raise ConfigError(
                f"data.shots and data.query must be positive, got {self.shots} and {self.query}"
            )
        for key in ("amplitude", "phase", "x_range"):
            bounds = getattr(self, key)
            if len(bounds) != 2 or not all(map(math.isfinite, bounds)) or bounds[0] > bounds[1]:
                raise ConfigError(
                    f"data.{key} must be [low, high] with finite low <= high, got {bounds}"
                )


class SinusoidTasks:
    """Draws sinusoid tasks on the device; `info` carries each task's amplitude and phase."""

    kind = "regression"
    in_shape = (1,)

    def __init__(self, cfg: SinusoidConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device

    def check(self, split: str, ways: int, shots: int, query: int) -> None:
        """Any number of points fits: the family is infinite."""

    def sample(
        self, split: str, generator: torch.Generator, tasks: int, ways: int, shots: int, query: int
    ) -> TaskBatch:
        """T fresh tasks; every split draws from the same family."""

        def uniform(shape: tuple[int, ...], bounds: list[float]) -> torch.Tensor:
            u = torch.rand(shape, generator=generator, device=generator.device)
            return (bounds[0] + (bounds[1] - bounds[0]) * u).to(self.device)

        amplitude = uniform((tasks, 1, 1), self.cfg.amplitude)
        phase = uniform((tasks, 1, 1), self.cfg.phase)
        x = uniform((tasks, shots + query, 1), self.cfg.x_range)  # (T, K+Q, 1)
        y = amplitude * torch.sin(x - phase)
        return TaskBatch(
            support=Split(x[:, :shots], y[:, :shots]),
            query=Split(x[:, shots:], y[:, shots:]),
            ways=1,
            info={"amplitude": amplitude.view(-1), "phase": phase.view(-1)},
        )

    def episodes(
        self, split: str, n: int, ways: int, shots: int, query: int, *, seed: int, batch_size: int
    ) -> Iterator[TaskBatch]:
        """n fixed tasks: the same for a given seed whatever the batch size."""
        generator = torch.Generator().manual_seed(seed)
        batch = self.sample(split, generator, n, ways, shots, query)
        for start in range(0, n, batch_size):
            part = slice(start, min(start + batch_size, n))
            yield TaskBatch(
                support=Split(batch.support.x[part], batch.support.y[part]),
                query=Split(batch.query.x[part], batch.query.y[part]),
                ways=1,
                info={k: v[part] for k, v in batch.info.items()},
            )
