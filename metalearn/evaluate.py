"""Fixed, seeded validation and test episodes -> mean and 95% confidence interval."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from metalearn.config import check_seed
from metalearn.errors import ConfigError

SPLIT_SEED_OFFSET = {"test": 0, "val": 1}  # val and test episodes differ even on one task family


@dataclass
class EvalConfig:
    """How validation and test episodes are drawn and what the test reports."""

    episodes: int = 1000  # fixed test episodes (tasks) behind the headline number
    val_episodes: int = 600  # fixed validation episodes, run every trainer.eval_every iterations
    seed: int = 1234  # seed of the fixed episodes: every run and algorithm sees the same tasks
    batch_size: int = 32  # tasks evaluated at once
    query: int | None = None  # query examples per class at test (None: data.query)
    shots: list[int] = field(default_factory=list)  # extra shots for test.breakdown
    steps: list[int] = field(default_factory=list)  # extra test inner-step counts for the breakdown
    calibration: bool = True  # classifiers: test.calibration and plots/reliability.png
    temperature: bool = False  # with calibration: temperature scaling fitted on val episodes

    def __post_init__(self) -> None:
        for key in ("episodes", "val_episodes", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"eval.{key} must be positive, got {getattr(self, key)}")
        if self.query is not None and self.query < 1:
            raise ConfigError(f"eval.query must be positive, got {self.query}")
        check_seed(self.seed, "eval.seed")
        if self.temperature and not self.calibration:
            raise ConfigError(
                "eval.temperature=true fits a temperature for the calibration report; set "
                "eval.calibration=true as well (or drop eval.temperature)"
            )
        if any(s < 1 for s in self.shots) or any(s < 0 for s in self.steps):
            raise ConfigError(
                f"eval.shots must be >= 1 and eval.steps >= 0: {self.shots}, {self.steps}"
            )


def mean_ci95(values: torch.Tensor) -> dict[str, float]:
    """Mean and half-width of the normal 95% interval, 1.96 * std / sqrt(n), over episodes."""
    values = values.double()
    std = values.std(unbiased=True).item() if values.numel() > 1 else 0.0
    return {"mean": values.mean().item(), "ci95": 1.96 * std / math.sqrt(values.numel())}


def run_episodes(
    run,
    split: str,
    *,
    episodes: int,
    ways: int,
    shots: int,
    query: int,
    steps: list[int],
    on_batch: Callable[[int], object] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-episode query loss and score after each number of inner steps: (episodes, len(steps)),
    and whatever else the algorithm reports per episode (meta-RL: the regret curve). A
    classifier whose `evaluate` returns its query `logits` (episodes, len(steps), Q, C) gets
    the query `labels` (episodes, Q) beside them, so the calibration report needs no second pass.
    `on_batch(n)` hears of each batch of n episodes done (a progress bar)."""
    cfg: EvalConfig = run.config.eval
    parts: dict[str, list[torch.Tensor]] = {"loss": [], "score": []}
    seed = cfg.seed + SPLIT_SEED_OFFSET[split]
    run.model.train(False)  # DropBlock and dropout are for meta-training only
    try:
        for batch in run.tasks.episodes(
            split, episodes, ways, shots, query, seed=seed, batch_size=cfg.batch_size
        ):
            with run.autocast():
                out = run.algo.evaluate(batch, steps)
            for key, value in out.items():
                value = value.float() if key == "logits" else value  # bf16 under autocast
                parts.setdefault(key, []).append(value.detach().cpu())
            if "logits" in out:
                parts.setdefault("labels", []).append(batch.query.y.cpu())
            if on_batch is not None:
                on_batch(batch.tasks)
    finally:
        run.model.train(True)
    return {key: torch.cat(values) for key, values in parts.items()}
