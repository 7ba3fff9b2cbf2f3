"""T-Net and MT-Net's meta-gradient, from the authors' code (yoonholee/MT-net, maml.py).

Their fully connected forward with T (`forward_fc_withT`): each layer's output times its T
matrix, h = relu((h W + b) T); their inner loop differentiates the loss with respect to the
weights and biases only (not T, not the mask logits), and with `use_M`/`share_M` multiplies
each layer's weight and bias gradients by one {0, 1} mask per output unit, drawn once per task
and used at every step. Written here for torch's layout (W is (out, in): h W^T), on a plain
per-task autograd loop with explicit T layers; the caller fixes the masks.
"""

import torch
import torch.nn.functional as F


def tnet_reference(model, maps: list[torch.Tensor], batch, masks=None, *, steps: int, lr: float):
    """T-Net written out as its authors' forward_fc_withT: h = relu(T (W h + b)) per layer, an
    explicit T after each layer; the inner loop a torch.autograd.grad loop on W and b only."""
    weights = [p for _, p in model.named_parameters()]  # W1, b1, W2, b2, W3, b3

    def forward(ws, x):
        h = x
        for i in range(0, len(ws), 2):
            h = (h @ ws[i].T + ws[i + 1]) @ maps[i // 2].T
            h = torch.relu(h) if i + 2 < len(ws) else h
        return h

    total = 0.0
    for t in range(batch.tasks):
        fast = weights
        for _ in range(steps):
            inner = F.cross_entropy(forward(fast, batch.support.x[t]), batch.support.y[t])
            gs = torch.autograd.grad(inner, fast, create_graph=True)
            if masks is not None:  # one mask per layer's output units, on W's rows and b
                gs = [g * masks[i // 2].view(-1, *[1] * (g.dim() - 1)) for i, g in enumerate(gs)]
            fast = [w - lr * g for w, g in zip(fast, gs, strict=True)]
        total = total + F.cross_entropy(forward(fast, batch.query.x[t]), batch.query.y[t])
    return torch.autograd.grad(total / batch.tasks, [*weights, *maps])
