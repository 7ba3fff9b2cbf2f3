"""The progress bar of meta-training: iterations, with a total and an ETA that follow
trainer.max_minutes when the time budget will end the run first, and validation shown as its
own phase with its own progress."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

from metalearn.train.state import Progress


class TrainingBar:
    """tqdm over the iterations; `advance` after each one, `phase` around a validation."""

    def __init__(
        self, name: str, iterations: int, progress: Progress, budget: float, enabled: bool
    ) -> None:
        self.iterations, self.budget, self.enabled = iterations, budget, enabled
        # redirected to a file (nohup, SLURM): one line every 30 s instead of every refresh
        self.mininterval = 0.1 if sys.stderr.isatty() else 30.0
        self.bar = tqdm(
            total=self.projected_total(progress),
            initial=progress.iteration,
            disable=not enabled,
            desc=name,
            dynamic_ncols=True,
            mininterval=self.mininterval,
        )

    def projected_total(self, progress: Progress) -> int:
        """trainer.iterations, or fewer where the time budget at the run's pace so far (validation
        included) will stop it first: the iteration whose end passes the budget."""
        if math.isinf(self.budget) or progress.iteration == 0 or progress.seconds <= 0:
            return self.iterations
        per_iteration = progress.seconds / progress.iteration
        left = max(self.budget - progress.seconds, 0.0)
        return min(self.iterations, progress.iteration + math.ceil(left / per_iteration))

    def advance(self, progress: Progress) -> None:
        total = self.projected_total(progress)
        if total != self.bar.total:
            self.bar.total = total  # tqdm's ETA is (total - n) / rate: it follows the budget
        self.bar.update(1)

    def set_postfix(self, values: dict, refresh: bool = False) -> None:
        self.bar.set_postfix(values, refresh=refresh)

    @contextmanager
    def phase(self, name: str, total: int) -> Iterator[Callable[[int], None]]:
        """A second bar below the first while `name` runs; yields `done(n)` to count n of
        `total` (validation: episodes)."""
        with tqdm(
            total=total,
            desc=name,
            position=1,
            leave=False,
            disable=not self.enabled,
            dynamic_ncols=True,
            mininterval=self.mininterval,
        ) as inner:
            yield inner.update

    def close(self, progress: Progress) -> None:
        """The bar ends full when the time budget stopped the run (at its last iteration)."""
        if progress.stopped_by.startswith("max_") and self.bar.total != progress.iteration:
            self.bar.total = progress.iteration
            self.bar.refresh()
        self.bar.close()
