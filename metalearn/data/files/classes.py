"""Class-indexed data sets: ClassSet, rotated classes, and the packaged split lists."""

import re
from dataclasses import dataclass
from importlib import resources

import torch

from metalearn.errors import DataError

# "<Alphabet>/characterKK/rotDDD": a base item (here an Omniglot character) turned by DDD degrees.
_ROTATED = re.compile(r"^(?P<base>.+)/rot(?P<degrees>\d{3})$")
ROTATIONS = (0, 90, 180, 270)


@dataclass
class ClassSet:
    """Every class's examples, class-indexed: images[c, e] is example e of class c."""

    images: torch.Tensor  # uint8 [C, E, 1, H, W]
    names: list[str]  # len C, e.g. "Angelic/character01/rot090"

    def __post_init__(self) -> None:
        if self.images.ndim != 5 or self.images.shape[2] != 1:
            raise ValueError(f"ClassSet.images must be [C, E, 1, H, W], got {self.images.shape}")
        if len(self.names) != self.images.shape[0]:
            raise ValueError(f"{len(self.names)} names for {self.images.shape[0]} classes")

    def __len__(self) -> int:
        return len(self.names)


def rotated_name(base: str, degrees: int) -> str:
    """The class name of `base` turned by `degrees` (a multiple of 90), e.g. ".../rot090"."""
    return f"{base}/rot{degrees:03d}"


def parse_rotated_name(name: str) -> tuple[str, int]:
    """Split "<base>/rotDDD" into (base, DDD); DDD must be one of 0, 90, 180, 270."""
    match = _ROTATED.match(name)
    if match is None or int(match["degrees"]) not in ROTATIONS:
        raise DataError(
            f"Class name {name!r} is not of the form '<base>/rotDDD' with DDD in 000/090/180/270."
        )
    return match["base"], int(match["degrees"])


def gather_classes(items: torch.Tensor, item_names: list[str], classes: list[str]) -> ClassSet:
    """Build a ClassSet by indexing `items` (uint8 [N, E, H, W]) with rotated class names.

    Class "<base>/rotDDD" holds every example of item `base` turned counter-clockwise by DDD
    degrees, the convention of PIL's `Image.rotate` and `numpy.rot90`: `torch.rot90(x, k,
    dims=(-2, -1))` with k = DDD / 90 moves the top-right corner to the top-left.
    """
    index = {name: i for i, name in enumerate(item_names)}
    parsed = [parse_rotated_name(name) for name in classes]
    missing = sorted({base for base, _ in parsed if base not in index})
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(
            f"{len(missing)} classes of the split are not in the data ({shown}); the data set "
            f"is incomplete or from a different release. Delete it and download it again."
        )
    rows = torch.tensor([index[base] for base, _ in parsed], dtype=torch.long)
    quarter_turns = torch.tensor([degrees // 90 for _, degrees in parsed], dtype=torch.long)
    images = items[rows]  # [C, E, H, W]
    for k in range(1, 4):  # one batched rot90 per angle instead of one per class
        turned = (quarter_turns == k).nonzero().squeeze(1)
        if len(turned):
            images[turned] = torch.rot90(images[turned], k, dims=(-2, -1))
    return ClassSet(images=images.unsqueeze(2).contiguous(), names=list(classes))


def with_rotations(bases: list[str], rotations: tuple[int, ...] = ROTATIONS) -> list[str]:
    """Every base item in every rotation, base-major: [a/rot000, a/rot090, ..., b/rot000, ...]."""
    return [rotated_name(base, degrees) for base in bases for degrees in rotations]


def class_list_path(dataset: str, split: str, part: str):
    """The packaged list `metalearn/splits/<dataset>/<split>/<part>.txt`."""
    return resources.files("metalearn") / "splits" / dataset / split / f"{part}.txt"


def read_class_list(dataset: str, split: str, part: str) -> list[str]:
    """Read the packaged list `metalearn/splits/<dataset>/<split>/<part>.txt`, one class a line."""
    path = class_list_path(dataset, split, part)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise DataError(
            f"The packaged split list {path} is missing; reinstall metalearn "
            f"(pip install -e .) so its package data is present."
        ) from err
    return [line.strip() for line in text.splitlines() if line.strip()]


def check_disjoint(lists: dict[str, list[str]], files: dict[str, str]) -> None:
    """Raise DataError if a class is listed twice, in one part or in two: meta-train, validation
    and test classes must be distinct and disjoint, or test tasks reuse training classes.
    `files[part]` names where the part's list was read, for the message."""
    seen: dict[str, str] = {}
    for part, classes in lists.items():
        for name in classes:
            if name in seen:
                first = seen[name]
                where = (
                    f"twice in {files[part]}"
                    if first == part
                    else f"in both {files[first]} ({first}) and {files[part]} ({part})"
                )
                raise DataError(
                    f"The class {name!r} is listed {where}, but meta-train, validation and test "
                    f"classes must be distinct and disjoint: a file is corrupt or was edited, "
                    f"restore the original."
                )
            seen[name] = part


def read_split_lists(dataset: str, split: str, parts: tuple[str, ...]) -> dict[str, list[str]]:
    """part -> the packaged list of `read_class_list`, checked to be disjoint."""
    lists = {part: read_class_list(dataset, split, part) for part in parts}
    check_disjoint(lists, {part: str(class_list_path(dataset, split, part)) for part in parts})
    return lists
