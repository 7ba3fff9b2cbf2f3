"""Hypergradient descent (metalearn.optim): with beta = 0 each optimiser is the torch optimiser
it extends, step for step; the rate follows its hypergradient, may turn negative, resumes from a
state dict, and refuses bad settings."""

import json
import math

import pytest
import torch
from conftest import compose_config

from metalearn.build import build_run
from metalearn.cli import train as meta_train
from metalearn.errors import ConfigError
from metalearn.optim import SGDHD, AdamHD


def problem(seed=0):
    """A small least-squares problem with two parameter tensors (weight and bias)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 5, generator=g), torch.randn(32, 2, generator=g)
    w, b = torch.randn(5, 2, generator=g), torch.zeros(2)
    return x, y, [w, b]


def train(optimizer_cls, steps=8, seed=0, **kwargs):
    x, y, start = problem(seed)
    params = [p.clone().requires_grad_() for p in start]
    optimizer = optimizer_cls(params, **kwargs)
    rates = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((x @ params[0] + params[1] - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        rates.append(optimizer.param_groups[0]["lr"])
    return [p.detach() for p in params], rates, optimizer


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}, {"weight_decay": 1e-2}],
    ids=["sgd", "momentum", "nesterov", "weight_decay"],
)
def test_sgd_hd_with_beta_zero_is_torch_sgd(kwargs):
    ours, rates, _ = train(SGDHD, lr=0.05, hypergrad_lr=0.0, **kwargs)
    theirs, _, _ = train(torch.optim.SGD, lr=0.05, **kwargs)
    assert rates == [0.05] * len(rates)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("foreach", [False, True])
def test_adam_hd_with_beta_zero_is_torch_adam(foreach):
    ours, _, _ = train(AdamHD, lr=0.01, hypergrad_lr=0.0, weight_decay=1e-3)
    theirs, _, _ = train(torch.optim.Adam, lr=0.01, weight_decay=1e-3, foreach=foreach)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b), (a - b).abs().max()


def test_the_rate_moves_by_beta_times_the_gradients_dot_product():
    """SGD-HD's second rate: alpha_1 = alpha_0 + beta * g_1 . g_0, computed by hand."""
    x, y, start = problem()
    w, b = (p.clone().requires_grad_() for p in start)
    optimizer = SGDHD([w, b], lr=0.05, hypergrad_lr=0.01)

    def grads():
        optimizer.zero_grad()
        ((x @ w + b - y) ** 2).mean().backward()
        return torch.cat([w.grad.flatten(), b.grad.flatten()]).clone()

    g0 = grads()
    optimizer.step()
    g1 = grads()
    optimizer.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 + 0.01 * float(g1 @ g0), rel=1e-6)


def test_a_rate_that_overshoots_turns_negative_and_is_kept():
    """Baydin et al. observe negative rates early in training: nothing clips them. A huge beta
    on a step that overshoots (consecutive gradients opposed) drives the rate below zero."""
    _, rates, _ = train(SGDHD, steps=3, lr=0.5, hypergrad_lr=10.0)
    assert min(rates) < 0


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_a_state_dict_resumes_the_same_trajectory(cls):
    whole, whole_rates, _ = train(cls, steps=6, lr=0.01, hypergrad_lr=1e-3)
    x, y, start = problem()
    params = [p.clone().requires_grad_() for p in start]

    def steps(optimizer, n):
        for _ in range(n):
            optimizer.zero_grad()
            ((x @ params[0] + params[1] - y) ** 2).mean().backward()
            optimizer.step()

    first = cls(params, lr=0.01, hypergrad_lr=1e-3)
    steps(first, 3)
    second = cls(params, lr=0.01, hypergrad_lr=1e-3)
    second.load_state_dict(first.state_dict())
    steps(second, 3)
    assert second.param_groups[0]["lr"] == whole_rates[-1]
    for a, b in zip(params, whole, strict=True):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_bad_settings_are_refused(cls):
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="initial learning rate must be positive"):
        cls(p, lr=0.0)
    with pytest.raises(ValueError, match="hypergrad_lr must be >= 0"):
        cls(p, lr=0.1, hypergrad_lr=-1.0)
    groups = [{"params": p}, {"params": [torch.zeros(1, requires_grad=True)]}]
    with pytest.raises(ValueError, match="one rate for all parameters"):
        cls(groups, lr=0.1)


# -- as any trainer's outer optimiser ------------------------------------------------------------

SMOKE = ["debug=smoke", "hardware.threads=1", "trainer.iterations=6", "trainer.eval_every=6"]


@pytest.mark.parametrize("kind", ["sgd_hd", "sgdn_hd", "adam_hd"])
def test_trainer_optimizer_learns_the_outer_rate_and_logs_it(kind, tmp_path):
    """MAML on sinusoid meta-trained by a hypergradient optimiser: its rate moves every step and
    the log records each value (train/outer_lr), from the initial algo.outer_lr."""
    beta = {"adam_hd": 1e-4}.get(kind, 1e-2)
    overrides = [*SMOKE, f"trainer.optimizer={kind}", f"trainer.hypergrad_lr={beta}"]
    meta_train(build_run(compose_config(overrides)), tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rates = [json.loads(x)["train/outer_lr"] for x in lines if "train/outer_lr" in x]
    assert len(rates) == 6 and len(set(rates)) == 6, rates
    assert rates[0] == 0.001  # MAML's outer_lr: the first step has no hypergradient yet


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["trainer.optimizer=adagrad"], ["trainer.optimizer must be one of", "adam_hd"]),
        (["trainer.hypergrad_lr=1e-3"], ["applies to a hypergradient optimiser"]),
        (["trainer.optimizer=sgd_hd", "trainer.hypergrad_lr=-1"], [">= 0 and finite"]),
        (["trainer.optimizer=sgd_hd", "trainer.lr_decay_every=2"], ["'step' schedule", "constant"]),
        (["algo=mamlpp", "trainer.optimizer=adam_hd"], ["'cosine' schedule", "algo=mamlpp"]),
    ],
)
def test_a_learned_rate_with_a_schedule_or_bad_settings_is_refused(overrides, words):
    with pytest.raises(ConfigError) as error:
        build_run(compose_config([*SMOKE, *overrides]))
    for word in words:
        assert word in str(error.value)


# -- MAML's inner rate (algo.inner_lr_hypergradient) ---------------------------------------------


def test_the_inner_rate_follows_its_hypergradient_within_the_inner_loop():
    """Three inner steps of SGD-HD on a linear regressor, against the rule written out:
    alpha_1 = alpha_0 + beta g_1 . g_0, alpha_2 = alpha_1 + beta g_2 . g_1."""
    from metalearn.algos.bilevel.inner import adapt_steps
    from metalearn.data.tasks import Split

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = torch.nn.functional.mse_loss
    options = dict(steps=3, lr=0.1, first_order=True, loss=loss)
    ours = list(adapt_steps(model, params, {}, Split(x, y), hypergradient=0.5, **options))

    def grad(p):
        p = {k: v.clone().requires_grad_() for k, v in p.items()}
        value = loss(torch.func.functional_call(model, p, (x,)), y)
        return dict(zip(p, torch.autograd.grad(value, list(p.values())), strict=True))

    p, rate, previous = params, 0.1, None
    for step in range(3):
        g = grad(p)
        if previous is not None:
            rate = rate + 0.5 * sum(float((g[k] * previous[k]).sum()) for k in g)
        p, previous = {k: p[k] - rate * g[k] for k in p}, g
        for k in p:
            torch.testing.assert_close(ours[step + 1][k], p[k])
    plain = list(adapt_steps(model, params, {}, Split(x, y), **options))
    assert not torch.allclose(plain[-1]["weight"], ours[-1]["weight"])


def test_maml_with_a_hypergradient_inner_rate_meta_trains_and_logs_the_rate(tmp_path):
    """The learned inner rate (the last inner step's, mean and smallest over the meta-batch) is
    logged at every step; it moves away from algo.inner_lr."""
    overrides = [*SMOKE, "algo.inner_steps=3", "algo.inner_lr_hypergradient=true"]
    overrides += ["algo.inner_hypergrad_lr=1e-5"]  # sinusoid gradients are large
    cfg = compose_config(overrides)
    results = meta_train(build_run(cfg), tmp_path)
    assert math.isfinite(results["test"]["mse"]["mean"])
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if "train/inner_lr" in x]
    assert len(logged) == 6
    for x in logged:
        assert x["train/inner_lr"] != cfg["algo"]["inner_lr"]
        assert x["train/inner_lr_min"] <= x["train/inner_lr"]
