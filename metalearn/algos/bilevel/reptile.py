"""Reptile (Nichol et al. 2018): train on each task for k steps, then move the initialisation
towards the adapted weights: theta <- theta + epsilon * mean_i(phi_i - theta).

The update is handed to the outer optimiser as the gradient (theta - mean_i phi_i): plain SGD
with step size epsilon = `outer_lr` is then exactly the update above (Algorithm 2, batched;
`trainer.meta_batch_size=1` is Algorithm 1, serial), and the default linear schedule anneals
epsilon to 0 as in the paper. No gradient flows through the inner loop.
"""

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from metalearn.algos.bilevel.base import Bilevel, BilevelConfig
from metalearn.algos.objectives import score
from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError


@dataclass
class ReptileConfig(BilevelConfig):
    """Inner optimiser and step counts (train and test), and the outer step size epsilon."""

    name: str = "reptile"
    inner_lr: float = 1e-3  # inner Adam (or SGD) step size
    inner_steps: int = 5  # k: inner steps per task in meta-training
    test_inner_steps: int | None = 50  # inner steps at validation/test
    inner_optimizer: str = "adam"  # 'adam' (the paper's, beta1 = 0) or 'sgd'
    adam_betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    outer_lr: float = 1.0  # epsilon: the outer step size (annealed linearly to 0 by default)
    outer_optimizer: str = "sgd"  # 'sgd': exactly the update above; 'adam' also works
    first_order: bool = True  # Reptile never differentiates through its inner loop

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inner_optimizer not in ("adam", "sgd"):
            raise ConfigError(
                f"algo.inner_optimizer must be adam or sgd, got {self.inner_optimizer!r}"
            )
        if self.outer_optimizer not in ("adam", "sgd"):
            raise ConfigError(
                f"algo.outer_optimizer must be adam or sgd, got {self.outer_optimizer!r}"
            )
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(
                f"algo.adam_betas must be two numbers in [0, 1), got {self.adam_betas}"
            )
        if not self.first_order:
            raise ConfigError("algo=reptile is first-order by definition; use algo=maml instead")


class Reptile(Bilevel):
    """Inner training on all of a task's examples, outer step towards the adapted weights."""

    differentiates_inner_loop = False  # first order: the fused BatchNorm kernel is exact
    outer_schedule = "linear"

    def inner_options(self, training: bool) -> dict[str, Any]:
        options = super().inner_options(training)
        if self.cfg.inner_optimizer == "adam":
            options["adam"] = tuple(self.cfg.adam_betas)
        return options

    def task_loss(self, params, buffers, sx, sy, qx, qy) -> tuple[Any, Tensor, Tensor]:
        """Adapted weights after k steps on the task's support and query examples together
        (Reptile has no train/test split inside a task), and the loss and score they reach."""
        x, y = torch.cat([sx, qx]), torch.cat([sy, qy])
        *_, fast = self.trajectory(params, buffers, Split(x, y), training=True)
        prediction = self.query_forward(fast, buffers, qx, self.cfg.inner_steps)
        return fast, self.loss(prediction, qy), score(self.kind, prediction, qy)

    def objective(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """0.5 * ||theta - stopgrad(mean phi)||^2, whose gradient is theta - mean phi."""
        params, buffers = self.params()
        with torch.no_grad():
            fast, losses, scores = self.over_tasks(
                self.task_loss, batch, {k: v.detach() for k, v in params.items()}, buffers
            )
        surrogate = sum(0.5 * (params[k] - fast[k].mean(0)).square().sum() for k in params)
        return surrogate, {"loss": losses.mean(), "score": scores.mean()}
