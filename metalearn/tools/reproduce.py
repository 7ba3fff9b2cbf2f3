"""`metalearn reproduce TABLE`: a paper table's rows over seeds, beside the published numbers.

A table is configs/tables/<name>.yaml: rows naming an experiment (the paper's protocol), the
published value with its interval and, where one experiment gives several rows, which view of
its test to read (`select`: shots and inner steps of test.breakdown). Each (row, seed) is an
ordinary `metalearn train` run in outputs/reproduce/<table>/budget<F>/<experiment>/seed<s>;
finished runs at that budget are reused, so an interrupted reproduction continues where it
stopped. `--budget F` runs F of each experiment's iterations (and of its schedule's decay steps)
for a quick check; the table says which budget produced it. Writes results/<table>.md and .csv,
and PNG plots of the validation curves, test-time inner steps and shots.

Over 300 lines because a reproduction is a small pipeline of its own: tables, runs over seeds
reused across interruptions, the pooled numbers and their plots.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metalearn.errors import ConfigError
from metalearn.tools.summarize import mean_ci

REPO = Path(__file__).resolve().parents[2]
TABLES = REPO / "configs" / "tables"


@dataclass
class Row:
    name: str
    experiment: str
    published: dict[str, float]
    select: dict[str, int] = field(default_factory=dict)


def tables() -> list[str]:
    return sorted(p.stem for p in TABLES.glob("*.yaml"))


def load_table(name: str) -> tuple[dict, list[Row]]:
    path = TABLES / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no table {name!r}; the tables are: {', '.join(tables())}")
    spec = yaml.safe_load(path.read_text())
    return spec, [Row(**row) for row in spec["rows"]]


def experiment_config(experiment: str) -> dict:
    """The composed config of `metalearn train experiment=<experiment>`."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        cfg = compose("train", overrides=[f"experiment={experiment}"])
    return OmegaConf.to_container(cfg, resolve=True)


def budget_overrides(config: dict, budget: float) -> list[str]:
    """The trainer overrides that run `budget` of the experiment's iterations, with the
    validation and the learning-rate decay scaled alike."""
    trainer = config["trainer"]
    iterations = max(1, round(budget * trainer["iterations"]))
    out = [f"trainer.iterations={iterations}"]
    out.append(f"trainer.eval_every={max(1, min(trainer['eval_every'], iterations))}")
    if trainer.get("lr_decay_every"):
        out.append(f"trainer.lr_decay_every={max(1, round(budget * trainer['lr_decay_every']))}")
    return out


def run_dir(out: Path, table: str, experiment: str, seed: int, budget: float) -> Path:
    """Where a (row, seed) at a budget runs: another budget never reuses it."""
    return out / table / f"budget{budget:g}" / experiment / f"seed{seed}"


def train_one(command: list[str], directory: Path, log: Path) -> str | None:
    """Run one training job; None on success, else the reason (the error's last line)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        done = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode == 0 and (directory / "results.json").is_file():
        return None
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {done.returncode}"


def pick(results: dict, select: dict[str, int]) -> dict[str, float]:
    """The row's view of a run's test: the headline, or one entry of test.breakdown."""
    metric = results["metric"]
    if not select:
        return results["test"][metric]
    for entry in results["test"].get("breakdown", []):
        if all(entry.get(k) == v for k, v in select.items()):
            return entry[metric]
    raise ConfigError(f"the test of {results['algo']} has no breakdown entry {select}")


def reproduce(
    table: str,
    *,
    budget: float = 1.0,
    seeds: int = 3,
    out: Path = REPO / "outputs" / "reproduce",
    results_dir: Path = REPO / "results",
    extra: list[str] | None = None,
    only: list[str] | None = None,
) -> str:
    """Run (or reuse) every row's seeds, then write the table; return its markdown. `only`
    names the experiments to run (the others' finished runs are still shown)."""
    if not 0 < budget <= 1:
        raise ConfigError(f"--budget must be in (0, 1], got {budget}")
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    spec, rows = load_table(table)
    spec["_name"], spec["_extra"] = table, list(extra or [])
    if only is not None:
        spec["_extra"].insert(0, f"--only {','.join(only)}")
    unknown = sorted(set(only or []) - {r.experiment for r in rows})
    if unknown:
        raise ConfigError(
            f"--only names {', '.join(unknown)}, not in table {table}; its experiments: "
            + ", ".join(dict.fromkeys(r.experiment for r in rows))
        )
    failures: dict[str, str] = {}
    commands: dict[str, str] = {}
    configs = {e: experiment_config(e) for e in dict.fromkeys(r.experiment for r in rows)}
    for experiment, config in configs.items():
        overrides = budget_overrides(config, budget) + list(extra or [])
        commands[experiment] = " ".join(["metalearn train", f"experiment={experiment}", *overrides])
        if only is not None and experiment not in only:
            failures[experiment] = "left out (--only)"
            continue
        reason = _run_seeds(out, table, experiment, seeds, budget, overrides)
        if reason is not None:
            failures[experiment] = reason
    table_rows = []
    for row in rows:
        found = [
            json.loads(
                (run_dir(out, table, row.experiment, s, budget) / "results.json").read_text()
            )
            for s in range(seeds)
            if (run_dir(out, table, row.experiment, s, budget) / "results.json").is_file()
        ]
        table_rows.append(summarize_row(row, found, failures.get(row.experiment)))
    results_dir.mkdir(parents=True, exist_ok=True)
    md = markdown(spec, table_rows, budget, seeds, commands)
    (results_dir / f"{table}.md").write_text(md)
    (results_dir / f"{table}.csv").write_text(to_csv(table_rows))
    plot_curves(
        table, rows, seeds, out / table / f"budget{budget:g}", results_dir / f"{table}_curves.png"
    )
    plot_steps(
        table, rows, seeds, out / table / f"budget{budget:g}", results_dir / f"{table}_steps.png"
    )
    plot_shots(table_rows, rows, configs, results_dir / f"{table}_shots.png")
    return md


def _run_seeds(
    out: Path, table: str, experiment: str, seeds: int, budget: float, overrides: list[str]
) -> str | None:
    """Train each seed of one experiment not finished earlier; why it failed, or None."""
    for seed in range(seeds):
        directory = run_dir(out, table, experiment, seed, budget)
        if (directory / "results.json").is_file():
            continue  # finished earlier: reused
        command = [sys.executable, "-m", "metalearn.cli", "train", f"experiment={experiment}"]
        command += [f"seed={seed}", *overrides, "trainer.progress=false", "trainer.resume=true"]
        command += [f"hydra.run.dir={directory}"]
        started = time.perf_counter()
        print(f"[reproduce] {experiment} seed {seed}: {' '.join(command[3:])}", flush=True)
        reason = train_one(command, directory, directory.parent / f"seed{seed}.log")
        print(f"[reproduce]   {reason or 'done'} ({time.perf_counter() - started:.0f} s)")
        if reason is not None:
            return reason  # the other seeds would fail alike (missing data, say)
    return None


def summarize_row(row: Row, found: list[dict], failure: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"row": row.name, "experiment": row.experiment, "seeds": len(found)}
    entry |= {"published": row.published["mean"], "published_ci95": row.published.get("ci95")}
    if not found:
        return entry | {"status": f"not run: {failure or 'no finished seed'}"}
    views = [pick(r, row.select) for r in found]
    mean, ci = mean_ci([v["mean"] for v in views])
    first = found[0]
    low = row.published["mean"] - (row.published.get("ci95") or 0.0)
    high = row.published["mean"] + (row.published.get("ci95") or 0.0)
    return entry | {
        "metric": first["metric"],
        "mean": mean,
        "ci95_seeds": ci,
        "ci95_episodes": sum(v["ci95"] for v in views) / len(views),
        "difference": mean - row.published["mean"],
        "within_published_interval": (
            low <= mean <= high if row.published.get("ci95") is not None else None
        ),
        "iterations": first["train"]["iterations"],
        "minutes_per_seed": sum(r["train"]["wall_seconds"] for r in found) / len(found) / 60,
        "hardware": f"{first['hardware']['device']}, {first['hardware'].get('threads')} threads",
        "status": "ok" if not failure else f"partial: {failure}",
    }


def _fmt(value: float | None, metric: str, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    scale, digits = (100, 2) if metric == "accuracy" else (1, 3)
    return f"{scale * value:+.{digits}f}" if signed else f"{scale * value:.{digits}f}"


def markdown(spec: dict, rows: list[dict], budget: float, seeds: int, commands: dict) -> str:
    metric = next((r["metric"] for r in rows if "metric" in r), "accuracy")
    command = " ".join(
        ["metalearn reproduce", spec["_name"], f"--budget {budget:g}", f"--seeds {seeds}"]
        + spec["_extra"]
    )
    unit = "accuracy, %" if metric == "accuracy" else metric
    lines = [
        f"# {spec['title']}",
        "",
        f"Published: {spec['source']}. Ours: mean over {seeds} seed(s) ± 95% CI across seeds "
        f"(Student t); the next column is the mean 95% CI across each run's fixed test episodes. "
        f"Budget: {budget:g} of each experiment's iterations. Generated by "
        f"`{command}`.",
        "",
        f"| row ({unit}) | ours | ± episodes | published | difference | within published CI "
        "| seeds | iterations | minutes/seed | hardware |",
        "|---|---|---:|---|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        pub = _fmt(r["published"], metric)
        if r.get("published_ci95") is not None:
            pub += f" ± {_fmt(r['published_ci95'], metric)}"
        if "mean" not in r:
            lines.append(f"| {r['row']} | {r['status']} | | {pub} | | | 0 | | | |")
            continue
        within = {True: "yes", False: "no", None: "- (no interval)"}[r["within_published_interval"]]
        lines.append(
            f"| {r['row']} | {_fmt(r['mean'], metric)} ± {_fmt(r['ci95_seeds'], metric)} "
            f"| {_fmt(r['ci95_episodes'], metric)} | {pub} | {_fmt(r['difference'], metric, True)} "
            f"| {within} | {r['seeds']} | {r['iterations']} | {r['minutes_per_seed']:.1f} "
            f"| {r['hardware']} |"
        )
    lines += ["", "Commands (each seed adds `seed=<s>`):", ""]
    lines += [f"- `{c}`" for c in commands.values()]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _run_files(rows: list[Row], seeds: int, out: Path, name: str) -> Iterator[tuple]:
    """(experiment, seed, path) of each run under `out` (a budget's folder of runs) that has
    written the file `name`, in table order."""
    for experiment in dict.fromkeys(r.experiment for r in rows):
        for seed in range(seeds):
            path = out / experiment / f"seed{seed}" / name
            if path.is_file():
                yield experiment, seed, path


def plot_curves(table: str, rows: list[Row], seeds: int, out: Path, path: Path) -> Path | None:
    """Validation metric against iteration, one line per experiment and seed (`out`: the
    budget's folder of runs)."""
    from metalearn.records.plots import plt, save

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for experiment, seed, metrics in _run_files(rows, seeds, out, "metrics.jsonl"):
        points = []
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            key = next((k for k in record if k in ("val/acc", "val/mse", "val/reward")), None)
            if key:
                points.append((record["step"], record[key], key))
        if points:
            steps, values, keys = zip(*points, strict=True)
            ax.plot(steps, values, marker="o", label=f"{experiment} s{seed}")
            ax.set_ylabel(keys[0])
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("iteration")
    ax.set_title(f"{table}: validation during training")
    ax.legend(fontsize=7)
    return save(fig, path)


def plot_steps(table: str, rows: list[Row], seeds: int, out: Path, path: Path) -> Path | None:
    """Test metric against test-time inner steps (bilevel learners), one line per experiment
    and number of shots, seeds averaged; None when no run has such a breakdown."""
    from metalearn.records.plots import plt, save

    curves: dict[str, dict[int, list[float]]] = {}
    metric = None
    for experiment, _, found in _run_files(rows, seeds, out, "results.json"):
        results = json.loads(found.read_text())
        metric = results["metric"]
        for entry in results["test"].get("breakdown", []):
            if "inner_steps" in entry:
                label = f"{experiment}, {entry['shots']}-shot"
                points = curves.setdefault(label, {})
                points.setdefault(entry["inner_steps"], []).append(entry[metric]["mean"])
    curves = {label: points for label, points in curves.items() if len(points) > 1}
    if not curves:  # one number of steps only (eval.steps unset): nothing to draw
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        steps = sorted(points)
        ax.plot(steps, [sum(points[s]) / len(points[s]) for s in steps], marker="o", label=label)
    ax.set_xlabel("test-time inner steps")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"{table}: adaptation steps at test time")
    ax.legend(fontsize=7)
    return save(fig, path)


def plot_shots(
    table_rows: list[dict], rows: list[Row], configs: dict[str, dict], path: Path
) -> Path | None:
    """Ours and published accuracy against shots, one pair of lines per number of ways
    (classification tables with rows at several shots); None otherwise."""
    from metalearn.records.plots import plt, save

    points: dict[int, list[tuple[int, float, float]]] = {}
    for summary, row in zip(table_rows, rows, strict=True):
        if summary.get("metric") != "accuracy":
            continue
        task = configs[row.experiment]["data"]
        if "ways" in task and "shots" in task:
            points.setdefault(task["ways"], []).append(
                (task["shots"], summary["mean"], summary["published"])
            )
    if not any(len({s for s, _, _ in p}) > 1 for p in points.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for ways, values in sorted(points.items()):
        values.sort()
        shots = [v[0] for v in values]
        line = ax.plot(shots, [100 * v[1] for v in values], marker="o", label=f"{ways}-way, ours")
        color = line[0].get_color()
        ax.plot(shots, [100 * v[2] for v in values], "--", color=color, label=f"{ways}-way, paper")
    ax.set_xlabel("shots")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(sorted({s for v in points.values() for s, _, _ in v}))
    ax.legend(fontsize=7)
    return save(fig, path)


def main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="metalearn reproduce",
        description="Run a paper table's rows over seeds and write results/<table>.md/.csv/.png.",
    )
    parser.add_argument("table", choices=tables())
    parser.add_argument("--budget", type=float, default=1.0, help="fraction of the iterations")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "reproduce")
    parser.add_argument("--results", type=Path, default=REPO / "results")
    parser.add_argument(
        "--only", help="comma-separated experiments to run (the table's other rows: not run)"
    )
    parser.epilog = "Extra key=value arguments go to every run (hardware.threads=1, say)."
    ns, overrides = parser.parse_known_args(args)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides are key=value)")
    print(
        reproduce(
            ns.table,
            budget=ns.budget,
            seeds=ns.seeds,
            out=ns.out,
            results_dir=ns.results,
            extra=overrides,
            only=ns.only.split(",") if ns.only else None,
        )
    )
