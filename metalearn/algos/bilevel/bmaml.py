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

`algo.log_posterior=gaussian` is the authors' network for regression (jsikyoon/bmaml, bnn.py):
each particle also carries log gamma (the noise precision) and log lambda (the weights'
precision), meta-learned and adapted with the weights, and

    log p(theta | D) = sum_n [log gamma / 2 - gamma / 2 (f(x_n) - y_n)^2]
                       + P / 2 log lambda - lambda / 2 ||w||^2
                       + (a_g - 1) log gamma - b_g gamma + log gamma
                       + (a_l - 1) log lambda - b_l lambda + log lambda

(P weights; Gamma(a, b) priors on gamma and lambda, the last term of each the Jacobian of the
log parametrisation), stepped by inner_lr (theirs: 1e-3) with the kernel over all of theta. The
chaser loss leaves the two precisions out, as theirs does, and the predictive variance is the
particles' spread plus their mean noise variance 1 / gamma.

Chaser loss: the chaser Theta^n takes the n inner steps on the support set; the leader takes
`algo.leader_steps` more SVGD steps from it on the support and query sets together; the
meta-loss is sum_m ||theta^n_m - stopgrad(theta^{n+s}_m)||^2 (the squared distance the chaser
still has to travel towards the posterior given more data), averaged over tasks. Prediction is
the ensemble's, as EMAML's.
"""

import math

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.algos.bilevel.inner import Params
from metalearn.algos.bilevel.particles import EnsembleMAML
from metalearn.algos.objectives import score
from metalearn.data.tasks import Split
from metalearn.errors import ConfigError


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


PRECISIONS = ("log_gamma", "log_lambda")  # log_posterior=gaussian: a particle's precisions


def network(params: Params) -> Params:
    """A particle's network weights: params without the precisions."""
    return {k: v for k, v in params.items() if k not in PRECISIONS}


class BMAML(EnsembleMAML):
    """EMAML's particles, moved jointly by SVGD and meta-trained with the chaser loss."""

    def __init__(self, cfg, model, kind: str, task_batching: str):
        super().__init__(cfg, model, kind, task_batching)
        if cfg.log_posterior == "gaussian":
            if kind != "regression":
                raise ConfigError(
                    "algo.log_posterior=gaussian is a Gaussian likelihood for regression; "
                    f"this data set is {kind}: use algo.log_posterior=mean or sum"
                )
            # theirs: N(-log m, 0.001) per particle, m the initial variance
            like = next(iter(self.particles.values()))
            jitter = torch.randn(2, cfg.particles, generator=torch.Generator().manual_seed(0))
            jitter = jitter.to(like)
            start = (math.log(cfg.noise_precision), math.log(cfg.weight_precision))
            for name, value, noise in zip(PRECISIONS, start, jitter, strict=True):
                self.particles[name] = nn.Parameter(value + 1e-3 * noise)

    def outputs(self, params: Params, buffers: Params, x: Tensor) -> Tensor:
        return super().outputs(network(params), buffers, x)

    def log_posterior(self, p: Params, buffers: Params, support: Split) -> Tensor:
        """One particle's log p(theta | D) up to a constant, as the authors' bnn.py (see the
        module docstring): algo.log_posterior=gaussian."""
        cfg, weights = self.cfg, network(p)
        log_gamma, log_lambda = p["log_gamma"], p["log_lambda"]
        error = functional_call(self.model, (weights, buffers), (support.x,)) - support.y
        data = (0.5 * log_gamma - 0.5 * log_gamma.exp() * error.square()).sum()
        size = sum(w.numel() for w in weights.values())
        squares = sum(w.square().sum() for w in weights.values())
        prior_w = 0.5 * size * log_lambda - 0.5 * log_lambda.exp() * squares
        (a_g, b_g), (a_l, b_l) = cfg.noise_prior, cfg.weight_prior
        prior_gamma = (a_g - 1) * log_gamma - b_g * log_gamma.exp() + log_gamma
        prior_lambda = (a_l - 1) * log_lambda - b_l * log_lambda.exp() + log_lambda
        return data + prior_w + prior_gamma + prior_lambda

    def step(self, params: Params, buffers: Params, support: Split, lr, first_order: bool):
        """One SVGD step of all particles on the support set's log posterior."""

        def loss(p: Params) -> Tensor:
            if self.cfg.log_posterior == "gaussian":
                return -self.log_posterior(p, buffers, support)
            return self.loss(functional_call(self.model, (p, buffers), (support.x,)), support.y)

        grads = torch.vmap(torch.func.grad(loss))(params)
        names = list(params)
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        particles = params[names[0]].shape[0]
        flat = torch.cat([params[k].reshape(particles, -1) for k in names], 1)
        log_grad = -torch.cat([grads[k].reshape(particles, -1) for k in names], 1)
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
        distance = sum(  # the precisions stay out, as in the authors' code
            ((chaser[k] - leader[k].detach()) ** 2).sum() for k in network(chaser)
        )
        with torch.no_grad():
            prediction = self.query_forward(chaser, buffers, qx, self.cfg.inner_steps)
        return distance / self.cfg.particles, score(self.kind, prediction, qy)

    def gaussian(self, fast: Params, buffers: Params, support: Split, x: Tensor):
        """Mean and std (Q,) at x: with the authors' likelihood, the particles' spread plus
        their mean noise variance 1 / gamma (a mixture of Gaussians' variance); else EMAML's."""
        if self.cfg.log_posterior != "gaussian":
            return super().gaussian(fast, buffers, support, x)
        outputs = self.outputs(fast, buffers, x)[..., 0]  # (M, Q)
        noise = (-fast["log_gamma"]).exp().mean()
        return outputs.mean(0), (outputs.var(0, unbiased=False) + noise).sqrt()
