"""iMAML (Rajeswaran et al. 2019): meta-gradients by implicit differentiation.

Each task solves the proximal problem phi* = argmin_phi L_support(phi) + lambda/2 ||phi - theta||^2
approximately, with no graph kept, and the meta-gradient is g = A^-1 grad L_query(phi*), found
by `cg_steps` of conjugate gradient with Hessian-vector products (double backward). Memory does
not grow with the number of inner steps. The outer optimiser receives g through the surrogate
sum(theta * g).

Two ways to do it, both config options:

- The authors' code (aravindr93/imaml_dev, the default): `inner_steps` plain SGD steps on the
  support loss, then one proximal pull-back step phi <- phi - lr * lambda * (phi - theta);
  A = (1 + cg_damping) I + H / (lambda + lam_damping) with cg_damping 1 and lam_damping 10;
  outer Adam with eps 1e-3; test-time adaptation without the proximal term (lambda = 0).
- The paper's equations (`proximal=every_step`, `cg_damping=0`, `lam_damping=0`): the proximal
  term in every inner step and A = I + H / lambda, the exact inverse Jacobian of the solution.

Conjugate gradient stops moving along a direction of small or negative curvature, so an
indefinite or near-singular A (a few steps on a non-convex loss) gives a bounded step.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.func import functional_call

from metalearn.algos.bilevel.base import Bilevel, BilevelConfig
from metalearn.algos.bilevel.inner import Params
from metalearn.algos.learner import OuterOptimizer
from metalearn.algos.objectives import score
from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError

PROXIMAL = ("pullback", "every_step")


@dataclass
class IMAMLConfig(BilevelConfig):
    """The proximal strength lambda, how the inner problem is solved, and the linear solve."""

    name: str = "imaml"
    inner_steps: int = 10  # gradient steps on the inner problem
    lam: float = 2.0  # lambda: the proximal regularisation strength
    # 'pullback': plain SGD steps, then one step on the proximal term alone (the authors' code);
    # 'every_step': the proximal term in every inner step (the paper's inner objective)
    proximal: str = "pullback"
    test_lam: float = 0.0  # lambda at validation/test (0: plain SGD, as the authors' code)
    cg_steps: int = 5  # conjugate-gradient iterations for the implicit meta-gradient
    cg_damping: float = 1.0  # A = (1 + cg_damping) I + H / (lam + lam_damping)
    lam_damping: float = 10.0
    cg_residual_tol: float = 1e-10  # CG stops once the squared residual is below this
    # CG stops along a direction p with p'Ap < cg_min_curvature * p'p: each step is then at
    # most |r| / cg_min_curvature long, whatever the Hessian
    cg_min_curvature: float = 0.01
    adam_eps: float = 1e-3  # the outer Adam's epsilon
    first_order: bool = False  # no meaning here: the implicit gradient is never first-order

    # where the defaults above come from: the authors' code (`protocol.reference` records any
    # value that differs from it)
    REFERENCE: ClassVar[dict[str, Any]] = {
        "source": "aravindr93/imaml_dev (learner_model.py, omniglot_implicit_maml.py)",
        "proximal": "pullback",
        "test_lam": 0.0,
        "cg_damping": 1.0,
        "lam_damping": 10.0,
        "cg_residual_tol": 1e-10,
        "adam_eps": 1e-3,
    }

    def outer_optimizer_settings(self) -> OuterOptimizer:
        return OuterOptimizer(eps=self.adam_eps)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lam > 0:
            raise ConfigError(f"algo.lam must be positive, got {self.lam}")
        if self.test_lam < 0:
            raise ConfigError(f"algo.test_lam must be >= 0, got {self.test_lam}")
        if self.proximal not in PROXIMAL:
            raise ConfigError(
                f"algo.proximal must be one of {', '.join(PROXIMAL)}, got {self.proximal!r}"
            )
        if self.cg_steps < 1:
            raise ConfigError(f"algo.cg_steps must be at least 1, got {self.cg_steps}")
        for key in ("cg_damping", "lam_damping", "cg_residual_tol"):
            if getattr(self, key) < 0:
                raise ConfigError(f"algo.{key} must be >= 0, got {getattr(self, key)}")
        if not self.cg_min_curvature > 0:
            raise ConfigError(
                f"algo.cg_min_curvature must be positive, got {self.cg_min_curvature}"
            )
        if not self.adam_eps > 0:
            raise ConfigError(f"algo.adam_eps must be positive, got {self.adam_eps}")


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def conjugate_gradient(
    matvec: Callable[[Params], Params],
    b: Params,
    steps: int,
    residual_tol: float = 0.0,
    min_curvature: float = 0.0,
) -> Params:
    """Solve A x = b for symmetric A given as a function, by `steps` of conjugate gradient.

    Plain CG from x = 0 (the authors' `cg_solve`), stopped early once the squared residual is
    below `residual_tol`, and truncated as in Hessian-free optimisation: from the first search
    direction p with p'Ap <= min_curvature * p'p on, the iterate stops moving (A is positive
    definite only when the inner problem is solved exactly; along a tiny or negative curvature
    plain CG takes a huge or wrong-way step). Since |p| >= |r| in CG, every step is then at most
    |r| / min_curvature long. A fixed step count and masks instead of early exits: no host
    synchronisation, and it runs under vmap.
    """
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r, p = dict(b), dict(b)
    rs = _dot(r, r)
    tiny = torch.finfo(rs.dtype).tiny
    active = rs >= residual_tol
    for _ in range(steps):
        ap = matvec(p)
        curvature = _dot(p, ap)
        active = active & (curvature > torch.clamp(min_curvature * _dot(p, p), min=tiny))
        alpha = torch.where(active, rs / torch.where(active, curvature, 1.0), 0.0)
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rs_next = _dot(r, r)
        beta = rs_next / torch.where(rs > tiny, rs, tiny)
        p = {k: r[k] + beta * p[k] for k in p}
        rs = rs_next
        active = active & (rs >= residual_tol)
    return x


class IMAML(Bilevel):
    """Proximal inner problem, implicit meta-gradient by conjugate gradient."""

    def inner_options(self, training: bool) -> dict[str, Any]:
        options = super().inner_options(training)
        options["first_order"] = True  # the inner solution is a point; no graph through it
        lam = self.cfg.lam if training else self.cfg.test_lam
        if lam and (not training or self.cfg.proximal == "every_step"):
            options["proximal"] = lam
        return options

    def trajectory(
        self, params: Params, buffers: Params, support: Split, training: bool, steps=None
    ) -> Iterator[Params]:
        """The inner steps; with `proximal=pullback`, in meta-training, the last one followed
        by the step on lambda/2 ||phi - theta||^2 alone, phi <- phi - lr * lambda * (phi - theta)
        (one yield per step as for every learner: the last is the pulled-back point)."""
        steps_taken = super().trajectory(params, buffers, support, training, steps)
        if not (training and self.cfg.proximal == "pullback"):
            return steps_taken
        return self._pulled_back(steps_taken, params)

    def _pulled_back(self, trajectory: Iterator[Params], theta: Params) -> Iterator[Params]:
        previous = next(trajectory)
        for fast in trajectory:
            yield previous
            previous = fast
        pull = self.cfg.inner_lr * self.cfg.lam
        yield {k: v - pull * (v - theta[k].detach()) for k, v in previous.items()}

    def implicit_gradient(self, params, buffers, sx, sy, qx, qy) -> tuple[Params, Tensor, Tensor]:
        """One task's meta-gradient g, query loss and score (params must be detached)."""
        *_, fast = self.trajectory(params, buffers, Split(sx, sy), training=True)
        fast = {k: v.detach() for k, v in fast.items()}
        cfg = self.cfg

        def query_loss(p: Params) -> tuple[Tensor, Tensor]:
            prediction = functional_call(self.model, (p, buffers), (qx,))
            return self.loss(prediction, qy), prediction

        def support_grad(p: Params) -> Params:
            return torch.func.grad(
                lambda q: self.loss(functional_call(self.model, (q, buffers), (sx,)), sy)
            )(p)

        def matvec(v: Params) -> Params:  # ((1 + cg_damping) I + H / (lam + lam_damping)) v
            # reverse-over-reverse: forward-over-reverse (jvp of grad) trips over immutable
            # ZeroTensor tangents in mse_loss's backward on torch 2.14
            hv = torch.func.grad(lambda p: _dot(support_grad(p), v))(fast)
            scale = 1.0 / (cfg.lam + cfg.lam_damping)
            return {k: (1 + cfg.cg_damping) * v[k] + scale * hv[k] for k in v}

        grad_query, (loss, prediction) = torch.func.grad_and_value(query_loss, has_aux=True)(fast)
        g = conjugate_gradient(
            matvec, grad_query, cfg.cg_steps, cfg.cg_residual_tol, cfg.cg_min_curvature
        )
        return g, loss, score(self.kind, prediction, qy)

    def divergence_advice(self) -> str:
        """What to change when some tasks' inner problems diverge."""
        cfg = self.cfg
        return (
            f"lower algo.inner_lr (now {cfg.inner_lr}) or algo.inner_steps (now "
            f"{cfg.inner_steps}), or raise algo.lam (now {cfg.lam})"
        )

    def objective(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """sum(theta * stopgrad(mean g)): its gradient is iMAML's meta-gradient.

        A task whose inner problem diverged (non-finite query loss or meta-gradient; a few
        gradient steps on a sharp model can do that) is left out of the mean; the fraction left
        out is the metric `diverged`, which the trainer reports with `divergence_advice`. If
        every task diverged the objective is NaN and the trainer stops as for any divergence.
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
            "diverged": 1.0 - finite.float().mean(),
        }
        return surrogate, metrics
