"""One meta-update of MAML++ as AntreasAntoniou/HowToTrainYourMAMLPytorch performs it
(few_shot_learning_system.py: forward, apply_inner_loop_update, get_per_step_loss_importance_vector,
meta_update; inner_loop_optimizers.py: LSLRGradientDescentLearningRule; meta_neural_network_
architectures.py: per-step BatchNorm weights), transcribed in plain PyTorch.

The network is a conv4 (conv, BatchNorm always in training mode, ReLU; stride-2 convolutions and
a spatial mean, as metalearn's Omniglot conv4) written out with functional ops so that inner-loop
weights and per-step BatchNorm weights can be passed in, as their MetaConvNormLayerReLU does.
Per task: the inner-loop weights are every parameter but the BatchNorm ones; inner step s takes
the support loss with the BatchNorm weights of step s and updates w <- w - lr[w][s] * grad
(create_graph for second order); with the multi-step loss the target loss after step s (BatchNorm
weights of step s) is weighted by the importance vector, else only the last one counts; a task's
loss is the sum over its steps, the meta-batch's the mean over tasks, stepped by Adam.
"""

import torch
import torch.nn.functional as F


def importance_vector(steps: int, epoch: int, msl_epochs: int) -> list[float]:
    weights = [1.0 / steps] * steps
    decay = 1.0 / steps / msl_epochs
    min_value = 0.03 / steps
    for i in range(steps - 1):
        weights[i] = max(weights[i] - epoch * decay, min_value)
    weights[-1] = min(weights[-1] + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * min_value)
    return weights


def conv4_forward(x, weights, norm, step, blocks=4):
    """Their classifier.forward(x, params=weights, training=True, num_step=step)."""
    h = x
    for i in range(blocks):
        conv, bn = f"features.{3 * i}", f"features.{3 * i + 1}"
        h = F.conv2d(h, weights[f"{conv}.weight"], weights[f"{conv}.bias"], stride=2, padding=1)
        h = F.batch_norm(
            h,
            None,
            None,
            norm[f"{bn}.weight"][step],
            norm[f"{bn}.bias"][step],
            training=True,
            eps=1e-5,
        )
        h = F.relu(h)
    return F.linear(h.mean(dim=(2, 3)), weights["head.weight"], weights["head.bias"])


def mamlpp_meta_update(
    weights, norm, lrs, tasks, *, steps, epoch, msl_epochs, second_order, outer_lr, use_msl=True
):
    """weights: the non-BatchNorm parameters; norm: per-step BatchNorm weights (steps, C);
    lrs: per-parameter per-step step sizes (steps,). All leaf tensors, updated in place by one
    Adam step; returns their gradients by name ('bn.' and 'lr.' before the last two kinds)."""
    optimizer = torch.optim.Adam([*weights.values(), *norm.values(), *lrs.values()], lr=outer_lr)
    vector = importance_vector(steps, epoch, msl_epochs)
    total_losses = []
    for sx, sy, qx, qy in tasks:
        fast, task_losses = dict(weights), []
        for s in range(steps):
            support_loss = F.cross_entropy(conv4_forward(sx, fast, norm, s), sy)
            grads = torch.autograd.grad(
                support_loss, list(fast.values()), create_graph=second_order
            )
            fast = {k: w - lrs[k][s] * g for (k, w), g in zip(fast.items(), grads, strict=True)}
            if use_msl and epoch < msl_epochs:
                target_loss = F.cross_entropy(conv4_forward(qx, fast, norm, s), qy)
                task_losses.append(vector[s] * target_loss)
            elif s == steps - 1:
                task_losses.append(F.cross_entropy(conv4_forward(qx, fast, norm, s), qy))
        total_losses.append(torch.sum(torch.stack(task_losses)))
    loss = torch.mean(torch.stack(total_losses))
    optimizer.zero_grad()
    loss.backward()
    grads = {
        f"{prefix}{k}": p.grad.clone()
        for prefix, group in (("", weights), ("bn.", norm), ("lr.", lrs))
        for k, p in group.items()
    }
    optimizer.step()
    return grads
