"""Reptile as openai/supervised-reptile performs it (supervised_reptile/reptile.py, models.py,
variables.py), transcribed in plain PyTorch.

One Adam optimiser (TensorFlow's: beta1 = 0, eps 1e-8, the step lr * sqrt(1 - beta2^t) /
(1 - beta1^t) * m / (sqrt(v) + eps), its moments and beta powers global variables) serves every
task of the run. A meta-update saves the trainable weights, and for each task of the meta-batch
in turn: trains on `inner_iters` mini-batches of `inner_batch_size` examples (`_mini_batches`:
shuffle the examples in place, cut consecutive batches, reshuffle when the pass runs out) with
the summed cross-entropy (minimize() of the per-example loss vector), records the weights and
restores the saved ones, but not the optimiser's state. Then weights <- old + eps * (mean new -
old). Evaluation trains the same way on the support examples, predicts support and query in one
batch (BatchNorm in training mode: transductive) and then restores weights and optimiser state.

random.shuffle is replaced by a torch.randperm of the current order, so that a seeded run draws
the same batches as metalearn's.
"""

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


class TensorFlowAdam:
    """tf.train.AdamOptimizer over a module's parameters: per-parameter m and v, global t."""

    def __init__(self, model: nn.Module, lr: float, beta1: float, beta2: float, eps: float):
        self.params = list(model.parameters())
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.beta1_power, self.beta2_power = 1.0, 1.0  # beta^t after t steps

    def step(self) -> None:
        self.beta1_power *= self.beta1
        self.beta2_power *= self.beta2
        lr_t = self.lr * math.sqrt(1 - self.beta2_power) / (1 - self.beta1_power)
        with torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v, strict=True):
                m.mul_(self.beta1).add_((1 - self.beta1) * p.grad)
                v.mul_(self.beta2).add_((1 - self.beta2) * p.grad * p.grad)
                p.sub_(lr_t * m / (v.sqrt() + self.eps))

    def export(self) -> tuple:
        return (
            [m.clone() for m in self.m],
            [v.clone() for v in self.v],
            self.beta1_power,
            self.beta2_power,
        )

    def restore(self, saved: tuple) -> None:
        m, v, self.beta1_power, self.beta2_power = saved
        self.m, self.v = [t.clone() for t in m], [t.clone() for t in v]


def mini_batches(n: int, batch_size: int, num_batches: int):
    """supervised_reptile's _mini_batches over example indices 0..n-1."""
    samples, batch, count = list(range(n)), [], 0
    while True:
        samples = [samples[i] for i in torch.randperm(n).tolist()]
        for sample in samples:
            batch.append(sample)
            if len(batch) < batch_size:
                continue
            yield torch.tensor(batch)
            batch, count = [], count + 1
            if count == num_batches:
                return


def train_on(model, adam, x, y, inner_batch_size, inner_iters):
    for rows in mini_batches(len(x), inner_batch_size, inner_iters):
        model.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows], reduction="sum").backward()
        adam.step()


def reptile_train_step(model, adam, tasks, *, inner_batch_size, inner_iters, meta_step_size):
    """One Reptile.train_step: tasks are (x, y), all of a task's examples."""
    old = [p.detach().clone() for p in model.parameters()]
    new = []
    for x, y in tasks:
        train_on(model, adam, x, y, inner_batch_size, inner_iters)
        new.append([p.detach().clone() for p in model.parameters()])
        with torch.no_grad():  # import_variables(old_vars): the weights only
            for p, o in zip(model.parameters(), old, strict=True):
                p.copy_(o)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            mean = torch.stack([n[i] for n in new]).mean(0)
            p.copy_(old[i] + meta_step_size * (mean - old[i]))


def reptile_evaluate(model, adam, sx, sy, qx, *, inner_batch_size, inner_iters):
    """Reptile.evaluate (transductive): query logits after training on the support set; the
    weights and the optimiser state are restored afterwards."""
    weights, saved = copy.deepcopy(model.state_dict()), adam.export()
    train_on(model, adam, sx, sy, inner_batch_size, inner_iters)
    with torch.no_grad():
        logits = model(torch.cat([sx, qx]))[len(sx) :]
    model.load_state_dict(weights)
    adam.restore(saved)
    return logits
