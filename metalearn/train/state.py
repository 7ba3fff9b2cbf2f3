"""What a checkpoint holds of a training run, and the loop's progress across restarts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from metalearn.config import as_dict
from metalearn.data.tasks import StoredTasks
from metalearn.records import checkpoint
from metalearn.run import Run


@dataclass
class Progress:
    """What the loop must remember across a restart (saved in every checkpoint)."""

    iteration: int = 0
    seconds: float = 0.0  # training wall time so far, summed over restarts
    validation_seconds: float = 0.0  # the part of `seconds` spent validating
    cpu_seconds: float = 0.0  # the process's CPU time in training and validation (all threads)
    best_value: float | None = None  # best validation score so far
    best_iteration: int | None = None
    best_val: dict | None = None  # the best validation's summary for results.json
    validated_at: int = -1  # iteration of the latest validation
    stopped_by: str = "iterations"  # or "max_minutes", "max_cpu_minutes"
    skipped: int = 0  # meta-batches dropped for a non-finite loss or gradient (nonfinite=skip)


def state(run: Run, progress: Progress) -> dict:
    return {
        "config": run.config_dict,
        "algo_state": run.algo.state_dict(),
        "progress": as_dict(progress),
        "preprocess": run.preprocess,
        # the input shape and training classes: `metalearn eval` of an episode needs no data set
        "inputs": StoredTasks.describe(run.tasks),
        "torch_rng": torch.get_rng_state(),
    }


def save_last(run: Run, progress: Progress, run_dir: Path, optimizer, generator) -> None:
    checkpoint.save(
        run_dir / "checkpoints" / "last.pt",
        state(run, progress)
        | {"optimizer": optimizer.state_dict(), "generator": generator.get_state()},
    )


def restore(run: Run, optimizer, generator, path: Path) -> Progress:
    """Load last.pt: weights, optimiser, sampler RNG and progress, after checking compatibility."""
    state = checkpoint.load(path)
    checkpoint.check_compatible(state, run.config.algo.name, run.config.model.name, path)
    run.load_algo_state(state, path)
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return Progress(**state["progress"])
