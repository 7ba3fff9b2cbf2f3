"""Amortised variational MAML (VAMPIRE, Nguyen et al. 2020; the family of ABML, Ravi & Beatson
2019): a diagonal Gaussian over the weights, adapted per task by the inner loop, trained on a
variational objective. Transcribed from the authors' code (cnguyen10/few_shot_meta_learning,
Vampire2.py and HyperNetClasses.NormalVariationalNet):

- meta-parameters: the mean of every weight (the model's own parameters) and its log standard
  deviation, initialised U[-4, -3];
- inner loop: `algo.inner_steps` SGD steps on the mean and log-std together, on
  E_q[L(w; support)] + kl_weight * KL(q || N(0, I)), the expectation over `algo.samples`
  reparameterised draws w = mean + exp(log_std) * eps;
- outer objective: E_q[L(w; query)] + kl_weight * KL(q || N(0, I)) with the adapted q;
- prediction: the mean over `algo.test_samples` draws of the class probabilities (regression:
  of the values; the predictive NLL adds the draws' spread to the support residual, as EMAML).

Draws differ per task, so tasks run one after another (hardware.task_batching does not apply).
The meta-gradient equals a seeded transcription of the authors' code to 1e-10
(tests/reference/vampire2.py, in tests/test_bayesian_maml.py).
"""

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.algos.bilevel.base import Bilevel, BilevelConfig
from metalearn.algos.bilevel.inner import Params
from metalearn.algos.bilevel.particles import EnsembleMAML, mean_squared_error
from metalearn.algos.objectives import score
from metalearn.data.tasks import Split
from metalearn.errors import ConfigError

LOGSTD = "logstd."  # the prefix of the log-std entries in a parameter dict


@dataclass
class VariationalConfig(BilevelConfig):
    """MAML's settings, the draws of weights and the KL's weight."""

    name: str = "vmaml"
    samples: int = 2  # draws of the weights per task in meta-training (inner and outer)
    test_samples: int = 10  # draws per task at validation and test
    kl_weight: float = 1e-6  # the authors' default (main.py --KL-weight)
    init_logstd: list[float] = field(default_factory=lambda: [-4.0, -3.0])  # U[low, high]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.samples < 1 or self.test_samples < 1:
            raise ConfigError(
                f"algo.samples and algo.test_samples must be positive, got {self.samples} and "
                f"{self.test_samples}"
            )
        if not self.kl_weight >= 0:
            raise ConfigError(f"algo.kl_weight must be >= 0, got {self.kl_weight}")
        if len(self.init_logstd) != 2:
            raise ConfigError(f"algo.init_logstd must be [low, high], got {self.init_logstd}")
        low, high = self.init_logstd
        if not low <= high:
            raise ConfigError(f"algo.init_logstd must be [low, high], got {self.init_logstd}")
        if self.bn_mode != "transductive":
            raise ConfigError(
                "algo=vmaml keeps no running BatchNorm statistics: bn_mode=transductive"
            )


def kl_to_standard_normal(params: Params) -> Tensor:
    """KL(N(mean, exp(log_std)^2) || N(0, I)) summed over every weight."""
    total = 0.0
    for name, mean in params.items():
        if name.startswith(LOGSTD):
            continue
        log_std = params[LOGSTD + name]
        total = total + 0.5 * (mean**2 + torch.exp(2 * log_std) - 1 - 2 * log_std).sum()
    return total


class VariationalMAML(EnsembleMAML):
    """A Gaussian over weights: the inner loop adapts its mean and log-std; draws predict."""

    batches_tasks = False  # a draw per task: a loop over tasks

    def __init__(self, cfg: VariationalConfig, model: nn.Module, kind: str, task_batching: str):
        Bilevel.__init__(self, cfg, model, kind, "loop")
        low, high = cfg.init_logstd
        self.log_std = {
            name: nn.Parameter(low + (high - low) * torch.rand_like(p))
            for name, p in model.named_parameters()
        }
        if kind == "regression":
            self.loss = mean_squared_error

    def meta_parameters(self) -> dict[str, nn.Parameter]:
        return {LOGSTD + k: v for k, v in self.log_std.items()}

    def parameters(self) -> list[nn.Parameter]:
        return [*self.model.parameters(), *self.log_std.values()]

    def params(self) -> tuple[Params, Params]:
        params, buffers = Bilevel.params(self)
        return params | self.meta_parameters(), buffers

    def memory_advice(self) -> tuple[str, list[str], list[str]]:
        what, before, after = Bilevel.memory_advice(self)
        fewer = f"fewer draws (algo.samples={max(1, self.cfg.samples // 2)})"
        return what or "vmaml", [fewer, *before], after

    def draws(self) -> int:
        return self.cfg.test_samples if self.testing else self.cfg.samples

    def sample(self, params: Params, count: int) -> Params:
        """`count` draws of the weights (count, *shape) by the reparameterisation; draw by draw,
        one eps per weight tensor in the network's order, as the authors' NormalVariationalNet
        (so a seeded transcription of their code sees the same draws)."""
        names = [k for k in params if not k.startswith(LOGSTD)]
        draws = [
            {
                k: params[k] + torch.randn_like(params[k]) * torch.exp(params[LOGSTD + k])
                for k in names
            }
            for _ in range(count)
        ]
        return {k: torch.stack([d[k] for d in draws]) for k in names}

    def outputs(self, params: Params, buffers: Params, x: Tensor) -> Tensor:
        forward = lambda w: functional_call(self.model, (w, buffers), (x,))  # noqa: E731
        return torch.vmap(forward)(self.sample(params, self.draws()))

    def step(self, params: Params, buffers: Params, support: Split, lr, first_order: bool):
        """One SGD step of the mean and log-std on the support's variational objective."""

        def objective(q: Params) -> Tensor:
            outputs = self.outputs(q, buffers, support.x)
            data = torch.stack([self.loss(out, support.y) for out in outputs.unbind(0)]).mean()
            return data + self.cfg.kl_weight * kl_to_standard_normal(q)

        grads = torch.func.grad(objective)(params)
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        return {k: v - lr * grads[k] for k, v in params.items()}

    def task_loss(self, params, buffers, sx, sy, qx, qy) -> tuple[Tensor, Tensor]:
        """The mean query loss over draws from the adapted q, plus the weighted KL."""
        *_, fast = self.trajectory(params, buffers, Split(sx, sy), training=True)
        outputs = self.outputs(fast, buffers, qx)
        data = torch.stack([self.loss(out, qy) for out in outputs.unbind(0)]).mean()
        loss = data + self.cfg.kl_weight * kl_to_standard_normal(fast)
        return loss, score(self.kind, self.ensemble(outputs).detach(), qy)
