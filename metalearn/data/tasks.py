"""Task batches and the episodic sampler: N-way K-shot Q-query tasks by indexing device tensors.

Shape letters: T tasks, N ways, K shots, Q queries per class, E examples per class, C classes.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from metalearn.errors import DataError


@dataclass
class Split:
    """One side of a task batch: inputs (T, B, ...) and targets (T, B) or (T, B, 1)."""

    x: Tensor
    y: Tensor


@dataclass
class LabelledBatch:
    """A plain supervised batch for pre-training (Baseline, RFS): x (B, ...), y (B,) holding
    indices into the split's classes."""

    x: Tensor
    y: Tensor
    unit = "examples"  # what the trainer's throughput counts

    @property
    def tasks(self) -> int:  # the trainer counts these per second
        return self.x.shape[0]


@dataclass
class TaskBatch:
    """T tasks, each with a support set (adapted on) and a query set (scored on)."""

    support: Split
    query: Split
    ways: int
    info: dict[str, Tensor] = field(default_factory=dict)  # e.g. sinusoid amplitude and phase

    unit = "tasks"

    @property
    def tasks(self) -> int:
        return self.support.x.shape[0]


class EpisodeSampler:
    """Draws classification tasks from a class-indexed uint8 tensor held on the device.

    No per-episode file I/O and no worker processes: a task is two index tensors (classes and
    examples) and one gather. Labels are the positions of the drawn classes, which are in random
    order, so labels are shuffled per task.
    """

    def __init__(self, images: Tensor, device: torch.device) -> None:
        self.images = images.to(device)  # (C, E, channels, H, W) uint8
        self.device = device

    @property
    def classes(self) -> int:
        return self.images.shape[0]

    @property
    def examples_per_class(self) -> int:
        return self.images.shape[1]

    def check(self, split: str, ways: int, shots: int, query: int) -> None:
        """Raise a DataError if this split cannot hold N-way K-shot Q-query tasks."""
        if ways > self.classes:
            raise DataError(
                f"{ways}-way tasks need {ways} classes but the {split} split has {self.classes}; "
                f"lower data.ways (or algo.train_ways) to at most {self.classes}"
            )
        if shots + query > self.examples_per_class:
            raise DataError(
                f"shots + query = {shots} + {query} = {shots + query} examples per class, but the "
                f"{split} split has {self.examples_per_class} per class; lower data.shots or "
                f"data.query so that they sum to at most {self.examples_per_class}"
            )

    def sample(
        self, generator: torch.Generator, tasks: int, ways: int, shots: int, query: int
    ) -> TaskBatch:
        """Draw T fresh tasks with `generator` (which lives on the sampler's device)."""
        classes = self._draw(generator, (tasks, self.classes), ways)  # (T, N)
        examples = self._draw(generator, (tasks, ways, self.examples_per_class), shots + query)
        return self.gather(classes, examples, shots)

    def sample_labelled(self, generator: torch.Generator, size: int) -> LabelledBatch:
        """`size` examples drawn uniformly over the split's classes and their examples, each
        labelled with its class index (standard supervised pre-training batches)."""
        shape = (size,)
        classes = torch.randint(self.classes, shape, generator=generator, device=generator.device)
        examples = torch.randint(
            self.examples_per_class, shape, generator=generator, device=generator.device
        )
        classes, examples = classes.to(self.device), examples.to(self.device)
        return LabelledBatch(self.images[classes, examples].float().div_(255.0), classes)

    def _draw(self, generator: torch.Generator, shape: tuple[int, ...], k: int) -> Tensor:
        """k distinct indices along the last axis: the first k of a random permutation."""
        keys = torch.rand(shape, generator=generator, device=generator.device)
        return keys.argsort(dim=-1)[..., :k].to(self.device)

    def gather(self, classes: Tensor, examples: Tensor, shots: int) -> TaskBatch:
        """Index the images: classes (T, N), examples (T, N, K+Q) -> a TaskBatch."""
        tasks, ways, per_class = examples.shape
        x = self.images[classes[..., None], examples]  # (T, N, K+Q, channels, H, W)
        x = x.float().div_(255.0)
        y = torch.arange(ways, device=self.device).view(1, ways, 1).expand(tasks, ways, per_class)
        image = x.shape[3:]
        return TaskBatch(
            support=Split(
                x[:, :, :shots].reshape(tasks, -1, *image), y[:, :, :shots].reshape(tasks, -1)
            ),
            query=Split(
                x[:, :, shots:].reshape(tasks, -1, *image), y[:, :, shots:].reshape(tasks, -1)
            ),
            ways=ways,
        )

    def episodes(
        self, n: int, ways: int, shots: int, query: int, *, seed: int, batch_size: int
    ) -> Iterator[TaskBatch]:
        """The same n episodes for a given seed, whatever the model or the batch size."""
        generator = torch.Generator().manual_seed(seed)  # CPU: identical episodes on any device
        classes = self._draw(generator, (n, self.classes), ways)  # (n, N)
        examples = self._draw(generator, (n, ways, self.examples_per_class), shots + query)
        for start in range(0, n, batch_size):
            part = slice(start, start + batch_size)
            yield self.gather(classes[part], examples[part], shots)


class ClassTasks:
    """Few-shot classification over a data set's train/val/test class sets."""

    kind = "classification"

    def __init__(self, images: dict[str, Tensor], device: torch.device) -> None:
        self.samplers = {split: EpisodeSampler(x, device) for split, x in images.items()}
        self.in_shape = tuple(images["train"].shape[2:])  # (channels, H, W)

    def check(self, split: str, ways: int, shots: int, query: int) -> None:
        self.samplers[split].check(split, ways, shots, query)

    def sample(
        self, split: str, generator: torch.Generator, tasks: int, ways: int, shots: int, query: int
    ) -> TaskBatch:
        return self.samplers[split].sample(generator, tasks, ways, shots, query)

    def classes(self, split: str) -> int:
        return self.samplers[split].classes

    def sample_labelled(self, split: str, generator: torch.Generator, size: int) -> LabelledBatch:
        return self.samplers[split].sample_labelled(generator, size)

    def episodes(
        self, split: str, n: int, ways: int, shots: int, query: int, *, seed: int, batch_size: int
    ) -> Iterator[TaskBatch]:
        return self.samplers[split].episodes(
            n, ways, shots, query, seed=seed, batch_size=batch_size
        )
