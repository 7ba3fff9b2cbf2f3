"""TRPO's step (Schulman et al. 2015): a natural-gradient direction by conjugate gradient on
Fisher-vector products, scaled to the KL trust region and checked by a backtracking line search.

This follows rllab's `ConjugateGradientOptimizer` as the MAML authors used it (cbfinn/maml_rl
`sandbox/rocky/tf/optimizers/conjugate_gradient_optimizer.py`, with `rllab/misc/krylov.py`;
jonasrothfuss/ProMP `meta_policy_search/optimizers/conjugate_gradient_optimizer.py`):
10 CG iterations, damping (reg_coeff) 1e-5, initial step sqrt(2 max_kl / (s^T F s)), then
backtracking by 0.8 for at most 15 tries, accepting the first step whose loss improves and whose
KL stays within max_kl, and restoring the old parameters when none does. The Fisher-vector
product is the exact Hessian-vector product of the mean KL by double backprop (rllab's
`Hx_plain`, `PerlmutterHvp`), not maml_rl's finite-difference default.

The functions work on a flat parameter vector; `trpo_step` takes and returns parameter dicts.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from metalearn.models.learned_optimizers import flatten, unflatten

Params = dict[str, Tensor]


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10, residual_tol: float = 1e-10
) -> Tensor:
    """x ~ A^-1 b for a symmetric positive-definite A known through x -> A x (Demmel p. 312).

    rllab's `krylov.cg` (ProMP's `conjugate_gradients`): at most `iters` iterations, stopping
    once the squared residual ||b - A x||^2 falls under `residual_tol`. Without krylov's 1e-8
    added to the two denominators: near ||r||^2 ~ 1e-8 they break the directions' conjugacy and
    the residual stalls there (on our test's float64 problem, at 1e-5 of ||b|| with them, 1e-11
    without). The residual is checked before each iteration instead, so b = 0 returns x = 0
    without dividing by zero.
    """
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rdotr = r @ r
    for _ in range(iters):
        if rdotr < residual_tol:
            break
        z = matvec(p)
        v = rdotr / (p @ z)
        x = x + v * p
        r = r - v * z
        new_rdotr = r @ r
        p = r + new_rdotr / rdotr * p
        rdotr = new_rdotr
    return x


def fisher_vector_product(
    kl: Callable[[Tensor], Tensor], flat: Tensor, damping: float = 1e-5
) -> Callable[[Tensor], Tensor]:
    """v -> (F + damping I) v, with F the Hessian at `flat` of the mean KL from the old policy.

    `kl(x)` is the mean KL(pi_old || pi_x) over the sampled observations, the old policy's
    distribution held fixed (detached) inside it; its Hessian at x = old is the Fisher matrix.
    By double backprop: F v = grad_x (grad_x KL . v), with the first gradient's graph built once
    and reused by every product.
    """
    x = flat.detach().requires_grad_()
    (grad,) = torch.autograd.grad(kl(x), x, create_graph=True)

    def product(v: Tensor) -> Tensor:
        (hv,) = torch.autograd.grad(grad @ v, x, retain_graph=True)
        return hv + damping * v

    return product


def surrogate_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, valid: Tensor):
    """-E[pi(a|s) / pi_old(a|s) A] over the valid steps: TRPO's surrogate, as a loss to minimise
    (rllab's `surr_loss`)."""
    ratio = torch.exp(log_prob - old_log_prob.detach())
    return -(ratio * advantages * valid).sum() / valid.sum()


def trpo_step(
    params: Params,
    loss: Callable[[Params], Tensor],
    kl: Callable[[Params], Tensor],
    *,
    max_kl: float = 0.01,
    cg_iters: int = 10,
    damping: float = 1e-5,
    backtrack_ratio: float = 0.8,
    max_backtracks: int = 15,
    fvp: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Params, dict[str, float]]:
    """Minimise `loss(params)` subject to `kl(params) <= max_kl` by one TRPO step.

    `loss` is the surrogate loss (a scalar, e.g. `surrogate_loss`), `kl` the mean KL from the old
    policy (fixed inside it) to the policy with the given parameters; either may adapt the
    parameters first (MAML-TRPO) with `torch.func` transforms, which see through the line
    search's `no_grad`. `fvp`, if given, is v -> (F + damping I) v at the old parameters, F the
    Hessian of `kl` there (a caller that knows a cheaper exact product); None: double backprop
    of `kl`. Returns new parameter tensors (`params` is untouched: the old values when the line
    search finds no acceptable step) and the step's record: the loss and KL before and after,
    the step size, the backtracks taken and whether the step was accepted.
    """
    old = flatten(params).detach()

    def loss_at(x: Tensor) -> Tensor:
        return loss(unflatten(x, params))

    def kl_at(x: Tensor) -> Tensor:
        return kl(unflatten(x, params))

    x = old.clone().requires_grad_()
    loss_before = loss_at(x)
    (gradient,) = torch.autograd.grad(loss_before, x)
    fvp = fvp or fisher_vector_product(kl_at, old, damping)
    direction = conjugate_gradient(fvp, gradient, cg_iters)  # s = F^-1 g
    step_size = torch.sqrt(2 * max_kl / (direction @ fvp(direction) + 1e-8))
    step_size = torch.nan_to_num(step_size, nan=1.0)  # as maml_rl: a NaN step size becomes 1
    record = {"loss_before": loss_before.item(), "step_size": step_size.item(), "accepted": 0.0}
    backtracks = 0
    with torch.no_grad():
        for backtracks in range(max_backtracks):
            candidate = old - backtrack_ratio**backtracks * step_size * direction
            new_loss, new_kl = loss_at(candidate).item(), kl_at(candidate).item()
            if new_loss < record["loss_before"] and new_kl <= max_kl:  # False for NaN
                record.update(loss_after=new_loss, kl=new_kl, accepted=1.0)
                break
        else:
            candidate = old  # no acceptable step: keep the old parameters
            record.update(loss_after=record["loss_before"], kl=0.0)
    record["backtracks"] = float(backtracks)
    return {k: v.clone() for k, v in unflatten(candidate, params).items()}, record
