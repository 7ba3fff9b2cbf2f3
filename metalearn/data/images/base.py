"""What every image data set's config shares: the task shape, the image size, where the files
are and whether to fetch them."""

from dataclasses import dataclass
from typing import ClassVar

from metalearn.errors import ConfigError


@dataclass
class ImageTaskConfig:
    """The keys of every image data set (`data.*`); each data set adds its own and its defaults."""

    task_kind: ClassVar[str] = "classification"
    # what `episode_scope` may be: 'all' (classes from the whole split); Omniglot adds 'alphabet'
    EPISODE_SCOPES: ClassVar[tuple[str, ...]] = ("all",)
    name: str = ""
    root: str | None = None  # data root (None: $METALEARN_DATA, else ~/.cache/metalearn)
    ways: int = 5  # N: classes per test task
    shots: int = 1  # K: labelled examples per class
    query: int = 15  # Q: query examples per class
    image_size: int = 84  # images are resized once to image_size x image_size
    download: bool = True  # fetch the data set's official files when no source is found
    episode_scope: str = "all"  # evaluation episodes' classes: from the whole split ('all')

    def __post_init__(self) -> None:
        """ways >= 2 (one class is no task); shots, query and image_size >= 1; a known scope."""
        if self.episode_scope not in self.EPISODE_SCOPES:
            grouped = " (only data=omniglot groups its classes, by alphabet)"
            raise ConfigError(
                f"data.episode_scope={self.episode_scope!r} is not a scope of data={self.name}"
                f"{grouped if self.episode_scope == 'alphabet' else ''}; valid: "
                f"{', '.join(self.EPISODE_SCOPES)}"
            )
        if self.ways < 2:
            raise ConfigError(
                f"data.ways must be >= 2 (a task tells classes apart), got {self.ways}"
            )
        for key in ("shots", "query", "image_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be positive, got {getattr(self, key)}")
