"""What a checkpoint holds of a training run, and the loop's progress across restarts: the
default loop's (Progress) and online meta-learning's (Standing and Online, train/online.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from metalearn.algos.bilevel.inner import Params
from metalearn.config import as_dict
from metalearn.data.stream import TaskStream
from metalearn.data.tasks import StoredTasks
from metalearn.errors import CheckpointError
from metalearn.records import checkpoint
from metalearn.run import Run

METHODS = ("ftml", "ftl", "toe", "scratch")  # online meta-learning's methods, FTML first
JOINT = ("ftl", "toe")  # those that train one model on pooled tasks


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
    if "rounds" in state["progress"]:
        raise CheckpointError(
            f"{path} holds an online run's stream (trainer=online); resume it with trainer=online, "
            f"or train with trainer=default in a new hydra.run.dir"
        )
    run.load_algo_state(state, path)
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return Progress(**state["progress"])


@dataclass
class Standing:
    """How far the stream has got (saved in every checkpoint)."""

    rounds: int = 0  # tasks met: the stream's position
    meta_steps: int = 0  # FTML's meta-gradient steps so far
    seconds: float = 0.0  # wall time of the rounds, summed over restarts
    stopped_by: str = "tasks"  # or "max_minutes"


@dataclass
class Online:
    """What the rounds step: the stream, FTML's outer optimiser (the prior is the learner's own
    weights), FTL's and TOE's models and optimisers, the buffer of seen tasks and the generator
    of its draws, each round's losses and scores, and a copy of the network that from-scratch
    re-initialises."""

    stream: TaskStream
    optimizer: torch.optim.Optimizer
    joint: dict[str, Params]
    joint_optimizers: dict[str, torch.optim.Optimizer]
    generator: torch.Generator
    blank: nn.Module
    buffer: list[int] = field(default_factory=list)  # indices of the tasks seen, in order
    records: dict = field(default_factory=lambda: {m: {"loss": [], "score": []} for m in METHODS})
    standing: Standing = field(default_factory=Standing)
    resumed: bool = False


def online_state(run: Run, at: Online) -> dict:
    """last.pt: the prior and its optimiser, FTL's and TOE's models and optimisers, the stream's
    position, the buffer, its generator and every round's record."""
    return {
        "config": run.config_dict,
        "algo_state": run.algo.state_dict(),  # FTML's prior
        "progress": as_dict(at.standing),
        "optimizer": at.optimizer.state_dict(),
        "joint": {m: {k: v.detach().clone() for k, v in p.items()} for m, p in at.joint.items()},
        "joint_optimizers": {m: o.state_dict() for m, o in at.joint_optimizers.items()},
        "buffer": list(at.buffer),
        "records": at.records,
        "generator": at.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "preprocess": run.preprocess,
        "inputs": StoredTasks.describe(run.tasks),
    }


def restore_online(run: Run, at: Online, path: Path) -> None:
    """Continue from last.pt, after checking that it played this stream."""
    saved = checkpoint.load(path)
    checkpoint.check_compatible(saved, run.config.algo.name, run.config.model.name, path)
    config, mine = saved["config"], run.config_dict
    rounds = saved["progress"]["rounds"] if "rounds" in saved.get("progress", {}) else None
    data = [{k: v for k, v in c["data"].items() if k != "root"} for c in (config, mine)]
    same = [data[0] == data[1]] + [
        config["trainer"].get(key) == mine["trainer"][key] for key in ("pool", "stream_seed")
    ]
    if rounds is None or not all(same) or config["seed"] != mine["seed"]:
        raise CheckpointError(
            f"{path} did not play this stream (another trainer, data set, seed, trainer.pool or "
            f"trainer.stream_seed); resume with the settings it was written with, or start the "
            f"stream in a new hydra.run.dir"
        )
    if rounds > run.config.trainer.tasks:
        raise CheckpointError(
            f"{path} has played {rounds} rounds; set trainer.tasks to at least {rounds}"
        )
    run.load_algo_state(saved, path)
    at.optimizer.load_state_dict(saved["optimizer"])
    with torch.no_grad():
        for method, params in at.joint.items():
            for key, value in params.items():
                value.copy_(saved["joint"][method][key])
            at.joint_optimizers[method].load_state_dict(saved["joint_optimizers"][method])
    at.buffer[:] = saved["buffer"]
    at.records = saved["records"]
    at.generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    at.standing = Standing(**saved["progress"])
    at.resumed = True
