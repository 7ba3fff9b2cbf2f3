"""Meta Networks: the fast weights are the meta-networks applied to per-example gradients taken
one by one with autograd; layer augmentation is its definition; a query sees the support set
only through the memory; gradients reach every slow weight and meta-network; it learns; and bad
settings fail early, naming what to change."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config

from metalearn.algos.blackbox.fastnets import conv_fast
from metalearn.algos.blackbox.metanet import MetaNet, MetaNetConfig
from metalearn.build import build_run
from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError
from metalearn.models.conv4 import Conv4, Conv4Config
from metalearn.models.mlp import MLP, MLPConfig
from metalearn.train.schedule import outer_optimizer

IMAGE = (1, 16, 16)
LOSSES = ["cross_entropy", "contrastive"]


def tiny(ways: int = 3, image=IMAGE, hidden: int = 4, **options) -> MetaNet:
    """A MetaNet on a 4-filter conv4 in the default dtype (float64 under the fixture)."""
    torch.manual_seed(0)
    blocks = {"pooled_blocks": 3} if image[-1] < 16 else {}
    model = Conv4(Conv4Config(hidden=hidden, **blocks), image, 0, fused_batchnorm=True)
    cfg = MetaNetConfig(**({"hidden": 6, "meta_hidden": 5} | options))
    return MetaNet(cfg, model.to(torch.get_default_dtype()), "classification", "loop", ways=ways)


# -- hand-written references --------------------------------------------------------------------
def per_item_gradients(net, losses: torch.Tensor, names: list[str]) -> dict:
    """One autograd.grad per item loss: {name: (T, *shape)}."""
    weights = [net.get_parameter(name) for name in names]
    grads = [torch.autograd.grad(loss, weights, retain_graph=True) for loss in losses]
    return {name: torch.stack([g[k] for g in grads]) for k, name in enumerate(names)}


def log_and_sign(g: torch.Tensor, k: float = 7.0) -> torch.Tensor:
    eps = torch.finfo(g.dtype).eps
    magnitude = torch.clamp(torch.log(g.abs() + eps) / k, min=-1.0)
    return torch.stack([magnitude, torch.clamp(g * math.exp(k), -1.0, 1.0)], -1)


def mlp_by_hand(nets, features: torch.Tensor) -> torch.Tensor:
    """m: Linear-ReLU-Linear-ReLU-Linear on each coordinate's (log, sign) pair."""
    first, _, second, _, last = nets.m
    h = torch.relu(features @ first.weight.T + first.bias)
    h = torch.relu(h @ second.weight.T + second.bias)
    return (h @ last.weight.T + last.bias)[..., 0]


def lstm_by_hand(nets, sequence: torch.Tensor) -> torch.Tensor:
    """d: the LSTM cell's equations stepped over the T gradients (T, P, 2), then Linear(H, 1)."""
    lstm = nets.d_lstm
    h = c = sequence.new_zeros(sequence.shape[1], lstm.hidden_size)
    for x in sequence:
        gates = (
            x @ lstm.weight_ih_l0.T + lstm.bias_ih_l0 + h @ lstm.weight_hh_l0.T + lstm.bias_hh_l0
        )
        i, f, g, o = gates.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
    return (h @ nets.d_out.weight.T + nets.d_out.bias)[:, 0]


def through_meta_networks(algo: MetaNet, net, grads: dict, generator) -> dict:
    """Each group's gradients (conv weights, fc weights), flattened in order, preprocessed and
    mapped by `generator`, then cut back into the weights' shapes."""
    fast = {}
    for group, rank in (("conv", 5), ("fc", 3)):  # (T, *shape) of a conv weight has 5 dims
        names = [n for n in net.fast_names if grads[n].dim() == rank]
        flat = torch.cat([grads[n].flatten(1) for n in names], 1)  # (T, P)
        out = generator(algo.meta[group], log_and_sign(flat))
        sizes = [grads[n][0].numel() for n in names]
        for name, part in zip(names, out.split(sizes, -1), strict=True):
            fast[name] = part.reshape(*out.shape[:-1], *grads[name].shape[1:])
    return fast


def pair_losses_by_hand(r: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Hadsell et al.'s loss on every pair i < j, margin 1."""
    losses = []
    for i in range(len(y)):
        for j in range(i + 1, len(y)):
            distance = torch.linalg.vector_norm(r[i] - r[j])
            same = y[i] == y[j]
            losses.append(distance**2 / 2 if same else torch.relu(1 - distance) ** 2 / 2)
    return torch.stack(losses)


def support_set(ways: int = 3, shots: int = 2, image=IMAGE, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(ways * shots, *image, generator=g).to(torch.get_default_dtype())
    return x, torch.arange(ways).repeat_interleave(shots)  # in label order


# -- the math -----------------------------------------------------------------------------------
@pytest.mark.parametrize("embedding_loss", LOSSES)
def test_fast_weights_are_the_meta_networks_on_per_example_gradients(embedding_loss, float64):
    algo = tiny(embedding_loss=embedding_loss)
    x, y = support_set()
    # example level (Algorithm 1, lines 7-10): W*_i = m(Z, grad_W loss(b(W, x_i), y_i)), with
    # BatchNorm over the support set
    losses = F.cross_entropy(algo.base(x), y, reduction="none")
    grads = per_item_gradients(algo.base, losses, algo.base.fast_names)
    expected = through_meta_networks(algo, algo.base, grads, mlp_by_hand)
    memory = algo.example_fast_weights(x, y)
    assert set(memory) == set(expected) == set(algo.base.fast_names)
    for name, weight in memory.items():
        assert weight.shape == (len(y), *algo.base.get_parameter(name).shape)
        torch.testing.assert_close(weight, expected[name], rtol=1e-10, atol=1e-12)
    # task level (lines 2-6): Q* = d(G, {grad_Q loss_emb}), the LSTM stepped over the items
    u = algo.representation
    if embedding_loss == "contrastive":
        losses = pair_losses_by_hand(u(x, key=True), y)
    else:
        losses = F.cross_entropy(u(x), y, reduction="none")
    grads = per_item_gradients(u, losses, u.fast_names)
    expected = through_meta_networks(algo, u, grads, lstm_by_hand)
    task = algo.task_fast_weights(x, y)
    assert set(task) == set(u.fast_names)
    for name, weight in task.items():
        torch.testing.assert_close(weight, expected[name], rtol=1e-10, atol=1e-12)


def test_layer_augmentation_sums_slow_and_fast_outputs_after_a_relu_each(float64):
    algo = tiny()
    net, x = algo.base, support_set()[0]
    torch.manual_seed(1)
    fc1, fc2 = torch.randn(6, net.fc1.in_features), torch.randn(3, 6)
    h = net.features(x, {})  # no conv fast weight: the slow trunk
    hidden = torch.relu(h @ net.fc1.weight.T) + torch.relu(h @ fc1.T)
    expected = hidden @ net.fc2.weight.T + hidden @ fc2.T  # the output layer: no ReLU
    got = net(x, {"fc1.weight": fc1, "fc2.weight": fc2})
    torch.testing.assert_close(got, expected)
    key = net(x, {"fc1.weight": fc1}, key=True)  # u's representation: no ReLU either
    torch.testing.assert_close(key, h @ net.fc1.weight.T + h @ fc1.T)
    # a conv layer: slow and fast paths each through BatchNorm and ReLU, summed, then pooled
    conv, norm, pool = net.blocks[0].conv, net.blocks[0].norm, net.blocks[0].pool
    w = torch.randn_like(conv.weight)
    h = pool(torch.relu(norm(conv(x))) + torch.relu(norm(F.conv2d(x, w, padding=1))))
    for block in net.blocks[1:]:  # the other blocks have no fast weight: slow only
        h = block.pool(torch.relu(block.norm(block.conv(h))))
    torch.testing.assert_close(net.features(x, {net.conv_names[0]: w}), h.flatten(1))


def test_per_example_fast_weights_equal_one_convolution_per_example(float64):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).double()
    x, w = torch.randn(5, 3, 6, 6), torch.randn(5, 4, 3, 3, 3)
    loop = torch.cat([F.conv2d(x[i : i + 1], w[i], padding=1) for i in range(5)])
    torch.testing.assert_close(conv_fast(x, w, conv), loop)
    algo = tiny()
    net, x = algo.base, support_set()[0]
    fast = {n: torch.randn_like(net.get_parameter(n)) for n in net.fast_names}
    shared = {n: w.expand(len(x), *w.shape) for n, w in fast.items()}  # one copy per example
    torch.testing.assert_close(net(x, shared), net(x, fast))


@pytest.mark.parametrize("embedding_loss", LOSSES)
def test_a_query_depends_on_the_support_set_only_through_the_memory(embedding_loss, float64):
    """Permuting the support examples with their labels permutes the memory and its keys alike,
    so each query reads the same fast weights: its logits do not change (1-shot: exactly)."""
    algo = tiny(ways=5, embedding_loss=embedding_loss)
    x, y = support_set(ways=5, shots=1)
    queries = support_set(ways=5, shots=2, seed=1)[0] + 0.1
    base = algo.task_logits(x, y, queries)
    for seed in range(3):
        order = torch.randperm(5, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(algo.task_logits(x[order], y[order], queries), base)
    relabelled = y.roll(1)  # the same images under other labels: other predictions
    assert not torch.allclose(algo.task_logits(x, relabelled, queries), base)


def test_gradients_reach_every_slow_weight_and_meta_network():
    algo = tiny(ways=3)
    x, y = support_set()
    batch = TaskBatch(
        Split(x[None].repeat(2, 1, 1, 1, 1), y.expand(2, -1)),
        Split(x[None].repeat(2, 1, 1, 1, 1) + 0.05, y.expand(2, -1)),
        3,
    )
    loss, metrics = algo.meta_loss(batch)
    loss.backward()
    named = {f"{net}.{n}": p for net, m in algo.networks().items() for n, p in m.named_parameters()}
    assert {n.split(".")[0] for n in named} == {"base", "representation", "meta"}
    silent = [name for name, p in named.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, silent  # W (b), Q (u), Z (m) and G (d) all learn from the query loss
    assert "readout" in algo.state_dict()["representation"]  # u's fixed classifier, a buffer
    out = algo.evaluate(batch, [0])
    assert out["loss"].shape == out["score"].shape == (2, 1) and out["logits"].shape == (2, 1, 6, 3)
    torch.testing.assert_close(out["loss"].mean(), loss.detach(), rtol=1e-4, atol=1e-6)
    other = tiny(ways=3)
    for p in other.parameters():
        p.data.add_(1.0)
    other.load_state_dict(algo.state_dict())
    torch.testing.assert_close(other.evaluate(batch, [0])["logits"], out["logits"])
    assert algo.predict(Split(x, y), x).shape == (6, 3)


# -- learning -----------------------------------------------------------------------------------
def test_it_learns_real_omniglot_tasks_beyond_chance(omniglot_root):
    """50 steps of 4 real 5-way 1-shot tasks on a tiny model (8 filters; fast weights for fc1
    and fc2, where learning starts soonest; the plateau at chance lasts about 30 steps): test
    accuracy well above chance (0.2, with a standard deviation of 0.025 over these 250 test
    queries)."""
    overrides = ["experiment=metanet_omniglot_5w1s", "debug=smoke", "hardware.threads=1"]
    overrides += [f"data.root={omniglot_root}", "model.hidden=8", "algo.hidden=16"]
    overrides += ["algo.fast_blocks=0", "algo.outer_lr=0.01", "data.query=3"]
    run = build_run(compose_config(overrides))
    optimizer = outer_optimizer(run.config.algo, run.algo)
    generator = torch.Generator().manual_seed(0)
    (test,) = run.tasks.episodes("test", 10, 5, 1, 5, seed=0, batch_size=10)
    before = run.algo.evaluate(test, [0])["score"].mean().item()
    torch.manual_seed(0)
    for _ in range(50):
        loss, _ = run.algo.meta_loss(run.tasks.sample("train", generator, 4, *run.train_shape))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = run.algo.evaluate(test, [0])["score"].mean().item()
    assert accuracy > 0.4 and accuracy > before + 0.15, (before, accuracy)


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"embedding_loss": "triplet"}, "algo.embedding_loss"),
        ({"hidden": 0}, "algo.hidden"),
        ({"meta_hidden": 0}, "algo.meta_hidden"),
        ({"gradient_scale": 0.0}, "algo.gradient_scale"),
        ({"fast_blocks": -1}, "algo.fast_blocks"),
        ({"outer_lr": 0.0}, "algo.outer_lr"),
    ],
)
def test_bad_settings_fail_naming_the_key(options: dict, key: str):
    with pytest.raises(ConfigError, match=key):
        MetaNetConfig(**options)


def test_a_model_or_task_it_cannot_take_fails_saying_what_to_change():
    with pytest.raises(ConfigError, match="algo.fast_blocks=5.*4 conv blocks"):
        tiny(fast_blocks=5)
    mlp = MLP(MLPConfig(hidden_sizes=[8]), IMAGE, 0)
    with pytest.raises(ConfigError, match="model=conv4.*MLP"):
        MetaNet(MetaNetConfig(), mlp, "classification", "loop", ways=3)
    algo = tiny(ways=3)
    x, y = support_set(ways=4, shots=1)
    batch = TaskBatch(Split(x[None], y[None]), Split(x[None], y[None]), 4)
    with pytest.raises(ConfigError, match="built for 3-way tasks and got 4-way"):
        algo.meta_loss(batch)
    single = tiny(ways=3, embedding_loss="contrastive")
    with pytest.raises(ConfigError, match="at least two support examples"):
        single.task_fast_weights(x[:1], y[:1])
