"""Gaussian-process tasks and neural processes: the exact GP oracle against a direct
multivariate-normal computation, the fixed test functions, the processes' invariance to the
order of the context set, their estimators, a run end to end, and the errors bad input gets."""

import json
import math

import pytest
import torch
from conftest import compose_config

from metalearn.build import build_run
from metalearn.cli import train
from metalearn.data.gp import KERNELS, GPConfig, GPTasks, kernel_matrix, oracle_scores
from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError

PROCESSES = ("cnp", "acnp", "np", "anp", "convcnp")
SMOKE = ["debug=smoke", "hardware.threads=1", "data=gp"]


def direct_loglik(batch: TaskBatch, task: int) -> float:
    """Per-point predictive log-density of one task's targets by the definition:
    log N([y_c, y_t]) - log N(y_c) under the joint covariance K + noise I, one target at a time."""
    n = int(batch.info["context"][task])
    info = {k: v[task : task + 1] for k, v in batch.info.items()}
    xc, yc = batch.support.x[task : task + 1, :n].double(), batch.support.y[task, :n, 0].double()
    total = 0.0
    for x, y in zip(batch.query.x[task].double(), batch.query.y[task, :, 0].double(), strict=True):
        points = torch.cat([xc, x[None, None]], 1)
        cov = kernel_matrix(points, points, info)[0] + info["noise"][0] * torch.eye(n + 1)
        joint = torch.distributions.MultivariateNormal(torch.zeros(n + 1), cov)
        total += joint.log_prob(torch.cat([yc, y[None]])).item()
        if n:
            context = torch.distributions.MultivariateNormal(torch.zeros(n), cov[:n, :n])
            total -= context.log_prob(yc).item()
    return total / batch.query.x.shape[1]


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_gp_oracle_equals_a_direct_multivariate_normal_computation(kernel: str):
    tasks = GPTasks(GPConfig(kernel=kernel, query=16, shots=6), torch.device("cpu"))
    batch = next(tasks.episodes("test", 4, 1, 6, 16, seed=3, batch_size=4))
    oracle = tasks.oracle(batch)["loglik"]
    for task in range(4):
        assert oracle[task].item() == pytest.approx(direct_loglik(batch, task), abs=1e-4)


def test_the_tnp_sampler_and_its_oracle():
    """Separate context and target inputs, RBF hyperparameters per function in the BNP ranges."""
    tasks = GPTasks(GPConfig(sampler="tnp", shots=10, min_shots=3, query=12), torch.device("cpu"))
    batch = next(tasks.episodes("test", 5, 1, 10, 12, seed=0, batch_size=5))
    assert batch.support.x.shape == (5, 10, 1) and batch.query.x.shape == (5, 12, 1)
    assert ((batch.info["length"] >= 0.1) & (batch.info["length"] <= 0.6)).all()
    assert ((batch.info["context"] >= 3) & (batch.info["context"] <= 10)).all()
    for task in range(5):
        assert tasks.oracle(batch)["loglik"][task].item() == pytest.approx(
            direct_loglik(batch, task), abs=1e-4
        )


def test_test_functions_are_fixed_whatever_the_batch_size_and_padding_is_inert():
    tasks = GPTasks(GPConfig(kernel="mix"), torch.device("cpu"))
    whole = next(tasks.episodes("test", 120, 1, 50, 128, seed=1, batch_size=120))
    parts = list(tasks.episodes("test", 120, 1, 50, 128, seed=1, batch_size=7))
    assert torch.equal(torch.cat([p.query.y for p in parts]), whole.query.y)
    assert torch.equal(torch.cat([p.info["context"] for p in parts]), whole.info["context"])
    counts = whole.info["context"]
    assert counts.min() >= 0 and counts.max() <= 50 and len(set(counts.tolist())) > 30
    # the oracle ignores what sits in the padding
    noisy = Split(
        whole.support.x + 7.0 * (torch.arange(50)[None, :, None] >= counts[:, None, None]),
        whole.support.y,
    )
    a = oracle_scores(whole.support, whole.query, whole.info)["loglik"]
    b = oracle_scores(noisy, whole.query, whole.info)["loglik"]
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("name", PROCESSES)
def test_a_process_is_invariant_to_the_order_of_its_context_and_ignores_padding(name: str):
    run = build_run(compose_config([f"algo={name}", *SMOKE, "algo.hidden=32", "algo.heads=4"]))
    batch = run.tasks.sample("train", torch.Generator().manual_seed(0), 3, 1, 50, 128)
    count = batch.info["context"]
    shuffled_x, shuffled_y = batch.support.x.clone(), batch.support.y.clone()
    for t, c in enumerate(count.tolist()):
        perm = torch.randperm(c)
        shuffled_x[t, :c], shuffled_y[t, :c] = batch.support.x[t, perm], batch.support.y[t, perm]
        shuffled_x[t, c:] = 3.0  # padding holds anything
    shuffled = TaskBatch(Split(shuffled_x, shuffled_y), batch.query, 1, batch.info)
    torch.manual_seed(0)
    a = run.algo.evaluate(batch, [0])
    torch.manual_seed(0)  # the same draws of z for latent processes
    b = run.algo.evaluate(shuffled, [0])
    assert torch.allclose(a["score"], b["score"], atol=1e-4)
    assert torch.isfinite(a["score"]).all()


def test_a_process_predicts_from_an_empty_context():
    """Zero context points: a neural process gives its prior predictive, finite."""
    run = build_run(compose_config(["algo=anp", *SMOKE, "data.shots=0", "algo.hidden=32"]))
    batch = run.tasks.sample("train", torch.Generator().manual_seed(0), 2, 1, 0, 128)
    assert batch.support.x.shape[1] == 0
    out = run.algo.evaluate(batch, [0])
    assert torch.isfinite(out["score"]).all()
    loss, _ = run.algo.meta_loss(batch)
    loss.backward()


def test_the_ml_and_elbo_objectives():
    """ML: the log of the mean likelihood over draws of z from q(z | context); with one draw it
    is that draw's log-likelihood. ELBO: the expected log-likelihood under q(z | context and
    targets) less the KL, per point, so below the ML estimate with the posterior's own draws."""
    run = build_run(compose_config(["algo=np", *SMOKE, "algo.objective=ml", "algo.hidden=16"]))
    algo = run.algo
    batch = run.tasks.sample("train", torch.Generator().manual_seed(0), 4, 1, 50, 128)
    torch.manual_seed(1)
    value, pred = algo.loglik(batch, training=True)
    assert pred["mean"].shape == (16, 4, 128)  # algo.train_samples draws
    logp = torch.distributions.Normal(pred["mean"], pred["std"]).log_prob(batch.query.y[..., 0])
    by_hand = (logp.double().sum(-1).exp().mean(0).log() / 128).float()  # no underflow
    assert torch.allclose(value, by_hand, atol=1e-4, rtol=1e-4)
    algo.cfg.objective = "elbo"
    torch.manual_seed(1)
    elbo, pred = algo.loglik(batch, training=True)
    assert pred["mean"].shape == (1, 4, 128) and torch.isfinite(elbo).all()


def test_a_neural_process_run_reports_loglik_beside_the_oracle(tmp_path):
    """metalearn train on data=gp: results.json's metric is the per-point log-likelihood, with
    its unit, the MSE and 90% coverage, and the exact GP posterior on the same test functions."""
    run_dir = tmp_path / "run"
    train(build_run(compose_config(["algo=convcnp", *SMOKE, "eval.episodes=40"])), run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    test = results["test"]
    assert results["metric"] == "loglik" and test["unit"] == "nats per target point"
    assert set(test) >= {"loglik", "mse", "coverage90", "oracle"}
    assert 0 <= test["coverage90"]["mean"] <= 1
    assert test["loglik"]["mean"] < test["oracle"]["loglik"]["mean"]  # the ceiling
    assert test["oracle"]["mse"]["mean"] < test["mse"]["mean"]
    assert math.isfinite(test["loglik"]["ci95"])
    assert (run_dir / "plots" / "predictive_bands.png").stat().st_size > 0


def test_bad_input_gets_a_clear_error():
    with pytest.raises(ConfigError, match="rbf, periodic, matern, variable_matern, mix"):
        GPConfig(kernel="laplace")
    with pytest.raises(ConfigError, match="sampler=npf"):
        GPConfig(sampler="tnp", kernel="periodic")
    # an inner loop on contexts of U{0..50} points: it needs at least one, of a fixed number
    with pytest.raises(ConfigError, match="at least one.*data.min_shots"):
        build_run(compose_config(["algo=maml", *SMOKE, "model=mlp"]))
    with pytest.raises(ConfigError, match="fixed size"):
        build_run(compose_config(["algo=maml", *SMOKE, "model=mlp", "data.min_shots=5"]))
    build_run(compose_config(["algo=maml", *SMOKE, "model=mlp", "data.min_shots=50"]))
    with pytest.raises(ConfigError, match="model=identity"):
        build_run(compose_config(["algo=convcnp", *SMOKE, "model=mlp"]))
    with pytest.raises(ConfigError, match="algo.objective"):
        build_run(compose_config(["algo=np", *SMOKE, "algo.objective=iwae"]))


def test_image_completion_on_real_omniglot(omniglot_root, tmp_path):
    """Each task is one test-split image: contexts of at most 30% of its 784 pixels, every pixel
    a target; the on-the-grid ConvCNP trains on it, is invariant to the context's order, and
    reports its per-pixel log-likelihood."""
    overrides = ["experiment=convcnp_omniglot_completion", "debug=smoke", "hardware.threads=1"]
    run = build_run(compose_config([*overrides, f"data.root={omniglot_root}", "algo.channels=8"]))
    batch = next(run.tasks.episodes("test", 4, 1, 235, 784, seed=0, batch_size=4))
    assert batch.query.x.shape == (4, 784, 2) and batch.support.x.shape == (4, 235, 2)
    assert (batch.info["context"] <= 235).all()
    assert ((batch.query.y >= 0) & (batch.query.y <= 1)).all()
    count = int(batch.info["context"][0])
    perm = torch.randperm(count)
    sx, sy = batch.support.x.clone(), batch.support.y.clone()
    sx[0, :count], sy[0, :count] = batch.support.x[0, perm], batch.support.y[0, perm]
    shuffled = TaskBatch(Split(sx, sy), batch.query, 1, batch.info)
    a, b = run.algo.evaluate(batch, [0]), run.algo.evaluate(shuffled, [0])
    assert torch.allclose(a["score"], b["score"], atol=1e-5)
    train(run, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["data"] == "omniglot_completion" and results["metric"] == "loglik"
    assert (tmp_path / "plots" / "completions.png").stat().st_size > 0
