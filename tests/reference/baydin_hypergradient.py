"""The hypergradient optimisers as gbaydin/hypergradient-descent (hypergrad/sgd_hd.py,
hypergrad/adam_hd.py) step them, on plain tensors; written from reading that code, none copied.

SGD-HD works on one flat vector of all gradients: the rate moves by beta times the dot product of
the new gradient with the last step's direction, then the (momentum or Nesterov) step is taken.
Adam-HD loops over tensors and moves the rate inside that loop, tensor by tensor, using the
previous step's moments with its own bias corrections; its Adam step is the pre-1.0 PyTorch form
lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps).
"""

import math

import torch


def sgd_hd_steps(params, grads_per_step, lr, beta, momentum=0.0, nesterov=False):
    """Step a list of tensors through each list of gradients; return (params, rates)."""
    params = [p.clone() for p in params]
    direction_prev = None
    buffer = None
    rates = []
    for grads in grads_per_step:
        g = torch.cat([x.flatten() for x in grads])
        if direction_prev is None:
            direction_prev = torch.zeros_like(g)
        lr = lr + beta * float(torch.dot(g, direction_prev))
        if momentum:
            buffer = g.clone() if buffer is None else buffer * momentum + g
            g = g + momentum * buffer if nesterov else buffer
        direction_prev = g
        offset = 0
        for p in params:
            p -= lr * g[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        rates.append(lr)
    return params, rates


def adam_hd_steps(params, grads_per_step, lr, beta, betas=(0.9, 0.999), eps=1e-8):
    """The same for Adam-HD, tensor by tensor as the reference does."""
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    b1, b2 = betas
    rates = []
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            if t > 1:
                c1, c2 = 1 - b1 ** (t - 1), 1 - b2 ** (t - 1)
                u = m[i] / (v[i].sqrt() + eps)
                lr = lr + beta * float(torch.dot(g.flatten(), u.flatten())) * math.sqrt(c2) / c1
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
            params[i] = params[i] - size * m[i] / (v[i].sqrt() + eps)
        rates.append(lr)
    return params, rates
