"""iMAML (Rajeswaran et al. 2019): meta-gradients by implicit differentiation.

Each task solves the proximal problem phi* = argmin_phi L_support(phi) + lambda/2 ||phi - theta||^2
(approximately, by `inner_steps` gradient steps from theta, with no graph kept). At the
solution, d phi*/d theta = (I + H/lambda)^-1 with H the Hessian of L_support at phi*, so the
meta-gradient is g = (I + H/lambda)^-1 grad L_query(phi*), found by `cg_steps` of conjugate
gradient with Hessian-vector products (double backward). Memory does not grow with the
number of inner steps. The outer optimiser receives g through the surrogate sum(theta * g).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from metalearn.algos.bilevel.base import Bilevel, BilevelConfig
from metalearn.algos.bilevel.inner import Params
from metalearn.algos.objectives import score
from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError


@dataclass
class IMAMLConfig(BilevelConfig):
    """The proximal strength lambda and the conjugate-gradient budget."""

    name: str = "imaml"
    inner_steps: int = 10  # gradient steps on the proximal inner problem
    lam: float = 2.0  # lambda: the proximal regularisation strength
    cg_steps: int = 5  # conjugate-gradient iterations for the implicit meta-gradient
    cg_damping: float = 0.0  # extra ridge in the linear system, for indefinite Hessians
    first_order: bool = False  # no meaning here: the implicit gradient is never first-order

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lam > 0:
            raise ConfigError(f"algo.lam must be positive, got {self.lam}")
        if self.cg_steps < 1:
            raise ConfigError(f"algo.cg_steps must be at least 1, got {self.cg_steps}")
        if self.cg_damping < 0:
            raise ConfigError(f"algo.cg_damping must be >= 0, got {self.cg_damping}")


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def conjugate_gradient(matvec: Callable[[Params], Params], b: Params, steps: int) -> Params:
    """Solve A x = b for symmetric A given as a function, by `steps` of conjugate gradient.

    Truncated as in Hessian-free optimisation: from the first direction of non-positive
    curvature on, the iterate stops moving (A is positive definite only when the inner problem
    is solved exactly; a few inner steps on a non-convex loss can leave it indefinite, where
    plain CG diverges). A fixed step count and masks instead of early exits: no host
    synchronisation, and it runs under vmap.
    """
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r, p = dict(b), dict(b)
    rs = _dot(r, r)
    tiny = torch.finfo(rs.dtype).tiny
    active = torch.ones_like(rs, dtype=torch.bool)
    for _ in range(steps):
        ap = matvec(p)
        curvature = _dot(p, ap)
        active = active & (curvature > tiny)
        alpha = torch.where(active, rs / torch.where(active, curvature, 1.0), 0.0)
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rs_next = _dot(r, r)
        beta = rs_next / torch.where(rs > tiny, rs, tiny)
        p = {k: r[k] + beta * p[k] for k in p}
        rs = rs_next
    return x


class IMAML(Bilevel):
    """Proximal inner loop, implicit meta-gradient by conjugate gradient."""

    def inner_options(self, training: bool) -> dict[str, Any]:
        options = super().inner_options(training)
        options["first_order"] = True  # the inner solution is a point; no graph through it
        options["proximal"] = self.cfg.lam  # the same proximal problem at test time
        return options

    def implicit_gradient(self, params, buffers, sx, sy, qx, qy) -> tuple[Params, Tensor, Tensor]:
        """One task's meta-gradient g, query loss and score (params must be detached)."""
        *_, fast = self.trajectory(params, buffers, Split(sx, sy), training=True)
        fast = {k: v.detach() for k, v in fast.items()}

        def query_loss(p: Params) -> tuple[Tensor, Tensor]:
            prediction = functional_call(self.model, (p, buffers), (qx,))
            return self.loss(prediction, qy), prediction

        def support_grad(p: Params) -> Params:
            return torch.func.grad(
                lambda q: self.loss(functional_call(self.model, (q, buffers), (sx,)), sy)
            )(p)

        def matvec(v: Params) -> Params:  # (I (1 + damping) + H / lambda) v
            # reverse-over-reverse: forward-over-reverse (jvp of grad) trips over immutable
            # ZeroTensor tangents in mse_loss's backward on torch 2.14
            hv = torch.func.grad(lambda p: _dot(support_grad(p), v))(fast)
            return {k: (1 + self.cfg.cg_damping) * v[k] + hv[k] / self.cfg.lam for k in v}

        grad_query, (loss, prediction) = torch.func.grad_and_value(query_loss, has_aux=True)(fast)
        g = conjugate_gradient(matvec, grad_query, self.cfg.cg_steps)
        return g, loss, score(self.kind, prediction, qy)

    def objective(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """sum(theta * stopgrad(mean g)): its gradient is iMAML's meta-gradient.

        A task whose inner problem diverged (non-finite query loss or meta-gradient; a few
        gradient steps on a sharp model can do that) is left out of the mean, and the fraction
        left out is logged as `skipped`; if every task diverged the objective is NaN and the
        trainer stops as for any divergence.
        """
        params, buffers = self.params()
        detached = {k: v.detach() for k, v in params.items()}
        with torch.no_grad():
            g, losses, scores = self.over_tasks(self.implicit_gradient, batch, detached, buffers)
            finite = torch.isfinite(losses)
            for v in g.values():
                finite &= torch.isfinite(v.flatten(1)).all(1)
            kept = finite.sum()
            weight = finite.to(losses.dtype) / kept  # NaN everywhere when kept == 0
            mean_g = {
                k: (v * weight.view(-1, *[1] * (v.dim() - 1))).nan_to_num(0.0).sum(0)
                if kept
                else v.sum(0) * float("nan")
                for k, v in g.items()
            }
        surrogate = sum((params[k] * mean_g[k]).sum() for k in params)
        metrics = {
            "loss": losses[finite].mean(),
            "score": scores[finite].mean(),
            "skipped": 1.0 - finite.float().mean(),
        }
        return surrogate, metrics
