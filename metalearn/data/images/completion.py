"""Image completion (the neural-process benchmark, Garnelo et al. 2018; the NPF's image
experiments): each task is one image; its pixels are a function from 2-D coordinates in
[-1, 1]^2 to intensity in [0, 1]. The context is a random U{min_shots..shots} of the pixels
(shots: 30% of them by default, as the NPF's `GetRandomIndcs(a=0, b=0.3)`), the targets every
pixel. Images come from Omniglot's split (`data.split`, Vinyals by default) so that test
characters were never seen in training.

The context is padded to `data.shots` points and `info["context"]` holds each task's count, as
data=gp's; `info["pixels"]` holds each context point's pixel index (row * size + column), which
the on-grid ConvCNP reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from metalearn.config import check_seed
from metalearn.data.files.root import resolve_root
from metalearn.data.images.omniglot import OMNIGLOT_SPLITS, load_omniglot
from metalearn.data.tasks import Split, TaskBatch
from metalearn.errors import ConfigError, DataError


@dataclass
class CompletionConfig:
    """Which images, their size, and how many pixels a context has."""

    task_kind: ClassVar[str] = "regression"
    name: str = "omniglot_completion"
    root: str | None = None  # data root (None: $METALEARN_DATA, else ~/.cache/metalearn)
    split: str = "vinyals"  # Omniglot's character split
    image_size: int = 28
    ways: int = 1  # regression: one output (the intensity)
    shots: int = 235  # the most context pixels: 30% of 28 x 28
    min_shots: int = 0  # the fewest: contexts have U{min_shots..shots} pixels
    query: int = 784  # target pixels: every pixel of the image
    split_seed: int = 0
    download: bool = True
    x_range: ClassVar[list[float]] = [-1.0, 1.0]  # each coordinate's range

    def __post_init__(self) -> None:
        if self.split not in OMNIGLOT_SPLITS:
            raise ConfigError(
                f"data.split={self.split!r} is not an Omniglot split; valid: "
                f"{', '.join(OMNIGLOT_SPLITS)}"
            )
        pixels = self.image_size**2
        if self.query != pixels:
            raise ConfigError(
                f"the targets are every pixel: data.query must be image_size^2 = {pixels}, got "
                f"{self.query}"
            )
        if not 0 <= self.min_shots <= self.shots <= pixels:
            raise ConfigError(
                f"contexts have U{{data.min_shots..data.shots}} pixels: need 0 <= min_shots <= "
                f"shots <= {pixels}, got {self.min_shots} and {self.shots}"
            )
        if self.ways != 1:
            raise ConfigError(f"completion has one output: data.ways must be 1, got {self.ways}")
        check_seed(self.split_seed, "data.split_seed")

    @property
    def variable_context(self) -> bool:
        return self.min_shots != self.shots


class CompletionTasks:
    """Each split's images flattened to (images, pixels) intensities on the device."""

    kind = "regression"
    in_shape = (2,)

    def __init__(self, cfg: CompletionConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        sets = load_omniglot(
            resolve_root(cfg.root),
            cfg.split,
            image_size=cfg.image_size,
            seed=cfg.split_seed,
            download=cfg.download,
        )
        self.images = {
            split: s.images.flatten(0, 1).flatten(1).to(device) for split, s in sets.items()
        }  # uint8 (images, pixels), ink = 255
        size = cfg.image_size
        axis = torch.linspace(-1.0, 1.0, size)
        rows, columns = torch.meshgrid(axis, axis, indexing="ij")
        self.coordinates = torch.stack([rows, columns], -1).view(size * size, 2).to(device)

    def check(self, split: str, ways: int, shots: int, query: int) -> None:
        pixels = self.cfg.image_size**2
        if shots > pixels or query != pixels:
            raise DataError(
                f"an image has {pixels} pixels: {shots} context and {query} target pixels do not "
                f"fit; keep data.shots <= {pixels} and data.query = {pixels}"
            )

    def sample(
        self, split: str, generator: torch.Generator, tasks: int, ways: int, shots: int, query: int
    ) -> TaskBatch:
        """T random images of the split, each with a random context."""
        images = self.images[split]
        device = generator.device
        pick = torch.randint(images.shape[0], (tasks,), generator=generator, device=device)
        fewest = min(self.cfg.min_shots, shots)
        count = torch.randint(fewest, shots + 1, (tasks,), generator=generator, device=device)
        order = torch.rand(tasks, images.shape[1], generator=generator, device=device).argsort(1)
        pixels = order[:, :shots].to(self.device)
        y = images[pick.to(self.device)].float()[..., None] / 255.0  # (T, P, 1)
        x = self.coordinates[None].expand(tasks, -1, -1)
        real = torch.arange(shots, device=self.device)[None] < count.to(self.device)[:, None]
        xc = torch.where(real[..., None], x.gather(1, pixels[..., None].expand(-1, -1, 2)), 0.0)
        yc = torch.where(real[..., None], y.gather(1, pixels[..., None]), 0.0)
        info = {"context": count.to(self.device), "pixels": torch.where(real, pixels, 0)}
        return TaskBatch(Split(xc, yc), Split(x, y), 1, info)

    def episodes(
        self, split: str, n: int, ways: int, shots: int, query: int, *, seed: int, batch_size: int
    ) -> Iterator[TaskBatch]:
        """n fixed tasks (images and contexts) for a seed, whatever the batch size."""
        generator = torch.Generator().manual_seed(seed)
        whole = self.sample(split, generator, n, ways, shots, query)
        for start in range(0, n, batch_size):
            yield whole[start : min(start + batch_size, n)]
