"""VAMPIRE's meta-objective (Nguyen et al. 2020), transcribed from the authors' code
(cnguyen10/few_shot_meta_learning, Vampire2.py `adaptation` and `validation_loss`, and
HyperNetClasses.NormalVariationalNet `forward`).

A diagonal Gaussian q = N(mean, exp(log_std)^2) over the weights. Each inner step: for each of
`num_models` draws (one standard-normal eps per weight tensor, in the network's parameter
order, w = mean + eps * exp(log_std)), the gradient of loss(w; support) + KL_weight * KL(q ||
N(0, I)) with respect to (mean, log_std), averaged over the draws; then SGD on both with
inner_lr. The meta-objective: the mean over new draws from the adapted q of the query loss,
plus KL_weight * KL of the adapted q, averaged over the tasks of the meta-batch.

Plain PyTorch on purpose: lists of tensors, Python loops over tasks and draws, torch.autograd
with create_graph for the second-order meta-gradient. Their KL subtracts the number of weight
tensors where the number of weights belongs (a constant, so no gradient changes); here the
closed form is used."""

import torch
from torch.func import functional_call


def kl_standard_normal(means, log_stds):
    total = 0.0
    for m, s in zip(means, log_stds, strict=True):
        total = total + 0.5 * (m.square().sum() + torch.exp(2 * s).sum() - m.numel() - 2 * s.sum())
    return total


def draw(means, log_stds):
    """NormalVariationalNet.forward: one eps per tensor, in order."""
    return [m + torch.randn_like(m) * torch.exp(s) for m, s in zip(means, log_stds, strict=True)]


def vampire_meta_gradient(model, means, log_stds, tasks, loss, inner_lr, steps, num_models, kl_w):
    """The meta-objective's gradient with respect to the initial means and log-stds."""
    names = [name for name, _ in model.named_parameters()]

    def forward(weights, x):
        return functional_call(model, dict(zip(names, weights, strict=True)), (x,))

    total = 0.0
    for sx, sy, qx, qy in tasks:
        q = list(means) + list(log_stds)
        n = len(means)
        for _ in range(steps):
            grads_accum = [0.0] * len(q)
            kl = kl_standard_normal(q[:n], q[n:])
            for _ in range(num_models):
                value = loss(forward(draw(q[:n], q[n:]), sx), sy) + kl_w * kl
                grads = torch.autograd.grad(value, q, create_graph=True)
                grads_accum = [a + g / num_models for a, g in zip(grads_accum, grads, strict=True)]
            q = [p - inner_lr * g for p, g in zip(q, grads_accum, strict=True)]
        validation = 0.0
        for _ in range(num_models):
            validation = validation + loss(forward(draw(q[:n], q[n:]), qx), qy)
        validation = validation / num_models + kl_w * kl_standard_normal(q[:n], q[n:])
        total = total + validation
    total = total / len(tasks)
    return torch.autograd.grad(total, list(means) + list(log_stds))
