"""CAVIA, fast context adaptation via meta-learning (Zintgraf et al. 2019): the inner loop adapts
only a context vector fed into the network; the network's weights are meta-learned by the outer
loop alone.

Each task starts from the context phi = 0 (not meta-learned) and takes SGD steps on it,
phi <- phi - alpha * grad_phi L_support(theta, phi), through the one functional
inner loop (`adapt_steps` with `adapted` = the context); the outer loop differentiates the query
loss at the adapted context with respect to theta, through the inner steps (second order unless
`first_order`). How the context enters the network: models/context.py (input
concatenation for the MLP, FiLM of one conv block).

Followed: lmzintgraf/cavia, regression/cavia.py and cavia_model.py (inner lr 1.0, one step, 5
context parameters, 40-40 MLP, Adam 1e-3, 25 tasks per meta-batch, second order, each meta-
gradient element clamped to [-10, 10]; tested on 100 evenly spaced points: data.test_points) and
classification/main.py, models.py, arguments.py (inner lr 1.0, two steps in training and at test,
100 context parameters FiLM-ing the third conv block, the averaged meta-gradient clamped to
[-10, 10]). Here the clamp acts on the meta-batch's mean meta-gradient, as their classification
code; their regression code clamps each task's before averaging (the same whenever no task's
element passes the bound), and hardware.task_chunk clamps each chunk's share.
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metalearn.algos.bilevel.base import Bilevel, BilevelConfig
from metalearn.algos.bilevel.inner import Params
from metalearn.data.tasks import TaskBatch
from metalearn.errors import ConfigError
from metalearn.models.context import CONTEXT, ContextNet


@dataclass
class CAVIAConfig(BilevelConfig):
    """The context's size and place, and the authors' inner-loop and clamping settings."""

    name: str = "cavia"
    inner_lr: float = 1.0  # alpha on the context (theirs: 1.0, regression and classification)
    inner_steps: int = 1  # theirs: 1 for regression, 2 for classification
    context_params: int = 5  # C: context values adapted per task (theirs: 5 sinusoid, 100 images)
    film_block: int = 3  # conv4: the block (1-4) whose BatchNorm output the context FiLMs
    grad_clip_value: float | None = 10.0  # clamp each meta-gradient element to [-v, v] (None: off)

    REFERENCE: ClassVar[dict[str, Any]] = {
        "source": "lmzintgraf/cavia (regression/cavia.py, cavia_model.py; classification/"
        "main.py, models.py)",
        "inner_lr": 1.0,
        "first_order": False,
        "film_block": 3,
        "grad_clip_value": 10.0,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.context_params < 1:
            raise ConfigError(
                f"algo.context_params must be at least 1, got {self.context_params}: CAVIA "
                "adapts only the context, so with none its inner loop has nothing to adapt"
            )
        if self.grad_clip_value is not None and not 0 < self.grad_clip_value < float("inf"):
            raise ConfigError(
                f"algo.grad_clip_value must be positive and finite (null: no clamp), got "
                f"{self.grad_clip_value}"
            )


class _ClampGrad(torch.autograd.Function):
    """Identity forward; the gradient clamped elementwise to [-bound, bound] (their clamp_)."""

    @staticmethod
    def forward(x: Tensor, bound: float) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.bound = inputs[1]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad.clamp(-ctx.bound, ctx.bound), None


class CAVIA(Bilevel):
    """MAML's machinery with the inner loop on the context alone (`ContextNet` around the model)."""

    def __init__(self, cfg: CAVIAConfig, model: nn.Module, kind: str, task_batching: str):
        super().__init__(
            cfg, ContextNet(model, cfg.context_params, cfg.film_block), kind, task_batching
        )

    def params(self) -> tuple[Params, Params]:
        """The network's weights and the context (zeros: every task starts there) as the
        parameters, the other buffers as buffers."""
        params, buffers = super().params()
        context = buffers.pop(CONTEXT)
        return {**params, CONTEXT: context}, buffers

    def inner_options(self, training: bool) -> dict[str, Any]:
        return super().inner_options(training) | {"adapted": (CONTEXT,)}

    def objective(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The mean query loss after adapting each task's context; its gradient clamped."""
        params, buffers = self.params()
        bound = self.cfg.grad_clip_value
        if bound is not None:
            params = {
                k: _ClampGrad.apply(v, bound) if v.requires_grad else v for k, v in params.items()
            }
        losses, scores = self.over_tasks(self.task_loss, batch, params, buffers)
        return losses.mean(), {"loss": losses.mean(), "score": scores.mean()}
