"""Task batches and the episodic sampler: N-way K-shot Q-query tasks by indexing device tensors.

Shape letters: T tasks, N ways, K shots, Q queries per class, E examples per class, C classes.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from metalearn.errors import ConfigError, DataError


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

    def __getitem__(self, part: slice) -> "LabelledBatch":
        return LabelledBatch(self.x[part], self.y[part])


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

    def __getitem__(self, part: slice) -> "TaskBatch":
        """Tasks `part` of the batch (a rank's share of the meta-batch, say)."""
        return TaskBatch(
            Split(self.support.x[part], self.support.y[part]),
            Split(self.query.x[part], self.query.y[part]),
            self.ways,
            {key: value[part] for key, value in self.info.items()},
        )


class EpisodeSampler:
    """Draws classification tasks from a class-indexed uint8 tensor held on the device.

    No per-episode file I/O and no worker processes: a task is two index tensors (classes and
    examples) and one gather. Labels are the positions of the drawn classes, which are in random
    order, so labels are shuffled per task.

    Classes of equal size come as one (C, E, channels, H, W) tensor; classes of different sizes
    (tieredImageNet, CUB) as the examples of every class one after another, (sum E_c, channels,
    H, W), with `counts` (C,). Images larger than DEVICE_BYTES stay in host memory (a memory-
    mapped cache is paged in as episodes touch it) and only each batch moves to the device.

    With `groups` (C,) (Omniglot's alphabets) a task draws one group of at least N classes, then
    its N classes within it, both uniformly (Lake et al. 2015's within-alphabet episodes).
    """

    DEVICE_BYTES = 4 * 2**30

    def __init__(
        self,
        images: Tensor,
        device: torch.device,
        counts: Tensor | None = None,
        groups: Tensor | None = None,
    ) -> None:
        resident = device.type == "cpu" or images.nbytes <= self.DEVICE_BYTES
        self.images = images.to(device) if resident else images
        self.device = device
        self.counts = None if counts is None else counts.long().to(self.images.device)
        if self.counts is not None:
            if len(images) != int(self.counts.sum()):
                raise DataError(f"{len(images)} images but the class counts sum to {counts.sum()}")
            self.offsets = torch.cumsum(self.counts, 0) - self.counts  # first example of each
        self.groups = None if groups is None else groups.long().cpu()  # (C,) group of each class

    @property
    def classes(self) -> int:
        return self.images.shape[0] if self.counts is None else len(self.counts)

    @property
    def examples_per_class(self) -> int:
        """The most examples any class has (all of them when classes are of equal size)."""
        return self.images.shape[1] if self.counts is None else int(self.counts.max())

    @property
    def fewest_examples(self) -> int:
        return self.images.shape[1] if self.counts is None else int(self.counts.min())

    def check(self, split: str, ways: int, shots: int, query: int) -> None:
        """Raise a DataError if this split cannot hold N-way K-shot Q-query tasks."""
        if ways > self.classes:
            raise DataError(
                f"{ways}-way tasks need {ways} classes but the {split} split has {self.classes}; "
                f"lower data.ways (or algo.train_ways) to at most {self.classes}"
            )
        self._eligible_groups(ways, split)
        fewest = self.fewest_examples
        if shots + query > fewest:
            where = "per class" if self.counts is None else "in its smallest class"
            if split == "train":  # the keys that set each split's task shape
                keys = "data.shots or data.query (algo.train_shots, algo.train_query where set)"
            else:
                keys = "data.shots or eval.shots, or data.query (eval.query where set)"
            raise DataError(
                f"shots + query = {shots} + {query} = {shots + query} examples per class, but the "
                f"{split} split has {fewest} {where}; lower {keys} so that they sum to at most "
                f"{fewest}"
            )

    def sample(
        self, generator: torch.Generator, tasks: int, ways: int, shots: int, query: int
    ) -> TaskBatch:
        """Draw T fresh tasks with `generator` (which lives on the sampler's device)."""
        classes = self._draw_classes(generator, tasks, ways)  # (T, N)
        examples = self._draw_examples(generator, classes, shots + query)  # (T, N, K+Q)
        return self.gather(classes, examples, shots)

    def sample_labelled(self, generator: torch.Generator, size: int) -> LabelledBatch:
        """`size` examples drawn uniformly from the split, each labelled with its class index
        (standard supervised pre-training batches)."""
        options = {"generator": generator, "device": generator.device}
        if self.counts is None:
            classes = torch.randint(self.classes, (size,), **options).to(self.images.device)
            examples = torch.randint(self.examples_per_class, (size,), **options)
            x = self.images[classes, examples.to(self.images.device)]
        else:
            index = torch.randint(len(self.images), (size,), **options).to(self.images.device)
            classes = torch.searchsorted(self.offsets, index, right=True) - 1
            x = self.images[index]
        x = x.to(self.device, non_blocking=True).float().div_(255.0)
        return LabelledBatch(x, classes.to(self.device))

    def _draw(self, generator: torch.Generator, shape: tuple[int, ...], k: int) -> Tensor:
        """k distinct indices along the last axis: the first k of a random permutation."""
        keys = torch.rand(shape, generator=generator, device=generator.device)
        return keys.argsort(dim=-1)[..., :k].to(self.images.device)

    def _eligible_groups(self, ways: int, split: str = "sampled") -> Tensor | None:
        """The groups with at least `ways` classes (None: classes are not grouped)."""
        if self.groups is None:
            return None
        sizes = torch.bincount(self.groups)
        eligible = (sizes >= ways).nonzero().squeeze(1)
        if len(eligible) == 0:
            raise ConfigError(
                f"data.episode_scope=alphabet draws each {ways}-way episode from one alphabet, but "
                f"no alphabet of the {split} split has {ways} classes (the largest has "
                f"{int(sizes.max())}); lower data.ways to at most {int(sizes.max())} or set "
                f"data.episode_scope=all"
            )
        return eligible

    def _draw_classes(self, generator: torch.Generator, tasks: int, ways: int) -> Tensor:
        """N distinct classes per task (T, N): from the whole split, or from one group."""
        eligible = self._eligible_groups(ways)
        if eligible is None:  # the same draws as before groups existed: episodes are unchanged
            return self._draw(generator, (tasks, self.classes), ways)
        options = {"generator": generator, "device": generator.device}
        group = eligible.to(generator.device)[torch.randint(len(eligible), (tasks,), **options)]
        keys = torch.rand((tasks, self.classes), **options)  # group: (T,), uniform over groups
        # classes of other groups sort last, never drawn: the group has at least N classes
        keys = keys.masked_fill(self.groups.to(generator.device)[None] != group[:, None], 2.0)
        return keys.argsort(dim=-1)[..., :ways].to(self.images.device)

    def _draw_examples(self, generator: torch.Generator, classes: Tensor, k: int) -> Tensor:
        """k distinct examples of each drawn class: classes (T, N) -> (T, N, k)."""
        shape = (*classes.shape, self.examples_per_class)
        keys = torch.rand(shape, generator=generator, device=generator.device)
        if self.counts is not None:  # positions past a class's size sort last, never drawn
            counts = self.counts[classes.to(self.counts.device)].to(keys.device)
            keys = keys.masked_fill(
                torch.arange(shape[-1], device=keys.device) >= counts[..., None], 2.0
            )
        return keys.argsort(dim=-1)[..., :k].to(self.images.device)

    def gather(self, classes: Tensor, examples: Tensor, shots: int) -> TaskBatch:
        """Index the images: classes (T, N), examples (T, N, K+Q) -> a TaskBatch."""
        tasks, ways, per_class = examples.shape
        if self.counts is None:
            x = self.images[classes[..., None], examples]  # (T, N, K+Q, channels, H, W)
        else:
            x = self.images[self.offsets[classes][..., None] + examples]
        x = x.to(self.device, non_blocking=True).float().div_(255.0)
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
        classes = self._draw_classes(generator, n, ways)  # (n, N)
        examples = self._draw_examples(generator, classes, shots + query)  # (n, N, K+Q)
        for start in range(0, n, batch_size):
            part = slice(start, start + batch_size)
            yield self.gather(classes[part], examples[part], shots)


class ClassTasks:
    """Few-shot classification over a data set's train/val/test class sets."""

    kind = "classification"

    def __init__(
        self,
        images: dict[str, Tensor],
        device: torch.device,
        counts: dict[str, Tensor] | None = None,
        groups: dict[str, Tensor] | None = None,
    ) -> None:
        """images[split]: (C, E, channels, H, W), or (sum E_c, channels, H, W) with counts[split]
        (C,); groups[split] (C,): that split's episodes within one group (see EpisodeSampler)."""
        counts, groups = counts or {}, groups or {}
        self.samplers = {
            split: EpisodeSampler(x, device, counts.get(split), groups.get(split))
            for split, x in images.items()
        }
        train = images["train"]
        self.in_shape = tuple(train.shape[1:] if "train" in counts else train.shape[2:])

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


class StoredTasks:
    """A classification task family as a checkpoint remembers it: its input shape and number of
    training classes, and no data. `metalearn eval` of the user's own episode builds the model
    from it on a machine that has only the checkpoint; it draws no tasks."""

    kind = "classification"

    def __init__(self, in_shape: list[int], train_classes: int) -> None:
        self.in_shape, self.train_classes = tuple(in_shape), train_classes

    @staticmethod
    def describe(tasks: Any) -> dict[str, Any] | None:
        """What a checkpoint keeps of `tasks` (None: not a classification family)."""
        if tasks.kind != "classification":
            return None
        return {"in_shape": list(tasks.in_shape), "train_classes": tasks.classes("train")}

    def check(self, split: str, ways: int, shots: int, query: int) -> None:
        """Nothing to check: the user's episode brings its own images."""

    def classes(self, split: str) -> int:
        if split != "train":
            raise DataError(f"a checkpoint keeps the count of training classes only, not {split}")
        return self.train_classes
