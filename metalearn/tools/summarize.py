"""`metalearn summarize <dir>`: the results.json files of a sweep as one table, seeds pooled.

Runs are grouped by their Hydra overrides without `seed` (and named by the overrides that vary
across the sweep); each group's row holds the mean test
metric across seeds with a Student-t 95% interval (what a few seeds warrant), the mean of the
runs' own 95% intervals across test episodes, and the budget spent. Writes summary.csv and
summary.md into the directory and returns the markdown.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import yaml

from metalearn.errors import MetalearnError

# two-sided 95% Student-t quantiles by degrees of freedom (beyond the table: the normal's 1.96)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}
T95 |= {9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}

COLUMNS = [
    "run",
    "seeds",
    "metric",
    "test_mean",
    "test_ci95_seeds",
    "test_ci95_episodes",
    "val_mean",
    "iterations",
    "wall_minutes",
    "dirs",
]


def t95(dof: int) -> float:
    """The 97.5% quantile of Student's t with `dof` degrees of freedom (conservative between
    table entries: the next smaller dof's)."""
    known = [d for d in T95 if d <= dof]
    return T95[max(known)] if dof <= 30 else 1.96


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and Student-t 95% half-width of a few values (NaN width for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t95(n - 1) * std / math.sqrt(n)


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    return [str(o) for o in yaml.safe_load(path.read_text()) or []]


def _job_order(path: Path) -> tuple:
    """Hydra's job order: job folders are '<number>_<overrides>'; 10 comes after 9."""
    return tuple(
        (int(part.split("_", 1)[0]), part) if part.split("_", 1)[0].isdigit() else (-1, part)
        for part in path.parts
    )


def collect(root: Path) -> list[dict[str, Any]]:
    """Every run under `root` with its results and its overrides less the seed."""
    runs = []
    for path in sorted(root.rglob("results.json"), key=_job_order):
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise MetalearnError(f"{path} is not valid JSON ({error}); rerun that job") from error
        kept = [o for o in _overrides(path.parent) if o.split("=", 1)[0].lstrip("+~") != "seed"]
        runs.append({"dir": path.parent, "results": results, "overrides": kept})
    shared = set.intersection(*(set(r["overrides"]) for r in runs)) if runs else set()
    for run in runs:  # name a configuration by what varies across the sweep
        run["key"] = " ".join(o for o in run["overrides"] if o not in shared)
    return runs


def summarize(root: Path) -> list[dict[str, Any]]:
    """One row per configuration (overrides less the seed), in the sweep's order."""
    root = Path(root)
    if not root.is_dir():
        raise MetalearnError(f"{root} is not a directory; give a multirun (or outputs) folder")
    runs = collect(root)
    if not runs:
        raise MetalearnError(
            f"no results.json under {root}; have the sweep's jobs finished? (each writes "
            "<job dir>/results.json when its test is done)"
        )
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["key"], []).append(run)
    rows = []
    for key, members in groups.items():
        metric = members[0]["results"]["metric"]
        test = [m["results"]["test"][metric] for m in members]
        mean, ci = mean_ci([t["mean"] for t in test])
        # (an online run validates nothing: its val is null)
        val = [(m["results"].get("val") or {}).get(metric, {}).get("mean") for m in members]
        train = [m["results"].get("train") or {} for m in members]
        rows.append(
            {
                "run": key or "(no overrides)",
                "seeds": len(members),
                "metric": metric,
                "test_mean": mean,
                "test_ci95_seeds": ci,
                "test_ci95_episodes": sum(t["ci95"] for t in test) / len(test),
                "val_mean": (sum(val) / len(val) if all(v is not None for v in val) else math.nan),
                "iterations": sum(t.get("iterations", 0) for t in train) / len(train),
                "wall_minutes": sum(t.get("wall_seconds", 0.0) for t in train) / len(train) / 60,
                "dirs": " ".join(str(m["dir"].relative_to(root)) for m in members),
            }
        )
    return rows


def _number(value: float, metric: str) -> str:
    if math.isnan(value):
        return "-"
    return f"{100 * value:.2f}" if metric == "accuracy" else f"{value:.4g}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (accuracy in percent)."""
    lines = [
        "| run | seeds | test (mean ± 95% CI across seeds) | mean 95% CI across test episodes "
        "| val | iterations | minutes |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        unit = "%" if r["metric"] == "accuracy" else f" {r['metric']}"
        test = (
            f"{_number(r['test_mean'], r['metric'])} ± {_number(r['test_ci95_seeds'], r['metric'])}"
        )
        lines.append(
            f"| {r['run']} | {r['seeds']} | {test}{unit} "
            f"| ± {_number(r['test_ci95_episodes'], r['metric'])} "
            f"| {_number(r['val_mean'], r['metric'])} | {r['iterations']:.0f} "
            f"| {r['wall_minutes']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def write(root: Path, rows: list[dict[str, Any]]) -> str:
    """summary.csv and summary.md in `root`; returns the markdown."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    (root / "summary.csv").write_text(buffer.getvalue())
    table = markdown(rows)
    (root / "summary.md").write_text(table)
    return table
