"""metalearn's meta-updates under the reference preset equal transcriptions of the authors' code
(float64, a tiny conv4 with BatchNorm, to 1e-10); see README.md in this folder."""

import copy

import pytest
import torch
from imaml_dev import imaml_meta_update
from test_bilevel import image_tasks, tiny_conv

from metalearn.algos import ALGOS
from metalearn.train import outer_optimizer

pytestmark = pytest.mark.usefixtures("float64")


def per_task(batch) -> list[tuple[torch.Tensor, ...]]:
    s, q = batch.support, batch.query
    return [(s.x[t], s.y[t], q.x[t], q.y[t]) for t in range(batch.tasks)]


def one_update(algo, cfg, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """metalearn's training step: (the gradient the outer optimiser receives, new weights)."""
    optimizer = outer_optimizer(cfg, algo)
    objective, _ = algo.meta_loss(batch)
    optimizer.zero_grad()
    objective.backward()
    grad = torch.cat([p.grad.flatten() for p in algo.model.parameters()])
    optimizer.step()
    return grad, torch.cat([p.detach().flatten() for p in algo.model.parameters()])


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_imaml_meta_update_is_imaml_devs(batching):
    config_cls, algo_cls = ALGOS["imaml"]
    cfg = config_cls(inner_lr=0.3, inner_steps=3, lam=2.0, cg_steps=4, outer_lr=0.01)
    model, batch = tiny_conv(), image_tasks()
    reference_model = copy.deepcopy(model)
    grad, weights = one_update(algo_cls(cfg, model, "classification", batching), cfg, batch)

    ref_grad, ref_weights = imaml_meta_update(
        reference_model,
        per_task(batch),
        inner_lr=0.3,
        n_steps=3,
        lam=2.0,
        cg_steps=4,
        outer_lr=0.01,
    )
    assert ref_grad.abs().max() > 1e-3
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-10)
    # the update moved the weights: equality is not that of two no-ops
    assert (weights - torch.cat([p.flatten() for p in tiny_conv().parameters()])).abs().max() > 1e-3
