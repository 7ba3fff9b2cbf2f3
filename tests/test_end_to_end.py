"""Tiny real runs end to end: train, outputs, eval, resume after a kill, multirun, W&B offline."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_config
from test_logger import wandb_contents

from metalearn.build import build_run
from metalearn.cli import train
from metalearn.reevaluate import evaluate_checkpoint

CLI = [sys.executable, "-m", "metalearn.cli"]
SMOKE = ["debug=smoke", "hardware.threads=1"]


def run_train(overrides: list[str], run_dir: Path) -> dict:
    return train(build_run(compose_config([*SMOKE, *overrides])), run_dir)


def headline(results: dict) -> tuple:
    """The numbers a resumed run must reproduce exactly."""
    metric = results["metric"]
    return (
        results["test"][metric],
        results["test"]["loss"],
        results["val"],
        results["train"]["iterations"],
        results["test"]["breakdown"],
    )


def test_default_run_from_the_command_line_writes_the_run_directory(tmp_path):
    """`metalearn train` (here at smoke size): the DESIGN.md run directory and results.json."""
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [*CLI, "train", *SMOKE, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "test mse (maml on sinusoid" in done.stdout and "K=5" in done.stdout
    for name in (
        ".hydra/config.yaml",
        "metrics.jsonl",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "plots/learning_curves.png",
        "plots/adapted_curves.png",
    ):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert {
        "algo",
        "data",
        "model",
        "task",
        "metric",
        "test",
        "val",
        "train",
        "protocol",
        "hardware",
        "git",
        "seed",
    } <= set(results)
    assert results["metric"] == "mse" and results["test"]["episodes"] == 10
    assert {"mean", "ci95"} == set(results["test"]["mse"])
    cells = {(e["shots"], e["inner_steps"]) for e in results["test"]["breakdown"]}
    assert cells == {(k, s) for k in (5, 10) for s in (0, 1, 5, 10)}
    assert results["hardware"]["torch"] == torch.__version__
    assert len(results["git"]["commit"] or "") == 40


def test_results_json_names_the_commit_the_run_started_from(tmp_path, monkeypatch):
    """git is read once per process, as the run starts: a checkout while it trains (a second
    worktree moved, a branch switched) does not relabel the code that ran."""
    from metalearn.records import results as records
    from metalearn.train import loop

    assert records.git_info() is records.git_info()  # read once per process
    head = {"commit": "a" * 40}

    @functools.cache
    def git_now() -> dict:  # git_info as the repository stands when it is first called
        return {"commit": head["commit"], "dirty": False}

    def train_then_check_out(*args, **kwargs):
        loop_meta_train(*args, **kwargs)
        head["commit"] = "b" * 40

    loop_meta_train = loop.meta_train
    monkeypatch.setattr(records, "git_info", git_now)
    monkeypatch.setattr(loop, "meta_train", train_then_check_out)
    results = run_train(["trainer.iterations=2"], tmp_path)
    assert results["git"]["commit"] == "a" * 40


def test_omniglot_protonet_learns_far_above_chance_in_seconds(tmp_path, omniglot_root):
    results = run_train(
        [
            "experiment=protonet_omniglot_5w1s",
            f"data.root={omniglot_root}",
            "trainer.iterations=40",
            "trainer.eval_every=40",
            "algo.train_ways=20",
            "data.query=5",
            "eval.episodes=100",
            "eval.batch_size=50",
        ],
        tmp_path,
    )
    assert results["metric"] == "accuracy" and results["protocol"]["split"] == "vinyals"
    assert results["protocol"]["transductive_bn"] is True
    assert results["test"]["accuracy"]["mean"] > 0.7  # chance is 0.2


@pytest.mark.parametrize("algo", ["mamlpp", "reptile"])
def test_the_family_trains_on_omniglot_with_running_batchnorm(tmp_path, omniglot_root, algo):
    """A real run end to end: per-step BatchNorm statistics, test without transduction."""
    results = run_train(
        [
            f"experiment={algo}_omniglot_5w1s",
            f"data.root={omniglot_root}",
            "algo.bn_mode=per_step",
            "algo.inner_steps=2",
            "algo.test_inner_steps=2",
            "trainer.iterations=30",
            "trainer.eval_every=30",
            "trainer.meta_batch_size=4",
            "eval.episodes=50",
        ],
        tmp_path,
    )
    assert results["protocol"]["bn_mode"] == "per_step"
    assert results["protocol"]["transductive_bn"] is False
    # auto on CPU: MAML++ trains on 10-example tasks (vmap), Reptile on 50-example ones (loop)
    assert results["hardware"]["task_batching"] == {"mamlpp": "vmap", "reptile": "loop"}[algo]
    assert results["test"]["accuracy"]["mean"] > 0.3  # chance is 0.2
    state = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=False)
    assert all(v.shape[0] == 3 for v in state["algo_state"]["bn_stats"].values())


def test_maml_sinusoid_learns_to_adapt(tmp_path):
    results = run_train(
        [
            "trainer.iterations=1000",
            "trainer.eval_every=1000",
            "trainer.meta_batch_size=25",
            "eval.episodes=200",
            "eval.batch_size=100",
        ],
        tmp_path,
    )
    cells = {(e["shots"], e["inner_steps"]): e["mse"]["mean"] for e in results["test"]["breakdown"]}
    # a random initialisation sits near the family's variance (about 4); adaptation must beat it
    assert cells[(10, 10)] < 0.6 * cells[(10, 0)], cells
    assert cells[(10, 10)] < cells[(5, 10)]


def test_eval_retests_a_checkpoint_at_other_shots_and_episodes(tmp_path, omniglot_root):
    train_dir = tmp_path / "train"
    run_train(["experiment=protonet_omniglot_5w1s", f"data.root={omniglot_root}"], train_dir)
    overrides = [
        f"checkpoint={train_dir / 'checkpoints' / 'best.pt'}",
        "data.shots=5",
        "data.ways=10",
        "eval.episodes=12",
        "hardware.threads=1",
    ]
    results = evaluate_checkpoint(compose_config(overrides, "eval"), overrides, tmp_path / "eval")
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["task"] == {"ways": 10, "shots": 5, "query": 15} == results["task"]
    assert saved["test"]["episodes"] == 12 and saved["protocol"]["split"] == "vinyals"
    assert 0.1 < saved["test"]["accuracy"]["mean"] <= 1


def test_resume_continues_to_the_same_results_as_an_uninterrupted_run(tmp_path):
    common = ["trainer.eval_every=3", "eval.episodes=20"]
    whole = run_train([*common, "trainer.iterations=9"], tmp_path / "whole")
    run_train([*common, "trainer.iterations=6"], tmp_path / "split")
    resumed = run_train(
        [*common, "trainer.iterations=9", "trainer.resume=true"], tmp_path / "split"
    )
    assert headline(resumed) == headline(whole)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").open()]
    assert steps == sorted(steps) and steps[-1] == 9


def test_wandb_offline_run_holds_the_logged_metrics_and_results(tmp_path):
    results = run_train(["logger=wandb", "trainer.iterations=4"], tmp_path)
    (contents,) = wandb_contents(tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    for row in logged:
        step = row.pop("step")
        for key, value in row.items():
            assert contents["history"][step][key] == pytest.approx(value), (step, key)
    assert contents["summary"]["test/mse/mean"] == pytest.approx(results["test"]["mse"]["mean"])
    assert contents["config"]["algo"]["inner_lr"] == 0.01  # the resolved config
    assert "plots/learning_curves" in contents["summary"]


def test_package_imports_from_a_clean_interpreter():
    """The console script's module loads without the test harness's sys.path help."""
    done = subprocess.run([*CLI, "--help"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and "metalearn <command>" in done.stderr


def test_a_time_budget_stops_the_run_and_the_bar_ends_at_its_iteration(tmp_path, capsys):
    """trainer.max_minutes binds long before trainer.iterations: the bar's total follows the
    budget (it ends full at the last iteration, not at 1/1000 of a million) and validation is
    its own phase."""
    results = run_train(
        [
            "trainer.iterations=1000000",
            "trainer.max_minutes=0.03",
            "trainer.eval_every=20",  # about 60 iterations in the budget on a loaded CPU
            "trainer.progress=true",
        ],
        tmp_path,
    )
    done = results["train"]["iterations"]
    assert results["train"]["stopped_by"] == "max_minutes" and 20 < done < 1000000
    err = capsys.readouterr().err
    assert f"{done}/{done} [" in err and "/1000000" not in err.splitlines()[-1]
    assert "validate at 20" in err


def test_a_cpu_time_budget_counts_the_process_cpu_time_not_the_wall_clock(tmp_path):
    """trainer.max_cpu_minutes stops the run once the process's CPU time in training and
    validation passes it; results.json reports that time beside the wall time."""
    results = run_train(
        ["trainer.iterations=1000000", "trainer.max_cpu_minutes=0.03", "trainer.eval_every=100"],
        tmp_path,
    )
    train = results["train"]
    assert train["stopped_by"] == "max_cpu_minutes" and 0 < train["iterations"] < 1000000
    assert 1.8 <= train["cpu_seconds"] < 1.8 + 1.0  # one iteration past the budget at most
