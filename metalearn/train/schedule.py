"""The outer optimiser and its learning-rate schedule: a function of the iteration alone, so
that a resumed run follows the same schedule."""

from __future__ import annotations

import math
from typing import Any

import torch

from metalearn.algos.learner import AlgoConfig
from metalearn.run import Run


def outer_optimizer(algo_cfg: AlgoConfig, algo: Any) -> torch.optim.Optimizer:
    """Adam (the default), or SGD where the config asks for it (Reptile's epsilon step; RFS's and
    MetaOptNet's momentum SGD), with the momentum, weight decay and epsilon it gives."""
    settings = algo_cfg.outer_optimizer_settings()
    if settings.kind == "sgd":
        return torch.optim.SGD(
            algo.parameters(),
            lr=algo_cfg.outer_lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
        )
    return torch.optim.Adam(
        algo.parameters(),
        lr=algo_cfg.outer_lr,
        eps=settings.eps,
        weight_decay=settings.weight_decay,
    )


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
    for group in optimizer.param_groups:
        group["lr"] = outer_lr_at(run, iteration)
