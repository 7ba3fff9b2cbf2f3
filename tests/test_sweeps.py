"""Sweeps end to end with Hydra's own engines: a submitit_local launcher sweep, an Optuna search
with its best-trial rerun, W&B groups, and `metalearn summarize` over the jobs' results."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metalearn.cli import sweep_group
from metalearn.tools.summarize import mean_ci, summarize, t95

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_logger import read_wandb_records, wandb_contents  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["debug=smoke", "hardware.threads=1", "eval.episodes=4", "eval.val_episodes=4"]


def metalearn(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", **(env_extra or {})}
    done = subprocess.run(
        [sys.executable, "-m", "metalearn.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_a_submitit_local_sweep_runs_two_jobs_and_summarizes(tmp_path):
    sweep = tmp_path / "sweep"
    metalearn(
        "train",
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        *SMOKE,
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
    )
    results = sorted(sweep.rglob("results.json"))
    assert len(results) == 2
    seeds = sorted(json.loads(p.read_text())["seed"] for p in results)
    assert seeds == [0, 1]
    assert list((sweep / ".submitit").rglob("*_result.pkl"))  # submitit ran them, as jobs
    done = metalearn("summarize", str(sweep))
    rows = list((sweep / "summary.csv").read_text().splitlines())
    assert len(rows) == 2  # the header and one configuration with both seeds pooled
    assert "| 2 |" in done.stdout


def test_grid_sweep_jobs_share_a_wandb_group_and_summarize_per_configuration(tmp_path):
    sweep = tmp_path / "grid"
    metalearn(
        "train",
        "-m",
        *SMOKE,
        "logger=wandb",
        "logger.mode=offline",
        "algo=maml,fomaml",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
    )
    # one run directory per job (test_end_to_end's multirun check, on the same sweep)
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert sorted((r["algo"], r["seed"]) for r in results) == [
        ("fomaml", 0),
        ("fomaml", 1),
        ("maml", 0),
        ("maml", 1),
    ]
    assert results[0]["test"]["mse"] != results[1]["test"]["mse"]
    rows = summarize(sweep)
    assert [r["seeds"] for r in rows] == [2, 2]
    assert {r["run"] for r in rows} == {"algo=maml", "algo=fomaml"}
    for row in rows:
        tests = []
        for name in row["dirs"].split():
            tests.append(json.loads((sweep / name / "results.json").read_text())["test"]["mse"])
        mean, ci = mean_ci([t["mean"] for t in tests])
        assert row["test_mean"] == pytest.approx(mean) and row["test_ci95_seeds"] == ci
        assert row["test_ci95_episodes"] == pytest.approx(sum(t["ci95"] for t in tests) / 2)
    runs = [run for job in sorted(sweep.iterdir()) if job.is_dir() for run in wandb_contents(job)]
    assert len(runs) == 4
    assert {run["run"].run_group for run in runs} == {sweep_group(str(sweep))}
    assert all(run["config"]["algo"]["name"] in ("maml", "fomaml") for run in runs)  # resolved
    # results.json, the plots and the best checkpoint went up as one artifact per run
    for job in (p for p in sweep.iterdir() if p.is_dir()):
        [log] = job.glob("wandb/offline-run-*/run-*.wandb")
        records = [r for r in read_wandb_records(log) if r.WhichOneof("record_type") == "artifact"]
        [files] = [sorted(c.path for c in r.artifact.manifest.contents) for r in records]
        assert files == [
            "checkpoints/best.pt",
            "plots/adapted_curves.png",
            "plots/learning_curves.png",
            "results.json",
        ]


def test_an_optuna_search_writes_its_best_trial_and_the_command_that_reruns_it(tmp_path):
    sweep = tmp_path / "search"
    metalearn(
        "train",
        "-m",
        "sweep=maml_sinusoid",
        *SMOKE,
        "trainer.iterations=4",
        "hydra.sweeper.n_trials=3",
        f"hydra.sweep.dir={sweep}",
    )
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = [json.loads(p.read_text())["val"]["mse"]["mean"] for p in sweep.rglob("results.json")]
    assert len(values) == 3 and best["best_value"] == pytest.approx(min(values))
    script = (sweep / "best_run.sh").read_text()
    for key, value in best["best_params"].items():
        assert f"{key}={value}" in script
    assert "sweep=maml_sinusoid" in script  # its trainer settings are the trials' too
    command = script.splitlines()[-1].removesuffix(' "$@"').split()[2:]  # after `metalearn train`
    rerun = tmp_path / "rerun"
    metalearn("train", *command, f"hydra.run.dir={rerun}")
    again = json.loads((rerun / "results.json").read_text())["val"]["mse"]["mean"]
    assert again == pytest.approx(best["best_value"], rel=1e-6)  # the best trial, as is


def test_student_t_intervals_are_wider_for_few_seeds():
    assert t95(1) == 12.706 and t95(11) == 2.228 and t95(100) == 1.96
    mean, ci = mean_ci([1.0, 3.0])
    assert mean == 2.0 and ci == pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2))
    assert math.isnan(mean_ci([1.0])[1])


def test_summarize_explains_an_empty_folder(tmp_path):
    from metalearn.errors import MetalearnError

    with pytest.raises(MetalearnError, match="no results.json under"):
        summarize(tmp_path)


def test_a_diverged_run_gives_the_sweeper_its_worst_value_not_nan():
    from metalearn.cli import sweep_value

    nan = {"mean": math.nan, "ci95": math.nan}
    assert sweep_value({"metric": "mse", "val": {"mse": nan}}) == math.inf
    assert sweep_value({"metric": "accuracy", "val": {"accuracy": nan}}) == -math.inf
    assert sweep_value({"metric": "mse", "val": {"mse": {"mean": 0.5}}}) == 0.5
