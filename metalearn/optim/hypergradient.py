"""Hypergradient descent (Baydin et al. 2018, "Online learning rate adaptation with
hypergradient descent"): the learning rate follows its own gradient, online, at the cost of one
dot product per step.

With the step theta_t = theta_{t-1} - alpha * d_{t-1} (d: the update direction for a unit rate),
d f(theta_t) / d alpha = -g_t . d_{t-1}, so the rate descends it as

    alpha <- alpha + beta * g_t . d_{t-1}                      (beta: `hypergrad_lr`)

before the step uses it: d is the gradient for SGD-HD, the momentum or Nesterov direction for
SGDN-HD, and Adam's bias-corrected m / (sqrt(v) + eps) for Adam-HD.

One rate per optimiser, updated once per step from the dot product summed over every tensor, as
the paper defines it. The authors' Adam-HD (gbaydin/hypergradient-descent, hypergrad/adam_hd.py)
updates the rate inside its loop over tensors, so each tensor sees a rate changed by the tensors
before it; `tests/reference/test_hypergradient_reference.py` shows both agree for one tensor and
differ for several. The rate may turn negative (the paper observes it does, briefly, early in
training); it is never clipped, and the trainer logs it as `train/outer_lr`.

Adam-HD's step is torch.optim.Adam's (same operations, same order): with `hypergrad_lr=0` it is
Adam, and SGD-HD is torch.optim.SGD, to the last bit (tests/test_hypergradient.py). Reading the
summed dot product costs one host synchronisation per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

# the authors' experiments (run.sh): beta 1e-3 for SGD-HD and SGDN-HD, 1e-7 for Adam-HD
DEFAULT_HYPERGRAD_LR = {"sgd_hd": 1e-3, "sgdn_hd": 1e-3, "adam_hd": 1e-7}


def _check(lr: float, hypergrad_lr: float, params: list) -> None:
    if not 0 < lr < math.inf:
        raise ValueError(
            f"the initial learning rate must be positive and finite, got {lr} (hypergradient "
            f"descent may drive it negative later; it must not start there)"
        )
    if not 0 <= hypergrad_lr < math.inf:
        raise ValueError(f"hypergrad_lr must be >= 0 and finite, got {hypergrad_lr}")
    if params and isinstance(params[0], dict) and len(params) > 1:
        raise ValueError(
            "a hypergradient optimiser learns one rate for all parameters: pass one parameter "
            "group, not several"
        )


def _gradients(group: dict) -> list[tuple[Tensor, Tensor]]:
    """(parameter, gradient plus weight decay) for each parameter of the group with a gradient."""
    decay = group["weight_decay"]
    return [
        (p, p.grad.add(p, alpha=decay) if decay else p.grad)
        for p in group["params"]
        if p.grad is not None
    ]


def _closure_loss(closure: Callable[[], Tensor] | None) -> Tensor | None:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class SGDHD(torch.optim.Optimizer):
    """SGD-HD, or SGDN-HD with `momentum` and `nesterov=True`: torch.optim.SGD (no dampening)
    whose learning rate descends its hypergradient."""

    def __init__(
        self,
        params: Iterable,
        lr: float,
        *,
        hypergrad_lr: float = DEFAULT_HYPERGRAD_LR["sgd_hd"],
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        params = list(params)
        _check(lr, hypergrad_lr, params)
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum (SGDN-HD) needs momentum > 0")
        defaults = dict(
            lr=lr,
            hypergrad_lr=hypergrad_lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = _closure_loss(closure)
        group = self.param_groups[0]
        momentum, nesterov = group["momentum"], group["nesterov"]
        pairs = _gradients(group)
        previous = [self.state[p].get("direction") for p, _ in pairs]
        if all(d is not None for d in previous) and previous:
            h = sum(torch.sum(g * d) for (_, g), d in zip(pairs, previous, strict=True))
            group["lr"] += group["hypergrad_lr"] * float(h)
        for p, g in pairs:
            state = self.state[p]
            if momentum:
                if "momentum_buffer" not in state:
                    buf = state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    buf = state["momentum_buffer"]
                    buf.mul_(momentum).add_(g)
                g = g.add(buf, alpha=momentum) if nesterov else buf
            state["direction"] = g.clone()
            p.add_(g, alpha=-group["lr"])
        return loss


class AdamHD(torch.optim.Optimizer):
    """Adam-HD: torch.optim.Adam whose learning rate descends its hypergradient, the dot product
    of the new gradient with the last step's direction m_hat / (sqrt(v_hat) + eps)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        *,
        hypergrad_lr: float = DEFAULT_HYPERGRAD_LR["adam_hd"],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        params = list(params)
        _check(lr, hypergrad_lr, params)
        defaults = dict(
            lr=lr, hypergrad_lr=hypergrad_lr, betas=betas, eps=eps, weight_decay=weight_decay
        )
        super().__init__(params, defaults)

    def _denominator(self, v: Tensor, step: int) -> Tensor:
        group = self.param_groups[0]
        correction2 = 1 - group["betas"][1] ** step
        return (v.sqrt() / math.sqrt(correction2)).add_(group["eps"])

    def _direction(self, p: Tensor, step: int) -> Tensor:
        """The step's direction for a unit rate after `step` steps: m_hat / (sqrt(v_hat) + eps)."""
        state, beta1 = self.state[p], self.param_groups[0]["betas"][0]
        return state["exp_avg"] / self._denominator(state["exp_avg_sq"], step) / (1 - beta1**step)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = _closure_loss(closure)
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        pairs = _gradients(group)
        steps = {self.state[p].get("step", 0) for p, _ in pairs}
        if len(steps) > 1:
            raise RuntimeError("Adam-HD: every parameter must get a gradient at every step")
        done = steps.pop() if steps else 0
        if done > 0:  # the hypergradient against the last step's direction (for a unit rate)
            h = sum(torch.sum(g * self._direction(p, done)) for p, g in pairs)
            group["lr"] += group["hypergrad_lr"] * float(h)
        step = done + 1
        for p, g in pairs:
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] = step
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g.conj(), value=1 - beta2)
            p.addcdiv_(m, self._denominator(v, step), value=-group["lr"] / (1 - beta1**step))
        return loss
