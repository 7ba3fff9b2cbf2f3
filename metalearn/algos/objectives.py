"""Per-task loss and score for each task kind: classification (accuracy) or regression (MSE)."""

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

Objective = Callable[[Tensor, Tensor], Tensor]


def loss_fn(kind: str) -> Objective:
    """The training loss: cross-entropy on labels, or mean squared error on values."""
    return F.cross_entropy if kind == "classification" else F.mse_loss


@dataclass(frozen=True)
class Metric:
    """How a primary metric is logged and compared: its validation key (val/<short>), its
    training key (train/<train_key>), and which way is better."""

    short: str
    train_key: str
    higher_is_better: bool
    # validation also logs it after every number of inner steps, val/<short>_step<k> (how far
    # adaptation has gone: a meta-RL policy's return before and after each policy-gradient step)
    by_step: bool = False


# every primary metric a learner may report (Learner.metric, or metric_name of its task kind)
METRICS = {
    "accuracy": Metric("acc", "query_acc", True),
    "mse": Metric("mse", "query_mse", False),
    "reward": Metric("reward", "trial_reward", True),
    "final_loss": Metric("final_loss", "final_loss", False),
    "loglik": Metric("loglik", "target_loglik", True),  # nats per target point
    # an episode's undiscounted return, after the test's policy-gradient steps (MAML-TRPO, ...)
    "return": Metric("return", "return", True, by_step=True),
}


def metric_name(kind: str) -> str:
    """The primary metric that results.json reports for this kind of task (meta-RL: a
    trial's total reward; learned optimisers: the optimizee's loss at the unroll's end)."""
    kinds = {"classification": "accuracy", "regression": "mse", "rl": "reward"}
    return (kinds | {"optimization": "final_loss"})[kind]


def score(kind: str, prediction: Tensor, target: Tensor) -> Tensor:
    """The primary metric of one task (higher accuracy or lower MSE is better)."""
    if kind == "classification":
        return (prediction.argmax(dim=-1) == target).float().mean()
    return F.mse_loss(prediction, target)
