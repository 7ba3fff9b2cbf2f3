"""Hydra callbacks: what a sweep leaves behind besides its jobs' run directories."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

RESULTS = "optimization_results.yaml"  # what Hydra's Optuna sweeper writes in the sweep dir


class BestTrial(Callback):
    """After an Optuna search, write <sweep dir>/best_run.sh: `metalearn train` with the
    search's own fixed overrides and the best trial's parameters, which reruns that trial."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        found = sweep_dir / RESULTS
        if not found.is_file():
            return  # a grid sweep: `metalearn summarize` is its summary
        best = yaml.safe_load(found.read_text())
        write_best_run(sweep_dir, list(config.hydra.overrides.task), best["best_params"])


def write_best_run(sweep_dir: Path, task_overrides: list[str], best_params: dict) -> Path:
    """The script that reruns the best trial. It keeps `sweep=<name>`: without -m the preset's
    search settings are inert, and its trainer settings (iterations, say) are the trial's."""
    fixed = list(task_overrides)
    chosen = [f"{key}={value}" for key, value in best_params.items()]
    names = {o.split("=", 1)[0] for o in chosen}
    fixed = [o for o in fixed if o.split("=", 1)[0] not in names]
    command = ["metalearn", "train", *fixed, *chosen]
    path = sweep_dir / "best_run.sh"
    path.write_text(
        "#!/usr/bin/env bash\n# the best trial of this Optuna search, rerun as one job\n"
        + shlex.join(command)
        + ' "$@"\n'
    )
    path.chmod(0o755)
    return path
