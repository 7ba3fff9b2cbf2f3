"""Bayesian MAML (Yoon et al. 2018): Stein variational gradient descent in the inner loop and
the chaser loss in the outer loop.

The particles Theta = {theta_m} (M sets of weights, each with its own meta-learned
initialisation) move together by SVGD (Liu & Wang 2016) on the task's posterior:

    theta_m <- theta_m + lr * 1/M sum_j [k(theta_j, theta_m) grad log p(theta_j | D)
                                         + grad_{theta_j} k(theta_j, theta_m)],

with log p(theta | D) = -L(theta; D) (the same mean loss MAML descends, so that with one
particle, where k = 1 and its gradient is 0, a step is MAML's step; `algo.log_posterior=sum`
takes -N L, the loss summed over the N examples, with the step lr / N: one particle still steps
as MAML, and the kernel's repulsion weighs 1/N against the data), the RBF kernel
k(a, b) = exp(-||a - b||^2 / h) over all weights flattened, and the median heuristic
h = med(||theta_j - theta_m||^2) / log(M + 1) (Liu & Wang's reference code; the median over
all M^2 pairs, held constant in the gradient).

Chaser loss: the chaser Theta^n takes the n inner steps on the support set; the leader takes
`algo.leader_steps` more SVGD steps from it on the support and query sets together; the
meta-loss is sum_m ||theta^n_m - stopgrad(theta^{n+s}_m)||^2 (the squared distance the chaser
still has to travel towards the posterior given more data), averaged over tasks. Prediction is
the ensemble's, as EMAML's.
"""

import math

import torch
from torch import Tensor
from torch.func import functional_call

from metalearn.algos.bilevel.inner import Params
from metalearn.algos.bilevel.particles import EnsembleMAML
from metalearn.algos.objectives import score
from metalearn.data.tasks import Split


def svgd_direction(flat: Tensor, log_grad: Tensor) -> Tensor:
    """The SVGD update direction phi (M, P) of particles `flat` (M, P) given grad log p at each
    (M, P): 1/M sum_j [k(theta_j, theta_m) grad_j + grad_{theta_j} k(theta_j, theta_m)]."""
    particles = flat.shape[0]
    d2 = torch.cdist(flat, flat) ** 2  # (M, M)
    if particles > 1:  # numpy's median: the mean of the middle two of an even count
        values, middle = d2.detach().flatten().sort().values, particles**2 // 2
        median = values[middle] if particles % 2 else (values[middle - 1] + values[middle]) / 2
        h = (median / math.log(particles + 1)).clamp_min(1e-12)
    else:
        h = 1.0
    k = torch.exp(-d2 / h)  # symmetric: k[j, m]
    drive = k @ log_grad
    # grad_{theta_j} k(theta_j, theta_m) = -2/h (theta_j - theta_m) k[j, m], summed over j
    repulse = (2.0 / h) * (flat * k.sum(0)[:, None] - k @ flat)
    return (drive + repulse) / particles


class BMAML(EnsembleMAML):
    """EMAML's particles, moved jointly by SVGD and meta-trained with the chaser loss."""

    def step(self, params: Params, buffers: Params, support: Split, lr, first_order: bool):
        """One SVGD step of all particles on the support loss."""

        def loss(p: Params) -> Tensor:
            return self.loss(functional_call(self.model, (p, buffers), (support.x,)), support.y)

        grads = torch.vmap(torch.func.grad(loss))(params)
        names = list(params)
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        flat = torch.cat([params[k].flatten(1) for k in names], 1)
        log_grad = -torch.cat([grads[k].flatten(1) for k in names], 1)
        if self.cfg.log_posterior == "sum":  # -N L, stepped by lr / N
            examples = support.y.shape[0]
            log_grad, lr = examples * log_grad, lr / examples
        moved = flat + lr * svgd_direction(flat, log_grad)
        out, start = {}, 0
        for k in names:
            size = params[k][0].numel()
            out[k] = moved[:, start : start + size].view_as(params[k])
            start += size
        return out

    def task_loss(self, params, buffers, sx, sy, qx, qy) -> tuple[Tensor, Tensor]:
        """The chaser loss (see the module docstring) and the chaser ensemble's query score."""
        *_, chaser = self.trajectory(params, buffers, Split(sx, sy), training=True)
        both = Split(torch.cat([sx, qx]), torch.cat([sy, qy]))
        leader = chaser
        for _ in range(self.cfg.leader_steps):
            leader = self.step(leader, buffers, both, self.cfg.inner_lr, first_order=True)
        distance = sum(((chaser[k] - leader[k].detach()) ** 2).sum() for k in chaser)
        with torch.no_grad():
            prediction = self.query_forward(chaser, buffers, qx, self.cfg.inner_steps)
        return distance / self.cfg.particles, score(self.kind, prediction, qy)
