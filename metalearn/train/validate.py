"""Validation on the fixed episodes: log, keep the best checkpoint, save the last."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from metalearn.algos.objectives import METRICS
from metalearn.errors import TrainingError
from metalearn.evaluate import mean_ci95, run_episodes
from metalearn.records import checkpoint
from metalearn.run import Run
from metalearn.train.faults import kept
from metalearn.train.state import Progress, save_last, state


def validate(
    run: Run, progress: Progress, logger, run_dir: Path, optimizer, generator, bar=None
) -> None:
    """Score the fixed validation episodes (a phase of the progress bar, where there is one);
    save last.pt always and best.pt when it improves."""
    ways, shots, query = run.test_shape
    # with an inner loop, also score the unadapted model: it tells a broken model (stop) from
    # test-time adaptation that blows up on some episodes (warn, go on); a metric logged by step
    # is scored after every number of steps
    metric = METRICS[run.metric]
    steps = list(range(run.test_steps + 1)) if metric.by_step else [0, run.test_steps]
    steps = steps if run.test_steps else [0]
    episodes = run.config.eval.val_episodes
    shape = {"ways": ways, "shots": shots, "query": query, "steps": steps}
    if bar is None:
        out = run_episodes(run, "val", episodes=episodes, **shape)
    else:
        with bar.phase(f"validate at {progress.iteration}", episodes) as done:
            out = run_episodes(run, "val", episodes=episodes, on_batch=done, **shape)
    if not torch.isfinite(out["loss"][:, 0]).all():
        raise TrainingError(
            f"validation at iteration {progress.iteration}: the model's own predictions are "
            f"no longer finite; {kept(run_dir)}"
        )
    score, loss = mean_ci95(out["score"][:, -1]), mean_ci95(out["loss"][:, -1])
    short = metric.short
    sign = 1.0 if metric.higher_is_better else -1.0
    value = score["mean"]
    if math.isfinite(score["mean"]) and math.isfinite(loss["mean"]):
        by_step = zip(steps, out["score"].double().mean(0).tolist(), strict=True)
        logger.log(
            {
                f"val/{short}": score["mean"],
                f"val/{short}_ci95": score["ci95"],
                "val/loss": loss["mean"],
                **({f"val/{short}_step{k}": v for k, v in by_step} if metric.by_step else {}),
            },
            step=progress.iteration,
        )
    else:
        value = _diverged(run, progress, logger, out["loss"][:, -1], sign)
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
        checkpoint.save(run_dir / "checkpoints" / "best.pt", state(run, progress))
    save_last(run, progress, run_dir, optimizer, generator)


def _diverged(run: Run, progress: Progress, logger, last_loss: torch.Tensor, sign: float) -> float:
    """Some episodes' test-time adaptation blew up (more test steps than training steps can do
    that): not a reason to stop training, but never a best checkpoint either."""
    diverged = (~torch.isfinite(last_loss)).float().mean().item()
    logger.log({"val/diverged": diverged}, step=progress.iteration)
    best = progress.best_iteration
    warnings.warn(
        f"validation at iteration {progress.iteration}: {diverged:.1%} of the episodes "
        f"diverged in test-time adaptation (non-finite {run.metric}); "
        + ("no best checkpoint yet" if best is None else f"the best stays at iteration {best}")
        + "; consider a smaller algo.test_inner_lr or fewer algo.test_inner_steps",
        stacklevel=3,
    )
    return -sign * math.inf
