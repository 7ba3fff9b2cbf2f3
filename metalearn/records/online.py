"""The end of an online run (`trainer=online`): each method's curve over the stream, its regret,
results.json, plots/online.png and the markdown table (scripts/online_table.py prints it too).

Regret after t rounds (Finn et al. 2019, eq. 4): sum_{s<=t} f_s(method's model on task s) -
sum_{s<=t} f_s(U_s(w*)), with f_s the query loss of task s (cross-entropy or MSE) and w* the best
fixed prior in hindsight, approximated by FTML's last prior (`hindsight`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from metalearn.data.stream import TaskStream
from metalearn.evaluate import mean_ci95
from metalearn.records.logger import Logger
from metalearn.records.plots import plot_online
from metalearn.records.results import results_dict, write_json
from metalearn.run import Run

NAMES = {  # the paper's names for the methods
    "ftml": "FTML",
    "ftl": "FTL (joint, then U_t)",
    "toe": "TOE (train on everything)",
    "scratch": "from scratch",
}
COMPARATOR = (
    "FTML's last prior (its meta-objective's leader over every task played), adapted to each "
    "task with U_t on the round's own support set and scored on its held-out query"
)


def hindsight(run: Run, stream: TaskStream, played: int) -> dict[str, list[float]]:
    """The regret's comparator: the learner as it stands at the end (FTML's last prior, the
    meta-leader over every task played) met with U_t on each of the first `played` tasks' own
    support set and scored on its held-out query; per task, the loss and the score."""
    _, shots, query = run.test_shape
    size, out = run.config.eval.batch_size, {"loss": [], "score": []}
    run.model.train(False)
    try:
        for first in range(0, played, size):
            indices = torch.arange(first, min(first + size, played))
            with run.autocast():
                scored = run.algo.evaluate(stream.meeting(indices, shots, query), [run.test_steps])
            for key in out:
                out[key] += scored[key][:, 0].float().tolist()
    finally:
        run.model.train(True)
    return out


def curves(records: dict, comparator: dict, metric: str) -> dict[str, dict[str, Any]]:
    """Per method: its per-task score and loss, cumulative loss and regret, and their summary
    (the mean over the stream with its 95% CI, the first and last quarter's means)."""
    best = torch.tensor(comparator["loss"], dtype=torch.float64).cumsum(0)
    out = {}
    for method, record in records.items():
        scores = torch.tensor(record["score"], dtype=torch.float64)
        losses = torch.tensor(record["loss"], dtype=torch.float64)
        cumulative = losses.cumsum(0)
        regret = cumulative - best
        quarter = max(1, len(scores) // 4)
        out[method] = {
            "score": record["score"],
            "loss": record["loss"],
            "cumulative_loss": cumulative.tolist(),
            "regret": regret.tolist(),
            "summary": {
                metric: mean_ci95(scores),
                "loss": mean_ci95(losses),
                "first_quarter": {metric: scores[:quarter].mean().item()},
                "last_quarter": {metric: scores[-quarter:].mean().item()},
                "cumulative_loss": cumulative[-1].item(),
                "regret": regret[-1].item(),
            },
        }
    return out


def online_results(run: Run, records: dict, comparator: dict, standing: dict) -> dict:
    """results.json of an online run: the common fields (results_dict), the stream, each
    method's curves and the comparator; `test` is FTML's score over the stream's tasks, each
    met once by a prior that had not seen it."""
    trainer, algo, metric = run.config.trainer, run.config.algo, run.metric
    methods = curves(records, comparator, metric)
    ftml = methods["ftml"]["summary"]
    played = standing["rounds"]
    test = {metric: ftml[metric], "loss": ftml["loss"], "episodes": played}
    train = {
        "rounds": played,
        "meta_steps": standing["meta_steps"],
        "wall_seconds": round(standing["seconds"], 2),
        "stopped_by": standing["stopped_by"],
    }
    stream = {
        "tasks": played,
        "seed": trainer.seed_of_stream(run.config.seed),
        "split": "train",
        "pool": trainer.pool,
        "inner_steps": run.test_steps,  # k: the updates U_t takes on each new task
        "inner_lr": algo.test_inner_lr,
        "meta_steps": trainer.meta_steps,
        "meta_batch_size": trainer.meta_batch_size,
        "joint_steps": trainer.joint_steps or trainer.meta_steps,
        "scratch_steps": trainer.scratch_steps or run.test_steps,
    }
    return results_dict(run, test, None, train) | {
        "trainer": "online",
        "stream": stream,
        "methods": methods,
        "comparator": {"what": COMPARATOR, **comparator},
    }


def format_online_table(results: dict) -> str:
    """A markdown table: each method's score over the stream, first and last quarter, its
    cumulative loss and its regret at the end."""
    metric, stream = results["metric"], results["stream"]
    percent = metric == "accuracy"

    def number(value: float) -> str:
        return f"{100 * value:.2f}%" if percent else f"{value:.3f}"

    task = results["task"]
    shape = f"{task['ways']}-way, " if percent else ""  # regression: one output
    title = (
        f"{results['algo']} on a stream of {stream['tasks']} {results['data']} tasks "
        f"({shape}{task['shots']} shots): {metric} after k={stream['inner_steps']} updates on "
        f"each new task (95% CI over tasks)"
    )
    header = f"| method | {metric} | first quarter | last quarter | cumulative loss | regret |"
    rows = [title, "", header, "|" + " --- |" * 6]
    for method, entry in results["methods"].items():
        s = entry["summary"]
        mean, ci = s[metric]["mean"], s[metric]["ci95"]
        cells = [
            NAMES.get(method, method),
            f"{number(mean)} ± {number(ci)}",
            number(s["first_quarter"][metric]),
            number(s["last_quarter"][metric]),
            f"{s['cumulative_loss']:.2f}",
            f"{s['regret']:.2f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    rows.append("")
    rows.append(f"regret against: {results['comparator']['what']}")
    return "\n".join(rows)


def finish_online(
    run: Run, records: dict, comparator: dict, standing: dict, run_dir: Path, logger: Logger
) -> dict:
    """Write results.json and plots/online.png, print the table, log them to W&B."""
    results = online_results(run, records, comparator, standing)
    write_json(run_dir / "results.json", results)
    plot = plot_online(results, run_dir / "plots" / "online.png")
    print(format_online_table(results))
    logger.log_summary({k: v for k, v in results.items() if k not in ("methods", "comparator")})
    logger.log_summary({f"online/{m}": e["summary"] for m, e in results["methods"].items()})
    logger.log_images([plot])
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{run.name}-online-results")
    logger.log_artifact(name, [run_dir / "results.json", plot])
    return results
