"""The one functional inner loop (`adapt`) shared by every gradient-based meta-learner.

One SGD step is phi <- phi - lr * grad L(phi) (Finn et al. 2017, eq. 1). What differs between the
algorithms of the family is only which parameters move and with which step sizes:

- MAML, FOMAML, iMAML: every parameter, one scalar step size;
- ANIL: only the head (the caller adapts a head-only model on fixed features);
- Meta-SGD: one learned step size per parameter element (`lr` is a dict of tensors);
- MAML++: one learned step size per parameter tensor and per step (`lr` is a list of dicts),
  BatchNorm weights held out of the inner loop and swapped per step (`per_step`);
- iMAML: a proximal term lambda/2 * ||phi - theta||^2 in the inner objective (`proximal`);
- MAML with `algo.inner_lr_hypergradient`: the scalar rate follows its hypergradient within the
  loop (`hypergradient`: Baydin et al. 2018's SGD-HD, alpha_k = alpha_{k-1} + beta g_k . g_{k-1});
- the gradient-transform family (transforms.py): a meta-learned map of each step's gradients,
  g -> T_phi(g) before the step (`transform`: Meta-Curvature's Kronecker factors, MT-Net's mask),
  and a meta-learned map of the weights the forward pass uses (`reparametrize`: T-Net's T W).

Reptile's inner loop is its own (reptile.py): Adam steps whose state outlives the task.

The gradient is taken with `torch.func.grad`, so the loop composes with `vmap` over tasks and
with the outer autograd graph (second order unless `first_order`).
"""

from collections.abc import Callable, Collection, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.algos.objectives import Objective
from metalearn.data.tasks import Split

Params = dict[str, Tensor]
StepSize = float | Tensor | Params  # one for all parameters, or one per parameter name
LearningRate = StepSize | Sequence[StepSize]  # or one of those per inner step
Transform = Callable[[Params, int], Params]  # (gradients, inner step) -> update directions


def step_size(lr: LearningRate, step: int, name: str) -> float | Tensor:
    """The step size of parameter `name` at inner step `step` (0-based)."""
    if isinstance(lr, Sequence):
        lr = lr[min(step, len(lr) - 1)]  # more test steps than learned ones: reuse the last
    return lr[name] if isinstance(lr, dict) else lr


def dot(a: Params, b: Params) -> Tensor:
    """The inner product of two parameter dicts with the same keys."""
    return sum((a[k] * b[k]).sum() for k in a)


def adapt_steps(
    model: nn.Module,
    params: Params,
    buffers: Params,
    support: Split,
    *,
    steps: int,
    lr: LearningRate,
    first_order: bool,
    loss: Objective,
    adapted: Collection[str] | None = None,
    proximal: float = 0.0,
    per_step: Sequence[Params] | None = None,
    hypergradient: float = 0.0,
    trace: dict[str, list[Tensor]] | None = None,
    transform: Transform | None = None,
    reparametrize: Callable[[Params], Params] | None = None,
) -> Iterator[Params]:
    """Yield the fast parameters before and after each of `steps` SGD steps on the support loss.

    `adapted` names the parameters that move (None: all); the others enter the forward pass
    unchanged. `proximal` adds lambda/2 * ||phi - theta||^2 around the (detached) starting point.
    `per_step[s]` overrides some parameters in the forward pass of step s (MAML++'s per-step
    BatchNorm weights). `hypergradient` (beta > 0) moves a scalar rate by beta times the dot
    product of consecutive inner gradients before each step after the first (SGD-HD); with a
    `trace` dict, the rate each step used is appended to trace["lr"] (a caller under vmap reads
    it inside its mapped function). `transform(grads, step)`: the step's directions instead of
    the gradients; forward passes see `reparametrize(params)`, the yielded dicts every parameter.
    """
    names = list(params) if adapted is None else [k for k in params if k in adapted]
    anchor = {k: params[k].detach() for k in names} if proximal else {}

    def support_loss(moving: Params, fixed: Params) -> Tensor:
        weights = {**fixed, **moving}
        weights = weights if reparametrize is None else reparametrize(weights)
        value = loss(functional_call(model, (weights, buffers), (support.x,)), support.y)
        if proximal:
            distance = sum(((moving[k] - anchor[k]) ** 2).sum() for k in names)
            value = value + 0.5 * proximal * distance
        return value

    yield params
    rate, last = None, None  # hypergradient descent's rate and last gradient
    for step in range(steps):
        moving = {k: params[k] for k in names}
        overrides = {} if per_step is None else per_step[min(step, len(per_step) - 1)]
        fixed = {**{k: v for k, v in params.items() if k not in moving}, **overrides}
        grads = torch.func.grad(support_loss)(moving, fixed)
        if first_order:  # FOMAML: the inner gradient is a constant (Finn et al. 2017, section 5.2)
            grads = {k: g.detach() for k, g in grads.items()}
        if transform is not None:
            grads = transform(grads, step)
        sizes = {k: step_size(lr, step, k) for k in names}
        if hypergradient:  # one rate, from lr at the first step, then by its hypergradient
            rate = sizes[names[0]] if last is None else rate + hypergradient * dot(grads, last)
            last, sizes = grads, dict.fromkeys(names, rate)
            if trace is not None:
                trace.setdefault("lr", []).append(torch.as_tensor(rate))
        params = {**params, **{k: moving[k] - sizes[k] * grads[k] for k in names}}
        yield params


def adapt(model: nn.Module, params: Params, buffers: Params, support: Split, **options) -> Params:
    """Take `steps` SGD steps on the support loss; return the adapted (fast) parameters.

    The keyword options are those of `adapt_steps`.
    """
    *_, fast_params = adapt_steps(model, params, buffers, support, **options)
    return fast_params
