"""The types every layer shares: a run's validated config and the built run.

build.py makes them; the trainer, the records and the evaluation read them. They live here,
apart from build.py, so that reading a Run never means importing every registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from metalearn.errors import CheckpointError
from metalearn.evaluate import EvalConfig
from metalearn.hardware import HardwareConfig, autocast
from metalearn.records.logger import LoggerConfig
from metalearn.train.config import TrainerConfig

if TYPE_CHECKING:  # the type only: algorithms sit above the records that read a Run
    from metalearn.algos.learner import Learner


@dataclass
class RunConfig:
    """Everything a run needs, typed and validated."""

    algo: Any
    data: Any
    model: Any
    hardware: HardwareConfig
    logger: LoggerConfig
    trainer: TrainerConfig
    eval: EvalConfig
    seed: int


@dataclass
class Run:
    """A built run: validated config, device, task source, model and algorithm."""

    config: RunConfig
    config_dict: dict  # the resolved config, as saved in checkpoints and logged to W&B
    device: torch.device
    tasks: Any
    model: nn.Module
    algo: Learner
    # (ways, shots, query) of meta-training tasks; meta-RL: (actions, steps per trial, 0)
    train_shape: tuple[int, int, int]
    test_shape: tuple[int, int, int]  # the same, of validation and test tasks
    test_steps: int  # inner steps at validation and test (0 without an inner loop)
    task_batching: str  # hardware.task_batching resolved: 'vmap' or 'loop'
    test_batching: str  # the same for validation and test tasks
    metric: str  # 'accuracy', 'mse' or 'reward'
    preprocess: dict | None  # user images -> inputs (image data sets only)
    name: str  # run name: algo-data-ways-shots-seed

    def autocast(self):
        """The precision context of forward passes (hardware.precision)."""
        return autocast(self.config.hardware, self.device)

    def load_algo_state(self, state: dict, path: Any) -> None:
        """Load weights saved by a compatible run, or say why they do not fit."""
        try:
            self.algo.load_state_dict(state["algo_state"])
        except (RuntimeError, KeyError) as error:
            raise CheckpointError(
                f"the weights in {path} do not fit this model ({error}); evaluate with the "
                f"checkpoint's own model settings"
            ) from error
