"""Bayesian gradient-based meta-learners (EMAML, BMAML, the variational VMAML): EMAML with one
particle is MAML, SVGD with one particle is MAML's inner loop, BMAML's meta-gradient equals a
plain transcription of the paper's chaser loss over Liu & Wang's SVGD (float64), VMAML with a
vanishing variance is MAML, the ensemble's predictions, the finite sinusoid task sets, runs on
sinusoid and on real Omniglot, and the errors bad input gets."""

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import compose_config

from metalearn.algos.bilevel.bmaml import BMAML, svgd_direction
from metalearn.algos.bilevel.maml import MAML, MAMLConfig
from metalearn.algos.bilevel.particles import EnsembleMAML, ParticlesConfig
from metalearn.algos.bilevel.vmaml import VariationalConfig, VariationalMAML, kl_to_standard_normal
from metalearn.build import build_run
from metalearn.cli import train
from metalearn.data.sinusoid import SinusoidConfig, SinusoidTasks
from metalearn.data.tasks import Split
from metalearn.errors import ConfigError
from metalearn.models.mlp import MLP, MLPConfig

sys.path.insert(0, str(Path(__file__).parent / "reference"))
from bmaml_svgd import bmaml_meta_gradient  # noqa: E402
from vampire2 import vampire_meta_gradient  # noqa: E402

TASKS = 3


def tiny_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(MLPConfig(hidden_sizes=[8, 8]), (1,), 1).double()


def sinusoids(seed: int = 1):
    tasks = SinusoidTasks(SinusoidConfig(), torch.device("cpu"))
    batch = tasks.sample("train", torch.Generator().manual_seed(seed), TASKS, 1, 5, 6)
    batch.support.x, batch.support.y = batch.support.x.double(), batch.support.y.double()
    batch.query.x, batch.query.y = batch.query.x.double(), batch.query.y.double()
    return batch


def meta_gradient(algo, batch) -> list[torch.Tensor]:
    objective, _ = algo.meta_loss(batch)
    return torch.autograd.grad(objective, algo.parameters())


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_emaml_with_one_particle_is_maml(batching: str):
    options = {"inner_lr": 0.05, "inner_steps": 2, "test_inner_steps": 2}
    maml = MAML(MAMLConfig(**options), tiny_mlp(), "regression", batching)
    emaml = EnsembleMAML(
        ParticlesConfig(name="emaml", particles=1, **options), tiny_mlp(), "regression", batching
    )
    batch = sinusoids()
    for mine, theirs in zip(meta_gradient(emaml, batch), meta_gradient(maml, batch), strict=True):
        assert torch.allclose(mine[0], theirs, atol=1e-12)
    steps = [0, 2]
    a, b = emaml.evaluate(batch, steps), maml.evaluate(batch, steps)
    assert torch.allclose(a["score"], b["score"], atol=1e-12)


@pytest.mark.parametrize("log_posterior", ["mean", "sum"])
def test_svgd_with_one_particle_is_mamls_inner_loop(log_posterior: str):
    options = {"inner_lr": 0.05, "inner_steps": 3, "test_inner_steps": 3}
    maml = MAML(MAMLConfig(**options), tiny_mlp(), "regression", "loop")
    cfg = ParticlesConfig(name="bmaml", particles=1, log_posterior=log_posterior, **options)
    bmaml = BMAML(cfg, tiny_mlp(), "regression", "loop")
    batch = sinusoids()
    support = Split(batch.support.x[0], batch.support.y[0])
    params, buffers = maml.params()
    particles, _ = bmaml.params()
    mine = list(bmaml.trajectory(particles, buffers, support, training=True))
    theirs = list(maml.trajectory(params, buffers, support, training=True))
    assert len(mine) == len(theirs) == 4
    for a, b in zip(mine, theirs, strict=True):
        for name in b:
            assert torch.allclose(a[name][0], b[name], atol=1e-12)


def test_the_svgd_direction_drives_and_repels():
    """Two particles with zero gradient move apart (the kernel's repulsion); with one, the
    direction is the gradient itself."""
    flat = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    phi = svgd_direction(flat, torch.zeros(2, 2))
    assert phi[0, 0] < 0 < phi[1, 0] and torch.allclose(phi[:, 1], torch.zeros(2))
    g = torch.tensor([[0.3, -1.0]])
    assert torch.allclose(svgd_direction(flat[:1], g), g)


@pytest.mark.parametrize("particles", [3, 4])
def test_bmamls_meta_gradient_equals_the_transcription_of_the_paper(particles: int):
    """The chaser loss's gradient for each particle's initialisation, against
    tests/reference/bmaml_svgd.py (second order, 2 inner steps, 1 leader step; 4 particles:
    an even number of pairwise distances, numpy's median)."""
    cfg = ParticlesConfig(name="bmaml", particles=particles, inner_lr=0.05, inner_steps=2)
    algo = BMAML(cfg, tiny_mlp(), "regression", "loop")
    batch = sinusoids()
    mine = meta_gradient(algo, batch)  # (M, *shape) per parameter
    model = tiny_mlp()
    inits = [
        torch.cat([algo.particles[k][m].detach().flatten() for k, _ in model.named_parameters()])
        .clone()
        .requires_grad_()
        for m in range(particles)
    ]
    tasks = [
        (batch.support.x[t], batch.support.y[t], batch.query.x[t], batch.query.y[t])
        for t in range(TASKS)
    ]
    loss = torch.nn.functional.mse_loss
    theirs = bmaml_meta_gradient(model, inits, tasks, loss, 0.05, 2, 1)
    for m in range(particles):
        flat = torch.cat([g[m].flatten() for g in mine])
        assert torch.allclose(flat, theirs[m], atol=1e-10)


def test_bmamls_gaussian_posterior_meta_gradient_equals_the_authors_network():
    """algo.log_posterior=gaussian: the chaser loss's gradient for each particle's weights and
    precisions, against the transcription of the authors' bnn.py and update_particle
    (tests/reference/bmaml_svgd.py, second order, 2 inner steps, 1 leader step, 3 particles)."""
    particles, lr = 3, 1e-3
    cfg = ParticlesConfig(
        name="bmaml", particles=particles, inner_lr=lr, inner_steps=2, log_posterior="gaussian"
    )
    algo = BMAML(cfg, tiny_mlp(), "regression", "loop")
    assert algo.particles["log_gamma"].shape == (particles,)
    batch = sinusoids()
    params = algo.particles
    mine = dict(zip(params, meta_gradient(algo, batch), strict=True))
    model = tiny_mlp()
    names = [k for k, _ in model.named_parameters()]

    def flat(source, m):  # the authors' order: the network, then log lambda, log gamma
        parts = [source[k][m].flatten() for k in names]
        return torch.cat([*parts, source["log_lambda"][m][None], source["log_gamma"][m][None]])

    inits = [flat(params, m).detach().clone().requires_grad_() for m in range(particles)]
    tasks = [
        (batch.support.x[t], batch.support.y[t], batch.query.x[t], batch.query.y[t])
        for t in range(TASKS)
    ]
    theirs = bmaml_meta_gradient(model, inits, tasks, "bnn", lr, 2, 1)
    for m in range(particles):
        assert torch.allclose(flat(mine, m), theirs[m], atol=1e-10, rtol=1e-8)


def test_bmamls_gaussian_posterior_refuses_classification_and_other_learners():
    with pytest.raises(ConfigError, match="regression"):
        cfg = ParticlesConfig(name="bmaml", log_posterior="gaussian")
        BMAML(cfg, tiny_mlp(), "classification", "loop")
    with pytest.raises(ConfigError, match="BMAML's"):
        ParticlesConfig(name="emaml", log_posterior="gaussian")
    with pytest.raises(ConfigError, match="noise_prior"):
        ParticlesConfig(name="bmaml", log_posterior="gaussian", noise_prior=[2.0, 0.0])


def test_the_gaussian_nll_is_normals_and_a_diverged_task_gives_nan_not_an_error():
    from metalearn.algos.bilevel.particles import gaussian_nll

    mean, std, y = torch.randn(7), torch.rand(7) + 0.1, torch.randn(7)
    expected = -torch.distributions.Normal(mean, std).log_prob(y).mean()
    assert torch.allclose(gaussian_nll(mean, std, y), expected)
    mean[2] = float("nan")
    assert gaussian_nll(mean, std, y).isnan()


def test_particles_start_apart_and_the_ensemble_averages_probabilities():
    torch.manual_seed(0)
    model = MLP(MLPConfig(hidden_sizes=[8]), (4,), 3).double()
    algo = EnsembleMAML(ParticlesConfig(particles=3), model, "classification", "loop")
    weights = algo.particles["body.0.weight"]
    assert not torch.allclose(weights[0], weights[1])
    outputs = torch.randn(3, 5, 3, dtype=torch.float64)
    mean = outputs.softmax(-1).mean(0)
    assert torch.allclose(algo.ensemble(outputs).exp(), mean)


def test_a_finite_sinusoid_task_set_feeds_training_only():
    tasks = SinusoidTasks(SinusoidConfig(train_tasks=4), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    amplitudes = tasks.sample("train", gen, 200, 1, 5, 5).info["amplitude"]
    assert len(set(amplitudes.tolist())) == 4  # the same four functions, new inputs
    test = next(tasks.episodes("test", 50, 1, 5, 5, seed=1, batch_size=50))
    assert len(set(test.info["amplitude"].tolist())) == 50
    with pytest.raises(ConfigError, match="data.train_tasks"):
        SinusoidConfig(train_tasks=0)


def test_bmamls_sinusoids_fix_each_training_tasks_points_and_keep_test_queries_clean():
    """BMAML's variant: y = A sin(f x - phase) + 0.01 A eps on what a learner sees; a finite
    training task is the same points at every visit; test queries are the clean function;
    MAML's family draws exactly the episodes it drew before the frequency and noise existed."""
    cfg = SinusoidConfig(
        train_tasks=3, fixed_points=True, noise=0.01, frequency=[0.5, 2.0], phase=[0.0, 6.28]
    )
    tasks, gen = SinusoidTasks(cfg, torch.device("cpu")), torch.Generator().manual_seed(0)
    batch = tasks.sample("train", gen, 60, 1, 4, 6)
    by_task = {}
    for t, a in enumerate(batch.info["amplitude"].tolist()):
        seen = torch.cat([batch.support.x[t], batch.query.x[t], batch.support.y[t]])
        assert torch.equal(by_task.setdefault(a, seen), seen)  # the same points every visit
    assert len(by_task) == 3
    test = next(tasks.episodes("test", 20, 1, 4, 6, seed=1, batch_size=20))
    a, f, phase = (test.info[k][:, None, None] for k in ("amplitude", "frequency", "phase"))
    clean = a * torch.sin(f * test.query.x - phase)
    assert torch.allclose(test.query.y, clean, atol=1e-6)
    noise = (test.support.y - a * torch.sin(f * test.support.x - phase)) / a
    assert 0.005 < noise.std() < 0.015 and not (0.5 <= f).logical_and(f <= 2).logical_not().any()
    plain = SinusoidTasks(SinusoidConfig(), torch.device("cpu"))
    first = next(plain.episodes("test", 4, 1, 5, 5, seed=3, batch_size=4))
    x, y = first.support.x, first.support.y
    a, phase = first.info["amplitude"][:, None, None], first.info["phase"][:, None, None]
    assert torch.allclose(y, a * torch.sin(x - phase)) and "frequency" not in first.info
    with pytest.raises(ConfigError, match="data.train_tasks"):
        SinusoidConfig(fixed_points=True)
    with pytest.raises(ConfigError, match="data.noise"):
        SinusoidConfig(noise=-0.1)


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_vmamls_meta_gradient_equals_the_transcription_of_the_authors_vampire2(kind: str):
    """Second order, 2 inner steps, 3 draws, a KL weight large enough to matter: the gradient for
    the means and log-stds equals tests/reference/vampire2.py under the same seed (the draws
    come in the authors' order)."""
    options = {"inner_lr": 0.05, "inner_steps": 2, "samples": 3, "kl_weight": 0.01}
    if kind == "regression":
        model, batch, loss = tiny_mlp(), sinusoids(), torch.nn.functional.mse_loss
    else:
        torch.manual_seed(0)
        model = MLP(MLPConfig(hidden_sizes=[8]), (4,), 3).double()
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(TASKS, 12, 4, generator=gen, dtype=torch.float64)
        y = torch.arange(3).repeat(4).expand(TASKS, 12)
        batch = types.SimpleNamespace(
            support=Split(x[:, :6], y[:, :6]), query=Split(x[:, 6:], y[:, 6:]), tasks=TASKS
        )
        loss = torch.nn.functional.cross_entropy
    algo = VariationalMAML(VariationalConfig(**options), model, kind, "loop")
    torch.manual_seed(7)
    objective, _ = algo.objective(batch)
    params = algo.params()[0]  # the means (the model's weights) and "logstd." + name
    mine = dict(zip(params, torch.autograd.grad(objective, list(params.values())), strict=True))
    names = [name for name, _ in model.named_parameters()]
    means = [params[k].detach().clone().requires_grad_() for k in names]
    log_stds = [params["logstd." + k].detach().clone().requires_grad_() for k in names]
    tasks = [
        (batch.support.x[t], batch.support.y[t], batch.query.x[t], batch.query.y[t])
        for t in range(TASKS)
    ]
    torch.manual_seed(7)
    theirs = vampire_meta_gradient(model, means, log_stds, tasks, loss, 0.05, 2, 3, 0.01)
    ours = [mine[k] for k in names] + [mine["logstd." + k] for k in names]
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_vmaml_with_a_vanishing_variance_and_no_kl_is_maml():
    """Draws w = mean + exp(-40) eps are the mean: the meta-gradient of the mean is MAML's."""
    options = {"inner_lr": 0.05, "inner_steps": 2}
    maml = MAML(MAMLConfig(**options), tiny_mlp(), "regression", "loop")
    cfg = VariationalConfig(kl_weight=0.0, init_logstd=[-40.0, -40.0], samples=3, **options)
    vmaml = VariationalMAML(cfg, tiny_mlp(), "regression", "loop")
    batch = sinusoids()
    mine, theirs = meta_gradient(vmaml, batch), meta_gradient(maml, batch)
    for a, b in zip(mine[: len(theirs)], theirs, strict=True):  # the means, then log-stds
        assert torch.allclose(a, b, atol=1e-10)


def test_the_kl_to_the_standard_normal():
    mean, log_std = torch.randn(4, 3), torch.randn(4, 3) * 0.3
    q = torch.distributions.Normal(mean, log_std.exp())
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum()
    got = kl_to_standard_normal({"w": mean, "logstd.w": log_std})
    assert torch.allclose(got, expected)


@pytest.mark.parametrize("name", ["emaml", "bmaml", "vmaml", "bmaml_sinusoid_yoon"])
def test_a_particle_run_on_sinusoid_reports_mse_nll_and_coverage(name: str, tmp_path):
    """Each learner, and BMAML with the authors' network on their sinusoid protocol; results.json
    names the task batching each does (VMAML loops over its tasks whatever hardware says)."""
    overrides = [f"algo={name}", "data.train_tasks=10", "algo.particles=2"]
    if name == "vmaml":
        overrides = [f"algo={name}", "data.train_tasks=10", "algo.samples=2"]
    elif name.endswith("yoon"):
        overrides = [f"experiment={name}", "algo.particles=2", "eval.episodes=10"]
    overrides += ["debug=smoke", "hardware.threads=1"]
    train(build_run(compose_config(overrides)), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    test = results["test"]
    assert test["mse"]["mean"] > 0 and test["nll"]["mean"] == test["nll"]["mean"]
    assert 0 <= test["coverage90"]["mean"] <= 1
    if name == "vmaml":
        assert results["hardware"]["task_batching"] == "loop"
        assert results["hardware"]["test_task_batching"] == "loop"


@pytest.mark.parametrize("name", ["bmaml", "vmaml"])
def test_on_real_omniglot_the_ensemble_reports_calibration(name: str, omniglot_root, tmp_path):
    overrides = [f"algo={name}", "data=omniglot", f"data.root={omniglot_root}", "debug=smoke"]
    overrides += ["hardware.threads=1", "model.hidden=8"]
    overrides += ["algo.particles=2"] if name == "bmaml" else ["algo.test_samples=3"]
    train(build_run(compose_config(overrides)), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    calibration = results["test"]["calibration"]["pooled"]
    assert 0 <= calibration["ece"] <= 1 and calibration["nll"] > 0
    assert (tmp_path / "plots" / "reliability.png").is_file()


def test_bad_input_gets_a_clear_error():
    with pytest.raises(ConfigError, match="algo.particles"):
        ParticlesConfig(particles=0)
    with pytest.raises(ConfigError, match="bn_mode=transductive"):
        ParticlesConfig(bn_mode="running")
    algo = EnsembleMAML(ParticlesConfig(particles=8), tiny_mlp(), "regression", "loop")
    what, before, _ = algo.memory_advice()
    assert "algo.particles=8" in what and "algo.particles=4" in before[0]
