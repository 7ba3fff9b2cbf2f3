"""The gradient-transform hook (T-Net, MT-Net, Meta-Curvature) against MAML and against
hand-written definitions, float64."""

import pytest
import torch
from reference.mt_net import tnet_reference
from test_bilevel import TASKS, image_tasks, reference_meta_grad, tiny_conv
from test_gradient_family import l2l_meta_grads

from metalearn.algos.bilevel.inner import adapt
from metalearn.algos.bilevel.transforms import (
    GradientTransform,
    TransformConfig,
    curvature,
    sample_mask,
)
from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError
from metalearn.models.mlp import MLP, MLPConfig

pytestmark = pytest.mark.usefixtures("float64")
LR, STEPS = 0.3, 2


def learner(transform: str, model, batching: str = "vmap", **options) -> GradientTransform:
    name = "tnet" if transform == "identity" else transform
    cfg = TransformConfig(name=name, transform=transform, inner_lr=LR, inner_steps=STEPS, **options)
    return GradientTransform(cfg, model, "classification", batching)


def grads(algo: GradientTransform, batch: TaskBatch) -> dict[str, torch.Tensor]:
    """The meta-gradient of every model weight and meta-parameter, by name."""
    for p in algo.parameters():
        p.grad = None
    algo.meta_loss(batch)[0].backward()
    named = {**dict(algo.model.named_parameters()), **algo.meta_parameters()}
    return {k: p.grad.clone() for k, p in named.items() if p.grad is not None}


def model_grad(algo: GradientTransform, batch: TaskBatch) -> torch.Tensor:
    g = grads(algo, batch)
    return torch.cat([g[k].flatten() for k, _ in algo.model.named_parameters()])


def perturb(algo: GradientTransform, scale: float = 0.1, seed: int = 3) -> None:
    """Move every meta-parameter off its identity start, the same way for the same shapes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in sorted(algo.meta):
            if not key.startswith("mask."):
                p = algo.meta[key]
                p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("transform", ["identity", "tnet", "metacurvature"])
def test_at_identity_the_hook_gives_maml_meta_gradient(transform):
    """Identity transform, T-Net with identity maps and Meta-Curvature with identity factors:
    MAML's meta-gradient from the per-task autograd loop (test_bilevel's reference)."""
    batch = image_tasks()
    algo = learner(transform, tiny_conv())
    ours = model_grad(algo, batch)
    theirs = reference_meta_grad(tiny_conv(), batch, STEPS, LR, first_order=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-11)
    if transform != "identity":  # and the transform itself is meta-learned
        meta = grads(algo, batch)
        assert all(meta[k].abs().sum() > 0 for k in algo.meta)


def mlp_tasks(seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(
        support=Split(torch.randn(TASKS, 6, 3, generator=g), torch.randint(0, 2, (TASKS, 6))),
        query=Split(torch.randn(TASKS, 6, 3, generator=g), torch.randint(0, 2, (TASKS, 6))),
        ways=2,
    )


def tiny_mlp() -> MLP:
    torch.manual_seed(0)
    return MLP(MLPConfig(hidden_sizes=[4, 4]), (3,), 2)


def test_tnet_meta_gradient_equals_an_explicit_t_layer_after_each_layer():
    batch = mlp_tasks()
    algo = learner("tnet", tiny_mlp())
    perturb(algo)
    ours = grads(algo, batch)
    maps = [algo.meta[f"T.{k}"].detach().clone().requires_grad_() for k in algo.layers]
    theirs = tnet_reference(tiny_mlp(), maps, batch, steps=STEPS, lr=LR)
    names = [k for k, _ in algo.model.named_parameters()] + [f"T.{k}" for k in algo.layers]
    for name, expected in zip(names, theirs, strict=True):
        torch.testing.assert_close(ours[name], expected, rtol=1e-9, atol=1e-11)


def test_mtnet_with_an_all_ones_mask_is_tnet():
    batch = mlp_tasks()
    tnet, mtnet = learner("tnet", tiny_mlp()), learner("mtnet", tiny_mlp(), mask_logit_init=40.0)
    perturb(tnet), perturb(mtnet)
    ours, theirs = grads(mtnet, batch), grads(tnet, batch)
    for name, expected in theirs.items():
        torch.testing.assert_close(ours[name], expected, rtol=1e-9, atol=1e-11)


def test_mtnet_meta_gradient_equals_the_reference_under_a_drawn_mask():
    """A mixed mask (drawn once per task, the same for every step): the weights' and T's
    meta-gradients equal the explicit-T reference with that mask on the gradient rows."""
    batch = mlp_tasks()
    algo = learner("mtnet", tiny_mlp(), batching="loop")
    perturb(algo)
    with torch.no_grad():  # units that surely adapt (+40) and surely do not (-40)
        for k in algo.layers:
            mask = algo.meta[f"mask.{k}"]
            mask.copy_(40.0 * (torch.arange(mask.numel()) % 2 * 2 - 1))
    ours = grads(algo, batch)
    maps = [algo.meta[f"T.{k}"].detach().clone().requires_grad_() for k in algo.layers]
    masks = [(algo.meta[f"mask.{k}"] > 0).double() for k in algo.layers]
    theirs = tnet_reference(tiny_mlp(), maps, batch, masks, steps=STEPS, lr=LR)
    names = [k for k, _ in algo.model.named_parameters()] + [f"T.{k}" for k in algo.layers]
    for name, expected in zip(names, theirs, strict=True):
        torch.testing.assert_close(ours[name], expected, rtol=1e-9, atol=1e-11)


def test_mtnet_units_with_a_zero_mask_do_not_adapt():
    batch = mlp_tasks()
    algo = learner("mtnet", tiny_mlp(), mask_logit_init=-40.0)
    params, buffers = algo.params()
    options = algo.inner_options(training=True)
    fast = adapt(
        algo.model, params, buffers, Split(batch.support.x[0], batch.support.y[0]), **options
    )
    for name in params:
        assert torch.equal(fast[name], params[name]), name


def test_the_mask_estimator_draws_bernoulli_sigmoid_logits_with_a_soft_gradient():
    torch.manual_seed(0)
    logits = torch.tensor([-1.0, 0.0, 2.0]).repeat(20000, 1).requires_grad_()
    mask = sample_mask(logits, temperature=1.0)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(mask.mean(0), torch.sigmoid(logits[0]).detach(), atol=0.01, rtol=0)
    mask.sum().backward()
    assert (logits.grad > 0).all()  # the straight-through gradient of the soft relaxation


def test_metacurvature_of_a_convolution_is_its_kronecker_product():
    """vec(U) = (M_o kron M_i^T kron M_f) vec(G) for a (out, in, k, k) gradient; M_o G M_i for
    a Linear; elementwise for a bias."""
    g = torch.Generator().manual_seed(0)
    o, i, k = 3, 2, 2
    factors = {
        "out.c": torch.randn(o, o, generator=g),
        "in.c": torch.randn(i, i, generator=g),
        "filter.c": torch.randn(k * k, k * k, generator=g),
        "bias.c": torch.randn(o, generator=g),
        "out.l": torch.randn(o, o, generator=g),
        "in.l": torch.randn(i, i, generator=g),
    }
    grad = {
        "c.weight": torch.randn(o, i, k, k, generator=g),
        "c.bias": torch.randn(o, generator=g),
        "l.weight": torch.randn(o, i, generator=g),
    }
    out = curvature(grad, factors, ["c", "l"])
    kron = torch.kron(
        factors["out.c"], torch.kron(factors["in.c"].T.contiguous(), factors["filter.c"])
    )
    torch.testing.assert_close(out["c.weight"].flatten(), kron @ grad["c.weight"].flatten())
    torch.testing.assert_close(out["c.bias"], factors["bias.c"] * grad["c.bias"])
    torch.testing.assert_close(
        out["l.weight"], factors["out.l"] @ grad["l.weight"] @ factors["in.l"]
    )


def test_transforms_checkpoint_and_evaluate():
    batch = image_tasks()
    algo = learner("metacurvature", tiny_conv())
    perturb(algo)
    state = algo.state_dict()
    other = learner("metacurvature", tiny_conv(seed=1))
    other.load_state_dict(state)
    for k in algo.meta:
        assert torch.equal(other.meta[k], algo.meta[k])
    torch.testing.assert_close(
        other.evaluate(batch, [0, 1])["loss"], algo.evaluate(batch, [0, 1])["loss"]
    )
    mtnet = learner("mtnet", tiny_conv(), test_mask="mode")
    out = mtnet.evaluate(batch, [0, 1, 2])
    assert out["loss"].shape == (TASKS, 3) and out["logits"].shape[:2] == (TASKS, 3)


def test_bad_transforms_are_refused_with_what_to_do():
    with pytest.raises(
        ConfigError, match=r"features\.1 \(TaskBatchNorm2d\).*tnet.*identity, metacurvature"
    ):
        learner("tnet", tiny_conv(), layers=["features.1"])
    with pytest.raises(
        ConfigError, match=r"features\.2 \(ReLU\).*transforms that support a ReLU: identity"
    ):
        learner("metacurvature", tiny_conv(), layers=["features.2"])
    with pytest.raises(ConfigError, match="'body.9'.*does not have.*its layers with parameters"):
        learner("tnet", tiny_mlp(), layers=["body.9"])
    with pytest.raises(ConfigError, match="algo.layers is empty"):
        learner("mtnet", tiny_mlp(), layers=[])
    with pytest.raises(ConfigError, match="pick algo=metacurvature"):
        TransformConfig(name="tnet", transform="metacurvature")
    with pytest.raises(ConfigError, match="checkpoint"):
        learner("mtnet", tiny_mlp(), batching="loop", checkpoint=True)


@pytest.mark.reference("learn2learn")
def test_metacurvature_meta_gradient_equals_learn2learn():
    """Against learn2learn's GBML with its MetaCurvatureTransform (which follows Park & Oliva's
    code) on every layer of a conv4 with BatchNorm, factors off identity: the meta-gradients
    of the weights and of every factor."""
    import learn2learn as l2l

    model, batch = tiny_conv(), image_tasks()
    layers = [n for n, m in model.named_modules() if next(m.parameters(False), None) is not None]
    algo = learner("metacurvature", model, layers=layers)
    perturb(algo)
    ours = grads(algo, batch)

    pairs = {}  # our factor name -> their tensor

    def wrapper(module):
        gbml = l2l.algorithms.GBML(module, l2l.optim.MetaCurvatureTransform, lr=LR)
        names, modules = dict(module.named_parameters()), gbml.compute_update.transforms_modules
        for name, mc in zip(names, modules, strict=True):
            layer, kind = name.rsplit(".", 1)
            if mc.dim == 1:
                pairs[f"{kind if kind == 'weight' else 'bias'}.{layer}"] = mc.mc
            else:  # theirs: mc_in (out x out) G mc_out (in x in), filters by mc_f
                pairs.update({f"out.{layer}": mc.mc_in, f"in.{layer}": mc.mc_out})
                if mc.dim == 4:
                    pairs[f"filter.{layer}"] = mc.mc_f
        assert pairs.keys() == algo.meta.keys()
        with torch.no_grad():
            for key, tensor in pairs.items():
                tensor.copy_(algo.meta[key])
        return gbml

    theirs = l2l_meta_grads(model, batch, wrapper, steps=STEPS)
    for name, _ in model.named_parameters():
        torch.testing.assert_close(ours[name], theirs[f"module.{name}"].grad, rtol=1e-8, atol=1e-10)
    for key, tensor in pairs.items():
        torch.testing.assert_close(ours[key], tensor.grad, rtol=1e-8, atol=1e-10)
