"""What went wrong in a meta-training step, said so that a user can fix it: where a NaN or Inf
first appeared and its likely cause, running out of memory with the settings that need less,
and what is kept on disk."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from metalearn.errors import TrainingError
from metalearn.hardware import peak_memory_mib
from metalearn.run import Run

if TYPE_CHECKING:
    from metalearn.train.state import Progress


def grads_finite(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """One 0-d bool per parameter with a gradient: whether all of it is finite (no host sync)."""
    return [torch.isfinite(p.grad).all() for p in params if p.grad is not None]


def tensors(tree: Any) -> list[torch.Tensor]:
    """The tensors of a meta-batch (dataclasses, dicts, tuples, tensors)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in tensors(value)]
    if isinstance(tree, list | tuple):
        return [t for value in tree for t in tensors(value)]
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):  # TaskBatch, Split, ...
        return tensors(vars(tree))
    return []


def nonfinite_fault(run: Run, batch: Any, loss: torch.Tensor, iteration: int) -> str:
    """Where a NaN or Inf first appeared at this iteration (the data, the forward pass or the
    backward pass) and what most likely caused it."""
    algo = run.config.algo
    data_bad = any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensors(batch))
    if data_bad:
        return (
            f"the meta-batch of iteration {iteration} itself holds NaN or Inf values: the data "
            f"set (data={run.config.data.name}) or its preprocessing is broken, not the training"
        )
    forward = not torch.isfinite(loss)
    causes = run.algo.nonfinite_causes(gradient=not forward)
    # a first forward pass has had no outer step before it; a learner that steps itself names
    # its own step among its causes (MAML-TRPO: the trust region)
    if (iteration > 1 or not forward) and not run.algo.steps_itself:
        causes.append(f"the outer step (algo.outer_lr={algo.outer_lr}: lower it)")
    if forward:
        where = f"the meta-training loss became {loss.item()} at iteration {iteration} (forward)"
    else:
        names = {id(p): name for name, p in run.model.named_parameters()}
        bad = [
            names.get(id(p), f"learned parameter {i} of algo={algo.name}")
            for i, p in enumerate(run.algo.parameters())
            if p.grad is not None and not torch.isfinite(p.grad).all()
        ]
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        where = (
            f"the meta-gradient of {shown} became NaN or Inf at iteration {iteration} "
            f"(backward; the loss was finite)"
        )
    likely = ", or ".join(causes) if causes else "the model's initial weights or inputs"
    return f"{where}; likely cause: {likely}"


def out_of_memory(error: BaseException) -> bool:
    """Whether an exception is the allocator running out (CUDA, or the CPU's DefaultAllocator)."""
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(error)
    return "out of memory" in text or "can't allocate memory" in text


def peak_memory(device: torch.device) -> str:
    """The most memory this run has held: the CUDA allocator's peak, or the process's peak RSS."""
    where = f"on {device}" if device.type == "cuda" else "of host memory (peak resident set)"
    return f"{peak_memory_mib(device) / 1024:.2f} GiB {where}"


def memory_advice(run: Run, iteration: int, error: BaseException) -> str:
    """What ran out, the peak memory seen and the settings that need less of it."""
    algo, trainer = run.config.algo, run.config.trainer
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    tasks = f"trainer.meta_batch_size={trainer.meta_batch_size}"
    size, chunk = trainer.meta_batch_size, run.config.hardware.task_chunk or trainer.meta_batch_size
    tips = [f"a smaller meta-batch (trainer.meta_batch_size={max(1, size // 2)})"]
    episodic = not (run.algo.pretrains or run.algo.reinforcement)
    if episodic and chunk > 1 and size % (chunk // 2) == 0:  # the same gradient, less memory
        tips.insert(0, f"fewer tasks at a time (hardware.task_chunk={chunk // 2})")
    what, before, after = run.algo.memory_advice()
    what = what or f"algo={algo.name}"
    tips = before + tips + after
    return (
        f"out of memory at iteration {iteration} in {what}, {tasks}; peak memory "
        f"{peak_memory(run.device)}; try {', or '.join(tips)} ({first})"
    )


def kept(run_dir: Path, advice: str | None = None) -> str:
    """What the user still has after a divergence, and what to do next."""
    last = run_dir / "checkpoints" / "last.pt"
    advice = advice or (
        "lower algo.outer_lr or the inner learning rates (algo.inner_lr, algo.test_inner_lr)"
    )
    if last.is_file():
        return f"the last good checkpoint is kept at {last}; {advice}, then trainer.resume=true"
    return f"no checkpoint was saved yet; {advice} and start again"


def skip_batch(run: Run, batch: Any, loss: torch.Tensor, progress: Progress, run_dir: Path):
    """A non-finite loss or gradient: stop (trainer.nonfinite=stop, or too many skipped), or
    count the dropped meta-batch and warn the first time."""
    trainer = run.config.trainer
    fault = nonfinite_fault(run, batch, loss, progress.iteration + 1)
    if trainer.nonfinite == "stop":
        raise TrainingError(f"{fault}; {kept(run_dir, 'fix that')}")
    if progress.skipped >= trainer.max_skipped:
        raise TrainingError(
            f"{fault}; that is more than trainer.max_skipped={trainer.max_skipped} "
            f"skipped meta-batches, so training stops; {kept(run_dir, 'fix that')}"
        )
    progress.skipped += 1
    if progress.skipped == 1:
        warnings.warn(
            f"{fault}; trainer.nonfinite=skip: that meta-batch is dropped and "
            f"training goes on (skipped batches are counted in train/skipped and "
            f"results.json)",
            RuntimeWarning,
            stacklevel=4,
        )
