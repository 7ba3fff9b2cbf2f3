"""The end of a run: test the best weights, write results.json, plots and the terminal table."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from metalearn.data.gp import GPTasks
from metalearn.data.images.base import ImageTaskConfig
from metalearn.data.images.completion import CompletionTasks
from metalearn.errors import MetalearnError
from metalearn.evaluate import mean_ci95, run_episodes
from metalearn.hardware import describe
from metalearn.models.layers import TaskBatchNorm2d
from metalearn.records import checkpoint
from metalearn.records.calibration import calibration_report, plot_reliability
from metalearn.records.logger import Logger
from metalearn.records.optimizers import format_optimizer_table, plot_optimizer, test_optimizer
from metalearn.records.plots import (
    plot_completions,
    plot_gp_tasks,
    plot_learning_curves,
    plot_sinusoid_tasks,
)
from metalearn.records.regression import EXTRA_COLUMNS, gp_oracle, regression_rows
from metalearn.records.rl import format_rl_table, plot_rl, test_rl
from metalearn.run import Run


def test(run: Run) -> dict[str, Any]:
    """The headline test at the run's own setting, plus test.breakdown over other shots/steps."""
    cfg, (ways, shots, query) = run.config.eval, run.test_shape
    inner = run.algo.inner_loop
    steps = sorted({run.test_steps, *cfg.steps}) if inner else [run.test_steps]
    breakdown, headline, logits = [], None, None
    for k in sorted({shots, *cfg.shots}):
        out = run_episodes(
            run, "test", episodes=cfg.episodes, ways=ways, shots=k, query=query, steps=steps
        )
        for column, step in enumerate(steps):
            entry = {
                "ways": ways,
                "shots": k,
                "query": query,
                "inner_steps": step,
                run.metric: mean_ci95(out["score"][:, column]),
                "loss": mean_ci95(out["loss"][:, column]),
            }
            # a learner that predicts a distribution: its mean's error, its interval's coverage
            entry |= {key: mean_ci95(out[key][:, column]) for key in EXTRA_COLUMNS if key in out}
            breakdown.append(entry)
            if k == shots and step == run.test_steps:
                headline = entry
                if "logits" in out:  # the calibration report's predictions
                    logits = out["logits"][:, column], out["labels"]
    out = {
        run.metric: headline[run.metric],
        "loss": headline["loss"],
        **{key: headline[key] for key in EXTRA_COLUMNS if key in headline},
        "episodes": cfg.episodes,
        "breakdown": breakdown,
    }
    if run.metric == "loglik":
        out["unit"] = "nats per target point"
    if isinstance(run.tasks, GPTasks):  # the ceiling: the exact posterior on the same tasks
        out["oracle"] = gp_oracle(run, ways, shots, query)
    if run.metric == "accuracy" and cfg.calibration:
        out["calibration"] = calibration_report(run, logits)
    return out


def results_dict(run: Run, test_result: dict, val: dict | None, train: dict | None) -> dict:
    """results.json, the contract that scripts, sweeps and table makers read (DESIGN.md)."""
    config, (ways, shots, query) = run.config, run.test_shape
    algo = config.algo
    has_bn = any(isinstance(m, TaskBatchNorm2d) for m in run.model.modules())
    inner = run.algo.inner_loop
    bn_mode = (algo.bn_mode if inner else "transductive") if has_bn else None
    images = isinstance(config.data, ImageTaskConfig)
    return {
        "algo": algo.name,
        "data": config.data.name,
        "model": config.model.name,
        "task": (
            config.data.describe()
            if run.metric in ("reward", "return", "final_loss")
            else {"ways": ways, "shots": shots, "query": query}
        ),
        "metric": run.metric,
        "test": test_result,
        "val": val,
        "train": train,
        "protocol": {
            "split": config.data.split if images else None,
            # 'alphabet': validation and test episodes within one alphabet (Lake et al. 2015)
            "episode_scope": config.data.episode_scope if images else None,
            "image_size": config.data.image_size if images else None,
            "train_ways": run.train_shape[0],
            "train_shots": run.train_shape[1],
            "train_query": run.train_shape[2],
            "test_inner_steps": algo.test_inner_steps if inner else None,
            "test_inner_lr": algo.test_inner_lr if inner else None,
            "first_order": algo.first_order if run.algo.first_order_switch else None,
            # how BatchNorm normalises at test time: each task with its own batch statistics
            # ('transductive'), or each example with statistics from meta-training ('running',
            # 'per_step'); None when the model has no BatchNorm
            "bn_mode": bn_mode,
            "transductive_bn": bn_mode == "transductive",
            "eval_seed": config.eval.seed,
            "reference": reference_protocol(algo),
            # a learned optimiser's meta-gradient estimator (algos/optimizers/l2o.py)
            "estimator": algo.estimator if run.algo.optimizees else None,
        },
        "hardware": {
            **describe(run.device),
            "task_batching": run.task_batching,
            "test_task_batching": run.test_batching,
        },
        "git": git_info(),
        "seed": config.seed,
    }


def reference_protocol(algo: Any) -> dict | None:
    """Which of the algorithm's settings follow its authors' reference code: the code named by
    the config's REFERENCE table, and each setting whose value differs from the code's (empty:
    the run is the reference's protocol). None for algorithms without such a table."""
    table = dict(algo.REFERENCE)
    if not table:
        return None
    source = table.pop("source")
    deviations = {
        key: {"value": getattr(algo, key), "reference": value}
        for key, value in table.items()
        if getattr(algo, key) != value
    }
    return {"code": source, "deviations": deviations}


@functools.cache
def git_info() -> dict[str, Any]:
    """Commit and dirtiness of the source tree this package runs from (None outside git), read
    once per process (`cli.train` reads it as the run starts: a later checkout changes nothing)."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def write_json(path: Path, data: dict) -> None:
    """Atomic write: a reader never sees half a results.json; a failed write says what to do."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise MetalearnError(
            f"cannot write {path} ({error}); the checkpoints are kept: free some space, then "
            f"rerun the same command with trainer.resume=true (or metalearn eval) to write it"
        ) from error


def finish_run(run: Run, progress: Any, run_dir: Path, logger: Logger) -> dict:
    """Test the best checkpoint, then write results.json and plots, print and log them."""
    best = run_dir / "checkpoints" / "best.pt"
    run.load_algo_state(checkpoint.load(best), best)
    seconds = progress.seconds
    if run.algo.pretrains:  # pre-training counts examples, not tasks
        unit, per_step = "examples", run.config.algo.batch_size
    else:  # meta-RL counts trials (a trial is one task's whole run of episodes)
        unit = "trials" if run.metric == "reward" else "tasks"
        per_step = run.config.trainer.meta_batch_size
    train = {
        "iterations": progress.iteration,
        "wall_seconds": round(seconds, 2),
        # validation's share of it (trainer.eval_every, eval.val_episodes)
        "validation_seconds": round(progress.validation_seconds, 2),
        # the process's CPU time in both (trainer.max_cpu_minutes budgets it)
        "cpu_seconds": round(progress.cpu_seconds, 2),
        f"{unit}_per_second": round(progress.iteration * per_step / max(seconds, 1e-9), 2),
        "stopped_by": progress.stopped_by,
        "skipped_meta_batches": progress.skipped,  # trainer.nonfinite=skip
    }
    results, curves = tested_results(run, progress.best_val, train)
    write_json(run_dir / "results.json", results)
    plots = write_plots(run, run_dir) + write_curve_plots(run, curves, run_dir / "plots", results)
    print(result_table(results))
    logger.log_summary(results)
    logger.log_images(plots)
    # W&B artifact names allow letters, digits, '-', '_' and '.'
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{run.name}-results")
    logger.log_artifact(name, [run_dir / "results.json", *plots, best])
    return results


def write_curve_plots(run: Run, curves: dict, folder: Path, results: dict) -> list[Path]:
    """The test's own plots: a classifier's reliability diagram, each optimiser's loss by step,
    or each meta-RL policy's regret (Harlow: accuracy) by step."""
    if "calibration" in results.get("test", {}):
        return [plot_reliability(results["test"]["calibration"], folder / "reliability.png")]
    if run.metric == "final_loss":
        return [plot_optimizer(curves, folder)] if curves else []
    return [plot_rl(run, curves, folder, results)] if curves or run.metric == "return" else []


def tested_results(run: Run, val: dict | None, train: dict | None) -> tuple[dict, dict]:
    """results.json's dict after the test, and (meta-RL) each policy's mean regret curve."""
    if run.metric in ("reward", "return"):  # reward and regret beside the baselines, or return
        test_result, baselines, curves = test_rl(run)
        return results_dict(run, test_result, val, train) | {"baselines": baselines}, curves
    if run.metric == "final_loss":  # the learned optimiser beside tuned hand-designed ones
        test_result, baselines, curves = test_optimizer(run)
        return results_dict(run, test_result, val, train) | {"baselines": baselines}, curves
    return results_dict(run, test(run), val, train), {}


def result_table(results: dict) -> str:
    """The terminal table of a results.json dict."""
    if results["metric"] == "final_loss":
        return format_optimizer_table(results)
    rl = results["metric"] in ("reward", "return")
    return format_rl_table(results) if rl else format_table(results)


def write_plots(run: Run, run_dir: Path) -> list[Path]:
    plots = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        plots.append(plot_learning_curves(metrics, run_dir / "plots" / "learning_curves.png"))
    if run.config.data.name == "sinusoid":
        plots.append(plot_sinusoid_tasks(run, run_dir / "plots" / "adapted_curves.png"))
    if isinstance(run.tasks, GPTasks):
        plots.append(plot_gp_tasks(run, run_dir / "plots" / "predictive_bands.png"))
    if isinstance(run.tasks, CompletionTasks) and run.algo.predictive:
        plots.append(plot_completions(run, run_dir / "plots" / "completions.png"))
    return plots


def format_table(results: dict) -> str:
    """The test result as a terminal table: one row per shots, one column per inner steps."""
    metric, test_result = results["metric"], results["test"]
    percent = metric == "accuracy"
    steps = sorted({e["inner_steps"] for e in test_result["breakdown"]})
    shots = sorted({e["shots"] for e in test_result["breakdown"]})
    cells = {(e["shots"], e["inner_steps"]): e[metric] for e in test_result["breakdown"]}
    fmt = (
        (lambda v: f"{100 * v['mean']:.2f} ± {100 * v['ci95']:.2f}%")
        if percent
        else (lambda v: f"{v['mean']:.3f} ± {v['ci95']:.3f}")
    )
    task = results["task"]
    title = (
        f"test {metric} ({results['algo']} on {results['data']}, {task['ways']}-way, "
        f"{test_result['episodes']} fixed tasks, 95% CI)"
    )
    inner_loop = results["protocol"]["test_inner_steps"] is not None
    header = f"{'':>8}" + "".join(f"{f'{s} steps' if inner_loop else metric:>20}" for s in steps)
    rows = [f"{f'K={k}':>8}" + "".join(f"{fmt(cells[(k, s)]):>20}" for s in steps) for k in shots]
    if "calibration" in test_result:
        rows += calibration_rows(test_result["calibration"])
    rows += regression_rows(test_result)
    return "\n".join([title, header, *rows])


def calibration_rows(calibration: dict) -> list[str]:
    """The calibration lines under the accuracy table: pooled, and the per-episode means."""
    rows = []
    entries = [("raw", calibration)]
    if "temperature" in calibration:
        entries.append((f"T={calibration['temperature']['value']:.2f}", calibration["temperature"]))
    for name, entry in entries:
        p, t = entry["pooled"], entry["per_task"]
        rows.append(
            f"calibration ({name}): ECE {p['ece']:.4f}, MCE {p['mce']:.4f}, NLL {p['nll']:.4f}, "
            f"Brier {p['brier']:.4f} pooled; per episode ECE {t['ece']['mean']:.4f}, "
            f"NLL {t['nll']['mean']:.4f}, Brier {t['brier']['mean']:.4f}"
        )
    return rows
