"""Meta-LSTM (Ravi & Larochelle 2017, "Optimization as a model for few-shot learning"): an LSTM
meta-learner whose cell state is the few-shot classifier's weights.

Every coordinate of the learner's flattened weights theta (the model: conv4) is one row of a
two-layer, coordinatewise meta-learner, as twitter-research/meta-learning-lstm
(meta-learner-lstm.lua, lstm-helper.lua) builds it:

1. the learner's support loss L_t and gradient g_t at theta_{t-1}, both detached (no second
   derivatives), each preprocessed as Andrychowicz et al. with p = 10 into two features, the
   loss broadcast to every coordinate: x_t = [loss(2), grad(2)];
2. a standard LSTM of 20 units on x_t;
3. the meta-LSTM cell, whose gates read [h_t, c_{t-1}, gate_{t-1}] (the previous gate before its
   sigmoid) through weights shared by all coordinates:
       f_t = [h_t, c_{t-1}, f_{t-1}] W_F + b_F,   i_t = [h_t, c_{t-1}, i_{t-1}] W_I + b_I
       c_t = sigmoid(f_t) * c_{t-1} - sigmoid(i_t) * g_t,   theta_t = c_t
   from c_0 = c_I, the learned initial weights.

`algo.updates` full-batch updates on the support set (the authors' configs: 12 for 5-way 1-shot,
8 for 5-shot), then the meta-loss is the query cross-entropy at theta_T, meta-trained with Adam
1e-3 and gradients clipped to norm 0.25 (the experiments set `trainer.clip_grad_norm`). As both
reference codes do, the gradient fed to the meta-learner is divided by the support size once
more (`algo.divide_gradient`). BatchNorm: batch statistics in the support steps and the
meta-training query pass; at validation and test the queries are normalised with the running
statistics of that episode's support steps (momentum `algo.bn_momentum`, reset every episode),
so testing is not transductive. Initialisation: every meta-weight U(-0.01, 0.01), b_F ~ U(4, 5),
b_I ~ U(-5, -4) (the authors'), c_I the model's initial weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.algos.learner import AlgoConfig, Learner
from metalearn.algos.objectives import score
from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError
from metalearn.models.layers import (
    TaskBatchNorm2d,
    normalizing_with_running_stats,
    recording_batch_stats,
)
from metalearn.models.learned_optimizers import unflatten


@dataclass
class MetaLSTMConfig(AlgoConfig):
    """The meta-learner and its episodes (see the module docstring)."""

    REFERENCE: ClassVar[dict[str, Any]] = {
        "source": "twitter-research/meta-learning-lstm (config/lstm/train-imagenet-1shot.lua)",
        "updates": 12,
        "hidden": 20,
        "p": 10.0,
        "outer_lr": 0.001,
        "forget_bias": [4.0, 5.0],
        "input_bias": [-5.0, -4.0],
        "bn_momentum": 0.9,
        "divide_gradient": True,
    }

    name: str = "metalstm"
    updates: int = 12  # T: full-batch learner updates on the support set per episode
    test_updates: int | None = None  # at validation and test (None: updates)
    hidden: int = 20  # units of the first (standard) LSTM layer
    p: float = 10.0  # the gradient and loss preprocessing's p
    outer_lr: float = 0.001
    forget_bias: list[float] = field(default_factory=lambda: [4.0, 5.0])  # b_F ~ U[low, high]
    input_bias: list[float] = field(default_factory=lambda: [-5.0, -4.0])  # b_I ~ U[low, high]
    bn_momentum: float = 0.9  # weight of each support step's BatchNorm statistics
    divide_gradient: bool = True  # the references divide the gradient by the support size again
    train_ways: int | None = None
    train_query: int | None = None

    def __post_init__(self) -> None:
        if self.updates < 1 or (self.test_updates is not None and self.test_updates < 1):
            raise ConfigError(
                f"algo.updates and algo.test_updates must be >= 1, got {self.updates} and "
                f"{self.test_updates}"
            )
        if not 0 < self.outer_lr < math.inf:
            raise ConfigError(
                f"algo.outer_lr must be a positive, finite learning rate, got {self.outer_lr}"
            )
        if not 0 < self.bn_momentum <= 1:
            raise ConfigError(f"algo.bn_momentum must be in (0, 1], got {self.bn_momentum}")
        if self.hidden < 1 or self.p <= 0:
            raise ConfigError("algo.hidden must be >= 1 and algo.p > 0")
        if self.test_updates is None:
            self.test_updates = self.updates

    def train_shape(self) -> tuple[int | None, int | None, int | None]:
        return self.train_ways, None, self.train_query

    def running_batchnorm(self) -> bool:
        return True  # test queries use the running statistics of the episode's support steps


def preprocess(x: Tensor, p: float) -> Tensor:
    """(...,) -> (..., 2): (log|x| / p, sign x) where |x| >= e^-p, else (-1, e^p x)."""
    big = x.abs() >= math.exp(-p)
    log = torch.where(big, torch.log(x.abs().clamp_min(math.exp(-p))) / p, -1.0)
    sign = torch.where(big, torch.sign(x), math.exp(p) * x)
    return torch.stack([log, sign], dim=-1)


class MetaLearner(nn.Module):
    """The meta-learner's weights: the first LSTM, the meta-LSTM cell's gates, and c_I."""

    def __init__(self, cfg: MetaLSTMConfig, initial: Tensor) -> None:
        super().__init__()
        self.lstm = nn.LSTMCell(4, cfg.hidden)
        self.w_f = nn.Parameter(torch.empty(cfg.hidden + 2))
        self.w_i = nn.Parameter(torch.empty(cfg.hidden + 2))
        self.b_f = nn.Parameter(torch.empty(()))
        self.b_i = nn.Parameter(torch.empty(()))
        with torch.no_grad():
            for weight in [*self.lstm.parameters(), self.w_f, self.w_i]:
                weight.uniform_(-0.01, 0.01)
            self.b_f.uniform_(*cfg.forget_bias)
            self.b_i.uniform_(*cfg.input_bias)
        self.c_init = nn.Parameter(initial.detach().clone())  # c_I: the learner's initial weights


class MetaLSTM(Learner):
    """Meta-LSTM few-shot learner: the meta-learner updates the model's weights, episode by
    episode (one task at a time)."""

    family = "optimizers"  # it learns an update rule, on few-shot episodes
    optimizees = False
    pretrains = False
    needs_train_classes = False
    needs_ways = False
    needs_head = True
    reinforcement = False
    batches_tasks = False
    differentiates_inner_loop = False  # the learner's gradients are inputs, detached
    inner_loop = False  # its updates are algo.updates, not an SGD step size
    first_order_switch = False
    checkpoint_switch = False
    outer_schedule = "constant"
    compiled = "meta_loss"

    def __init__(self, cfg: MetaLSTMConfig, model: nn.Module, kind: str, task_batching: str):
        if kind != "classification":
            raise ConfigError(
                "algo=metalstm meta-learns a few-shot classifier's updates, so it needs "
                "classification tasks: use an image data set such as data=omniglot"
            )
        self.cfg = cfg
        self.model = model
        self.kind = kind
        initial = torch.cat([p.detach().flatten() for p in model.parameters()])
        self.meta = MetaLearner(cfg, initial).to(initial.device)
        self.norms = [n for n, m in model.named_modules() if isinstance(m, TaskBatchNorm2d)]

    def parameters(self) -> list[nn.Parameter]:
        return list(self.meta.parameters())

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"meta": self.meta}

    def _weights(self, flat: Tensor) -> dict[str, Tensor]:
        return unflatten(flat, dict(self.model.named_parameters()))

    def _forward(self, flat: Tensor, x: Tensor, stats: dict[str, Tensor] | None = None) -> Tensor:
        """The learner's logits at weights `flat`: batch statistics, or the given running ones."""
        if stats is None:
            return functional_call(self.model, self._weights(flat), (x,))
        with normalizing_with_running_stats(self.model):
            return functional_call(self.model, (self._weights(flat), stats), (x,))

    def _adapt(self, support: Split, updates: int) -> tuple[Tensor, dict[str, Tensor]]:
        """theta_T after `updates` meta-learner steps on the support set, and the BatchNorm
        running statistics of those steps (for non-transductive testing)."""
        m, cfg = self.meta, self.cfg
        c = m.c_init
        n = c.numel()
        h = cell = c.new_zeros(n, cfg.hidden)
        f_prev = i_prev = c.new_zeros(n)
        running = {}
        for name in self.norms:
            channels = self.model.get_submodule(name).weight.numel()
            running[f"{name}.running_mean"] = c.new_zeros(channels)
            running[f"{name}.running_var"] = c.new_ones(channels)
        for _ in range(updates):
            with torch.enable_grad():
                theta = c.detach().requires_grad_()
                with recording_batch_stats() as recorded:
                    loss = F.cross_entropy(self._forward(theta, support.x), support.y)
                (grad,) = torch.autograd.grad(loss, theta)
            for name, stat in zip(self.norms, recorded, strict=True):
                for key, value in ((".running_mean", stat[0]), (".running_var", stat[1])):
                    running[name + key] = running[name + key].lerp(value, cfg.bn_momentum)
            if cfg.divide_gradient:
                grad = grad / len(support.y)
            features = preprocess(loss.detach(), cfg.p).expand(n, 2), preprocess(grad, cfg.p)
            x = torch.cat(features, dim=1)  # [loss(2), grad(2)], the loss on every row
            h, cell = m.lstm(x, (h, cell))
            f_pre = torch.cat([h, c[:, None], f_prev[:, None]], 1) @ m.w_f + m.b_f
            i_pre = torch.cat([h, c[:, None], i_prev[:, None]], 1) @ m.w_i + m.b_i
            c = torch.sigmoid(f_pre) * c - torch.sigmoid(i_pre) * grad
            f_prev, i_prev = f_pre, i_pre
        return c, running

    def meta_loss(self, batch: TaskBatch, iteration: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        losses, scores = [], []
        for t in range(batch.tasks):
            support = Split(batch.support.x[t], batch.support.y[t])
            theta, _ = self._adapt(support, self.cfg.updates)
            logits = self._forward(theta, batch.query.x[t])  # batch statistics, as the authors
            losses.append(F.cross_entropy(logits, batch.query.y[t]))
            scores.append(score(self.kind, logits.detach(), batch.query.y[t]))
        loss = torch.stack(losses).mean()
        return loss, {"loss": loss.detach(), "score": torch.stack(scores).mean()}

    def evaluate(self, batch: TaskBatch, steps: list[int]) -> dict[str, Tensor]:
        """Per-task query loss and accuracy after algo.test_updates updates, (T, 1), and the
        query logits (T, 1, Q, C); `steps` does not apply (the number of updates is the
        algorithm's)."""
        losses, scores, each = [], [], []
        with torch.no_grad():
            for t in range(batch.tasks):
                support = Split(batch.support.x[t], batch.support.y[t])
                logits = self.predict(support, batch.query.x[t]).float()
                losses.append(F.cross_entropy(logits, batch.query.y[t]))
                scores.append(score(self.kind, logits, batch.query.y[t]))
                each.append(logits)
        out = {
            "loss": torch.stack(losses),
            "score": torch.stack(scores),
            "logits": torch.stack(each),
        }
        return {key: value[:, None] for key, value in out.items()}

    def predict(self, support: Split, query_x: Tensor, steps: int | None = None) -> Tensor:
        """One task's query logits, each query normalised with the support steps' statistics."""
        with torch.no_grad():
            theta, running = self._adapt(support, steps or self.cfg.test_updates)
            return self._forward(theta, query_x, running)

    def state_dict(self) -> dict:
        return {"meta": self.meta.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.meta.load_state_dict(state["meta"])
