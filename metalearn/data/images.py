"""Image few-shot data sets as typed configs plus the loader that yields class-indexed tensors."""

from dataclasses import dataclass
from typing import ClassVar

import torch

from metalearn.config import check_seed
from metalearn.data.omniglot import load_omniglot
from metalearn.data.root import resolve_root
from metalearn.data.tasks import ClassTasks, check_image_task_config
from metalearn.errors import ConfigError

OMNIGLOT_SPLITS = ("vinyals", "maml", "background")


@dataclass
class OmniglotConfig:
    """Omniglot (Lake et al. 2015), read from the official archives under the data root."""

    task_kind: ClassVar[str] = "classification"
    name: str = "omniglot"
    root: str | None = None  # data root (None: $METALEARN_DATA, else ~/.cache/metalearn)
    split: str = (
        "vinyals"  # 'vinyals' (with rotations), 'maml' (1200/423 + rotations), 'background'
    )
    ways: int = 5  # N: classes per test task
    shots: int = 1  # K: labelled examples per class
    query: int = 15  # Q: query examples per class
    image_size: int = 28  # images are resized once to image_size x image_size (ink = 1)
    download: bool = True  # fetch the official archives when they are missing from the root
    split_seed: int = 0  # seed of the 'maml' and 'background' splits

    def __post_init__(self) -> None:
        if self.split not in OMNIGLOT_SPLITS:
            raise ConfigError(
                f"data.split={self.split!r} is not an Omniglot split; "
                f"valid: {', '.join(OMNIGLOT_SPLITS)}"
            )
        check_image_task_config(self)
        check_seed(self.split_seed, "data.split_seed")


def omniglot_tasks(cfg: OmniglotConfig, device: torch.device) -> ClassTasks:
    """Load (decoding once, then from the cache) and hold every split's images on the device."""
    sets = load_omniglot(
        resolve_root(cfg.root),
        cfg.split,
        image_size=cfg.image_size,
        seed=cfg.split_seed,
        download=cfg.download,
    )
    return ClassTasks({split: s.images for split, s in sets.items()}, device)
