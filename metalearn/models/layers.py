"""Building blocks written from primitive ops so that `vmap` + nested `grad` stay exact."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TaskBatchNorm2d(nn.Module):
    """BatchNorm over each call's own batch statistics (no running stats), from primitive ops.

    Why not `F.batch_norm`: with torch 2.14.1 on CPU, `vmap` over tasks of a function that takes
    a nested `torch.func.grad` through training-mode `F.batch_norm` gives silently wrong
    second-order meta-gradients (6-11% relative error in float64). Mean and variance written as
    reductions over (N, H, W) are exact; `tests/test_bilevel.py` checks it against a per-task
    autograd loop and finite differences. Where no second-order gradient passes through it under
    vmap (ProtoNets, first-order learners, any learner that loops over tasks) `fused=True` gives
    the native kernel, exact there and about 1.7x faster on CPU (see build.py).
    """

    def __init__(self, channels: int, eps: float = 1e-5, fused: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.fused = fused
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        if self.fused:
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0, keepdim=True)  # one pass
        scale = self.weight[None, :, None, None] * torch.rsqrt(var + self.eps)  # (1, C, 1, 1)
        shift = self.bias[None, :, None, None] - mean * scale
        # one multiply-add over the big tensor; the per-channel algebra above costs nothing
        return torch.addcmul(shift, x, scale)
