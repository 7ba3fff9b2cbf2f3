"""One meta-update of iMAML as aravindr93/imaml_dev performs it (examples/omniglot_implicit_maml.py,
implicit_maml/learner_model.py, implicit_maml/utils.py), transcribed in plain PyTorch.

Per task: copy the meta-weights into a fast network, take `n_steps` steps of torch.optim.SGD on
the training loss alone, then one SGD step on the regularisation loss 0.5 * lam * |w - w_k|^2
(the "pull back"); take the gradient of the validation loss there and solve
((1 + regu_coef) I + H / (lam + lam_damping)) x = g by conjugate gradient (`cg_solve`: x = 0,
at most `cg_iters` iterations, early exit once r.r < 1e-10), H the Hessian of the training loss.
The meta-gradient is the mean of x over tasks, applied by Adam(lr, eps=1e-3).
"""

import copy

import torch
from torch import nn


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.data.view(-1) for p in model.parameters()]).clone()


def set_flat_params(model: nn.Module, values: torch.Tensor) -> None:
    offset = 0
    for p in model.parameters():
        p.data.copy_(values[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def flat_grad(loss: torch.Tensor, model: nn.Module, create_graph: bool = False) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=create_graph)
    return torch.cat([g.contiguous().view(-1) for g in grads])


def cg_solve(f_ax, b: torch.Tensor, cg_iters: int, residual_tol: float = 1e-10) -> torch.Tensor:
    x = torch.zeros_like(b)
    r = b - f_ax(x)
    p = r.clone()
    for _ in range(cg_iters):
        rdotr = r.dot(r)
        ap = f_ax(p)
        alpha = rdotr / p.dot(ap)
        x = x + alpha * p
        r = r - alpha * ap
        newrdotr = r.dot(r)
        p = r + (newrdotr / rdotr) * p
        if newrdotr < residual_tol:
            break
    return x


def imaml_meta_update(
    model: nn.Module,
    tasks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    inner_lr: float,
    n_steps: int,
    lam: float,
    cg_steps: int,
    outer_lr: float,
    regu_coef: float = 1.0,
    lam_damping: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (meta-gradient, meta-weights after the Adam step), both flat; `model` is left
    with the new meta-weights. tasks: (x_train, y_train, x_val, y_val) per task."""
    loss_function = nn.CrossEntropyLoss()
    outer_opt = torch.optim.Adam(model.parameters(), lr=outer_lr, eps=1e-3)
    fast = copy.deepcopy(model)
    inner_opt = torch.optim.SGD(fast.parameters(), lr=inner_lr)
    w_k = flat_params(model)
    meta_grad = torch.zeros_like(w_k)
    for x_train, y_train, x_val, y_val in tasks:
        set_flat_params(fast, w_k.clone())
        for _ in range(n_steps):
            inner_opt.zero_grad()
            loss_function(fast(x_train), y_train).backward()
            inner_opt.step()
        inner_opt.zero_grad()  # pull back: one SGD step on the regularisation loss
        delta = torch.cat([p.view(-1) for p in fast.parameters()]) - w_k
        (0.5 * lam * torch.sum(delta**2)).backward()
        inner_opt.step()

        valid_grad = flat_grad(loss_function(fast(x_val), y_val), fast)

        def evaluator(v: torch.Tensor, x=x_train, y=y_train) -> torch.Tensor:
            grad = flat_grad(loss_function(fast(x), y), fast, create_graph=True)
            hvp = flat_grad(torch.sum(grad * v), fast)
            return (1.0 + regu_coef) * v + hvp / (lam + lam_damping)

        meta_grad += cg_solve(evaluator, valid_grad, cg_steps) / len(tasks)
    offset = 0
    for p in model.parameters():  # outer_step_with_grad
        p.grad = meta_grad[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    outer_opt.step()
    return meta_grad, flat_params(model)
