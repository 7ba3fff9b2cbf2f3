"""MAML (Finn et al. 2017) and its first-order approximation FOMAML (`algo.first_order=true`).

The inner loop is `adapt()`; the outer objective is the mean query loss after adaptation,
differentiated through the inner loop (second order) or not (first order). Both live in
`Bilevel`, which every other member of the family specialises.
"""

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from metalearn.algos.bilevel.base import Bilevel, BilevelConfig
from metalearn.data.tasks import TaskBatch
from metalearn.errors import ConfigError


@dataclass
class MAMLConfig(BilevelConfig):
    """MAML's settings are the family's common ones (see BilevelConfig)."""

    name: str = "maml"
    test_inner_steps: int | None = 3  # Finn et al. 2017 test with 3 steps (None: inner_steps)
    # hypergradient descent of the inner rate within each task's inner loop (Baydin et al. 2018,
    # SGD-HD): alpha_k = alpha_{k-1} + beta * g_k . g_{k-1}, from inner_lr, at every step after
    # the first; the rate may turn negative, as the paper observes, and is not clipped
    inner_lr_hypergradient: bool = False
    inner_hypergrad_lr: float = 0.001  # beta
    # configs/algo/<name>.yaml for the other names this class serves: what they change
    VARIANTS: ClassVar[dict[str, dict[str, Any]]] = {"fomaml": {"first_order": True}}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.inner_hypergrad_lr < math.inf:
            raise ConfigError(
                f"algo.inner_hypergrad_lr must be >= 0 and finite, got {self.inner_hypergrad_lr}"
            )
        if self.name == "fomaml" and not self.first_order:  # fomaml.yaml is this class too
            raise ConfigError(
                "algo=fomaml is first-order by definition; use algo=maml for second order"
            )


class MAML(Bilevel):
    """Meta-learns an initialisation; tasks of a meta-batch run under `vmap` or a Python loop.

    With `algo.inner_lr_hypergradient` the training log records the inner rate that each task's
    last inner step used, averaged over the meta-batch (`train/inner_lr`), and its smallest
    (`train/inner_lr_min`): a rate that turns negative shows there, unclipped.
    """

    _trace: dict[str, list[Tensor]] | None = None  # the running task's inner rates

    def inner_options(self, training: bool) -> dict[str, Any]:
        options = super().inner_options(training)
        if self.cfg.inner_lr_hypergradient:
            options["hypergradient"] = self.cfg.inner_hypergrad_lr
            if self._trace is not None:
                options["trace"] = self._trace
        return options

    def _traced_task_loss(self, params, buffers, sx, sy, qx, qy) -> tuple[Tensor, ...]:
        self._trace = {}
        try:
            loss, task_score = self.task_loss(params, buffers, sx, sy, qx, qy)
            rates = self._trace.get("lr") or [torch.as_tensor(float(self.cfg.inner_lr))]
        finally:
            self._trace = None
        return loss, task_score, rates[-1].to(loss.dtype)

    def objective(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if not self.cfg.inner_lr_hypergradient:
            return super().objective(batch)
        losses, scores, rates = self.over_tasks(self._traced_task_loss, batch, *self.params())
        metrics, rates = {"loss": losses.mean(), "score": scores.mean()}, rates.detach()
        return losses.mean(), metrics | {"inner_lr": rates.mean(), "inner_lr_min": rates.min()}
