"""Meta-SGD (Li et al. 2017): a learned step size for every parameter element, meta-learned
jointly with the initialisation: phi = theta - alpha * grad L_support(theta), alpha elementwise.
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from metalearn.algos.bilevel.base import Bilevel, BilevelConfig


@dataclass
class MetaSGDConfig(BilevelConfig):
    """`inner_lr` initialises every learned step size; `test_inner_lr` does not apply."""

    name: str = "metasgd"


class MetaSGD(Bilevel):
    """MAML whose scalar inner step size becomes a tensor of the parameters' shapes."""

    def __init__(self, cfg: MetaSGDConfig, model: nn.Module, kind: str, task_batching: str):
        super().__init__(cfg, model, kind, task_batching)
        self.lrs = {
            name: nn.Parameter(torch.full_like(p.detach(), cfg.inner_lr))
            for name, p in model.named_parameters()
        }

    def meta_parameters(self) -> dict[str, nn.Parameter]:
        return {f"lr.{name}": lr for name, lr in self.lrs.items()}

    def inner_options(self, training: bool) -> dict[str, Any]:
        options = super().inner_options(training)
        # the learned step sizes serve at test time too; detached there (no outer graph)
        options["lr"] = self.lrs if training else {k: v.detach() for k, v in self.lrs.items()}
        return options
