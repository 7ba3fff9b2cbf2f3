"""Gradient-based meta-learners over M particles (sets of weights): ensemble MAML (`emaml`) and
the shared machinery of BMAML (bmaml.py).

Each particle has its own meta-learned initialisation, drawn independently at the start (the
model's own initialiser, M times). A task adapts every particle; the prediction is the
ensemble's: the mean of the particles' outputs for regression, the mean of their class
probabilities for classification (as log-probabilities, which every loss and the calibration
report read as logits). EMAML (Yoon et al. 2018's baseline) adapts the particles independently
with MAML's inner loop and meta-trains the mean of their query losses: with M = 1 it is MAML.

For regression, evaluation also reports the predictive NLL and the 90% interval's coverage of
a Gaussian whose variance is the particles' spread at each query point plus the observation
noise, estimated per task as the ensemble's mean squared residual on its support set after
adaptation (a plug-in estimate: MAML, one particle, has only that term).

Shape letters: M particles, B examples.
"""

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.algos.bilevel.base import Bilevel, BilevelConfig
from metalearn.algos.bilevel.inner import Params, adapt
from metalearn.algos.objectives import score
from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError

Z90 = 1.6448536269514722  # the standard normal's 95% quantile: a central 90% interval


@dataclass
class ParticlesConfig(BilevelConfig):
    """MAML's settings and the number of particles."""

    name: str = "emaml"
    particles: int = 5  # M: sets of weights, each with its own initialisation
    leader_steps: int = 1  # bmaml: SVGD steps of the leader on support and query (chaser loss)
    # bmaml: log p(theta | D) as -L (the mean loss, 'mean': one particle steps as MAML) or as
    # -N L (the loss summed over the N examples, 'sum', with the step inner_lr / N, so that one
    # particle still steps as MAML and the kernel's repulsion weighs 1/N against the data), or
    # the authors' Bayesian network for regression ('gaussian', their bnn.py): a Gaussian
    # likelihood with a learned noise precision gamma, weights ~ N(0, 1/lambda), Gamma priors
    # on gamma and lambda; both precisions are part of each particle, stepped by inner_lr
    log_posterior: str = "mean"
    noise_prior: list[float] = field(default_factory=lambda: [2.0, 0.2])  # gamma ~ Gamma(a, b)
    weight_prior: list[float] = field(default_factory=lambda: [2.0, 2.0])  # lambda ~ Gamma(a, b)
    noise_precision: float = 100.0  # gamma's initial value (the authors' 1 / m_g)
    weight_precision: float = 1.0  # lambda's initial value (the authors' 1 / m_l)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.particles < 1:
            raise ConfigError(f"algo.particles must be at least 1, got {self.particles}")
        if self.log_posterior not in ("mean", "sum", "gaussian"):
            raise ConfigError(
                f"algo.log_posterior must be 'mean', 'sum' or 'gaussian', got "
                f"{self.log_posterior!r}"
            )
        if self.log_posterior != "mean" and self.name != "bmaml":
            raise ConfigError(
                f"algo.log_posterior is BMAML's; algo={self.name} adapts each particle on the "
                f"loss (drop algo.log_posterior={self.log_posterior})"
            )
        for key in ("noise_prior", "weight_prior"):
            value = getattr(self, key)
            if len(value) != 2 or not all(v > 0 for v in value):
                raise ConfigError(f"algo.{key} must be [a, b] with a, b > 0, got {value}")
        if not (self.noise_precision > 0 and self.weight_precision > 0):
            raise ConfigError(
                f"algo.noise_precision and algo.weight_precision must be positive, got "
                f"{self.noise_precision} and {self.weight_precision}"
            )
        if self.leader_steps < 1:
            raise ConfigError(f"algo.leader_steps must be at least 1, got {self.leader_steps}")
        if self.bn_mode != "transductive":
            raise ConfigError(
                f"algo={self.name} keeps no running BatchNorm statistics per particle; use "
                f"algo.bn_mode=transductive"
            )


def stack_initialisations(model: nn.Module, particles: int) -> dict[str, nn.Parameter]:
    """M independent draws of the model's initial weights, stacked: name -> (M, *shape)."""
    draws = []
    for m in range(particles):
        if m:  # the first particle is the model as built
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        draws.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return {k: nn.Parameter(torch.stack([d[k] for d in draws])) for k in draws[0]}


def gaussian_nll(mean: Tensor, std: Tensor, y: Tensor) -> Tensor:
    """The mean of -log N(y; mean, std^2), without torch.distributions' argument checks: a task
    whose adaptation diverged gives nan in its row of the table instead of stopping the test."""
    z = (y - mean) / std
    return (0.5 * z.square() + std.log() + 0.5 * math.log(2 * math.pi)).mean()


def mean_squared_error(prediction: Tensor, target: Tensor) -> Tensor:
    return (prediction - target).square().mean()


class EnsembleMAML(Bilevel):
    """EMAML: M MAMLs adapted independently, trained on the mean of their query losses."""

    predictive = True  # on regression
    vmaps_within_tasks = True  # over the particles

    def __init__(self, cfg: ParticlesConfig, model: nn.Module, kind: str, task_batching: str):
        super().__init__(cfg, model, kind, task_batching)
        self.particles = stack_initialisations(model, cfg.particles)
        if kind == "regression":  # F.mse_loss's batching rule breaks under nested vmap (torch
            self.loss = mean_squared_error  # 2.14: tasks, then particles); the same value

    # -- weights ------------------------------------------------------------------------------
    def meta_parameters(self) -> dict[str, nn.Parameter]:
        return {f"particles.{k}": v for k, v in self.particles.items()}

    def parameters(self) -> list[nn.Parameter]:
        return list(self.particles.values())

    def params(self) -> tuple[Params, Params]:
        _, buffers = super().params()
        return dict(self.particles), buffers

    def memory_advice(self) -> tuple[str, list[str], list[str]]:
        what, before, after = super().memory_advice()
        what = f"{what or self.cfg.name} with algo.particles={self.cfg.particles} sets of weights"
        return (
            what,
            [f"fewer particles (algo.particles={max(1, self.cfg.particles // 2)})", *before],
            after,
        )

    # -- adaptation and prediction ------------------------------------------------------------
    def step(self, params: Params, buffers: Params, support: Split, lr: Any, first_order: bool):
        """One inner step of every particle: here MAML's SGD step, particle by particle."""
        options = {"steps": 1, "lr": lr, "first_order": first_order, "loss": self.loss}
        one = lambda p: adapt(self.model, p, buffers, support, **options)  # noqa: E731
        return torch.vmap(one)(params)

    def trajectory(self, params, buffers, support, training: bool, steps=None):
        options = self.inner_options(training)
        steps = options["steps"] if steps is None else steps
        yield params
        for _ in range(steps):
            params = self.step(params, buffers, support, options["lr"], options["first_order"])
            yield params

    def outputs(self, params: Params, buffers: Params, x: Tensor) -> Tensor:
        """Every particle's outputs (M, B, out)."""
        forward = lambda p: functional_call(self.model, (p, buffers), (x,))  # noqa: E731
        return torch.vmap(forward)(params)

    def ensemble(self, outputs: Tensor) -> Tensor:
        """(M, B, out) -> the ensemble's prediction (B, out): mean value, or the log of the mean
        class probability."""
        if self.kind == "classification":
            return outputs.log_softmax(-1).logsumexp(0) - math.log(outputs.shape[0])
        return outputs.mean(0)

    def query_forward(self, params: Params, buffers: Params, x: Tensor, step: int) -> Tensor:
        return self.ensemble(self.outputs(params, buffers, x))

    def task_loss(self, params, buffers, sx, sy, qx, qy) -> tuple[Tensor, Tensor]:
        """The mean of the particles' own query losses (independent MAMLs), and the ensemble's
        score."""
        *_, fast = self.trajectory(params, buffers, Split(sx, sy), training=True)
        outputs = self.outputs(fast, buffers, qx)
        losses = torch.stack([self.loss(out, qy) for out in outputs.unbind(0)])
        return losses.mean(), score(self.kind, self.ensemble(outputs), qy)

    # -- predictive distribution (regression) -------------------------------------------------
    def gaussian(self, fast: Params, buffers: Params, support: Split, x: Tensor):
        """Mean and std (Q,) at x of adapted particles `fast`: the particles' spread plus the
        ensemble's mean squared residual on the support set."""
        on_support = self.outputs(fast, buffers, support.x).mean(0)[:, 0]
        noise = ((on_support - support.y[:, 0]) ** 2).mean().clamp_min(1e-6)
        outputs = self.outputs(fast, buffers, x)[..., 0]  # (M, Q)
        return outputs.mean(0), (outputs.var(0, unbiased=False) + noise).sqrt()

    def predict_distribution(self, support: Split, query_x: Tensor, steps: int | None = None):
        """Mean and std (Q,) of one task's Gaussian predictive after adaptation."""
        params, buffers = self.params()
        params = {k: v.detach() for k, v in params.items()}
        steps = self.cfg.test_inner_steps if steps is None else steps
        with self._test_time():
            *_, fast = self.trajectory(params, buffers, support, training=False, steps=steps)
            with torch.no_grad():
                return self.gaussian(fast, buffers, support, query_x)

    def evaluate(self, batch: TaskBatch, steps: list[int]) -> dict[str, Tensor]:
        """Classification: the family's evaluation. Regression: per task (one adaptation to the
        largest step count), the ensemble mean's MSE ("loss", "score"), the predictive NLL
        and the 90% interval's coverage after each number of steps, (T, len(steps))."""
        if self.kind != "regression":
            return super().evaluate(batch, steps)
        wanted = sorted(set(steps))

        def task(params, buffers, sx, sy, qx, qy) -> Tensor:
            support, y = Split(sx, sy), qy[:, 0]
            scored = {}
            for step, fast in enumerate(
                self.trajectory(params, buffers, support, False, wanted[-1])
            ):
                if step in wanted:
                    mean, std = self.gaussian(fast, buffers, support, qx)
                    mse = ((mean - y) ** 2).mean()
                    nll = gaussian_nll(mean, std, y)  # nan where a task diverged
                    inside = ((y - mean).abs() <= Z90 * std).float().mean()
                    scored[step] = torch.stack([mse, mse, nll, inside])
            return torch.stack([scored[s] for s in steps], 1)  # (4, len(steps))

        params, buffers = self.params()
        params = {k: v.detach() for k, v in params.items()}
        data = (batch.support.x, batch.support.y, batch.query.x, batch.query.y)
        with torch.no_grad(), self._test_time():
            table = self.map_tasks(task, data, params, buffers, self.test_batching)  # (T, 4, S)
        names = ("loss", "score", "nll", "coverage90")
        return {name: table[:, i] for i, name in enumerate(names)}
