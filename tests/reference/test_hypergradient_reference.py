"""SGD-HD, SGDN-HD and Adam-HD against transcriptions of the authors' optimisers (float64).

SGD-HD and SGDN-HD equal the reference on several tensors. Adam-HD equals it on one tensor with
eps = 0 (the reference's Adam puts eps outside the bias correction of v); on several tensors the
reference moves the rate between tensors within one step, which the paper's rule does not, and
the test shows the two then part."""

import pytest
import torch
from baydin_hypergradient import adam_hd_steps, sgd_hd_steps

from metalearn.optim import SGDHD, AdamHD

pytestmark = pytest.mark.usefixtures("float64")


def gradients(shapes, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    draw = lambda shape: torch.randn(shape, generator=g, dtype=torch.float64)  # noqa: E731
    return [[draw(s) for s in shapes] for _ in range(steps)]


def run(optimizer_cls, params, grads_per_step, **kwargs):
    params = [p.clone().requires_grad_() for p in params]
    optimizer = optimizer_cls(params, **kwargs)
    rates = []
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
        rates.append(optimizer.param_groups[0]["lr"])
    return [p.detach() for p in params], rates


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_hd_equals_the_authors(momentum, nesterov):
    shapes = [(3, 4), (4,), (2, 2, 2)]
    start = [torch.randn(s, dtype=torch.float64) for s in shapes]
    grads = gradients(shapes, 6)
    ours, our_rates = run(
        SGDHD, start, grads, lr=0.05, hypergrad_lr=0.01, momentum=momentum, nesterov=nesterov
    )
    theirs, their_rates = sgd_hd_steps(start, grads, 0.05, 0.01, momentum, nesterov)
    torch.testing.assert_close(our_rates, their_rates, rtol=1e-12, atol=0)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_adam_hd_equals_the_authors_on_one_tensor():
    start = [torch.randn(5, 3, dtype=torch.float64)]
    grads = gradients([(5, 3)], 6)
    ours, our_rates = run(AdamHD, start, grads, lr=0.01, hypergrad_lr=1e-3, eps=0.0)
    theirs, their_rates = adam_hd_steps(start, grads, 0.01, 1e-3, eps=0.0)
    torch.testing.assert_close(our_rates, their_rates, rtol=1e-12, atol=0)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-12, atol=1e-14)


def test_the_authors_adam_hd_moves_the_rate_between_tensors():
    """Split one tensor in two: our steps do not change; theirs do, because their first half
    steps with a rate that has seen only its own half's hypergradient."""
    start = torch.randn(6, dtype=torch.float64)
    grads = gradients([(6,)], 4)
    split = [[g[:3], g[3:]] for (g,) in grads]
    kwargs = dict(lr=0.01, hypergrad_lr=1e-2, eps=0.0)
    (ours_whole,), _ = run(AdamHD, [start], grads, **kwargs)
    ours_split, _ = run(AdamHD, [start[:3], start[3:]], split, **kwargs)
    (theirs_whole,), _ = adam_hd_steps([start], grads, 0.01, 1e-2, eps=0.0)
    theirs_split, _ = adam_hd_steps([start[:3], start[3:]], split, 0.01, 1e-2, eps=0.0)
    torch.testing.assert_close(torch.cat(ours_split), ours_whole, rtol=1e-12, atol=1e-14)
    assert (torch.cat(theirs_split) - theirs_whole).abs().max() > 1e-8
