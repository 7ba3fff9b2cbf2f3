"""WarpGrad against its definition (float64): the inner loop leaves the warp layers alone, the
warp meta-gradient of a linear model y = W2 P W1 x equals its hand derivation, the whole
meta-gradient equals a hand-written loop with no graph through the inner loop, vmap equals the
per-task loop; the replay buffer, the warp steps, bad input, and a short learning run."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_bilevel import image_tasks, tiny_conv
from torch import nn
from torch.func import functional_call

from metalearn.algos.bilevel.warpgrad import WarpGrad, WarpGradConfig
from metalearn.data.sinusoid import SinusoidConfig, SinusoidTasks
from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError
from metalearn.models.mlp import MLP, Identity, IdentityConfig, MLPConfig

pytestmark = pytest.mark.usefixtures("float64")  # conftest: float64 by default

ALPHA = 0.3


def warpgrad(model, batching: str = "vmap", kind: str = "classification", **options) -> WarpGrad:
    settings = {"inner_lr": ALPHA, "inner_steps": 2, "warp_batch": None} | options
    return WarpGrad(WarpGradConfig(**settings), model, kind, batching)


def grads_of(algo: WarpGrad, objective: torch.Tensor) -> dict[str, torch.Tensor | None]:
    names = list(dict(algo.model.named_parameters()))
    found = torch.autograd.grad(objective, list(algo.parameters()), allow_unused=True)
    return dict(zip(names, found, strict=True))


def test_the_inner_loop_moves_the_task_layers_and_leaves_the_warp_layers_as_they_are():
    algo, batch = warpgrad(tiny_conv()), image_tasks()
    assert algo.warp_names and all(n.startswith("warp.") for n in algo.warp_names)
    params, buffers = algo.params()
    start = {k: v.detach().clone() for k, v in params.items()}
    support = Split(batch.support.x[0], batch.support.y[0])
    *_, fast = algo.trajectory(start, buffers, support, training=False, steps=3)
    for name in algo.warp_names:
        assert torch.equal(fast[name], start[name]), name
    for name in algo.task_names:  # every task layer moves, the head and BatchNorm included
        assert not torch.equal(fast[name], start[name]), name
    # meta-training's inner loops too: the buffer holds task layers only, theta_0 first
    algo.meta_loss(batch)
    assert sorted(algo.buffer.points) == sorted(algo.task_names)
    for name in algo.task_names:
        assert torch.equal(algo.buffer.points[name][0], start[name])
        assert not algo.buffer.points[name].requires_grad  # constants: no graph behind them


class LinearTwoLayer(nn.Module):
    """y = W2 h, h = W1 x: no biases, no activation (with the warp layer: y = W2 P W1 x)."""

    def __init__(self, d: int, h: int, o: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, h, bias=False))
        self.head = nn.Linear(h, o, bias=False)


def hand_step(w1, w2, p, x, y):
    """The MSE's gradients of the linear model F = X W1' P' W2' (rows are examples)."""
    h = x @ w1.T  # (n, h)
    z = h @ p.T
    e = 2 * (z @ w2.T - y) / y.numel()  # dL/dF, (n, o)
    return p.T @ w2.T @ e.T @ x, e.T @ z, (h, e)  # dL/dW1, dL/dW2, and what dP needs


def hand_warp_gradient(w1, w2, p, support, query):
    """d/dP of L_query(theta - alpha grad L_support(theta; P); P) with theta fixed, derived by
    hand: the direct term, then the terms through the step's dependence on P."""
    x, y = support
    g1, g2, (h, e) = hand_step(w1, w2, p, x, y)
    w1_, w2_ = w1 - ALPHA * g1, w2 - ALPHA * g2
    a1, a2, (hq, eq) = hand_step(w1_, w2_, p, *query)  # dLq/dW1', dLq/dW2'
    direct = w2_.T @ eq.T @ hq
    b = x @ a1.T @ p.T @ w2.T + h @ p.T @ a2.T  # (n, o): <., dE> of both step terms
    c = 2 / y.numel()
    through_step = (w2.T @ e.T @ x) @ a1.T + a2.T @ e.T @ h + c * w2.T @ b.T @ h
    return direct - ALPHA * through_step


def test_the_warp_meta_gradient_of_a_linear_model_is_the_hand_derived_one():
    g = torch.Generator().manual_seed(0)
    d, h, o, tasks = 3, 4, 2, 2
    torch.manual_seed(0)
    algo = warpgrad(LinearTwoLayer(d, h, o), kind="regression", init_objective="none")
    with torch.no_grad():
        warp = algo.model.warp[0]
        warp.weight.copy_(torch.eye(h) + 0.3 * torch.randn(h, h, generator=g))
        warp.bias.zero_()  # P alone (the bias is a warp parameter too; at 0 it changes nothing)
    batch = TaskBatch(
        support=Split(torch.randn(tasks, 6, d, generator=g), torch.randn(tasks, 6, o, generator=g)),
        query=Split(torch.randn(tasks, 5, d, generator=g), torch.randn(tasks, 5, o, generator=g)),
        ways=1,
    )
    objective, _ = algo.meta_loss(batch)
    mine = grads_of(algo, objective)["warp.0.weight"]
    w1 = algo.model.task.body[0].weight.detach()
    w2 = algo.model.task.head.weight.detach()
    p = warp.weight.detach()
    expected = torch.zeros_like(p)
    for t in range(tasks):  # two stored points per task: theta_0 and theta_1
        support, query = (
            (batch.support.x[t], batch.support.y[t]),
            (batch.query.x[t], batch.query.y[t]),
        )
        g1, g2, _ = hand_step(w1, w2, p, *support)
        for a, b in ((w1, w2), (w1 - ALPHA * g1, w2 - ALPHA * g2)):
            expected += hand_warp_gradient(a, b, p, support, query) / (2 * tasks)
    torch.testing.assert_close(mine, expected, rtol=1e-10, atol=1e-12)


def reference_meta_gradient(algo: WarpGrad, batch: TaskBatch) -> dict[str, torch.Tensor]:
    """Algorithm 2 by hand, one task at a time: the inner loop with autograd under no_grad-free
    detached steps, then the warp objective and the initialisation's update from its points."""
    params, buffers = algo.params()
    phi = {k: params[k].detach().requires_grad_() for k in algo.warp_names}
    fixed = {k: v.detach() for k, v in phi.items()}

    def loss(task, warp, x, y):
        return F.cross_entropy(functional_call(algo.model, ({**task, **warp}, buffers), (x,)), y)

    def sgd_step(task, warp, x, y, create_graph):
        task = {k: v if v.requires_grad else v.requires_grad_() for k, v in task.items()}
        grads = torch.autograd.grad(
            loss(task, warp, x, y), list(task.values()), create_graph=create_graph
        )
        return {k: v - ALPHA * gk for (k, v), gk in zip(task.items(), grads, strict=True)}

    warp_losses, updates = [], []
    for t in range(batch.tasks):
        sx, sy, qx, qy = batch.support.x[t], batch.support.y[t], batch.query.x[t], batch.query.y[t]
        points = [{k: params[k].detach().clone() for k in algo.task_names}]
        for _ in range(algo.cfg.inner_steps):  # a fresh leaf at every step: no graph kept
            points.append(
                {k: v.detach() for k, v in sgd_step(points[-1], fixed, sx, sy, False).items()}
            )
        for theta in points[:-1]:
            theta = {k: v.clone() for k, v in theta.items()}
            warp_losses.append(loss(sgd_step(theta, phi, sx, sy, True), phi, qx, qy))
        if algo.cfg.init_objective == "leap":
            steps = [
                {k: a[k] - b[k] for k in a} for a, b in zip(points[:-1], points[1:], strict=True)
            ]
            lengths = [sum(v.square().sum() for v in s.values()).sqrt() + 1e-9 for s in steps]
            updates.append(
                {k: sum(s[k] / n for s, n in zip(steps, lengths, strict=True)) for k in points[0]}
            )
        elif algo.cfg.init_objective == "reptile":
            updates.append({k: points[0][k] - points[-1][k] for k in points[0]})
        else:  # fomaml
            last = {k: v.clone().requires_grad_() for k, v in points[-1].items()}
            grads = torch.autograd.grad(loss(last, fixed, qx, qy), list(last.values()))
            updates.append(dict(zip(last, grads, strict=True)))
    warp_grads = torch.autograd.grad(torch.stack(warp_losses).mean(), list(phi.values()))
    out = dict(zip(phi, warp_grads, strict=True))
    return out | {k: sum(u[k] for u in updates) / batch.tasks for k in algo.task_names}


@pytest.mark.parametrize("init_objective", ["leap", "reptile", "fomaml"])
def test_the_meta_gradient_is_algorithm_2_with_no_graph_through_the_inner_loop(init_objective):
    algo, batch = warpgrad(tiny_conv(), init_objective=init_objective), image_tasks()
    expected = reference_meta_gradient(algo, batch)
    objective, _ = algo.meta_loss(batch)
    mine = grads_of(algo, objective)
    assert mine.keys() == expected.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], expected[name], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("init_objective", ["leap", "fomaml"])
def test_vmap_and_the_per_task_loop_agree_on_every_update(init_objective):
    batch, runs = image_tasks(), {}
    for batching in ("vmap", "loop"):
        torch.manual_seed(3)  # the same replayed mini-batches
        algo = warpgrad(tiny_conv(), batching, warp_batch=3, init_objective=init_objective)
        runs[batching] = [grads_of(algo, objective) for objective, _ in algo.meta_losses(batch)]
    assert len(runs["vmap"]) == len(runs["loop"]) == math.ceil(4 * 2 / 3)
    for vmapped, looped in zip(runs["vmap"], runs["loop"], strict=True):
        for name, value in vmapped.items():
            if value is None:
                assert looped[name] is None
            else:
                torch.testing.assert_close(value, looped[name], rtol=1e-9, atol=1e-11)
    evaluated = [warpgrad(tiny_conv(), b).evaluate(batch, [0, 2]) for b in ("vmap", "loop")]
    for key in evaluated[0]:
        torch.testing.assert_close(evaluated[0][key], evaluated[1][key])


def test_warp_steps_after_the_first_move_the_warp_layers_only_at_warp_lr():
    batch = image_tasks()
    algo = warpgrad(tiny_conv(), "loop", warp_steps=3, warp_batch=2)
    updates = [grads_of(algo, objective) for objective, _ in algo.meta_losses(batch)]
    assert len(updates) == 3
    first, *later = updates
    assert all(first[k] is not None for k in first)  # the initialisation and the warp layers
    for update in later:  # no gradient at all on the task layers: an optimiser leaves them
        assert all((update[k] is None) == k.startswith("task.") for k in update)
    # warp_lr = 3 * outer_lr: the warp layers' gradient three times as large, the rest unchanged
    torch.manual_seed(0)
    same = warpgrad(tiny_conv(), warp_batch=2)
    plain = grads_of(same, same.meta_loss(batch)[0])
    torch.manual_seed(0)
    faster = warpgrad(tiny_conv(), warp_batch=2, warp_lr=0.3, outer_lr=0.1)
    scaled = grads_of(faster, faster.meta_loss(batch)[0])
    for name, value in plain.items():
        factor = 3.0 if name.startswith("warp.") else 1.0
        torch.testing.assert_close(scaled[name], factor * value)


def test_the_replay_buffer_keeps_the_newest_points_with_their_episodes():
    algo = warpgrad(tiny_conv(), buffer_size=10)  # 4 tasks x 2 steps = 8 points per meta-batch
    first, second = image_tasks(1), image_tasks(2)
    algo.meta_loss(first)
    last_task = {k: v[-2:].clone() for k, v in algo.buffer.points.items()}  # its theta_0, theta_1
    algo.meta_loss(second)
    assert len(algo.buffer) == 10  # oldest first: the first batch's last task, then the second's
    for name, value in last_task.items():
        torch.testing.assert_close(algo.buffer.points[name][:2], value)
    support = algo.buffer.episodes[0]
    torch.testing.assert_close(support[:2], first.support.x[-1:].expand(2, -1, -1, -1, -1))
    torch.testing.assert_close(support[2:], second.support.x.repeat_interleave(2, 0))
    unbounded = warpgrad(tiny_conv())  # null: each meta-batch's points replace the last ones
    unbounded.meta_loss(first)
    unbounded.meta_loss(second)
    torch.testing.assert_close(unbounded.buffer.episodes[2], second.query.x.repeat_interleave(2, 0))


def test_bad_settings_and_models_are_refused_saying_what_to_do():
    with pytest.raises(ConfigError, match="model=conv4 or model=mlp"):
        warpgrad(Identity(IdentityConfig(), (4,), 3))
    with pytest.raises(ConfigError, match="warp_after_last"):
        warpgrad(MLP(MLPConfig(hidden_sizes=[8]), (1,), 1), warp_after_last=False)
    for options, words in [
        ({"outer_optimizer": "adam", "warp_lr": 0.01}, "outer_optimizer=sgd"),
        ({"init_objective": "maml"}, "leap, reptile, fomaml, none"),
        ({"bn_mode": "running"}, "transductive"),
        ({"checkpoint": True}, "checkpoint=false"),
        ({"warp_batch": 0}, "algo.warp_batch"),
        ({"buffer_size": 0}, "algo.buffer_size"),
        ({"warp_lr": -1.0}, "algo.warp_lr"),
    ]:
        with pytest.raises(ConfigError, match=words):
            WarpGradConfig(**options)


def test_a_short_run_learns_sinusoids_far_below_the_zero_predictor():
    """Tasks y = A sin(x - b), A in [0.1, 5]: predicting 0 costs E[A^2]/2 = 4.25 in MSE."""
    torch.manual_seed(0)
    model = MLP(MLPConfig(hidden_sizes=[32, 32]), (1,), 1)
    options = {"inner_lr": 0.01, "inner_steps": 1, "test_inner_steps": 5, "outer_lr": 0.003}
    options |= {"outer_optimizer": "adam", "init_objective": "fomaml", "warp_after_last": False}
    algo = warpgrad(model, kind="regression", **options)
    tasks, g = (
        SinusoidTasks(SinusoidConfig(), torch.device("cpu")),
        torch.Generator().manual_seed(0),
    )
    optimizer = torch.optim.Adam(algo.parameters(), lr=0.003)
    test = tasks.sample("test", torch.Generator().manual_seed(9), 100, 1, 10, 10)
    before = algo.evaluate(test, [5])["loss"].mean()
    for _ in range(400):
        for objective, _ in algo.meta_losses(tasks.sample("train", g, 10, 1, 10, 10)):
            optimizer.zero_grad()
            objective.backward()
            optimizer.step()
    after = algo.evaluate(test, [5])["loss"].mean()
    assert after < 1.5 < before, (before, after)
