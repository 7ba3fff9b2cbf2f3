"""MAML++ (Antoniou et al. 2019, "How to train your MAML"): MAML with the paper's five fixes.

- Multi-step loss (MSL): the outer loss is a weighted sum of the query losses after every inner
  step; the weights start uniform and anneal towards the last step, and after
  `msl_epochs` only the last step counts.
- Derivative-order annealing (DA): first-order meta-gradients for the first
  `first_order_epochs`, second order afterwards.
- Per-layer per-step learned inner step sizes (LSLR), initialised to `inner_lr`.
- Per-step BatchNorm weights and biases (BNWB): one copy per inner step, meta-learned and held
  out of the inner loop. (Per-step running statistics, BNRS, only matter for non-transductive
  testing; BatchNorm here always normalises with each task's own batch statistics.)
- Cosine annealing of the outer learning rate (CA): the default schedule (`trainer.min_lr`).
An epoch is `epoch_iterations` meta-iterations (500 in the paper's code).
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metalearn.algos.bilevel.base import Bilevel, BilevelConfig
from metalearn.algos.bilevel.inner import Params
from metalearn.algos.objectives import score
from metalearn.data.tasks import Split
from metalearn.errors import ConfigError
from metalearn.models.layers import TaskBatchNorm2d


@dataclass
class MAMLPlusPlusConfig(BilevelConfig):
    """The five fixes, each of which can be turned off to recover plain MAML."""

    name: str = "mamlpp"
    inner_lr: float = 0.1  # initial value of every learned per-layer per-step step size
    inner_steps: int = 5
    multi_step_loss: bool = True  # MSL
    msl_epochs: int = 10  # epochs with the annealed multi-step loss, then the last step only
    # DA: epochs of first-order meta-gradients; 0 (never, second order from the first
    # iteration) is the official code's Omniglot configs (first_order_to_second_order_epoch:
    # -1), 50 the paper's text
    first_order_epochs: int = 0
    learn_inner_lr: bool = True  # LSLR
    per_step_bn: bool = True  # BNWB
    epoch_iterations: int = 500  # meta-iterations per epoch, the unit of the annealing above

    # the official code's Omniglot configs (`protocol.reference` records any value that differs)
    REFERENCE: ClassVar[dict[str, Any]] = {
        "source": "AntreasAntoniou/HowToTrainYourMAMLPytorch (experiment_config/omniglot_maml++-*)",
        "first_order_epochs": 0,
        "msl_epochs": 10,
        "learn_inner_lr": True,
        "per_step_bn": True,
        "epoch_iterations": 500,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("msl_epochs", "first_order_epochs"):
            if getattr(self, key) < 0:
                raise ConfigError(f"algo.{key} must be >= 0, got {getattr(self, key)}")
        if self.epoch_iterations < 1:
            raise ConfigError(
                f"algo.epoch_iterations must be positive, got {self.epoch_iterations}"
            )


def msl_weights(steps: int, epoch: int, msl_epochs: int) -> list[float]:
    """Importance of each step's query loss (Antoniou et al. 2019, section 4, MSL).

    Uniform at epoch 0; each non-final weight decays by 1/(steps * msl_epochs) per epoch down
    to 0.03/steps, and the final weight takes up what they lose.
    """
    if steps == 1:
        return [1.0]
    decay = 1.0 / steps / msl_epochs
    floor = 0.03 / steps
    early = max(1.0 / steps - epoch * decay, floor)
    last = min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return [early] * (steps - 1) + [last]


class MAMLPlusPlus(Bilevel):
    """MAML with multi-step loss, annealed derivative order, learned step sizes, per-step BN."""

    outer_schedule = "cosine"

    def __init__(self, cfg: MAMLPlusPlusConfig, model: nn.Module, kind: str, task_batching: str):
        super().__init__(cfg, model, kind, task_batching)
        norm = [
            f"{module_name}.{p}"
            for module_name, module in model.named_modules()
            if isinstance(module, TaskBatchNorm2d)
            for p in ("weight", "bias")
        ]
        params = dict(model.named_parameters())
        steps = cfg.inner_steps
        # with per-step BN weights, BN parameters stay out of the inner loop (as in the paper's
        # code); without, every parameter adapts as in MAML
        held_out = norm if cfg.per_step_bn else []
        self.adapted = [name for name in params if name not in held_out]
        self.lrs = {  # (steps,) per adapted tensor; fixed at inner_lr without LSLR
            name: nn.Parameter(
                torch.full((steps,), cfg.inner_lr, device=params[name].device),
                requires_grad=cfg.learn_inner_lr,
            )
            for name in self.adapted
        }
        self.norm = {  # (steps, C) per BN tensor: one copy per inner step
            name: nn.Parameter(params[name].detach().expand(steps, -1).clone()) for name in held_out
        }

    def meta_parameters(self) -> dict[str, nn.Parameter]:
        return {
            **{f"lr.{k}": v for k, v in self.lrs.items() if v.requires_grad},
            **{f"bn.{k}": v for k, v in self.norm.items()},
        }

    def parameters(self) -> list[nn.Parameter]:
        replaced = set(self.norm)  # the model's own BN weights are replaced by the per-step ones
        own = [p for name, p in self.model.named_parameters() if name not in replaced]
        return [*own, *self.meta_parameters().values()]

    def _epoch(self) -> int:
        return self.iteration // self.cfg.epoch_iterations

    def _stage(self, step: int) -> Params:
        """BN weights for the forward passes of inner step `step` (0-based; clamped)."""
        s = min(step, self.cfg.inner_steps - 1)
        return {name: value[s] for name, value in self.norm.items()}

    def inner_options(self, training: bool) -> dict[str, Any]:
        options = super().inner_options(training)
        steps = self.cfg.inner_steps
        lrs = self.lrs if training else {k: v.detach() for k, v in self.lrs.items()}
        options["lr"] = [{name: lr[s] for name, lr in lrs.items()} for s in range(steps)]
        options["adapted"] = self.adapted
        if training:
            options["first_order"] = self._epoch() < self.cfg.first_order_epochs
        return options

    def stage_overrides(self, step: int, query: bool) -> Params:
        # the support pass of inner step s uses the BN weights of step s, and so does the query
        # pass after it, that is after s + 1 updates (num_step indexing in the paper's code)
        bn_step = max(step - 1, 0) if query else step
        return {**super().stage_overrides(step, query), **self._stage(bn_step)}

    def task_loss(self, params, buffers, sx, sy, qx, qy) -> tuple[Tensor, Tensor]:
        steps, cfg = self.cfg.inner_steps, self.cfg
        msl = cfg.multi_step_loss and self._epoch() < cfg.msl_epochs
        weights = msl_weights(steps, self._epoch(), cfg.msl_epochs) if msl else None
        total = 0.0
        for step, fast in enumerate(self.trajectory(params, buffers, Split(sx, sy), training=True)):
            if step == 0 or (weights is None and step < steps):
                continue
            prediction = self.query_forward(fast, buffers, qx, step)
            loss = self.loss(prediction, qy)
            total = total + (loss if weights is None else weights[step - 1] * loss)
        # the loss is the objective (weighted over steps while MSL lasts); the score the last step's
        return total, score(self.kind, prediction, qy)
