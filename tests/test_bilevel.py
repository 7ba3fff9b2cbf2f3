"""The functional inner loop and MAML's meta-gradient against hand-written references (float64)."""

import pytest
import torch
import torch.nn.functional as F

from metalearn.algos.bilevel.inner import adapt
from metalearn.algos.bilevel.maml import MAML, MAMLConfig
from metalearn.data.tasks import Split, TaskBatch
from metalearn.models.conv4 import Conv4, Conv4Config
from metalearn.models.mlp import MLP, MLPConfig

WAYS, TASKS = 3, 4


pytestmark = pytest.mark.usefixtures("float64")  # conftest: float64 by default


def tiny_conv(fused: bool = False, seed: int = 0) -> Conv4:
    """A conv4 with BatchNorm, small enough for finite differences: 4 filters, 8x8 inputs."""
    torch.manual_seed(seed)
    return Conv4(Conv4Config(hidden=4, downsample="stride"), (1, 8, 8), WAYS, fused_batchnorm=fused)


def image_tasks(seed: int = 1) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    shots, query = 2, 2
    y = torch.arange(WAYS).repeat_interleave(shots).expand(TASKS, -1)
    qy = torch.arange(WAYS).repeat_interleave(query).expand(TASKS, -1)
    return TaskBatch(
        support=Split(torch.randn(TASKS, WAYS * shots, 1, 8, 8, generator=g), y.clone()),
        query=Split(torch.randn(TASKS, WAYS * query, 1, 8, 8, generator=g), qy.clone()),
        ways=WAYS,
    )


def maml(model, steps=2, first_order=False, batching="vmap", lr=0.3) -> MAML:
    cfg = MAMLConfig(inner_lr=lr, inner_steps=steps, first_order=first_order)
    return MAML(cfg, model, "classification", batching)


def meta_grad(algo: MAML, batch: TaskBatch) -> torch.Tensor:
    algo.model.zero_grad()
    loss, _ = algo.meta_loss(batch)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in algo.model.parameters()])


def reference_meta_grad(model, batch: TaskBatch, steps: int, lr: float, first_order: bool):
    """Hand-written MAML: a per-task autograd loop with torch.autograd.grad, module forward."""
    names = [n for n, _ in model.named_parameters()]
    theta = list(model.parameters())
    total = 0.0
    for t in range(batch.tasks):
        fast = theta
        for _ in range(steps):
            with torch.nn.utils.stateless._reparametrize_module(
                model, dict(zip(names, fast, strict=True))
            ):
                inner = F.cross_entropy(model(batch.support.x[t]), batch.support.y[t])
            grads = torch.autograd.grad(inner, fast, create_graph=not first_order)
            fast = [p - lr * g for p, g in zip(fast, grads, strict=True)]
        with torch.nn.utils.stateless._reparametrize_module(
            model, dict(zip(names, fast, strict=True))
        ):
            total = total + F.cross_entropy(model(batch.query.x[t]), batch.query.y[t])
    grads = torch.autograd.grad(total / batch.tasks, theta)
    return torch.cat([g.flatten() for g in grads])


def test_adapt_equals_hand_written_sgd():
    torch.manual_seed(0)
    model = MLP(MLPConfig(hidden_sizes=[8, 8]), (1,), 1)
    x, y = torch.randn(10, 1), torch.randn(10, 1)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    fast = adapt(
        model, params, {}, Split(x, y), steps=3, lr=0.05, first_order=False, loss=F.mse_loss
    )
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for _ in range(3):
        h = torch.relu(x @ reference[0].T + reference[1])
        h = torch.relu(h @ reference[2].T + reference[3])
        loss = F.mse_loss(h @ reference[4].T + reference[5], y)
        grads = torch.autograd.grad(loss, reference)
        reference = [
            (p - 0.05 * g).detach().requires_grad_() for p, g in zip(reference, grads, strict=True)
        ]
    for got, want in zip(fast.values(), reference, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_equals_per_task_autograd_loop(first_order):
    model, batch = tiny_conv(), image_tasks()
    got = meta_grad(maml(model, first_order=first_order), batch)
    want = reference_meta_grad(model, batch, steps=2, lr=0.3, first_order=first_order)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_vmapped_meta_loss_and_gradient_equal_python_loop_over_tasks():
    model, batch = tiny_conv(), image_tasks()
    loss_v, _ = maml(model, batching="vmap").meta_loss(batch)
    loss_l, _ = maml(model, batching="loop").meta_loss(batch)
    torch.testing.assert_close(loss_v, loss_l, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        meta_grad(maml(model, batching="vmap"), batch),
        meta_grad(maml(model, batching="loop"), batch),
        rtol=1e-10,
        atol=1e-12,
    )


def test_second_order_meta_gradient_matches_central_finite_differences():
    """With BatchNorm under vmap: the trap that native F.batch_norm falls into (see layers.py)."""
    model, batch = tiny_conv(), image_tasks()
    algo = maml(model)
    grad = meta_grad(algo, batch)
    params = list(model.parameters())
    flat = torch.cat([p.detach().flatten() for p in params])
    g = torch.Generator().manual_seed(3)
    coordinates = torch.randperm(flat.numel(), generator=g)[:12]
    eps = 1e-6
    for i in coordinates.tolist():
        values = []
        for sign in (1, -1):
            shifted = flat.clone()
            shifted[i] += sign * eps
            torch.nn.utils.vector_to_parameters(shifted, params)
            with torch.no_grad():
                values.append(algo.meta_loss(batch)[0].item())
        torch.nn.utils.vector_to_parameters(flat, params)
        numeric = (values[0] - values[1]) / (2 * eps)
        assert abs(numeric - grad[i].item()) <= 1e-6 + 1e-5 * abs(numeric), (i, numeric, grad[i])


def test_gradcheck_of_the_meta_loss_with_respect_to_the_head():
    model, batch = tiny_conv(), image_tasks()
    algo = maml(model, steps=1)
    head = model.head.weight

    def meta_loss(weight: torch.Tensor) -> torch.Tensor:
        with torch.nn.utils.stateless._reparametrize_module(model, {"head.weight": weight}):
            return algo.meta_loss(batch)[0]

    assert torch.autograd.gradcheck(meta_loss, (head.detach().clone().requires_grad_(),))


def test_fomaml_gradient_is_the_query_gradient_at_the_detached_adapted_parameters():
    model, batch = tiny_conv(), image_tasks()
    got = meta_grad(maml(model, first_order=True), batch)
    names = [n for n, _ in model.named_parameters()]
    total = torch.zeros_like(got)
    for t in range(batch.tasks):
        params = {k: v.detach() for k, v in model.named_parameters()}
        fast = adapt(
            model,
            params,
            {},
            Split(batch.support.x[t], batch.support.y[t]),
            steps=2,
            lr=0.3,
            first_order=True,
            loss=F.cross_entropy,
        )
        fast = [fast[n].detach().requires_grad_() for n in names]
        with torch.nn.utils.stateless._reparametrize_module(
            model, dict(zip(names, fast, strict=True))
        ):
            loss = F.cross_entropy(model(batch.query.x[t]), batch.query.y[t])
        total += torch.cat([g.flatten() for g in torch.autograd.grad(loss, fast)])
    torch.testing.assert_close(got, total / batch.tasks, rtol=1e-10, atol=1e-12)
    second = meta_grad(maml(model, first_order=False), batch)
    assert not torch.allclose(got, second, rtol=1e-3), "second-order terms should matter here"


def test_meta_gradients_reach_every_initial_weight():
    model, batch = tiny_conv(), image_tasks()
    maml(model).meta_loss(batch)[0].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_evaluate_reports_the_loss_after_each_number_of_steps():
    model, batch = tiny_conv(), image_tasks()
    algo = maml(model, steps=1, lr=0.3)
    out = algo.evaluate(batch, [3, 0, 1])
    assert out["loss"].shape == (TASKS, 3)
    for column, steps in enumerate([3, 0, 1]):
        for t in range(TASKS):
            params = {k: v.detach() for k, v in model.named_parameters()}
            fast = adapt(
                model,
                params,
                {},
                Split(batch.support.x[t], batch.support.y[t]),
                steps=steps,
                lr=0.3,
                first_order=True,
                loss=F.cross_entropy,
            )
            want = F.cross_entropy(
                torch.func.functional_call(model, fast, (batch.query.x[t],)), batch.query.y[t]
            )
            torch.testing.assert_close(out["loss"][t, column], want)


def test_fused_batchnorm_equals_primitive_batchnorm_forward():
    x = torch.randn(6, 1, 8, 8)
    torch.testing.assert_close(tiny_conv(fused=True)(x), tiny_conv(fused=False)(x))


def test_native_batchnorm_under_vmap_gives_wrong_second_order_gradients():
    """Why TaskBatchNorm2d exists: if torch fixes this, the primitive fallback can go."""
    model, batch = tiny_conv(fused=True), image_tasks()
    vmapped = meta_grad(maml(model, batching="vmap"), batch)
    looped = meta_grad(maml(model, batching="loop"), batch)
    assert (vmapped - looped).norm() / looped.norm() > 1e-4
