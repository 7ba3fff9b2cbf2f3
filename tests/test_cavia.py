"""CAVIA (Zintgraf et al. 2019) against a hand-written autograd loop (float64): only the context
moves in the inner loop, FiLM follows the authors' block order, vmap equals the per-task loop,
it learns sinusoids from 10 points, and a context of size 0 is refused; sinusoid's grid test
points (CAVIA's protocol) leave MAML's episodes as they were."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_bilevel import image_tasks, tiny_conv

from metalearn.algos.bilevel.cavia import CAVIA, CAVIAConfig
from metalearn.data.sinusoid import SinusoidConfig, SinusoidTasks
from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError
from metalearn.models.context import CONTEXT, ContextNet
from metalearn.models.conv4 import Conv4, Conv4Config
from metalearn.models.mlp import MLP, Identity, IdentityConfig, MLPConfig

TASKS, CONTEXT_SIZE = 3, 4


def tiny_cavia(batching="vmap", steps=2, first_order=False, **options) -> CAVIA:
    torch.manual_seed(0)
    settings = {"grad_clip_value": None, **options}  # unclamped unless asked
    cfg = CAVIAConfig(
        inner_lr=0.5,
        inner_steps=steps,
        first_order=first_order,
        context_params=CONTEXT_SIZE,
        **settings,
    )
    return CAVIA(cfg, MLP(MLPConfig(hidden_sizes=[6, 5]), (1,), 1), "regression", batching)


def sinusoids(tasks=TASKS, seed=1) -> TaskBatch:
    family = SinusoidTasks(SinusoidConfig(), torch.device("cpu"))
    return family.sample("train", torch.Generator().manual_seed(seed), tasks, 1, 5, 7)


def meta_grads(algo: CAVIA, batch: TaskBatch) -> dict[str, torch.Tensor]:
    for p in algo.parameters():
        p.grad = None
    algo.meta_loss(batch)[0].backward()
    return {n: p.grad.clone() for n, p in algo.model.named_parameters()}


def hand_written(weights: list[torch.Tensor], batch: TaskBatch, steps, lr, first_order):
    """CAVIA as their regression/cavia.py writes it: a module-free MLP on [x, context], the
    context from zero by torch.autograd.grad, one task at a time."""
    w0, b0, w1, b1, w2, b2 = weights

    def net(x, context):
        h = torch.cat([x, context.expand(x.shape[0], -1)], dim=1)
        return F.linear(F.relu(F.linear(F.relu(F.linear(h, w0, b0)), w1, b1)), w2, b2)

    total, contexts, first_grads = 0.0, [], []
    for t in range(batch.tasks):
        context = torch.zeros(CONTEXT_SIZE, requires_grad=True)
        for step in range(steps):
            inner = F.mse_loss(net(batch.support.x[t], context), batch.support.y[t])
            (grad,) = torch.autograd.grad(inner, context, create_graph=not first_order)
            first_grads += [grad.detach()] if step == 0 else []
            context = context - lr * (grad.detach() if first_order else grad)
        contexts.append(context.detach())
        total = total + F.mse_loss(net(batch.query.x[t], context), batch.query.y[t])
    meta = torch.autograd.grad(total / batch.tasks, weights)
    return torch.stack(contexts), torch.stack(first_grads), meta


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("first_order", [False, True])
def test_context_and_meta_gradients_equal_a_hand_written_autograd_loop(first_order):
    algo, batch = tiny_cavia(first_order=first_order), sinusoids()
    weights = [p.detach().clone().requires_grad_() for p in algo.model.parameters()]
    contexts, first_grads, reference = hand_written(weights, batch, 2, 0.5, first_order)
    params, buffers = algo.params()
    for t in range(batch.tasks):
        support = Split(batch.support.x[t], batch.support.y[t])
        start, one, two = algo.trajectory(params, buffers, support, training=True)
        torch.testing.assert_close((start[CONTEXT] - one[CONTEXT]) / 0.5, first_grads[t])
        torch.testing.assert_close(two[CONTEXT], contexts[t], rtol=1e-12, atol=1e-12)
    mine = meta_grads(algo, batch)
    assert len(mine) == len(reference) == 6
    for (name, grad), expected in zip(mine.items(), reference, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.usefixtures("float64")
def test_the_inner_loop_moves_the_context_only_and_the_context_is_not_meta_learned():
    algo, batch = tiny_cavia(steps=3), sinusoids()
    params, buffers = algo.params()
    support = Split(batch.support.x[0], batch.support.y[0])
    trajectory = list(algo.trajectory(params, buffers, support, training=True))
    assert len(trajectory) == 4 and not trajectory[0][CONTEXT].any()
    for before, after in zip(trajectory, trajectory[1:], strict=False):
        assert all(after[k] is params[k] for k in params if k != CONTEXT)  # the very tensors
        assert not torch.equal(after[CONTEXT], before[CONTEXT])
    assert CONTEXT not in dict(algo.model.named_parameters())
    assert all(p is not algo.model.context for p in algo.parameters())
    meta_grads(algo, batch)
    assert not algo.model.context.any()  # every task starts from zero, also after training
    assert CONTEXT not in algo.state_dict()["model"]


@pytest.mark.usefixtures("float64")
def test_vmap_equals_the_per_task_loop_in_training_and_evaluation():
    batch = sinusoids(tasks=4)
    vmapped, looped = tiny_cavia(), tiny_cavia(batching="loop")
    for name, grad in meta_grads(vmapped, batch).items():
        torch.testing.assert_close(grad, meta_grads(looped, batch)[name], rtol=1e-10, atol=1e-12)
    out_vmap, out_loop = vmapped.evaluate(batch, [0, 1, 4]), looped.evaluate(batch, [0, 1, 4])
    torch.testing.assert_close(out_vmap["loss"], out_loop["loss"], rtol=1e-10, atol=1e-12)
    assert out_vmap["loss"].shape == (4, 3)
    assert (out_vmap["loss"][:, 0] != out_vmap["loss"][:, 1]).all()  # steps move the context


@pytest.mark.usefixtures("float64")
def test_the_meta_gradient_is_clamped_elementwise_as_theirs():
    batch = sinusoids()
    free = meta_grads(tiny_cavia(), batch)
    bound = 0.5 * min(g.abs().max().item() for g in free.values())
    clamped = meta_grads(tiny_cavia(grad_clip_value=bound), batch)
    for name, grad in free.items():
        torch.testing.assert_close(clamped[name], grad.clamp(-bound, bound), msg=name)
        assert (grad.abs() > bound).any()  # the bound binds somewhere in every tensor


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("downsample", ["maxpool", "stride"])
def test_film_scales_and_shifts_one_block_after_batchnorm_and_pooling_before_relu(downsample):
    """Their CondConvNet's order: conv, BN, max-pool, gamma * h + beta, ReLU in the FiLM'd
    block (gamma may be negative, so pooling before FiLM matters)."""
    torch.manual_seed(0)
    net = Conv4(Conv4Config(hidden=4, downsample=downsample), (1, 16, 16), 3)
    wrapped = ContextNet(net, CONTEXT_SIZE, film_block=2)
    context = torch.randn(CONTEXT_SIZE)
    wrapped.context.copy_(context)
    x = torch.randn(6, 1, 16, 16)
    film = wrapped.film.weight @ context + wrapped.film.bias
    gamma, beta = film[:4].view(1, -1, 1, 1), film[4:].view(1, -1, 1, 1)
    assert (gamma < 0).any()
    h, layers = x, list(net.features)
    size = 4 if downsample == "maxpool" else 3  # conv, BN, ReLU[, max-pool] per block
    blocks = [layers[i : i + size] for i in range(0, len(layers), size)]
    assert len(blocks) == 4
    for b, block in enumerate(blocks):
        conv, norm, relu, *pool = block
        h = norm(conv(h))
        h = pool[0](h) if pool else h
        h = relu(gamma * h + beta if b == 1 else h)
    z = h.mean(dim=(2, 3)) if downsample == "stride" else h.flatten(1)
    torch.testing.assert_close(wrapped(x), net.head(z), rtol=1e-12, atol=1e-12)
    bound = math.sqrt(3 / CONTEXT_SIZE)  # Kaiming-uniform with a linear gain, as theirs
    assert wrapped.film.weight.abs().max() <= bound


def test_cavia_learns_sinusoids_from_ten_points_with_five_context_values():
    """300 meta-batches of 10 (about 2 s): one step on the context brings the MSE on 100 grid
    points far below that of the best function that does not adapt (about 2.9)."""
    torch.manual_seed(0)
    cfg = CAVIAConfig(context_params=5, outer_lr=0.01)
    algo = CAVIA(cfg, MLP(MLPConfig(hidden_sizes=[40, 40]), (1,), 1), "regression", "vmap")
    family = SinusoidTasks(SinusoidConfig(test_points="grid"), torch.device("cpu"))
    optimizer, generator = torch.optim.Adam(algo.parameters(), 0.01), torch.Generator()
    generator.manual_seed(0)
    for _ in range(300):
        optimizer.zero_grad()
        algo.meta_loss(family.sample("train", generator, 10, 1, 10, 10))[0].backward()
        optimizer.step()
    test = next(family.episodes("test", 200, 1, 10, 100, seed=5, batch_size=200))
    mse = algo.evaluate(test, [0, 1])["loss"].mean(0)
    assert mse[0] > 2.5 and mse[1] < 1.0, mse


def test_a_context_of_size_zero_and_an_unsupported_model_are_refused():
    with pytest.raises(ConfigError, match="context_params must be at least 1"):
        CAVIAConfig(context_params=0)
    with pytest.raises(ConfigError, match="at least one value"):
        ContextNet(MLP(MLPConfig(), (1,), 1), 0)
    with pytest.raises(ConfigError, match="model=mlp and model=conv4"):
        CAVIA(CAVIAConfig(), Identity(IdentityConfig(), (1,), 1), "regression", "vmap")
    with pytest.raises(ConfigError, match="film_block"):
        CAVIA(CAVIAConfig(film_block=5), tiny_conv(), "classification", "vmap")
    with pytest.raises(ConfigError, match="grad_clip_value"):
        CAVIAConfig(grad_clip_value=0.0)


def test_conv4_cavia_trains_and_evaluates_with_film():
    algo = CAVIA(CAVIAConfig(inner_steps=2), tiny_conv(), "classification", "loop")
    batch = image_tasks()
    loss, _ = algo.meta_loss(batch)
    loss.backward()
    assert algo.model.film.weight.grad.abs().sum() > 0  # FiLM's weights are meta-learned
    assert algo.evaluate(batch, [0, 2])["logits"].shape == (batch.tasks, 2, 6, 3)


def test_grid_test_points_are_cavias_and_leave_training_and_default_episodes_alone():
    grid = SinusoidTasks(SinusoidConfig(test_points="grid"), torch.device("cpu"))
    plain = SinusoidTasks(SinusoidConfig(), torch.device("cpu"))
    test = next(grid.episodes("test", 4, 1, 10, 100, seed=3, batch_size=4))
    torch.testing.assert_close(test.query.x[:, :, 0], torch.linspace(-5, 5, 100).expand(4, -1))
    amplitude, phase = test.info["amplitude"].view(-1, 1, 1), test.info["phase"].view(-1, 1, 1)
    torch.testing.assert_close(test.query.y, amplitude * torch.sin(test.query.x - phase))
    random = next(plain.episodes("test", 4, 1, 10, 100, seed=3, batch_size=4))
    torch.testing.assert_close(random.info["amplitude"], test.info["amplitude"])
    for split in ("train", "val"):
        a = grid.sample(split, torch.Generator().manual_seed(0), 5, 1, 10, 10)
        b = plain.sample(split, torch.Generator().manual_seed(0), 5, 1, 10, 10)
        assert torch.equal(a.query.x, b.query.x) == (split == "train")
    with pytest.raises(ConfigError, match="test_points"):
        SinusoidConfig(test_points="even")
