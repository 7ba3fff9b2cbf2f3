"""Learned optimisers (algo=l2o): the unroll machinery against torch.optim, the estimators against
each other and against a meta-gradient known in closed form, and the start-up errors."""

import pytest
import torch
from conftest import compose_config
from torch import nn

from metalearn.algos.optimizers.l2o import L2O, L2OConfig
from metalearn.build import build_run
from metalearn.data.optimizees import Problems, hand_designed_curve
from metalearn.errors import ConfigError

SMOKE = ["debug=smoke", "hardware.threads=1"]


def l2o_run(*overrides: str, algo: str = "l2o", data: str = "quadratic"):
    return build_run(compose_config([*SMOKE, f"algo={algo}", f"data={data}", *overrides]))


@pytest.mark.parametrize("data", ["quadratic", "digits_mlp"])
def test_the_lstm_set_to_sgd_steps_as_torch_sgd(data):
    """Output weights at zero and base_lr = lr: the LSTM optimiser's unroll is SGD's, loss for
    loss, on the same problems (their minibatches included)."""
    lr = {"quadratic": 0.01, "digits_mlp": 1.0}[data]
    run = l2o_run("data.steps=12", "algo.truncation=4", f"model.base_lr={lr}", data=data)
    with torch.no_grad():
        run.model.out.weight.zero_()
        run.model.out.bias.zero_()
    problems = run.tasks.sample("train", torch.Generator().manual_seed(0), 3)
    ours = run.algo.evaluate(problems, [0, 12])["curve"]
    theirs = hand_designed_curve(problems, "sgd", lr, 12)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours[:, -1], ours[:, 0])  # it moved
    if data == "quadratic":  # (a minibatch's loss after 12 steps from N(0, 0.01^2) is noisy)
        assert (ours[:, -1] < ours[:, 0]).all()


def meta_gradient(run, problems) -> torch.Tensor:
    for p in run.algo.parameters():
        p.grad = None
    total = 0.0
    run.algo.carry = None
    for _ in range(run.config.data.steps // run.config.algo.truncation):
        loss, _ = run.algo.meta_loss(problems)
        loss.backward()
        total = total + 1
    return torch.cat([p.grad.flatten() for p in run.algo.parameters()])


@pytest.mark.usefixtures("float64")
def test_truncation_as_long_as_the_unroll_is_full_backpropagation():
    torch.manual_seed(0)
    full = l2o_run("data.steps=8", "algo.estimator=full", "algo.truncation=8")
    torch.manual_seed(0)
    cut = l2o_run("data.steps=8", "algo.estimator=truncated", "algo.truncation=8")
    problems = full.tasks.sample("train", torch.Generator().manual_seed(1), 2)
    torch.testing.assert_close(meta_gradient(cut, problems), meta_gradient(full, problems))
    # and shorter windows give another (biased) gradient
    torch.manual_seed(0)
    short = l2o_run("data.steps=8", "algo.estimator=truncated", "algo.truncation=2")
    assert not torch.allclose(meta_gradient(short, problems), meta_gradient(full, problems))


# -- ES and PES on a problem whose meta-gradient is known in closed form --------------------------


class LearnedRate(nn.Module):
    """x <- x - phi * g: a learned optimiser with one weight."""

    def __init__(self, phi: float) -> None:
        super().__init__()
        self.phi = nn.Parameter(torch.tensor(phi, dtype=torch.float64))

    def init_state(self, params):
        return {}

    def forward(self, params, grads, state):
        return {k: p - self.phi * grads[k] for k, p in params.items()}, state


class Parabola:
    """f(x) = a x^2 / 2 from x0: after t steps of rate phi, x_t = x0 (1 - phi a)^t."""

    a, x0 = 1.0, 1.0

    def loss(self, problems, params, step):
        return 0.5 * self.a * params["x"].pow(2).sum(-1)

    def objective_gradient(self, phi: float, steps: int) -> float:
        """d/dphi of sum_{t=1..steps} f(x_t), the whole unroll's meta-objective."""
        r, total = 1 - phi * self.a, 0.0
        for t in range(1, steps + 1):
            total += 0.5 * self.a * self.x0**2 * 2 * t * r ** (2 * t - 1)
        return -self.a * total


def estimates(estimator: str, draws: int, steps=6, truncation=2, phi=0.3, pairs=50):
    """`draws` episodes' summed window estimates of the meta-gradient, phi held fixed; with
    second derivatives, so that backpropagation differentiates x_t = x0 (1 - phi a)^t."""
    cfg = L2OConfig(
        estimator=estimator, truncation=truncation, sigma=0.01, pairs=pairs, second_derivatives=True
    )
    algo = L2O(cfg, LearnedRate(phi), "optimization", "loop", steps=steps)
    x0 = torch.full((1, 1), Parabola.x0, dtype=torch.float64)
    problems = Problems({"x": x0}, {}, Parabola(), seed=0)
    out = []
    for _ in range(draws):
        algo.carry, total = None, 0.0
        for _ in range(steps // truncation):
            algo.model.phi.grad = None
            objective, _ = algo.meta_loss(problems)
            objective.backward()
            total += algo.model.phi.grad.item()
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.usefixtures("float64")
def test_pes_is_unbiased_and_truncated_es_and_backpropagation_are_not():
    torch.manual_seed(0)
    exact = Parabola().objective_gradient(0.3, steps=6)
    full = estimates("full", 1, truncation=6)  # backpropagation through the whole unroll
    assert full.item() == pytest.approx(exact, rel=1e-10)
    pes = estimates("pes", 40)  # 40 episodes x 50 antithetic pairs
    se = pes.std().item() / 40**0.5
    assert abs(pes.mean().item() - exact) < 4 * se + 1e-3 * abs(exact), (pes.mean(), exact, se)
    truncated = estimates("truncated", 1).item()  # ignores phi's effect on each window's start
    es = estimates("es", 40)
    assert es.mean().item() == pytest.approx(truncated, rel=0.05)
    assert abs(truncated - exact) > 0.2 * abs(exact)


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "kwargs", "words"),
    [
        (["data.steps=10", "algo.truncation=20"], {}, ["algo.truncation=20", "data.steps=10"]),
        (["algo.outer_lr=0"], {}, ["algo.outer_lr must be a positive"]),
        (["algo.estimator=bptt"], {}, ["algo.estimator must be one of"]),
        (["model=conv4"], {}, ["model=lstm_optimizer or mlp_optimizer"]),
        (["model=mlp"], {"data": "omniglot"}, ["data=quadratic or digits_mlp"]),
        (["model=mlp"], {"algo": "maml"}, ["use algo=l2o"]),
        (["model=lstm_optimizer"], {"algo": "maml", "data": "sinusoid"}, ["only algo=l2o"]),
    ],
)
def test_bad_settings_are_refused_at_start_up(overrides, kwargs, words, tmp_path):
    with pytest.raises(ConfigError) as error:
        l2o_run(f"data.root={tmp_path}", *overrides, **kwargs)
    for word in words:
        assert word in str(error.value)


def test_a_checkpoint_with_other_preprocessing_is_refused(tmp_path):
    """A learned optimiser trained on LogAndSign features, evaluated on the raw gradient."""
    from metalearn.cli import train
    from metalearn.errors import CheckpointError
    from metalearn.records import checkpoint

    run = l2o_run("model.preprocess=log_sign", "data.steps=4", "algo.truncation=2")
    train(run, tmp_path)
    state = checkpoint.load(tmp_path / "checkpoints" / "best.pt")
    other = l2o_run("model.preprocess=none", "data.steps=4", "algo.truncation=2")
    with pytest.raises(CheckpointError, match="model.preprocess=log_sign .* model.preprocess=none"):
        other.load_algo_state(state, tmp_path)


@pytest.mark.parametrize("estimator", ["truncated", "pes"])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(estimator, tmp_path):
    """Stopped in the middle of an unroll (window 2 of 3), the run goes on with the same
    problems from the same step, and PES with the same particles and perturbations."""
    from metalearn.cli import train

    common = [
        "data.steps=6",
        "algo.truncation=2",
        f"algo.estimator={estimator}",
        "algo.pairs=2",
        "trainer.eval_every=2",
        "eval.episodes=4",
        "eval.val_episodes=4",
    ]
    whole = train(l2o_run(*common, "trainer.iterations=4"), tmp_path / "a")
    train(l2o_run(*common, "trainer.iterations=2"), tmp_path / "b")
    resumed = train(l2o_run(*common, "trainer.iterations=4", "trainer.resume=true"), tmp_path / "b")
    assert resumed["test"] == whole["test"] and resumed["val"] == whole["val"]


@pytest.mark.parametrize(
    ("data", "override"), [("digits_mlp", "data.batch=8"), ("quadratic", "data.family=noisy")]
)
def test_a_problems_minibatches_and_noise_do_not_depend_on_how_its_batch_is_cut(data, override):
    """Fixed evaluation problems give the same losses whatever eval.batch_size (and a rank's
    share of a meta-batch the same as in the whole): problem 4's step-3 draw is its own."""
    run = l2o_run(override, data=data)
    whole = run.tasks.sample("val", torch.Generator().manual_seed(0), 6)
    params = {k: v.clone().requires_grad_() for k, v in whole.start.items()}
    for step in (0, 3):
        losses = whole.loss(params, step)
        part = {k: v[3:] for k, v in params.items()}
        torch.testing.assert_close(whole[3:].loss(part, step), losses[3:])
        grads = torch.autograd.grad(losses.sum(), list(params.values()))
        part_grads = torch.autograd.grad(whole[3:].loss(part, step).sum(), list(part.values()))
        for g, h in zip(grads, part_grads, strict=True):
            torch.testing.assert_close(h, g[3:])


def test_the_papers_generalisation_checks_are_measured_on_a_checkpoint(tmp_path):
    """Andrychowicz et al.'s two checks through `metalearn eval`: an optimiser trained for 6
    steps run for 12 reports, beside every tuned baseline, each problem's loss change since
    step 6 and whether it still descends (here an SGD-like one from fan-in starts: it does);
    and the same checkpoint on ReLU networks is tested there, baselines tuned there too."""
    from conftest import CONFIGS

    from metalearn.cli import train
    from metalearn.reevaluate import checkpoint_groups, evaluate_checkpoint

    common = ["data.steps=6", "algo.truncation=3", "data.init=fan_in", "model.base_lr=1.0"]
    train(l2o_run(*common, "trainer.iterations=2", data="digits_mlp"), tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"

    def retest(*overrides: str) -> dict:
        overrides = [f"checkpoint={checkpoint}", "eval.episodes=16", "logger=none", *overrides]
        groups = checkpoint_groups(overrides, CONFIGS)  # as `metalearn eval` composes
        assert groups == ["algo=l2o", "model=lstm_optimizer", "data=digits_mlp"]
        config = compose_config([*groups, *overrides], config_name="eval")
        return evaluate_checkpoint(config, overrides, tmp_path / "eval")

    longer = retest("eval.steps=[12]")
    assert (tmp_path / "eval" / "plots" / "loss_by_step.png").is_file()  # 12 steps, each optimiser
    for entry in [longer["test"], *longer["baselines"].values()]:
        trained, later = entry["breakdown"]
        assert (trained["steps"], later["steps"]) == (6, 12) and "change" not in trained
        change = later["change"]
        assert later["still_descending"] == (change["mean"] + change["ci95"] < 0)
    assert longer["test"]["breakdown"][1]["still_descending"]  # SGD at rate 1 from fan-in starts
    relu = retest("data.activation=relu")
    assert relu["test"]["final_loss"]["mean"] != longer["test"]["final_loss"]["mean"]
    assert set(relu["baselines"]) == set(longer["baselines"])


def test_metalearn_eval_takes_keys_of_the_checkpoints_own_data_set(tmp_path):
    """`metalearn eval checkpoint=... data.activation=relu` from the command line: the eval
    config's default data set (omniglot) has no such key, so the CLI composes the checkpoint's
    groups first; they are not overrides, so the checkpoint's data section (data.steps=4) stays."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    from metalearn.cli import train

    train(l2o_run("data.steps=4", "algo.truncation=2", data="digits_mlp"), tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"
    out = subprocess.run(
        [sys.executable, "-m", "metalearn.cli", "eval", f"checkpoint={checkpoint}",
         "data.activation=relu", "eval.episodes=4", "hardware.threads=1", "logger=none",
         f"hydra.run.dir={tmp_path / 'eval'}"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["test"]["steps"] == 4 and results["test"]["episodes"] == 4
    saved = (tmp_path / "eval" / ".hydra" / "overrides.yaml").read_text()
    assert "data.activation=relu" in saved
