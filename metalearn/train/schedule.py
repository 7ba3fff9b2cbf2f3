"""The outer optimiser and its learning-rate schedule: a function of the iteration alone, so
that a resumed run follows the same schedule."""

from __future__ import annotations

import math
from typing import Any

import torch

from metalearn.algos.learner import AlgoConfig
from metalearn.optim import DEFAULT_HYPERGRAD_LR, SGDHD, AdamHD
from metalearn.run import Run


def outer_optimizer(algo_cfg: AlgoConfig, algo: Any, kind: str | None = None, beta=None):
    """The outer optimiser: `kind` (trainer.optimizer) if given, else the config's own: Adam (the
    default) or SGD (Reptile's epsilon step; RFS's and MetaOptNet's momentum SGD), with the
    momentum, weight decay and epsilon it gives. The *_hd kinds learn their rate by hypergradient
    descent at rate `beta` (trainer.hypergrad_lr; None: the authors')."""
    if algo.steps_itself:  # MAML-TRPO: the learner's own trust-region step, no optimiser's
        return LearnerSteps()
    settings = algo_cfg.outer_optimizer_settings()
    kind = kind or settings.kind
    params, lr, decay = algo.parameters(), algo_cfg.outer_lr, settings.weight_decay
    momentum = settings.momentum if kind in ("sgd", "sgd_hd") else settings.momentum or 0.9
    if kind.endswith("_hd"):
        beta = DEFAULT_HYPERGRAD_LR[kind] if beta is None else beta
        if kind == "adam_hd":
            return AdamHD(params, lr, hypergrad_lr=beta, eps=settings.eps, weight_decay=decay)
        nesterov = kind == "sgdn_hd"
        return SGDHD(
            params, lr, hypergrad_lr=beta, momentum=momentum, nesterov=nesterov, weight_decay=decay
        )
    if kind in ("sgd", "sgdn"):
        nesterov = kind == "sgdn"
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=decay
        )
    return torch.optim.Adam(params, lr=lr, eps=settings.eps, weight_decay=decay)


class LearnerSteps:
    """The outer 'optimiser' of a learner that takes its outer step itself (`steps_itself`):
    no parameters, no learning rate, no state; the loop's calls do nothing."""

    param_groups: list[dict] = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to clear: the learner's step leaves no gradients in .grad."""

    def step(self) -> None:
        """Nothing to do: the learner has stepped already."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore (the weights are the learner's state)."""


def learns_its_rate(optimizer: torch.optim.Optimizer) -> bool:
    """A hypergradient optimiser: its rate is its own, and no schedule sets it."""
    return isinstance(optimizer, (SGDHD, AdamHD))


def schedule(run: Run) -> str:
    """The outer learning-rate schedule in force (see TrainerConfig.lr_schedule)."""
    trainer = run.config.trainer
    if trainer.lr_schedule is not None:
        return trainer.lr_schedule
    return "step" if trainer.lr_decay_every else run.algo.outer_schedule


def outer_lr_at(run: Run, iteration: int) -> float:
    """The outer learning rate at an iteration: a function of the iteration alone, so that a
    resumed run follows the same schedule."""
    trainer, base = run.config.trainer, run.config.algo.outer_lr
    kind, fraction = schedule(run), min(iteration / trainer.iterations, 1.0)
    if kind == "step":
        return base * trainer.lr_decay ** (iteration // trainer.lr_decay_every)
    if kind == "cosine":
        return trainer.min_lr + 0.5 * (base - trainer.min_lr) * (1 + math.cos(math.pi * fraction))
    if kind == "linear":
        return base + (trainer.min_lr - base) * fraction
    return base


def set_lr(optimizer, run: Run, iteration: int) -> None:
    if learns_its_rate(optimizer):
        return
    for group in optimizer.param_groups:
        group["lr"] = outer_lr_at(run, iteration)
