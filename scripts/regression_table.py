"""A markdown table of regression runs' test results: neural processes (per-point
log-likelihood beside the exact GP oracle) and particle learners (MSE, predictive NLL).

    python scripts/regression_table.py RUN_DIR [RUN_DIR ...]

One row per run: the learner with the settings that tell rows apart, the test numbers with their
95% CI over the fixed test tasks, the 90% interval's coverage, the oracle where the data has one,
and the training's iterations and wall time.
"""

import json
import sys
from pathlib import Path

from metalearn.records import checkpoint


def cell(entry: dict | None, digits: int = 3) -> str:
    if not entry:
        return "-"
    return f"{entry['mean']:.{digits}f} ± {entry['ci95']:.{digits}f}"


def describe(config: dict) -> str:
    """The learner and the settings that differ between the rows of one table."""
    algo, data = config["algo"], config["data"]
    name = algo["name"]
    if "particles" in algo:
        name += f" (M = {algo['particles']})"
    if algo.get("log_posterior") == "sum":
        name += ", log p = -N L"
    if algo.get("log_posterior") == "gaussian":
        name += ", the authors' Gaussian posterior"
    if "inner_lr" in algo and data["name"] == "sinusoid":
        name += f", α = {algo['inner_lr']:g}"
    if algo.get("latent"):
        name += f", {algo['objective']}"
    if data["name"] == "gp":
        name += f", {data['kernel']}"
    if data.get("train_tasks"):
        name += f", {data['train_tasks']} training tasks"
    return name


def row(folder: Path) -> str:
    results = json.loads((folder / "results.json").read_text())
    config = checkpoint.load(folder / "checkpoints" / "best.pt")["config"]
    test, train = results["test"], results["train"] or {}
    name = describe(config)
    oracle = test.get("oracle", {})
    cells = [
        name,
        cell(test.get("loglik")),
        cell(oracle.get("loglik")),
        cell(test.get("mse"), 4),
        cell(oracle.get("mse"), 4),
        cell(test.get("nll")),
        cell(test.get("coverage90")),
        f"{train.get('iterations', '-')} it, {train.get('wall_seconds', 0) / 60:.1f} min",
    ]
    return "| " + " | ".join(cells) + " |"


def main(dirs: list[Path]) -> None:
    print(
        "| learner | log-likelihood per target point | GP oracle | MSE | oracle MSE | predictive "
        "NLL | 90% coverage | training |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for folder in dirs:
        print(row(folder))


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]])
