"""Optimizee families for learned optimisers: each task is a problem to minimise (a starting
point and a loss), and a batch holds T problems whose parameters carry a leading T dimension.

- `quadratic`: Andrychowicz et al. (2016)'s f(x) = mean over a batch of B quadratics of
  ||W x - y||^2 in d dimensions, W and y ~ U[0, 1), x ~ N(0, 0.01^2) (deepmind/learning-to-learn,
  problems.py `quadratic`); learned_optimization's (tasks/quadratics.py) `fixed_dim`,
  f(x) = sum_i (c_i - x_i)^2 with c, x0 ~ N(0, I), and `noisy`, f(x) = sum_i (s_i (c_i - x_i))^2
  with s ~ U[0, 25) and N(0, noise_std^2) noise added to every gradient coordinate (not to the
  reported loss).
- `digits_mlp`: the paper's MNIST problem (problems.py `mnist`: one hidden layer of 20 sigmoid
  units, weights and biases ~ N(0, 0.01^2), minibatches of 128 drawn with replacement, mean
  cross-entropy) on scikit-learn's bundled 8x8 digits (1797 images, no download);
  `activation=relu` is the paper's generalisation test.

A problem's loss at step s sees the minibatch (or gradient noise) of step s: the same for a
given batch and step however the unroll is cut into truncations, so that truncated and full
backpropagation see one trajectory. Validation and test problems come from fixed seeds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from metalearn.errors import ConfigError, DataError

FAMILIES = ("andrychowicz", "fixed_dim", "noisy")


@dataclass
class OptimizeeConfig:
    """What every optimizee family has: the unroll length and the split seeds' offsets."""

    task_kind: ClassVar[str] = "optimization"
    steps: int = 100  # optimiser steps in one unroll (a problem's horizon in meta-training)
    root: str | None = None  # unused: no files (digits ship in scikit-learn's wheel)
    split: str | None = None  # unused: problems are drawn fresh; val and test from fixed seeds

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"data.steps (the unroll length) must be >= 1, got {self.steps}")

    def describe(self) -> dict[str, int]:
        """The run name's task part, e.g. 100steps."""
        return {"steps": self.steps}


@dataclass
class QuadraticConfig(OptimizeeConfig):
    """Quadratic problems; `family` picks the paper's or one of learned_optimization's."""

    name: str = "quadratic"
    family: str = "andrychowicz"  # one of FAMILIES
    dims: int = 10  # d
    batch: int = 128  # andrychowicz: independent quadratics averaged into one loss
    init_std: float = 0.01  # andrychowicz: x0 ~ N(0, init_std^2)
    noise_std: float = 1.0  # noisy: the gradient noise's standard deviation

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.family not in FAMILIES:
            raise ConfigError(
                f"data.family must be one of {', '.join(FAMILIES)}, got {self.family!r}"
            )
        for key in ("dims", "batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        if not (self.init_std >= 0 and self.noise_std >= 0):
            raise ConfigError("data.init_std and data.noise_std must be >= 0")


@dataclass
class DigitsMLPConfig(OptimizeeConfig):
    """An MLP on scikit-learn's digits, trained from a fresh random initialisation."""

    name: str = "digits_mlp"
    hidden: int = 20  # units per hidden layer (the paper's MNIST net: one layer of 20)
    layers: int = 1  # hidden layers
    activation: str = "sigmoid"  # the paper's; relu: its generalisation test
    batch: int = 128  # minibatch
    # 'paper': weights and biases ~ N(0, 0.01^2) (problems.py); 'fan_in': U(-1/sqrt(fan_in),
    # 1/sqrt(fan_in)), torch.nn.Linear's default, which starts off the paper's plateau
    init: str = "paper"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.activation not in ("sigmoid", "relu"):
            raise ConfigError(f"data.activation must be sigmoid or relu, got {self.activation!r}")
        if self.init not in ("paper", "fan_in"):
            raise ConfigError(f"data.init must be paper or fan_in, got {self.init!r}")
        for key in ("hidden", "layers", "batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1, got {getattr(self, key)}")


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The randomness of one step of one batch of problems (minibatch, gradient noise)."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


@dataclass
class Problems:
    """T problems of one family: where each starts, and its loss at any step."""

    start: dict[str, Tensor]  # name -> (T, ...): the optimizee's initial parameters
    tensors: dict[str, Tensor]  # the family's fixed data per problem (W, y, centres, ...)
    family: Any  # the task source: QuadraticTasks or DigitsTasks
    seed: int  # per-step randomness (minibatches, noise) derives from it
    first: int = 0  # this batch's first problem in the batch it was cut from (see `draw_step`)
    unit = "problems"

    @property
    def tasks(self) -> int:
        return next(iter(self.start.values())).shape[0]

    def loss(self, params: dict[str, Tensor], step: int) -> Tensor:
        """(T,) losses of `params` (each (T, ...)) at unroll step `step`."""
        return self.family.loss(self, params, step)

    def __getitem__(self, part: slice) -> Problems:
        start = {k: v[part] for k, v in self.start.items()}
        tensors = {k: v[part] for k, v in self.tensors.items()}
        first = self.first + range(self.tasks)[part].start
        return Problems(start, tensors, self.family, self.seed, first)

    def draw_step(self, step: int, draw) -> Tensor:
        """Step `step`'s random draw for these problems: `draw(rows, generator)` makes one row
        per problem of the whole batch, of which these problems take theirs, so that a problem's
        minibatches and noise do not depend on how its batch was cut (evaluation batches, ranks)."""
        device = next(iter(self.start.values())).device
        rows = draw(self.first + self.tasks, _step_generator(self.seed, step, device))
        return rows[self.first :]


class _Family:
    """Sampling and fixed episodes shared by the families."""

    kind = "optimization"
    in_shape = (1,)  # one coordinate at a time: learned optimisers are coordinatewise

    def __init__(self, cfg, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device

    def check(self, split: str, *_shape) -> None:
        """Any number of problems fits: the families are infinite."""

    def sample(self, split: str, generator: torch.Generator, tasks: int, *_shape) -> Problems:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        gen = torch.Generator(self.device).manual_seed(seed)
        start, tensors = self.draw(gen, tasks)
        return Problems(start, tensors, self, seed)

    def episodes(
        self, split: str, n: int, *_shape, seed: int, batch_size: int
    ) -> Iterator[Problems]:
        """n fixed problems: the same for a given seed whatever the batch size."""
        problems = self.sample(split, torch.Generator().manual_seed(seed), n)
        for first in range(0, n, batch_size):
            yield problems[first : first + batch_size]

    def uniform(self, gen: torch.Generator, *shape: int) -> Tensor:
        return torch.rand(shape, generator=gen, device=self.device)

    def normal(self, gen: torch.Generator, *shape: int) -> Tensor:
        return torch.randn(shape, generator=gen, device=self.device)


class QuadraticTasks(_Family):
    """The quadratic families (see the module docstring and QuadraticConfig)."""

    def draw(self, gen: torch.Generator, tasks: int) -> tuple[dict, dict]:
        cfg, d = self.cfg, self.cfg.dims
        if cfg.family == "andrychowicz":
            b = cfg.batch
            w, y = self.uniform(gen, tasks, b, d, d), self.uniform(gen, tasks, b, d)
            return {"x": cfg.init_std * self.normal(gen, tasks, b, d)}, {"w": w, "y": y}
        centre, scale = self.normal(gen, tasks, d), 25.0 * self.uniform(gen, tasks, d)
        if cfg.family == "fixed_dim":
            scale = torch.ones_like(scale)
        return {"x": self.normal(gen, tasks, d)}, {"centre": centre, "scale": scale}

    def loss(self, problems: Problems, params: dict[str, Tensor], step: int) -> Tensor:
        x, t = params["x"], problems.tensors
        if self.cfg.family == "andrychowicz":  # (T, B, d)
            residual = torch.einsum("tbij,tbj->tbi", t["w"], x) - t["y"]
            return residual.pow(2).sum(-1).mean(-1)
        loss = (t["scale"] * (x - t["centre"])).pow(2).sum(-1)
        if self.cfg.family == "noisy" and self.cfg.noise_std > 0:
            # n - n.detach(): worth zero, its gradient the noise (learned_optimization's trick)
            noise = self.cfg.noise_std * problems.draw_step(
                step, lambda n, gen: torch.randn((n, *x.shape[1:]), generator=gen, device=x.device)
            )
            loss = loss + ((noise * x) - (noise * x).detach()).sum(-1)
        return loss


def load_digits(device: torch.device) -> tuple[Tensor, Tensor]:
    """scikit-learn's digits: (1797, 64) inputs scaled to [0, 1] and (1797,) labels."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:  # a dependency of metalearn, so only a broken install
        raise DataError(
            "data=digits_mlp reads the digits bundled with scikit-learn; pip install scikit-learn"
        ) from error
    digits = sklearn_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32, device=device) / 16.0
    return x, torch.as_tensor(digits.target, dtype=torch.long, device=device)


class DigitsTasks(_Family):
    """MLPs on the digits from fresh initialisations; each step a fresh minibatch."""

    def __init__(self, cfg: DigitsMLPConfig, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.x, self.y = load_digits(device)
        sizes = [self.x.shape[1]] + [cfg.hidden] * cfg.layers + [10]
        self.shapes = list(zip(sizes[:-1], sizes[1:], strict=True))

    def draw(self, gen: torch.Generator, tasks: int) -> tuple[dict, dict]:
        """Weights and biases ~ N(0, 0.01^2), as the paper's MNIST network, or U(+-1/sqrt(fan_in))
        (data.init=fan_in)."""
        start = {}
        for i, (fan_in, fan_out) in enumerate(self.shapes):
            if self.cfg.init == "paper":
                start[f"w{i}"] = 0.01 * self.normal(gen, tasks, fan_in, fan_out)
                start[f"b{i}"] = 0.01 * self.normal(gen, tasks, fan_out)
            else:
                bound = fan_in**-0.5
                start[f"w{i}"] = bound * (2 * self.uniform(gen, tasks, fan_in, fan_out) - 1)
                start[f"b{i}"] = bound * (2 * self.uniform(gen, tasks, fan_out) - 1)
        return start, {}

    def loss(self, problems: Problems, params: dict[str, Tensor], step: int) -> Tensor:
        tasks, size, device = params["w0"].shape[0], self.cfg.batch, self.x.device

        def minibatches(n: int, gen: torch.Generator) -> Tensor:  # with replacement
            return torch.randint(0, len(self.y), (n, size), generator=gen, device=device)

        index = problems.draw_step(step, minibatches)  # (T, B)
        h = self.x[index]  # (T, B, 64)
        act = torch.sigmoid if self.cfg.activation == "sigmoid" else torch.relu
        for i in range(len(self.shapes)):
            h = torch.baddbmm(params[f"b{i}"][:, None], h, params[f"w{i}"])
            if i < len(self.shapes) - 1:
                h = act(h)
        return (
            F.cross_entropy(h.flatten(0, 1), self.y[index].flatten(), reduction="none")
            .view(tasks, -1)
            .mean(-1)
        )


# -- hand-designed optimisers on the same problems (the baselines a learned one must beat) --------

HAND_DESIGNED = ("adam", "rmsprop", "sgd", "nag")
# half-decades from 1e-4 to 1e2 (the quadratic's mean over 128 problems scales its gradient down)
LEARNING_RATES = tuple(round(10 ** (e / 2), 10) for e in range(-8, 5))


def hand_designed(name: str, params: list[Tensor], lr: float) -> torch.optim.Optimizer:
    """Adam, RMSprop, SGD or Nesterov's accelerated gradient (momentum 0.9) at rate `lr`, torch's
    defaults otherwise; elementwise, so problems batched along the first dimension stay apart."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    if name == "nag":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    return torch.optim.SGD(params, lr=lr)


def hand_designed_curve(problems: Problems, name: str, lr: float, steps: int) -> Tensor:
    """Each problem's loss at steps 0 .. steps under a hand-designed optimiser: (T, steps + 1)."""
    params = {k: v.detach().clone().requires_grad_() for k, v in problems.start.items()}
    optimizer = hand_designed(name, list(params.values()), lr)
    curve = []
    for step in range(steps + 1):
        loss = problems.loss(params, step)
        curve.append(loss.detach())
        if step < steps:
            optimizer.zero_grad()
            loss.sum().backward()
            optimizer.step()
    return torch.stack(curve, dim=1)
