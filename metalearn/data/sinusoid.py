"""Sinusoid regression tasks (Finn et al. 2017, section 5.1): y = A sin(x - phase), no files.

BMAML's variant (Yoon et al. 2018, their data_generator.py; `data=sinusoid_bmaml`) also draws a
frequency, y = A sin(f x - phase) with f ~ U[0.5, 2] and phase ~ U[0, 2 pi], adds noise of std
0.01 A to the observed targets (support sets, and query sets in meta-training; test queries are
the clean function), and a finite training set fixes each task's inputs and noise as well as its
function (`data.fixed_points`).

CAVIA's protocol (Zintgraf et al. 2019; lmzintgraf/cavia, regression/cavia.py `eval_cavia` and
tasks_sine.py `get_input_range`) scores each test task on 100 evenly spaced inputs over [-5, 5]
instead of random ones: `data.test_points=grid` with `eval.query=100`.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError

TEST_POINTS = ("random", "grid")


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
    frequency: list[float] = field(default_factory=lambda: [1.0, 1.0])  # U[low, high]
    noise: float = 0.0  # std of the observation noise, as a fraction of the task's amplitude
    # a finite set of training functions (BMAML's |T| = 100, 1000), drawn once from seed 0 of
    # the family; meta-training draws tasks from it (fresh inputs each time), validation and
    # test from the whole family (None: every training task is a fresh function)
    train_tasks: int | None = None
    # with train_tasks: each training task's inputs and noise are fixed too (BMAML's finite data
    # sets: a task is its shots + query points, the same at every visit)
    fixed_points: bool = False
    root: str | None = None  # unused: procedural tasks need no files
    split: str | None = None  # unused: every task is fresh; test tasks come from a fixed seed
    # the query inputs of validation and test tasks: 'random', U[x_range] like the support
    # (MAML's protocol), or 'grid', evenly spaced over x_range with both ends (CAVIA's protocol:
    # 100 points, eval.query=100); meta-training queries stay random
    test_points: str = "random"

    def __post_init__(self) -> None:
        if self.ways != 1:
            raise ConfigError(
                f"sinusoid regression has one output: data.ways must be 1, got {self.ways}"
            )
        if self.shots < 1 or self.query < 1:
            raise ConfigError(
                f"data.shots and data.query must be positive, got {self.shots} and {self.query}"
            )
        if self.train_tasks is not None and self.train_tasks < 1:
            raise ConfigError(
                f"data.train_tasks must be positive (or null), got {self.train_tasks}"
            )
        if self.fixed_points and not self.train_tasks:
            raise ConfigError(
                "data.fixed_points=true fixes the points of a finite training set: set "
                "data.train_tasks as well (BMAML's 100 or 1000)"
            )
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ConfigError(f"data.noise must be >= 0 (a fraction of A), got {self.noise}")
        if self.test_points not in TEST_POINTS:
            raise ConfigError(
                f"data.test_points must be one of {', '.join(TEST_POINTS)}, got "
                f"{self.test_points!r}"
            )
        for key in ("amplitude", "phase", "x_range", "frequency"):
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

        cfg, points = self.cfg, shots + query
        finite = split == "train" and bool(cfg.train_tasks)
        fixed = finite and cfg.fixed_points
        if finite:  # from the finite set of functions
            pick = torch.randint(
                cfg.train_tasks, (tasks,), generator=generator, device=generator.device
            ).to(self.device)
            amplitude, phase, frequency = (v[pick] for v in self.finite_set())
        else:
            amplitude = uniform((tasks, 1, 1), cfg.amplitude)
            phase = uniform((tasks, 1, 1), cfg.phase)
        grid = split != "train" and cfg.test_points == "grid"
        if fixed:
            x, eps = (v[pick] for v in self.finite_points(points))
        elif grid:  # random support inputs (T, K, 1), then the same Q grid points for every task
            line = torch.linspace(*cfg.x_range, query, device=self.device)
            x = uniform((tasks, shots, 1), cfg.x_range)
            x = torch.cat([x, line.to(x.dtype).view(1, query, 1).expand(tasks, -1, -1)], 1)
        else:
            x = uniform((tasks, points, 1), cfg.x_range)  # (T, K+Q, 1)
        # the draws below only where the family has them: MAML's episodes stay as they were
        if not finite:
            low, high = cfg.frequency
            draw = low < high
            frequency = uniform((tasks, 1, 1), cfg.frequency) if draw else amplitude * 0 + low
        y = amplitude * torch.sin(frequency * x - phase)
        observed = y.clone()
        if cfg.noise > 0:
            if not fixed:
                shape, where = (tasks, points, 1), generator.device
                eps = torch.randn(shape, generator=generator, device=where).to(self.device)
            observed = y + cfg.noise * amplitude * eps
        # targets carry the noise where a learner sees them: support sets, and training queries
        query_y = observed[:, shots:] if split == "train" else y[:, shots:]
        info = {"amplitude": amplitude.view(-1), "phase": phase.view(-1)}
        if cfg.frequency != [1.0, 1.0]:
            info["frequency"] = frequency.view(-1)
        return TaskBatch(
            support=Split(x[:, :shots], observed[:, :shots]),
            query=Split(x[:, shots:], query_y),
            ways=1,
            info=info,
        )

    def finite_set(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The amplitudes, phases and frequencies (|T|, 1, 1) of data.train_tasks functions,
        from seed 0."""
        generator = torch.Generator().manual_seed(0)
        n = self.cfg.train_tasks
        draws = [torch.rand((n, 1, 1), generator=generator) for _ in range(3)]
        bounds = (self.cfg.amplitude, self.cfg.phase, self.cfg.frequency)
        return tuple(  # type: ignore[return-value]
            (b[0] + (b[1] - b[0]) * u).to(self.device) for u, b in zip(draws, bounds, strict=True)
        )

    def finite_points(self, points: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each finite training task's `points` inputs and standard-normal noise draws
        (|T|, points, 1), from seed 1: the same at every visit (data.fixed_points)."""
        generator = torch.Generator().manual_seed(1)
        n, (low, high) = self.cfg.train_tasks, self.cfg.x_range
        x = low + (high - low) * torch.rand((n, points, 1), generator=generator)
        eps = torch.randn((n, points, 1), generator=generator)
        return x.to(self.device), eps.to(self.device)

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
