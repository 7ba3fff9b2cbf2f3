"""The outer loop: sample -> meta_loss -> step -> log, then validate and checkpoint on schedule."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from metalearn.config import as_dict
from metalearn.distributed import SINGLE, Group
from metalearn.errors import ConfigError, TrainingError
from metalearn.evaluate import mean_ci95, run_episodes
from metalearn.hardware import peak_memory_mib
from metalearn.records import checkpoint
from metalearn.records.logger import Logger, NullLogger
from metalearn.records.results import finish_run

if TYPE_CHECKING:
    from metalearn.build import Run


SCHEDULES = ("constant", "step", "cosine", "linear")
NONFINITE = ("stop", "skip")  # trainer.nonfinite: what a NaN or Inf loss or gradient does


@dataclass
class TrainerConfig:
    """Budget, schedule and checkpointing of meta-training."""

    iterations: int = 1000  # outer (meta) iterations
    max_minutes: float | None = None  # wall-clock budget: stop, validate and test when spent
    meta_batch_size: int = 32  # tasks per outer step
    eval_every: int = 500  # validate (and checkpoint) every this many iterations
    log_every: int = 20  # write training metrics every this many iterations
    resume: bool = False  # continue from <run dir>/checkpoints/last.pt if it exists
    # outer learning-rate schedule: 'constant', 'step' (x lr_decay every lr_decay_every
    # iterations), 'cosine' or 'linear' (from algo.outer_lr to min_lr over `iterations`);
    # None: 'step' if lr_decay_every is set, else the algorithm's own (MAML++ cosine, Reptile
    # linear, others constant)
    lr_schedule: str | None = None
    lr_decay_every: int | None = None  # multiply the outer learning rate by lr_decay this often
    lr_decay: float = 0.5  # step decay factor (ProtoNets halve it every 2000 episodes)
    min_lr: float = 0.0  # where 'cosine' and 'linear' end
    progress: bool = True  # show a progress bar
    # a NaN or Inf in the loss or the meta-gradient: 'stop' (the last good checkpoint stays), or
    # 'skip': drop that meta-batch (no outer step), count it, go on
    nonfinite: str = "stop"
    max_skipped: int = 100  # nonfinite=skip: stop all the same after this many skipped batches
    # rescale the meta-gradient to at most this L2 norm before each outer step (null: never);
    # logged as train/grad_norm (the norm before clipping)
    clip_grad_norm: float | None = None

    def __post_init__(self) -> None:
        for key in ("iterations", "meta_batch_size", "eval_every", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"trainer.{key} must be positive, got {getattr(self, key)}")
        if self.max_minutes is not None and not 0 < self.max_minutes < math.inf:
            raise ConfigError(
                f"trainer.max_minutes must be positive and finite (null: no limit), got "
                f"{self.max_minutes}"
            )
        if self.lr_decay_every is not None and self.lr_decay_every < 1:
            raise ConfigError(f"trainer.lr_decay_every must be positive, got {self.lr_decay_every}")
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"trainer.lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.lr_schedule not in (None, *SCHEDULES):
            raise ConfigError(
                f"trainer.lr_schedule must be one of {', '.join(SCHEDULES)}, got "
                f"{self.lr_schedule!r}"
            )
        if self.lr_schedule == "step" and self.lr_decay_every is None:
            raise ConfigError("trainer.lr_schedule=step needs trainer.lr_decay_every")
        if not 0 <= self.min_lr < math.inf:
            raise ConfigError(f"trainer.min_lr must be finite and >= 0, got {self.min_lr}")
        if self.nonfinite not in NONFINITE:
            raise ConfigError(
                f"trainer.nonfinite must be one of {', '.join(NONFINITE)}, got {self.nonfinite!r}"
            )
        if self.max_skipped < 0:
            raise ConfigError(f"trainer.max_skipped must be >= 0, got {self.max_skipped}")
        if self.clip_grad_norm is not None and not 0 < self.clip_grad_norm < math.inf:
            raise ConfigError(
                f"trainer.clip_grad_norm must be positive and finite (null: no clipping), got "
                f"{self.clip_grad_norm}"
            )


@dataclass
class Progress:
    """What the loop must remember across a restart (saved in every checkpoint)."""

    iteration: int = 0
    seconds: float = 0.0  # training wall time so far, summed over restarts
    best_value: float | None = None  # best validation score so far
    best_iteration: int | None = None
    best_val: dict | None = None  # the best validation's summary for results.json
    validated_at: int = -1  # iteration of the latest validation
    stopped_by: str = "iterations"  # or "max_minutes"
    skipped: int = 0  # meta-batches dropped for a non-finite loss or gradient (nonfinite=skip)


def train(run: Run, run_dir: Path, group: Group = SINGLE) -> dict:
    """Meta-train, validate, keep the best checkpoint, test it; return results.json's dict.

    Under torchrun (`group.world` > 1) every rank trains on its share of each meta-batch and
    rank 0 alone validates, writes and tests; every rank returns rank 0's results."""
    trainer = run.config.trainer
    pretrains = getattr(run.algo, "pretrains", False)
    if pretrains:
        group.check_divides(run.config.algo.batch_size, "algo.batch_size")
    else:
        group.check_divides(trainer.meta_batch_size, "trainer.meta_batch_size")
    optimizer = outer_optimizer(run.config.algo, run.algo)
    generator = torch.Generator(run.device).manual_seed(run.config.seed)
    progress = Progress()
    last_path = run_dir / "checkpoints" / "last.pt"
    resumed = trainer.resume and checkpoint.exists(last_path)  # or the previous one, see load
    if resumed:
        progress = _restore(run, optimizer, generator, last_path)
    group.broadcast_parameters(list(run.algo.parameters()))
    if group.main:
        logger = Logger(
            run.config.logger,
            run_dir,
            run_name=run.name,
            config=run.config_dict,
            resume_step=progress.iteration if resumed else None,
        )
    else:
        logger = NullLogger()
    try:
        with _stop_on_signals() as stop:
            _loop(run, optimizer, generator, progress, logger, run_dir, group, stop)
        if stop.signum is not None:  # last.pt is saved: now the signal's usual course
            logger.close(exit_code=1)
            signal.raise_signal(stop.signum)
            raise SystemExit(128 + stop.signum)  # a handler that returned: stop all the same
        results = finish_run(run, progress, run_dir, logger) if group.main else None
    except BaseException:
        logger.close(exit_code=1)
        raise
    logger.close()
    return group.share(results)


def _loop(
    run: Run,
    optimizer,
    generator,
    progress: Progress,
    logger: Logger,
    run_dir: Path,
    group: Group = SINGLE,
    stop: _StopRequest | None = None,
) -> None:
    trainer, shape = run.config.trainer, run.train_shape
    budget = math.inf if trainer.max_minutes is None else 60.0 * trainer.max_minutes
    bar = tqdm(
        total=trainer.iterations,
        initial=progress.iteration,
        disable=not (trainer.progress and group.main),
        desc=run.name,
        dynamic_ncols=True,
        # redirected to a file (nohup, SLURM): one line every 30 s instead of every refresh
        mininterval=0.1 if sys.stderr.isatty() else 30.0,
    )
    params = [p for p in run.algo.parameters() if p.requires_grad]
    pretrains = getattr(run.algo, "pretrains", False)  # Baseline, RFS: plain labelled batches
    window_start, window_tasks = time.perf_counter(), 0
    while progress.iteration < trainer.iterations:
        started = time.perf_counter()
        _set_lr(optimizer, run, progress.iteration)
        # every rank draws the same full batch and keeps its share (see distributed.py)
        if pretrains:
            size = run.config.algo.batch_size
            batch = run.tasks.sample_labelled("train", generator, size)
        else:
            size = trainer.meta_batch_size
            batch = run.tasks.sample("train", generator, size, *shape)
        # one outer step per meta-batch, or several (PPO's epochs over its trials: meta_losses)
        updates = _updates(run.algo, group.shard(batch, size), progress.iteration)
        while True:
            try:
                with run.autocast():
                    update = next(updates, None)
                if update is None:
                    break
                loss, metrics = update
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
                if not _out_of_memory(error):
                    raise
                raise TrainingError(_memory_advice(run, progress.iteration + 1, error)) from error
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
            finite = torch.stack([torch.isfinite(scalars[0]), *_grads_finite(params)]).all()
            skipped = not finite.item()  # the update's one host sync; the same on every rank
            if skipped:
                fault = _nonfinite_fault(run, batch, scalars[0], progress.iteration + 1)
                if trainer.nonfinite == "stop":
                    raise TrainingError(f"{fault}; {_kept(run_dir, 'fix that')}")
                if progress.skipped >= trainer.max_skipped:
                    raise TrainingError(
                        f"{fault}; that is more than trainer.max_skipped={trainer.max_skipped} "
                        f"skipped meta-batches, so training stops; {_kept(run_dir, 'fix that')}"
                    )
                progress.skipped += 1
                if progress.skipped == 1:
                    warnings.warn(
                        f"{fault}; trainer.nonfinite=skip: that meta-batch is dropped and "
                        f"training goes on (skipped batches are counted in train/skipped and "
                        f"results.json)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                break  # the rest of a dropped batch's updates too
            if trainer.clip_grad_norm is not None:  # the same clipped gradient on every rank
                norm = torch.nn.utils.clip_grad_norm_(params, trainer.clip_grad_norm)
                metrics = metrics | {"grad_norm": norm}
            optimizer.step()  # (a skipped batch's gradients are cleared before the next backward)
            metrics = metrics | {"loss": scalars[1], "score": scalars[2]}
        progress.iteration += 1
        window_tasks += batch.tasks
        progress.seconds += time.perf_counter() - started
        bar.update(1)
        if progress.iteration % trainer.log_every == 0:
            rate = window_tasks / (time.perf_counter() - window_start)
            if skipped:  # a dropped batch's loss is not a training metric
                logger.log({"train/skipped": progress.skipped}, step=progress.iteration)
            else:
                extra = {"skipped": progress.skipped} if progress.skipped else {}
                metrics = metrics | extra
                _log_train(
                    run, logger, bar, metrics, optimizer, rate, batch.unit, progress.iteration
                )
            window_start, window_tasks = time.perf_counter(), 0
        over_budget = budget < math.inf and group.agree(progress.seconds >= budget)
        if progress.iteration % trainer.eval_every == 0 or over_budget:
            started = time.perf_counter()
            if group.main:  # the others wait for it at the next all-reduce
                validate(run, progress, logger, run_dir, optimizer, generator)
            progress.seconds += time.perf_counter() - started
            window_start, window_tasks = time.perf_counter(), 0  # tasks/s counts training only
        if over_budget:
            progress.stopped_by = "max_minutes"
            break
        if scalars[3] > 0:  # a stop signal reached some rank
            if group.main:  # nothing done since the last iteration is lost
                _save_last(run, progress, run_dir, optimizer, generator)
                name = signal.Signals(stop.signum).name if stop.signum else "a stop signal"
                print(
                    f"\n{name}: saved {run_dir / 'checkpoints' / 'last.pt'} at iteration "
                    f"{progress.iteration}; continue with trainer.resume=true "
                    f"hydra.run.dir={run_dir}",
                    file=sys.stderr,
                    flush=True,
                )
            group.barrier()
            bar.close()
            stop.signum = stop.signum or signal.SIGTERM  # a rank told by another stops too
            return
    bar.close()
    if group.main and progress.validated_at != progress.iteration:
        validate(run, progress, logger, run_dir, optimizer, generator)  # best must see the last
    group.barrier()  # last.pt and best.pt are written before any rank goes on


# What SLURM pre-emption (SIGTERM, or submitit's SIGUSR2 before the time limit) and Ctrl-C
# (SIGINT) send: the loop saves last.pt at the next iteration boundary, then the signal takes
# its usual course (exit, KeyboardInterrupt, or the launcher's own handler, which may requeue).
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR2") if hasattr(signal, name)
)


class _StopRequest:
    """The stop signal received while training, if any (set by the handler, read by the loop)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def handler(self, signum: int, frame) -> None:
        self.signum = signum


@contextlib.contextmanager
def _stop_on_signals():
    """Catch STOP_SIGNALS while the loop runs (the loop checks the request at each iteration
    boundary); restore the previous handlers afterwards."""
    request = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # signal handlers can only be set in the main thread
        return
    previous = {signum: signal.signal(signum, request.handler) for signum in STOP_SIGNALS}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _save_last(run: Run, progress: Progress, run_dir: Path, optimizer, generator) -> None:
    checkpoint.save(
        run_dir / "checkpoints" / "last.pt",
        _state(run, progress)
        | {"optimizer": optimizer.state_dict(), "generator": generator.get_state()},
    )


def _updates(algo, batch, iteration: int) -> Iterator[tuple[torch.Tensor, dict]]:
    """The (loss, metrics) of each outer step on one meta-batch: one `meta_loss` for most
    algorithms; an algorithm with `meta_losses` yields several (PPO: epochs of mini-batches over
    the same trials), each differentiated and stepped in turn, with the algorithm's own code
    running between steps."""
    several = getattr(algo, "meta_losses", None)
    if several is None:
        yield algo.meta_loss(batch, iteration)
    else:
        yield from several(batch, iteration)


def _grads_finite(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """One 0-d bool per parameter with a gradient: whether all of it is finite (no host sync)."""
    return [torch.isfinite(p.grad).all() for p in params if p.grad is not None]


def _tensors(tree: Any) -> list[torch.Tensor]:
    """The tensors of a meta-batch (dataclasses, dicts, tuples, tensors)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in _tensors(value)]
    if isinstance(tree, list | tuple):
        return [t for value in tree for t in _tensors(value)]
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):  # TaskBatch, Split, ...
        return _tensors(vars(tree))
    return []


def _nonfinite_fault(run: Run, batch: Any, loss: torch.Tensor, iteration: int) -> str:
    """Where a NaN or Inf first appeared at this iteration (the data, the forward pass or the
    backward pass) and what most likely caused it."""
    algo = run.config.algo
    data_bad = any(t.is_floating_point() and not torch.isfinite(t).all() for t in _tensors(batch))
    if data_bad:
        return (
            f"the meta-batch of iteration {iteration} itself holds NaN or Inf values: the data "
            f"set (data={run.config.data.name}) or its preprocessing is broken, not the training"
        )
    inner = hasattr(algo, "inner_lr") and hasattr(algo, "inner_steps")
    forward = not torch.isfinite(loss)
    causes = []
    if inner:
        fixes = ["lower algo.inner_lr", "take fewer steps"]
        if not forward and not getattr(algo, "first_order", True):
            fixes.append("set algo.first_order=true")  # second-order terms overflow first
        causes.append(
            f"the inner loop diverging (algo.inner_lr={algo.inner_lr} over "
            f"algo.inner_steps={algo.inner_steps}: {', '.join(fixes[:-1])} or {fixes[-1]})"
        )
    if iteration > 1 or not forward:  # a first forward pass has had no outer step before it
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


def _out_of_memory(error: BaseException) -> bool:
    """Whether an exception is the allocator running out (CUDA, or the CPU's DefaultAllocator)."""
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(error)
    return "out of memory" in text or "can't allocate memory" in text


def peak_memory(device: torch.device) -> str:
    """The most memory this run has held: the CUDA allocator's peak, or the process's peak RSS."""
    where = f"on {device}" if device.type == "cuda" else "of host memory (peak resident set)"
    return f"{peak_memory_mib(device) / 1024:.2f} GiB {where}"


def _memory_advice(run: Run, iteration: int, error: BaseException) -> str:
    """What ran out, the peak memory seen and the settings that need less of it."""
    algo, trainer = run.config.algo, run.config.trainer
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    tasks = f"trainer.meta_batch_size={trainer.meta_batch_size}"
    tips = [
        f"a smaller meta-batch (trainer.meta_batch_size={max(1, trainer.meta_batch_size // 2)})"
    ]
    what = f"algo={algo.name}"
    if hasattr(algo, "first_order"):
        if not algo.first_order:
            what = (
                f"second-order {algo.name} (it keeps the graph of all algo.inner_steps="
                f"{algo.inner_steps} inner steps of each task)"
            )
            tips.insert(0, "algo.first_order=true (no second-order graph)")
        if hasattr(algo, "checkpoint") and not algo.checkpoint:
            tips.append(
                "gradient checkpointing (algo.checkpoint=true hardware.task_batching=loop: "
                "each task's inner loop is recomputed in backward)"
            )
    return (
        f"out of memory at iteration {iteration} in {what}, {tasks}; peak memory "
        f"{peak_memory(run.device)}; try {', or '.join(tips)} ({first})"
    )


def _kept(run_dir: Path, advice: str | None = None) -> str:
    """What the user still has after a divergence, and what to do next."""
    last = run_dir / "checkpoints" / "last.pt"
    advice = advice or (
        "lower algo.outer_lr or the inner learning rates (algo.inner_lr, algo.test_inner_lr)"
    )
    if last.is_file():
        return f"the last good checkpoint is kept at {last}; {advice}, then trainer.resume=true"
    return f"no checkpoint was saved yet; {advice} and start again"


def outer_optimizer(algo_cfg: Any, algo: Any) -> torch.optim.Optimizer:
    """Adam (the default), or SGD where the algorithm asks for it (Reptile's epsilon step; RFS's
    and MetaOptNet's momentum SGD); `weight_decay`, `momentum` and `adam_eps` where the config
    has them."""
    kind = getattr(algo_cfg, "outer_optimizer", "adam")
    decay = getattr(algo_cfg, "weight_decay", 0.0)
    if kind == "sgd":
        momentum = getattr(algo_cfg, "momentum", 0.0)
        return torch.optim.SGD(
            algo.parameters(), lr=algo_cfg.outer_lr, momentum=momentum, weight_decay=decay
        )
    eps = getattr(algo_cfg, "adam_eps", 1e-8)  # iMAML's reference code uses 1e-3
    return torch.optim.Adam(algo.parameters(), lr=algo_cfg.outer_lr, eps=eps, weight_decay=decay)


def schedule(run: Run) -> str:
    """The outer learning-rate schedule in force (see TrainerConfig.lr_schedule)."""
    trainer = run.config.trainer
    if trainer.lr_schedule is not None:
        return trainer.lr_schedule
    return "step" if trainer.lr_decay_every else run.algo.outer_schedule


def outer_lr_at(run: Run, iteration: int) -> float:
    """The outer learning rate at an iteration: a function of the iteration alone, so that a
    resumed run follows the same schedule."""
    trainer, base = run.config.trainer, run.config.algo.outer_lr
    kind, fraction = schedule(run), min(iteration / trainer.iterations, 1.0)
    if kind == "step":
        return base * trainer.lr_decay ** (iteration // trainer.lr_decay_every)
    if kind == "cosine":
        return trainer.min_lr + 0.5 * (base - trainer.min_lr) * (1 + math.cos(math.pi * fraction))
    if kind == "linear":
        return base + (trainer.min_lr - base) * fraction
    return base


def _set_lr(optimizer, run: Run, iteration: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = outer_lr_at(run, iteration)


def _log_train(
    run: Run, logger, bar, metrics, optimizer, rate: float, unit: str, iteration: int
) -> None:
    loss, score = metrics["loss"].item(), metrics["score"].item()
    name = {"accuracy": "query_acc", "mse": "query_mse", "reward": "trial_reward"}[run.metric]
    logger.log(
        {
            "train/loss": loss,
            f"train/{name}": score,
            f"perf/{unit}_per_s": rate,  # tasks, or examples in pre-training
            "train/outer_lr": optimizer.param_groups[0]["lr"],
            # what else the algorithm reports (iMAML: the fraction of tasks skipped)
            **{f"train/{k}": float(v) for k, v in metrics.items() if k not in ("loss", "score")},
        },
        step=iteration,
    )
    diverged = float(metrics.get("diverged", 0.0))
    if diverged > 0:  # some tasks' inner loops blew up and were left out of the meta-gradient
        advice = getattr(run.algo, "divergence_advice", lambda: "lower algo.inner_lr")()
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


def validate(run: Run, progress: Progress, logger, run_dir: Path, optimizer, generator) -> None:
    """Score the fixed validation episodes; save last.pt always and best.pt when it improves."""
    ways, shots, query = run.test_shape
    # with an inner loop, also score the unadapted model: it tells a broken model (stop) from
    # test-time adaptation that blows up on some episodes (warn, go on)
    steps = [0, run.test_steps] if run.test_steps else [0]
    out = run_episodes(
        run,
        "val",
        episodes=run.config.eval.val_episodes,
        ways=ways,
        shots=shots,
        query=query,
        steps=steps,
    )
    if not torch.isfinite(out["loss"][:, 0]).all():
        raise TrainingError(
            f"validation at iteration {progress.iteration}: the model's own predictions are "
            f"no longer finite; {_kept(run_dir)}"
        )
    score, loss = mean_ci95(out["score"][:, -1]), mean_ci95(out["loss"][:, -1])
    short = {"accuracy": "acc", "mse": "mse", "reward": "reward"}[run.metric]
    sign = -1.0 if run.metric == "mse" else 1.0  # higher accuracy and reward, lower MSE: better
    value = score["mean"]
    if math.isfinite(score["mean"]) and math.isfinite(loss["mean"]):
        logger.log(
            {
                f"val/{short}": score["mean"],
                f"val/{short}_ci95": score["ci95"],
                "val/loss": loss["mean"],
            },
            step=progress.iteration,
        )
    else:
        # Some episodes' test-time adaptation blew up (more test steps than training steps
        # can do that): not a reason to stop training, but never a best checkpoint either.
        diverged = (~torch.isfinite(out["loss"][:, -1])).float().mean().item()
        logger.log({"val/diverged": diverged}, step=progress.iteration)
        best = progress.best_iteration
        warnings.warn(
            f"validation at iteration {progress.iteration}: {diverged:.1%} of the episodes "
            f"diverged in test-time adaptation (non-finite {run.metric}); "
            + ("no best checkpoint yet" if best is None else f"the best stays at iteration {best}")
            + "; consider a smaller algo.test_inner_lr or fewer algo.test_inner_steps",
            stacklevel=2,
        )
        value = -sign * math.inf
    if progress.best_value is None or sign * value > sign * progress.best_value:
        progress.best_value, progress.best_iteration = value, progress.iteration
        progress.best_val = {
            run.metric: score,
            "loss": loss,
            "episodes": run.config.eval.val_episodes,
            "best_iteration": progress.iteration,
        }
    progress.validated_at = progress.iteration
    if progress.best_iteration == progress.iteration:
        checkpoint.save(run_dir / "checkpoints" / "best.pt", _state(run, progress))
    _save_last(run, progress, run_dir, optimizer, generator)


def _state(run: Run, progress: Progress) -> dict:
    return {
        "config": run.config_dict,
        "algo_state": run.algo.state_dict(),
        "progress": as_dict(progress),
        "preprocess": run.preprocess,
        "torch_rng": torch.get_rng_state(),
    }


def _restore(run: Run, optimizer, generator, path: Path) -> Progress:
    """Load last.pt: weights, optimiser, sampler RNG and progress, after checking compatibility."""
    state = checkpoint.load(path)
    checkpoint.check_compatible(state, run.config.algo.name, run.config.model.name, path)
    run.load_algo_state(state, path)
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return Progress(**state["progress"])
