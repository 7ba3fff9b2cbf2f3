"""BMAML's meta-update (Yoon et al. 2018, Algorithm 2 with the chaser loss), transcribed from the
paper and from the SVGD reference code it builds on (Liu & Wang 2016, dilinwang820/Stein-
Variational-Gradient-Descent, `svgd_kernel`: RBF kernel, bandwidth from the median of the
squared pairwise distances over log(n + 1)).

`bnn_log_posterior` is the authors' Bayesian network for regression (jsikyoon/bmaml, bnn.py
`log_likelihood_data` and `log_prior_weight`, and bmaml.py `update_particle`): the particle is
[weights..., log lambda, log gamma], as their flattened dict; the chaser loss leaves the two
precisions out ("if 'log' in name: continue").

Plain PyTorch on purpose: one nn.Module per particle, flat parameter vectors, Python loops over
tasks and over particle pairs, a scalar bandwidth. Nothing is shared with metalearn's
functional implementation but the network."""

import math

import torch
from torch import nn
from torch.func import functional_call


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.flatten() for p in model.parameters()])


def _unflatten(model: nn.Module, vector: torch.Tensor) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name] = vector[start : start + p.numel()].view_as(p)
        start += p.numel()
    return out


def bnn_log_posterior(model, theta, x, y, a_g=2.0, b_g=0.2, a_l=2.0, b_l=2.0):
    """The authors' log p(theta | D) of one particle theta = [weights..., log_lambda, log_gamma]."""
    weights, log_lambda, log_gamma = theta[:-2], theta[-2], theta[-1]
    prediction = functional_call(model, _unflatten(model, weights), (x,))
    error_y = prediction - y
    log_lik_data = 0.5 * log_gamma - 0.5 * torch.exp(log_gamma) * error_y**2
    num_params = weights.shape[0]
    log_prior_gamma = (a_g - 1) * log_gamma - b_g * torch.exp(log_gamma) + log_gamma
    log_prior_w = 0.5 * num_params * log_lambda - 0.5 * torch.exp(log_lambda) * (weights**2).sum()
    log_prior_lambda = (a_l - 1) * log_lambda - b_l * torch.exp(log_lambda) + log_lambda
    return log_prior_w + log_prior_lambda + log_prior_gamma + log_lik_data.sum()


def svgd_step(model, thetas: list[torch.Tensor], x, y, loss, lr, create_graph: bool):
    """One SVGD step of every particle: theta_m + lr * phi(theta_m), log p = -loss(prediction,
    y), or `loss` = "bnn": log p = bnn_log_posterior."""
    n = len(thetas)
    grads = []
    for theta in thetas:
        if loss == "bnn":
            value = -bnn_log_posterior(model, theta, x, y)
        else:
            value = loss(functional_call(model, _unflatten(model, theta), (x,)), y)
        (g,) = torch.autograd.grad(value, theta, create_graph=create_graph)
        grads.append(-g)  # grad log p
    # Liu & Wang's svgd_kernel: h = median(pairwise squared distances) / log(n + 1)
    sq = torch.stack([torch.stack([((a - b) ** 2).sum() for b in thetas]) for a in thetas])
    values = sorted(sq.detach().flatten().tolist())  # np.median: the middle two's mean if even
    middle = len(values) // 2
    median = values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2
    h = median / math.log(n + 1) if n > 1 else 1.0
    moved = []
    for m in range(n):
        phi = torch.zeros_like(thetas[m])
        for j in range(n):
            k = torch.exp(-((thetas[j] - thetas[m]) ** 2).sum() / h)
            phi = phi + k * grads[j] + (-2.0 / h) * (thetas[j] - thetas[m]) * k
        moved.append(thetas[m] + lr * phi / n)
    return moved


def bmaml_meta_gradient(model, inits: list[torch.Tensor], tasks, loss, lr, steps, leader_steps):
    """The gradient of the chaser loss, averaged over tasks, with respect to each particle's
    initialisation: chaser = `steps` SVGD steps on the support set (second order), leader =
    `leader_steps` more on support and query, loss = sum_m ||chaser_m - leader_m||^2 / M."""
    total = 0.0
    for sx, sy, qx, qy in tasks:
        chaser = list(inits)
        for _ in range(steps):
            chaser = svgd_step(model, chaser, sx, sy, loss, lr, create_graph=True)
        leader = [c.detach().requires_grad_() for c in chaser]
        both_x, both_y = torch.cat([sx, qx]), torch.cat([sy, qy])
        for _ in range(leader_steps):
            leader = [v.detach().requires_grad_() for v in leader]
            leader = svgd_step(model, leader, both_x, both_y, loss, lr, create_graph=False)
        weights = slice(0, -2) if loss == "bnn" else slice(None)  # the precisions stay out
        distance = sum(
            ((c[weights] - lead[weights].detach()) ** 2).sum()
            for c, lead in zip(chaser, leader, strict=True)
        )
        total = total + distance / len(inits)
    total = total / len(tasks)
    return torch.autograd.grad(total, inits)
