"""The one functional inner loop (`adapt`) shared by every gradient-based meta-learner."""

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.algos.objectives import Objective
from metalearn.data.tasks import Split

Params = dict[str, Tensor]


def adapt_steps(
    model: nn.Module,
    params: Params,
    buffers: Params,
    support: Split,
    *,
    steps: int,
    lr: float,
    first_order: bool,
    loss: Objective,
) -> Iterator[Params]:
    """Yield the fast parameters before and after each of `steps` SGD steps on the support loss.

    Inner update of Finn et al. (2017), eq. 1: phi <- phi - lr * grad L_support(phi). The gradient
    is taken with `torch.func.grad`, so it composes with `vmap` over tasks and with the outer
    autograd graph (second order unless `first_order`).
    """

    def support_loss(p: Params) -> Tensor:
        return loss(functional_call(model, (p, buffers), (support.x,)), support.y)

    yield params
    for _ in range(steps):
        grads = torch.func.grad(support_loss)(params)
        if first_order:  # FOMAML: the inner gradient is a constant (Finn et al. 2017, section 5.2)
            grads = {k: g.detach() for k, g in grads.items()}
        params = {k: p - lr * grads[k] for k, p in params.items()}
        yield params


def adapt(
    model: nn.Module,
    params: Params,
    buffers: Params,
    support: Split,
    *,
    steps: int,
    lr: float,
    first_order: bool,
    loss: Objective,
) -> Params:
    """Take `steps` SGD steps on the support loss; return the adapted (fast) parameters."""
    *_, fast_params = adapt_steps(
        model, params, buffers, support, steps=steps, lr=lr, first_order=first_order, loss=loss
    )
    return fast_params
