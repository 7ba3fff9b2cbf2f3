"""Reptile, ANIL, Meta-SGD, iMAML and MAML++ against their definitions and against learn2learn
(float64), and the same results from vmap and from a per-task loop for every one of them."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_bilevel import TASKS, WAYS, image_tasks, tiny_conv

from metalearn.algos import ALGOS
from metalearn.algos.bilevel import base
from metalearn.algos.bilevel.imaml import IMAML, IMAMLConfig, conjugate_gradient
from metalearn.algos.bilevel.inner import adapt
from metalearn.algos.bilevel.mamlpp import msl_weights
from metalearn.algos.bilevel.reptile import mini_batch_stream
from metalearn.build import fused_batchnorm_is_exact
from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError
from metalearn.models.layers import TaskBatchNorm2d

BILEVEL = [name for name, (_, cls) in ALGOS.items() if cls.family == "bilevel"]
needs_learn2learn = pytest.mark.reference("learn2learn")  # conftest skips it without


pytestmark = pytest.mark.usefixtures("float64")  # conftest: float64 by default


def build(name: str, model, batching: str = "vmap", **options):
    """The algorithm `name` with its registered config class, small settings for tests."""
    config_cls, algo_cls = ALGOS[name]
    defaults = {"inner_lr": 0.3, "inner_steps": 2, **config_cls.VARIANTS.get(name, {})}
    if name == "reptile":
        # the definition's full-batch steps on the mean loss (the reference's are mini-batches)
        defaults.update(
            first_order=True,
            inner_optimizer="sgd",
            outer_lr=0.5,
            inner_batch=None,
            test_inner_batch=None,
            inner_loss="mean",
        )
    if name == "mamlpp":
        defaults.update(first_order_epochs=0, inner_lr=0.2)
    if name == "mtnet":  # masks of ones whatever the draw: vmap and the loop draw differently
        defaults.update(mask_logit_init=40.0)
    cfg = config_cls(name=name, **{**defaults, **options})
    return algo_cls(cfg, model, "classification", batching)


def outer_grads(algo, batch: TaskBatch) -> dict[str, torch.Tensor]:
    for p in algo.parameters():
        p.grad = None
    objective, _ = algo.meta_loss(batch)
    objective.backward()
    names = {id(p): n for n, p in algo.model.named_parameters()}
    names.update({id(p): n for n, p in algo.meta_parameters().items()})
    return {names[id(p)]: p.grad.clone() for p in algo.parameters() if p.grad is not None}


@pytest.mark.parametrize("name", BILEVEL)
def test_vmap_and_the_per_task_loop_give_the_same_meta_gradient(name):
    batch = image_tasks()
    vmapped = outer_grads(build(name, tiny_conv()), batch)
    looped = outer_grads(build(name, tiny_conv(), batching="loop"), batch)
    assert vmapped.keys() == looped.keys() and vmapped
    for key in vmapped:
        torch.testing.assert_close(vmapped[key], looped[key], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", BILEVEL)
def test_the_native_batchnorm_kernel_is_exact_where_build_uses_it(name):
    """hardware.task_batching=loop runs the fused kernel (see build.fused_batchnorm_is_exact):
    its meta-gradients equal the primitive BatchNorm's under vmap, second order included."""
    algo_cls = ALGOS[name][1]
    if not fused_batchnorm_is_exact(algo_cls, "loop"):  # particles vmap inside each task
        assert algo_cls.vmaps_within_tasks and not fused_batchnorm_is_exact(algo_cls, "vmap")
        return
    batching = "vmap" if fused_batchnorm_is_exact(algo_cls, "vmap") else "loop"
    batch = image_tasks()
    fused = outer_grads(build(name, tiny_conv(fused=True), batching=batching), batch)
    primitive = outer_grads(build(name, tiny_conv(fused=False)), batch)
    for key in primitive:
        torch.testing.assert_close(fused[key], primitive[key], rtol=1e-9, atol=1e-11)


# (VMAML draws weights per task and always loops: hardware.task_batching does not apply)
@pytest.mark.parametrize("name", [n for n in BILEVEL if ALGOS[n][1].batches_tasks])
def test_evaluate_is_the_same_under_vmap_and_the_loop(name, monkeypatch):
    """Also with test-time adaptation under vmap and the query forwards in a loop (build.py's
    choice on CPU for small support and large query sets), where the loop uses the native
    BatchNorm kernel for the query forwards only; in one go where the adapted weights would not
    fit (TWO_PHASE_BYTES); and the other way round."""
    batch = image_tasks()
    vmapped = build(name, tiny_conv()).evaluate(batch, [0, 1, 3])
    looped = build(name, tiny_conv(), batching="loop").evaluate(batch, [0, 1, 3])
    for adapting, queries, limit in [
        ("vmap", "loop", 2**28),
        ("vmap", "loop", 0),
        ("loop", "vmap", 0),
    ]:
        monkeypatch.setattr(base, "TWO_PHASE_BYTES", limit)  # 0: adapted and scored in one go
        mixed_algo = build(name, tiny_conv())
        mixed_algo.adapt_batching, mixed_algo.test_batching = adapting, queries
        mixed = mixed_algo.evaluate(batch, [0, 1, 3])
        torch.testing.assert_close(vmapped["loss"], mixed["loss"], rtol=1e-10, atol=1e-12)
        norms = [m for m in mixed_algo.model.modules() if isinstance(m, TaskBatchNorm2d)]
        assert norms and not any(m.fused for m in norms)  # the training kernel is back
    torch.testing.assert_close(vmapped["loss"], looped["loss"], rtol=1e-10, atol=1e-12)
    assert vmapped["loss"].shape == (TASKS, 3)


def test_gradient_checkpointing_gives_plain_maml_meta_gradient():
    batch = image_tasks()
    plain = outer_grads(build("maml", tiny_conv(), batching="loop"), batch)
    recomputed = outer_grads(build("maml", tiny_conv(), batching="loop", checkpoint=True), batch)
    for key in plain:
        torch.testing.assert_close(recomputed[key], plain[key], rtol=1e-12, atol=1e-14)
    with pytest.raises(ConfigError, match="task_batching=loop"):
        build("maml", tiny_conv(), batching="vmap", checkpoint=True)


# -- Reptile ------------------------------------------------------------------------------------
def test_reptile_update_is_theta_plus_epsilon_times_mean_adapted_minus_theta():
    model, batch, epsilon = tiny_conv(), image_tasks(), 0.5
    algo = build("reptile", model, outer_lr=epsilon)
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    adapted = []
    for t in range(batch.tasks):  # the definition: k SGD steps on all of the task's examples
        x = torch.cat([batch.support.x[t], batch.query.x[t]])
        y = torch.cat([batch.support.y[t], batch.query.y[t]])
        adapted.append(
            adapt(
                model,
                theta,
                {},
                Split(x, y),
                steps=2,
                lr=0.3,
                first_order=True,
                loss=F.cross_entropy,
            )
        )
    optimizer = torch.optim.SGD(algo.parameters(), lr=epsilon)
    algo.meta_loss(batch)[0].backward()
    optimizer.step()
    for name, p in model.named_parameters():
        mean_phi = torch.stack([a[name] for a in adapted]).mean(0)
        want = theta[name] + epsilon * (mean_phi - theta[name])
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-12)


def tensorflow_adam_steps(model, x, y, lr, steps, eps=1e-8, beta2=0.999):
    """Hand-written TensorFlow Adam with beta1 = 0 from zero moments, on the mean loss."""
    model = copy.deepcopy(model)
    v = [torch.zeros_like(p) for p in model.parameters()]
    for t in range(1, steps + 1):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p, v_p in zip(model.parameters(), v, strict=True):
                v_p.mul_(beta2).add_((1 - beta2) * p.grad**2)
                p.sub_(lr * math.sqrt(1 - beta2**t) * p.grad / (v_p.sqrt() + eps))
    return dict(model.named_parameters())


def test_reptile_fresh_inner_adam_restarts_for_every_task():
    model, batch = tiny_conv(), image_tasks()
    algo = build("reptile", model, inner_optimizer="adam", inner_state="fresh", inner_lr=0.01)
    algo.meta_loss(batch)  # a persistent state would now hold moments; a fresh one is unused
    x = torch.cat([batch.support.x[0], batch.query.x[0]])
    y = torch.cat([batch.support.y[0], batch.query.y[0]])
    params = {k: v.detach() for k, v in model.named_parameters()}
    *_, fast = algo.trajectory(params, {}, Split(x, y), training=True)
    for name, p in tensorflow_adam_steps(model, x, y, lr=0.01, steps=2).items():
        torch.testing.assert_close(fast[name], p.detach(), rtol=1e-7, atol=1e-9)
    assert algo.inner_adam.steps.item() == 0


def test_reptile_persistent_adam_carries_over_is_saved_and_testing_leaves_it():
    model, batch = tiny_conv(), image_tasks()
    algo = build(
        "reptile",
        model,
        inner_optimizer="adam",
        inner_lr=0.01,
        inner_batch=4,
        test_inner_batch=3,
        test_inner_steps=3,
    )
    algo.meta_loss(batch)
    algo.meta_loss(batch)
    assert algo.inner_adam.steps.item() == 2 * TASKS * 2  # every task's steps, one after another
    trained = algo.state_dict()["inner_adam"]
    assert trained["second"]["head.weight"].abs().min() > 0
    torch.manual_seed(0)
    looped = algo.evaluate(batch, [0, 3])
    torch.testing.assert_close(algo.state_dict()["inner_adam"], trained, rtol=0, atol=0)
    # a checkpoint restores the moments; testing from them is the same under vmap
    again = build(
        "reptile",
        tiny_conv(seed=5),
        batching="vmap",
        inner_optimizer="adam",
        inner_lr=0.01,
        inner_batch=4,
        test_inner_batch=3,
        test_inner_steps=3,
    )
    again.load_state_dict(algo.state_dict())
    torch.testing.assert_close(again.state_dict()["inner_adam"], trained, rtol=0, atol=0)
    torch.manual_seed(0)
    vmapped = again.evaluate(batch, [0, 3])
    torch.testing.assert_close(vmapped, looped, rtol=1e-9, atol=1e-11)
    # testing from fresh moments differs: the trained ones are what test-time adaptation uses
    fresh = build(
        "reptile",
        tiny_conv(),
        inner_optimizer="adam",
        inner_lr=0.01,
        test_inner_batch=3,
        test_inner_steps=3,
    )
    fresh.model.load_state_dict(algo.model.state_dict())
    torch.manual_seed(0)
    assert not torch.allclose(fresh.evaluate(batch, [3])["loss"], looped["loss"][:, 1:])
    sgd = build("reptile", tiny_conv())
    with pytest.raises(KeyError, match="inner_optimizer is sgd"):
        sgd.load_state_dict(algo.state_dict())


def test_reptile_mini_batches_are_disjoint_within_each_reshuffled_pass():
    torch.manual_seed(0)
    stream = mini_batch_stream(12, steps=7, batch=5, device=torch.device("cpu"))
    assert stream.shape == (35,)
    for start in range(0, 24, 12):  # two whole passes: each a permutation of the 12 examples
        assert sorted(stream[start : start + 12].tolist()) == list(range(12))
    assert not torch.equal(stream[:12], stream[12:24])
    assert torch.equal(
        mini_batch_stream(4, 3, None, torch.device("cpu")), torch.arange(4).repeat(3)
    )


# -- ANIL ---------------------------------------------------------------------------------------
def test_anil_adapts_the_head_only_and_matches_maml_on_a_frozen_body():
    model, batch = tiny_conv(), image_tasks()
    algo = build("anil", model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    support = Split(batch.support.x[0], batch.support.y[0])
    *_, fast = algo.trajectory(params, {}, support, training=True)
    for name in params:
        moved = not torch.equal(fast[name], params[name])
        assert moved == name.startswith("head."), name
    # the same steps as MAML's adapt() restricted to the head on the full model
    want = adapt(
        model,
        params,
        {},
        support,
        steps=2,
        lr=0.3,
        first_order=False,
        loss=F.cross_entropy,
        adapted=["head.weight", "head.bias"],
    )
    for name in params:
        torch.testing.assert_close(fast[name], want[name], rtol=1e-12, atol=1e-12)


def test_anil_meta_gradient_equals_a_hand_written_head_only_inner_loop():
    """Per task: autograd steps on the head of the full model (create_graph), body fixed in the
    inner loop but reached by the outer gradient through the support features."""
    model, batch = tiny_conv(), image_tasks()
    got = outer_grads(build("anil", model), batch)
    theta = dict(model.named_parameters())
    head_names = ["head.weight", "head.bias"]
    total = 0.0
    for t in range(batch.tasks):
        head = [theta[n] for n in head_names]
        for _ in range(2):
            fast = {**theta, **dict(zip(head_names, head, strict=True))}
            logits = torch.func.functional_call(model, fast, (batch.support.x[t],))
            grads = torch.autograd.grad(
                F.cross_entropy(logits, batch.support.y[t]), head, create_graph=True
            )
            head = [h - 0.3 * g for h, g in zip(head, grads, strict=True)]
        fast = {**theta, **dict(zip(head_names, head, strict=True))}
        query = torch.func.functional_call(model, fast, (batch.query.x[t],))
        total = total + F.cross_entropy(query, batch.query.y[t]) / batch.tasks
    want = dict(zip(theta, torch.autograd.grad(total, list(theta.values())), strict=True))
    for n in theta:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-11)


# -- Meta-SGD and MAML against learn2learn ------------------------------------------------------
def l2l_meta_grads(model, batch: TaskBatch, wrapper, steps: int) -> dict[str, torch.Tensor]:
    """Meta-gradient by learn2learn's clone()/adapt() on the same weights and data."""
    learner = wrapper(copy.deepcopy(model))
    total = 0.0
    for t in range(batch.tasks):
        clone = learner.clone()
        for _ in range(steps):
            clone.adapt(F.cross_entropy(clone(batch.support.x[t]), batch.support.y[t]))
        total = total + F.cross_entropy(clone(batch.query.x[t]), batch.query.y[t])
    (total / batch.tasks).backward()
    return dict(learner.named_parameters())


def relative_error(ours: dict, theirs: dict) -> float:
    """|a - b| / |b| over the whole gradient vector (some entries, such as a conv bias before
    BatchNorm, are zero up to rounding, so per-tensor ratios would measure noise)."""
    a = torch.cat([v.flatten() for v in ours.values()])
    b = torch.cat([v.flatten() for v in theirs.values()])
    return ((a - b).norm() / b.norm()).item()


@needs_learn2learn
def test_maml_meta_gradient_equals_learn2learn():
    import learn2learn as l2l

    model, batch = tiny_conv(), image_tasks()
    ours = outer_grads(build("maml", model), batch)
    theirs = l2l_meta_grads(model, batch, lambda m: l2l.algorithms.MAML(m, lr=0.3), steps=2)
    assert ours.keys() == {n.removeprefix("module.") for n in theirs}
    want = {name: theirs[f"module.{name}"].grad for name in ours}
    assert relative_error(ours, want) < 1e-5


@needs_learn2learn
def test_metasgd_meta_gradients_equal_learn2learn_for_weights_and_step_sizes():
    import learn2learn as l2l

    model, batch = tiny_conv(), image_tasks()
    algo = build("metasgd", model, inner_steps=1)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # distinct step sizes, so that a mix-up of names would show
        for lr in algo.lrs.values():
            lr.copy_(0.1 + 0.4 * torch.rand(lr.shape, generator=g))
    ours = outer_grads(algo, batch)

    def wrapper(m):
        learner = l2l.algorithms.MetaSGD(m, lr=0.3)
        with torch.no_grad():
            for mine, theirs in zip(algo.lrs.values(), learner.lrs, strict=True):
                theirs.copy_(mine)
        return learner

    theirs = l2l_meta_grads(model, batch, wrapper, steps=1)
    weights = {name: theirs[f"module.{name}"].grad for name in algo.lrs}
    assert relative_error({n: ours[n] for n in algo.lrs}, weights) < 1e-5
    step_sizes = {name: theirs[f"lrs.{i}"].grad for i, name in enumerate(algo.lrs)}
    assert relative_error({n: ours[f"lr.{n}"] for n in algo.lrs}, step_sizes) < 1e-5


# -- iMAML --------------------------------------------------------------------------------------
def test_conjugate_gradient_solves_a_symmetric_positive_definite_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g)
    a = m @ m.T + 6 * torch.eye(6)
    b = {"x": torch.randn(6, generator=g)}
    x = conjugate_gradient(lambda v: {"x": a @ v["x"]}, b, steps=6)
    torch.testing.assert_close(x["x"], torch.linalg.solve(a, b["x"]), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "eigenvalues",
    [[3.0, 1.0, -2.0, 0.5, -0.1, 2.0], [1.0, 1e-13, 2.0, 1e-15, 0.5, 4.0]],
    ids=["indefinite", "near-singular"],
)
def test_conjugate_gradient_takes_a_bounded_step_on_a_bad_system(eigenvalues):
    """Plain CG divides by p'Ap: on these it steps ~1e13 times too far or the wrong way."""
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    a = q @ torch.diag(torch.tensor(eigenvalues)) @ q.T
    b = {"x": torch.randn(6, generator=g)}
    bound = 6 * b["x"].norm() / 0.01  # steps * |r| / min_curvature, |r| <= |b| on this path
    x = conjugate_gradient(lambda v: {"x": a @ v["x"]}, b, steps=6, min_curvature=0.01)["x"]
    assert torch.isfinite(x).all() and 0 < x.norm() < bound
    # the objective 0.5 x'Ax - b'x went down, as it does along positive-curvature directions
    assert 0.5 * x @ a @ x - b["x"] @ x < 0


def test_conjugate_gradient_stops_once_the_residual_is_small():
    a = torch.diag(torch.tensor([2.0, 2.0, 2.0]))
    b = {"x": torch.tensor([1.0, -1.0, 0.5])}  # A = 2I: solved exactly by the first step
    matvec_calls = []

    def matvec(v):
        matvec_calls.append(v["x"].clone())
        return {"x": a @ v["x"]}

    x = conjugate_gradient(matvec, b, steps=3, residual_tol=1e-10)
    torch.testing.assert_close(x["x"], b["x"] / 2)
    # later iterations see a zero direction and leave x where it is (masked, no early exit)
    assert all(v.abs().max() < 1e-12 for v in matvec_calls[1:])


def test_imaml_records_where_it_departs_from_the_reference_code():
    """results.json's protocol.reference: empty deviations under the defaults."""
    from metalearn.records.results import reference_protocol

    assert reference_protocol(IMAMLConfig()) == {
        "code": IMAMLConfig.REFERENCE["source"],
        "deviations": {},
    }
    paper = reference_protocol(IMAMLConfig(proximal="every_step", cg_damping=0.0))
    assert paper["deviations"] == {
        "proximal": {"value": "every_step", "reference": "pullback"},
        "cg_damping": {"value": 0.0, "reference": 1.0},
    }


def test_imaml_meta_gradient_is_the_exact_gradient_of_the_proximal_solution():
    """Linear regression: the inner problem is quadratic, so phi*(theta) has a closed form."""
    g = torch.Generator().manual_seed(0)
    d, n, lam = 3, 8, 2.0
    model = torch.nn.Linear(d, 1, bias=False)
    sx, qx = torch.randn(1, n, d, generator=g), torch.randn(1, n, d, generator=g)
    sy, qy = torch.randn(1, n, 1, generator=g), torch.randn(1, n, 1, generator=g)
    batch = TaskBatch(Split(sx, sy), Split(qx, qy), ways=1)
    # the paper's equations: the proximal term in every step, A = I + H / lambda undamped
    cfg = IMAMLConfig(
        inner_lr=0.1,
        inner_steps=400,
        lam=lam,
        cg_steps=d,
        proximal="every_step",
        cg_damping=0.0,
        lam_damping=0.0,
    )
    algo = IMAML(cfg, model, "regression", "vmap")
    algo.meta_loss(batch)[0].backward()

    theta = model.weight.detach().clone().requires_grad_()  # (1, d)
    x, y = sx[0], sy[0]
    hessian = 2 * x.T @ x / n  # of mean((x w - y)^2) in w
    # argmin_w mean((x w - y)^2) + lam/2 |w - theta|^2  =>  (H + lam I) w = 2 x^T y / n + lam theta
    phi = torch.linalg.solve(hessian + lam * torch.eye(d), 2 * x.T @ y / n + lam * theta.T)
    exact = torch.autograd.grad(F.mse_loss(qx[0] @ phi, qy[0]), theta)[0]
    torch.testing.assert_close(model.weight.grad, exact, rtol=1e-7, atol=1e-10)


# -- MAML++ -------------------------------------------------------------------------------------
def test_mamlpp_learned_step_sizes_and_per_step_batchnorm_receive_meta_gradients():
    model, batch = tiny_conv(), image_tasks()
    algo = build("mamlpp", model, inner_steps=3)
    grads = outer_grads(algo, batch)
    for name, lr in algo.lrs.items():
        assert lr.shape == (3,) and grads[f"lr.{name}"].abs().min() > 0, name
    for name in algo.norm:
        assert grads[f"bn.{name}"].shape[0] == 3 and grads[f"bn.{name}"].abs().sum() > 0, name
        assert name not in grads, "the model's own BN weights are replaced by the per-step ones"


def test_mamlpp_multi_step_loss_weights_anneal_to_the_last_step():
    assert msl_weights(5, 0, 10) == pytest.approx([0.2] * 5)
    late = msl_weights(5, 10, 10)
    assert late[:-1] == pytest.approx([0.006] * 4) and late[-1] == pytest.approx(1 - 4 * 0.006)
    for epoch in range(12):
        assert sum(msl_weights(5, epoch, 10)) == pytest.approx(1.0)


def test_mamlpp_without_its_fixes_is_maml():
    batch = image_tasks()
    plain = build(
        "mamlpp",
        tiny_conv(),
        multi_step_loss=False,
        learn_inner_lr=False,
        per_step_bn=False,
        inner_lr=0.3,
    )
    maml = build("maml", tiny_conv())
    torch.testing.assert_close(plain.meta_loss(batch)[0], maml.meta_loss(batch)[0])
    mine, theirs = outer_grads(plain, batch), outer_grads(maml, batch)
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-10, atol=1e-12)


def test_mamlpp_derivative_order_annealing_switches_to_second_order():
    batch = image_tasks()
    algo = build("mamlpp", tiny_conv(), first_order_epochs=2, epoch_iterations=10)
    early = algo.meta_loss(batch, iteration=19)[0]
    assert algo.inner_options(training=True)["first_order"]
    late = algo.meta_loss(batch, iteration=20)[0]
    assert not algo.inner_options(training=True)["first_order"]
    assert math.isfinite(early.item()) and math.isfinite(late.item())


def test_checkpoints_of_meta_parameters_round_trip():
    algo = build("metasgd", tiny_conv())
    with torch.no_grad():
        next(iter(algo.lrs.values())).fill_(0.123)
    other = build("metasgd", tiny_conv(seed=1))
    other.load_state_dict(algo.state_dict())
    assert torch.equal(next(iter(other.lrs.values())), next(iter(algo.lrs.values())))
    with pytest.raises(KeyError):
        build("maml", tiny_conv()).load_state_dict(algo.state_dict())


# -- BatchNorm modes ----------------------------------------------------------------------------
def running_conv(seed: int = 0):
    torch.manual_seed(seed)
    from metalearn.models.conv4 import Conv4, Conv4Config

    return Conv4(Conv4Config(hidden=4, downsample="stride"), (1, 8, 8), 3, running_stats=True)


def test_running_statistics_are_the_tasks_batch_statistics_at_every_stage():
    model, batch = running_conv(), image_tasks()
    algo = build("maml", model, bn_mode="per_step", inner_steps=2)
    algo.meta_loss(batch)
    layers = [n for n, m in model.named_modules() if type(m).__name__ == "TaskBatchNorm2d"]
    seen: dict[str, list] = {n: [] for n in layers}
    hooks = [
        dict(model.named_modules())[n].register_forward_hook(
            lambda m, args, out, n=n: seen[n].append(
                torch.stack([args[0].mean((0, 2, 3)), args[0].var((0, 2, 3), correction=0)])
            )
        )
        for n in layers
    ]
    params = {k: v.detach() for k, v in model.named_parameters()}
    want = {n: [] for n in layers}
    for t in range(batch.tasks):
        support = Split(batch.support.x[t], batch.support.y[t])
        x = torch.cat([batch.support.x[t], batch.query.x[t]])
        for steps in range(3):
            fast = adapt(
                model,
                params,
                {},
                support,
                steps=steps,
                lr=0.3,
                first_order=True,
                loss=F.cross_entropy,
            )
            for n in layers:
                seen[n].clear()
            with torch.no_grad():
                torch.func.functional_call(model, fast, (x,))
            for n in layers:
                want[n].append(seen[n][0])
    for hook in hooks:
        hook.remove()
    for n in layers:
        per_stage = torch.stack(want[n]).view(batch.tasks, 3, 2, -1).mean(0)  # (stages, 2, C)
        initial = torch.stack([torch.zeros(4), torch.ones(4)])
        torch.testing.assert_close(algo.bn_stats[n], initial.lerp(per_stage, 0.1))


@pytest.mark.parametrize("mode", ["running", "per_step"])
def test_running_batchnorm_makes_test_predictions_independent_of_other_queries(mode):
    model, batch = running_conv(), image_tasks()
    algo = build("maml", model, bn_mode=mode)
    for _ in range(3):
        algo.meta_loss(batch)
    support = Split(batch.support.x[0], batch.support.y[0])
    together = algo.predict(support, batch.query.x[0])
    alone = torch.cat([algo.predict(support, q[None]) for q in batch.query.x[0]])
    torch.testing.assert_close(together, alone)
    transductive = build("maml", running_conv())
    assert not torch.allclose(
        transductive.predict(support, batch.query.x[0])[:1],
        transductive.predict(support, batch.query.x[0][:1]),
    ), "with batch statistics a query's logits depend on the other queries"


@pytest.mark.parametrize("mode", ["running", "per_step"])
def test_running_batchnorm_is_the_same_under_vmap_and_the_loop(mode):
    batch = image_tasks()
    vmapped = build("maml", running_conv(), bn_mode=mode)
    looped = build("maml", running_conv(), batching="loop", bn_mode=mode)
    for algo in (vmapped, looped):
        algo.meta_loss(batch)
    for name in vmapped.bn_stats:
        torch.testing.assert_close(vmapped.bn_stats[name], looped.bn_stats[name])
    torch.testing.assert_close(
        vmapped.evaluate(batch, [0, 2])["loss"], looped.evaluate(batch, [0, 2])["loss"]
    )


def test_running_statistics_round_trip_and_mismatches_are_refused():
    batch = image_tasks()
    algo = build("anil", running_conv(), bn_mode="per_step")
    algo.meta_loss(batch)
    other = build("anil", running_conv(seed=1), bn_mode="per_step")
    other.load_state_dict(algo.state_dict())
    for name in algo.bn_stats:
        assert torch.equal(other.bn_stats[name], algo.bn_stats[name])
    with pytest.raises(KeyError, match="bn_mode"):
        build("anil", running_conv()).load_state_dict(algo.state_dict())
    with pytest.raises(ConfigError, match="bn_mode=running"):
        build("maml", tiny_conv(), bn_mode="running")  # built without running statistics
    with pytest.raises(ConfigError, match="bn_mode"):
        build("maml", running_conv(), bn_mode="sometimes")


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_hardware_compile_gives_the_eager_meta_gradient(batching):
    from conftest import compose_config

    from metalearn.build import build_run

    torch.set_default_dtype(torch.float32)
    runs = [
        build_run(
            compose_config(
                [
                    "data=sinusoid",
                    "logger=none",
                    f"hardware.compile={c}",
                    f"hardware.task_batching={batching}",
                ]
            )
        )
        for c in ("false", "true")
    ]
    batch = runs[0].tasks.sample("train", torch.Generator().manual_seed(0), 5, 1, 10, 10)
    grads = []
    for run in runs:
        loss, _ = run.algo.meta_loss(batch)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in run.model.parameters()]))
    if batching == "vmap":  # the whole objective is one graph
        assert "objective" in vars(runs[1].algo) and "objective" not in vars(runs[0].algo)
    else:  # one task's graph, compiled once and called for each task
        assert list(runs[1].algo._compiled) == [type(runs[1].algo).task_loss]
        assert not runs[0].algo._compiled
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_imaml_leaves_out_tasks_whose_inner_problem_diverged():
    model, batch = tiny_conv(), image_tasks()
    algo = build("imaml", model, inner_steps=1, lam=2.0, cg_steps=2)
    reference = outer_grads(
        build("imaml", tiny_conv(), inner_steps=1, lam=2.0, cg_steps=2),
        TaskBatch(
            Split(batch.support.x[1:], batch.support.y[1:]),
            Split(batch.query.x[1:], batch.query.y[1:]),
            WAYS,
        ),
    )
    batch.support.x[0] = float("inf")  # task 0's inner problem cannot be solved
    grads = outer_grads(algo, batch)
    _, metrics = algo.meta_loss(batch)
    assert metrics["diverged"].item() == pytest.approx(1 / TASKS)
    for key in reference:
        torch.testing.assert_close(grads[key], reference[key], rtol=1e-9, atol=1e-11)
