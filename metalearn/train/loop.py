"""The outer loop, read top to bottom: sample -> meta-loss -> step -> log, then validate and
checkpoint on schedule. What a step does when something goes wrong is in faults.py, the outer
learning rate in schedule.py, the checkpoint's contents in state.py, validation in validate.py
and stop signals in signals.py."""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from metalearn.algos.objectives import METRICS
from metalearn.distributed import SINGLE, Group
from metalearn.errors import ConfigError, TrainingError
from metalearn.records import checkpoint
from metalearn.records.logger import Logger
from metalearn.run import Run
from metalearn.train.bar import TrainingBar
from metalearn.train.faults import grads_finite, memory_advice, out_of_memory, skip_batch
from metalearn.train.schedule import outer_optimizer, set_lr
from metalearn.train.signals import StopRequest, stop_on_signals
from metalearn.train.state import Progress, restore, save_last
from metalearn.train.validate import validate


@dataclass
class Start:
    """Where meta-training starts: a fresh outer optimiser, sampler generator and progress, or
    those of last.pt when `trainer.resume` finds one (`resumed`)."""

    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    progress: Progress
    resumed: bool


def start(run: Run, run_dir: Path, group: Group = SINGLE) -> Start:
    """Check the batch divides among the ranks, then build (or restore) what the loop steps."""
    trainer = run.config.trainer
    if run.algo.steps_itself and group.world > 1:
        raise ConfigError(
            f"algo={run.config.algo.name} takes its own outer step on the whole meta-batch "
            f"(a trust-region line search), which torchrun cannot split; run it in one process"
        )
    if run.algo.pretrains:
        group.check_divides(run.config.algo.batch_size, "algo.batch_size")
    else:
        group.check_divides(trainer.meta_batch_size, "trainer.meta_batch_size")
    optimizer = outer_optimizer(run.config.algo, run.algo, trainer.optimizer, trainer.hypergrad_lr)
    generator = torch.Generator(run.device).manual_seed(run.config.seed)
    progress = Progress()
    last_path = run_dir / "checkpoints" / "last.pt"
    resumed = trainer.resume and checkpoint.exists(last_path)  # or the previous one, see load
    if resumed:
        progress = restore(run, optimizer, generator, last_path)
    group.broadcast_parameters(list(run.algo.parameters()))
    return Start(optimizer, generator, progress, resumed)


def meta_train(run: Run, run_dir: Path, at: Start, logger: Logger, group: Group = SINGLE) -> None:
    """Meta-train and validate from `at` until the budget is spent (best.pt and last.pt written).

    A stop signal saves last.pt at the next iteration boundary and then takes its usual course.
    Under torchrun (`group.world` > 1) every rank trains on its share of each meta-batch and
    rank 0 alone validates and writes."""
    with stop_on_signals() as stop:
        _loop(run, at.optimizer, at.generator, at.progress, logger, run_dir, group, stop)
    if stop.signum is not None:  # last.pt is saved: now the signal's usual course
        logger.close(exit_code=1)
        signal.raise_signal(stop.signum)
        raise SystemExit(128 + stop.signum)  # a handler that returned: stop all the same


def _loop(
    run: Run,
    optimizer,
    generator,
    progress: Progress,
    logger: Logger,
    run_dir: Path,
    group: Group = SINGLE,
    stop: StopRequest | None = None,
) -> None:
    trainer = run.config.trainer
    budget = math.inf if trainer.max_minutes is None else 60.0 * trainer.max_minutes
    cpu_budget = math.inf if trainer.max_cpu_minutes is None else 60.0 * trainer.max_cpu_minutes
    shown = trainer.progress and group.main
    bar = TrainingBar(run.name, trainer.iterations, progress, budget, shown)
    params = [p for p in run.algo.parameters() if p.requires_grad]
    window_start, window_tasks = time.perf_counter(), 0
    while progress.iteration < trainer.iterations:
        started, cpu_started = time.perf_counter(), time.process_time()
        set_lr(optimizer, run, progress.iteration)
        batch, size = _sample(run, generator)
        skipped, metrics, scalars = _outer_steps(
            run, optimizer, group.shard(batch, size), batch, params, progress, run_dir, group, stop
        )
        progress.iteration += 1
        window_tasks += batch.tasks
        progress.seconds += time.perf_counter() - started
        progress.cpu_seconds += time.process_time() - cpu_started
        bar.advance(progress)
        if progress.iteration % trainer.log_every == 0:
            rate = window_tasks / (time.perf_counter() - window_start)
            _log_train(run, logger, bar, metrics, skipped, progress, optimizer, rate, batch.unit)
            window_start, window_tasks = time.perf_counter(), 0
        exhausted = progress.seconds >= budget, progress.cpu_seconds >= cpu_budget
        over_budget = min(budget, cpu_budget) < math.inf and group.agree(any(exhausted))
        if progress.iteration % trainer.eval_every == 0 or over_budget:
            started, cpu_started = time.perf_counter(), time.process_time()
            if group.main:  # the others wait for it at the next all-reduce
                validate(run, progress, logger, run_dir, optimizer, generator, bar)
            spent = time.perf_counter() - started
            progress.seconds += spent
            progress.validation_seconds += spent
            progress.cpu_seconds += time.process_time() - cpu_started
            window_start, window_tasks = time.perf_counter(), 0  # tasks/s counts training only
        if over_budget:
            progress.stopped_by = "max_minutes" if progress.seconds >= budget else "max_cpu_minutes"
            break
        if scalars[3] > 0:  # a stop signal reached some rank
            _stop_now(run, progress, run_dir, optimizer, generator, group, stop)
            bar.close(progress)
            return
    if group.main and progress.validated_at != progress.iteration:  # best must see the last
        validate(run, progress, logger, run_dir, optimizer, generator, bar)
    bar.close(progress)
    group.barrier()  # last.pt and best.pt are written before any rank goes on


def _sample(run: Run, generator) -> tuple[Any, int]:
    """The full meta-batch of this iteration and its size; every rank draws the same one and
    keeps its share (see distributed.py). Pre-training (Baseline, RFS): plain labelled batches."""
    if run.algo.pretrains:
        size = run.config.algo.batch_size
        return run.tasks.sample_labelled("train", generator, size), size
    size = run.config.trainer.meta_batch_size
    return run.tasks.sample("train", generator, size, *run.train_shape), size


def _outer_steps(
    run: Run, optimizer, shard, batch, params, progress: Progress, run_dir: Path, group, stop
) -> tuple[bool, dict, torch.Tensor]:
    """One outer step per meta-batch, or several (PPO's epochs over its trials: meta_losses):
    whether the batch was dropped for a non-finite loss or gradient, the last step's metrics
    and the scalars every rank agreed on (loss, logged loss and score, the stop flag)."""
    trainer = run.config.trainer
    if run.algo.steps_itself:  # e.g. TRPO's line search: no backward pass, no optimiser here
        updates = _own_steps(run, shard, progress.iteration)
    else:
        updates = _backward_passes(run, shard, progress.iteration)
    skipped, metrics, scalars = False, {}, None
    while True:
        try:
            optimizer.zero_grad(set_to_none=True)
            update = next(updates, None)  # its gradients are in .grad (steps_itself: no .grad)
            if update is None:
                break
            loss, metrics = update
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
            if not out_of_memory(error):
                raise
            raise TrainingError(memory_advice(run, progress.iteration + 1, error)) from error
        # one collective per update: the gradients, the logged values and the stop flag
        stopping = float(stop is not None and stop.signum is not None)
        logged = [
            loss,
            metrics["loss"],
            metrics["score"],
            torch.tensor(stopping, device=loss.device),
        ]
        scalars = torch.stack([v.detach().float().reshape(()) for v in logged])
        scalars = group.average_gradients(params, scalars)  # the means over ranks
        finite = torch.stack([torch.isfinite(scalars[0]), *grads_finite(params)]).all()
        skipped = not finite.item()  # the update's one host sync; the same on every rank
        if skipped:
            skip_batch(run, batch, scalars[0], progress, run_dir)
            break  # the rest of a dropped batch's updates too
        if trainer.clip_grad_norm is not None:  # the same clipped gradient on every rank
            norm = torch.nn.utils.clip_grad_norm_(params, trainer.clip_grad_norm)
            metrics = metrics | {"grad_norm": norm}
        optimizer.step()  # (a skipped batch's gradients are cleared before the next backward)
        metrics = metrics | {"loss": scalars[1], "score": scalars[2]}
    return skipped, metrics, scalars


def _own_steps(run: Run, shard, iteration: int) -> Iterator[tuple[torch.Tensor, dict]]:
    """A learner that `steps_itself` (MAML-TRPO) updates its weights on the meta-batch in one
    call; the optimiser the loop holds for it (schedule.LearnerSteps) does nothing."""
    yield run.algo.outer_step(shard, iteration)


def _backward_passes(run: Run, shard, iteration: int) -> Iterator[tuple[torch.Tensor, dict]]:
    """For each outer step (one; PPO: one per epoch), the backward pass that leaves its gradients
    in .grad, then its (loss, metrics). With hardware.task_chunk, one pass per chunk of tasks,
    each weighted by its share of the meta-batch: the gradient is the whole meta-batch's, but
    only one chunk's graph is held at a time."""
    chunk = run.config.hardware.task_chunk
    if chunk is None or shard.tasks <= chunk:
        updates = run.algo.meta_losses(shard, iteration)
        while True:
            with run.autocast():
                update = next(updates, None)
            if update is None:
                return
            update[0].backward()
            yield update
    total, metrics = shard.tasks, {}
    loss = torch.zeros(())
    for start in range(0, total, chunk):
        part = shard[start : start + chunk]
        with run.autocast():
            part_loss, part_metrics = run.algo.meta_loss(part, iteration)
        share = part.tasks / total
        (part_loss * share).backward()
        loss = loss.to(part_loss.device) + share * part_loss.detach().float()
        for key, value in part_metrics.items():
            metrics[key] = metrics.get(key, 0.0) + share * torch.as_tensor(value).detach().float()
    yield loss, metrics


def _stop_now(run: Run, progress: Progress, run_dir: Path, optimizer, generator, group, stop):
    """A stop signal reached some rank: save last.pt (nothing done since the last iteration is
    lost), say how to resume, and let every rank stop."""
    if group.main:
        save_last(run, progress, run_dir, optimizer, generator)
        name = signal.Signals(stop.signum).name if stop.signum else "a stop signal"
        print(
            f"\n{name}: saved {run_dir / 'checkpoints' / 'last.pt'} at iteration "
            f"{progress.iteration}; continue with trainer.resume=true "
            f"hydra.run.dir={run_dir}",
            file=sys.stderr,
            flush=True,
        )
    group.barrier()
    stop.signum = stop.signum or signal.SIGTERM  # a rank told by another stops too


def _log_train(
    run: Run, logger, bar, metrics, skipped: bool, progress: Progress, optimizer, rate, unit: str
) -> None:
    """Training metrics every trainer.log_every iterations (a dropped batch logs only the count
    of dropped batches: its loss is not a training metric), and a warning when tasks diverged."""
    iteration = progress.iteration
    if skipped:
        logger.log({"train/skipped": progress.skipped}, step=iteration)
        return
    metrics = metrics | ({"skipped": progress.skipped} if progress.skipped else {})
    loss, score = metrics["loss"].item(), metrics["score"].item()
    name = METRICS[run.metric].train_key
    logger.log(
        {
            "train/loss": loss,
            f"train/{name}": score,
            f"perf/{unit}_per_s": rate,  # tasks, or examples in pre-training
            # (none where the learner steps itself: schedule.LearnerSteps)
            **(
                {"train/outer_lr": optimizer.param_groups[0]["lr"]}
                if optimizer.param_groups
                else {}
            ),
            # what else the algorithm reports (iMAML: the fraction of tasks skipped)
            **{f"train/{k}": float(v) for k, v in metrics.items() if k not in ("loss", "score")},
        },
        step=iteration,
    )
    diverged = float(metrics.get("diverged", 0.0))
    if diverged > 0:  # some tasks' inner loops blew up and were left out of the meta-gradient
        advice = run.algo.divergence_advice()
        tqdm.write(
            f"iteration {iteration}: {diverged:.0%} of the meta-batch's tasks diverged in "
            f"{run.config.algo.name}'s inner loop (non-finite loss or meta-gradient) and were "
            f"left out of the meta-gradient; {advice}",
            file=sys.stderr,
        )
    bar.set_postfix(
        {"loss": f"{loss:.3f}", run.metric[:3]: f"{score:.3f}", f"{unit}/s": f"{rate:.0f}"},
        refresh=False,  # shown at the bar's next refresh, which mininterval paces
    )
