"""Functions drawn from Gaussian processes: the neural-process benchmark, with its exact posterior.

Two samplers:

- `npf` (the Neural-Process-Family protocol, Dubois et al. 2020, utils/data/gaussian_process.py):
  each function is drawn at `data.query` = 128 inputs uniform on [-2, 2] (sorted), from one of
  the kernels below; its context is a random subset of U{min_shots..shots} = U{0..50} of those
  points and its targets are all of them (context included), as in the NPF's training.
  Kernels: `rbf` (length 0.2), `periodic` (length 0.5, period 0.5), `matern` (nu = 1.5, length
  0.2, plus white noise of variance 0.1), `variable_matern` (nu = 1.5, length U[0.01, 0.3] per
  function) and `mix` (each function from one of those four, uniformly).
- `tnp` (the BNP/TNP sampler, Lee et al. 2020, Nguyen & Grover 2022): an RBF kernel with length
  U[0.1, 0.6] and scale U[0.1, 1.0] per function and noise std 0.02; U{min_shots..shots} context
  points and `data.query` separate target points, all inputs uniform on [-2, 2].

Every function carries observation noise of variance `data.noise` (1e-4: the NPF's smallest
predicted standard deviation, 0.01, squared) besides any white-noise kernel term, so the exact
predictive density is finite at context points; `GPTasks.oracle` computes it in closed form
under the true kernel: the ceiling every neural process is measured against.

Context sets vary in size within a batch: `support` is padded to `data.shots` points and
`info["context"]` holds each task's count (the first count points are real).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError, DataError

# name -> the NPF's hyperparameters; `variable_matern` draws its length per function
KERNELS = ("rbf", "periodic", "matern", "variable_matern", "mix")
SAMPLERS = ("npf", "tnp")
MIXED = ("rbf", "periodic", "matern", "variable_matern")  # what `mix` draws from
MATERN_WHITE = 0.1  # the NPF's noisy Matern: WhiteKernel(noise_level=0.1)
TNP_NOISE_STD = 0.02  # sigma_eps of the BNP/TNP RBF sampler
CHUNK = 256  # tasks drawn at once: the test set does not depend on eval.batch_size


@dataclass
class GPConfig:
    """The kernel family, the sampler, and how many context and target points a task has."""

    task_kind: ClassVar[str] = "regression"
    name: str = "gp"
    kernel: str = "rbf"  # one of KERNELS (sampler=npf; tnp draws RBF hyperparameters)
    sampler: str = "npf"  # 'npf' or 'tnp' (see the module docstring)
    ways: int = 1  # regression: one output
    shots: int = 50  # the most context points of a task
    min_shots: int = 0  # the fewest: contexts have U{min_shots..shots} points
    query: int = 128  # target points per task (npf: all points of the function)
    noise: float = 1e-4  # observation noise variance added to every function
    x_range: list[float] = field(default_factory=lambda: [-2.0, 2.0])
    root: str | None = None  # unused: procedural tasks need no files
    split: str | None = None  # unused: test functions come from a fixed seed

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ConfigError(
                f"unknown data.kernel {self.kernel!r}; the kernels are {', '.join(KERNELS)}"
            )
        if self.sampler not in SAMPLERS:
            raise ConfigError(
                f"unknown data.sampler {self.sampler!r}; the samplers are {', '.join(SAMPLERS)}"
            )
        if self.ways != 1:
            raise ConfigError(f"GP regression has one output: data.ways must be 1, got {self.ways}")
        if not 0 <= self.min_shots <= self.shots:
            raise ConfigError(
                f"contexts have U{{data.min_shots..data.shots}} points: need 0 <= min_shots <= "
                f"shots, got {self.min_shots} and {self.shots}"
            )
        if self.query < 1:
            raise ConfigError(f"data.query (target points) must be positive, got {self.query}")
        if self.sampler == "npf" and self.shots > self.query:
            raise ConfigError(
                f"sampler=npf draws the context from the function's data.query={self.query} "
                f"points: data.shots ({self.shots}) cannot exceed it"
            )
        if self.sampler == "tnp" and self.kernel != "rbf":
            raise ConfigError(
                f"sampler=tnp draws RBF kernels with random hyperparameters; data.kernel="
                f"{self.kernel} needs sampler=npf"
            )
        if not 0 < self.noise < math.inf:
            raise ConfigError(f"data.noise (a variance) must be positive, got {self.noise}")
        low, high = self.x_range
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ConfigError(
                f"data.x_range must be [low, high] with low < high, got {self.x_range}"
            )

    @property
    def variable_context(self) -> bool:
        """Whether tasks of a batch have different numbers of context points."""
        return self.min_shots != self.shots


def kernel_matrix(x1: Tensor, x2: Tensor, info: dict[str, Tensor]) -> Tensor:
    """k(x1, x2) for each task: x1 (T, A, 1), x2 (T, B, 1) -> (T, A, B), from each task's
    `kind` (an index into MIXED), `length`, `period` and `scale` in `info` (each (T,))."""
    d = (x1 - x2.transpose(1, 2)).abs()  # (T, A, B)
    length = info["length"][:, None, None]
    scale = info["scale"][:, None, None]
    rbf = torch.exp(-0.5 * (d / length) ** 2)
    periodic = torch.exp(
        -2 * torch.sin(math.pi * d / info["period"][:, None, None]) ** 2 / length**2
    )
    r = math.sqrt(3) * d / length
    matern = (1 + r) * torch.exp(-r)
    kind = info["kind"][:, None, None]
    k = torch.where(kind == MIXED.index("periodic"), periodic, rbf)
    k = torch.where(kind >= MIXED.index("matern"), matern, k)
    return scale * k


def oracle_predictive(
    support: Split, query_x: Tensor, info: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """The exact GP posterior predictive of each task's targets given its context, under the
    kernel that drew it: mean and variance (T, Q) per target point (noise included). Padded
    context points (beyond info["context"]) take no part. In float64."""
    xc, yc, xt = (t.double() for t in (support.x, support.y, query_x))
    info = {k: v.double() if v.is_floating_point() else v for k, v in info.items()}
    noise = info["noise"]  # (T,) white-kernel term included
    real = torch.arange(xc.shape[1], device=xc.device)[None] < info["context"][:, None]  # (T, C)
    pair = real[:, :, None] & real[:, None, :]
    eye = torch.eye(xc.shape[1], dtype=xc.dtype, device=xc.device)
    kcc = torch.where(pair, kernel_matrix(xc, xc, info), 0.0)
    kcc = kcc + eye * torch.where(real, noise[:, None], 1.0)[:, :, None]  # padding: identity
    ktc = torch.where(real[:, None, :], kernel_matrix(xt, xc, info), 0.0)  # (T, Q, C)
    chol = torch.linalg.cholesky(kcc)
    alpha = torch.cholesky_solve(torch.where(real[..., None], yc, 0.0), chol)  # (T, C, 1)
    mean = (ktc @ alpha)[..., 0]  # (T, Q)
    v = torch.linalg.solve_triangular(chol, ktc.transpose(1, 2), upper=False)  # (T, C, Q)
    prior = info["scale"][:, None] + noise[:, None]  # k(x, x) + noise
    return mean, (prior - (v**2).sum(1)).clamp_min(1e-12)


def oracle_scores(support: Split, query: Split, info: dict[str, Tensor]) -> dict[str, Tensor]:
    """(T,) per task: the exact GP's predictive log-likelihood of the targets averaged over
    target points (marginal per point, as the neural processes predict), and the MSE of its
    predictive mean."""
    mean, var = oracle_predictive(support, query.x, info)
    y = query.y[..., 0].double()
    logp = -0.5 * (math.log(2 * math.pi) + var.log() + (y - mean) ** 2 / var)
    return {"loglik": logp.mean(1).float(), "mse": ((y - mean) ** 2).mean(1).float()}


class GPTasks:
    """Draws GP functions on the device; `info` carries each one's kernel and context count."""

    kind = "regression"
    in_shape = (1,)

    def __init__(self, cfg: GPConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device

    def check(self, split: str, ways: int, shots: int, query: int) -> None:
        """Any number of functions fits; sampler=npf draws contexts from the targets."""
        if self.cfg.sampler == "npf" and shots > query:
            raise DataError(
                f"sampler=npf draws each context from the function's {query} target points: "
                f"{shots} context points do not fit; lower data.shots or raise the query"
            )

    def _hyperparameters(self, generator: torch.Generator, tasks: int) -> dict[str, Tensor]:
        def uniform(low: float, high: float) -> Tensor:
            return low + (high - low) * torch.rand(tasks, generator=generator, dtype=torch.float64)

        cfg, ones = self.cfg, torch.ones(tasks, dtype=torch.float64)
        if cfg.sampler == "tnp":
            return {
                "kind": torch.zeros(tasks, dtype=torch.long),  # RBF
                "length": uniform(0.1, 0.6),
                "period": ones,
                "scale": uniform(0.1, 1.0),
                "noise": ones * (TNP_NOISE_STD**2 + cfg.noise),
            }
        if cfg.kernel == "mix":
            kind = torch.randint(len(MIXED), (tasks,), generator=generator)
        else:
            kind = torch.full((tasks,), MIXED.index(cfg.kernel))
        length = torch.tensor([0.2, 0.5, 0.2, 0.2], dtype=torch.float64)[kind]
        variable = uniform(0.01, 0.3)
        length = torch.where(kind == MIXED.index("variable_matern"), variable, length)
        white = torch.where(kind == MIXED.index("matern"), MATERN_WHITE, 0.0)
        return {
            "kind": kind,
            "length": length,
            "period": ones * 0.5,
            "scale": ones,
            "noise": white + cfg.noise,
        }

    def _draw(self, generator: torch.Generator, tasks: int, shots: int, query: int) -> TaskBatch:
        """`tasks` functions with up to `shots` context and `query` target points, drawn on the
        CPU in float64 (the Cholesky), then moved."""
        cfg = self.cfg
        info = self._hyperparameters(generator, tasks)
        low, high = cfg.x_range
        fewest = min(cfg.min_shots, shots)
        context = torch.randint(fewest, shots + 1, (tasks,), generator=generator)
        if cfg.sampler == "npf":  # context: a random subset of the function's sorted points
            points = query
            x = low + (high - low) * torch.rand(tasks, points, 1, generator=generator)
            x = x.double().sort(1).values
        else:  # separate context and target inputs
            points = shots + query
            x = low + (high - low) * torch.rand(tasks, points, 1, generator=generator)
            x = x.double()
        cov = kernel_matrix(x, x, info)
        cov = cov + torch.eye(points, dtype=cov.dtype) * info["noise"][:, None, None]
        eps = torch.randn(tasks, points, 1, generator=generator, dtype=torch.float64)
        y = torch.linalg.cholesky(cov) @ eps
        if cfg.sampler == "npf":
            order = torch.rand(tasks, points, generator=generator).argsort(1)[:, :shots]
            xc = x.gather(1, order[..., None])
            yc = y.gather(1, order[..., None])
            xt, yt = x, y
        else:
            xc, yc, xt, yt = x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]
        real = (torch.arange(shots)[None] < context[:, None])[..., None]
        xc, yc = torch.where(real, xc, 0.0), torch.where(real, yc, 0.0)
        move = lambda t: t.float().to(self.device)  # noqa: E731
        info = {k: v.to(self.device) for k, v in info.items()} | {
            "context": context.to(self.device)
        }
        return TaskBatch(Split(move(xc), move(yc)), Split(move(xt), move(yt)), 1, info)

    def sample(
        self, split: str, generator: torch.Generator, tasks: int, ways: int, shots: int, query: int
    ) -> TaskBatch:
        """T fresh functions; every split draws from the same family."""
        return self._draw(_cpu(generator), tasks, shots, query)

    def episodes(
        self, split: str, n: int, ways: int, shots: int, query: int, *, seed: int, batch_size: int
    ) -> Iterator[TaskBatch]:
        """n fixed functions: the same for a given seed whatever the batch size."""
        generator = torch.Generator().manual_seed(seed)
        sizes = [min(CHUNK, n - s) for s in range(0, n, CHUNK)]
        chunks = [self._draw(generator, size, shots, query) for size in sizes]
        batch = concat(chunks)
        for start in range(0, n, batch_size):
            yield batch[start : min(start + batch_size, n)]

    def oracle(self, batch: TaskBatch) -> dict[str, Tensor]:
        """(T,) per task: the exact GP's per-point predictive log-likelihood and its MSE."""
        return oracle_scores(batch.support, batch.query, batch.info)


def _cpu(generator: torch.Generator) -> torch.Generator:
    """The sampler draws on the CPU (float64 Cholesky); a device generator seeds a CPU one."""
    if generator.device.type == "cpu":
        return generator
    seed = torch.randint(2**62, (1,), generator=generator, device=generator.device).item()
    return torch.Generator().manual_seed(seed)


def concat(batches: list[TaskBatch]) -> TaskBatch:
    """One TaskBatch of the tasks of several."""
    first = batches[0]
    return TaskBatch(
        Split(torch.cat([b.support.x for b in batches]), torch.cat([b.support.y for b in batches])),
        Split(torch.cat([b.query.x for b in batches]), torch.cat([b.query.y for b in batches])),
        first.ways,
        {k: torch.cat([b.info[k] for b in batches]) for k in first.info},
    )
